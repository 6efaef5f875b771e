"""`meddx calibrate`: the operating point (and a temperature) chosen on validation scores.

The threshold is set for a target sensitivity (the highest cut that still reaches it, so
specificity is as high as it can be) or a target specificity. Temperature scaling
divides the model's logits by one number fitted to minimise the validation NLL: it
changes calibration, never the ranking (AUROC is unchanged).
"""

from __future__ import annotations

import datetime as dt

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.metrics import log_loss

from meddx import MeddxError, metrics, models, sources
from meddx.evaluation import labelled_scores, read_predictions
from meddx.storage import StorageSettings

EPS = 1e-6


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p / (1 - p))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def fit_temperature(y_true: np.ndarray, scores: np.ndarray) -> float:
    """T minimising the NLL of sigmoid(logit(score) / T); searched in log space."""
    z = logit(np.asarray(scores, dtype=float))

    def nll(log_t: float) -> float:
        return log_loss(y_true, np.clip(sigmoid(z / np.exp(log_t)), EPS, 1 - EPS), labels=[0, 1])

    return float(np.exp(minimize_scalar(nll, bounds=(-4, 4), method="bounded").x))


def calibrate(
    predictions: str,
    model: str,
    out: str,
    *,
    labels: str | None,
    sensitivity: float | None,
    specificity: float | None,
    temperature: bool,
    settings: StorageSettings,
) -> dict:
    ckpt, sha = models.read_checkpoint(model, settings)
    table, meta = read_predictions(predictions, settings)
    if meta.get("meddx.model_sha256") != sha:
        raise MeddxError(f"{predictions} was not scored by {model} (sha256 differs)")
    truth = sources.manifest_labels(labels, settings) if labels else None
    rows, y_true, _ = labelled_scores(table, truth, ckpt["positive_class"])
    if len(np.unique(y_true)) < 2:
        raise MeddxError("calibration needs labelled positives and negatives")
    scores = np.array([r["score"] for r in rows], dtype=float)
    previous = float(ckpt.get("temperature", 1.0))
    t_fit = fit_temperature(y_true, scores) if temperature else 1.0
    scaled = sigmoid(logit(scores) / t_fit)
    threshold = metrics.threshold_for(
        y_true, scaled, sensitivity=sensitivity, specificity=specificity
    )
    validation = metrics.clinical_metrics(y_true, scaled, threshold)
    ckpt["threshold"] = threshold
    ckpt["temperature"] = previous * t_fit
    ckpt["calibration"] = {
        "predictions": predictions,
        "labels": labels or "class folders",
        "n": int(len(y_true)),
        "target": {"sensitivity": sensitivity} if sensitivity else {"specificity": specificity},
        "temperature_fitted": bool(temperature),
        "calibrated_from_sha256": sha,
        "calibrated_at": dt.datetime.now(dt.UTC).isoformat(),
        "metrics": {k: v for k, v in validation.items() if isinstance(v, float)},
    }
    new_sha = models.save_checkpoint(ckpt, out, settings)
    return {
        "threshold": threshold,
        "temperature": ckpt["temperature"],
        "metrics": validation,
        "sha256": new_sha,
    }
