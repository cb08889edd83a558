"""The upstream's legacy classifier pickles load in today's scikit-learn with unchanged outputs."""

from __future__ import annotations

import copyreg
import hashlib
import os
import pickle
import re
import shlex
import struct
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.base import BaseEstimator

from audio_models.speech.ser import EmotionClassifierExtractor
from audio_models.speech.ser_legacy import UnsafePickleError, load_legacy_classifiers
from audio_models.testing import loaded
from audio_models.utils.errors import UserError
from runners.extract import extract
from tests.conftest import SHARED

LEGACY = SHARED / "data" / "ser-legacy"
CLASSES = [
    "SVC",
    "RandomForestClassifier",
    "GradientBoostingClassifier",
    "KNeighborsClassifier",
    "MLPClassifier",
    "BaggingClassifier",
]


@pytest.fixture
def legacy_dir() -> Path:
    if not LEGACY.is_dir():
        pytest.skip("../shared/data/ser-legacy is absent (a fresh clone has no shared data)")
    return LEGACY


@pytest.mark.parametrize("version", ["0.24.2", "0.21.3"])
def test_reproduces_old_probabilities(legacy_dir: Path, version: str) -> None:
    raw = (legacy_dir / f"best_classifiers_sklearn-{version}.pickle").read_bytes()
    with pytest.raises((ValueError, ModuleNotFoundError)):  # what plain pickle does today
        pickle.loads(raw)
    entries = load_legacy_classifiers(raw)
    assert [type(e.estimator).__name__ for e in entries] == CLASSES
    probe = np.load(legacy_dir / "probe_X.npy")
    reference = np.load(legacy_dir / f"predict_proba_sklearn-{version}.npy")
    for entry, expected in zip(entries, reference, strict=True):
        assert list(entry.estimator.classes_) == ["angry", "neutral", "sad"]
        assert entry.estimator.n_features_in_ == 180
        np.testing.assert_allclose(
            entry.estimator.predict_proba(probe), expected, rtol=0, atol=1e-9
        )
        # Upgraded estimators are plain current scikit-learn objects: they round-trip.
        again = pickle.loads(pickle.dumps(entry.estimator))
        np.testing.assert_array_equal(
            again.predict_proba(probe), entry.estimator.predict_proba(probe)
        )
    assert entries[0].params == {"C": 10, "gamma": 0.001, "kernel": "rbf"}


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/audio_models_pwned",))


def test_code_running_pickle_is_refused(tmp_path: Path) -> None:
    marker = Path("/tmp/audio_models_pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(UnsafePickleError, match=r"(posix|os)\.system"):
        load_legacy_classifiers(pickle.dumps([(_Evil(), {}, 0.5)]))
    assert not marker.exists()


def test_wrong_structure_is_refused() -> None:
    with pytest.raises(pickle.UnpicklingError, match="list of"):
        load_legacy_classifiers(pickle.dumps({"not": "a list"}))


# -- known gadget pickles ------------------------------------------------------------------
# Each one creates the marker file (or imports a module that does) if it runs. They are
# assembled opcode by opcode, so that one expression can be written as protocol 0 (GLOBAL,
# INST), 1 (OBJ), 2 (GLOBAL) and 4 (STACK_GLOBAL) pickles.


@dataclass(frozen=True)
class G:
    """A global, as GLOBAL/STACK_GLOBAL/INST/EXT name it."""

    module: str
    name: str


@dataclass(frozen=True)
class Call:
    func: G | Call
    args: tuple[Any, ...]


def call(func: G | Call, *args: Any) -> Call:
    return Call(func, args)


def _emit(value: Any, proto: int, style: str) -> bytes:
    """Opcodes that push ``value``; ``style`` is how calls of a global are written."""
    if isinstance(value, G):
        if proto >= 4:
            return _emit(value.module, proto, style) + _emit(value.name, proto, style) + b"\x93"
        return b"c" + f"{value.module}\n{value.name}\n".encode()
    if isinstance(value, Call):
        args = b"".join(_emit(arg, proto, style) for arg in value.args)
        if isinstance(value.func, G) and style == "INST":
            return b"(" + args + b"i" + f"{value.func.module}\n{value.func.name}\n".encode()
        if isinstance(value.func, G) and style == "OBJ":
            return b"(" + _emit(value.func, proto, style) + args + b"o"
        return _emit(value.func, proto, style) + b"(" + args + b"tR"
    if value is None:
        return b"N"
    if isinstance(value, bool):
        if proto < 2:
            return b"I01\n" if value else b"I00\n"
        return b"\x88" if value else b"\x89"
    if isinstance(value, str):
        if proto == 0:  # one line: escape what pickle escapes
            for char in "\\\0\n\r\x1a":
                value = value.replace(char, f"\\u{ord(char):04x}")
            return b"V" + value.encode("raw_unicode_escape") + b"\n"
        return b"X" + struct.pack("<I", len(value.encode())) + value.encode()
    if isinstance(value, int):
        return f"I{value}\n".encode() if proto == 0 else b"J" + struct.pack("<i", value)
    if isinstance(value, bytes):
        if proto >= 3:
            return b"B" + struct.pack("<I", len(value)) + value
        # What Python writes for bytes in protocols 0-2.
        return _emit(call(G("_codecs", "encode"), value.decode("latin1"), "latin1"), proto, style)
    if isinstance(value, list | tuple):
        items = b"".join(_emit(item, proto, style) for item in value)
        return b"(" + items + (b"l" if isinstance(value, list) else b"t")
    if isinstance(value, dict) and not value:
        return b"(d" if proto == 0 else b"}"
    raise TypeError(value)


VARIANTS = {
    "p0-GLOBAL": (0, "REDUCE"),
    "p0-INST": (0, "INST"),
    "p1-OBJ": (1, "OBJ"),
    "p2-GLOBAL": (2, "REDUCE"),
    "p4-STACK_GLOBAL": (4, "REDUCE"),
}


def assemble(expr: Any, variant: str) -> bytes:
    proto, style = VARIANTS[variant]
    return (b"\x80" + bytes([proto]) if proto >= 2 else b"") + _emit(expr, proto, style) + b"."


def first_global(expr: Any, style: str) -> G | None:
    """The global the unpickler meets first (INST names its class after the arguments)."""
    if isinstance(expr, G):
        return expr
    if isinstance(expr, Call):
        parts = (
            [*expr.args, expr.func]
            if style == "INST" and isinstance(expr.func, G)
            else [
                expr.func,
                *expr.args,
            ]
        )
        for part in parts:
            found = first_global(part, style)
            if found is not None:
                return found
    if isinstance(expr, list | tuple):
        for item in expr:
            found = first_global(item, style)
            if found is not None:
                return found
    return None


@dataclass
class Scene:
    """Where a gadget would leave its trace."""

    marker: Path
    module: str  # importing it creates the marker
    prefixed_module: str  # the same, under a name starting with "numpy"
    evil_file: Path  # a plain os.system pickle that touches the marker
    fortran: Path

    @property
    def touch(self) -> str:
        return f"touch {shlex.quote(str(self.marker))}"

    @property
    def code(self) -> str:
        return f"open({str(self.marker)!r}, 'w').close()"

    @property
    def evil(self) -> bytes:
        return assemble(call(G("os", "system"), self.touch), "p2-GLOBAL")


OS = call(G("importlib", "import_module"), "os")
GADGETS: dict[str, Callable[[Scene], Any]] = {
    "subprocess.check_output": lambda s: call(
        G("subprocess", "check_output"), ["touch", str(s.marker)]
    ),
    "subprocess.call": lambda s: call(G("subprocess", "call"), ["touch", str(s.marker)]),
    "subprocess.run": lambda s: call(G("subprocess", "run"), ["touch", str(s.marker)]),
    "subprocess.Popen": lambda s: call(G("subprocess", "Popen"), ["touch", str(s.marker)]),
    "subprocess.getoutput": lambda s: call(G("subprocess", "getoutput"), s.touch),
    "os.system": lambda s: call(G("os", "system"), s.touch),
    "posix.system": lambda s: call(G("posix", "system"), s.touch),
    "builtins.eval": lambda s: call(G("builtins", "eval"), s.code),
    "builtins.exec": lambda s: call(G("builtins", "exec"), s.code),
    "__builtin__.eval": lambda s: call(G("__builtin__", "eval"), s.code),
    "builtins.open": lambda s: call(G("builtins", "open"), str(s.marker), "w"),
    "builtins.getattr": lambda s: call(
        call(G("builtins", "getattr"), call(G("builtins", "__import__"), "os"), "system"), s.touch
    ),
    "builtins.__import__": lambda s: call(G("builtins", "__import__"), s.module),
    "importlib.import_module": lambda s: call(G("importlib", "import_module"), s.module),
    "functools.partial": lambda s: call(
        call(G("functools", "partial"), G("os", "system"), s.touch)
    ),
    "operator.attrgetter": lambda s: call(
        call(call(G("operator", "attrgetter"), "system"), OS), s.touch
    ),
    "operator.methodcaller": lambda s: call(
        call(G("operator", "methodcaller"), "system", s.touch), OS
    ),
    "pickle.loads": lambda s: call(G("pickle", "loads"), s.evil),
    "_pickle.loads": lambda s: call(G("_pickle", "loads"), s.evil),
    "joblib.load": lambda s: call(G("joblib", "load"), str(s.evil_file)),
    # Under the old sklearn./numpy prefixes:
    "sklearn.utils._testing.check_output": lambda s: call(
        G("sklearn.utils._testing", "check_output"), ["touch", str(s.marker)]
    ),
    "sklearn.utils._testing.assert_run_python_script_without_output": lambda s: call(
        G("sklearn.utils._testing", "assert_run_python_script_without_output"), s.code
    ),
    "sklearn.utils.discovery.import_module": lambda s: call(
        G("sklearn.utils.discovery", "import_module"), s.module
    ),
    "sklearn.utils.parallel.Parallel": lambda s: call(
        call(G("sklearn.utils.parallel", "Parallel"), 1),  # n_jobs=1
        [(G("sklearn.utils._testing", "check_output"), (["touch", str(s.marker)],), {})],
    ),
    "sklearn.externals.array_api_compat._internal.clone_module": lambda s: call(
        G("sklearn.externals.array_api_compat._internal", "clone_module"), s.module, {}
    ),
    "numpy.testing.runstring": lambda s: call(G("numpy.testing", "runstring"), s.code, {}),
    "numpy.testing._private.utils.runstring": lambda s: call(
        G("numpy.testing._private.utils", "runstring"), s.code, {}
    ),
    "numpy.load": lambda s: call(G("numpy", "load"), str(s.evil_file), None, True),
    "numpy.f2py.f2py2e.run_main": lambda s: call(
        G("numpy.f2py.f2py2e", "run_main"),
        ["-m", "pwned", str(s.fortran), "--build-dir", str(s.marker), "--quiet"],
    ),
    "numpyevil.x": lambda s: call(G(s.prefixed_module, "x")),
}


@pytest.fixture
def scene(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Scene]:
    token = uuid.uuid4().hex[:12]
    modules = tmp_path / "modules"
    modules.mkdir()
    found = Scene(
        marker=tmp_path / "pwned",
        module=f"pwned_{token}",
        prefixed_module=f"numpyevil_{token}",
        evil_file=tmp_path / "evil.pkl",
        fortran=tmp_path / "a.f",
    )
    for name in (found.module, found.prefixed_module):
        (modules / f"{name}.py").write_text(f"{found.code}\nx = print\n")
    found.evil_file.write_bytes(found.evil)
    found.fortran.write_text("      subroutine foo\n      end\n")
    monkeypatch.syspath_prepend(str(modules))
    yield found
    for name in (found.module, found.prefixed_module):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("gadget", list(GADGETS))
def test_gadget_pickles_are_refused_before_they_run(
    scene: Scene, gadget: str, variant: str
) -> None:
    expr = GADGETS[gadget](scene)
    first = first_global(expr, VARIANTS[variant][1])
    assert first is not None
    with pytest.raises(UnsafePickleError, match=re.escape(f"global {first.module}.{first.name}")):
        load_legacy_classifiers(assemble(expr, variant))
    time.sleep(0.01 if "Popen" not in gadget else 0.5)  # a started process would touch late
    assert not scene.marker.exists()


def test_extension_codes_go_through_the_allow_list(scene: Scene) -> None:
    # EXT opcodes name a global through copyreg's registry: still checked by find_class.
    code = 0x7A5E
    copyreg.add_extension("sklearn.utils._testing", "check_output", code)
    try:
        raw = (
            b"\x80\x02\x83"
            + struct.pack("<H", code)
            + b"("
            + _emit(["touch", str(scene.marker)], 2, "REDUCE")
            + b"tR."
        )
        with pytest.raises(UnsafePickleError, match=r"sklearn\.utils\._testing\.check_output"):
            load_legacy_classifiers(raw)
    finally:
        copyreg.remove_extension("sklearn.utils._testing", "check_output", code)
    assert not scene.marker.exists()


def test_gadget_is_refused_through_the_ser_entry_points(
    scene: Scene, tmp_path: Path, make_cfg
) -> None:
    # The reported reproduction: sklearn.utils._testing.check_output is subprocess's.
    raw = (
        b"csklearn.utils._testing\ncheck_output\n((Vtouch\nV"
        + str(scene.marker).encode()
        + b"\nltR."
    )
    path = tmp_path / "best_classifiers.pickle"
    path.write_bytes(raw)
    name = r"sklearn\.utils\._testing\.check_output"
    with pytest.raises(UnsafePickleError, match=name):
        load_legacy_classifiers(path)
    with pytest.raises(UserError, match=name):
        loaded(EmotionClassifierExtractor(name="ser", model_path=str(path), trust_unverified=True))
    digest = hashlib.sha256(raw).hexdigest()
    with pytest.raises(UserError, match=name):
        loaded(EmotionClassifierExtractor(name="ser", model_path=str(path), sha256=digest))
    cfg = make_cfg(
        "extractor=ser", f"extractor.model_path={path}", "extractor.trust_unverified=true"
    )
    with pytest.raises(UserError, match=name):
        extract(cfg)
    assert not scene.marker.exists()


def _grid_estimators(n_classes: int) -> list[BaseEstimator]:
    """The upstream grid's classifiers with the variants that change what they pickle."""
    from sklearn.ensemble import (
        BaggingClassifier,
        GradientBoostingClassifier,
        RandomForestClassifier,
    )
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import SVC

    return [
        SVC(probability=True, random_state=0),
        RandomForestClassifier(n_estimators=3, random_state=np.random.RandomState(1)),
        GradientBoostingClassifier(n_estimators=3, subsample=0.5, max_features=2, random_state=0),
        *([GradientBoostingClassifier(n_estimators=3, loss="exponential")] * (n_classes == 2)),
        *[
            KNeighborsClassifier(p=p, algorithm=algorithm, weights="distance")
            for p in (1, 2, 3)
            for algorithm in ("kd_tree", "ball_tree", "brute")
        ],
        MLPClassifier(hidden_layer_sizes=(5,), max_iter=5, random_state=0),
        BaggingClassifier(n_estimators=3, max_features=2, random_state=np.random.RandomState(0)),
    ]


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("n_classes", [2, 3])
def test_grid_estimators_pickled_today_load_in_every_protocol(n_classes: int) -> None:
    # The allow-list is exact, so it must still cover what the grid's estimators pickle,
    # including protocols 0-2 (copy_reg/__builtin__ names) and 5 (numpy's _frombuffer).
    rng = np.random.RandomState(0)
    x = rng.randn(40, 180)
    y = np.array(["angry", "neutral", "sad"][:n_classes])[rng.randint(0, n_classes, 40)]
    for estimator in _grid_estimators(n_classes):
        estimator.fit(x, y)
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            raw = pickle.dumps([(estimator, {"hidden_layer_sizes": (5,)}, 0.5)], protocol)
            [entry] = load_legacy_classifiers(raw)
            np.testing.assert_allclose(
                entry.estimator.predict_proba(x), estimator.predict_proba(x), rtol=0, atol=1e-12
            )
