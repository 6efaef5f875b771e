"""Binary screening metrics at a threshold, computed with scikit-learn."""

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
        "auroc": float(skm.roc_auc_score(y_true, scores)) if both else math.nan,
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }


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


def format_metrics(m: dict) -> str:
    cm = m["confusion_matrix"]
    lines = [
        f"n={m['n']}  positives={m['positives']}  threshold={m['threshold']:.3f}",
        f"accuracy={m['accuracy']:.4f}  precision={m['precision']:.4f}  recall={m['recall']:.4f}"
        f"  f1={m['f1']:.4f}",
        f"sensitivity={m['sensitivity']:.4f}  specificity={m['specificity']:.4f}"
        f"  auroc={m['auroc']:.4f}",
        "confusion matrix (rows: truth, columns: predicted)",
        "              pred_neg  pred_pos",
        f"  truth_neg   {cm['tn']:8d}  {cm['fp']:8d}",
        f"  truth_pos   {cm['fn']:8d}  {cm['tp']:8d}",
    ]
    return "\n".join(lines)
