"""`meddx calibrate`: the operating point (and a temperature) chosen on validation scores.

The threshold is set for a target sensitivity (the highest cut that still reaches it, so
specificity is as high as it can be) or a target specificity. Temperature scaling
divides the model's logits by one number fitted to minimise the validation NLL: it
changes calibration, never the ranking (AUROC is unchanged).

A multi-label checkpoint is calibrated one finding at a time (``finding``): that
finding's probability against its manifest column sets its threshold and temperature;
the checkpoint's overall threshold stays the lowest finding threshold.

From results of several models only the checkpoint's own rows count.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
from scipy.optimize import minimize_scalar
from scipy.special import expit, logit
from sklearn.metrics import log_loss

from meddx import MeddxError
from meddx.analysis.evaluation import (
    Figures,
    finding_truth,
    labelled_scores,
    one_model,
    read_predictions,
)
from meddx.config import CalibrateConfig
from meddx.inputs import listing
from meddx.model import metrics, ood, registry

# Scores are clipped this far from 0 and 1 before their logit: a float32 probability of
# exactly 1.0 has none.
EPS = 1e-6


def scores_logit(p: np.ndarray) -> np.ndarray:
    """logit of probabilities, clipped to [EPS, 1 - EPS] first."""
    return logit(np.clip(np.asarray(p, dtype=float), EPS, 1 - EPS))


def fit_temperature(y_true: np.ndarray, scores: np.ndarray) -> float:
    """T minimising the NLL of sigmoid(logit(score) / T); searched in log space."""
    z = scores_logit(scores)

    def nll(log_t: float) -> float:
        return log_loss(y_true, np.clip(expit(z / np.exp(log_t)), EPS, 1 - EPS), labels=[0, 1])

    return float(np.exp(minimize_scalar(nll, bounds=(-4, 4), method="bounded").x))


@dataclass(frozen=True)
class Calibration:
    """What ``meddx calibrate`` set and wrote."""

    sha256: str  # of the calibrated checkpoint written
    # The operating point, when a target was given: the threshold, the temperature now
    # in the checkpoint, and the validation figures at both.
    threshold: float | None = None
    temperature: float | None = None
    validation: Figures | None = None
    # The out-of-distribution threshold, when a percentile was given, and the rows it
    # was set on.
    ood_threshold: float | None = None
    ood_rows: int | None = None


def calibrate(cfg: CalibrateConfig) -> Calibration:
    """Set the operating point (a target sensitivity or specificity, and a temperature)
    and/or the out-of-distribution threshold (a percentile of the scored rows'
    ood_score) on scored validation predictions; write the calibrated checkpoint."""
    settings = cfg.storage
    ckpt, sha = registry.read_checkpoint(cfg.model, settings)
    table, meta = read_predictions(cfg.predictions, settings)
    if not pc.any(pc.equal(table["model_sha256"], sha)).as_py():
        raise MeddxError(f"{cfg.predictions} was not scored by {cfg.model} (sha256 differs)")
    table, _, _ = one_model(table, meta, sha, cfg.predictions)  # its rows, not others'
    point = {}
    if cfg.target_sensitivity is not None or cfg.target_specificity is not None:
        ckpt, point = operating_point(ckpt, table, cfg, sha)
    ood_threshold = ood_rows = None
    if cfg.ood_percentile is not None:
        if "ood_score" not in table.column_names:
            raise MeddxError(f"{cfg.predictions} has no ood_score column: score it again")
        ok = table.filter(pc.equal(table["status"], "ok"))
        scores = np.array([v for v in ok["ood_score"].to_pylist() if v is not None], float)
        ckpt, ood_threshold = ood.with_threshold(ckpt, scores, cfg.ood_percentile, cfg.predictions)
        ood_rows = len(scores)
    sha256 = registry.save_checkpoint(ckpt, cfg.out, settings)
    return Calibration(sha256=sha256, ood_threshold=ood_threshold, ood_rows=ood_rows, **point)


def operating_point(ckpt, table, cfg: CalibrateConfig, sha: str):
    """The checkpoint with its threshold (and temperature) for the target, and the
    figures of Calibration; ``sha`` is the checkpoint's sha256."""
    names = list(ckpt.class_names)
    if ckpt.multi_label:
        if cfg.finding not in names:
            raise MeddxError(
                "a multi-label checkpoint is calibrated one finding at a time: "
                f"--finding one of {', '.join(names)}"
            )
        k = names.index(cfg.finding)
        rows, truth, _ = finding_truth(table, cfg.labels, names, cfg.storage)
        y_true = truth[:, k]
        scores = np.array([r["probs"][k] for r in rows], dtype=float)
    else:
        if cfg.finding is not None:
            raise MeddxError(f"--finding is for multi-label checkpoints; {cfg.model} is not one")
        truth = listing.manifest_labels(cfg.labels, cfg.storage) if cfg.labels else None
        rows, y_true, _ = labelled_scores(table, truth, ckpt.positive_class)
        scores = np.array([r["score"] for r in rows], dtype=float)
        k = 0  # one threshold and one temperature
    if len(np.unique(y_true)) < 2:
        raise MeddxError("calibration needs labelled positives and negatives")
    t_fit = fit_temperature(y_true, scores) if cfg.temperature else 1.0
    scaled = expit(scores_logit(scores) / t_fit)
    sensitivity, specificity = cfg.target_sensitivity, cfg.target_specificity
    threshold = metrics.threshold_for(
        y_true, scaled, sensitivity=sensitivity, specificity=specificity
    )
    validation = Figures.of(y_true, scaled, threshold)
    record = {
        "predictions": cfg.predictions,
        "labels": cfg.labels or "class folders",
        "n": int(len(y_true)),
        "target": {"sensitivity": sensitivity} if sensitivity else {"specificity": specificity},
        "temperature_fitted": bool(cfg.temperature),
        "calibrated_from_sha256": sha,
        "calibrated_at": dt.datetime.now(dt.UTC).isoformat(),
        "metrics": {
            name: v for name, v in dataclasses.asdict(validation).items() if isinstance(v, float)
        },
    }
    thresholds, temperatures = list(ckpt.thresholds), list(ckpt.temperatures)
    thresholds[k] = threshold
    # The scores were already divided by the old temperature: the new one compounds it.
    temperatures[k] *= t_fit
    # Multi-label: one record per finding, so calibrating another finding keeps this one's.
    calibration = ckpt.extra.get("calibration", {})
    calibration = {**calibration, cfg.finding: record} if cfg.finding else record
    ckpt = ckpt.replace(
        thresholds=tuple(thresholds),
        temperatures=tuple(temperatures),
        extra={**ckpt.extra, "calibration": calibration},
    )
    return ckpt, {"threshold": threshold, "temperature": temperatures[k], "validation": validation}
