"""DDP training with Ray Train, fed by the same read/decode stages as scoring.

The driver lists the labelled inputs, splits them (stratified, seeded) into train and
validation sets, and hands both to a ``TorchTrainer`` as Ray Datasets. Each worker runs
``train_loop_per_worker``: plain ``train_one_epoch`` and ``validate`` calls, logging and
checkpointing from rank 0. The best epoch by validation AUROC becomes the checkpoint file.

With ``findings`` the model is multi-label (CheXNet's formulation): one logit per
finding, binary cross-entropy weighted per finding by its training prevalence, and per
finding a validation AUROC and a Youden threshold; the mean AUROC picks the best epoch.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.data.expressions import col
from sklearn.model_selection import train_test_split
from torch import nn

from meddx import MeddxError, one_line
from meddx.config import TrainConfig
from meddx.imaging.decode import DecodeSettings
from meddx.imaging.transforms import TrainAugment, to_model_input
from meddx.inputs import sources, storage
from meddx.inputs.sources import read_objects
from meddx.model import metrics, ood, registry
from meddx.model.inference import FEATURE_BATCH, features_of, precision_check, resolve_precision
from meddx.model.registry import Checkpoint
from meddx.names import ABNORMAL, DEFAULT_VIEWS, QC_WRONG_VIEW, positive_class_of
from meddx.pipelines import cluster

CHECKPOINT_FILE = "model.pt"
TRAIN_STATE_FILE = "train_state.pt"  # optimiser, schedule, epoch: what resuming needs
# AdamW's usual light decay for CNNs trained from scratch (torchvision's references use
# 1e-4 for ResNets): enough to curb overfitting on a few thousand films.
WEIGHT_DECAY = 1e-4
# Rows each worker shuffles among within its shard, on top of the split's own shuffle:
# 256 uint8 images at 224 px are 38 MB, and several batches deep.
SHUFFLE_BUFFER = 256
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


def labelled_dataset(items, class_names, cfg: TrainConfig) -> ray.data.Dataset:
    """Rows of decoded images and their label: a class index, or for multi-label a
    float32 0/1 vector in ``class_names`` (finding) order."""
    if cfg.findings:
        rows = [{"image_uri": u, "label": np.asarray(t, dtype=np.float32)} for u, t in items]
    else:
        index = {c: i for i, c in enumerate(class_names)}
        rows = [{"image_uri": u, "label": index[lbl]} for u, lbl in items]
    blocks = cluster.read_blocks(len(rows), sum(sources.is_shard(u) for u, _ in items))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    decode = DecodeSettings(
        size=cfg.image_size, modalities=cfg.modalities or None, views=cfg.views or None
    )
    ds = ds.map_batches(
        read_objects, fn_kwargs={"settings": cfg.storage, "decode": decode}, batch_size=None
    )
    # Unreadable training images cannot teach anything, nor can views the model is not
    # for; scoring is where every input counts.
    # An expression, not a Python function: Ray Data evaluates it on Arrow blocks (and
    # does not warn that a function filter is slow).
    keep = (col("status") == "ok") & (col("qc") != QC_WRONG_VIEW)
    return ds.filter(expr=keep).select_columns(["image", "label"])


# ---- per worker ----------------------------------------------------------------------


def train_one_epoch(
    model, loader, optimizer, loss_fn, augment, mean, std, device, amp_dtype=None, seen=None
) -> tuple[float, int]:
    """Mean training loss and the number of images this worker saw; ``seen(count)``
    hears the count after every batch."""
    model.train()
    total, count = 0.0, 0
    for batch in loader:
        x = to_model_input(augment(batch["image"].to(device)), mean, std)
        y = batch["label"].to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(y)
        count += len(y)
        if seen is not None:
            seen(count)
    return total / max(count, 1), count


def epoch_progress(epoch: int, config: dict, world: int):
    """Rank 0's line within an epoch every ``progress_seconds``: images of the epoch
    done by all workers (DDP steps in lockstep) and the rate."""
    start = last = time.perf_counter()

    def seen(count: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if not config.get("quiet") and now - last >= config["progress_seconds"]:
            last = now
            done = count * world
            print(
                f"[meddx train] epoch {epoch}/{config['epochs']}: "
                f"{min(done, config['n_train']):,}/{config['n_train']:,} images, "
                f"{done / (now - start):.1f} images/s",
                flush=True,
            )

    return seen


@torch.no_grad()
def validate(model, loader, loss_fn, mean, std, device, multi_label: bool = False):
    """Loss, and probabilities with their labels, over one full pass: softmax over the
    classes, or for multi-label one sigmoid per finding."""
    model.eval()
    probs, labels, total = [], [], 0.0
    for batch in loader:
        x = to_model_input(batch["image"].to(device), mean, std)
        y = batch["label"].to(device)
        logits = model(x)
        total += loss_fn(logits, y).item() * len(y)
        p = torch.sigmoid(logits.float()) if multi_label else torch.softmax(logits.float(), 1)
        probs.append(p.cpu())
        labels.append(y.cpu())
    probs_t, labels_t = torch.cat(probs), torch.cat(labels)
    return total / max(len(labels_t), 1), probs_t.numpy(), labels_t.numpy()


def validation_report(probs, labels, class_names, positive) -> tuple[dict, list[float]]:
    """Validation figures for the epoch report, and the threshold(s) for the checkpoint.

    Single-label: metrics of the positive class at its Youden threshold. Multi-label
    (``positive`` is None, ``labels`` 0/1 per finding): each finding at its own Youden
    threshold; the headline figures are their means (AUROC over findings where it is
    defined), and ``val_auroc_NAME``/``val_threshold_NAME`` give each finding.
    """
    keys = ("accuracy", "precision", "recall", "f1", "auroc")
    if positive is not None:
        truth, scores = labels == positive, probs[:, positive]
        threshold = metrics.youden_threshold(truth, scores)
        m = metrics.binary_metrics(truth, scores, threshold)
        return {"val_threshold": threshold, **{f"val_{k}": m[k] for k in keys}}, [threshold]
    report, thresholds, per_finding = {}, [], []
    for k, name in enumerate(class_names):
        threshold = metrics.youden_threshold(labels[:, k], probs[:, k])
        m = metrics.binary_metrics(labels[:, k], probs[:, k], threshold)
        report[f"val_auroc_{name}"] = m["auroc"]
        report[f"val_threshold_{name}"] = threshold
        thresholds.append(threshold)
        per_finding.append(m)
    for key in keys:
        values = [m[key] for m in per_finding if not math.isnan(m[key])]
        report[f"val_{key}"] = float(np.mean(values)) if values else math.nan
    report["val_threshold"] = min(thresholds)
    return report, thresholds


def load_train_state(checkpoint) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        ckpt = read_epoch_checkpoint(folder)
        state = torch.load(os.path.join(folder, TRAIN_STATE_FILE), weights_only=True)
    return {**state, "state_dict": ckpt.state_dict}


def read_epoch_checkpoint(folder: str) -> Checkpoint:
    """The model checkpoint of one epoch, from its Ray Train checkpoint folder."""
    with open(os.path.join(folder, CHECKPOINT_FILE), "rb") as fh:
        return Checkpoint.from_dict(registry.load_checkpoint_dict(fh.read(), CHECKPOINT_FILE))


def train_loop_per_worker(config: dict) -> None:
    # Ray Train has just set this worker's root logger to INFO, and its own report of
    # each epoch ("Reporting training result ...") is logged there: meddx prints its own.
    cluster.quiet_worker_logs()
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(config["seed"] + rank)
    # Threads from the node this worker runs on (nodes of a cluster differ), shared
    # with the other workers Ray placed there; a GPU worker's CPU only feeds the GPU.
    threads = 1 if config["use_gpu"] else cluster.threads_per_worker(ctx.get_local_world_size())
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()

    class_names = config["class_names"]
    multi_label = config["multi_label"]
    positive = None if multi_label else class_names.index(config["positive_class"])
    net = registry.build_model(config["model"], len(class_names)).to(
        memory_format=torch.channels_last
    )
    # A restarted worker group (a worker died) or a re-run with the same --run-name
    # continues from the latest checkpoint: weights, optimiser, schedule and epoch.
    resume = load_train_state(ray.train.get_checkpoint())
    if resume:
        net.load_state_dict(resume["state_dict"])
    elif config["init_weights"] is not None:  # checked against the model on the driver
        net.load_state_dict(ray.get(config["init_weights"]))
    model = ray.train.torch.prepare_model(net)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config["epochs"])
    start_epoch = 0
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        start_epoch = int(resume["epoch"])
        if rank == 0:
            print(f"[meddx train] resuming after epoch {start_epoch}", flush=True)
    weights = torch.tensor(config["class_weights"], device=device)
    # Multi-label: per finding, positives weigh negatives/positives (its pos_weight).
    loss_fn = (
        nn.BCEWithLogitsLoss(pos_weight=weights)
        if multi_label
        else nn.CrossEntropyLoss(weight=weights)
    )
    mean = torch.tensor(registry.IMAGENET_MEAN, device=device)
    std = torch.tensor(registry.IMAGENET_STD, device=device)
    augment = TrainAugment()
    # Where scoring's "auto" takes bf16, training does too (bf16 needs no loss scaling);
    # fp16 (older GPUs) would, so training stays in fp32 there.
    amp_dtype = resolve_precision("auto", device)
    amp_dtype = amp_dtype if amp_dtype is torch.bfloat16 else None
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    batch_kwargs = {
        "batch_size": config["batch_size"],
        "dtypes": {"image": torch.uint8, "label": torch.float32 if multi_label else torch.int64},
    }

    for epoch in range(start_epoch, config["epochs"]):
        start = time.perf_counter()
        train_loss, seen = train_one_epoch(
            model,
            train_shard.iter_torch_batches(
                **batch_kwargs, local_shuffle_buffer_size=SHUFFLE_BUFFER
            ),
            optimizer,
            loss_fn,
            augment,
            mean,
            std,
            device,
            amp_dtype,
            epoch_progress(epoch + 1, config, ctx.get_world_size()) if rank == 0 else None,
        )
        # DDP steps in lockstep: this worker's rate times the number of workers.
        images_per_s = seen * ctx.get_world_size() / (time.perf_counter() - start)
        scheduler.step()  # per epoch: cosine from lr to 0 over the run
        report = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_images_per_s": images_per_s,
            "resumed_from_epoch": start_epoch,
        }
        checkpoint = None
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                # Validation on rank 0 over the whole (unsplit) validation set, unwrapped
                # from DDP so the other ranks need not join its collectives.
                val_loss, probs, labels = validate(
                    net,
                    val_shard.iter_torch_batches(**batch_kwargs),
                    loss_fn,
                    mean,
                    std,
                    device,
                    multi_label,
                )
                figures, thresholds = validation_report(probs, labels, class_names, positive)
                report.update(val_loss=val_loss, **figures)
                # A NaN AUROC (one-class validation set) must not win checkpoint ranking.
                auroc = figures["val_auroc"]
                report["val_auroc_rank"] = -1.0 if math.isnan(auroc) else auroc
                per_finding = "".join(
                    f" auroc_{name}={figures[f'val_auroc_{name}']:.3f}"
                    for name in (class_names if multi_label else [])
                )
                if not config.get("quiet"):
                    print(
                        f"[meddx train] epoch {epoch + 1}/{config['epochs']} "
                        f"train_loss={train_loss:.4f} val_loss={val_loss:.4f} "
                        f"acc={figures['val_accuracy']:.3f} prec={figures['val_precision']:.3f} "
                        f"rec={figures['val_recall']:.3f} f1={figures['val_f1']:.3f} "
                        f"auroc={auroc:.3f}{per_finding} "
                        f"threshold={figures['val_threshold']:.3f} "
                        f"train_images_per_s={images_per_s:.1f} "
                        f"({time.perf_counter() - start:.1f}s)",
                        flush=True,
                    )
                ckpt = registry.make_checkpoint(
                    net,
                    model_name=config["model"],
                    class_names=class_names,
                    positive_class=config["positive_class"],
                    threshold=figures["val_threshold"],
                    thresholds=thresholds if multi_label else None,
                    modalities=config["modalities"],
                    views=config.get("views", DEFAULT_VIEWS),
                    input_size=config["image_size"],
                    train_config=config["resolved"],
                    metrics={k: v for k, v in report.items() if k != "val_auroc_rank"},
                )
                with open(os.path.join(tmp, CHECKPOINT_FILE), "wb") as fh:
                    fh.write(registry.checkpoint_bytes(ckpt))
                torch.save(
                    {
                        "epoch": epoch + 1,
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                    },
                    os.path.join(tmp, TRAIN_STATE_FILE),
                )
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            else:
                report["val_auroc_rank"] = -1.0
            ray.train.report(report, checkpoint=checkpoint)


# ---- driver ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSummary:
    checkpoint: str
    sha256: str
    metrics: dict
    seconds: float
    n_train: int
    n_val: int
    last: dict = field(default_factory=dict)  # the last epoch's report
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


def fit_ood(ckpt: Checkpoint, train_items, class_names, cfg: TrainConfig, val_images):
    """The checkpoint with its out-of-distribution density (ood.py): fitted to the
    training split's features (a sample of at most ood.MAX_FIT_IMAGES), its threshold
    set on the validation split's."""
    sample = list(train_items)
    if len(sample) > ood.MAX_FIT_IMAGES:
        sample = random.Random(cfg.seed).sample(sample, ood.MAX_FIT_IMAGES)
    labels = []

    def images():
        for batch in labelled_dataset(sample, class_names, cfg).iter_batches(
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
    more than predict.precision_check allows is pinned to fp32 (``auto`` obeys)."""
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


class FailureLines(ray.train.UserCallback):
    """A line on the console for each worker that failed, before Ray Train restarts the
    group from the last checkpoint (``--max-failures``) or gives up. Ray Train's own
    account of the retry is an INFO line, which stays in its log files."""

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        for rank, error in sorted(worker_exceptions.items()):
            print(f"[meddx train] worker {rank} failed: {one_line(error)}", flush=True)


def train(cfg: TrainConfig) -> TrainSummary:
    start = time.perf_counter()
    if cfg.findings:
        class_names, positive_class = list(cfg.findings), ABNORMAL
        items = sources.labelled_findings(cfg.data, cfg.storage, class_names)
        train_items, val_items = split(items, cfg.val_fraction, cfg.seed)
        class_weights = finding_weights(items, train_items, class_names)
    else:
        items = sources.labelled_inputs(cfg.data, cfg.storage)
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
        from meddx.model.optimize import available

        if not available():
            raise MeddxError("--optimize needs OpenVINO and NNCF: pip install 'meddx[openvino]'")
    cluster.init_ray(dashboard=True, quiet_libraries=True)
    if cfg.use_gpu and not ray.cluster_resources().get("GPU"):
        raise MeddxError("--use-gpu asked for, but this Ray cluster has no GPUs")
    resources = cluster.training_worker_resources(cfg.workers, cfg.use_gpu)
    # Ray Train sends a worker's print() through its logger as well as to stdout, so each
    # progress line reached the driver twice; Train passes this on to its workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "model": cfg.model,
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "seed": cfg.seed,
            "image_size": cfg.image_size,
            "use_gpu": cfg.use_gpu,
            "class_names": class_names,
            "positive_class": positive_class,
            "multi_label": bool(cfg.findings),
            "class_weights": class_weights,
            "resolved": resolved,
            "modalities": list(cfg.modalities or []),
            "views": list(cfg.views or []),
            "init_weights": None if init is None else ray.put(init),
            "n_train": len(train_items),
            "progress_seconds": cfg.progress_seconds,
            "quiet": cfg.quiet,
        },
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        datasets={
            "train": labelled_dataset(train_items, class_names, cfg),
            "val": labelled_dataset(val_items, class_names, cfg),
        },
        # Validation runs whole on rank 0; only the training set is sharded across workers.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(
            name=cfg.run_name or f"meddx-train-{time.strftime('%Y%m%d-%H%M%S')}",
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            # Ray Train's INFO lines (worker group, process group, DDP, each checkpoint)
            # stay in its log files; meddx prints a line per epoch.
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
    images, truth = validation_images(ckpt, labelled_dataset(val_items, class_names, cfg))
    ckpt = fit_ood(ckpt, train_items, class_names, cfg, images)
    ckpt = pin_precision(ckpt, images, truth)
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
    from meddx.model import optimize

    if not optimize.available():
        raise MeddxError("--optimize needs OpenVINO and NNCF: pip install 'meddx[openvino]'")
    try:
        ckpt, result = optimize.with_artefact(ckpt, images, truth, source="the validation split")
    except optimize.GateRefused as exc:
        return ckpt, f"not optimized: {exc}", exc.result
    except MeddxError as exc:
        return ckpt, f"not optimized: {exc}", None
    return ckpt, f"optimized: {optimize.describe(result)}", result
