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
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

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
    if grouped:
        return StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed), folds
    return StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed), folds


@dataclass
class ProbeScores:
    """Per-fold scores of one feature set."""

    folds: dict[str, list[float]]  # metric → one score per fold
    n_items: int
    n_features: int

    def mean(self, metric: str) -> float:
        return float(np.mean(self.folds[metric]))

    def ci95(self, metric: str) -> float:
        """Half-width of the 95 % confidence interval of the mean over folds (Student t)."""
        from scipy import stats

        values = np.asarray(self.folds[metric])
        if len(values) < 2:
            return float("nan")
        sem = values.std(ddof=1) / np.sqrt(len(values))
        return float(stats.t.ppf(0.975, len(values) - 1) * sem)


def linear_probe(
    X: np.ndarray, y: np.ndarray, groups: np.ndarray | None, n_splits: int, seed: int = 0
) -> ProbeScores:
    """Standardise + logistic regression, cross-validated; scores per fold."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_validate
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cv, _ = splitter(y, groups, n_splits, strict=True, seed=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    result = cross_validate(probe, X, y, groups=groups, cv=cv, scoring=SCORERS, error_score="raise")
    folds = {name: [float(v) for v in result[f"test_{name}"]] for name in SCORERS}
    return ProbeScores(folds=folds, n_items=len(y), n_features=X.shape[1])
