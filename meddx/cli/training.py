"""``meddx train``: a classifier trained with Ray Train (PyTorch DDP)."""

from __future__ import annotations

import math

import click

from meddx import names
from meddx.cli.options import (
    build,
    findings_option,
    metrics_file_option,
    option,
    options,
    parsed,
    pushgateway_option,
    storage_option,
)
from meddx.config import TrainConfig

TRAIN_OPTIONS = [
    click.option(
        "--out", required=True, metavar="CKPT", help="Checkpoint file to write (local or s3://)."
    ),
    option(TrainConfig, "model", type=click.Choice(names.MODEL_NAMES)),
    option(TrainConfig, "epochs"),
    option(TrainConfig, "workers", help="DDP workers."),
    option(TrainConfig, "use_gpu", "--use-gpu/--no-use-gpu", show_default=True),
    option(TrainConfig, "batch_size", help="Per-worker batch size."),
    option(TrainConfig, "lr"),
    option(TrainConfig, "val_fraction"),
    option(TrainConfig, "image_size"),
    option(TrainConfig, "seed"),
    option(
        TrainConfig,
        "modalities",
        metavar="LIST",
        callback=parsed(names.parse_modalities),
        help="DICOM Modality values to train on and later accept when scoring, or 'any'.",
    ),
    option(
        TrainConfig,
        "views",
        metavar="LIST",
        callback=parsed(names.parse_views),
        help="DICOM ViewPosition values trained on; other views (a lateral) are "
        "qc=wrong_view when scoring, or 'any'.",
    ),
    option(
        TrainConfig,
        "rules",
        metavar="FILE",
        show_default=False,
        help="Selection rules (TOML or YAML; docs/rules.md) to train under; recorded in the "
        "checkpoint, which scoring then applies [default: FOR PROCESSING images and "
        "non-image SOP classes left out].",
    ),
    option(
        TrainConfig,
        "run_name",
        metavar="NAME",
        show_default=False,
        help="Ray Train run name; run again with the same name and --storage-path to continue "
        "a stopped run from its last epoch.",
    ),
    option(
        TrainConfig, "max_failures", help="Restarts from the last checkpoint after a worker dies."
    ),
    option(
        TrainConfig,
        "storage_path",
        metavar="URI",
        show_default=False,
        help="Ray Train run folder (shared storage such as s3:// on multi-node clusters).",
    ),
    findings_option(
        "Multi-label: the manifest's 0/1 finding columns to learn, e.g. "
        "opacity,effusion,nodule (one sigmoid output each)."
    ),
    option(
        TrainConfig,
        "progress_seconds",
        metavar="SECONDS",
        help="A progress line within each epoch this often (one per epoch always).",
    ),
    option(
        TrainConfig,
        "quiet",
        is_flag=True,
        help="No progress lines, within or after each epoch.",
    ),
    option(
        TrainConfig,
        "init_weights",
        metavar="FILE",
        show_default=False,
        help="Start from this state dict (torchvision's format, e.g. ImageNet weights you "
        "downloaded, or your own); its classifier is replaced to fit the classes.",
    ),
    option(
        TrainConfig,
        "optimize",
        is_flag=True,
        help="Also make the int8 OpenVINO model for CPU nodes (as meddx optimize does), "
        "checked on the validation split; kept only when it holds.",
    ),
    click.option(
        "--store",
        default=None,
        metavar="STORE",
        help="Read the images from this store (meddx prepare) every epoch, decoding into "
        "it first those of DATA it lacks [default: decode DATA every epoch].",
    ),
    metrics_file_option,
    pushgateway_option,
    storage_option,
]


@click.command()
@click.argument("data")
@options(TRAIN_OPTIONS)
def train(data, **opts):
    """Train a classifier with Ray Train (PyTorch DDP) on the labelled archive DATA.

    DATA is a folder or s3:// prefix, or a .csv/.parquet manifest with uri and label
    columns. Labels come from the manifest (DATA/_manifest.csv when present), else from
    class folder names. DATA may be a store of films (meddx prepare), labelled by its
    sources' class folders; --store reads a store and takes the labels from DATA.
    With --findings, a multi-label model learns the manifest's 0/1 column for each
    finding.
    """
    cfg = build(TrainConfig, data=data, **opts)
    from meddx.pipelines.training import train as run

    summary = run(cfg)
    m = summary.metrics
    click.echo(
        f"trained {cfg.model} on {summary.n_train} images (validation {summary.n_val}) "
        f"in {summary.seconds:.1f}s; best epoch {int(m.get('epoch', 0))}: "
        f"val_auroc={m.get('val_auroc', math.nan):.4f} val_f1={m.get('val_f1', math.nan):.4f}; "
        f"last epoch train_images_per_s={summary.last.get('train_images_per_s', math.nan):.1f}"
    )
    for name in cfg.findings or ():
        click.echo(
            f"  {name}: val_auroc={m.get(f'val_auroc_{name}', math.nan):.4f} "
            f"threshold={m.get(f'val_threshold_{name}', math.nan):.4f}"
        )
    if summary.optimized:
        click.echo(summary.optimized)
    click.echo(f"checkpoint {summary.checkpoint} sha256={summary.sha256}")
