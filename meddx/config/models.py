"""What the commands on models and their results take: ``evaluate``, ``calibrate``,
``optimize``, ``import-weights`` and ``explain``."""

from __future__ import annotations

from dataclasses import dataclass

from meddx import MeddxError
from meddx.config.checks import DEFAULT_IMAGE_SIZE, IMAGE_SIZES, at_least, one_of
from meddx.inputs.storage import StorageSettings
from meddx.names import (
    DEFAULT_CHECK_IMAGES,
    DEFAULT_MAX_OBJECT_BYTES,
    DEFAULT_MODALITIES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODEL_NAMES,
    OPTIMIZED_PRECISIONS,
    positive_class_of,
)


@dataclass(frozen=True)
class EvaluateConfig:
    """What ``meddx evaluate`` reads and writes: scored PREDICTIONS against their labels."""

    predictions: str  # a results tree, a dt= partition or one Parquet file
    labels: str | None = None  # a manifest (uri, label, finding columns); None: class folders
    json_path: str | None = None  # also write the figures as JSON here
    plots: str | None = None  # ROC, precision-recall, reliability and histogram PNGs here
    by: str | None = None  # also per value of this predictions or manifest column
    # Results of several models (score --model A --model B): the one to evaluate, by
    # its checkpoint's sha256 or a prefix of it.
    model_sha256: str | None = None
    # Figures per study: positive if any of its images is, scored by its highest score.
    by_study: bool = False
    storage: StorageSettings = StorageSettings()


# An out-of-distribution threshold below the median of in-distribution scores would
# flag half of the films the model was trained for.
OOD_PERCENTILES = (50, 100)


@dataclass(frozen=True)
class CalibrateConfig:
    """What ``meddx calibrate`` sets on MODEL from its scored validation PREDICTIONS: the
    operating point for a target (and a temperature) and/or the OOD threshold."""

    predictions: str
    model: str
    out: str  # the calibrated checkpoint to write
    labels: str | None = None  # None: the class folder in image_uri
    target_sensitivity: float | None = None
    target_specificity: float | None = None
    temperature: bool = False  # also fit temperature scaling
    ood_percentile: float | None = None  # the OOD threshold at this percentile of ood_score
    finding: str | None = None  # multi-label: the finding whose threshold is set
    storage: StorageSettings = StorageSettings()

    def __post_init__(self):
        targets = (self.target_sensitivity, self.target_specificity)
        if None not in targets:
            raise MeddxError("give one of --target-sensitivity, --target-specificity")
        if targets == (None, None) and self.ood_percentile is None:
            raise MeddxError(
                "give --target-sensitivity or --target-specificity, and/or --ood-percentile"
            )
        for name, value in zip(("sensitivity", "specificity"), targets, strict=True):
            if value is not None and not 0 < value <= 1:
                raise MeddxError(f"--target-{name} must lie in (0, 1], got {value}")
        low, high = OOD_PERCENTILES
        if self.ood_percentile is not None and not low <= self.ood_percentile <= high:
            raise MeddxError(
                f"--ood-percentile must lie in [{low:g}, {high:g}], got {self.ood_percentile}"
            )


# The runtimes ``meddx optimize`` exports to.
OPTIMIZED_RUNTIMES = ("openvino",)


@dataclass(frozen=True)
class OptimizeConfig:
    """What ``meddx optimize`` makes: CHECKPOINT's model for CPU nodes, tuned and checked
    on the labelled images of CALIBRATION, written with the artefact inside to OUT."""

    checkpoint: str
    calibration: str
    out: str
    runtime: str = OPTIMIZED_RUNTIMES[0]
    precision: str = OPTIMIZED_PRECISIONS[0]
    max_images: int = DEFAULT_CHECK_IMAGES  # labelled images to tune and check on
    # Epochs of quantization-aware fine-tuning; 0: post-training quantization only.
    finetune_epochs: int = 0
    storage: StorageSettings = StorageSettings()

    def __post_init__(self):
        one_of(OPTIMIZED_RUNTIMES, self, "runtime")
        one_of(OPTIMIZED_PRECISIONS, self, "precision")
        at_least(1, self, "max_images")
        at_least(0, self, "finetune_epochs")


@dataclass(frozen=True)
class ImportWeightsConfig:
    """What ``meddx import-weights`` wraps: a state dict trained elsewhere, with what the
    training knew (classes or findings, input size, normalisation, thresholds)."""

    weights: str
    out: str
    model_name: str
    classes: tuple[str, ...] | None = None  # single-label: the outputs in order
    findings: tuple[str, ...] | None = None  # multi-label: one sigmoid output each
    positive_class: str | None = None  # None: the class that is not 'normal'
    threshold: tuple[float, ...] = (0.5,)  # one, or (multi-label) one per finding
    input_size: int = DEFAULT_IMAGE_SIZE
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    modalities: tuple[str, ...] = DEFAULT_MODALITIES
    storage: StorageSettings = StorageSettings()

    def __post_init__(self):
        if self.model_name not in MODEL_NAMES:
            raise MeddxError(
                f"unknown model {self.model_name!r}; choose from {', '.join(MODEL_NAMES)}"
            )
        if (self.classes is None) == (self.findings is None):
            raise MeddxError("give either --classes (single-label) or --findings (multi-label)")
        if self.classes is not None and (
            len(self.classes) < 2 or len(set(self.classes)) != len(self.classes)
        ):
            raise MeddxError("--classes needs two or more distinct names")
        if self.findings and len(self.threshold) not in (1, len(self.findings)):
            raise MeddxError(f"--threshold needs 1 or {len(self.findings)} values")
        if not self.findings and len(self.threshold) != 1:
            raise MeddxError("--threshold takes one value for a single-label model")
        if self.positive_class is not None and (
            self.findings or self.positive_class not in self.class_names
        ):
            raise MeddxError(
                f"--positive-class must be one of --classes {','.join(self.class_names)}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise MeddxError("--mean and --std need three values each, --std's above 0")
        if not all(0 < t < 1 for t in self.threshold):
            raise MeddxError("--threshold values must lie strictly between 0 and 1")
        low, high = IMAGE_SIZES
        if not low <= self.input_size <= high:
            raise MeddxError(f"--input-size must lie in [{low}, {high}], got {self.input_size}")

    @property
    def class_names(self) -> tuple[str, ...]:
        """The model's outputs in order: the findings, or the classes."""
        return tuple(self.findings or self.classes)

    @property
    def positive(self) -> str:
        """The class whose probability is the score (single-label)."""
        return self.positive_class or positive_class_of(self.class_names)

    @property
    def thresholds(self) -> tuple[float, ...]:
        """One threshold per output (multi-label) or the one (single-label)."""
        if self.findings and len(self.threshold) == 1:
            return self.threshold * len(self.findings)
        return self.threshold


@dataclass(frozen=True)
class ExplainConfig:
    """What ``meddx explain`` draws: Grad-CAM overlays of the TOP highest-scoring rows of
    PREDICTIONS, scored by MODEL, as PNGs under OUT."""

    predictions: str
    model: str
    out: str
    top: int = 10
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES
    storage: StorageSettings = StorageSettings()

    def __post_init__(self):
        at_least(1, self, "top", "max_object_bytes")
