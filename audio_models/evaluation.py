"""Evaluation: cross-validated linear probes, and word error rates of transcripts.

A linear probe says how well a feature set predicts a label.

Shared by ``runners.compare`` (which feature set predicts my labels best) and
``runners.train_ser`` (the splitter). Folds are grouped by speaker when a group column is
given, so a speaker never sits in both the training and the test part of a fold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jiwer
import numpy as np
import pandas as pd

from audio_models.utils.errors import UserError

#: WER compares words, not spelling conventions: case and punctuation are dropped first
#: (apostrophes stay, "don't" is one word), as LibriSpeech-style references are written.
_WER_TRANSFORM = jiwer.Compose(
    [
        jiwer.ToLowerCase(),
        jiwer.SubstituteRegexes({r"[^\w\s']": " "}),
        jiwer.RemoveMultipleSpaces(),
        jiwer.Strip(),
        jiwer.ReduceToListOfListOfWords(),
    ]
)


@dataclass(frozen=True)
class WordErrors:
    """Corpus-level word error rate and its parts (counts over all items)."""

    wer: float
    n_ref_words: int
    substitutions: int
    deletions: int
    insertions: int


def word_error_rate(references: list[str], hypotheses: list[str]) -> WordErrors:
    """Corpus WER, ``(S + D + I) / N``, after lower-casing and dropping punctuation.

    Items whose reference is empty after normalisation are left out (their WER is undefined).

    Raises:
        ValueError: the lists differ in length, or no reference has a word.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    kept = [
        (r, h) for r, h in zip(references, hypotheses, strict=True) if _WER_TRANSFORM(r) != [[]]
    ]
    if not kept:
        raise ValueError("no reference transcript has a word")
    out = jiwer.process_words(
        [r for r, _ in kept],
        [h for _, h in kept],
        reference_transform=_WER_TRANSFORM,
        hypothesis_transform=_WER_TRANSFORM,
    )
    n_ref = out.hits + out.substitutions + out.deletions
    return WordErrors(out.wer, n_ref, out.substitutions, out.deletions, out.insertions)


#: metric name → scikit-learn scorer; UAR (unweighted average recall) is balanced accuracy.
SCORERS = {"accuracy": "accuracy", "uar": "balanced_accuracy", "macro_f1": "f1_macro"}


def splitter(
    y: np.ndarray, groups: np.ndarray | None, n_splits: int, *, strict: bool = False, seed: int = 0
) -> tuple[Any, int]:
    """A stratified (grouped, when ``groups`` has 2+ values) K-fold splitter and its fold count.

    With ``strict`` a class with fewer examples (or groups) than ``n_splits`` is an error;
    otherwise the fold count shrinks to fit.
    """
    counts = pd.Series(y).value_counts()
    if counts.min() < 2:
        raise UserError(
            f"class {counts.idxmin()!r} has {counts.min()} example(s); cross-validation needs 2+"
        )
    grouped = groups is not None and len(set(groups)) >= 2
    if grouped:
        assert groups is not None
        per_class = pd.DataFrame({"y": y, "g": groups}).groupby("y")["g"].nunique()
        available, unit = int(per_class.min()), "groups"
        weakest = per_class.idxmin()
    else:
        available, unit, weakest = int(counts.min()), "examples", counts.idxmin()
    if strict and available < n_splits:
        raise UserError(
            f"class {weakest!r} has {available} {unit}, too few for {n_splits} folds; "
            f"lower n_splits (at most {available}) or add data"
        )
    folds = min(n_splits, available)
    if folds < 2:
        raise UserError(f"class {weakest!r} has {available} {unit}; cross-validation needs 2+")
    # scikit-learn is imported here, not at the top: runners.compare --help and its
    # configuration errors should not pay for it.
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if grouped:
        return StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed), folds
    return StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed), folds


#: Bootstrap resamples behind each confidence interval.
N_RESAMPLES = 1000


def _scores_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, UAR and macro-F1 of confusion matrices ``[..., true, predicted]``.

    Defined as scikit-learn defines them, so that a resample scores as the full set does: UAR
    (``balanced_accuracy_score``) averages recall over the classes present in the truth;
    macro-F1 (``f1_score(average="macro")``) averages over classes in the truth or the
    predictions, a class never predicted correctly scoring 0.
    """
    cm = cm.astype(np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support, predicted = cm.sum(axis=-1), cm.sum(axis=-2)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=present)
    seen = present | (predicted > 0)
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros_like(tp), where=seen)
    return {
        "accuracy": tp.sum(axis=-1) / cm.sum(axis=(-2, -1)),
        "uar": recall.sum(axis=-1) / present.sum(axis=-1),
        "macro_f1": f1.sum(axis=-1) / seen.sum(axis=-1),
    }


def _confusion(codes_true: np.ndarray, codes_pred: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(codes_true * k + codes_pred, minlength=k * k).reshape(k, k)


def classification_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy, UAR (balanced accuracy) and macro-F1 of one set of predictions."""
    classes, codes = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    cm = _confusion(codes[: len(y_true)], codes[len(y_true) :], len(classes))
    return {name: float(value) for name, value in _scores_from_confusion(cm).items()}


@dataclass(frozen=True)
class OutOfFold:
    """A probe's out-of-fold predictions: every item predicted once, by the fold that held it
    out. Scores come from all of them pooled, not from an average over folds: with grouped
    folds the classes are unevenly spread over folds (a fold may hold one item of a class, or
    none), and a mean of per-fold UARs then weighs those few items like whole folds."""

    y: np.ndarray  # true labels (text)
    prediction: np.ndarray
    fold: np.ndarray  # the test fold of each item, 1-based
    groups: np.ndarray | None  # what the folds were grouped by (None: not grouped)
    n_folds: int
    n_features: int

    @property
    def n_items(self) -> int:
        return len(self.y)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.y.tolist()))

    def scores(self) -> dict[str, float]:
        """Accuracy, UAR and macro-F1 over all items pooled."""
        return classification_scores(self.y, self.prediction)

    def fold_scores(self) -> dict[str, list[float]]:
        """Each fold's own scores (their spread shows how stable the probe is)."""
        per_fold = [
            classification_scores(self.y[self.fold == f], self.prediction[self.fold == f])
            for f in range(1, self.n_folds + 1)
        ]
        return {name: [s[name] for s in per_fold] for name in SCORERS}

    def missing_classes(self) -> dict[int, list[str]]:
        """Fold → the classes none of its test items has (only folds that lack one)."""
        out = {}
        for f in range(1, self.n_folds + 1):
            lacking = sorted(set(self.classes) - set(self.y[self.fold == f].tolist()))
            if lacking:
                out[f] = lacking
        return out

    def bootstrap_ci(
        self, *, n_resamples: int = N_RESAMPLES, level: float = 0.95, seed: int = 0
    ) -> dict[str, tuple[float, float]]:
        """Percentile bootstrap interval of each pooled score.

        Resamples groups (all items of a drawn group together) when the folds were grouped,
        since items of one speaker are not independent; otherwise resamples items.
        """
        classes, codes = np.unique(np.concatenate([self.y, self.prediction]), return_inverse=True)
        k, n = len(classes), len(self.y)
        true, pred = codes[:n], codes[n:]
        rng = np.random.default_rng(seed)
        if self.groups is None:
            # Drawing n items with replacement is drawing n cells of the confusion matrix.
            cm = _confusion(true, pred, k).ravel()
            counts = rng.multinomial(n, cm / n, size=n_resamples)
        else:
            names, group = np.unique(self.groups, return_inverse=True)
            g = len(names)
            per_group = np.zeros((g, k * k))
            np.add.at(per_group, (group, true * k + pred), 1)
            counts = rng.multinomial(g, np.full(g, 1.0 / g), size=n_resamples) @ per_group
        scores = _scores_from_confusion(counts.reshape(n_resamples, k, k))
        tail = (1 - level) / 2
        return {
            name: (float(np.quantile(v, tail)), float(np.quantile(v, 1 - tail)))
            for name, v in scores.items()
        }


def fold_design(grouped_by: str | None, n_folds: int, seed: int) -> str:
    """How the folds were made, in words (for tables, captions and run params)."""
    if grouped_by:
        return f"stratified group {n_folds}-fold by {grouped_by!r} (shuffled, seed {seed})"
    return f"stratified {n_folds}-fold, items not grouped (shuffled, seed {seed})"


def ci_method(grouped_by: str | None, n_resamples: int = N_RESAMPLES) -> str:
    """How the confidence intervals were made, in words."""
    unit = f"{grouped_by!r} groups" if grouped_by else "items"
    return f"95 % percentile bootstrap over {unit} ({n_resamples} resamples)"


def linear_probe(
    X: np.ndarray, y: np.ndarray, groups: np.ndarray | None, n_splits: int, seed: int = 0
) -> OutOfFold:
    """Standardise + logistic regression, cross-validated; the out-of-fold predictions.

    Raises:
        UserError: a class has too few examples (or groups) for ``n_splits`` folds.
    """
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cv, n_folds = splitter(y, groups, n_splits, strict=True, seed=seed)
    grouped = isinstance(cv, StratifiedGroupKFold)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    prediction = np.empty(len(y), dtype=object)
    fold = np.zeros(len(y), dtype=np.int64)
    for number, (train, test) in enumerate(cv.split(X, y, groups if grouped else None), start=1):
        model = clone(probe).fit(X[train], y[train])
        prediction[test] = model.predict(X[test])
        fold[test] = number
    return OutOfFold(
        y=np.asarray(y, dtype=object),
        prediction=prediction,
        fold=fold,
        groups=np.asarray(groups, dtype=object) if grouped else None,
        n_folds=n_folds,
        n_features=X.shape[1],
    )
