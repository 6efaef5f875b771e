"""``meddx evaluate``, ``calibrate`` and ``explain``: what is read from scored
predictions, and the figures they print."""

from __future__ import annotations

import click

from meddx.cli.options import (
    build,
    labels_option,
    max_object_bytes_option,
    option,
    scored_by_option,
    storage_option,
)
from meddx.config import CalibrateConfig, EvaluateConfig, ExplainConfig


@click.command()
@click.argument("predictions")
@labels_option
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
@click.option(
    "--model-sha256",
    default=None,
    metavar="HEX",
    help="Which model's rows, when the results hold several; a prefix is enough.",
)
@click.option(
    "--by-study",
    is_flag=True,
    default=False,
    help="Figures per study (its study_pseudonym, else the manifest's study_id, else the "
    "image): positive if any of its images is, scored by its highest score.",
)
@storage_option
def evaluate(**opts):
    """Metrics of scored PREDICTIONS (results folder, partition or file) against labels.

    At the stored threshold (sensitivity, specificity, PPV, NPV, F1, confusion matrix),
    AUROC with a 95% bootstrap CI, average precision, sensitivity at specificity 0.90 and
    0.95 and the reverse, expected calibration error and calibration slope/intercept.
    Results of several models (score --model A --model B): --model-sha256 picks one.
    """
    cfg = build(EvaluateConfig, **opts)
    from meddx.analysis.evaluation import evaluate as run

    result = run(cfg)
    if result.studies is not None:
        click.echo(f"by study: {result.studies} studies, each positive if any of its images is")
    if result.multi_label:
        click.echo("any finding (abnormal) vs none, score = the highest finding probability:")
    click.echo(result.overall.describe())
    if result.multi_label:
        for name, f in result.per_class.items():
            lo, hi = f.auroc_ci95
            click.echo(
                f"{name}: n={f.n} positives={f.positives} auroc={f.auroc:.4f} "
                f"[{lo:.4f}, {hi:.4f}] threshold={f.threshold:.4f} "
                f"sensitivity={f.sensitivity:.4f} specificity={f.specificity:.4f}"
            )
        click.echo(f"macro mean auroc={result.macro.auroc:.4f}")
    click.echo(f"rows={result.rows} errors={result.errors} unlabelled={result.unlabelled}")
    for value, f in result.by.items():
        click.echo(
            f"{result.by_column}={value}: n={f.n} auroc={f.auroc:.4f} "
            f"sensitivity={f.sensitivity:.4f} specificity={f.specificity:.4f}"
        )
    if result.ood is not None:
        o = result.ood
        click.echo(
            f"quality control: ood_score auroc={o.auroc:.4f} "
            f"chest films flagged={o.in_distribution_flag_rate:.1%} "
            f"others caught={o.out_of_distribution_caught_rate:.1%}"
        )
        for name, g in o.by_category.items():
            click.echo(
                f"  {name}: n={g.n} flagged={g.flagged} errors={g.errors} "
                f"caught={g.caught_rate:.1%}"
            )
    for path in result.plots:
        click.echo(f"wrote {path}")
    if cfg.json_path:
        click.echo(f"wrote {cfg.json_path}")


@click.command()
@click.argument("predictions")
@scored_by_option
@click.option("--out", required=True, metavar="CKPT2", help="The calibrated checkpoint to write.")
@labels_option
@click.option("--target-sensitivity", type=float, default=None)
@click.option("--target-specificity", type=float, default=None)
@option(CalibrateConfig, "temperature", is_flag=True, help="Also fit temperature scaling.")
@click.option(
    "--ood-percentile",
    type=float,
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
def calibrate(**opts):
    """Choose the threshold (and a temperature) on scored validation PREDICTIONS.

    Writes CKPT2: the same weights with the threshold for the target, the fitted
    temperature, the validation metrics and what it was calibrated on. Scoring with it
    applies both; every output row carries the threshold used. With --ood-percentile,
    also (or only) the out-of-distribution threshold: rows whose ood_score is above it
    are qc=out_of_distribution.
    """
    cfg = build(CalibrateConfig, **opts)
    from meddx.analysis.calibration import calibrate as run

    result = run(cfg)
    if result.validation is not None:
        v = result.validation
        click.echo(
            f"{cfg.finding + ': ' if cfg.finding else ''}threshold={result.threshold:.4f} "
            f"temperature={result.temperature:.3f} "
            f"validation sensitivity={v.sensitivity:.4f} specificity={v.specificity:.4f} "
            f"n={v.n}"
        )
    if result.ood_threshold is not None:
        click.echo(
            f"ood_threshold={result.ood_threshold:.4f} "
            f"(percentile {cfg.ood_percentile:g} of {result.ood_rows} rows)"
        )
    click.echo(f"wrote {cfg.out} sha256={result.sha256}")


@click.command()
@click.argument("predictions")
@scored_by_option
@option(ExplainConfig, "top")
@click.option("--out", required=True, metavar="DIR", help="Folder (or s3:// prefix) for PNGs.")
@max_object_bytes_option(ExplainConfig)
@storage_option
def explain(**opts):
    """Grad-CAM overlays (PNG) for the TOP highest-scoring studies in PREDICTIONS."""
    cfg = build(ExplainConfig, **opts)
    from meddx.analysis.explain import explain as run

    for uri in run(cfg.predictions, cfg.model, cfg.top, cfg.out, cfg.storage, cfg.max_object_bytes):
        click.echo(f"wrote {uri}")
