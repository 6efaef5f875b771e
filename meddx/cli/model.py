"""``meddx optimize`` (a checkpoint's model for CPU nodes) and ``meddx import-weights``
(a state dict trained elsewhere, as a meddx checkpoint)."""

from __future__ import annotations

import click

from meddx import MeddxError, names
from meddx.cli.options import build, findings_option, option, parsed, storage_option
from meddx.config import OPTIMIZED_RUNTIMES, ImportWeightsConfig, OptimizeConfig


@click.command()
@click.argument("checkpoint")
@click.option(
    "--calibration",
    required=True,
    metavar="DATA",
    help="Labelled images (folder, s3:// prefix, shards or manifest): calibration and check.",
)
@click.option("--out", required=True, metavar="CKPT2", help="The checkpoint to write.")
@option(OptimizeConfig, "runtime", type=click.Choice(OPTIMIZED_RUNTIMES))
@option(OptimizeConfig, "precision", type=click.Choice(names.OPTIMIZED_PRECISIONS))
@option(
    OptimizeConfig,
    "max_images",
    help="Labelled images to calibrate and check on.",
)
@option(
    OptimizeConfig,
    "finetune_epochs",
    help="int8 by quantization-aware fine-tuning: this many epochs of distillation toward "
    "torch fp32 on the tuning half, for models post-training quantization cannot hold.",
)
@storage_option
def optimize(**opts):
    """Export CHECKPOINT's model for CPU nodes (OpenVINO; int8 by post-training
    quantization on DATA, or by fine-tuning with --finetune-epochs) and write CKPT2
    with it inside.

    Quantization is tuned on half of DATA's labelled images; the artefact is kept only
    when it holds up against torch fp32 on the other half, per finding: decisions at
    the threshold flip on no more films than one grey level of noise flips (plus 1 in
    100), AUROC stays inside its bootstrap interval and calibration error moves by at
    most 0.02 (docs/int8.md). Fine-tuning tries the quantizers' range rates 1e-3 and
    1e-2 and keeps the one closer to fp32 on the tuning half. Scoring with --runtime auto
    then uses the artefact on CPU-only clusters.
    """
    cfg = build(OptimizeConfig, **opts)
    from meddx.model.optimize import describe
    from meddx.model.optimize import optimize as run

    r = run(
        cfg.checkpoint,
        cfg.calibration,
        cfg.out,
        cfg.storage,
        cfg.runtime,
        cfg.precision,
        cfg.max_images,
        cfg.finetune_epochs,
    )
    click.echo(describe(r))
    click.echo(f"wrote {cfg.out} sha256={r.sha256}")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise MeddxError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


@click.command("import-weights")
@click.argument("weights")
@option(
    ImportWeightsConfig,
    "model_name",
    "--model",
    required=True,
    type=click.Choice(names.MODEL_NAMES),
    metavar="NAME",
    show_default=False,
)
@click.option("--out", required=True, metavar="CKPT", help="The meddx checkpoint to write.")
@click.option(
    "--classes",
    default=None,
    metavar="LIST",
    callback=parsed(_names),
    help="Single-label: the model's outputs in order, e.g. normal,opacity.",
)
@click.option(
    "--positive-class",
    default=None,
    metavar="NAME",
    help="Whose probability is the score [default: the class that is not 'normal'].",
)
@findings_option("Multi-label instead: one sigmoid output per finding, in order.")
@option(
    ImportWeightsConfig,
    "threshold",
    metavar="T[,T...]",
    callback=parsed(_floats),
    help="The cut on the score; multi-label: one, or one per finding.",
)
@option(ImportWeightsConfig, "input_size")
@option(ImportWeightsConfig, "mean", metavar="R,G,B", callback=parsed(_floats))
@option(ImportWeightsConfig, "std", metavar="R,G,B", callback=parsed(_floats))
@option(
    ImportWeightsConfig,
    "modalities",
    metavar="LIST",
    callback=parsed(names.parse_modalities),
    help="DICOM Modality values to accept when scoring, or 'any'.",
)
@storage_option
def import_weights(**opts):
    """Wrap WEIGHTS, a state dict trained elsewhere (torchvision's format, loaded without
    running code), into a meddx checkpoint that score, screen and optimize take.

    The architecture and its classifier must match --model and the number of classes
    (or findings); say how the model was trained: input size, normalisation, threshold.
    """
    cfg = build(ImportWeightsConfig, **opts)
    from meddx.model import registry

    ckpt = registry.import_weights(
        cfg.weights,
        cfg.storage,
        model_name=cfg.model_name,
        class_names=list(cfg.class_names),
        positive_class=cfg.positive,
        multi_label=bool(cfg.findings),
        thresholds=list(cfg.thresholds),
        input_size=cfg.input_size,
        mean=cfg.mean,
        std=cfg.std,
        modalities=cfg.modalities,
    )
    sha = registry.save_checkpoint(ckpt, cfg.out, cfg.storage)
    kind = "findings" if cfg.findings else "classes"
    click.echo(
        f"wrote {cfg.out} sha256={sha}: {cfg.model_name}, {kind} {','.join(cfg.class_names)}"
    )
