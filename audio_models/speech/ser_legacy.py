"""Load the upstream emotion recogniser's ``grid/best_classifiers.pickle`` in today's scikit-learn.

x4nth055/emotion-recognition-using-speech pickles a list of ``(best_estimator, best_params,
cv_score)`` with an old scikit-learn (0.21–0.24). Today's scikit-learn refuses those files:
public module paths moved (``sklearn.svm.classes`` → ``sklearn.svm._classes``), the tree node
record gained ``missing_go_to_left``, gradient boosting's loss objects were replaced, and
``base_estimator`` became ``estimator``. This module unpickles with an exact allow-list of
``(module, name)`` globals (:data:`ALLOWED_GLOBALS`), maps the old paths, and then upgrades
each estimator in place so that ``predict_proba`` gives the numbers the old version gave
(checked against reference outputs in the tests).

A pickle runs code when loaded: callers verify the file's SHA-256 first
(:mod:`audio_models.speech.ser`); the allow-list here is a second line of defence.
"""

from __future__ import annotations

import importlib
import inspect
import io
import pickle
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, is_classifier
from sklearn.exceptions import InconsistentVersionWarning
from sklearn.tree._tree import NODE_DTYPE, Tree

from audio_models.utils.errors import UserError


class UnsafePickleError(pickle.UnpicklingError, UserError):
    """The pickle names a global outside the allow-list.

    Also a :class:`UserError`: the runner reports it as one line, naming the global.
    """


class _LegacyTree(Tree):
    """A Tree whose state may lack fields added since (replaced by a plain Tree after loading)."""

    def __reduce__(self) -> Any:  # pragma: no cover - never pickled: swapped out first
        raise pickle.PicklingError("_LegacyTree must be upgraded before pickling")

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._legacy_args = None
        super().__setstate__(_upgrade_tree_state(state))


class _Stub:
    """Stand-in for a class that no longer exists; keeps its pickled state for the upgrade."""

    legacy_name = ""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _stub(name: str) -> type[_Stub]:
    return type(name.rsplit(".", 1)[-1], (_Stub,), {"legacy_name": name})


def _upgrade_tree_state(state: dict[str, Any]) -> dict[str, Any]:
    nodes = state["nodes"]
    if nodes.dtype == NODE_DTYPE:
        return state
    upgraded = np.zeros(nodes.shape, dtype=NODE_DTYPE)
    for name in nodes.dtype.names:
        upgraded[name] = nodes[name]
    # Old trees never saw missing values: "missing_go_to_left" is irrelevant, 0 is its default.
    return {**state, "nodes": upgraded}


def _new_stub(cls: type) -> _Stub:
    """The ``newObj`` helper of scikit-learn's Cython trees and metrics, for stand-ins only."""
    if not (isinstance(cls, type) and issubclass(cls, _Stub)):
        raise UnsafePickleError(f"refusing newObj({cls!r}) in a model pickle: only for the trees")
    return cls.__new__(cls)


# What a global of the pickle becomes: an object importable today (module, name), or one of
# the loader's own stand-ins.
_Target = tuple[str, str] | type | Callable[..., Any]

# numpy 2 renamed numpy.core to numpy._core; pickles name either, the objects are the same.
_NUMPY_CORE = "numpy._core" if int(np.__version__.split(".", 1)[0]) >= 2 else "numpy.core"

# The upstream grid (emotion-recognition-using-speech parameters.py) and the parts its fitted
# estimators hold: class -> (where to import it from today, every module a pickle from
# scikit-learn 0.21 to today names it under). 0.21 used public module paths, 0.22 moved the
# code to private ones (``sklearn.svm.classes`` -> ``sklearn.svm._classes``).
_SKLEARN_CLASSES: dict[str, tuple[str, tuple[str, ...]]] = {
    "SVC": ("sklearn.svm", ("sklearn.svm.classes", "sklearn.svm._classes")),
    "RandomForestClassifier": (
        "sklearn.ensemble",
        ("sklearn.ensemble.forest", "sklearn.ensemble._forest"),
    ),
    "GradientBoostingClassifier": (
        "sklearn.ensemble",
        ("sklearn.ensemble.gradient_boosting", "sklearn.ensemble._gb"),
    ),
    "KNeighborsClassifier": (
        "sklearn.neighbors",
        ("sklearn.neighbors.classification", "sklearn.neighbors._classification"),
    ),
    "MLPClassifier": (
        "sklearn.neural_network",
        (
            "sklearn.neural_network.multilayer_perceptron",
            "sklearn.neural_network._multilayer_perceptron",
        ),
    ),
    "BaggingClassifier": (
        "sklearn.ensemble",
        ("sklearn.ensemble.bagging", "sklearn.ensemble._bagging"),
    ),
    # The trees of forests and bagging (classifiers) and of gradient boosting (regressors).
    "DecisionTreeClassifier": ("sklearn.tree", ("sklearn.tree.tree", "sklearn.tree._classes")),
    "DecisionTreeRegressor": ("sklearn.tree", ("sklearn.tree.tree", "sklearn.tree._classes")),
    # Gradient boosting's init_ (0.21 on).
    "DummyClassifier": ("sklearn.dummy", ("sklearn.dummy",)),
    # The MLP's label binarizer and solver state.
    "LabelBinarizer": (
        "sklearn.preprocessing",
        ("sklearn.preprocessing.label", "sklearn.preprocessing._label"),
    ),
    "AdamOptimizer": (
        "sklearn.neural_network._stochastic_optimizers",
        ("sklearn.neural_network._stochastic_optimizers",),
    ),
    "SGDOptimizer": (
        "sklearn.neural_network._stochastic_optimizers",
        ("sklearn.neural_network._stochastic_optimizers",),
    ),
}

# Gradient boosting's loss objects since scikit-learn 1.3 (estimators pickled by today's
# version, including upgraded legacy ones), as their __reduce__ names them.
_SKLEARN_LOSSES: dict[str, tuple[str, ...]] = {
    "sklearn._loss.loss": ("HalfBinomialLoss", "HalfMultinomialLoss", "ExponentialLoss"),
    "sklearn._loss.link": ("Interval", "LogitLink", "HalfLogitLink", "MultinomialLogit"),
    "sklearn._loss._loss": (
        "CyHalfBinomialLoss",
        "CyHalfMultinomialLoss",
        "CyExponentialLoss",
        "__pyx_unpickle_CyHalfMultinomialLoss",
    ),
}

# Classes that no longer exist or whose pickled state changed: loaded as stand-ins, then
# replaced by _upgrade. Gradient boosting's losses before 1.3 (0.21+ and older spellings):
_LEGACY_LOSSES = ("BinomialDeviance", "MultinomialDeviance", "ExponentialLoss")
_LEGACY_LOSS_MODULES = ("sklearn.ensemble._gb_losses", "sklearn.ensemble.gradient_boosting")
# A KNeighbors model's KD/ball tree (and the distance metric inside it) is rebuilt from _fit_X:
# the state layout changed between versions. The grid's p = 1, 2, 3..5 give these metrics.
_NEIGHBOR_TREES = {
    "KDTree": ("sklearn.neighbors.kd_tree", "sklearn.neighbors._kd_tree"),
    "BallTree": ("sklearn.neighbors.ball_tree", "sklearn.neighbors._ball_tree"),
}
_METRIC_MODULES = (
    "sklearn.neighbors.dist_metrics",  # up to 0.21
    "sklearn.neighbors._dist_metrics",  # 0.22 to 0.24
    "sklearn.metrics._dist_metrics",  # 1.0 on (names with a "64" suffix from 1.2)
)
_METRICS = ("EuclideanDistance", "ManhattanDistance", "MinkowskiDistance")


def _allowed_globals() -> dict[tuple[str, str], _Target]:
    allowed: dict[tuple[str, str], _Target] = {}
    for name, (home, modules) in _SKLEARN_CLASSES.items():
        allowed.update({(module, name): (home, name) for module in modules})
    for module, names in _SKLEARN_LOSSES.items():
        allowed.update({(module, name): (module, name) for name in names})
    for module in _LEGACY_LOSS_MODULES:
        allowed.update({(module, name): _stub(f"{module}.{name}") for name in _LEGACY_LOSSES})
    for name, modules in _NEIGHBOR_TREES.items():
        for module in modules:
            allowed[module, name] = _stub(f"{module}.{name}")
            allowed[module, "newObj"] = _new_stub
    for module in _METRIC_MODULES:
        allowed[module, "newObj"] = _new_stub
        for name in _METRICS:
            allowed[module, name] = _stub(f"{module}.{name}")
    for name in _METRICS:
        module = "sklearn.metrics._dist_metrics"
        allowed[module, f"{name}64"] = _stub(f"{module}.{name}64")
    # The node arrays of old trees lack fields added since: upgraded while loading.
    allowed["sklearn.tree._tree", "Tree"] = _LegacyTree
    # numpy arrays, dtypes and scalars (pickles of numpy 1 say numpy.core, of numpy 2
    # numpy._core; _frombuffer is protocol 5's array form).
    allowed["numpy", "ndarray"] = ("numpy", "ndarray")
    allowed["numpy", "dtype"] = ("numpy", "dtype")
    for core in ("numpy.core", "numpy._core"):
        allowed[f"{core}.multiarray", "_reconstruct"] = (
            f"{_NUMPY_CORE}.multiarray",
            "_reconstruct",
        )
        allowed[f"{core}.multiarray", "scalar"] = (f"{_NUMPY_CORE}.multiarray", "scalar")
        allowed[f"{core}.numeric", "_frombuffer"] = (f"{_NUMPY_CORE}.numeric", "_frombuffer")
    # RandomState objects (random_state_, _rng): numpy < 1.17, 1.17 on, and numpy 2's
    # bit generator and seed sequence.
    allowed["numpy.random", "__RandomState_ctor"] = ("numpy.random", "__RandomState_ctor")
    for name in ("__randomstate_ctor", "__bit_generator_ctor"):
        allowed["numpy.random._pickle", name] = ("numpy.random._pickle", name)
    allowed["numpy.random._mt19937", "MT19937"] = ("numpy.random._mt19937", "MT19937")
    for name in ("SeedSequence", "__pyx_unpickle_SeedSequence"):
        allowed["numpy.random.bit_generator", name] = ("numpy.random.bit_generator", name)
    # Plain objects in protocols 0-2, which Python 3 writes under Python 2's module names.
    for builtins in ("builtins", "__builtin__"):
        allowed[builtins, "object"] = ("builtins", "object")
        allowed[builtins, "bytes"] = ("builtins", "bytes")
    for copyreg in ("copyreg", "copy_reg"):
        allowed[copyreg, "_reconstructor"] = ("copyreg", "_reconstructor")
    allowed["_codecs", "encode"] = ("_codecs", "encode")  # bytes in protocols 0-2
    return allowed


# Exact (module, name) pairs a legacy grid pickle may name; nothing is admitted by prefix. A
# prefix let in anything under sklearn.*/numpy* (sklearn.utils._testing.check_output is
# subprocess.check_output; numpy.testing and numpy.f2py run code; "numpyevil" matched
# "numpy"), and importing a module named by the file can itself run code.
ALLOWED_GLOBALS: Mapping[tuple[str, str], _Target] = MappingProxyType(_allowed_globals())


class LegacyUnpickler(pickle.Unpickler):
    """Unpickler that admits only :data:`ALLOWED_GLOBALS`, mapping old scikit-learn paths.

    Every opcode that names a global (GLOBAL, STACK_GLOBAL, INST, EXT*) goes through
    ``find_class``: the pair is looked up before any module is imported.
    """

    def find_class(self, module: str, name: str) -> Any:
        target = ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name} from a model pickle: it is not one "
                "of the scikit-learn/numpy objects the upstream grid's estimators are made of"
            )
        if not isinstance(target, tuple):
            return target
        home, attribute = target
        try:
            return getattr(importlib.import_module(home), attribute)
        except (ImportError, AttributeError):
            raise pickle.UnpicklingError(
                f"cannot find {module}.{name} (now {home}.{attribute}) in this installation"
            ) from None


# -- upgrading estimators -----------------------------------------------------------------


def _walk(obj: Any, seen: set[int]) -> Iterator[Any]:
    """Every estimator reachable from ``obj`` (through attributes, lists and object arrays)."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, BaseEstimator):
        yield obj
        children: Any = list(vars(obj).values())
    elif isinstance(obj, list | tuple):
        children = obj
    elif isinstance(obj, np.ndarray) and obj.dtype == object:
        children = obj.ravel().tolist()
    else:
        return
    for child in children:
        yield from _walk(child, seen)


def _plain_tree(tree: _LegacyTree, *, classifier: bool) -> Tree:
    n_classes = np.asarray(tree.n_classes, dtype=np.intp)
    plain = Tree(tree.n_features, n_classes, tree.n_outputs)
    state = tree.__getstate__()
    if classifier:
        # Since scikit-learn 1.4 a classification tree stores class fractions per node, not
        # weighted counts, and predict_proba no longer normalises: normalise once here.
        values = state["values"]
        totals = values.sum(axis=-1, keepdims=True)
        state = {
            **state,
            "values": np.divide(values, totals, out=np.zeros_like(values), where=totals > 0),
        }
    plain.__setstate__(state)
    return plain


def _upgrade(estimator: BaseEstimator) -> None:
    state = vars(estimator)
    # Replace loading-time tree subclasses by plain Trees, so the model re-pickles cleanly.
    for key, value in list(state.items()):
        if isinstance(value, _LegacyTree):
            state[key] = _plain_tree(value, classifier=is_classifier(estimator))
    # base_estimator → estimator (scikit-learn 1.2) in ensembles.
    if "base_estimator" in state and "estimator" not in state:
        state["estimator"] = state.pop("base_estimator")
    if "base_estimator_" in state and "estimator_" not in state:
        state["estimator_"] = state.pop("base_estimator_")
    if "n_features_in_" not in state:  # added in scikit-learn 0.24
        n_features = _input_width(estimator)
        if n_features is not None:
            state["n_features_in_"] = n_features
    for stale in ("min_impurity_split", "n_features_"):
        state.pop(stale, None)
    # Constructor parameters added since (SVC.break_ties, trees' monotonic_cst, …) take their
    # defaults, which reproduce the old behaviour.
    for name, param in inspect.signature(type(estimator).__init__).parameters.items():
        if name != "self" and name not in state and param.default is not inspect.Parameter.empty:
            state[name] = param.default
    if isinstance(state.get("loss_"), _Stub):
        _upgrade_gradient_boosting(estimator)
    if isinstance(state.get("_tree"), _Stub):
        _rebuild_neighbors_tree(estimator)
    # Attributes renamed to private ones (public names became properties).
    for old, new in (("n_support_", "_n_support"), ("probA_", "_probA"), ("probB_", "_probB")):
        if old in state and new not in state:
            state[new] = state.pop(old)
    if type(estimator).__name__ == "DummyClassifier" and "_strategy" not in state:
        state["_strategy"] = state["strategy"]
    if "_fit_X" in state and "n_samples_fit_" not in state:
        state["n_samples_fit_"] = state["_fit_X"].shape[0]


def _input_width(estimator: BaseEstimator) -> int | None:
    state = vars(estimator)
    if "n_features_" in state:
        return int(state["n_features_"])
    if "support_vectors_" in state:
        return int(state["support_vectors_"].shape[1])
    if "coefs_" in state:
        return int(state["coefs_"][0].shape[0])
    if "_fit_X" in state:
        return int(state["_fit_X"].shape[1])
    if isinstance(state.get("tree_"), Tree):
        return int(state["tree_"].n_features)
    return None


def _upgrade_gradient_boosting(estimator: BaseEstimator) -> None:
    from sklearn._loss.loss import ExponentialLoss, HalfBinomialLoss, HalfMultinomialLoss

    state = vars(estimator)
    legacy = state.pop("loss_").legacy_name.rsplit(".", 1)[-1]
    n_classes = len(state["classes_"])
    if legacy == "MultinomialDeviance":
        state["_loss"] = HalfMultinomialLoss(n_classes=n_classes)
        state["n_trees_per_iteration_"] = n_classes
    elif legacy == "BinomialDeviance":
        state["_loss"] = HalfBinomialLoss()
        state["n_trees_per_iteration_"] = 1
    elif legacy == "ExponentialLoss":
        state["_loss"] = ExponentialLoss()
        state["n_trees_per_iteration_"] = 1
    else:
        raise pickle.UnpicklingError(f"unsupported legacy gradient-boosting loss {legacy}")
    if state.get("loss") == "deviance":  # renamed in scikit-learn 1.3
        state["loss"] = "log_loss"
    state.pop("max_features_", None)


def _rebuild_neighbors_tree(estimator: BaseEstimator) -> None:
    from sklearn.neighbors import BallTree, KDTree

    state = vars(estimator)
    method = state.get("_fit_method")
    cls = {"kd_tree": KDTree, "ball_tree": BallTree}.get(method)
    if cls is None:
        state["_tree"] = None
        return
    metric = state.get("effective_metric_", state.get("metric", "minkowski"))
    params = dict(state.get("effective_metric_params_") or {})
    state["_tree"] = cls(state["_fit_X"], state.get("leaf_size", 30), metric=metric, **params)


@dataclass
class LegacyClassifier:
    """One grid-search result: the fitted estimator, its parameters and CV score."""

    estimator: BaseEstimator
    params: dict[str, Any]
    cv_score: float


def load_legacy_classifiers(data: bytes | Path) -> list[LegacyClassifier]:
    """Unpickle ``best_classifiers.pickle`` bytes (already verified) and upgrade every estimator.

    Raises:
        UnsafePickleError: the file names a global outside the allow-list.
        pickle.UnpicklingError: the file is not in the expected format.
    """
    raw = Path(data).read_bytes() if isinstance(data, Path) else data
    with warnings.catch_warnings():
        # The version mismatch is the point of this loader; the tests check the numbers.
        warnings.simplefilter("ignore", InconsistentVersionWarning)
        loaded = LegacyUnpickler(io.BytesIO(raw)).load()
    if not isinstance(loaded, list | tuple) or not all(
        isinstance(entry, tuple) and len(entry) == 3 for entry in loaded
    ):
        raise pickle.UnpicklingError("expected a list of (estimator, params, cv_score) tuples")
    out = []
    for estimator, params, score in loaded:
        for part in _walk(estimator, set()):
            _upgrade(part)
        out.append(
            LegacyClassifier(estimator=estimator, params=dict(params), cv_score=float(score))
        )
    return out
