"""DDP training with Ray Train, fed by the same read/decode stages as scoring.

The driver (this module) lists the labelled inputs, splits them (stratified, seeded)
into train and validation sets, and hands both to a ``TorchTrainer`` as Ray Datasets,
with a frozen ``TrainJob`` for its workers (``train_worker.py``: plain
``train_one_epoch`` and ``validate`` calls, logging and checkpointing from rank 0). The
best epoch by validation AUROC becomes the checkpoint file, with its out-of-distribution
density, its precision check and, with ``--optimize``, its int8 model.

With ``findings`` the model is multi-label (CheXNet's formulation): one logit per
finding, binary cross-entropy weighted per finding by its training prevalence, and per
finding a validation AUROC and a Youden threshold; the mean AUROC picks the best epoch.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
from ray.data.expressions import col
from sklearn.model_selection import train_test_split

from meddx import MeddxError, secret
from meddx.config import TrainConfig
from meddx.imaging.decode import DecodeSettings
from meddx.imaging.rules import DEFAULT as DEFAULT_RULES
from meddx.inputs import listing, shards, storage
from meddx.inputs.reading import read_objects
from meddx.model import ood, registry
from meddx.model.ood import FEATURE_BATCH, features_of
from meddx.model.precision import precision_check
from meddx.model.registry import Checkpoint
from meddx.names import ABNORMAL, QC_WRONG_VIEW, positive_class_of
from meddx.pipelines import cluster, metrics
from meddx.pipelines.dataset import load_rules
from meddx.pipelines.train_worker import (
    FailureLines,
    TrainJob,
    read_epoch_checkpoint,
    train_loop_per_worker,
)
from meddx.store import audit, films

log = logging.getLogger(__name__)

# Ray Train keeps the best two epochs' checkpoints: the best to export, and one more so
# the run can resume if the newest one was being written when a worker died.
CHECKPOINTS_KEPT = 2


def strata_of(targets: list) -> list[list[str]]:
    """Stratification keys, finest first: the class; for multi-label targets (0/1 tuples)
    the combination of findings, else the rarest finding a film shows (so every
    finding's positives are split in proportion), else whether it shows any."""
    if not isinstance(targets[0], tuple):
        return [list(targets)]
    truth = np.array(targets, dtype=int)
    by_rarity = np.argsort(truth.sum(axis=0), kind="stable")
    rarest = [str(next((k for k in by_rarity if row[k]), "none")) for row in truth]
    return [
        ["".join(map(str, t)) for t in targets],
        rarest,
        [str(int(any(t))) for t in targets],
    ]


def split(items: list[tuple[str, str | tuple[int, ...]]], val_fraction: float, seed: int):
    """Seeded train/validation split of (uri, target) items, stratified where it can be."""
    targets = [t for _, t in items]
    n_val = max(1, round(len(items) * val_fraction))
    if n_val >= len(items):
        raise MeddxError("--val-fraction leaves no training images")
    # Stratify when every stratum has at least two images, so both sets see every class
    # (multi-label: every finding, by the finest keys that strata_of can fill).
    stratify = None
    for strata in strata_of(targets):
        counts = Counter(strata)
        if min(counts.values()) >= 2 and n_val >= len(counts):
            stratify = strata
            break
    train_idx, val_idx = train_test_split(
        np.arange(len(items)), test_size=n_val, random_state=seed, stratify=stratify
    )
    return [items[i] for i in train_idx], [items[i] for i in val_idx]


def labelled_dataset(
    items, class_names, cfg: TrainConfig, store: films.Store | None = None
) -> ray.data.Dataset:
    """Rows of decoded images and their label: a class index, or for multi-label a
    float32 0/1 vector in ``class_names`` (finding) order; read from ``store`` (films
    decoded once, ``meddx prepare``) where given."""
    if cfg.findings:
        rows = [{"image_uri": u, "label": np.asarray(t, dtype=np.float32)} for u, t in items]
    else:
        index = {c: i for i, c in enumerate(class_names)}
        rows = [{"image_uri": u, "label": index[lbl]} for u, lbl in items]
    blocks = cluster.read_blocks(len(rows), sum(shards.is_shard(u) for u, _ in items))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    decode = DecodeSettings(
        size=cfg.image_size,
        modalities=cfg.modalities or None,
        views=cfg.views or None,
        rules=load_rules(cfg.rules, cfg.storage) if cfg.rules else DEFAULT_RULES,
    )
    read, kwargs = read_objects, {}
    if store is not None:
        uris = pa.table({"image_uri": pa.array([u for u, _ in items], pa.string())})
        located = films.locate(store.uri, cfg.storage, uris)["store_files"].to_pylist()
        for row, files in zip(rows, located, strict=True):
            row["store_files"] = files
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
        read, kwargs = films.read_films, {"store": store.uri}
    ds = ds.map_batches(
        read, fn_kwargs={"settings": cfg.storage, "decode": decode, **kwargs}, batch_size=None
    )
    # Unreadable training images cannot teach anything, nor can views the model is not
    # for; scoring is where every input counts.
    # An expression, not a Python function: Ray Data evaluates it on Arrow blocks (and
    # does not warn that a function filter is slow).
    keep = (col("status") == "ok") & (col("qc") != QC_WRONG_VIEW)
    return ds.filter(expr=keep).select_columns(["image", "label"])


@dataclass(frozen=True)
class TrainSummary:
    checkpoint: str
    sha256: str
    metrics: dict
    seconds: float
    n_train: int
    n_val: int
    last: dict = field(default_factory=dict)  # the last epoch's metrics
    optimized: str = ""  # train --optimize: what became of the int8 model, in one line
    # ... and the check behind that line, held or refused (None without --optimize)
    optimize_result: object = None


def finding_weights(items, train_items, findings: list[str]) -> list[float]:
    """BCE pos_weight per finding: negatives / positives in the training split, so a rare
    finding's positives weigh as much as its negatives."""
    if not items:
        raise MeddxError("no image has a value for every finding")
    truth = np.array([t for _, t in items], dtype=int)
    for k, name in enumerate(findings):
        if truth[:, k].min() == truth[:, k].max():
            raise MeddxError(f"finding {name!r} needs positive and negative images")
    train = np.array([t for _, t in train_items], dtype=int)
    positives = train.sum(axis=0)
    return ((len(train) - positives) / np.maximum(positives, 1)).tolist()


def validation_images(ckpt: Checkpoint, val: ray.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """The validation split's uint8 images and truth: 0/1 for the positive class, or
    per finding (multi-label)."""
    images, labels = [], []
    for batch in val.iter_batches(batch_size=None, batch_format="numpy"):
        images.append(batch["image"])
        labels.append(batch["label"])
    if not images:
        return np.zeros((0, ckpt.input_size, ckpt.input_size), np.uint8), np.zeros(0)
    truth = np.concatenate(labels)
    if not ckpt.multi_label:
        truth = (truth == ckpt.positive_index).astype(np.float32)
    return np.concatenate(images), truth


def fit_ood(ckpt: Checkpoint, train_items, class_names, cfg: TrainConfig, val_images, store=None):
    """The checkpoint with its out-of-distribution density (ood.py): fitted to the
    training split's features (a sample of at most ood.MAX_FIT_IMAGES), its threshold
    set on the validation split's."""
    sample = list(train_items)
    if len(sample) > ood.MAX_FIT_IMAGES:
        sample = random.Random(cfg.seed).sample(sample, ood.MAX_FIT_IMAGES)
    labels = []

    def images():
        for batch in labelled_dataset(sample, class_names, cfg, store).iter_batches(
            batch_size=FEATURE_BATCH * 4, batch_format="numpy"
        ):
            labels.append(batch["label"])
            yield batch["image"]

    features = features_of(ckpt, images())
    if not len(features):
        return ckpt
    groups = ood.groups_of(ckpt, np.concatenate(labels))
    return ood.with_density(ckpt, features, groups, features_of(ckpt, [val_images]))


def pin_precision(ckpt: Checkpoint, images: np.ndarray, truth: np.ndarray) -> Checkpoint:
    """Score the validation set in fp32 and bf16; a model whose scores or AUROC move
    more than precision.precision_check allows is pinned to fp32 (``auto`` obeys)."""
    if not len(images):
        return ckpt
    check = precision_check(ckpt, images, truth, "bf16")
    return ckpt.replace(
        precision=ckpt.precision if check["holds"] else "fp32",
        extra={**ckpt.extra, "precision_check": check},
    )


def run_storage(cfg: TrainConfig) -> dict:
    """Where Ray Train keeps per-epoch checkpoints (must be shared storage on multi-node)."""
    path = cfg.storage_path or os.path.expanduser("~/ray_results")
    if storage.is_s3(path):
        return {
            "storage_path": storage.strip_scheme(path),
            "storage_filesystem": storage.arrow_filesystem(path, cfg.storage),
        }
    return {"storage_path": storage.strip_scheme(path)}


# The share of Ray's object store that a run's decoded images may hold for the whole run.
HELD_SHARE = 0.25


def held(ds: ray.data.Dataset, images: int, cfg: TrainConfig) -> ray.data.Dataset:
    """``ds`` read and decoded once, its model-size images held in Ray's object store for
    every epoch, where they fit in HELD_SHARE of it (uint8, 50 KB a film at 224 px: about
    10^5 films in 20 GB); else streamed again each epoch."""
    room = ray.cluster_resources().get("object_store_memory", 0) * HELD_SHARE
    if images * cfg.image_size**2 > room:
        return ds
    return ds.materialize()


def training_store(cfg: TrainConfig) -> films.Store | None:
    """The store the images are read from: ``--store`` (DATA's new and changed images
    decoded into it first), DATA itself when it is one, else None."""
    key = secret.pseudonym_key()
    if cfg.store:
        from meddx.pipelines.prepare import write_through

        write_through(cfg.data, cfg.store, cfg.storage, quiet=cfg.quiet)
        return films.open_store(cfg.store, cfg.storage, cfg.image_size, key)
    store = films.open_store(cfg.data, cfg.storage, cfg.image_size, key)
    if store is not None and cfg.findings:
        raise MeddxError(
            "multi-label training reads its findings from a manifest: give it as DATA and "
            "the store as --store"
        )
    return store


def train(cfg: TrainConfig) -> TrainSummary:
    """``meddx train``: its metrics published at its end, whatever the end
    (``--metrics-file``, ``--pushgateway``). Its audit records go beside the checkpoint,
    under its folder's ``_audit/`` (meddx.store.audit)."""
    logged = audit.recorded(
        audit.beside(cfg.out), cfg.storage, "train", cfg.data, audit.new_run_id()
    )
    with logged, metrics.recorded("train", cfg.metrics_file, cfg.pushgateway) as record:
        logged.begin_training(cfg.model)
        summary = fit(cfg)
        record.trained(summary)
        logged.trained(cfg.model, summary.sha256, summary.n_train + summary.n_val)
        return summary


def fit(cfg: TrainConfig) -> TrainSummary:
    """The labelled inputs listed and split, DDP training, the best epoch as the
    checkpoint file (with its OOD density, precision check and optional int8 model)."""
    start = time.perf_counter()
    store = training_store(cfg)
    if cfg.findings:
        class_names, positive_class = list(cfg.findings), ABNORMAL
        items = listing.labelled_findings(cfg.data, cfg.storage, class_names)
        train_items, val_items = split(items, cfg.val_fraction, cfg.seed)
        class_weights = finding_weights(items, train_items, class_names)
    else:
        if store is not None and store.uri == cfg.data:  # the sources' class folders
            names = films.located(store.uri, cfg.storage)["image_uri"].to_pylist()
            items = [(uri, listing.label_from_path(uri)) for uri in names]
        else:
            items = listing.labelled_inputs(cfg.data, cfg.storage)
        class_names = sorted({label for _, label in items})
        if len(class_names) < 2:
            raise MeddxError(f"training needs at least two classes, found {class_names}")
        positive_class = positive_class_of(class_names)
        train_items, val_items = split(items, cfg.val_fraction, cfg.seed)
        counts = np.array([sum(lbl == c for _, lbl in train_items) for c in class_names])
        # Inverse-frequency class weights: a rare finding costs as much as the common normal.
        class_weights = (counts.sum() / (len(class_names) * np.maximum(counts, 1))).tolist()

    resolved = {k: v for k, v in asdict(cfg).items() if k != "storage"}
    init = None
    if cfg.init_weights:  # read and fitted before Ray starts: a wrong file costs nothing
        state, sha = registry.read_state_dict(cfg.init_weights, cfg.storage)
        resolved["init_weights_sha256"] = sha
        torch.manual_seed(cfg.seed)  # the new classifier's initial weights
        init = registry.fit_state_dict(
            state, cfg.model, len(class_names), cfg.init_weights, keep_head=False
        ).state_dict()
    if cfg.optimize:
        from meddx.model.engine import available

        if not available():
            raise MeddxError("--optimize needs OpenVINO and NNCF: pip install 'meddx[openvino]'")
    cluster.init_ray(dashboard=True, quiet_libraries=True)
    if cfg.use_gpu and not ray.cluster_resources().get("GPU"):
        raise MeddxError("--use-gpu asked for, but this Ray cluster has no GPUs")
    resources = cluster.training_worker_resources(
        cfg.workers, cfg.use_gpu, ray.cluster_resources().get("CPU", 1)
    )
    job = TrainJob(
        cfg=cfg,
        class_names=tuple(class_names),
        positive_class=positive_class,
        class_weights=tuple(class_weights),
        n_train=len(train_items),
        train_config=resolved,
        init_weights=None if init is None else ray.put(init),
    )
    train_ds = held(labelled_dataset(train_items, class_names, cfg, store), len(train_items), cfg)
    val_ds = held(labelled_dataset(val_items, class_names, cfg, store), len(val_items), cfg)
    trainer = ray.train.torch.TorchTrainer(
        functools.partial(train_loop_per_worker, job),
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        datasets={"train": train_ds, "val": val_ds},
        # Validation runs whole on rank 0; only the training set is sharded across workers.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(
            name=cfg.run_name or f"meddx-train-{time.strftime('%Y%m%d-%H%M%S')}",
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            # Ray Train's INFO lines (worker group, process group, DDP, each checkpoint)
            # stay in its log files; meddx logs a line per epoch (train_worker.py).
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=[FailureLines()],
            **run_storage(cfg),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=CHECKPOINTS_KEPT,
                checkpoint_score_attribute="val_auroc_rank",
                checkpoint_score_order="max",
            ),
        ),
    )
    result = trainer.fit()
    best = result.get_best_checkpoint(metric="val_auroc_rank", mode="max")
    if best is None:
        raise MeddxError("training finished without a checkpoint")
    with best.as_directory() as folder:
        ckpt = read_epoch_checkpoint(folder)
    images, truth = validation_images(ckpt, val_ds)
    ckpt = fit_ood(ckpt, train_items, class_names, cfg, images, store)
    doubt = ood.untrusted(ckpt)
    if doubt:  # said here, and kept in the checkpoint (its density's "trusted": false)
        log.warning("meddx train: %s; train on more films, or calibrate on more", doubt)
    ckpt = pin_precision(ckpt, images, truth)
    if cfg.rules:  # what it was trained under, applied when it scores
        rules = load_rules(cfg.rules, cfg.storage).as_data()
        ckpt = ckpt.replace(extra={**ckpt.extra, "rules": rules})
    optimized, optimize_result = "", None
    if cfg.optimize:
        ckpt, optimized, optimize_result = with_optimized(ckpt, images, truth)
    storage.write_bytes(cfg.out, registry.checkpoint_bytes(ckpt), cfg.storage)
    ckpt, sha = registry.read_checkpoint(cfg.out, cfg.storage)  # proves it loads safely
    return TrainSummary(
        checkpoint=cfg.out,
        sha256=sha,
        metrics=ckpt.metrics,
        seconds=time.perf_counter() - start,
        n_train=len(train_items),
        n_val=len(val_items),
        last=dict(result.metrics or {}),
        optimized=optimized,
        optimize_result=optimize_result,
    )


def with_optimized(ckpt: Checkpoint, images: np.ndarray, truth: np.ndarray) -> tuple:
    """``train --optimize``: the checkpoint with its int8 OpenVINO model when that holds
    its check on the validation split, a line saying which, and the check (None when no
    candidate was checked). A model that fails the check is still a trained model: it is
    written without the artefact."""
    from meddx.model import engine, optimize

    if not engine.available():
        raise MeddxError("--optimize needs OpenVINO and NNCF: pip install 'meddx[openvino]'")
    try:
        ckpt, result = optimize.with_artefact(ckpt, images, truth, source="the validation split")
    except optimize.GateRefused as exc:
        return ckpt, f"not optimized: {exc}", exc.result
    except MeddxError as exc:
        return ckpt, f"not optimized: {exc}", None
    return ckpt, f"optimized: {optimize.describe(result)}", result
