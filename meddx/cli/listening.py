"""``meddx listen``: the DICOM receiver that scores each study once it is complete."""

from __future__ import annotations

import click

from meddx import names
from meddx.cli.options import (
    build,
    given,
    modalities_option,
    option,
    results_to_option,
    rules_option,
    storage_option,
    views_option,
)
from meddx.config import ListenConfig, ScreenConfig


@click.command()
@option(ListenConfig, "ae_title", metavar="AET", help="This receiver's AE title.")
@option(ListenConfig, "host", help="Address to listen on.")
@option(ListenConfig, "port", help="DICOM port (0: any free one).")
@click.option(
    "--allow-ae",
    required=True,
    metavar="LIST",
    help="Calling AE titles to accept, e.g. PACS1,CR3; others are rejected at association.",
)
@click.option(
    "--archive",
    required=True,
    metavar="ARCHIVE",
    help="Folder or s3:// prefix the received instances are kept in, as they came "
    "(ARCHIVE/STUDY/INSTANCE.dcm, keyed pseudonyms of the UIDs).",
)
@click.option("--model", required=True, multiple=True, metavar="CKPT", help="Checkpoint(s).")
@click.option("--out", required=True, metavar="OUT", help="Results folder or s3:// prefix.")
@option(
    ListenConfig,
    "settle",
    metavar="SECONDS",
    help="A study is complete, and scored, when nothing arrived for it this long.",
)
@click.option(
    "--health-port",
    type=int,
    default=None,
    help="Serve GET /health (accepting, queue depth) on this port [default: none].",
)
@option(ScreenConfig, "precision", type=click.Choice(names.PRECISIONS), help="As score's.")
@option(ScreenConfig, "runtime", type=click.Choice(names.RUNTIMES), help="As score's.")
@modalities_option
@views_option
@rules_option
@results_to_option
@option(
    ScreenConfig,
    "results_heatmaps",
    is_flag=True,
    help="With --results-to: also the Grad-CAM overlay of each study's top finding.",
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="DICOM over TLS: this receiver's certificate (PEM) [default: no TLS].",
)
@click.option(
    "--tls-key", type=click.Path(exists=True, dir_okay=False), default=None, help="... its key."
)
@click.option(
    "--tls-ca",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Senders must show a certificate this CA (PEM) signed [default: any sender].",
)
@storage_option
def listen(
    ae_title, host, port, allow_ae, archive, settle, health_port, tls_cert, tls_key, tls_ca, **opts
):
    """Receive DICOM (C-STORE) into ARCHIVE and score each study once it is complete.

    An instance is acknowledged once its bytes are durably kept. A study nothing has
    arrived for in --settle seconds goes through the same run as `meddx screen` (lease,
    exactly-once commit into OUT/dt=TODAY/, QC, worklist, report), in the same process.
    Needs MEDDX_PSEUDONYM_KEY. Ctrl-C or SIGTERM stops accepting and exits.
    """
    scoring = build(ScreenConfig, input=archive, archive=archive, **given(opts))
    cfg = build(
        ListenConfig,
        archive=archive,
        scoring=scoring,
        allow_ae=allow_ae,
        ae_title=ae_title,
        host=host,
        port=port,
        settle=settle,
        health_port=health_port,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
    )
    from meddx.pipelines.listening import listen as run

    counts = run(cfg)
    click.echo(f"stopped: {counts.batches} batches; {counts.rows_today} rows today")
