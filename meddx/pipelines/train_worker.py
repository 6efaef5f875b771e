"""What runs inside Ray Train's processes: each DDP worker's loop, and the controller's
line for a worker that failed.

Each worker runs ``train_loop_per_worker(job)``: plain ``train_one_epoch`` and
``validate`` calls, validation and checkpointing on rank 0, one ``ray.train.report`` of
the epoch's metrics (with rank 0's checkpoint) per epoch. ``job`` is frozen: the
command's TrainConfig and what the driver learnt of the data before it started them.

Their lines ("[meddx train] ...") go to the process's stdout, which Ray brings to the
driver's console (``log_to_driver``) and keeps in the session's log files: a worker has
no command line to set up logging for it, so this module gives its own logger a handler.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

from meddx import one_line
from meddx.config import TrainConfig
from meddx.imaging.transforms import TrainAugment, to_model_input
from meddx.model import metrics, registry
from meddx.model.forward import probs_from_logits
from meddx.model.precision import resolve_precision
from meddx.model.registry import Checkpoint
from meddx.pipelines import cluster

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.pt"
TRAIN_STATE_FILE = "train_state.pt"  # optimiser, schedule, epoch: what resuming needs
# AdamW's usual light decay for CNNs trained from scratch (torchvision's references use
# 1e-4 for ResNets): enough to curb overfitting on a few thousand films.
WEIGHT_DECAY = 1e-4
# Rows each worker shuffles among within its shard, on top of the split's own shuffle:
# 256 uint8 images at 224 px are 38 MB, and several batches deep.
SHUFFLE_BUFFER = 256


@dataclass(frozen=True)
class TrainJob:
    """What every DDP worker trains by: the command's frozen config, and what the driver
    learnt of the data before starting them."""

    cfg: TrainConfig
    class_names: tuple[str, ...]
    positive_class: str
    # Single-label: a weight per class (CrossEntropyLoss); multi-label: per finding, the
    # weight of its positives (BCEWithLogitsLoss's pos_weight).
    class_weights: tuple[float, ...]
    n_train: int  # training images, all workers together
    train_config: dict  # the resolved configuration the checkpoint records
    init_weights: ray.ObjectRef | None = None  # a state dict fitted to the model, or None

    @property
    def multi_label(self) -> bool:
        return bool(self.cfg.findings)


class _Stdout(logging.StreamHandler):
    """Writes each line to ``sys.stdout`` as it is then (Ray's worker streams, a test's
    capture), not as it was when the handler was made."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def console_lines() -> None:
    """This module's lines, plain, to stdout at INFO and nowhere else (no second copy
    through Ray Train's root logger); once per process."""
    if not any(isinstance(h, _Stdout) for h in log.handlers):
        log.addHandler(_Stdout())
        log.setLevel(logging.INFO)
        log.propagate = False


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


def epoch_progress(epoch: int, job: TrainJob, world: int):
    """Rank 0's line within an epoch every ``progress_seconds``: images of the epoch
    done by all workers (DDP steps in lockstep) and the rate."""
    start = last = time.perf_counter()
    cfg, n_train = job.cfg, job.n_train

    def seen(count: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if not cfg.quiet and now - last >= cfg.progress_seconds:
            last = now
            done = count * world
            log.info(
                "[meddx train] epoch %d/%d: %s/%s images, %.1f images/s",
                epoch,
                cfg.epochs,
                f"{min(done, n_train):,}",
                f"{n_train:,}",
                done / (now - start),
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
        probs.append(probs_from_logits(logits.float().cpu().numpy(), multi_label))
        labels.append(y.cpu())
    labels_t = torch.cat(labels)
    return total / max(len(labels_t), 1), np.concatenate(probs), labels_t.numpy()


def validation_metrics(probs, labels, class_names, positive) -> tuple[dict, list[float]]:
    """Validation figures for the epoch's metrics, and the threshold(s) for the checkpoint.

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
    figures, thresholds, per_finding = {}, [], []
    for k, name in enumerate(class_names):
        threshold = metrics.youden_threshold(labels[:, k], probs[:, k])
        m = metrics.binary_metrics(labels[:, k], probs[:, k], threshold)
        figures[f"val_auroc_{name}"] = m["auroc"]
        figures[f"val_threshold_{name}"] = threshold
        thresholds.append(threshold)
        per_finding.append(m)
    for key in keys:
        values = [m[key] for m in per_finding if not math.isnan(m[key])]
        figures[f"val_{key}"] = float(np.mean(values)) if values else math.nan
    figures["val_threshold"] = min(thresholds)
    return figures, thresholds


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


def train_loop_per_worker(job: TrainJob) -> None:
    # Ray Train has just set this worker's root logger to INFO, and its own report of
    # each epoch ("Reporting training result ...") is logged there: meddx has its own.
    cluster.quiet_worker_logs()
    console_lines()
    cfg = job.cfg
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(cfg.seed + rank)
    # Threads from the node this worker runs on (nodes of a cluster differ), shared
    # with the other workers Ray placed there; a GPU worker's CPU only feeds the GPU.
    threads = 1 if cfg.use_gpu else cluster.threads_per_worker(ctx.get_local_world_size())
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()

    class_names = list(job.class_names)
    positive = None if job.multi_label else class_names.index(job.positive_class)
    net = registry.build_model(cfg.model, len(class_names)).to(memory_format=torch.channels_last)
    # A restarted worker group (a worker died) or a re-run with the same --run-name
    # continues from the latest checkpoint: weights, optimiser, schedule and epoch.
    resume = load_train_state(ray.train.get_checkpoint())
    if resume:
        net.load_state_dict(resume["state_dict"])
    elif job.init_weights is not None:  # checked against the model on the driver
        net.load_state_dict(ray.get(job.init_weights))
    model = ray.train.torch.prepare_model(net)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    start_epoch = 0
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        start_epoch = int(resume["epoch"])
        if rank == 0:
            log.info("[meddx train] resuming after epoch %d", start_epoch)
    weights = torch.tensor(job.class_weights, device=device)
    # Multi-label: per finding, positives weigh negatives/positives (its pos_weight).
    loss_fn = (
        nn.BCEWithLogitsLoss(pos_weight=weights)
        if job.multi_label
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
    label_dtype = torch.float32 if job.multi_label else torch.int64
    batch_kwargs = {
        "batch_size": cfg.batch_size,
        "dtypes": {"image": torch.uint8, "label": label_dtype},
    }

    for epoch in range(start_epoch, cfg.epochs):
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
            epoch_progress(epoch + 1, job, ctx.get_world_size()) if rank == 0 else None,
        )
        # DDP steps in lockstep: this worker's rate times the number of workers.
        images_per_s = seen * ctx.get_world_size() / (time.perf_counter() - start)
        scheduler.step()  # per epoch: cosine from lr to 0 over the run
        epoch_metrics = {
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
                    job.multi_label,
                )
                figures, thresholds = validation_metrics(probs, labels, class_names, positive)
                epoch_metrics.update(val_loss=val_loss, **figures)
                # A NaN AUROC (one-class validation set) must not win checkpoint ranking.
                auroc = figures["val_auroc"]
                epoch_metrics["val_auroc_rank"] = -1.0 if math.isnan(auroc) else auroc
                per_finding = "".join(
                    f" auroc_{name}={figures[f'val_auroc_{name}']:.3f}"
                    for name in (class_names if job.multi_label else [])
                )
                if not cfg.quiet:
                    log.info(
                        "[meddx train] epoch %d/%d train_loss=%.4f val_loss=%.4f acc=%.3f "
                        "prec=%.3f rec=%.3f f1=%.3f auroc=%.3f%s threshold=%.3f "
                        "train_images_per_s=%.1f (%.1fs)",
                        epoch + 1,
                        cfg.epochs,
                        train_loss,
                        val_loss,
                        figures["val_accuracy"],
                        figures["val_precision"],
                        figures["val_recall"],
                        figures["val_f1"],
                        auroc,
                        per_finding,
                        figures["val_threshold"],
                        images_per_s,
                        time.perf_counter() - start,
                    )
                ckpt = registry.make_checkpoint(
                    net,
                    model_name=cfg.model,
                    class_names=class_names,
                    positive_class=job.positive_class,
                    threshold=figures["val_threshold"],
                    thresholds=thresholds if job.multi_label else None,
                    modalities=list(cfg.modalities or ()),
                    views=list(cfg.views or ()),
                    input_size=cfg.image_size,
                    train_config=job.train_config,
                    metrics={k: v for k, v in epoch_metrics.items() if k != "val_auroc_rank"},
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
                epoch_metrics["val_auroc_rank"] = -1.0
            ray.train.report(epoch_metrics, checkpoint=checkpoint)


class FailureLines(ray.train.UserCallback):
    """A line on the console for each worker that failed, before Ray Train restarts the
    group from the last checkpoint (``--max-failures``) or gives up. Ray Train's own
    account of the retry is an INFO line, which stays in its log files."""

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        console_lines()  # this runs in Ray Train's controller
        for rank, error in sorted(worker_exceptions.items()):
            log.warning("[meddx train] worker %d failed: %s", rank, one_line(error))
