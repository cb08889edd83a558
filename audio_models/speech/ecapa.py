"""SpeechBrain ECAPA-TDNN speaker embeddings (``speechbrain/spkrec-ecapa-voxceleb`` by default).

The model is built by SpeechBrain's own ``EncoderClassifier.from_hparams`` and run through the
same steps as its ``encode_batch`` (Fbank → sentence mean normalisation → ECAPA-TDNN), batched
on the device. ECAPA's convolutions pad by reflection at each row's end, so zero padding in a
batch would change the embeddings near it: rows run in groups of equal length, as the
group-norm wav2vec2 models do, and a batch equals one file at a time.

A hyperparams file is code (HyperPyYAML builds whatever objects it names, and loads with an
unsafe YAML loader), so before SpeechBrain reads it the file is parsed without constructing
anything and every node's tag is checked: plain data, ``!ref <key>`` and ``!new:`` of the ECAPA
model's own SpeechBrain classes (:data:`ALLOWED_NEW`) pass; anything else (``!apply:os.system``,
``!!python/object/apply:``, a ``%TAG`` directive…) is refused, naming the tag and its line.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ruamel.yaml
import yaml

from audio_models.extractor import Extractor, OutputKind, Placement
from audio_models.registry import register_extractor
from audio_models.speech.hub import hub_offline
from audio_models.utils.errors import UserError, model_unavailable
from audio_models.utils.paths import default_cache_dir
from audio_models.utils.provenance import sha256_file

if TYPE_CHECKING:
    import torch

# The classes the published speechbrain/spkrec-ecapa-voxceleb hyperparams.yaml builds with
# ``!new:`` (features, normalisation, the ECAPA-TDNN and its classifier head, the label encoder
# and the Pretrainer that loads the checkpoints). Exact names: nothing else may be built,
# called (``!apply:``, ``!applyref:``, ``!name:``), imported (``!module:``) or read
# (``!include:``).
ALLOWED_NEW = frozenset(
    {
        "speechbrain.lobes.features.Fbank",
        "speechbrain.processing.features.InputNormalization",
        "speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN",
        "speechbrain.lobes.models.ECAPA_TDNN.Classifier",
        "speechbrain.dataio.encoder.CategoricalEncoder",
        "speechbrain.utils.parameter_transfer.Pretrainer",
    }
)
# Plain data: the tags YAML's own resolvers give untagged nodes (or ``!!str`` etc. spelled out).
_DATA_TAGS = frozenset(
    f"tag:yaml.org,2002:{kind}" for kind in ("str", "int", "float", "bool", "null", "seq", "map")
)
_NEW = "!new:"
_REF = "!ref"
# HyperPyYAML's tuple, "(1, 2)": data, its text being as plain as any other value's (see the
# '!' rule in _check_tree). Once HyperPyYAML has loaded a file, ruamel.yaml resolves plain
# "(...)" scalars to it on its own.
_TUPLE = "!tuple"
_REFERENCE = re.compile(r"<([^>]*)>")  # how HyperPyYAML finds references in a !ref value
# key or key[sub][...]: a "." in a reference makes HyperPyYAML call getattr on the object.
_KEY_PATH = re.compile(r"[^.\[\]]+(?:\[[^.\[\]]+\])*")


class _Composer(yaml.SafeLoader):
    """PyYAML's safe loader, used only to parse and compose nodes: nothing is constructed."""


def _tag(node: Any) -> str:
    tag = node.tag  # a str in PyYAML and ruamel.yaml 0.18; allow for a Tag object too
    return tag if isinstance(tag, str) else str(getattr(tag, "value", tag))


def _parse(text: str, where: str) -> list[tuple[str, Any]]:
    """The document's node tree as PyYAML and as ruamel.yaml (HyperPyYAML's parser) see it.

    Both are checked, so that a file the two parsers read differently cannot pass the check
    through one and be loaded through the other. Directives are refused: ``%TAG`` rebinds a
    tag handle (``%TAG !e! !apply:`` makes ``!e!os.system`` an ``!apply:``).
    """
    trees = []
    yaml_rt = ruamel.yaml.YAML(typ="rt")
    parsers: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
        (
            "PyYAML",
            lambda: yaml.parse(text, Loader=_Composer),
            lambda: list(yaml.compose_all(text, Loader=_Composer)),
        ),
        ("ruamel.yaml", lambda: yaml_rt.parse(text), lambda: list(yaml_rt.compose_all(text))),
    ]
    for parser, events, compose in parsers:
        try:
            for event in events():
                tags, version = getattr(event, "tags", None), getattr(event, "version", None)
                if tags or version:
                    found = [f"%TAG {h} {p}" for h, p in (tags or {}).items()]
                    found += [f"%YAML {'.'.join(map(str, version))}"] if version else []
                    raise UserError(
                        f"{where}: line {event.start_mark.line + 1}: refusing a hyperparams "
                        f"file with the YAML directive(s) {found}: directives change how the "
                        "file's tags read"
                    )
            documents = compose()
        except UserError:
            raise
        except Exception as exc:
            # Refused rather than left to HyperPyYAML: text one parser rejects may be read
            # differently, unchecked, by the other.
            mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
            at = f"line {mark.line + 1}: " if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise UserError(
                f"{where}: {at}refusing a hyperparams file {parser} cannot read ({problem})"
            ) from None
        if len(documents) != 1 or documents[0] is None or documents[0].id != "mapping":
            raise UserError(f"{where}: a hyperparams file is one YAML mapping (key: value)")
        trees.append((parser, documents[0]))
    return trees


def _refusal(where: str, node: Any, what: str) -> UserError:
    return UserError(
        f"{where}: line {node.start_mark.line + 1}: refusing a hyperparams file that uses "
        f"{what}; only plain data, !ref <key> and !new: of {sorted(ALLOWED_NEW)} are allowed"
    )


def _lookup(root: Any, path: str) -> Any | None:
    """The node a HyperPyYAML reference ``key[sub]`` names, or None."""
    node = root
    for part in path.replace("]", "").split("["):
        if node.id != "mapping":
            return None
        matches = [value for key, value in node.value if key.id == "scalar" and key.value == part]
        if not matches:
            return None
        node = matches[-1]
    return node


def _check_reference(node: Any, root: Any, where: str) -> None:
    if node.id != "scalar":
        raise _refusal(where, node, "!ref on a mapping or list")
    paths = _REFERENCE.findall(node.value)
    for path in paths:
        if not _KEY_PATH.fullmatch(path):
            # "<model.attr>" becomes !apply:getattr on the built object.
            raise _refusal(where, node, f"the reference <{path}> (only <key> or <key[sub]>)")
    if _REFERENCE.fullmatch(node.value):
        return  # the referenced node itself, checked where it is defined
    # Interpolation: str() of each target goes into a string, which HyperPyYAML reparses
    # (as a tuple) if it looks like "(...)". Plain scalars only, so nothing but checked text
    # can end up there.
    for path in paths:
        target = _lookup(root, path)
        if target is None or target.id != "scalar" or _tag(target) not in _DATA_TAGS:
            raise _refusal(where, node, f"<{path}> inside a string (only plain values there)")


def _check_tree(root: Any, where: str) -> None:
    """Walk every node (keys included; aliases reach their anchored node) and check its tag."""
    seen: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, is_key = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        tag = _tag(node)
        if node.id == "scalar" and "!" in node.value:
            # HyperPyYAML re-reads any string that looks like "(...)" as a tuple with PyYAML's
            # unsafe loader, where a "!" inside starts a tag (!!python/object/apply:...);
            # strings are also spliced into each other by !ref. No "!" in any value or key.
            raise _refusal(where, node, f"a '!' inside the value {node.value[:60]!r}")
        if tag in _DATA_TAGS or (tag == _TUPLE and node.id == "scalar"):
            pass
        elif is_key:
            raise _refusal(where, node, f"the tag {tag!r} on a key")
        elif tag == _REF:
            _check_reference(node, root, where)
        elif tag.startswith(_NEW) and tag[len(_NEW) :] in ALLOWED_NEW:
            if node.id == "scalar" and node.value != "":
                raise _refusal(where, node, f"{tag} with a scalar argument")
        elif tag.startswith("tag:yaml.org,2002:python/"):
            raise _refusal(where, node, f"the Python object tag {tag!r}")
        else:
            raise _refusal(where, node, f"the tag {tag!r}")
        children: list[tuple[Any, bool]] = []
        if node.id == "mapping":
            for key, value in node.value:
                if key.id != "scalar":
                    raise _refusal(where, key, "a mapping or list as a key")
                children += [(key, True), (value, False)]
        elif node.id == "sequence":
            children = [(item, False) for item in node.value]
        stack += reversed(children)  # popped in document order: the first problem is named


def check_hyperparams(text: str, where: str) -> frozenset[str]:
    """Refuse a hyperparams file that would build, call, import or read anything beyond the
    ECAPA model's own classes; returns its top-level keys.

    The check runs on the parsed node tree (never on lines: a "#" inside a string or a flow
    mapping hides the rest of a line from a line-based check), with every tag in its full
    form, before HyperPyYAML sees the file.

    Raises:
        UserError: naming the tag (or directive, reference, value) and its line.
    """
    keys: frozenset[str] = frozenset()
    for _, root in _parse(text, where):
        _check_tree(root, where)
        keys = frozenset(str(key.value) for key, _ in root.value)
    return keys


def _model_source(model: str) -> tuple[str, bool]:
    """What to hand SpeechBrain as ``source`` and whether it is a local directory."""
    local = Path(model).expanduser()
    if not local.is_dir():
        return model, False
    if not (local / "hyperparams.yaml").is_file():
        raise UserError(f"{local} has no hyperparams.yaml (a SpeechBrain model directory)")
    # Absolute: it also becomes pretrained_path, a string HyperPyYAML re-reads, and an
    # absolute path can never look like its "(...)" tuple syntax.
    return os.path.abspath(local), True


@dataclass
class EcapaConfig:
    _target_: str = "audio_models.speech.ecapa.EcapaExtractor"
    name: str = "ecapa"
    model: str = "speechbrain/spkrec-ecapa-voxceleb"
    revision: str | None = None
    normalize: bool = False  # the model's embedding normalisation (encode_batch normalize=)
    sample_rate: int = 16000
    max_chunk_s: float | None = 60.0  # longer files: length-weighted mean of chunk embeddings
    storage_dtype: str = "float32"


@register_extractor("ecapa", config=EcapaConfig)
class EcapaExtractor(Extractor):
    """One speaker embedding per item from a SpeechBrain ``EncoderClassifier``.

    Args:
        name: registered extractor name.
        model: hub id or local directory holding ``hyperparams.yaml`` and the checkpoints.
        revision: pinned hub commit (ignored for a local directory).
        normalize: apply the model's embedding normalisation (``mean_var_norm_emb``), as
            ``encode_batch(normalize=True)`` does.
        sample_rate: the model's input rate.
    """

    placement = Placement.DEVICE
    kind = OutputKind.VECTOR

    def __init__(
        self,
        *,
        name: str,
        model: str = "speechbrain/spkrec-ecapa-voxceleb",
        revision: str | None = None,
        normalize: bool = False,
        sample_rate: int = 16000,
        max_chunk_s: float | None = 60.0,
        storage_dtype: str = "float32",
    ) -> None:
        super().__init__(name=name, sample_rate=sample_rate, storage_dtype=storage_dtype)
        if max_chunk_s is not None and max_chunk_s * sample_rate < self.min_samples:
            raise UserError(f"extractor.max_chunk_s={max_chunk_s} is shorter than one frame")
        # ECAPA's activations grow with the input (about 1 GB per minute of audio at full
        # size): longer recordings are embedded in near-equal chunks, averaged by length.
        self.max_chunk = None if max_chunk_s is None else int(max_chunk_s * sample_rate)
        self.model_id, self.revision, self.normalize = model, revision, normalize
        self.mods: Any = None

    def load(self) -> None:
        if self.mods is not None:
            return
        model, revision, normalize = self.model_id, self.revision, self.normalize
        from speechbrain.inference.speaker import EncoderClassifier
        from speechbrain.utils.fetching import FetchConfig, LocalStrategy, fetch

        source, is_local = _model_source(model)
        savedir = (
            default_cache_dir() / "speechbrain" / re.sub(r"[^\w.-]+", "_", f"{source}@{revision}")
        )
        # A hub id asks first whether there is a network at all (no retry storm offline).
        fetch_config = FetchConfig(
            revision=revision, allow_network=not hub_offline(probe=not is_local)
        )
        # Check the very file from_hparams will load: it fetches hyperparams.yaml exactly like
        # this and, finding <savedir>/hyperparams.yaml already there, loads that (a hub file
        # fetched separately could be another revision, a cached one could predate the check).
        try:
            hyperparams = Path(
                fetch(
                    filename="hyperparams.yaml",
                    source=source,
                    savedir=savedir,
                    local_strategy=LocalStrategy.SYMLINK,
                    fetch_config=fetch_config,
                )
            )
            raw = hyperparams.read_bytes()
        except Exception as exc:
            if is_local:
                raise UserError(f"cannot read {source}/hyperparams.yaml: {exc}") from None
            raise model_unavailable(model, revision, exc) from None
        # Name the file itself (the savedir entry is a link to it), and the hub id for a hub file.
        where = str(hyperparams.resolve()) if is_local else f"{model} ({hyperparams.resolve()})"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"{where}: not UTF-8 text ({exc})") from None
        keys = check_hyperparams(text, where)
        # The published files name their own hub id as ``pretrained_path``: a local copy must
        # point it at itself, or SpeechBrain would go to the network for the weights.
        overrides = {"pretrained_path": source} if "pretrained_path" in keys else {}
        try:
            classifier = EncoderClassifier.from_hparams(
                source=source,
                savedir=str(savedir),
                overrides=overrides,
                run_opts={"device": "cpu"},
                local_strategy=LocalStrategy.SYMLINK,
                fetch_config=fetch_config,
            )
        except UserError:
            raise
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            if is_local:
                # Its hyperparams.yaml is here and passed the check: a missing or broken
                # checkpoint, not something to download.
                raise UserError(
                    f"cannot load SpeechBrain model from {source}: {type(exc).__name__}: {first}"
                ) from None
            raise UserError(
                f"cannot load SpeechBrain model {model!r}: {type(exc).__name__}: {first}. "
                f"Without network access, download it first (huggingface-cli download {model})"
                " or pass a local directory"
            ) from None
        self.classifier = classifier
        self.norm_emb = classifier.hparams.mean_var_norm_emb if normalize else None
        self.dim = int(classifier.mods.embedding_model.fc.conv.out_channels)  # lin_neurons
        weights = savedir / "embedding_model.ckpt"
        self._provenance = {
            "ecapa.model": model,
            "ecapa.revision": "local" if is_local else str(revision),
            "ecapa.hyperparams_sha256": hashlib.sha256(raw).hexdigest(),  # the checked bytes
            "ecapa.weights_sha256": sha256_file(weights.resolve())
            if weights.exists()
            else "unknown",
            "ecapa.padding": "equal-length groups",
        }
        self.mods = classifier.mods.eval()  # last: a load that failed half-way runs again

    @property
    def min_samples(self) -> int:
        # The reflection padding of the widest dilated convolution needs a few frames.
        return (self.sample_rate or 16000) // 10

    @property
    def feature_groups(self) -> list[tuple[str, int]]:
        self.load()
        return [("embedding", self.dim)]

    @property
    def feature_names(self) -> list[str]:
        self.load()
        return [f"embedding_{j}" for j in range(self.dim)]

    def torch_module(self) -> torch.nn.Module:
        import torch

        self.load()
        modules = torch.nn.ModuleDict(dict(self.mods.items()))
        if self.norm_emb is not None:
            modules["mean_var_norm_emb"] = self.norm_emb
        return modules

    def padded_samples(self, lengths: torch.Tensor, device: torch.device) -> int:
        return 0  # rows run in groups of equal length

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        import torch

        self.load()
        groups: dict[int, list[int]] = defaultdict(list)
        outputs: list[torch.Tensor | None] = [None] * len(lengths)
        for row, n in enumerate(lengths.tolist()):
            if self.max_chunk is not None and n > self.max_chunk:
                outputs[row] = self._encode_long(waveforms[row, :n])
            else:
                groups[n].append(row)
        for n, rows in groups.items():
            index = torch.tensor(rows, device=waveforms.device)
            for row, embedding in zip(rows, self._encode(waveforms[index, :n]), strict=True):
                outputs[row] = embedding
        return outputs  # type: ignore[return-value]

    def _encode_long(self, signal: torch.Tensor) -> torch.Tensor:
        """Length-weighted mean of the embeddings of near-equal chunks, one at a time."""
        import torch

        assert self.max_chunk is not None
        n = signal.shape[0]
        count = -(-n // self.max_chunk)
        bounds = [round(k * n / count) for k in range(count + 1)]
        total = torch.zeros(self.dim, dtype=torch.float64, device=signal.device)
        for a, b in itertools.pairwise(bounds):
            total += self._encode(signal[None, a:b])[0].double() * (b - a)
        return (total / n).float()

    def _encode(self, wavs: torch.Tensor) -> torch.Tensor:
        """``EncoderClassifier.encode_batch`` on equal-length rows (relative lengths all 1)."""
        import torch

        full = torch.ones(wavs.shape[0], device=wavs.device)
        feats = self.mods.compute_features(wavs.float())
        feats = self.mods.mean_var_norm(feats, full)
        embeddings = self.mods.embedding_model(feats, full)
        if self.norm_emb is not None:
            # Its statistics are plain attributes that Module.to() does not move.
            self.norm_emb.to(wavs.device)
            embeddings = self.norm_emb(embeddings, full)
        return embeddings[:, 0].float()

    def provenance(self) -> dict[str, str]:
        self.load()
        return dict(self._provenance)
