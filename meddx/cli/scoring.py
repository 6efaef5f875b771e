"""``meddx score`` (every image of an input) and ``meddx screen`` (the nightly run: only
what is new), with the options they share."""

from __future__ import annotations

import time

import click

from meddx import MeddxError, names
from meddx.cli.options import (
    build,
    given,
    max_object_bytes_option,
    metrics_file_option,
    modalities_option,
    option,
    options,
    pushgateway_option,
    results_to_option,
    rules_option,
    storage_option,
    views_option,
    with_ca_bundle,
)
from meddx.config import ScoreConfig, ScreenConfig

SCORING_OPTIONS = [
    click.option(
        "--model",
        required=True,
        multiple=True,
        metavar="CKPT",
        help="Checkpoint file (local or s3://). Give it more than once to score several "
        f"models in one pass (at most {names.MAX_MODELS}): each film is read and decoded "
        "once, and gets one row per model.",
    ),
    click.option("--out", required=True, metavar="OUT", help="Results folder or s3:// prefix."),
    click.option(
        "--store",
        default=None,
        metavar="STORE",
        help="Read the films from this store (meddx prepare), decoding into it first those "
        "of INPUT it lacks or holds an older version of [default: decode INPUT].",
    ),
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
    option(
        ScoreConfig,
        "precision",
        type=click.Choice(names.PRECISIONS),
        help="auto: bf16 on GPUs and CPUs with native bf16 (fp16 on older GPUs), else "
        "fp32, unless the checkpoint pins one.",
    ),
    option(
        ScoreConfig,
        "runtime",
        type=click.Choice(names.RUNTIMES),
        help="auto: the checkpoint's OpenVINO model (meddx optimize) on CPU-only clusters "
        "when it passed its accuracy check, else torch.",
    ),
    option(
        ScoreConfig,
        "compile_model",
        "--compile",
        is_flag=True,
        help="torch.compile the model in each predictor (pays off on GPUs, long runs).",
    ),
    option(ScoreConfig, "max_pixels", help="Refuse images with more pixels (decompression bombs)."),
    max_object_bytes_option(ScoreConfig),
    modalities_option,
    views_option,
    rules_option,
    click.option(
        "--model-sha256",
        default=None,
        metavar="HEX",
        help="Pin the checkpoint: refuse any file with another sha256.",
    ),
    option(
        ScoreConfig,
        "progress_seconds",
        metavar="SECONDS",
        help="Off a terminal (logs, cron), a progress line this often; on one, a live line.",
    ),
    option(ScoreConfig, "quiet", is_flag=True, help="No progress output."),
    option(
        ScoreConfig,
        "wait_for_lock",
        metavar="SECONDS",
        help="Wait this long for another run writing to OUT to finish, then refuse (exit 4).",
    ),
    option(
        ScoreConfig,
        "lock_timeout",
        metavar="SECONDS",
        help="A run whose lease on OUT is silent this long has died: its lease is taken over.",
    ),
    results_to_option,
    option(
        ScoreConfig,
        "results_heatmaps",
        is_flag=True,
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
    option(
        ScoreConfig,
        "allow_insecure_http",
        is_flag=True,
        help="Send DICOMweb credentials over plain http (dicomweb+http://) to hosts other "
        "than loopback; without it such a source or --results-to is refused.",
    ),
    option(
        ScoreConfig,
        "pseudonymize_paths",
        is_flag=True,
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
    metrics_file_option,
    pushgateway_option,
    storage_option,
]


@click.command()
@click.argument("input")
@options(SCORING_OPTIONS)
@option(
    ScoreConfig,
    "resume",
    is_flag=True,
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
    cfg = build(ScoreConfig, input=input, **given(with_ca_bundle(opts)))
    started = time.perf_counter()
    from meddx.inputs import storage
    from meddx.pipelines import cluster

    for uri, what in ((cfg.input, "input"), *((m, "checkpoint") for m in cfg.models)):
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
    if s.skipped:  # left out by the selection rules: neither scored nor errors
        click.echo(f"skipped={s.skipped} by the selection rules (status skipped, rule in error)")
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


@click.command()
@click.argument("source")
@options(SCORING_OPTIONS)
@option(
    ScreenConfig,
    "new_model",
    is_flag=True,
    help="OUT holds another model's results: score everything again with this one.",
)
@option(
    ScreenConfig,
    "max_error_rate",
    help="Alarm (exit 3) when more of this run's rows are errors.",
)
@option(
    ScreenConfig,
    "max_qc_rate",
    help="Alarm (exit 3) when more of this run's rows fail quality control (qc not ok): "
    "usually a feed sending the wrong series.",
)
@option(
    ScreenConfig,
    "max_psi",
    help="Alarm (exit 3) when scores drift further from the recent runs (PSI).",
)
@option(
    ScreenConfig,
    "since_days",
    "--since",
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
    cfg = build(ScreenConfig, input=source, **given(with_ca_bundle(opts)))
    from meddx.pipelines.screening import screen as run

    s = run(cfg)
    for line in s.recovered:
        click.echo(f"recovered: {line}")
    if s.skipped:
        click.echo(f"skipped={s.skipped} by the selection rules (status skipped, rule in error)")
    click.echo(
        f"night {s.run_date}: inputs_seen={s.inputs_seen} new={s.new_inputs} "
        f"rows={s.rows} ok={s.ok} errors={s.errors} positives={s.positives} "
        f"needs_human_read={s.qc_flagged} seconds={s.seconds}"
    )
    click.echo(
        f"worklist: {s.positive_studies} positive studies, {s.qc_flagged_studies} "
        "needing a human read"
    )
    if len(s.models) > 1:
        for m in s.models:
            click.echo(
                f"  {m['model_name']} {m['model_sha256'][:12]}: ok={m['ok']} "
                f"errors={m['errors']} positives={m['positives']} "
                f"needs_human_read={m['qc_flagged']}"
            )
    if s.results:
        click.echo(s.results)
    click.echo(f"report: {cfg.out.rstrip('/')}/_runs/dt={s.run_date}/report.html")
