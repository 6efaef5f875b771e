"""Which precision a model runs in, and the gates a lower precision must pass.

The policy: ``auto`` is bf16 (or fp16 where the GPU lacks bf16) on GPUs, bf16 on CPUs
with native bf16 instructions and fp32 elsewhere, unless the checkpoint pins one. The
gate: a lower precision is accepted only when, on labelled images, no score moves more
than its limit from torch fp32's and AUROC (per finding for a multi-label model) not
more than its other limit. (The optimizer's int8 artefact has a gate of its own:
gate.py.)
"""

from __future__ import annotations

import numpy as np
import torch

from meddx.model.forward import default_device, probabilities
from meddx.model.registry import Checkpoint

# bf16 or fp16 instead of fp32 (``meddx train`` checks it on the validation split and
# pins fp32 in the checkpoint when it fails).
BF16_MAX_SCORE_DIFF = 0.01
BF16_MAX_AUROC_DIFF = 0.002


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX-512 BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = set(fh.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain fp32)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # On CPU bf16 pays only with native instructions; emulated it is several times slower.
    return torch.bfloat16 if cpu_has_native_bf16() else None


def checkpoint_precision(precision: str, ckpt: Checkpoint) -> str:
    """``auto`` defers to a precision the checkpoint pins (a model that does not hold up
    under bf16); an explicit choice wins."""
    return ckpt.precision if precision == "auto" and ckpt.precision else precision


def precision_check(
    ckpt: Checkpoint, images: np.ndarray, truth: np.ndarray, precision: str = "bf16"
) -> dict:
    """Score uint8 ``images`` in fp32 and in ``precision``; compare scores and AUROC.

    ``truth`` is 0/1 per image (single-label) or per image and finding (multi-label).
    ``holds`` says whether ``precision`` may be used for this model.
    """
    fp32 = probabilities(ckpt, images)
    low = probabilities(ckpt, images, resolve_precision(precision, default_device()))
    result = compare_probs(ckpt, fp32, low, truth, BF16_MAX_SCORE_DIFF, BF16_MAX_AUROC_DIFF)
    return {
        "precision": precision,
        "images": result["images"],
        "max_score_diff": result["max_score_diff"],
        "auroc_fp32": result["auroc_reference"],
        f"auroc_{precision}": result["auroc_candidate"],
        "holds": result["holds"],
    }


def compare_probs(
    ckpt: Checkpoint,
    reference: np.ndarray,
    candidate: np.ndarray,
    truth: np.ndarray,
    max_score_diff: float,
    max_auroc_diff: float,
) -> dict:
    """Two runs' probabilities on the same labelled images: the largest score change and
    AUROC (mean over findings) of each; ``holds`` when every finding's AUROC and every
    score stay within the limits."""
    # Imported here: scikit-learn stays out of the predictor actors, which never compare.
    from meddx.model.metrics import binary_metrics

    if not ckpt.multi_label:
        cols = [ckpt.positive_index]
        reference, candidate = reference[:, cols], candidate[:, cols]
    truth = np.asarray(truth).reshape(len(reference), -1)

    def aurocs(p: np.ndarray) -> list[float]:
        return [binary_metrics(truth[:, k], p[:, k], 0.5)["auroc"] for k in range(truth.shape[1])]

    ref, cand = aurocs(reference), aurocs(candidate)
    worst = max(abs(a - b) for a, b in zip(ref, cand, strict=True))
    result = {
        "images": len(reference),
        "max_score_diff": float(np.abs(reference - candidate).max()),
        "auroc_reference": float(np.mean(ref)),
        "auroc_candidate": float(np.mean(cand)),
        "max_auroc_diff": float(worst),
    }
    result["holds"] = bool(result["max_score_diff"] <= max_score_diff and worst <= max_auroc_diff)
    return result
