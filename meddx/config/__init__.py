"""The frozen configurations the command line builds and the library runs on: the runs
(score, screen, prepare, train, synth, demo) here, the commands on models and their
results in ``models``, the checks they share in ``checks``.

Every limit on an option is checked here, once, whoever builds the config (the CLI, a
job script, a test). This package must not import torch, Ray or any meddx package
but ``meddx.inputs`` and ``meddx.secret``: the CLI reads the defaults below for
``--help`` and builds a config before anything heavy is imported.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import ClassVar

from meddx import MeddxError
from meddx.config.checks import (
    DEFAULT_IMAGE_SIZE,
    IMAGE_SIZES,
    at_least,
    check_metrics_targets,
    check_run_date,
    one_of,
)
from meddx.config.models import (  # noqa: F401 (meddx.config names every config)
    OPTIMIZED_RUNTIMES,
    CalibrateConfig,
    EvaluateConfig,
    ExplainConfig,
    ImportWeightsConfig,
    OptimizeConfig,
)
from meddx.inputs.storage import StorageSettings
from meddx.names import (
    DEFAULT_LOCK_TIMEOUT,
    DEFAULT_MAX_OBJECT_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MODALITIES,
    DEFAULT_MODEL,
    DEFAULT_STORE_SIZE,
    DEFAULT_VIEWS,
    DICOMWEB_SCHEMES,
    DIMSE_SCHEME,
    MAX_MODELS,
    MODEL_NAMES,
    PRECISIONS,
    RUNTIMES,
    SYNTH_FORMATS,
    parse_finding_names,
    parse_modalities,
    parse_views,
)

# Synthetic films: 64 px is the smallest that still draws ribs and a visible opacity;
# 4,300 covers the largest chest detectors (43 cm at 100 um).
SYNTH_SIZES = (64, 4300)
# Short sides a store of films keeps (meddx prepare): at least what models take, at most
# what a film is worth keeping at in 8 bits.
STORE_SIZES = (32, 2048)
# A progress line this often when not on a terminal: a cron log stays readable, and a
# stalled run shows within a minute.
PROGRESS_SECONDS = 30.0


@dataclass(frozen=True)
class ScoreConfig:
    """What ``meddx score`` runs on: INPUT, the checkpoint, OUT and how to score."""

    input: str
    # The checkpoint; several (a tuple, --model given more than once) are scored in one
    # pass: ``model`` keeps the first and ``more_models`` the others.
    model: str
    out: str
    batch_size: int | None = None  # None: GPU_BATCH with GPUs, else CPU_BATCH
    actors: int | None = None  # None: one per GPU, or one on a CPU-only cluster
    run_date: str = field(default_factory=lambda: dt.date.today().isoformat())
    precision: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES  # objects and tar members
    # DICOM Modality values to score; (): any; None: the checkpoint's list.
    modalities: tuple[str, ...] | None = None
    # DICOM ViewPosition values to accept as frontal; (): any; None: the checkpoint's.
    views: tuple[str, ...] | None = None
    model_sha256: str | None = None  # pin: refuse any other checkpoint file
    compile_model: bool = False  # torch.compile in each predictor (GPU runs)
    runtime: str = "auto"  # names.RUNTIMES
    # The lease on OUT (store/lease.py): how long to wait for another run's, and how long a
    # silent one lasts before it is taken over.
    wait_for_lock: float = 0.0
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    progress_seconds: float = PROGRESS_SECONDS  # when not on a terminal
    resume: bool = False  # continue the last uncommitted run of this OUT and run date
    quiet: bool = False  # no progress at all
    # Where each scored study's Structured Report goes (pacs/results.py): a DICOMweb
    # server (STOW-RS) or a DIMSE peer (C-STORE).
    results_to: str | None = None
    results_heatmaps: bool = False  # ... and the top finding's Grad-CAM as a Secondary Capture
    # DICOMweb credentials may go over plain http to a host other than loopback.
    allow_insecure_http: bool = False
    # image_uri (and paths in error text) as keyed hashes of the path: file and member
    # names often hold MRNs or accession numbers. Needs the site's pseudonym key.
    pseudonymize_paths: bool = False
    # ... and where each run's pseudonym -> path table goes (a folder); None: nowhere.
    path_map: str | None = None
    # A store of model-ready films (meddx prepare) that INPUT's films are read from:
    # those new or changed are decoded into it first, under its own lease.
    store: str | None = None
    more_models: tuple[str, ...] = ()
    # A file of selection rules (TOML or YAML: imaging/rules.py); None: the checkpoint's,
    # else the default rules.
    rules: str | None = None
    # meddx listen's ARCHIVE (ARCHIVE/STUDY/INSTANCE.dcm), when INPUT lists instances of
    # it: a study's instances are its folder's files (its reports cover them all).
    archive: str | None = None
    # The run's metrics for Prometheus (pipelines/metrics.py), failed runs too: a textfile
    # for node-exporter's textfile collector, and/or a Pushgateway's URL.
    metrics_file: str | None = None
    pushgateway: str | None = None
    storage: StorageSettings = StorageSettings()

    def __post_init__(self):
        check_run_date(self.run_date)
        if not isinstance(self.model, str):  # --model A --model B
            first, *more = self.model
            object.__setattr__(self, "model", first)
            object.__setattr__(self, "more_models", (*more, *self.more_models))
        self._check_models()
        if isinstance(self.modalities, str):  # "CR,DX" or "any", as on the command line
            object.__setattr__(self, "modalities", parse_modalities(self.modalities))
        if isinstance(self.views, str):  # "PA,AP" or "any"
            object.__setattr__(self, "views", parse_views(self.views))
        if self.path_map is not None and not self.pseudonymize_paths:
            raise MeddxError("--path-map goes with --pseudonymize-paths")
        if self.results_heatmaps and self.results_to is None:
            raise MeddxError("--results-heatmaps goes with --results-to")
        if self.results_to is not None:
            if not self.results_to.lower().startswith((*DICOMWEB_SCHEMES, DIMSE_SCHEME)):
                raise MeddxError(
                    "--results-to must be dicomweb+http(s)://HOST/PATH or "
                    f"dimse://AET@HOST:PORT, got {self.results_to!r}"
                )
            if self.archive is None and not self.input.lower().startswith(
                (*DICOMWEB_SCHEMES, DIMSE_SCHEME)
            ):
                raise MeddxError(
                    "--results-to needs a PACS INPUT (DICOMweb or DIMSE): the reports go "
                    "into the studies it listed"
                )
        for url in (self.input, self.results_to):
            if url is not None and url.lower().startswith(DICOMWEB_SCHEMES):
                from meddx.inputs.dicomweb import check_transport  # pydicom: DICOMweb runs only

                check_transport(url, self.allow_insecure_http)
            if url is not None and url.lower().startswith(DIMSE_SCHEME):
                from meddx.inputs.dimse import peer

                peer(url)  # a malformed peer: one line, before anything runs
        at_least(1, self, "batch_size", "actors", "max_pixels", "max_object_bytes")
        at_least(0, self, "wait_for_lock")
        if not self.progress_seconds > 0:
            raise MeddxError(f"--progress-seconds must be above 0, got {self.progress_seconds}")
        if not self.lock_timeout > 0:
            raise MeddxError(f"--lock-timeout must be above 0, got {self.lock_timeout}")
        one_of(RUNTIMES, self, "runtime")
        one_of(PRECISIONS, self, "precision")
        check_metrics_targets(self)

    @property
    def models(self) -> tuple[str, ...]:
        """The checkpoints of the run, in the order given: one row each per input."""
        return (self.model, *self.more_models)

    def _check_models(self) -> None:
        models = self.models
        if len(models) > MAX_MODELS:
            raise MeddxError(f"--model at most {MAX_MODELS} times in one pass, got {len(models)}")
        twice = next((m for i, m in enumerate(models) if m in models[:i]), None)
        if twice is not None:
            raise MeddxError(f"--model {twice} is given twice")
        if len(models) > 1 and self.model_sha256 is not None:
            raise MeddxError("--model-sha256 pins one checkpoint: give one --model with it")
        if len(models) > 1 and self.results_to is not None:
            raise MeddxError("--results-to stores one model's reports: give one --model with it")


@dataclass(frozen=True)
class ScreenConfig(ScoreConfig):
    """What ``meddx score`` takes (``input`` is the watched source) plus a night's own."""

    new_model: bool = False
    max_error_rate: float = 0.05
    # A night with more rows flagged by quality control than this is an alarm: usually a
    # feed sending the wrong series (in-distribution films are flagged at about 1%).
    max_qc_rate: float = 0.10
    max_psi: float = 0.25
    drift_window: int = 7  # how many earlier run dates form the reference distribution
    # A DICOMweb source is asked only for studies of the last this many days (StudyDate).
    since_days: int = 2
    # The worklist, report and summary of every run of the run date, not only this
    # run's: meddx listen's batches keep the day's current.
    whole_day: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.max_error_rate <= 1:
            raise MeddxError(f"--max-error-rate must lie in [0, 1], got {self.max_error_rate}")
        if not 0 <= self.max_qc_rate <= 1:
            raise MeddxError(f"--max-qc-rate must lie in [0, 1], got {self.max_qc_rate}")
        if self.max_psi < 0:
            raise MeddxError(f"--max-psi must be at least 0, got {self.max_psi}")
        if self.since_days < 0:
            raise MeddxError(f"--since must be at least 0 days, got {self.since_days}")
        if self.drift_window < 1:
            raise MeddxError(f"the drift window must be at least 1 night, got {self.drift_window}")


def parse_ae_titles(text: str | tuple[str, ...]) -> tuple[str, ...]:
    """ "PACS1,PACS2" (or a tuple) as AE titles, each checked; one line for a bad one."""
    from meddx.inputs.dimse import ae_title  # pydicom and pynetdicom: DIMSE runs only

    titles = tuple(t.strip() for t in text.split(",")) if isinstance(text, str) else text
    return tuple(ae_title(t) for t in titles)


@dataclass(frozen=True)
class ListenConfig:
    """What ``meddx listen`` runs: a DICOM receiver, the ARCHIVE it keeps what it is sent
    in, and the screening run each settled study goes through (``scoring``, whose INPUT
    each batch sets)."""

    archive: str
    scoring: ScreenConfig
    allow_ae: tuple[str, ...]  # calling AE titles accepted; others rejected at association
    ae_title: str = "MEDDX"
    host: str = "0.0.0.0"
    port: int = 11112
    settle: float = 60.0  # a study is complete when nothing arrived for it this long
    health_port: int | None = None  # GET /health on this port, None: none
    # DICOM over TLS: this receiver's certificate and key (PEM); with tls_ca, senders
    # must show a certificate that CA signed.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "allow_ae", parse_ae_titles(self.allow_ae))
        if (self.tls_cert is None) != (self.tls_key is None):
            raise MeddxError("--tls-cert and --tls-key go together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise MeddxError("--tls-ca goes with --tls-cert and --tls-key")
        if not self.allow_ae:
            raise MeddxError("--allow-ae names the calling AE titles to accept")
        parse_ae_titles((self.ae_title,))
        for name in ("port", "health_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise MeddxError(f"--{name.replace('_', '-')} must lie in [0, 65535], got {value}")
        if not self.settle >= 0:
            raise MeddxError(f"--settle must be at least 0 seconds, got {self.settle}")


@dataclass(frozen=True)
class PrepareConfig:
    """What ``meddx prepare`` runs on: INPUT, the STORE of model-ready films it adds the
    new and changed inputs to, and the size they are kept at."""

    input: str
    out: str  # the store
    size: int = DEFAULT_STORE_SIZE  # the short side films are kept at
    run_date: str = field(default_factory=lambda: dt.date.today().isoformat())
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES
    wait_for_lock: float = 0.0
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    progress_seconds: float = PROGRESS_SECONDS
    quiet: bool = False
    since_days: int = 2  # a DICOMweb INPUT: the studies of the last this many days
    allow_insecure_http: bool = False
    storage: StorageSettings = StorageSettings()
    # What the run skeleton and the selection read of every run's config: a store keeps
    # each input under its own path (the source's), and is one decoder's films.
    pseudonymize_paths: ClassVar[bool] = False
    path_map: ClassVar[None] = None
    results_to: ClassVar[None] = None
    new_model: ClassVar[bool] = False

    def __post_init__(self):
        check_run_date(self.run_date)
        low, high = STORE_SIZES
        if not low <= self.size <= high:
            raise MeddxError(f"--size must lie in [{low}, {high}], got {self.size}")
        at_least(1, self, "max_pixels", "max_object_bytes")
        at_least(0, self, "wait_for_lock", "since_days")
        if not self.progress_seconds > 0:
            raise MeddxError(f"--progress-seconds must be above 0, got {self.progress_seconds}")
        if not self.lock_timeout > 0:
            raise MeddxError(f"--lock-timeout must be above 0, got {self.lock_timeout}")
        if self.input.lower().startswith(DICOMWEB_SCHEMES):
            from meddx.inputs.dicomweb import check_transport  # pydicom: DICOMweb runs only

            check_transport(self.input, self.allow_insecure_http)


@dataclass(frozen=True)
class TrainConfig:
    """What ``meddx train`` runs on: the labelled DATA, the checkpoint to write, DDP."""

    data: str
    out: str
    model: str = DEFAULT_MODEL
    epochs: int = 10
    workers: int = 2
    use_gpu: bool = False
    batch_size: int = 32
    lr: float = 1e-3
    val_fraction: float = 0.2
    image_size: int = DEFAULT_IMAGE_SIZE
    seed: int = 0
    # DICOM Modality values trained on (and so accepted when scoring); (): any.
    modalities: tuple[str, ...] = DEFAULT_MODALITIES
    # DICOM ViewPosition values trained on (others are wrong_view when scoring); (): any.
    views: tuple[str, ...] = DEFAULT_VIEWS
    # A file of selection rules (imaging/rules.py) to train under, recorded in the
    # checkpoint; None: the default rules.
    rules: str | None = None
    storage_path: str | None = None  # Ray Train run folder; shared storage on multi-node
    run_name: str | None = None  # the same name and storage path continue a stopped run
    # Worker-group restarts from the last checkpoint before the run fails: a preempted
    # node or a killed worker costs at most one epoch.
    max_failures: int = 3
    # Multi-label: the manifest's 0/1 finding columns to learn, one sigmoid output each.
    findings: tuple[str, ...] | None = None
    # A state dict to start from (ImageNet's or a site's own), its classifier replaced.
    init_weights: str | None = None
    # Also make the int8 OpenVINO model (meddx optimize), gated on the validation split.
    optimize: bool = False
    progress_seconds: float = PROGRESS_SECONDS  # rank 0's line within an epoch this often
    quiet: bool = False  # no progress lines (within and after each epoch)
    # A store of films (meddx prepare) the images are read from, every epoch, after DATA's
    # new and changed ones are decoded into it; DATA itself may be a store.
    store: str | None = None
    metrics_file: str | None = None  # as ScoreConfig's
    pushgateway: str | None = None
    storage: StorageSettings = field(default_factory=StorageSettings)

    def __post_init__(self):
        """Every limit on the options, checked here once (the CLI and library callers
        alike), before anything is read or Ray starts."""
        if self.model not in MODEL_NAMES:
            raise MeddxError(f"unknown model {self.model!r}; choose from {', '.join(MODEL_NAMES)}")
        at_least(1, self, "epochs", "workers", "batch_size")
        at_least(0, self, "seed", "max_failures")
        if not self.progress_seconds > 0:
            raise MeddxError(f"--progress-seconds must be above 0, got {self.progress_seconds}")
        if isinstance(self.modalities, str):  # "CR,DX" or "any", as on the command line
            object.__setattr__(self, "modalities", parse_modalities(self.modalities))
        if isinstance(self.views, str):  # "PA,AP" or "any"
            object.__setattr__(self, "views", parse_views(self.views))
        if not self.lr > 0:
            raise MeddxError(f"--lr must be above 0, got {self.lr}")
        if not 0 < self.val_fraction < 1:
            raise MeddxError("--val-fraction must lie strictly between 0 and 1")
        low, high = IMAGE_SIZES
        if not low <= self.image_size <= high:
            raise MeddxError(f"--image-size must lie in [{low}, {high}], got {self.image_size}")
        if self.findings is not None and parse_finding_names(",".join(self.findings)) != tuple(
            self.findings
        ):
            raise MeddxError("--findings needs distinct finding column names")
        check_metrics_targets(self)


@dataclass(frozen=True)
class SynthConfig:
    """What ``meddx synth`` writes: N films of SIZE px (or SIZE x HEIGHT) in FORMAT under
    OUT; with ``mix`` each film's format is drawn from a realistic archive mix instead."""

    out: str
    n: int = 200
    size: int = 256  # the width; the height too unless ``height`` is given
    format: str = "png"
    height: int | None = None
    mix: bool = False
    positive_rate: float = 0.5
    seed: int = 0
    # Multi-label: (finding, prevalence) pairs; empty: the single-label normal/opacity set.
    findings: tuple[tuple[str, float], ...] = ()
    # The quality-control set instead: N held-out chest films and images that are not.
    quality_set: bool = False
    storage: StorageSettings = StorageSettings()

    def __post_init__(self):
        at_least(1, self, "n")
        at_least(0, self, "seed")
        low, high = SYNTH_SIZES
        for side in (self.size, self.height or self.size):
            if not low <= side <= high:
                raise MeddxError(f"--size sides must lie in [{low}, {high}], got {side}")
        if self.format not in SYNTH_FORMATS:
            raise MeddxError(
                f"unknown image format {self.format!r}: use {', '.join(SYNTH_FORMATS)}"
            )
        if not 0.0 <= self.positive_rate <= 1.0:
            raise MeddxError("--positive-rate must lie in [0, 1]")
        if any(not 0.0 <= rate <= 1.0 for _, rate in self.findings):
            raise MeddxError("--findings prevalences must lie in [0, 1]")
        if self.quality_set and (self.height not in (None, self.size) or self.mix or self.findings):
            raise MeddxError("--quality-set takes a square --size and no --mix/--findings")


@dataclass(frozen=True)
class DemoConfig:
    """What ``meddx demo`` runs on this machine: synth -> DDP train -> score -> evaluate."""

    workdir: str = "demo-output"
    # Enough films to train to the demo's held-out AUROC in a few CPU minutes; fewer
    # than the lower limits leave too few of each class to train or to measure on.
    n_train: int = 480
    n_holdout: int = 240
    epochs: int = 6

    def __post_init__(self):
        at_least(20, self, "n_train")
        at_least(10, self, "n_holdout")
        at_least(1, self, "epochs")
