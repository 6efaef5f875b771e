"""Model registry and the one-file checkpoint format.

A checkpoint is a plain dict (torchvision references style) saved with ``torch.save``
and loaded with ``torch.load(..., weights_only=True)``: tensors, strings, numbers, lists
and dicts only, so loading never runs code. It is parsed once into a frozen
``Checkpoint``, which is what every other module reads. All models start from random
weights: meddx never downloads weights from a hub.

A multi-label checkpoint (CheXNet's formulation: one sigmoid output per finding) has
``multi_label: True``, its findings as ``class_names``, one threshold per finding in
``thresholds`` and, as ``threshold``, the lowest of them: the cut on the row's score
(its highest finding probability) that puts every study with a finding on the worklist.
Its ``positive_class`` is ``abnormal``: any finding present.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from meddx import MeddxError, __version__, one_line
from meddx.inputs import storage
from meddx.inputs.storage import StorageSettings
from meddx.names import (
    ABNORMAL,
    DEFAULT_MODALITIES,
    DEFAULT_VIEWS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODEL_NAMES,
    PRECISIONS,
    SINGLE_LABEL_CLASSES,
)

CHECKPOINT_FORMAT = 1


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


assert tuple(MODELS) == MODEL_NAMES  # the CLI offers names.MODEL_NAMES without torch


# The classifier each architecture ends in: what ``--init-weights`` replaces to fit the
# classes (ImageNet weights end in 1,000 outputs).
HEADS = {
    "seednet": "classifier.4",
    "resnet18": "fc",
    "resnet50": "fc",
    "densenet121": "classifier",
}
assert tuple(HEADS) == MODEL_NAMES
# torchvision's own DenseNet files name ``norm.1`` what the module calls ``norm1``;
# torchvision renames them on load, and so does meddx.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def build_model(name: str, num_classes: int) -> nn.Module:
    try:
        factory = MODELS[name]
    except KeyError:
        raise MeddxError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None
    return factory(num_classes)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file's contents, parsed once; every module reads this, never the dict.

    ``thresholds`` and ``temperatures`` are always sequences, one per output used: for a
    multi-label model one per finding; for a single-label model one threshold (on the
    positive class's probability) and one temperature (dividing every logit).
    """

    model_name: str
    class_names: tuple[str, ...]
    positive_class: str
    multi_label: bool
    thresholds: tuple[float, ...]
    temperatures: tuple[float, ...]
    input_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    modalities: tuple[str, ...] = DEFAULT_MODALITIES  # DICOM Modality values; (): any
    views: tuple[str, ...] = DEFAULT_VIEWS  # DICOM ViewPosition values trained on; (): any
    precision: str | None = None  # a pinned precision (a model that fails under bf16)
    metrics: dict = field(default_factory=dict)
    train_config: dict = field(default_factory=dict)
    state_dict: dict = field(default_factory=dict, repr=False, compare=False)
    # Whatever else the file holds (precision_check, calibration, created_at, ...): kept
    # as it is when the checkpoint is written again.
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def rules(self) -> dict | None:
        """The selection rules it was trained under (``train --rules``: imaging/rules.py's
        data), or None: the default rules."""
        recorded = self.extra.get("rules")
        return dict(recorded) if isinstance(recorded, dict) else None

    @property
    def positive_index(self) -> int | None:
        """The positive class's output (None for multi-label: the score is the highest)."""
        return None if self.multi_label else self.class_names.index(self.positive_class)

    @property
    def threshold(self) -> float:
        """The cut on a row's score. Multi-label: the lowest finding threshold, so every
        study with a finding reaches the worklist."""
        return min(self.thresholds)

    def replace(self, **changes) -> Checkpoint:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict) -> Checkpoint:
        """Parse a checkpoint dict of any meddx version (format 1)."""
        try:
            class_names = tuple(str(c) for c in d["class_names"])
            multi_label = bool(d.get("multi_label", False))
            temperature = d.get("temperature", 1.0)
            if multi_label:
                thresholds = tuple(float(t) for t in d["thresholds"])
                if isinstance(temperature, list | tuple):
                    temperatures = tuple(float(t) for t in temperature)
                else:
                    temperatures = (float(temperature),) * len(class_names)
                if not len(thresholds) == len(temperatures) == len(class_names):
                    raise MeddxError(
                        f"checkpoint has {len(class_names)} findings, {len(thresholds)} "
                        f"thresholds and {len(temperatures)} temperatures"
                    )
            else:
                thresholds = (float(d["threshold"]),)
                temperatures = (float(temperature),)
                if d["positive_class"] not in class_names:
                    raise MeddxError(f"positive class {d['positive_class']!r} is not a class")
            known = {*(f.name for f in dataclasses.fields(cls)), "threshold", "temperature"}
            return cls(
                model_name=str(d["model_name"]),
                class_names=class_names,
                positive_class=str(d["positive_class"]),
                multi_label=multi_label,
                thresholds=thresholds,
                temperatures=temperatures,
                input_size=int(d["input_size"]),
                mean=tuple(float(v) for v in d.get("mean", IMAGENET_MEAN)),
                std=tuple(float(v) for v in d.get("std", IMAGENET_STD)),
                # Written before modalities were recorded: the radiography default.
                modalities=tuple(str(m) for m in d.get("modalities", DEFAULT_MODALITIES)),
                # Written before views were recorded: frontal films, as every model was.
                views=tuple(str(v) for v in d.get("views", DEFAULT_VIEWS)),
                precision=d.get("precision") if d.get("precision") in PRECISIONS else None,
                metrics=dict(d.get("metrics", {})),
                train_config=dict(d.get("train_config", {})),
                state_dict=dict(d.get("state_dict", {})),
                extra={k: v for k, v in d.items() if k not in known | {"format"}},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MeddxError(f"not a meddx checkpoint: bad or missing {one_line(exc)}") from None

    def to_dict(self) -> dict:
        """The on-disk layout (format 1): a plain dict that ``weights_only`` loads."""
        out = {
            **self.extra,
            "format": CHECKPOINT_FORMAT,
            "model_name": self.model_name,
            "class_names": list(self.class_names),
            "positive_class": self.positive_class,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "threshold": self.threshold,
            "modalities": list(self.modalities),
            "views": list(self.views),
            "train_config": dict(self.train_config),
            "metrics": dict(self.metrics),
            "state_dict": self.state_dict,
        }
        if self.multi_label:
            out["multi_label"] = True
            out["thresholds"] = list(self.thresholds)
            out["temperature"] = list(self.temperatures)
        else:
            out["temperature"] = self.temperatures[0]
        if self.precision:
            out["precision"] = self.precision
        return out


def make_checkpoint(
    model: nn.Module,
    *,
    model_name: str,
    class_names: list[str],
    positive_class: str,
    input_size: int,
    threshold: float = 0.5,
    thresholds: list[float] | None = None,
    modalities: list[str] | tuple[str, ...] = DEFAULT_MODALITIES,
    views: list[str] | tuple[str, ...] = DEFAULT_VIEWS,
    train_config: dict | None = None,
    metrics: dict | None = None,
) -> Checkpoint:
    """A new checkpoint of ``model``; ``thresholds`` (one per class) makes it multi-label."""
    state = model.module.state_dict() if hasattr(model, "module") else model.state_dict()
    multi_label = thresholds is not None
    if multi_label:
        if len(thresholds) != len(class_names):
            raise MeddxError(f"{len(thresholds)} thresholds for {len(class_names)} findings")
        positive_class = ABNORMAL
    cuts = tuple(float(t) for t in thresholds) if multi_label else (float(threshold),)
    return Checkpoint(
        model_name=model_name,
        class_names=tuple(class_names),
        positive_class=positive_class,
        multi_label=multi_label,
        thresholds=cuts,
        temperatures=(1.0,) * len(cuts),
        input_size=int(input_size),
        modalities=tuple(modalities),
        views=tuple(views),
        train_config=dict(train_config or {}),
        metrics={k: float(v) for k, v in (metrics or {}).items()},
        state_dict={k: v.detach().cpu() for k, v in state.items()},
        extra={"meddx_version": __version__, "created_at": dt.datetime.now(dt.UTC).isoformat()},
    )


def untrained_checkpoint(
    model_name: str, input_size: int, seed: int = 0, findings: list[str] | None = None, **kwargs
) -> Checkpoint:
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
        build_model(model_name, len(SINGLE_LABEL_CLASSES)),
        model_name=model_name,
        class_names=list(SINGLE_LABEL_CLASSES),
        positive_class=SINGLE_LABEL_CLASSES[1],
        input_size=input_size,
        **kwargs,
    )


def checkpoint_bytes(ckpt: Checkpoint) -> bytes:
    buf = io.BytesIO()
    torch.save(ckpt.to_dict(), buf)
    return buf.getvalue()


def save_checkpoint(ckpt: Checkpoint, uri: str, settings: StorageSettings) -> str:
    """Write the checkpoint to ``uri`` (local or s3://); return its sha256."""
    data = checkpoint_bytes(ckpt)
    storage.write_bytes(uri, data, settings)
    return hashlib.sha256(data).hexdigest()


def load_checkpoint_dict(data: bytes, uri: str) -> dict:
    """``torch.load`` with ``weights_only``: tensors and plain values, never code."""
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MeddxError(f"{uri} is not a loadable meddx checkpoint: {one_line(exc)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise MeddxError(f"{uri} is not a meddx checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def read_checkpoint(
    uri: str, settings: StorageSettings, expected_sha256: str | None = None
) -> tuple[Checkpoint, str]:
    """The checkpoint and the sha256 of its file. Refuses pickled code, and any file but
    the pinned one when ``expected_sha256`` is given (checked before unpickling)."""
    try:
        data = storage.read_bytes(uri, settings)
    except FileNotFoundError:
        raise MeddxError(f"checkpoint not found: {uri}") from None
    sha = hashlib.sha256(data).hexdigest()
    if expected_sha256 and sha != expected_sha256.lower():
        raise MeddxError(
            f"checkpoint {uri} has sha256 {sha[:16]}..., not the pinned {expected_sha256[:16]}..."
        )
    return Checkpoint.from_dict(load_checkpoint_dict(data, uri)), sha


def model_from_checkpoint(ckpt: Checkpoint) -> nn.Module:
    model = build_model(ckpt.model_name, len(ckpt.class_names))
    model.load_state_dict(ckpt.state_dict)
    return model.eval()


class WithFeatures(nn.Module):
    """A model that returns its logits and the penultimate features its classifier read,
    from one forward pass: the out-of-distribution score (ood.py) needs the features."""

    def __init__(self, model: nn.Module, head: str):
        super().__init__()
        self.head = model.get_submodule(head)
        model.set_submodule(head, nn.Identity())
        self.body = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.flatten(self.body(x), 1)
        return self.head(features), features


def features_model(ckpt: Checkpoint) -> WithFeatures:
    """The checkpoint's model, returning (logits, penultimate features)."""
    return WithFeatures(model_from_checkpoint(ckpt), HEADS[ckpt.model_name]).eval()


def read_state_dict(uri: str, settings: StorageSettings) -> tuple[dict, str]:
    """A state dict from a file the user brings (torchvision's format: parameter name ->
    tensor), loaded with ``weights_only`` so it never runs code, and the file's sha256.
    Also takes the common wrappings: ``{"state_dict": ...}`` and DataParallel's
    ``module.`` prefix."""
    try:
        data = storage.read_bytes(uri, settings)
    except FileNotFoundError:
        raise MeddxError(f"weights file not found: {uri}") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        if isinstance(exc, pickle.UnpicklingError) and "GLOBAL" in str(exc).upper():
            raise MeddxError(
                f"{uri} holds more than tensors and plain values: loading it would run its "
                "code, which meddx never does"
            ) from None
        raise MeddxError(f"{uri} is not a file torch.save wrote") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not (
        isinstance(state, dict)
        and state
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise MeddxError(f"{uri} is not a state dict (parameter names and tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, hashlib.sha256(data).hexdigest()


def fit_state_dict(
    state: dict, model_name: str, num_classes: int, uri: str, *, keep_head: bool
) -> nn.Module:
    """``model_name`` with ``num_classes`` outputs, its weights from ``state``.

    ``keep_head=False`` (``train --init-weights``): every weight but the classifier's
    comes from the file and the classifier starts fresh, sized to the classes.
    ``keep_head=True`` (``import-weights``): every weight comes from the file, so its
    classifier must already have ``num_classes`` outputs. A file made for another
    architecture is one line naming the first weights that do not fit."""
    model = build_model(model_name, num_classes)
    own = model.state_dict()
    if model_name == "densenet121":
        state = {
            (m.group(1) + m.group(2) if (m := _DENSENET_OLD_KEY.match(k)) else k): v
            for k, v in state.items()
        }
    head = HEADS[model_name] + "."
    if not keep_head:
        state = {k: v for k, v in state.items() if not k.startswith(head)}
    wanted = {k for k in own if keep_head or not k.startswith(head)}
    # BatchNorm's step counters are absent from older torchvision files: they do not
    # affect inference or fine-tuning with the default momentum.
    missing = sorted(k for k in wanted - state.keys() if not k.endswith("num_batches_tracked"))
    unexpected = sorted(state.keys() - own.keys())
    misshaped = sorted(k for k in state.keys() & own.keys() if state[k].shape != own[k].shape)
    problems = [
        f"{len(keys)} {what} (first {keys[0]}"
        + (f": {tuple(state[keys[0]].shape)} for {tuple(own[keys[0]].shape)}" if shape else "")
        + ")"
        for keys, what, shape in (
            (misshaped, "of another shape", True),
            (missing, "missing", False),
            (unexpected, "unknown to it", False),
        )
        if keys
    ]
    if problems:
        outputs = f" with {num_classes} outputs" if keep_head else ""
        raise MeddxError(f"{uri} does not fit {model_name}{outputs}: weights {'; '.join(problems)}")
    model.load_state_dict({**own, **state})
    return model.eval()


def import_weights(
    uri: str,
    settings: StorageSettings,
    *,
    model_name: str,
    class_names: list[str],
    positive_class: str,
    multi_label: bool,
    thresholds: list[float],
    input_size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    modalities: tuple[str, ...] = DEFAULT_MODALITIES,
) -> Checkpoint:
    """A meddx checkpoint around a state dict trained elsewhere: the classes, input size,
    normalisation and threshold(s) are the caller's; the file's sha256 is recorded."""
    state, sha = read_state_dict(uri, settings)
    model = fit_state_dict(state, model_name, len(class_names), uri, keep_head=True)
    ckpt = make_checkpoint(
        model,
        model_name=model_name,
        class_names=class_names,
        positive_class=positive_class,
        input_size=input_size,
        threshold=thresholds[0],
        thresholds=thresholds if multi_label else None,
        modalities=modalities,
    )
    source = {"file": uri.rsplit("/", 1)[-1], "sha256": sha}
    return ckpt.replace(mean=tuple(mean), std=tuple(std), extra={**ckpt.extra, "imported": source})
