"""Load the upstream emotion recogniser's ``grid/best_classifiers.pickle`` in today's scikit-learn.

x4nth055/emotion-recognition-using-speech pickles a list of ``(best_estimator, best_params,
cv_score)`` with an old scikit-learn (0.21–0.24). Today's scikit-learn refuses those files:
public module paths moved (``sklearn.svm.classes`` → ``sklearn.svm._classes``), the tree node
record gained ``missing_go_to_left``, gradient boosting's loss objects were replaced, and
``base_estimator`` became ``estimator``. This module unpickles with an allow-list of globals,
maps the old paths, and then upgrades each estimator in place so that ``predict_proba`` gives
the numbers the old version gave (checked against reference outputs in the tests).

A pickle runs code when loaded: callers verify the file's SHA-256 first
(:mod:`audio_models.speech.ser`); the allow-list here is a second line of defence.
"""

from __future__ import annotations

import importlib
import inspect
import io
import pickle
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, is_classifier
from sklearn.exceptions import InconsistentVersionWarning
from sklearn.tree._tree import NODE_DTYPE, Tree

# Globals a scikit-learn model pickle may name. Anything else (os.system, builtins.eval, …)
# is refused before it can run.
_ALLOWED_PREFIXES = ("sklearn.", "numpy", "scipy.sparse")
_ALLOWED_GLOBALS = {
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytearray"),
    ("builtins", "object"),
    ("copyreg", "_reconstructor"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
}
# Old module paths whose new home is not just "add a leading underscore".
_MOVED = {
    "sklearn.tree.tree": "sklearn.tree._classes",
    "sklearn.ensemble.gradient_boosting": "sklearn.ensemble._gb",
    "sklearn.neighbors.dist_metrics": "sklearn.metrics._dist_metrics",
    "sklearn.utils.weight_vector": "sklearn.utils._weight_vector",
}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list."""


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


class LegacyUnpickler(pickle.Unpickler):
    """Unpickler that maps old scikit-learn paths and refuses non-allow-listed globals."""

    def find_class(self, module: str, name: str) -> Any:
        if not (module.startswith(_ALLOWED_PREFIXES) or (module, name) in _ALLOWED_GLOBALS):
            raise UnsafePickleError(f"refusing to load global {module}.{name} from a model pickle")
        if module in {"sklearn.tree._tree", "sklearn.tree.tree"} and name == "Tree":
            return _LegacyTree
        if module in {
            "sklearn.ensemble._gb_losses",
            "sklearn.ensemble.gradient_boosting",
        } and name.endswith(("Deviance", "Loss", "LossFunction")):
            return _stub(f"{module}.{name}")
        if module.startswith(("sklearn.neighbors.kd_tree", "sklearn.neighbors.ball_tree")) or (
            module == "sklearn.neighbors.dist_metrics"
        ):
            # Old binary-tree and metric states differ; the tree is rebuilt from _fit_X.
            return _stub(f"{module}.{name}") if name != "newObj" else _new_stub
        for candidate in _candidates(module):
            try:
                return getattr(importlib.import_module(candidate), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"cannot find {module}.{name} in scikit-learn")


def _new_stub(cls: type) -> Any:
    return cls.__new__(cls) if issubclass(cls, _Stub) else cls()


def _candidates(module: str) -> Iterator[str]:
    yield module
    if module in _MOVED:
        yield _MOVED[module]
    head, _, tail = module.rpartition(".")
    if head.startswith("sklearn") and not tail.startswith("_"):
        yield f"{head}._{tail}"


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
