"""The ``meddx`` command line. Each command builds a frozen config and calls one function.

Options are declared once, named as the config fields they fill, with the defaults and
choices of ``meddx.config`` and ``meddx.names``; the limits on their values are the
configs' own checks. Nothing heavy (torch, Ray) is imported until a command runs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import NoReturn

import click

from meddx import MeddxAlarm, MeddxBusy, MeddxError, __version__, names
from meddx.config import ScoreConfig, ScreenConfig, SynthConfig, TrainConfig
from meddx.inputs.storage import StorageSettings


def default(config, name: str):
    """A config field's default, so ``--help`` shows what the library will use."""
    f = next(f for f in dataclasses.fields(config) if f.name == name)
    return f.default


def _storage(ctx, param, value) -> StorageSettings:
    return StorageSettings.from_env(value)


storage_option = click.option(
    "--s3-endpoint",
    "storage",
    envvar="MEDDX_S3_ENDPOINT",
    default=None,
    metavar="URL",
    callback=_storage,
    help="S3-compatible endpoint (MinIO, Ceph, ...); env MEDDX_S3_ENDPOINT. "
    "Credentials come from the standard AWS chain.",
)


def _parsed(parse):
    """A click callback from a parser of names.py: its refusal is a usage error."""

    def callback(ctx, param, value):
        try:
            return None if value is None else parse(value)
        except MeddxError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None

    return callback


def build(config, **fields):
    """The command's config. A value its checks refuse is a usage error (exit 2), as a
    value click refuses would be."""
    try:
        return config(**fields)
    except MeddxError as exc:
        raise click.UsageError(str(exc), ctx=click.get_current_context()) from None


def options(declared: list):
    """Apply a list of click options in the order they are listed."""

    def apply(command):
        for option in reversed(declared):
            command = option(command)
        return command

    return apply


def given(opts: dict) -> dict:
    """The options that were given a value: the others keep the config's default."""
    return {k: v for k, v in opts.items() if v is not None}


def _prevalences(text: str):
    from meddx.synthetic.chest import parse_prevalences  # synth's imports only when it runs

    return parse_prevalences(text)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meddx")
def cli():
    """Score and train CNNs on medical image archives (local or S3) with Ray."""


@cli.command()
@click.argument("out")
@click.option(
    "--n",
    "n",
    type=int,
    default=default(SynthConfig, "n"),
    show_default=True,
    help="Number of images.",
)
@click.option(
    "--size",
    default=str(default(SynthConfig, "size")),
    show_default=True,
    callback=_parsed(names.parse_film_size),
    help="Film size in pixels: a side (512) or WIDTHxHEIGHT (2400x2800).",
)
@click.option(
    "--format",
    type=click.Choice(names.SYNTH_FORMATS),
    default=default(SynthConfig, "format"),
    show_default=True,
)
@click.option(
    "--mix",
    is_flag=True,
    help="Draw each film's format from a realistic archive mix (DICOM transfer syntaxes, "
    "JPEG, 16-bit PNG, 1,024 px PNG) instead of --format.",
)
@click.option(
    "--positive-rate",
    type=float,
    default=default(SynthConfig, "positive_rate"),
    show_default=True,
    help="Fraction of images with an opacity.",
)
@click.option("--seed", type=int, default=default(SynthConfig, "seed"), show_default=True)
@click.option(
    "--findings",
    default=None,
    metavar="LIST",
    callback=_parsed(_prevalences),
    help="Multi-label: findings drawn independently, each NAME[=PREVALENCE] "
    "(opacity, effusion, nodule), or 'all'.",
)
@click.option(
    "--quality-set",
    is_flag=True,
    help="Write the quality-control evaluation set instead: --n held-out chest films and "
    "images that are not (lateral, inverted, rotated, blank, noise, text, photographs, "
    "pydicom's CT/MR/US/SC), its manifest marking which is which (meddx evaluate --labels).",
)
@storage_option
def synth(out, findings, quality_set, **opts):
    """Write a labelled synthetic chest-X-ray archive to OUT (folder or s3:// prefix).

    Layout: OUT/<normal|opacity>/cxr-NNNNNN.<ext> and OUT/_manifest.csv (uri,label).
    With --findings: OUT/<normal|abnormal>/... and a 0/1 manifest column per finding.
    """
    width, height = opts.pop("size")
    cfg = build(SynthConfig, out=out, findings=findings or (), size=width, height=height, **opts)
    if quality_set:
        from collections import Counter

        from meddx.synthetic.quality_set import write_quality_set

        if height not in (None, width) or cfg.mix or cfg.findings:
            raise click.UsageError("--quality-set takes a square --size and no --mix/--findings")
        rows = write_quality_set(out, cfg.n, cfg.size, cfg.seed, cfg.storage)
        kinds = Counter(r["category"] for r in rows)
        click.echo(
            f"wrote {len(rows)} images ("
            + ", ".join(f"{n} {k}" for k, n in kinds.items())
            + f") and {names.MANIFEST_NAME} to {out}"
        )
        return
    from meddx.synthetic.chest import write_archive

    rows = write_archive(cfg)
    if cfg.findings:
        from meddx.synthetic.chest import finding_labels

        counts = finding_labels(cfg.n, cfg.findings, cfg.seed).sum(axis=0)
        drawn = ", ".join(f"{c} {name}" for (name, _), c in zip(cfg.findings, counts, strict=True))
        click.echo(f"wrote {len(rows)} images ({drawn}) and {names.MANIFEST_NAME} to {out}")
        return
    positives = sum(label == names.SINGLE_LABEL_CLASSES[1] for _, label in rows)
    click.echo(
        f"wrote {len(rows)} images ({positives} {names.SINGLE_LABEL_CLASSES[1]}) and "
        f"{names.MANIFEST_NAME} to {out}"
    )


TRAIN_OPTIONS = [
    click.option(
        "--out", required=True, metavar="CKPT", help="Checkpoint file to write (local or s3://)."
    ),
    click.option(
        "--model",
        type=click.Choice(names.MODEL_NAMES),
        default=default(TrainConfig, "model"),
        show_default=True,
    ),
    click.option("--epochs", type=int, default=default(TrainConfig, "epochs"), show_default=True),
    click.option(
        "--workers",
        type=int,
        default=default(TrainConfig, "workers"),
        show_default=True,
        help="DDP workers.",
    ),
    click.option("--use-gpu/--no-use-gpu", default=False, show_default=True),
    click.option(
        "--batch-size",
        type=int,
        default=default(TrainConfig, "batch_size"),
        show_default=True,
        help="Per-worker batch size.",
    ),
    click.option("--lr", type=float, default=default(TrainConfig, "lr"), show_default=True),
    click.option(
        "--val-fraction",
        type=float,
        default=default(TrainConfig, "val_fraction"),
        show_default=True,
    ),
    click.option(
        "--image-size", type=int, default=default(TrainConfig, "image_size"), show_default=True
    ),
    click.option("--seed", type=int, default=default(TrainConfig, "seed"), show_default=True),
    click.option(
        "--modalities",
        default=",".join(names.DEFAULT_MODALITIES),
        show_default=True,
        metavar="LIST",
        callback=_parsed(names.parse_modalities),
        help="DICOM Modality values to train on and later accept when scoring, or 'any'.",
    ),
    click.option(
        "--views",
        default=",".join(names.DEFAULT_VIEWS),
        show_default=True,
        metavar="LIST",
        callback=_parsed(names.parse_views),
        help="DICOM ViewPosition values trained on; other views (a lateral) are "
        "qc=wrong_view when scoring, or 'any'.",
    ),
    click.option(
        "--run-name",
        default=None,
        metavar="NAME",
        help="Ray Train run name; run again with the same name and --storage-path to continue "
        "a stopped run from its last epoch.",
    ),
    click.option(
        "--max-failures",
        type=int,
        default=default(TrainConfig, "max_failures"),
        show_default=True,
        help="Restarts from the last checkpoint after a worker dies.",
    ),
    click.option(
        "--storage-path",
        default=None,
        metavar="URI",
        help="Ray Train run folder (shared storage such as s3:// on multi-node clusters).",
    ),
    click.option(
        "--findings",
        default=None,
        metavar="LIST",
        callback=_parsed(names.parse_finding_names),
        help="Multi-label: the manifest's 0/1 finding columns to learn, e.g. "
        "opacity,effusion,nodule (one sigmoid output each).",
    ),
    click.option(
        "--progress-seconds",
        type=float,
        default=default(TrainConfig, "progress_seconds"),
        show_default=True,
        metavar="SECONDS",
        help="A progress line within each epoch this often (one per epoch always).",
    ),
    click.option("--quiet", is_flag=True, help="No progress lines, within or after each epoch."),
    click.option(
        "--init-weights",
        default=None,
        metavar="FILE",
        help="Start from this state dict (torchvision's format, e.g. ImageNet weights you "
        "downloaded, or your own); its classifier is replaced to fit the classes.",
    ),
    click.option(
        "--optimize",
        is_flag=True,
        help="Also make the int8 OpenVINO model for CPU nodes (as meddx optimize does), "
        "checked on the validation split; kept only when it holds.",
    ),
    storage_option,
]


@cli.command()
@click.argument("data")
@options(TRAIN_OPTIONS)
def train(data, **opts):
    """Train a classifier with Ray Train (PyTorch DDP) on the labelled archive DATA.

    DATA is a folder or s3:// prefix, or a .csv/.parquet manifest with uri and label
    columns. Labels come from the manifest (DATA/_manifest.csv when present), else from
    class folder names. With --findings, a multi-label model learns the manifest's 0/1
    column for each finding.
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


MAX_OBJECT_BYTES_OPTION = click.option(
    "--max-object-bytes",
    type=click.IntRange(min=1),
    default=default(ScoreConfig, "max_object_bytes"),
    show_default=True,
    help="Refuse any object or tar member larger than this (read no further).",
)

SCORING_OPTIONS = [
    click.option(
        "--model", required=True, metavar="CKPT", help="Checkpoint file (local or s3://)."
    ),
    click.option("--out", required=True, metavar="OUT", help="Results folder or s3:// prefix."),
    click.option(
        "--run-date",
        default=None,
        metavar="YYYY-MM-DD",
        help="Partition to write: OUT/dt=RUN_DATE/ [default: today].",
    ),
    click.option(
        "--batch-size",
        type=int,
        default=None,
        help=f"Images per inference batch [default: {names.GPU_BATCH} with GPUs, "
        f"{names.CPU_BATCH} on CPU].",
    ),
    click.option(
        "--actors",
        type=int,
        default=None,
        help="Predictor actors [default: one per GPU; on CPU one per node, growing to one "
        "per core for every 1,000 inputs].",
    ),
    click.option(
        "--precision",
        type=click.Choice(names.PRECISIONS),
        default=default(ScoreConfig, "precision"),
        show_default=True,
        help="auto: bf16 on GPUs and CPUs with native bf16 (fp16 on older GPUs), else "
        "fp32, unless the checkpoint pins one.",
    ),
    click.option(
        "--runtime",
        type=click.Choice(names.RUNTIMES),
        default=default(ScoreConfig, "runtime"),
        show_default=True,
        help="auto: the checkpoint's OpenVINO model (meddx optimize) on CPU-only clusters "
        "when it passed its accuracy check, else torch.",
    ),
    click.option(
        "--compile",
        "compile_model",
        is_flag=True,
        help="torch.compile the model in each predictor (pays off on GPUs, long runs).",
    ),
    click.option(
        "--max-pixels",
        type=int,
        default=default(ScoreConfig, "max_pixels"),
        show_default=True,
        help="Refuse images with more pixels (decompression bombs).",
    ),
    MAX_OBJECT_BYTES_OPTION,
    click.option(
        "--modalities",
        default=None,
        metavar="LIST",
        callback=_parsed(names.parse_modalities),
        help="DICOM Modality values to score, e.g. CR,DX, or 'any' [default: the checkpoint's].",
    ),
    click.option(
        "--views",
        default=None,
        metavar="LIST",
        callback=_parsed(names.parse_views),
        help="DICOM ViewPosition values the model reads, e.g. PA,AP, or 'any'; other views "
        "are qc=wrong_view [default: the checkpoint's].",
    ),
    click.option(
        "--model-sha256",
        default=None,
        metavar="HEX",
        help="Pin the checkpoint: refuse any file with another sha256.",
    ),
    click.option(
        "--progress-seconds",
        type=float,
        default=default(ScoreConfig, "progress_seconds"),
        show_default=True,
        metavar="SECONDS",
        help="Off a terminal (logs, cron), a progress line this often; on one, a live line.",
    ),
    click.option("--quiet", is_flag=True, default=None, help="No progress output."),
    click.option(
        "--wait-for-lock",
        type=float,
        default=default(ScoreConfig, "wait_for_lock"),
        show_default=True,
        metavar="SECONDS",
        help="Wait this long for another run writing to OUT to finish, then refuse (exit 4).",
    ),
    click.option(
        "--lock-timeout",
        type=float,
        default=default(ScoreConfig, "lock_timeout"),
        show_default=True,
        metavar="SECONDS",
        help="A run whose lease on OUT is silent this long has died: its lease is taken over.",
    ),
    click.option(
        "--results-to",
        default=None,
        metavar="DICOMWEB",
        help="Also store a DICOM Structured Report of each scored study on this DICOMweb "
        "server (dicomweb+http(s)://HOST/PATH, STOW-RS), in the study. Needs a DICOMweb "
        "INPUT.",
    ),
    click.option(
        "--results-heatmaps",
        is_flag=True,
        default=None,
        help="With --results-to: also the Grad-CAM overlay of each study's top finding, as "
        "a Secondary Capture in the same series.",
    ),
    click.option(
        "--ca-bundle",
        envvar="MEDDX_CA_BUNDLE",
        default=None,
        type=click.Path(exists=True, dir_okay=False),
        help="PEM file of the site's CA for DICOMweb over TLS; env MEDDX_CA_BUNDLE "
        "[default: the system's CAs].",
    ),
    click.option(
        "--allow-insecure-http",
        is_flag=True,
        default=None,
        help="Send DICOMweb credentials over plain http (dicomweb+http://) to hosts other "
        "than loopback; without it such a source or --results-to is refused.",
    ),
    click.option(
        "--pseudonymize-paths",
        is_flag=True,
        default=None,
        help="Write image_uri (and paths in error text) as keyed hashes of the path "
        "(pseudonym:HASH[#HASH]): file and member names often hold MRNs. Needs "
        "MEDDX_PSEUDONYM_KEY (or MEDDX_PSEUDONYM_KEY_FILE).",
    ),
    click.option(
        "--path-map",
        default=None,
        metavar="FOLDER",
        help="With --pseudonymize-paths: keep each run's pseudonym -> path table as "
        "FOLDER/RUN_ID.parquet (a place only the right people read) [default: kept nowhere].",
    ),
    storage_option,
]


def _with_ca_bundle(opts: dict) -> dict:
    """--ca-bundle joins the storage settings, which every Ray task receives."""
    ca = opts.pop("ca_bundle", None)
    if ca:
        opts["storage"] = dataclasses.replace(opts["storage"], ca_bundle=os.path.abspath(ca))
    return opts


@cli.command()
@click.argument("input")
@options(SCORING_OPTIONS)
@click.option(
    "--resume",
    is_flag=True,
    default=None,
    help="Continue the last run of this OUT and --run-date that was killed before it "
    "committed: keep its rows, score only the inputs it had not.",
)
def score(input, **opts):
    """Score every image named by INPUT and write Parquet to OUT/dt=RUN_DATE/.

    INPUT is a folder or s3:// prefix (PNG, JPEG, DICOM and .tar shards, recursively) or
    a .csv/.parquet manifest with a uri column. One row per input image; unreadable
    inputs are rows with status=error. Set MEDDX_PSEUDONYM_KEY to get keyed-hash
    pseudonyms of DICOM study/series/instance UIDs. The rows are committed into the
    partition when the run has written them all, replacing its earlier rows. One run
    writes to OUT at a time: another exits 4 in one line (see --wait-for-lock).
    """
    cfg = build(ScoreConfig, input=input, **given(_with_ca_bundle(opts)))
    started = time.perf_counter()
    from meddx.inputs import storage
    from meddx.pipelines import cluster

    for uri, what in ((cfg.input, "input"), (cfg.model, "checkpoint")):
        if storage.missing_locally(uri):  # a typo: one line at once, not after Ray's start
            raise MeddxError(f"{what} not found: {uri}")

    # Ray starts while the driver imports what scoring needs; a run then lists its
    # inputs and checks its checkpoint on a running Ray (10 films, whole command, median
    # of 5 interleaved runs: 12.4 s before, 11.2 s after).
    cluster.init_ray_importing("meddx.pipelines.scoring")
    from meddx.pipelines.scoring import score as run

    s = run(cfg, started)
    for line in s.recovered:
        click.echo(f"recovered: {line}")
    if cfg.resume:
        click.echo(f"resumed: kept {s.resumed_rows} staged rows, scored {s.scored_now} inputs")
    click.echo(
        f"inputs={s.inputs} ok={s.ok} errors={s.errors} rows_written={s.rows_written} "
        f"seconds={s.seconds:.1f} images_per_s={s.images_per_s:.1f} "
        f"startup_seconds={s.startup_seconds:.1f} pipeline_seconds={s.pipeline_seconds:.1f}"
    )
    click.echo(f"wrote {s.output} (run_id {s.run_id})")
    if s.results:
        click.echo(s.results)
    if s.results_failed:
        raise MeddxError(f"{s.results_failed} studies' reports were not stored (see above)")


@cli.command()
@click.argument("source")
@options(SCORING_OPTIONS)
@click.option(
    "--new-model",
    is_flag=True,
    help="OUT holds another model's results: score everything again with this one.",
)
@click.option(
    "--max-error-rate",
    type=float,
    default=default(ScreenConfig, "max_error_rate"),
    show_default=True,
    help="Alarm (exit 3) when more of this run's rows are errors.",
)
@click.option(
    "--max-qc-rate",
    type=float,
    default=default(ScreenConfig, "max_qc_rate"),
    show_default=True,
    help="Alarm (exit 3) when more of this run's rows fail quality control (qc not ok): "
    "usually a feed sending the wrong series.",
)
@click.option(
    "--max-psi",
    type=float,
    default=default(ScreenConfig, "max_psi"),
    show_default=True,
    help="Alarm (exit 3) when scores drift further from the recent runs (PSI).",
)
@click.option(
    "--since",
    "since_days",
    type=click.IntRange(0),
    default=default(ScreenConfig, "since_days"),
    show_default=True,
    metavar="DAYS",
    help="A DICOMweb SOURCE is asked only for studies of the last DAYS days (StudyDate), "
    "unless its query sets StudyDate.",
)
def screen(source, **opts):
    """Nightly screening: score only what is new in SOURCE since the last run.

    Commits OUT/dt=RUN_DATE/ atomically (a killed run leaves nothing half-written and
    the next run scores what is missing), then writes the worklist, summary.json and
    report.html to OUT/_runs/dt=RUN_DATE/. Exits 3 with one line on an alarm, and 4
    when another run holds OUT (see --wait-for-lock).
    """
    cfg = build(ScreenConfig, input=source, **given(_with_ca_bundle(opts)))
    from meddx.pipelines.screening import screen as run

    s = run(cfg)
    for line in s.recovered:
        click.echo(f"recovered: {line}")
    click.echo(
        f"night {s.run_date}: inputs_seen={s.inputs_seen} new={s.new_inputs} "
        f"rows={s.rows} ok={s.ok} errors={s.errors} positives={s.positives} "
        f"needs_human_read={s.qc_flagged} seconds={s.seconds}"
    )
    if s.results:
        click.echo(s.results)
    click.echo(f"report: {cfg.out.rstrip('/')}/_runs/dt={s.run_date}/report.html")


@cli.command("evaluate")
@click.argument("predictions")
@click.option(
    "--labels",
    default=None,
    metavar="MANIFEST",
    help="CSV/Parquet manifest with uri,label [default: class folder in image_uri].",
)
@click.option("--json", "json_path", default=None, metavar="PATH", help="Also write metrics JSON.")
@click.option(
    "--plots",
    default=None,
    metavar="DIR",
    help="Write ROC, precision-recall, reliability and histogram PNGs here.",
)
@click.option(
    "--by",
    default=None,
    metavar="COLUMN",
    help="Also per subgroup: a predictions column (modality, view_position, ...) "
    "or a manifest column (site, ...).",
)
@storage_option
def evaluate_command(predictions, labels, json_path, plots, by, storage):
    """Metrics of scored PREDICTIONS (results folder, partition or file) against labels.

    At the stored threshold (sensitivity, specificity, PPV, NPV, F1, confusion matrix),
    AUROC with a 95% bootstrap CI, average precision, sensitivity at specificity 0.90 and
    0.95 and the reverse, expected calibration error and calibration slope/intercept.
    """
    from meddx.analysis import evaluation
    from meddx.model import metrics

    result = evaluation.evaluate_predictions(predictions, labels, storage, by=by, plots=plots)
    if result["multi_label"]:
        click.echo("any finding (abnormal) vs none, score = the highest finding probability:")
    click.echo(metrics.format_metrics(result))
    if result["multi_label"]:
        for name, sub in result["per_class"].items():
            lo, hi = sub["auroc_ci95"]
            click.echo(
                f"{name}: n={sub['n']} positives={sub['positives']} auroc={sub['auroc']:.4f} "
                f"[{lo:.4f}, {hi:.4f}] threshold={sub['threshold']:.4f} "
                f"sensitivity={sub['sensitivity']:.4f} specificity={sub['specificity']:.4f}"
            )
        click.echo(f"macro mean auroc={result['macro']['auroc']:.4f}")
    click.echo(f"rows={result['rows']} errors={result['errors']} unlabelled={result['unlabelled']}")
    for value, sub in result.get("by", {}).get(by, {}).items():
        click.echo(
            f"{by}={value}: n={sub['n']} auroc={sub['auroc']:.4f} "
            f"sensitivity={sub['sensitivity']:.4f} specificity={sub['specificity']:.4f}"
        )
    if "ood" in result:
        o = result["ood"]
        click.echo(
            f"quality control: ood_score auroc={o['auroc']:.4f} "
            f"chest films flagged={o['in_distribution_flag_rate']:.1%} "
            f"others caught={o['out_of_distribution_caught_rate']:.1%}"
        )
        for name, g in o["by_category"].items():
            click.echo(
                f"  {name}: n={g['n']} flagged={g['flagged']} errors={g['errors']} "
                f"caught={g['caught_rate']:.1%}"
            )
    for path in result.get("plots", []):
        click.echo(f"wrote {path}")
    if json_path:
        evaluation.write_json(result, json_path, storage)
        click.echo(f"wrote {json_path}")


@cli.command()
@click.argument("predictions")
@click.option("--model", required=True, metavar="CKPT", help="The checkpoint that scored them.")
@click.option("--out", required=True, metavar="CKPT2", help="The calibrated checkpoint to write.")
@click.option(
    "--labels",
    default=None,
    metavar="MANIFEST",
    help="CSV/Parquet manifest with uri,label [default: class folder in image_uri].",
)
@click.option("--target-sensitivity", type=click.FloatRange(0, 1, min_open=True), default=None)
@click.option("--target-specificity", type=click.FloatRange(0, 1, min_open=True), default=None)
@click.option("--temperature", is_flag=True, help="Also fit temperature scaling.")
@click.option(
    "--ood-percentile",
    type=click.FloatRange(50, 100),
    default=None,
    metavar="P",
    help="Set the out-of-distribution threshold at this percentile of the scored rows' "
    "ood_score (in-distribution validation images; train sets it at 99).",
)
@click.option(
    "--finding",
    default=None,
    metavar="NAME",
    help="Multi-label checkpoints: the finding whose threshold (and temperature) to set.",
)
@storage_option
def calibrate(
    predictions,
    model,
    out,
    labels,
    target_sensitivity,
    target_specificity,
    temperature,
    ood_percentile,
    finding,
    storage,
):
    """Choose the threshold (and a temperature) on scored validation PREDICTIONS.

    Writes CKPT2: the same weights with the threshold for the target, the fitted
    temperature, the validation metrics and what it was calibrated on. Scoring with it
    applies both; every output row carries the threshold used. With --ood-percentile,
    also (or only) the out-of-distribution threshold: rows whose ood_score is above it
    are qc=out_of_distribution.
    """
    from meddx.analysis import calibration

    if target_sensitivity is not None and target_specificity is not None:
        raise click.UsageError("give one of --target-sensitivity, --target-specificity")
    if target_sensitivity is None and target_specificity is None and ood_percentile is None:
        raise click.UsageError(
            "give --target-sensitivity or --target-specificity, and/or --ood-percentile"
        )
    result = calibration.calibrate(
        predictions,
        model,
        out,
        labels=labels,
        sensitivity=target_sensitivity,
        specificity=target_specificity,
        temperature=temperature,
        settings=storage,
        finding=finding,
        ood_percentile=ood_percentile,
    )
    if "threshold" in result:
        click.echo(
            f"{finding + ': ' if finding else ''}threshold={result['threshold']:.4f} "
            f"temperature={result['temperature']:.3f} "
            f"validation sensitivity={result['metrics']['sensitivity']:.4f} "
            f"specificity={result['metrics']['specificity']:.4f} n={result['metrics']['n']}"
        )
    if "ood_threshold" in result:
        click.echo(
            f"ood_threshold={result['ood_threshold']:.4f} "
            f"(percentile {ood_percentile:g} of {result['ood_rows']} rows)"
        )
    click.echo(f"wrote {out} sha256={result['sha256']}")


@cli.command()
@click.argument("checkpoint")
@click.option(
    "--calibration",
    required=True,
    metavar="DATA",
    help="Labelled images (folder, s3:// prefix, shards or manifest): calibration and check.",
)
@click.option("--out", required=True, metavar="CKPT2", help="The checkpoint to write.")
@click.option("--runtime", type=click.Choice(["openvino"]), default="openvino", show_default=True)
@click.option(
    "--precision",
    type=click.Choice(names.OPTIMIZED_PRECISIONS),
    default="int8",
    show_default=True,
)
@click.option(
    "--max-images",
    type=click.IntRange(min=1),
    default=names.DEFAULT_CHECK_IMAGES,
    show_default=True,
    help="Labelled images to calibrate and check on.",
)
@click.option(
    "--finetune-epochs",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="int8 by quantization-aware fine-tuning: this many epochs of distillation toward "
    "torch fp32 on the tuning half, for models post-training quantization cannot hold.",
)
@storage_option
def optimize(
    checkpoint, calibration, out, runtime, precision, max_images, finetune_epochs, storage
):
    """Export CHECKPOINT's model for CPU nodes (OpenVINO; int8 by post-training
    quantization on DATA, or by fine-tuning with --finetune-epochs) and write CKPT2
    with it inside.

    Quantization is tuned on half of DATA's labelled images; the artefact is kept only
    when it holds up against torch fp32 on the other half: every score within 0.02 and
    AUROC within 0.003 (per finding). Scoring with --runtime auto then uses it on
    CPU-only clusters.
    """
    from meddx.model.optimize import describe
    from meddx.model.optimize import optimize as run

    r = run(checkpoint, calibration, out, storage, runtime, precision, max_images, finetune_epochs)
    click.echo(describe(r))
    click.echo(f"wrote {out} sha256={r.sha256}")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise MeddxError(f"expected comma-separated numbers, got {text!r}") from None


def _class_names(text: str) -> tuple[str, ...]:
    found = tuple(n.strip() for n in text.split(",") if n.strip())
    if len(found) < 2 or len(set(found)) != len(found):
        raise MeddxError("--classes needs two or more distinct names")
    return found


@cli.command("import-weights")
@click.argument("weights")
@click.option(
    "--model", "model_name", required=True, type=click.Choice(names.MODEL_NAMES), metavar="NAME"
)
@click.option("--out", required=True, metavar="CKPT", help="The meddx checkpoint to write.")
@click.option(
    "--classes",
    default=None,
    metavar="LIST",
    callback=_parsed(_class_names),
    help="Single-label: the model's outputs in order, e.g. normal,opacity.",
)
@click.option(
    "--positive-class",
    default=None,
    metavar="NAME",
    help="Whose probability is the score [default: the class that is not 'normal'].",
)
@click.option(
    "--findings",
    default=None,
    metavar="LIST",
    callback=_parsed(names.parse_finding_names),
    help="Multi-label instead: one sigmoid output per finding, in order.",
)
@click.option(
    "--threshold",
    default="0.5",
    show_default=True,
    metavar="T[,T...]",
    callback=_parsed(_floats),
    help="The cut on the score; multi-label: one, or one per finding.",
)
@click.option("--input-size", type=click.IntRange(32, 1024), default=224, show_default=True)
@click.option(
    "--mean",
    default=",".join(map(str, names.IMAGENET_MEAN)),
    show_default=True,
    metavar="R,G,B",
    callback=_parsed(_floats),
)
@click.option(
    "--std",
    default=",".join(map(str, names.IMAGENET_STD)),
    show_default=True,
    metavar="R,G,B",
    callback=_parsed(_floats),
)
@click.option(
    "--modalities",
    default=",".join(names.DEFAULT_MODALITIES),
    show_default=True,
    metavar="LIST",
    callback=_parsed(names.parse_modalities),
    help="DICOM Modality values to accept when scoring, or 'any'.",
)
@storage_option
def import_weights(weights, model_name, out, classes, positive_class, findings, threshold, **opts):
    """Wrap WEIGHTS, a state dict trained elsewhere (torchvision's format, loaded without
    running code), into a meddx checkpoint that score, screen and optimize take.

    The architecture and its classifier must match --model and the number of classes
    (or findings); say how the model was trained: input size, normalisation, threshold.
    """
    if (classes is None) == (findings is None):
        raise click.UsageError("give either --classes (single-label) or --findings (multi-label)")
    class_names = list(findings or classes)
    if findings and len(threshold) not in (1, len(findings)):
        raise click.UsageError(f"--threshold needs 1 or {len(findings)} values")
    if not findings and len(threshold) != 1:
        raise click.UsageError("--threshold takes one value for a single-label model")
    if positive_class is not None and (findings or positive_class not in class_names):
        raise click.UsageError(f"--positive-class must be one of --classes {','.join(class_names)}")
    if len(opts["mean"]) != 3 or len(opts["std"]) != 3 or min(opts["std"]) <= 0:
        raise click.UsageError("--mean and --std need three values each, --std's above 0")
    if not all(0 < t < 1 for t in threshold):
        raise click.UsageError("--threshold values must lie strictly between 0 and 1")
    from meddx.model import registry

    ckpt = registry.import_weights(
        weights,
        opts["storage"],
        model_name=model_name,
        class_names=class_names,
        positive_class=positive_class or names.positive_class_of(class_names),
        multi_label=bool(findings),
        thresholds=list(threshold) * (len(class_names) if len(threshold) == 1 else 1),
        input_size=opts["input_size"],
        mean=opts["mean"],
        std=opts["std"],
        modalities=opts["modalities"],
    )
    sha = registry.save_checkpoint(ckpt, out, opts["storage"])
    click.echo(
        f"wrote {out} sha256={sha}: {model_name}, "
        + (f"findings {','.join(class_names)}" if findings else f"classes {','.join(class_names)}")
    )


@cli.command()
@click.argument("predictions")
@click.option("--model", required=True, metavar="CKPT", help="The checkpoint that scored them.")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--out", required=True, metavar="DIR", help="Folder (or s3:// prefix) for PNGs.")
@MAX_OBJECT_BYTES_OPTION
@storage_option
def explain(predictions, model, top, out, max_object_bytes, storage):
    """Grad-CAM overlays (PNG) for the TOP highest-scoring studies in PREDICTIONS."""
    from meddx.analysis.explain import explain as run

    for uri in run(predictions, model, top, out, storage, max_object_bytes):
        click.echo(f"wrote {uri}")


@cli.command()
@click.option("--workdir", default=None, help="Where results go [default: ./demo-output].")
@click.option("--n-train", type=click.IntRange(min=20), default=480, show_default=True)
@click.option("--n-holdout", type=click.IntRange(min=10), default=240, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=6, show_default=True)
def demo(workdir, n_train, n_holdout, epochs):
    """The whole path on this machine: local S3 -> synth -> DDP train -> score -> evaluate."""
    from meddx.pipelines.demo import run_demo

    run_demo(workdir=workdir or "demo-output", n_train=n_train, n_holdout=n_holdout, epochs=epochs)


def _terminated(signum, frame):
    # SIGTERM (a scheduler's timeout, ray job stop) unwinds like Ctrl-C, so a run's lease
    # on OUT is released on the way out. Ray's driver installs the same once it starts.
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors are one line on stderr and a non-zero exit, no traceback."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    try:
        cli.main(args=argv, prog_name="meddx", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help())
        sys.exit(2)
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        click.echo(f"meddx: error: {exc.format_message()}{hint}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("meddx: aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except MeddxError as exc:
        if isinstance(exc, MeddxAlarm):
            click.echo(f"meddx: alarm: {exc}", err=True)
            sys.exit(3)
        if isinstance(exc, MeddxBusy):
            click.echo(f"meddx: busy: {exc}", err=True)
            sys.exit(4)
        click.echo(f"meddx: error: {exc}", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        click.echo(f"meddx: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)


def run(argv: list[str] | None = None) -> NoReturn:
    """The ``meddx`` command: main(), then the exit. What the command printed is
    flushed and Ray stopped (cluster.stop_ray), and the process ends without the
    interpreter's teardown, which does nothing for a finished run and took most of a
    second with torch loaded. A caller of main() keeps its process."""
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if "ray" in sys.modules:
        from meddx.pipelines import cluster

        cluster.stop_ray()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    run()
