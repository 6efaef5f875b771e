"""``meddx synth`` (synthetic archives and the quality-control set) and ``meddx demo``
(the whole path on this machine, on synthetic films)."""

from __future__ import annotations

import click

from meddx import MeddxError, names
from meddx.cli.options import build, option, parsed, storage_option
from meddx.config import DemoConfig, SynthConfig


def _prevalences(text: str):
    from meddx.synthetic.chest import parse_prevalences  # synth's imports only when it runs

    return parse_prevalences(text)


@click.command()
@click.argument("out")
@option(SynthConfig, "n", help="Number of images.")
@option(
    SynthConfig,
    "size",
    default=str(SynthConfig.size),
    type=str,
    callback=parsed(names.parse_film_size),
    help="Film size in pixels: a side (512) or WIDTHxHEIGHT (2400x2800).",
)
@option(SynthConfig, "format", type=click.Choice(names.SYNTH_FORMATS))
@option(
    SynthConfig,
    "mix",
    is_flag=True,
    help="Draw each film's format from a realistic archive mix (DICOM transfer syntaxes, "
    "JPEG, 16-bit PNG, 1,024 px PNG) instead of --format.",
)
@option(SynthConfig, "positive_rate", help="Fraction of images with an opacity.")
@option(SynthConfig, "seed")
@click.option(
    "--findings",
    default=None,
    metavar="LIST",
    callback=parsed(_prevalences),
    help="Multi-label: findings drawn independently, each NAME[=PREVALENCE] "
    "(opacity, effusion, nodule), or 'all'.",
)
@option(
    SynthConfig,
    "quality_set",
    is_flag=True,
    help="Write the quality-control evaluation set instead: --n held-out chest films and "
    "images that are not (lateral, inverted, rotated, blank, noise, text, photographs, "
    "pydicom's CT/MR/US/SC), its manifest marking which is which (meddx evaluate --labels).",
)
@storage_option
def synth(out, findings, **opts):
    """Write a labelled synthetic chest-X-ray archive to OUT (folder or s3:// prefix).

    Layout: OUT/<normal|opacity>/cxr-NNNNNN.<ext> and OUT/_manifest.csv (uri,label).
    With --findings: OUT/<normal|abnormal>/... and a 0/1 manifest column per finding.
    """
    width, height = opts.pop("size")
    cfg = build(SynthConfig, out=out, findings=findings or (), size=width, height=height, **opts)
    if cfg.quality_set:
        from collections import Counter

        from meddx.synthetic.quality_set import write_quality_set

        rows = write_quality_set(out, cfg.n, cfg.size, cfg.seed, cfg.storage)
        kinds = Counter(r["category"] for r in rows)
        drawn = ", ".join(f"{n} {k}" for k, n in kinds.items())
    elif cfg.findings:
        from meddx.synthetic.chest import finding_labels, write_archive

        rows = write_archive(cfg)
        counts = finding_labels(cfg.n, cfg.findings, cfg.seed).sum(axis=0)
        drawn = ", ".join(f"{c} {name}" for (name, _), c in zip(cfg.findings, counts, strict=True))
    else:
        from meddx.synthetic.chest import write_archive

        rows = write_archive(cfg)
        positive = names.SINGLE_LABEL_CLASSES[1]
        drawn = f"{sum(label == positive for _, label in rows)} {positive}"
    click.echo(f"wrote {len(rows)} images ({drawn}) and {names.MANIFEST_NAME} to {out}")


@click.command()
@option(DemoConfig, "workdir", help="Where results go.")
@option(DemoConfig, "n_train")
@option(DemoConfig, "n_holdout")
@option(DemoConfig, "epochs")
def demo(**opts):
    """The whole path on this machine: local S3 -> synth -> DDP train -> score -> evaluate."""
    cfg = build(DemoConfig, **opts)
    from meddx.pipelines.demo import run_demo

    run_demo(workdir=cfg.workdir, n_train=cfg.n_train, n_holdout=cfg.n_holdout, epochs=cfg.epochs)


@click.command()
@click.argument("out")
@storage_option
def reindex(out, storage):
    """Rebuild OUT's index of what it holds, from its results, compacted.

    Every run reads the index, not the results, to tell what is new; a lost or stale
    index is caught up from the results by the next run anyway. This does it now, under
    OUT's lease (another run holding OUT: exit 4)."""
    from meddx.inputs import storage as stores
    from meddx.pipelines import cluster
    from meddx.store import index, lease

    if not stores.exists(out, storage):
        raise MeddxError(f"no results under {out}")
    run_id = cluster.new_run_id("reindex")
    with lease.held(out, storage, run_id, "reindex", 0.0, names.DEFAULT_LOCK_TIMEOUT):
        rows, files = index.rebuild(out, storage)
    click.echo(f"reindexed {out}: {rows} rows from {files} result files")
