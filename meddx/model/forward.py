"""A checkpoint's model run on uint8 images: probabilities and penultimate features from
one forward pass, in torch or through the checkpoint's OpenVINO artefact.

``LoadedModel`` loads the model once; the predictor actor (predictor.py) adds the rows
around it. ``probabilities`` scores an array outside Ray, for the precision check, the
optimizer's gate and the tools that compare runtimes. ``probs_from_logits`` is the one
place logits become probabilities: the checkpoint's temperature, then one sigmoid per
finding (multi-label) or a softmax over the classes.
"""

from __future__ import annotations

import os

import numpy as np
import ray
import torch
from scipy import special

from meddx.imaging.transforms import to_model_input
from meddx.model import registry
from meddx.model.engine import CompiledModel
from meddx.model.registry import Checkpoint

# Images per forward pass when a whole array is scored at once: a seednet or resnet18
# batch of 64 at 224 px stays well under a GB of activations on a CPU node.
BATCH = 64


def default_device() -> torch.device:
    """The device a model runs on here: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def node_cpus() -> int:
    """CPUs of the node this process runs on: Ray's count on a Ray worker (it honours
    container limits), else the CPUs this process may run on."""
    if ray.is_initialized():
        node = ray.get_runtime_context().get_node_id()
        for info in ray.nodes():
            if info["NodeID"] == node:
                return max(1, int(info["Resources"].get("CPU", 1)))
    return len(os.sched_getaffinity(0)) or 1


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


def probs_from_logits(
    logits: np.ndarray, multi_label: bool, temperatures: float | tuple[float, ...] = 1.0
) -> np.ndarray:
    """Probabilities (float32) from a batch of logits (N, outputs): each divided by its
    calibrated temperature (a checkpoint's ``temperatures``: one for every logit, or for
    multi-label one per finding), then a sigmoid per finding (``multi_label``) or a
    softmax over the classes, in float64."""
    z = np.asarray(logits, dtype=np.float64) / np.asarray(temperatures, dtype=np.float64)
    probs = special.expit(z) if multi_label else special.softmax(z, axis=1)
    return probs.astype(np.float32)


class LoadedModel:
    """A checkpoint's model loaded once, scoring batches of uint8 images under inference
    mode: in torch (autocast to ``autocast_dtype``, None for fp32) or, with ``runtime``
    ``openvino``, through the checkpoint's artefact."""

    def __init__(
        self,
        ckpt: Checkpoint,
        autocast_dtype: torch.dtype | None = None,
        *,
        threads: int | None = None,
        compile_model: bool = False,
        runtime: str = "torch",
    ):
        self.device = default_device()
        if self.device.type == "cpu":
            # Ray gives a 1-CPU actor OMP_NUM_THREADS=1; on a CPU-only node the model
            # should use the node's cores (decode tasks are light next to the forward
            # pass); several actors on one node split them (``threads``).
            torch.set_num_threads(threads or node_cpus())
        self.autocast_dtype = autocast_dtype
        # The checkpoint's OpenVINO artefact (the driver chose it: engine.resolve_runtime)
        self.compiled = None
        if runtime == "openvino":
            self.compiled = CompiledModel(ckpt, threads or node_cpus())
            self.model = None
        else:
            # Folded weights in bf16 lose more than BatchNorm applied after a bf16
            # convolution (3x the score error on a trained seednet): fold for fp32 only.
            self.model = inference_model(ckpt, self.device, fold=autocast_dtype is None)
        if compile_model and self.model is not None:
            # Worth it on GPUs for long runs; the first batches pay the compilation.
            self.model = torch.compile(self.model, dynamic=True)
        self.ckpt = ckpt.replace(state_dict={})  # the model holds the weights
        self.mean = torch.tensor(ckpt.mean, device=self.device)
        self.std = torch.tensor(ckpt.std, device=self.device)

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
        else:
            logits, features = self.forward(x)
            logits = logits.float().cpu().numpy()
            features = features.float().cpu().numpy() if features is not None else None
        return probs_from_logits(logits, self.ckpt.multi_label, self.ckpt.temperatures), features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            return self.model(x)


def probabilities(
    ckpt: Checkpoint,
    images: np.ndarray,
    autocast_dtype: torch.dtype | None = None,
    *,
    runtime: str = "torch",
) -> np.ndarray:
    """Probabilities (N, classes or findings) of the uint8 ``images`` (N, S, S) under the
    checkpoint's model, ``BATCH`` images per forward pass."""
    model = LoadedModel(ckpt, autocast_dtype, runtime=runtime)
    out = [model.predict_probs(images[i : i + BATCH]) for i in range(0, len(images), BATCH)]
    return np.concatenate(out) if out else np.zeros((0, len(ckpt.class_names)), np.float32)
