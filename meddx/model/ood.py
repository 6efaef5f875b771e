"""How far an image lies from what the model was trained on: the ``ood_score`` column.

At the end of ``meddx train`` class-conditional Gaussians with one shared covariance are
fitted to the penultimate-layer features of the training split (Lee et al., 2018, "A
simple unified framework for detecting out-of-distribution samples and adversarial
attacks"). A row's ``ood_score`` is its Mahalanobis distance to the nearest class mean,
divided by the square root of the feature dimension, so that films like the training
data score about 1 whatever the architecture. The predictor computes it from the same
forward pass that gives the probabilities (registry.WithFeatures): no second model.

The covariance is shrunk (Ledoit-Wolf): a training split may hold fewer films than the
model has features (512 for resnet18, 1,024 for densenet121), and an unshrunk estimate
would then not be invertible. The threshold is the 99th percentile of the validation
split's scores, so about 1% of in-distribution films are flagged by it;
``meddx calibrate --ood-percentile`` moves it on scored validation images.

Why Mahalanobis and not the energy score (``-logsumexp(logits)``, free from the logits):
on the non-chest set of docs/quality-control.md it separated chest films from the rest
far better (AUROC in that file, measured side by side by benchmarks/ood.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from meddx import MeddxError, one_line
from meddx.model.forward import LoadedModel
from meddx.model.registry import Checkpoint

KEY = "ood"  # the checkpoint's entry for the density
DEFAULT_PERCENTILE = 99.0
# A 1,024-feature covariance is well estimated from ten times as many films; more only
# lengthens the end of training.
MAX_FIT_IMAGES = 10_000
# The threshold is the 99th percentile of the validation films' scores: on a few dozen
# films that is, in effect, their highest, and a fresh film like them exceeds it about
# once in (films + 1). benchmarks/ood_fit.py measured the share of fresh in-distribution
# films flagged, mean of 3 draws (max): seednet 17% (29%) with 4 threshold films, 14%
# (24%) with 8, 5-6% (9%) with 16-32, 2.4-2.8% (6%) with 64-128, 0.6% (1%) with 256;
# resnet18 9-11% (22%) with 4-8, 6.3% (13%) with 16, 2.3-3.5% (6.5%) with 32-64. The
# design is 1%, the QC alarm 10%. Below this many, train says the density is not to be
# trusted, and a QC alarm names it.
TRUSTED_THRESHOLD_FILMS = 64
# Images per forward pass while features are gathered on the driver (``features_of``).
FEATURE_BATCH = 64


@dataclass(frozen=True)
class Density:
    """Class means (C, D) and a whitener W (D, D) with W W^T the inverse covariance."""

    means: torch.Tensor
    whitener: torch.Tensor
    threshold: float
    percentile: float

    def to(self, device: torch.device) -> Density:
        return Density(
            self.means.to(device), self.whitener.to(device), self.threshold, self.percentile
        )

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """The ood_score of each row of ``features`` (N, D): the Mahalanobis distance to
        the nearest class mean over the square root of D."""
        centred = features.float()[:, None, :] - self.means[None]  # (N, C, D)
        squared = (centred @ self.whitener).square().sum(-1)
        return squared.min(dim=1).values.sqrt() / math.sqrt(self.means.shape[1])


def density_of(ckpt: Checkpoint) -> Density | None:
    """The checkpoint's fitted density, or None (a checkpoint without one scores no
    ``ood_score``, and its ``qc`` comes from the checks before the model only)."""
    entry = ckpt.extra.get(KEY)
    if not isinstance(entry, dict):
        return None
    try:
        return Density(
            torch.as_tensor(entry["means"], dtype=torch.float32),
            torch.as_tensor(entry["whitener"], dtype=torch.float32),
            float(entry["threshold"]),
            float(entry["percentile"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise MeddxError(f"the checkpoint's density is unreadable: {one_line(exc)}") from None


def untrusted(ckpt: Checkpoint) -> str | None:
    """One line when the checkpoint's density was fitted on too few films to be trusted
    (its threshold set on fewer than TRUSTED_THRESHOLD_FILMS), else None."""
    entry = ckpt.extra.get(KEY)
    if not isinstance(entry, dict):
        return None
    held = entry.get("threshold_images")
    if not isinstance(held, int) or held >= TRUSTED_THRESHOLD_FILMS:
        return None
    return (
        f"the out-of-distribution density's threshold was set on {held} films "
        f"(trusted from {TRUSTED_THRESHOLD_FILMS} validation films): it flags about one "
        f"ordinary film in {held + 1}"
    )


def features_of(ckpt: Checkpoint, batches) -> np.ndarray:
    """Penultimate features (fp32, torch) of the uint8 image batches ``batches``: what
    the density is fitted to."""
    model = LoadedModel(ckpt)
    out = [
        model.infer(images[i : i + FEATURE_BATCH])[1]
        for images in batches
        for i in range(0, len(images), FEATURE_BATCH)
    ]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def groups_of(ckpt: Checkpoint, truth: np.ndarray) -> np.ndarray:
    """The Gaussian each training film belongs to: its class, or for a multi-label model
    whether it has any finding."""
    truth = np.asarray(truth)
    if ckpt.multi_label:
        return (truth.reshape(len(truth), -1).max(axis=1) > 0).astype(int)
    return truth.astype(int)


def fit(features: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class means and the whitener of the shared, shrunk covariance."""
    from sklearn.covariance import LedoitWolf

    features = np.asarray(features, dtype=np.float64)
    labels = sorted(set(groups.tolist()))
    means = np.stack([features[groups == g].mean(axis=0) for g in labels])
    centred = features - means[np.searchsorted(labels, groups)]
    covariance = LedoitWolf(assume_centered=True).fit(centred).covariance_
    precision = np.linalg.inv(covariance)
    whitener = np.linalg.cholesky((precision + precision.T) / 2)
    return means.astype(np.float32), whitener.astype(np.float32)


def with_density(
    ckpt: Checkpoint,
    features: np.ndarray,
    groups: np.ndarray,
    validation_features: np.ndarray,
    percentile: float = DEFAULT_PERCENTILE,
) -> Checkpoint:
    """The checkpoint with a density fitted to ``features`` and its threshold at the
    ``percentile`` of the validation scores (of the training scores when there are no
    validation images: a lower threshold, so more is flagged, never less)."""
    if len(features) < 2:
        raise MeddxError("the out-of-distribution density needs two or more training images")
    means, whitener = fit(features, groups)
    density = Density(torch.from_numpy(means), torch.from_numpy(whitener), math.inf, percentile)
    held = validation_features if len(validation_features) else features
    scores = density.score(torch.as_tensor(held)).numpy()
    threshold = float(np.percentile(scores, percentile))
    entry = {
        "method": "mahalanobis",
        "means": density.means,
        "whitener": density.whitener,
        "threshold": threshold,
        "percentile": float(percentile),
        "fit_images": int(len(features)),
        "threshold_images": int(len(held)),
        "threshold_source": "validation" if len(validation_features) else "training",
        "trusted": len(validation_features) >= TRUSTED_THRESHOLD_FILMS,
    }
    return ckpt.replace(extra={**ckpt.extra, KEY: entry})


def with_threshold(ckpt: Checkpoint, scores: np.ndarray, percentile: float, source: str):
    """``meddx calibrate --ood-percentile``: the threshold re-set on scored images."""
    entry = ckpt.extra.get(KEY)
    if not isinstance(entry, dict):
        raise MeddxError(
            "the checkpoint has no out-of-distribution density to calibrate (meddx train fits one)"
        )
    scores = np.asarray(scores, dtype=float)
    scores = scores[np.isfinite(scores)]
    if not len(scores):
        raise MeddxError("no scored row has an ood_score: score the validation images first")
    threshold = float(np.percentile(scores, percentile))
    entry = {
        **entry,
        "threshold": threshold,
        "percentile": float(percentile),
        "threshold_images": int(len(scores)),
        "threshold_source": source,
        "trusted": len(scores) >= TRUSTED_THRESHOLD_FILMS,
    }
    return ckpt.replace(extra={**ckpt.extra, KEY: entry}), threshold
