"""What runs a checkpoint's model: torch, or the OpenVINO artefact inside the checkpoint.

``meddx optimize`` (optimize.py) writes the artefact: the IR's xml and its weights as two
uint8 tensors under ``OPTIMIZED_KEY``, with the accuracy check that admitted it. This
module reads that entry, compiles it for the node's CPU and decides, once per run in the
driver, which runtime scores it. It needs OpenVINO only when the artefact runs, and never
imports NNCF: scoring reads artefacts, only the optimizer makes them.
"""

from __future__ import annotations

import logging

import numpy as np

from meddx import MeddxError
from meddx.model.registry import Checkpoint

log = logging.getLogger(__name__)

OPTIMIZED_KEY = "optimized"  # the checkpoint's entry for the artefact and its check


def artefact(ckpt: Checkpoint) -> dict | None:
    """The checkpoint's optimized artefact and its check, or None."""
    entry = ckpt.extra.get(OPTIMIZED_KEY)
    return entry if isinstance(entry, dict) and "xml" in entry else None


def as_array(value) -> np.ndarray:
    """An artefact part (a uint8 tensor as stored, or bytes as exported) as a uint8 array."""
    return value.numpy() if hasattr(value, "numpy") else np.frombuffer(value, dtype=np.uint8)


def as_bytes(value) -> bytes:
    """An artefact part as bytes (the IR's xml is read from bytes)."""
    return as_array(value).tobytes()


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
            model=as_bytes(entry["xml"]), weights=ov.Tensor(as_array(entry["bin"]))
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


# ---- the choice of runtime -------------------------------------------------------------


def available() -> bool:
    """Whether OpenVINO is installed (the ``openvino`` extra)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def usable(ckpt: Checkpoint) -> bool:
    """Whether the checkpoint holds an artefact that passed its accuracy check."""
    entry = artefact(ckpt)
    return bool(entry and entry.get("check", {}).get("holds"))


_said_missing = False


def resolve_runtime(runtime: str, ckpt: Checkpoint, gpus: int) -> str:
    """``torch`` or ``openvino`` for a run asking for ``runtime`` (auto|torch|openvino).

    ``auto``: the checkpoint's artefact on CPU-only clusters when it passed its check and
    OpenVINO is installed, else torch (on GPUs always torch)."""
    global _said_missing
    if runtime == "torch":
        return "torch"
    if runtime == "openvino":
        if not available():
            raise MeddxError("--runtime openvino: OpenVINO is not installed (pip install openvino)")
        if not usable(ckpt):
            raise MeddxError(
                "--runtime openvino: the checkpoint holds no OpenVINO model that passed its "
                "accuracy check (run meddx optimize)"
            )
        return "openvino"
    if gpus or not usable(ckpt):
        return "torch"
    if not available():
        if not _said_missing:
            log.warning(
                "the checkpoint holds an OpenVINO model but OpenVINO is not "
                "installed: scoring with torch"
            )
            _said_missing = True
        return "torch"
    return "openvino"


def runtime_precision(runtime: str, ckpt: Checkpoint, torch_precision: str) -> str:
    """What the rows' metadata records as the precision of a run."""
    entry = artefact(ckpt)
    return entry["precision"] if runtime == "openvino" and entry else torch_precision
