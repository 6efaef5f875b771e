"""``meddx listen``: DICOM in, studies scored as soon as they are complete.

    C-STORE --> Receiver (meddx.pacs.receiver) --durable--> ARCHIVE/STUDY/INSTANCE.dcm --> ack
                    |
                    | a study nothing arrived for in --settle seconds
                    v
    a batch's manifest (uri, size, mtime, etag = the content's sha256)
        --> a screening run (meddx.pipelines.screening): lease, selection against OUT's
            index, staging, exactly-once commit, QC, worklist, report, alarms

Each batch is one ``screen`` run over a manifest of the settled studies' instances, in
the same process: Ray starts once and stays up between batches, and so do the predictor
actors (``dataset.keep_warm``), with the models loaded. The selection makes it
exactly once per (instance, model): an instance sent again with the same bytes is not
scored again, one with other bytes is (its etag differs). On start, one run over the
whole archive scores what an earlier listener acknowledged and never scored (killed,
say). Ctrl-C or SIGTERM stops accepting, lets the instances being written finish, and
ends the batch in flight the way any run ends: what it committed stays, what it only
staged is scored again by the next start.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import ssl
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from meddx import MeddxError, secret
from meddx.config import ListenConfig
from meddx.pacs import reports
from meddx.pacs.receiver import Receiver, Study, tls_context
from meddx.pipelines import cluster
from meddx.pipelines.dataset import keep_warm
from meddx.pipelines.metrics import CONTENT_TYPE, ListenMetrics
from meddx.pipelines.screening import NightAlarm, screen

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often settled studies are looked for
# How long a batch waits for another run's lease on OUT (a nightly screen, a backfill)
# before it fails and its studies wait for the next batch.
LOCK_WAIT_SECONDS = 3600.0


@dataclasses.dataclass
class Counts:
    """What the health endpoint reports, besides the receiver's own counts."""

    batches: int = 0
    rows_today: int = 0  # the run date's rows in OUT, as the last batch left them
    failed_batches: int = 0
    accepting: bool = False
    caught_up: bool = False  # the start's run over the archive is done
    # GET /metrics: studies scored and failed, receive-to-result latency, today's rates.
    metrics: ListenMetrics = dataclasses.field(default_factory=ListenMetrics)


def listen(cfg: ListenConfig, stop: threading.Event | None = None) -> Counts:
    """Receive until ``stop`` is set (or the process is interrupted); score each study
    once it has settled. The counts at the end."""
    key = secret.pseudonym_key()
    if key is None:
        raise MeddxError(
            "meddx listen needs MEDDX_PSEUDONYM_KEY (or MEDDX_PSEUDONYM_KEY_FILE): the "
            "archive names studies and instances by keyed pseudonyms of their UIDs"
        )
    stop = stop or threading.Event()
    receiver = Receiver(cfg.archive, cfg.scoring.storage, key, cfg.ae_title, cfg.allow_ae)
    tls = None
    if cfg.tls_cert is not None:
        try:
            tls = tls_context(cfg.tls_cert, cfg.tls_key, cfg.tls_ca)
        except (ssl.SSLError, OSError) as exc:
            raise MeddxError(
                f"cannot load the TLS certificate or key ({type(exc).__name__})"
            ) from None
    counts = Counts()
    health = None
    if cfg.health_port is not None:
        health = start_health(cfg.host, cfg.health_port, receiver, counts)
    receiver.start(cfg.host, cfg.port, tls)
    counts.accepting = True
    log.info("meddx listen: %s on port %d", cfg.ae_title, receiver.port)
    try:
        cluster.init_ray()
        catch_up(cfg, counts)
        counts.caught_up = True
        # The predictor actors stay up from here on: a batch starts none.
        with keep_warm(cfg.scoring) as (ckpts, shas):
            if cfg.scoring.results_to:
                reports.prime(ckpts[0], shas[0])
            while not stop.wait(POLL_SECONDS):
                due = receiver.settled(cfg.settle)
                if due:
                    score_batch(cfg, receiver, due, counts)
    finally:
        counts.accepting = False
        receiver.stop()
        if health is not None:
            health.shutdown()
    return counts


def catch_up(cfg: ListenConfig, counts: Counts) -> None:
    """One run over the whole archive: what an earlier listener acknowledged and did not
    score. An archive with nothing in it yet is no error."""
    try:
        archive = dataclasses.replace(
            cfg.scoring, input=cfg.archive, run_date=today(), whole_day=True
        )
        summary = screen(archive)
    except NightAlarm as exc:
        log.warning("meddx listen: alarm: %s", exc)
        counts.metrics.committed(exc.summary)
        return
    except MeddxError as exc:  # a new archive (nothing in it), or a run that failed
        log.warning("meddx listen: no catch-up run over the archive: %s", exc)
        return
    counts.rows_today = summary.rows
    counts.metrics.committed(summary)


def score_batch(cfg: ListenConfig, receiver: Receiver, due: dict[str, Study], counts) -> None:
    """The settled studies, as one screening run over their instances; given back to the
    receiver when the run fails, to be tried with the next batch."""
    with tempfile.TemporaryDirectory(prefix="meddx-listen-") as folder:
        manifest = Path(folder) / "batch.parquet"
        pq.write_table(batch_manifest(due), manifest)
        run = dataclasses.replace(
            cfg.scoring,
            input=str(manifest),
            run_date=today(),
            whole_day=True,
            # Another run holding OUT (the nightly screen) is waited for, not raced.
            wait_for_lock=max(cfg.scoring.wait_for_lock, LOCK_WAIT_SECONDS),
        )
        started = time.perf_counter()
        try:
            summary = screen(run)
        except NightAlarm as exc:  # committed, and said: the listener goes on
            log.warning("meddx listen: alarm: %s", exc)
            counts.metrics.committed(exc.summary, due.values())
            counts.batches += 1
            return
        except MeddxError as exc:
            log.warning("meddx listen: a batch of %d studies failed: %s", len(due), exc)
            counts.failed_batches += 1
            counts.metrics.failed(due)
            receiver.give_back(due)
            return
    counts.metrics.committed(summary, due.values())
    counts.batches += 1
    counts.rows_today = summary.rows
    log.info(
        "meddx listen: %d studies, %d new instances, committed in %.1f s, reported in "
        "%.1f s; today %d rows, %d positives",
        len(due),
        summary.new_inputs,
        summary.seconds,
        time.perf_counter() - started,
        summary.rows,
        summary.positives,
    )


def batch_manifest(due: dict[str, Study]) -> pa.Table:
    """The instances of ``due`` as a manifest: uri, size and etag, the content's sha256:
    the same bytes sent again are not read again, other bytes under the same name are.
    (No mtime: the content's hash says more.)"""
    rows = [(uri, size, sha) for s in due.values() for uri, (size, sha) in s.instances.items()]
    return pa.table(
        {
            "uri": pa.array([r[0] for r in rows], pa.string()),
            "size": pa.array([r[1] for r in rows], pa.int64()),
            "etag": pa.array([r[2] for r in rows], pa.string()),
        }
    )


def today() -> str:
    return dt.datetime.now(dt.UTC).date().isoformat()


def start_health(host: str, port: int, receiver: Receiver, counts: Counts) -> ThreadingHTTPServer:
    """``GET /health``: whether it is accepting, and its queue, as JSON (200, or 503
    when not accepting); ``GET /metrics``: the same and more for Prometheus
    (``meddx.pipelines.metrics``)."""
    counts.metrics.watch(receiver, counts)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path.partition("?")[0] == "/metrics":
                self.reply(200, CONTENT_TYPE, counts.metrics.page())
                return
            studies, instances = receiver.pending()
            body = json.dumps(
                {
                    "accepting": counts.accepting,
                    "caught_up": counts.caught_up,
                    "pending_studies": studies,
                    "pending_instances": instances,
                    "received": receiver.received,
                    "refused": receiver.refused,
                    "batches": counts.batches,
                    "failed_batches": counts.failed_batches,
                    "rows_today": counts.rows_today,
                }
            ).encode()
            self.reply(200 if counts.accepting else 503, "application/json", body)

        def reply(self, status: int, kind: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # the library logs through logging, not stderr
            log.debug("meddx listen: health or metrics asked")

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="meddx-health").start()
    return server
