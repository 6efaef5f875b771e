"""Evaluation plots as PNG files: ROC with the operating point, precision-recall,
reliability diagram, score histograms by class."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402

from meddx.inputs import storage  # noqa: E402
from meddx.inputs.storage import StorageSettings  # noqa: E402


def _save(fig, folder: str, name: str, settings: StorageSettings) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    uri = storage.join(folder, name)
    storage.write_bytes(uri, buf.getvalue(), settings)
    return uri


def write_evaluation_plots(y_true, scores, threshold, folder, settings) -> list[str]:
    written = []
    pred = scores >= threshold
    tpr_op = pred[y_true == 1].mean() if (y_true == 1).any() else np.nan
    fpr_op = pred[y_true == 0].mean() if (y_true == 0).any() else np.nan
    both = len(np.unique(y_true)) == 2

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if both:
        fpr, tpr, _ = skm.roc_curve(y_true, scores)
        ax.plot(fpr, tpr, label=f"AUROC {skm.roc_auc_score(y_true, scores):.3f}")
    ax.plot([0, 1], [0, 1], ":", color="gray")
    ax.plot([fpr_op], [tpr_op], "o", color="red", label=f"threshold {threshold:.3f}")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
    ax.legend(loc="lower right")
    written.append(_save(fig, folder, "roc.png", settings))

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if both:
        precision, recall, _ = skm.precision_recall_curve(y_true, scores)
        ax.plot(recall, precision, label=f"AP {skm.average_precision_score(y_true, scores):.3f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall")
    ax.legend(loc="lower left")
    written.append(_save(fig, folder, "precision_recall.png", settings))

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if both:
        prob_true, prob_pred = calibration_curve(y_true, scores, n_bins=10)
        ax.plot(prob_pred, prob_true, "o-", label="model")
    ax.plot([0, 1], [0, 1], ":", color="gray", label="perfectly calibrated")
    ax.set(
        xlabel="mean predicted probability", ylabel="fraction positive", title="Reliability diagram"
    )
    ax.legend(loc="upper left")
    written.append(_save(fig, folder, "reliability.png", settings))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(0, 1, 26)
    for value, name in ((0, "negative"), (1, "positive")):
        ax.hist(scores[y_true == value], bins=bins, alpha=0.6, label=f"{name} (truth)")
    ax.axvline(threshold, color="black", linestyle="--", label="threshold")
    ax.set(xlabel="score", ylabel="images", title="Scores by class")
    ax.legend()
    written.append(_save(fig, folder, "score_histograms.png", settings))
    return written
