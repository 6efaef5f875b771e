"""The predict stage: one model per Ray actor, loaded once, run under inference mode.

Kept apart from the Ray pipeline so it can be tested and benchmarked on its own. The
actor receives decoded uint8 batches; error rows pass through untouched (the model
never sees them) and every row comes out in the output schema.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os

import numpy as np
import pyarrow as pa
import torch

from meddx import MeddxError, models
from meddx.decode import INFO_DEFAULTS
from meddx.storage import StorageSettings
from meddx.transforms import to_model_input

OUTPUT_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("label", pa.string()),
        ("score", pa.float32()),
        ("probs", pa.list_(pa.float32())),
        ("threshold", pa.float32()),
        ("model_name", pa.string()),
        ("model_sha256", pa.string()),
        ("content_sha256", pa.string()),
        # DICOM attributes that identify no one (null for PNG/JPEG), image geometry,
        # and keyed-hash pseudonyms of the UIDs (null without MEDDX_PSEUDONYM_KEY).
        ("modality", pa.string()),
        ("view_position", pa.string()),
        ("body_part", pa.string()),
        ("photometric", pa.string()),
        ("transfer_syntax", pa.string()),
        ("rows", pa.int32()),
        ("columns", pa.int32()),
        ("frames", pa.int32()),
        ("study_pseudonym", pa.string()),
        ("series_pseudonym", pa.string()),
        ("instance_pseudonym", pa.string()),
        ("run_id", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
    ]
)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


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


def inference_model(ckpt: dict, device: torch.device, fold: bool = True) -> torch.nn.Module:
    """The checkpoint's model ready to score: eval mode, with ``fold`` each BatchNorm
    that follows a convolution folded into it (the same fp32 outputs to float rounding,
    one pass over the activations less), channels_last, on ``device``."""
    from torch.fx.experimental.optimization import fuse

    model = models.model_from_checkpoint(ckpt).eval()
    try:
        model = fuse(model) if fold else model
    except Exception:  # torch.fx cannot trace every model: such a one runs unfolded
        pass
    return model.to(device, memory_format=torch.channels_last)


def checkpoint_precision(precision: str, ckpt: dict) -> str:
    """``auto`` defers to a precision the checkpoint pins (a model that does not hold up
    under bf16); an explicit choice wins."""
    if precision not in PRECISIONS:
        raise MeddxError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    pinned = ckpt.get("precision")
    return pinned if precision == "auto" and pinned in PRECISIONS else precision


def node_cpus() -> int:
    """CPUs for this process's node: Ray's count on a Ray worker (it honours container
    limits), else the CPUs this process may run on."""
    import ray

    if ray.is_initialized():
        node = ray.get_runtime_context().get_node_id()
        for info in ray.nodes():
            if info["NodeID"] == node:
                return max(1, int(info["Resources"].get("CPU", 1)))
    return len(os.sched_getaffinity(0)) or 1


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = set(fh.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


class Predictor:
    """Loads the model once per actor and scores batches under inference mode."""

    def __init__(
        self,
        checkpoint: str | dict,
        settings: StorageSettings,
        precision: str,
        run_id: str,
        expected_sha256: str | None = None,
        *,
        threads: int | None = None,
        compile_model: bool = False,
    ):
        if isinstance(checkpoint, dict):  # already in memory (training's own checks)
            ckpt = checkpoint
            self.model_sha256 = hashlib.sha256(models.checkpoint_bytes(ckpt)).hexdigest()
        else:
            # The driver passes the hash it read: a file swapped mid-run is refused.
            ckpt, self.model_sha256 = models.read_checkpoint(checkpoint, settings, expected_sha256)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            # Ray gives a 1-CPU actor OMP_NUM_THREADS=1; on a CPU-only node the model
            # should use the node's cores (decode tasks are light next to the forward
            # pass); several actors on one node split them (``threads``).
            torch.set_num_threads(threads or node_cpus())
        self.precision = checkpoint_precision(precision, ckpt)
        self.autocast_dtype = resolve_precision(self.precision, self.device)
        # Folded weights in bf16 lose more than BatchNorm applied after a bf16
        # convolution (3x the score error on a trained seednet): fold for fp32 only.
        self.model = inference_model(ckpt, self.device, fold=self.autocast_dtype is None)
        if compile_model:
            # Worth it on GPUs for long runs; the first batches pay the compilation.
            self.model = torch.compile(self.model, dynamic=True)
        self.class_names = list(ckpt["class_names"])
        # Multi-label: one sigmoid and one threshold per finding; score = the highest.
        self.multi_label = models.is_multi_label(ckpt)
        self.thresholds = [float(t) for t in ckpt.get("thresholds", [])]
        self.positive_index = (
            None if self.multi_label else self.class_names.index(ckpt["positive_class"])
        )
        self.threshold = float(ckpt["threshold"])
        temperature = ckpt.get("temperature", 1.0)  # a list: one per finding
        self.temperature = (
            torch.tensor(temperature, device=self.device)
            if isinstance(temperature, list)
            else float(temperature)
        )
        self.model_name = ckpt["model_name"]
        self.run_id = run_id
        self.mean = torch.tensor(ckpt["mean"], device=self.device)
        self.std = torch.tensor(ckpt["std"], device=self.device)

    @torch.inference_mode()
    def predict_probs(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images)
        if self.device.type == "cuda":  # page-locked, so the copy overlaps with compute
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = to_model_input(x, self.mean, self.std)
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            logits = self.model(x)
        # A calibrated checkpoint divides the logits by its fitted temperature.
        logits = logits.float() / self.temperature
        if self.multi_label:
            return torch.sigmoid(logits).cpu().numpy()
        return torch.softmax(logits, dim=1).cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ok = batch["status"] == "ok"
        probs = [None] * len(ok)
        scores = [None] * len(ok)
        labels = [None] * len(ok)
        if ok.any():
            p = self.predict_probs(batch["image"][ok])
            for i, row in zip(np.flatnonzero(ok), p, strict=True):
                probs[i] = row.tolist()
                scores[i] = self.score_for(row)
                labels[i] = self.label_for(row)
        n = len(ok)
        columns = {
            "image_uri": batch["image_uri"].tolist(),
            "status": batch["status"].tolist(),
            "error": [e or None for e in batch["error"].tolist()],
            "label": labels,
            "score": scores,
            "probs": probs,
            "threshold": [self.threshold] * n,
            "model_name": [self.model_name] * n,
            "model_sha256": [self.model_sha256] * n,
            "content_sha256": [h or None for h in batch["content_sha256"].tolist()],
            # "" and 0 mean unknown between stages; null in the output.
            **{name: [v or None for v in batch[name].tolist()] for name in INFO_DEFAULTS},
            "run_id": [self.run_id] * n,
            "scored_at": [dt.datetime.now(dt.UTC)] * n,
        }
        return pa.Table.from_pydict(columns, schema=OUTPUT_SCHEMA)

    def score_for(self, probs: np.ndarray) -> float:
        """The worklist score: the positive class's probability, or for multi-label the
        highest finding probability."""
        return float(probs.max() if self.multi_label else probs[self.positive_index])

    def label_for(self, probs: np.ndarray) -> str:
        if self.multi_label:
            found = [
                name
                for name, p, t in zip(self.class_names, probs, self.thresholds, strict=True)
                if p >= t
            ]
            return models.LABEL_SEPARATOR.join(found) or models.NO_FINDING
        if len(self.class_names) == 2:
            positive = probs[self.positive_index] >= self.threshold
            return self.class_names[self.positive_index if positive else 1 - self.positive_index]
        return self.class_names[int(np.argmax(probs))]


# A lower precision is accepted when no score moves more than this and AUROC not more
# than that, on labelled validation images.
MAX_SCORE_DIFF = 0.01
MAX_AUROC_DIFF = 0.002


def precision_check(
    ckpt: dict, images: np.ndarray, truth: np.ndarray, precision: str = "bf16"
) -> dict:
    """Score uint8 ``images`` in fp32 and in ``precision``; compare scores and AUROC.

    ``truth`` is 0/1 per image (single-label) or per image and finding (multi-label).
    ``holds`` says whether ``precision`` may be used for this model.
    """
    from meddx.metrics import binary_metrics

    def probs(name: str) -> np.ndarray:
        predictor = Predictor(ckpt, StorageSettings(), name, "precision-check")
        return np.concatenate(
            [predictor.predict_probs(images[i : i + 64]) for i in range(0, len(images), 64)]
        )

    fp32, low = probs("fp32"), probs(precision)
    if not models.is_multi_label(ckpt):
        positive = list(ckpt["class_names"]).index(ckpt["positive_class"])
        fp32, low = fp32[:, [positive]], low[:, [positive]]
    truth = np.asarray(truth).reshape(len(images), -1)

    def auroc(p: np.ndarray) -> float:
        return float(
            np.mean(
                [binary_metrics(truth[:, k], p[:, k], 0.5)["auroc"] for k in range(truth.shape[1])]
            )
        )

    result = {
        "precision": precision,
        "images": len(images),
        "max_score_diff": float(np.abs(fp32 - low).max()),
        "auroc_fp32": auroc(fp32),
        f"auroc_{precision}": auroc(low),
    }
    result["holds"] = bool(
        result["max_score_diff"] <= MAX_SCORE_DIFF
        and abs(result["auroc_fp32"] - result[f"auroc_{precision}"]) <= MAX_AUROC_DIFF
    )
    return result
