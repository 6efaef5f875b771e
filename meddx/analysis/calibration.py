"""`meddx calibrate`: the operating point (and a temperature) chosen on validation scores.

The threshold is set for a target sensitivity (the highest cut that still reaches it, so
specificity is as high as it can be) or a target specificity. Temperature scaling
divides the model's logits by one number fitted to minimise the validation NLL: it
changes calibration, never the ranking (AUROC is unchanged).

A multi-label checkpoint is calibrated one finding at a time (``finding``): that
finding's probability against its manifest column sets its threshold and temperature;
the checkpoint's overall threshold stays the lowest finding threshold.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow.compute as pc
from scipy.optimize import minimize_scalar
from sklearn.metrics import log_loss

from meddx import MeddxError
from meddx.analysis.evaluation import finding_truth, labelled_scores, read_predictions
from meddx.inputs import sources
from meddx.inputs.storage import StorageSettings
from meddx.model import metrics, ood, registry

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
    finding: str | None = None,
    ood_percentile: float | None = None,
) -> dict:
    """Set the operating point (a target sensitivity or specificity, and a temperature)
    and/or the out-of-distribution threshold (``ood_percentile`` of the scored rows'
    ood_score) on scored validation PREDICTIONS; write CKPT2 to ``out``."""
    ckpt, sha = registry.read_checkpoint(model, settings)
    table, meta = read_predictions(predictions, settings)
    if meta.get("meddx.model_sha256") != sha:
        raise MeddxError(f"{predictions} was not scored by {model} (sha256 differs)")
    result = {}
    if sensitivity is not None or specificity is not None:
        ckpt, result = operating_point(
            ckpt,
            table,
            labels,
            sensitivity,
            specificity,
            temperature,
            finding,
            settings,
            source=(model, sha, predictions),
        )
    if ood_percentile is not None:
        if "ood_score" not in table.column_names:
            raise MeddxError(f"{predictions} has no ood_score column: score it again")
        ok = table.filter(pc.equal(table["status"], "ok"))
        scores = np.array([v for v in ok["ood_score"].to_pylist() if v is not None], float)
        ckpt, result["ood_threshold"] = ood.with_threshold(
            ckpt, scores, ood_percentile, predictions
        )
        result["ood_rows"] = len(scores)
    result["sha256"] = registry.save_checkpoint(ckpt, out, settings)
    return result


def operating_point(
    ckpt, table, labels, sensitivity, specificity, temperature, finding, settings, *, source
):
    """The checkpoint with its threshold (and temperature) for the target, and figures;
    ``source`` is (the checkpoint's name, its sha256, the predictions' name)."""
    model, sha, predictions = source
    names = list(ckpt.class_names)
    if ckpt.multi_label:
        if finding not in names:
            raise MeddxError(
                "a multi-label checkpoint is calibrated one finding at a time: "
                f"--finding one of {', '.join(names)}"
            )
        k = names.index(finding)
        rows, truth, _ = finding_truth(table, labels, names, settings)
        y_true = truth[:, k]
        scores = np.array([r["probs"][k] for r in rows], dtype=float)
    else:
        if finding is not None:
            raise MeddxError(f"--finding is for multi-label checkpoints; {model} is not one")
        truth = sources.manifest_labels(labels, settings) if labels else None
        rows, y_true, _ = labelled_scores(table, truth, ckpt.positive_class)
        scores = np.array([r["score"] for r in rows], dtype=float)
        k = 0  # one threshold and one temperature
    if len(np.unique(y_true)) < 2:
        raise MeddxError("calibration needs labelled positives and negatives")
    t_fit = fit_temperature(y_true, scores) if temperature else 1.0
    scaled = sigmoid(logit(scores) / t_fit)
    threshold = metrics.threshold_for(
        y_true, scaled, sensitivity=sensitivity, specificity=specificity
    )
    validation = metrics.clinical_metrics(y_true, scaled, threshold)
    record = {
        "predictions": predictions,
        "labels": labels or "class folders",
        "n": int(len(y_true)),
        "target": {"sensitivity": sensitivity} if sensitivity else {"specificity": specificity},
        "temperature_fitted": bool(temperature),
        "calibrated_from_sha256": sha,
        "calibrated_at": dt.datetime.now(dt.UTC).isoformat(),
        "metrics": {k: v for k, v in validation.items() if isinstance(v, float)},
    }
    thresholds, temperatures = list(ckpt.thresholds), list(ckpt.temperatures)
    thresholds[k] = threshold
    # The scores were already divided by the old temperature: the new one compounds it.
    temperatures[k] *= t_fit
    # Multi-label: one record per finding, so calibrating another finding keeps this one's.
    calibration = {**ckpt.extra.get("calibration", {}), finding: record} if finding else record
    ckpt = ckpt.replace(
        thresholds=tuple(thresholds),
        temperatures=tuple(temperatures),
        extra={**ckpt.extra, "calibration": calibration},
    )
    return ckpt, {"threshold": threshold, "temperature": temperatures[k], "metrics": validation}
