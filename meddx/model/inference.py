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
import ray
import torch

from meddx import MeddxError
from meddx.imaging.decode import INFO_DEFAULTS
from meddx.imaging.transforms import to_model_input
from meddx.inputs.storage import StorageSettings
from meddx.model import ood, registry
from meddx.model.registry import Checkpoint
from meddx.names import LABEL_SEPARATOR, NO_FINDING, OUTPUT_SCHEMA, QC_OK, QC_OOD


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


def inference_model(ckpt: Checkpoint, device: torch.device, fold: bool = True) -> torch.nn.Module:
    """The checkpoint's model ready to score, returning (logits, penultimate features):
    eval mode, with ``fold`` each BatchNorm that follows a convolution folded into it
    (the same fp32 outputs to float rounding, one pass over the activations less),
    channels_last, on ``device``."""
    from torch.fx.experimental.optimization import fuse

    model = registry.features_model(ckpt)
    try:
        model = fuse(model) if fold else model
    except Exception:  # torch.fx cannot trace every model: such a one runs unfolded
        pass
    return model.to(device, memory_format=torch.channels_last)


def checkpoint_precision(precision: str, ckpt: Checkpoint) -> str:
    """``auto`` defers to a precision the checkpoint pins (a model that does not hold up
    under bf16); an explicit choice wins."""
    return ckpt.precision if precision == "auto" and ckpt.precision else precision


# ---- the checkpoint's OpenVINO artefact (meddx optimize makes it) ---------------------

OPTIMIZED_KEY = "optimized"  # the checkpoint's entry for the artefact and its check


def artefact(ckpt: Checkpoint) -> dict | None:
    """The checkpoint's optimized artefact and its check, or None."""
    entry = ckpt.extra.get(OPTIMIZED_KEY)
    return entry if isinstance(entry, dict) and "xml" in entry else None


class CompiledModel:
    """The artefact compiled for this node's CPU: float NCHW in, logits out (and the
    penultimate features, from artefacts exported with them: ``features``)."""

    def __init__(self, ckpt: Checkpoint, threads: int | None = None):
        import openvino as ov

        entry = artefact(ckpt)
        if entry is None:
            raise MeddxError("the checkpoint holds no OpenVINO model")
        core = ov.Core()
        model = core.read_model(
            model=_as_bytes(entry["xml"]), weights=ov.Tensor(_as_array(entry["bin"]))
        )
        # One synchronous batch at a time; what was not quantized runs in fp32 (the CPU
        # plugin's default on CPUs with native bf16 is bf16: 0.02 off torch for fp32 IR).
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(model, "CPU", config)
        self.output = self.compiled.output(0)
        outputs = self.compiled.outputs
        self.features_output = outputs[1] if len(outputs) > 1 else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.infer(x)[0]

    def infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and features (None from an artefact without them) of one batch."""
        out = self.compiled(np.ascontiguousarray(x, dtype=np.float32))
        features = out[self.features_output] if self.features_output is not None else None
        return out[self.output], features


def _as_array(value) -> np.ndarray:
    return value.numpy() if hasattr(value, "numpy") else np.frombuffer(value, dtype=np.uint8)


def _as_bytes(value) -> bytes:
    return _as_array(value).tobytes()


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = set(fh.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def node_cpus() -> int:
    """CPUs of the node this process runs on: Ray's count on a Ray worker (it honours
    container limits), else the CPUs this process may run on."""
    if ray.is_initialized():
        node = ray.get_runtime_context().get_node_id()
        for info in ray.nodes():
            if info["NodeID"] == node:
                return max(1, int(info["Resources"].get("CPU", 1)))
    return len(os.sched_getaffinity(0)) or 1


class Predictor:
    """Loads the model once per actor and scores batches under inference mode."""

    def __init__(
        self,
        checkpoint: str | Checkpoint,
        settings: StorageSettings,
        precision: str,
        run_id: str,
        expected_sha256: str | None = None,
        *,
        threads: int | None = None,
        compile_model: bool = False,
        runtime: str = "torch",
    ):
        if isinstance(checkpoint, Checkpoint):  # already in memory (training's own checks)
            ckpt = checkpoint
            self.model_sha256 = hashlib.sha256(registry.checkpoint_bytes(ckpt)).hexdigest()
        else:
            # The driver passes the hash it read: a file swapped mid-run is refused.
            ckpt, self.model_sha256 = registry.read_checkpoint(
                checkpoint, settings, expected_sha256
            )
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            # Ray gives a 1-CPU actor OMP_NUM_THREADS=1; on a CPU-only node the model
            # should use the node's cores (decode tasks are light next to the forward
            # pass); several actors on one node split them (``threads``).
            torch.set_num_threads(threads or node_cpus())
        self.precision = checkpoint_precision(precision, ckpt)
        self.autocast_dtype = resolve_precision(self.precision, self.device)
        # The checkpoint's OpenVINO artefact (the driver chose it: optimize.resolve_runtime)
        self.compiled = None
        if runtime == "openvino":
            self.compiled = CompiledModel(ckpt, threads or node_cpus())
            self.model = None
        else:
            # Folded weights in bf16 lose more than BatchNorm applied after a bf16
            # convolution (3x the score error on a trained seednet): fold for fp32 only.
            self.model = inference_model(ckpt, self.device, fold=self.autocast_dtype is None)
        if compile_model and self.model is not None:
            # Worth it on GPUs for long runs; the first batches pay the compilation.
            self.model = torch.compile(self.model, dynamic=True)
        self.ckpt = ckpt.replace(state_dict={})  # the model holds the weights
        # A calibrated checkpoint divides the logits by its fitted temperature: one for
        # every logit, or for multi-label one per finding.
        self.temperature = torch.tensor(ckpt.temperatures, device=self.device)
        self.run_id = run_id
        self.mean = torch.tensor(ckpt.mean, device=self.device)
        self.std = torch.tensor(ckpt.std, device=self.device)
        # The out-of-distribution density (ood.py), scored from the same forward pass.
        density = ood.density_of(ckpt)
        self.density = density.to(self.device) if density is not None else None

    def predict_probs(self, images: np.ndarray) -> np.ndarray:
        return self.infer(images)[0]

    @torch.inference_mode()
    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and penultimate features (None from an OpenVINO artefact made
        without them) of a batch of uint8 images, from one forward pass."""
        # torch warns on a read-only array (Arrow's zero-copy batches are); the model
        # input is a new tensor either way, and a batch at model size copies in 0.2 ms.
        x = torch.from_numpy(images if images.flags.writeable else images.copy())
        if self.device.type == "cuda":  # page-locked, so the copy overlaps with compute
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = to_model_input(x, self.mean, self.std)
        if self.compiled is not None:
            logits, features = self.compiled.infer(x.contiguous().numpy())
            logits = torch.from_numpy(logits)
            features = torch.from_numpy(features) if features is not None else None
        else:
            logits, features = self.forward(x)
        logits = logits.float() / self.temperature
        if self.ckpt.multi_label:
            probs = torch.sigmoid(logits)
        else:
            probs = torch.softmax(logits, dim=1)
        return probs.cpu().numpy(), None if features is None else features.float().cpu().numpy()

    @torch.inference_mode()
    def ood_scores(self, features: np.ndarray | None) -> np.ndarray | None:
        if self.density is None or features is None:
            return None
        return self.density.score(torch.from_numpy(features).to(self.device)).cpu().numpy()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            return self.model(x)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ok = batch["status"] == "ok"
        n = len(ok)
        probs, scores, labels, ood_scores = [None] * n, [None] * n, [None] * n, [None] * n
        # The checks before the model (decode.qc_of) stand; a film that passed them is
        # out of distribution when its features are far from the training data.
        qc = [q or None for q in batch["qc"].tolist()]
        if ok.any():
            p, features = self.infer(batch["image"][ok])
            distances = self.ood_scores(features)
            for j, (i, row) in enumerate(zip(np.flatnonzero(ok), p, strict=True)):
                probs[i] = row.tolist()
                scores[i] = self.score_for(row)
                labels[i] = self.label_for(row)
                if distances is not None:
                    ood_scores[i] = float(distances[j])
                    if qc[i] == QC_OK and distances[j] > self.density.threshold:
                        qc[i] = QC_OOD
        columns = {
            "image_uri": batch["image_uri"].tolist(),
            "status": batch["status"].tolist(),
            "error": [e or None for e in batch["error"].tolist()],
            "label": labels,
            "score": scores,
            "probs": probs,
            "threshold": [self.ckpt.threshold] * n,
            "model_name": [self.ckpt.model_name] * n,
            "model_sha256": [self.model_sha256] * n,
            "content_sha256": [h or None for h in batch["content_sha256"].tolist()],
            # "" and 0 mean unknown between stages; null in the output.
            **{name: [v or None for v in batch[name].tolist()] for name in INFO_DEFAULTS},
            "qc": qc,
            "ood_score": ood_scores,
            "run_id": [self.run_id] * n,
            "scored_at": [dt.datetime.now(dt.UTC)] * n,
        }
        return pa.Table.from_pydict(columns, schema=OUTPUT_SCHEMA)

    def score_for(self, probs: np.ndarray) -> float:
        """The worklist score: the positive class's probability, or for multi-label the
        highest finding probability."""
        if self.ckpt.multi_label:
            return float(probs.max())
        return float(probs[self.ckpt.positive_index])

    def label_for(self, probs: np.ndarray) -> str:
        names = self.ckpt.class_names
        if self.ckpt.multi_label:
            found = [
                n for n, p, t in zip(names, probs, self.ckpt.thresholds, strict=True) if p >= t
            ]
            return LABEL_SEPARATOR.join(found) or NO_FINDING
        if len(names) == 2:
            positive = self.ckpt.positive_index
            return names[positive if probs[positive] >= self.ckpt.threshold else 1 - positive]
        return names[int(np.argmax(probs))]


# Images per forward pass while features are gathered on the driver (ood.py's fit).
FEATURE_BATCH = 64


def features_of(ckpt: Checkpoint, batches) -> np.ndarray:
    """Penultimate features (fp32, torch) of the uint8 image batches ``batches``: what
    the out-of-distribution density (ood.py) is fitted to."""
    predictor = Predictor(ckpt, StorageSettings(), "fp32", "ood-fit", runtime="torch")
    out = [
        predictor.infer(images[i : i + FEATURE_BATCH])[1]
        for images in batches
        for i in range(0, len(images), FEATURE_BATCH)
    ]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


# A lower precision is accepted when no score moves more than this and AUROC not more
# than that, on labelled validation images.
MAX_SCORE_DIFF = 0.01
MAX_AUROC_DIFF = 0.002


def precision_check(
    ckpt: Checkpoint, images: np.ndarray, truth: np.ndarray, precision: str = "bf16"
) -> dict:
    """Score uint8 ``images`` in fp32 and in ``precision``; compare scores and AUROC.

    ``truth`` is 0/1 per image (single-label) or per image and finding (multi-label).
    ``holds`` says whether ``precision`` may be used for this model.
    """

    def probs(name: str) -> np.ndarray:
        predictor = Predictor(ckpt, StorageSettings(), name, "precision-check")
        return np.concatenate(
            [predictor.predict_probs(images[i : i + 64]) for i in range(0, len(images), 64)]
        )

    fp32, low = probs("fp32"), probs(precision)
    result = compare_probs(ckpt, fp32, low, truth, MAX_SCORE_DIFF, MAX_AUROC_DIFF)
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
