"""Screening metrics, computed with scikit-learn: at the operating threshold, at fixed
sensitivities and specificities, with a bootstrap confidence interval for AUROC, and
calibration (expected calibration error, calibration slope and intercept)."""

from __future__ import annotations

import math

import numpy as np
from sklearn import metrics as skm


def binary_metrics(y_true: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Metrics for positive-class scores against 0/1 truth at ``threshold``.

    AUROC is NaN when only one class is present (it is undefined, not 0.5).
    """
    y_true = np.asarray(y_true, dtype=int)
    scores = np.asarray(scores, dtype=float)
    y_pred = (scores >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel().tolist()
    both = len(np.unique(y_true)) == 2
    ppv = tp / (tp + fp) if tp + fp else math.nan
    npv = tn / (tn + fn) if tn + fn else math.nan
    return {
        "n": int(len(y_true)),
        "positives": int(y_true.sum()),
        "threshold": float(threshold),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "precision": float(skm.precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(skm.recall_score(y_true, y_pred, zero_division=0)),
        "f1": float(skm.f1_score(y_true, y_pred, zero_division=0)),
        "sensitivity": tp / (tp + fn) if tp + fn else math.nan,
        "specificity": tn / (tn + fp) if tn + fp else math.nan,
        "ppv": ppv,
        "npv": npv,
        "auroc": float(skm.roc_auc_score(y_true, scores)) if both else math.nan,
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }


FIXED_POINTS = (0.90, 0.95)
# 2,000 stratified resamples: the CI's end points move by < 0.002 between seeds.
BOOTSTRAP_RESAMPLES = 2000
AUROC_CHUNK = 100  # resamples counted at once


def clinical_metrics(y_true: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """binary_metrics plus what a radiology team needs to accept a model locally."""
    y_true = np.asarray(y_true, dtype=int)
    scores = np.asarray(scores, dtype=float)
    out = binary_metrics(y_true, scores, threshold)
    both = len(np.unique(y_true)) == 2
    out["auroc_ci95"] = auroc_ci(y_true, scores) if both else [math.nan, math.nan]
    out["average_precision"] = (
        float(skm.average_precision_score(y_true, scores)) if both else math.nan
    )
    if both:
        fpr, tpr, _ = skm.roc_curve(y_true, scores, drop_intermediate=False)
        spec = 1 - fpr
        out["sensitivity_at_specificity"] = {
            f"{s:.2f}": float(tpr[spec >= s].max()) if (spec >= s).any() else 0.0
            for s in FIXED_POINTS
        }
        out["specificity_at_sensitivity"] = {
            f"{s:.2f}": float(spec[tpr >= s].max()) if (tpr >= s).any() else 0.0
            for s in FIXED_POINTS
        }
    out.update(calibration_fit(y_true, scores))
    return out


def auroc_ci(y_true: np.ndarray, scores: np.ndarray, seed: int = 0) -> list[float]:
    """95% CI of AUROC by stratified bootstrap (positives and negatives resampled apart).

    A resample's AUROC is the share of its (positive, negative) pairs ranked right, ties
    half, counted from each film's multiplicity in the resample and the negatives' sorted
    running counts: linear in the films per resample, and never a pairs matrix."""
    rng = np.random.default_rng(seed)
    pos, neg = scores[y_true == 1], scores[y_true == 0]
    order = np.argsort(neg, kind="stable")
    below = np.searchsorted(neg[order], pos, "left")  # negatives under each positive
    up_to = np.searchsorted(neg[order], pos, "right")  # ... and those tied with it
    values = []
    for start in range(0, BOOTSTRAP_RESAMPLES, AUROC_CHUNK):
        picks = [
            (rng.choice(len(pos), len(pos)), rng.choice(len(neg), len(neg)))
            for _ in range(start, min(start + AUROC_CHUNK, BOOTSTRAP_RESAMPLES))
        ]
        a = np.stack([np.bincount(p, minlength=len(pos)) for p, _ in picks])
        b = np.stack([np.bincount(n, minlength=len(neg)) for _, n in picks])[:, order]
        running = np.zeros((len(picks), len(neg) + 1))
        np.cumsum(b, axis=1, out=running[:, 1:])
        wins = running[:, below] + 0.5 * (running[:, up_to] - running[:, below])
        values.append((a * wins).sum(axis=1) / (len(pos) * len(neg)))
    lo, hi = np.percentile(np.concatenate(values), [2.5, 97.5])
    return [float(lo), float(hi)]


def calibration_fit(y_true: np.ndarray, scores: np.ndarray, bins: int = 10) -> dict:
    """Expected calibration error (equal-width bins) and the logistic calibration
    slope/intercept (1 and 0 when calibrated)."""
    from sklearn.calibration import calibration_curve
    from sklearn.linear_model import LogisticRegression

    out = {"ece": math.nan, "calibration_slope": math.nan, "calibration_intercept": math.nan}
    if len(np.unique(y_true)) < 2:
        return out
    prob_true, prob_pred = calibration_curve(y_true, scores, n_bins=bins, strategy="uniform")
    # Binned as calibration_curve bins (searchsorted on the inner edges): np.histogram
    # puts a score on an edge (0.5) in the bin above, and the weights would not line up.
    edges = np.linspace(0, 1, bins + 1)[1:-1]
    counts = np.bincount(np.searchsorted(edges, scores), minlength=bins)
    weights = counts[counts > 0] / len(scores)
    out["ece"] = float(np.sum(weights * np.abs(prob_true - prob_pred)))
    p = np.clip(scores, 1e-6, 1 - 1e-6)
    fit = LogisticRegression(C=1e6).fit(np.log(p / (1 - p)).reshape(-1, 1), y_true)
    out["calibration_slope"] = float(fit.coef_[0][0])
    out["calibration_intercept"] = float(fit.intercept_[0])
    return out


def threshold_for(
    y_true: np.ndarray,
    scores: np.ndarray,
    *,
    sensitivity: float | None = None,
    specificity: float | None = None,
) -> float:
    """The highest cut reaching the target sensitivity, or the lowest reaching the
    target specificity, on a validation set."""
    fpr, tpr, thresholds = skm.roc_curve(
        np.asarray(y_true, int), np.asarray(scores, float), drop_intermediate=False
    )
    thresholds = np.clip(thresholds, 0.0, 1.0)
    if sensitivity is not None:
        return float(thresholds[np.argmax(tpr >= sensitivity)])
    ok = np.flatnonzero(1 - fpr >= specificity)
    return float(thresholds[ok[-1]])


def youden_threshold(y_true: np.ndarray, scores: np.ndarray) -> float:
    """The score cut that maximises sensitivity + specificity on a validation set.

    0.5 is only right for a calibrated model on balanced data; a screening model is
    used at the operating point its validation data supports. 0.5 when undefined.
    """
    y_true = np.asarray(y_true, dtype=int)
    if len(np.unique(y_true)) < 2:
        return 0.5
    fpr, tpr, thresholds = skm.roc_curve(y_true, scores)
    best = int(np.argmax(tpr - fpr))
    return float(np.clip(thresholds[best], 0.0, 1.0))
