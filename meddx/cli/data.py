"""``meddx synth`` (synthetic archives and the quality-control set) and ``meddx demo``
(the whole path on this machine, on synthetic films)."""

from __future__ import annotations

import click

from meddx import MeddxError, names
from meddx.cli.options import (
    build,
    given,
    max_object_bytes_option,
    option,
    parsed,
    storage_option,
    with_ca_bundle,
)
from meddx.config import DemoConfig, PrepareConfig, SynthConfig


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


@click.command()
@click.argument("input")
@click.option("--out", required=True, metavar="STORE", help="The store's folder or s3:// prefix.")
@option(
    PrepareConfig,
    "size",
    metavar="PX",
    help="The short side films are kept at (their aspect is kept); models up to this "
    "input size read the store.",
)
@click.option(
    "--run-date",
    default=None,
    metavar="YYYY-MM-DD",
    help="The store's partition the films go to: STORE/dt=RUN_DATE/ [default: today].",
)
@option(PrepareConfig, "max_pixels", help="Refuse images with more pixels (decompression bombs).")
@max_object_bytes_option(PrepareConfig)
@option(
    PrepareConfig,
    "progress_seconds",
    metavar="SECONDS",
    help="Off a terminal (logs, cron), a progress line this often; on one, a live line.",
)
@option(PrepareConfig, "quiet", is_flag=True, help="No progress output.")
@option(
    PrepareConfig,
    "wait_for_lock",
    metavar="SECONDS",
    help="Wait this long for another run writing to STORE to finish, then refuse (exit 4).",
)
@option(
    PrepareConfig,
    "lock_timeout",
    metavar="SECONDS",
    help="A run whose lease on STORE is silent this long has died: it is taken over.",
)
@option(
    PrepareConfig,
    "since_days",
    "--since",
    metavar="DAYS",
    help="A DICOMweb INPUT is asked only for studies of the last DAYS days (StudyDate).",
)
@click.option(
    "--ca-bundle",
    envvar="MEDDX_CA_BUNDLE",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="PEM file of the site's CA for DICOMweb over TLS; env MEDDX_CA_BUNDLE.",
)
@option(
    PrepareConfig,
    "allow_insecure_http",
    is_flag=True,
    help="Send DICOMweb credentials over plain http to hosts other than loopback.",
)
@storage_option
def prepare(input, **opts):
    """Decode each input of INPUT once into STORE, a store of model-ready films.

    INPUT is what score takes: a folder or s3:// prefix, a manifest, a DICOMweb server.
    Each film is kept after its LUTs and window, 8-bit, with its short side at --size,
    with its quality figures, the DICOM attributes that identify no one and its source's
    URI and content hash. A second run decodes only inputs that are new or changed.
    score, screen and train read STORE as their INPUT (or through --store) without
    decoding. One run writes to STORE at a time (exit 4 otherwise).
    """
    cfg = build(PrepareConfig, input=input, **given(with_ca_bundle(opts)))
    import time

    from meddx.inputs import storage
    from meddx.pipelines import cluster

    started = time.perf_counter()
    if storage.missing_locally(cfg.input):
        raise MeddxError(f"input not found: {cfg.input}")
    cluster.init_ray_importing("meddx.pipelines.prepare")
    from meddx.pipelines.prepare import prepare as run

    s = run(cfg, started)
    for line in s.recovered:
        click.echo(f"recovered: {line}")
    click.echo(
        f"inputs_seen={s.inputs_seen} prepared={s.prepared} rows={s.rows} ok={s.ok} "
        f"errors={s.errors} stored_mib={s.stored_bytes / 2**20:.1f} seconds={s.seconds:.1f} "
        f"images_per_s={s.images_per_s:.1f} startup_seconds={s.startup_seconds:.1f} "
        f"pipeline_seconds={s.pipeline_seconds:.1f}"
    )
    click.echo(f"store {cfg.out} (run_id {s.run_id})")
