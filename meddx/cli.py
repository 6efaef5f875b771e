"""The ``meddx`` command line. Each command builds a frozen config and calls one function."""

from __future__ import annotations

import datetime as dt
import math
import sys

import click

from meddx import MeddxAlarm, MeddxError, __version__
from meddx.storage import StorageSettings

s3_endpoint_option = click.option(
    "--s3-endpoint",
    envvar="MEDDX_S3_ENDPOINT",
    default=None,
    metavar="URL",
    help="S3-compatible endpoint (MinIO, Ceph, ...); env MEDDX_S3_ENDPOINT. "
    "Credentials come from the standard AWS chain.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meddx")
def cli():
    """Score and train CNNs on medical image archives (local or S3) with Ray."""


@cli.command()
@click.argument("out")
@click.option(
    "--n", "n", type=click.IntRange(min=1), default=200, show_default=True, help="Number of images."
)
@click.option(
    "--size",
    type=click.IntRange(min=64, max=4096),
    default=256,
    show_default=True,
    help="Image side in pixels.",
)
@click.option(
    "--format", "fmt", type=click.Choice(["png", "jpeg"]), default="png", show_default=True
)
@click.option(
    "--positive-rate",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Fraction of images with an opacity.",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--findings",
    default=None,
    metavar="LIST",
    help="Multi-label: findings drawn independently, each NAME[=PREVALENCE] "
    "(opacity, effusion, nodule), or 'all'.",
)
@s3_endpoint_option
def synth(out, n, size, fmt, positive_rate, seed, findings, s3_endpoint):
    """Write a labelled synthetic chest-X-ray archive to OUT (folder or s3:// prefix).

    Layout: OUT/<normal|opacity>/cxr-NNNNNN.<ext> and OUT/_manifest.csv (uri,label).
    With --findings: OUT/<normal|abnormal>/... and a 0/1 manifest column per finding.
    """
    from meddx.synth import SynthConfig, parse_findings, write_archive

    cfg = SynthConfig(
        out=out,
        n=n,
        size=size,
        format=fmt,
        positive_rate=positive_rate,
        seed=seed,
        findings=parse_findings(findings) if findings is not None else (),
        storage=StorageSettings.from_env(s3_endpoint),
    )
    rows = write_archive(cfg)
    if cfg.findings:
        from meddx.synth import finding_labels

        counts = finding_labels(cfg.n, cfg.findings, cfg.seed).sum(axis=0)
        drawn = ", ".join(f"{c} {name}" for (name, _), c in zip(cfg.findings, counts, strict=True))
        click.echo(f"wrote {len(rows)} images ({drawn}) and _manifest.csv to {out}")
        return
    positives = sum(label == "opacity" for _, label in rows)
    click.echo(f"wrote {len(rows)} images ({positives} opacity) and _manifest.csv to {out}")


@cli.command()
@click.argument("data")
@click.option(
    "--out", required=True, metavar="CKPT", help="Checkpoint file to write (local or s3://)."
)
@click.option(
    "--model",
    default="resnet18",
    show_default=True,
    type=click.Choice(["seednet", "resnet18", "resnet50", "densenet121"]),
)
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option(
    "--workers", type=click.IntRange(min=1), default=2, show_default=True, help="DDP workers."
)
@click.option("--use-gpu/--no-use-gpu", default=False, show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Per-worker batch size.",
)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.2,
    show_default=True,
)
@click.option("--image-size", type=click.IntRange(min=32, max=1024), default=224, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--modalities",
    default="CR,DX",
    show_default=True,
    metavar="LIST",
    help="DICOM Modality values to train on and later accept when scoring, or 'any'.",
)
@click.option(
    "--run-name",
    default=None,
    metavar="NAME",
    help="Ray Train run name; run again with the same name and --storage-path to continue "
    "a stopped run from its last epoch.",
)
@click.option(
    "--max-failures",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Restarts from the last checkpoint after a worker dies.",
)
@click.option(
    "--storage-path",
    default=None,
    metavar="URI",
    help="Ray Train run folder (shared storage such as s3:// on multi-node clusters).",
)
@click.option(
    "--findings",
    default=None,
    metavar="LIST",
    help="Multi-label: the manifest's 0/1 finding columns to learn, e.g. "
    "opacity,effusion,nodule (one sigmoid output each).",
)
@s3_endpoint_option
def train(
    data,
    out,
    model,
    epochs,
    workers,
    use_gpu,
    batch_size,
    lr,
    val_fraction,
    image_size,
    seed,
    modalities,
    run_name,
    max_failures,
    storage_path,
    findings,
    s3_endpoint,
):
    """Train a classifier with Ray Train (PyTorch DDP) on the labelled archive DATA.

    DATA is a folder or s3:// prefix, or a .csv/.parquet manifest with uri and label
    columns. Labels come from the manifest (DATA/_manifest.csv when present), else from
    class folder names. With --findings, a multi-label model learns the manifest's 0/1
    column for each finding.
    """
    from meddx.training import TrainConfig, parse_findings
    from meddx.training import train as run

    cfg = TrainConfig(
        data=data,
        out=out,
        model=model,
        epochs=epochs,
        workers=workers,
        use_gpu=use_gpu,
        batch_size=batch_size,
        lr=lr,
        val_fraction=val_fraction,
        image_size=image_size,
        seed=seed,
        modalities=None
        if modalities.strip().lower() == "any"
        else tuple(m.strip().upper() for m in modalities.split(",") if m.strip()),
        storage_path=storage_path,
        run_name=run_name,
        max_failures=max_failures,
        findings=parse_findings(findings) if findings is not None else None,
        storage=StorageSettings.from_env(s3_endpoint),
    )
    summary = run(cfg)
    m = summary.metrics
    click.echo(
        f"trained {model} on {summary.n_train} images (validation {summary.n_val}) "
        f"in {summary.seconds:.1f}s; best epoch {int(m.get('epoch', 0))}: "
        f"val_auroc={m.get('val_auroc', math.nan):.4f} val_f1={m.get('val_f1', math.nan):.4f}; "
        f"last epoch train_images_per_s={summary.last.get('train_images_per_s', math.nan):.1f}"
    )
    for name in cfg.findings or ():
        click.echo(
            f"  {name}: val_auroc={m.get(f'val_auroc_{name}', math.nan):.4f} "
            f"threshold={m.get(f'val_threshold_{name}', math.nan):.4f}"
        )
    click.echo(f"checkpoint {summary.checkpoint} sha256={summary.sha256}")


def _run_date(ctx, param, value):
    if value is None:
        return dt.date.today().isoformat()
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError:
        raise click.BadParameter(f"expected YYYY-MM-DD, got {value!r}") from None


_SCORING_OPTIONS = [
    click.option(
        "--model", required=True, metavar="CKPT", help="Checkpoint file (local or s3://)."
    ),
    click.option("--out", required=True, metavar="OUT", help="Results folder or s3:// prefix."),
    click.option(
        "--run-date",
        callback=_run_date,
        default=None,
        metavar="YYYY-MM-DD",
        help="Partition to write: OUT/dt=RUN_DATE/ [default: today].",
    ),
    click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=None,
        help="Images per inference batch [default: 256 with GPUs, 64 on CPU].",
    ),
    click.option(
        "--actors",
        type=click.IntRange(min=1),
        default=None,
        help="Predictor actors [default: one per GPU; on CPU one per node, growing to one "
        "per core for every 1,000 inputs].",
    ),
    click.option(
        "--precision",
        type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
        default="auto",
        show_default=True,
        help="auto: bf16 on GPUs and CPUs with native bf16 (fp16 on older GPUs), else "
        "fp32, unless the checkpoint pins one.",
    ),
    click.option(
        "--compile",
        "compile_model",
        is_flag=True,
        help="torch.compile the model in each predictor (pays off on GPUs, long runs).",
    ),
    click.option(
        "--max-pixels",
        type=click.IntRange(min=1),
        default=None,
        help="Refuse images with more pixels (decompression bombs) [default: 60,000,000].",
    ),
    click.option(
        "--max-object-bytes",
        type=click.IntRange(min=1),
        default=None,
        help="Refuse any object or tar member larger than this (read no further) "
        "[default: 536,870,912 (512 MiB)].",
    ),
    click.option(
        "--modalities",
        default=None,
        metavar="LIST",
        help="DICOM Modality values to score, e.g. CR,DX, or 'any' [default: the checkpoint's].",
    ),
    click.option(
        "--model-sha256",
        default=None,
        metavar="HEX",
        help="Pin the checkpoint: refuse any file with another sha256.",
    ),
    s3_endpoint_option,
]


def scoring_options(command):
    """The options `score` and `screen` share, in one place."""
    for option in reversed(_SCORING_OPTIONS):
        command = option(command)
    return command


def _scoring_kwargs(opts: dict) -> dict:
    from meddx import decode, sources

    return {
        "model": opts["model"],
        "out": opts["out"],
        "run_date": opts["run_date"],
        "batch_size": opts["batch_size"],
        "actors": opts["actors"],
        "precision": opts["precision"],
        "compile_model": opts["compile_model"],
        "max_pixels": opts["max_pixels"] or decode.DEFAULT_MAX_PIXELS,
        "max_object_bytes": opts["max_object_bytes"] or sources.DEFAULT_MAX_OBJECT_BYTES,
        "modalities": opts["modalities"],
        "model_sha256": opts["model_sha256"],
        "storage": StorageSettings.from_env(opts["s3_endpoint"]),
    }


@cli.command()
@click.argument("input")
@scoring_options
def score(input, **opts):
    """Score every image named by INPUT and write Parquet to OUT/dt=RUN_DATE/.

    INPUT is a folder or s3:// prefix (PNG, JPEG, DICOM and .tar shards, recursively) or
    a .csv/.parquet manifest with a uri column. One row per input image; unreadable
    inputs are rows with status=error. Set MEDDX_PSEUDONYM_KEY to get keyed-hash
    pseudonyms of DICOM study/series/instance UIDs.
    """
    from meddx.scoring import ScoreConfig
    from meddx.scoring import score as run

    s = run(ScoreConfig(input=input, **_scoring_kwargs(opts)))
    click.echo(
        f"inputs={s.inputs} ok={s.ok} errors={s.errors} rows_written={s.rows_written} "
        f"seconds={s.seconds:.1f} images_per_s={s.images_per_s:.1f} "
        f"startup_seconds={s.startup_seconds:.1f} pipeline_seconds={s.pipeline_seconds:.1f}"
    )
    click.echo(f"wrote {s.output} (run_id {s.run_id})")


@cli.command()
@click.argument("source")
@scoring_options
@click.option(
    "--new-model",
    is_flag=True,
    help="OUT holds another model's results: score everything again with this one.",
)
@click.option(
    "--max-error-rate",
    type=click.FloatRange(0, 1),
    default=0.05,
    show_default=True,
    help="Alarm (exit 3) when more of this run's rows are errors.",
)
@click.option(
    "--max-psi",
    type=click.FloatRange(min=0),
    default=0.25,
    show_default=True,
    help="Alarm (exit 3) when scores drift further from the recent runs (PSI).",
)
def screen(source, new_model, max_error_rate, max_psi, **opts):
    """Nightly screening: score only what is new in SOURCE since the last run.

    Commits OUT/dt=RUN_DATE/ atomically (a killed run leaves nothing half-written and
    the next run scores what is missing), then writes the worklist, summary.json and
    report.html to OUT/_runs/dt=RUN_DATE/. Exits 3 with one line on an alarm.
    """
    from meddx.screening import ScreenConfig
    from meddx.screening import screen as run

    s = run(
        ScreenConfig(
            input=source,
            new_model=new_model,
            max_error_rate=max_error_rate,
            max_psi=max_psi,
            **_scoring_kwargs(opts),
        )
    )
    click.echo(
        f"night {s['run_date']}: inputs_seen={s['inputs_seen']} new={s['new_inputs']} "
        f"rows={s['rows']} ok={s['ok']} errors={s['errors']} positives={s['positives']} "
        f"seconds={s['seconds']}"
    )
    click.echo(f"report: {opts['out'].rstrip('/')}/_runs/dt={s['run_date']}/report.html")


@cli.command()
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
@s3_endpoint_option
def evaluate(predictions, labels, json_path, plots, by, s3_endpoint):
    """Metrics of scored PREDICTIONS (results folder, partition or file) against labels.

    At the stored threshold (sensitivity, specificity, PPV, NPV, F1, confusion matrix),
    AUROC with a 95% bootstrap CI, average precision, sensitivity at specificity 0.90 and
    0.95 and the reverse, expected calibration error and calibration slope/intercept.
    """
    from meddx import evaluation, metrics

    settings = StorageSettings.from_env(s3_endpoint)
    result = evaluation.evaluate(predictions, labels, settings, by=by, plots=plots)
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
    for path in result.get("plots", []):
        click.echo(f"wrote {path}")
    if json_path:
        evaluation.write_json(result, json_path, settings)
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
    "--finding",
    default=None,
    metavar="NAME",
    help="Multi-label checkpoints: the finding whose threshold (and temperature) to set.",
)
@s3_endpoint_option
def calibrate(
    predictions,
    model,
    out,
    labels,
    target_sensitivity,
    target_specificity,
    temperature,
    finding,
    s3_endpoint,
):
    """Choose the threshold (and a temperature) on scored validation PREDICTIONS.

    Writes CKPT2: the same weights with the threshold for the target, the fitted
    temperature, the validation metrics and what it was calibrated on. Scoring with it
    applies both; every output row carries the threshold used.
    """
    from meddx import calibration

    if (target_sensitivity is None) == (target_specificity is None):
        raise click.UsageError("give exactly one of --target-sensitivity, --target-specificity")
    settings = StorageSettings.from_env(s3_endpoint)
    result = calibration.calibrate(
        predictions,
        model,
        out,
        labels=labels,
        sensitivity=target_sensitivity,
        specificity=target_specificity,
        temperature=temperature,
        settings=settings,
        finding=finding,
    )
    click.echo(
        f"{finding + ': ' if finding else ''}threshold={result['threshold']:.4f} "
        f"temperature={result['temperature']:.3f} "
        f"validation sensitivity={result['metrics']['sensitivity']:.4f} "
        f"specificity={result['metrics']['specificity']:.4f} n={result['metrics']['n']}"
    )
    click.echo(f"wrote {out} sha256={result['sha256']}")


@cli.command()
@click.argument("predictions")
@click.option("--model", required=True, metavar="CKPT", help="The checkpoint that scored them.")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--out", required=True, metavar="DIR", help="Folder (or s3:// prefix) for PNGs.")
@s3_endpoint_option
def explain(predictions, model, top, out, s3_endpoint):
    """Grad-CAM overlays (PNG) for the TOP highest-scoring studies in PREDICTIONS."""
    from meddx.explain import explain as run

    for uri in run(predictions, model, top, out, StorageSettings.from_env(s3_endpoint)):
        click.echo(f"wrote {uri}")


@cli.command()
@click.option("--workdir", default=None, help="Where results go [default: ./demo-output].")
@click.option("--n-train", type=click.IntRange(min=20), default=480, show_default=True)
@click.option("--n-holdout", type=click.IntRange(min=10), default=240, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=6, show_default=True)
def demo(workdir, n_train, n_holdout, epochs):
    """The whole path on this machine: local S3 -> synth -> DDP train -> score -> evaluate."""
    from meddx.demo import run_demo

    run_demo(workdir=workdir or "demo-output", n_train=n_train, n_holdout=n_holdout, epochs=epochs)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors are one line on stderr and a non-zero exit, no traceback."""
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
        click.echo(f"meddx: error: {exc}", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        click.echo(f"meddx: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
