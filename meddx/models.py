"""Model registry and the one-file checkpoint format.

A checkpoint is a plain dict (torchvision references style) saved with ``torch.save``
and loaded with ``torch.load(..., weights_only=True)``: tensors, strings, numbers, lists
and dicts only, so loading never runs code. All models start from random weights:
meddx never downloads weights from a hub.

A multi-label checkpoint (CheXNet's formulation: one sigmoid output per finding) has
``multi_label: True``, its findings as ``class_names``, one threshold per finding in
``thresholds`` and, as ``threshold``, the lowest of them: the cut on the row's score
(its highest finding probability) that puts every study with a finding on the worklist.
Its ``positive_class`` is ``abnormal``: any finding present.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from collections.abc import Callable

import torch
from torch import nn

from meddx import MeddxError, __version__, storage
from meddx.storage import StorageSettings

CHECKPOINT_FORMAT = 1
# Grayscale is replicated to 3 channels so torchvision architectures (and weights a
# user converts from them) work unchanged; ImageNet statistics are the usual default.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The positive class of a multi-label model's screening score: any finding present.
ABNORMAL = "abnormal"
# A multi-label row's label: the findings at or above their thresholds, joined by ";" in
# the checkpoint's order ("effusion;nodule"), or "normal" when there is none.
NO_FINDING = "normal"
LABEL_SEPARATOR = ";"


class SeedNet(nn.Module):
    """The small 3-conv CNN of the classic PyTorch chest X-ray tutorial.

    The tutorial's first linear layer expects 8x8 feature maps and fails on its own
    224 px input; adaptive pooling to 8x8 makes it work at any input size.
    """

    def __init__(self, num_classes: int = 2):
        super().__init__()

        def block(c_in, c_out):
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(3, 32), block(32, 64), block(64, 128))
        self.pool = nn.AdaptiveAvgPool2d((8, 8))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * 8 * 8, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(256, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


def _torchvision(arch: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        # Imported when a model is built: torchvision's import takes about 3 s (it
        # brings in torch._dynamo), which a driver that only reads checkpoints skips.
        import torchvision

        return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)

    return build


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "seednet": lambda n: SeedNet(n),
    "resnet18": _torchvision("resnet18"),
    "resnet50": _torchvision("resnet50"),
    # CheXNet: DenseNet-121 with its classifier replaced by one output per class.
    "densenet121": _torchvision("densenet121"),
}


def build_model(name: str, num_classes: int) -> nn.Module:
    try:
        factory = MODELS[name]
    except KeyError:
        raise MeddxError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None
    return factory(num_classes)


def make_checkpoint(
    model: nn.Module,
    *,
    model_name: str,
    class_names: list[str],
    positive_class: str,
    input_size: int,
    threshold: float = 0.5,
    thresholds: list[float] | None = None,
    modalities: list[str] | tuple[str, ...] = ("CR", "DX"),
    train_config: dict | None = None,
    metrics: dict | None = None,
) -> dict:
    """The checkpoint dict; ``thresholds`` (one per class) makes it multi-label."""
    state = model.module.state_dict() if hasattr(model, "module") else model.state_dict()
    multi = {}
    if thresholds is not None:
        if len(thresholds) != len(class_names):
            raise MeddxError(f"{len(thresholds)} thresholds for {len(class_names)} findings")
        multi = {"multi_label": True, "thresholds": [float(t) for t in thresholds]}
        threshold, positive_class = min(thresholds), ABNORMAL
    return {
        "format": CHECKPOINT_FORMAT,
        "model_name": model_name,
        "class_names": list(class_names),
        "positive_class": positive_class,
        "input_size": int(input_size),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "threshold": float(threshold),
        **multi,
        # DICOM Modality values the model may score; empty: any.
        "modalities": list(modalities),
        "train_config": dict(train_config or {}),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "meddx_version": __version__,
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "state_dict": {k: v.detach().cpu() for k, v in state.items()},
    }


def untrained_checkpoint(
    model_name: str, input_size: int, seed: int = 0, findings: list[str] | None = None, **kwargs
) -> dict:
    """A checkpoint of randomly initialised weights (normal/opacity, or multi-label over
    ``findings``): for benchmarks and tests of the pipeline, where throughput and
    plumbing do not depend on the weights."""
    torch.manual_seed(seed)
    if findings:
        kwargs.setdefault("thresholds", [0.5] * len(findings))
        return make_checkpoint(
            build_model(model_name, len(findings)),
            model_name=model_name,
            class_names=list(findings),
            positive_class=ABNORMAL,
            input_size=input_size,
            **kwargs,
        )
    return make_checkpoint(
        build_model(model_name, 2),
        model_name=model_name,
        class_names=["normal", "opacity"],
        positive_class="opacity",
        input_size=input_size,
        **kwargs,
    )


def is_multi_label(ckpt: dict) -> bool:
    """One sigmoid per finding (True) or one softmax over classes (False, and every
    checkpoint written before multi-label existed)."""
    return bool(ckpt.get("multi_label", False))


def checkpoint_bytes(ckpt: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


def save_checkpoint(ckpt: dict, uri: str, settings: StorageSettings) -> str:
    """Write the checkpoint to ``uri`` (local or s3://); return its sha256."""
    data = checkpoint_bytes(ckpt)
    storage.write_bytes(uri, data, settings)
    return hashlib.sha256(data).hexdigest()


def read_checkpoint(
    uri: str, settings: StorageSettings, expected_sha256: str | None = None
) -> tuple[dict, str]:
    """Load a checkpoint dict and the sha256 of its file. Refuses pickled code, and any
    file but the pinned one when ``expected_sha256`` is given (checked before unpickling)."""
    try:
        data = storage.read_bytes(uri, settings)
    except FileNotFoundError:
        raise MeddxError(f"checkpoint not found: {uri}") from None
    sha = hashlib.sha256(data).hexdigest()
    if expected_sha256 and sha != expected_sha256.lower():
        raise MeddxError(
            f"checkpoint {uri} has sha256 {sha[:16]}..., not the pinned {expected_sha256[:16]}..."
        )
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = " ".join(str(exc).split())[:200]
        raise MeddxError(f"{uri} is not a loadable meddx checkpoint: {reason}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise MeddxError(f"{uri} is not a meddx checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt, sha


def model_from_checkpoint(ckpt: dict) -> nn.Module:
    model = build_model(ckpt["model_name"], len(ckpt["class_names"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
