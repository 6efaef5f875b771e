"""Prometheus metrics: what a monitoring platform scrapes or is sent, so that a night that
did not run, failed or slowed down raises an alert instead of being found by a person.

Batch runs (``score``, ``screen``, ``train``) record their run (:func:`recorded`) and
publish it at its end, failed or not:

- ``--metrics-file FILE.prom``: node-exporter's textfile format, written to a temporary
  name beside it and renamed (a scrape never reads half a file);
- ``--pushgateway URL``: pushed to a Prometheus Pushgateway as job ``meddx_COMMAND``.

A run that reached its end replaces every figure its command had there; a failed one
only those it knows (when it ended, how long it took, ``success`` 0), so the time of
the last success stays for the "no successful night" alert: the Pushgateway's PUT and
POST, and the textfile merged the same way (other commands' lines are kept).

``meddx listen`` serves a registry of its own at ``GET /metrics`` (:class:`ListenMetrics`).

No label holds a patient value, a UID or a path: ``command``, and a model's name and
the first hex digits of its checkpoint's sha256.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    push_to_gateway,
    pushadd_to_gateway,
    write_to_textfile,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
LAST_RUN = "meddx_last_run_"
LAST_SUCCESS = "meddx_last_success_timestamp_seconds"
PSI = "meddx_last_run_psi"
# Enough of a checkpoint's sha256 to tell models apart on a dashboard (as the CLI prints).
SHA_DIGITS = 12
# A Pushgateway that has not answered in this long is down: the run does not wait longer.
PUSH_TIMEOUT = 10.0

# What a command's last run did, as meddx_last_run_NAME{command=...}.
RUN_FIGURES = {
    "timestamp_seconds": "When the last run ended (Unix time).",
    "duration_seconds": "How long the last run took.",
    "success": "1: the last run reached its end (rows committed, report written; alarms "
    "or not); 0: it failed.",
    "inputs": "Inputs the last run's source listed.",
    "rows": "Rows the last run committed (train: images trained and validated on).",
    "errors": "Rows of the last run with status error.",
    "error_rate": "The last run's error rate, as --max-error-rate reads it.",
    "qc_flagged": "Scored rows of the last run whose qc is not ok (needs a human read).",
    "qc_rate": "qc_flagged over the last run's scored rows.",
    "positives": "Rows of the last run on the worklist's positive section.",
    "alarms": "Alarms the last run raised (exit 3).",
    "val_auroc": "The trained model's validation AUROC.",
}


def night_figures(summary) -> dict[str, float]:
    """A screening night's figures (a ``NightSummary``), by RUN_FIGURES name."""
    return {
        "inputs": summary.inputs_seen,
        "rows": summary.rows,
        "errors": summary.errors,
        "error_rate": summary.error_rate,
        "qc_flagged": summary.qc_flagged,
        "qc_rate": summary.qc_rate,
        "positives": summary.positives,
        "alarms": len(summary.alarms),
    }


def psi_of(summary) -> dict[tuple[str, str], float]:
    """Each model's score drift (PSI) of a night, where it was measured, by (model name,
    sha256 prefix)."""
    return {
        (m["model_name"], m["model_sha256"][:SHA_DIGITS]): m["psi"]
        for m in summary.models
        if m.get("psi") is not None
    }


@dataclass
class RunRecord:
    """What one batch run did, as it is published at the run's end."""

    command: str
    clock: float = field(default_factory=time.perf_counter)  # when the run started
    success: bool = False  # reached its end; left False by a run that raised first
    figures: dict[str, float] = field(default_factory=dict)
    psi: dict[tuple[str, str], float] = field(default_factory=dict)

    def night(self, summary) -> None:
        """A screening night that reached its end, alarms or not."""
        self.success = True
        self.figures.update(night_figures(summary))
        self.psi = psi_of(summary)

    def scored(self, summary) -> None:
        """A ``score`` run that committed (a ``ScoreSummary``)."""
        self.success = True
        scored = summary.ok + summary.errors  # skipped rows are neither
        self.figures.update(
            inputs=summary.inputs,
            rows=summary.rows_written,
            errors=summary.errors,
            error_rate=summary.errors / scored if scored else 0.0,
            qc_flagged=summary.qc_flagged,
            qc_rate=summary.qc_flagged / summary.ok if summary.ok else 0.0,
        )

    def trained(self, summary) -> None:
        """A ``train`` run that wrote its checkpoint (a ``TrainSummary``)."""
        self.success = True
        self.figures["rows"] = summary.n_train + summary.n_val
        auroc = summary.metrics.get("val_auroc")
        if auroc is not None and math.isfinite(auroc):
            self.figures["val_auroc"] = auroc

    def families(self, now: float) -> list[Metric]:
        """The run's metric families, ``now`` its end (Unix time)."""
        values = {
            "timestamp_seconds": now,
            "duration_seconds": time.perf_counter() - self.clock,
            "success": float(self.success),
            **self.figures,
        }
        found = []
        for name, value in values.items():
            family = GaugeMetricFamily(LAST_RUN + name, RUN_FIGURES[name], labels=["command"])
            family.add_metric([self.command], value)
            found.append(family)
        if self.success:
            family = GaugeMetricFamily(
                LAST_SUCCESS, "When the last run that reached its end ended.", labels=["command"]
            )
            family.add_metric([self.command], now)
            found.append(family)
        if self.psi:
            family = GaugeMetricFamily(
                PSI,
                "Score drift of the last run against the recent runs (population stability "
                "index), by model.",
                labels=["command", "model", "sha256"],
            )
            for (model, sha), value in self.psi.items():
                family.add_metric([self.command, model, sha], value)
            found.append(family)
        return found


class Families(Collector):
    """Metric families as a collector, for the exposition functions."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


@contextlib.contextmanager
def recorded(
    command: str, metrics_file: str | None, pushgateway: str | None, started: float | None = None
) -> Iterator[RunRecord]:
    """A record the run fills in as it ends well (``RunRecord.night`` and its kin),
    published when the run ends, however it ends; ``started``: the perf_counter() the
    run's clock starts from."""
    record = RunRecord(command, clock=time.perf_counter() if started is None else started)
    try:
        yield record
    finally:
        if metrics_file or pushgateway:
            publish(record, metrics_file, pushgateway)


def publish(record: RunRecord, metrics_file: str | None, pushgateway: str | None) -> None:
    """The run's metrics to the textfile and the Pushgateway. Never raises: the run's
    outcome stands whether its metrics got out or not; one that did not is a warning
    (and, in time, the alert on the last success)."""
    families = record.families(time.time())
    if metrics_file:
        try:
            write_textfile(metrics_file, record.command, families, replace=record.success)
        except Exception as exc:
            log.warning("meddx: the metrics were not written to --metrics-file (%s)", exc)
    if pushgateway:
        try:
            push(pushgateway, record.command, families, replace=record.success)
        except Exception as exc:  # its text may hold the URL, credentials with it: the type
            log.warning("meddx: the metrics were not pushed (%s)", type(exc).__name__)


def write_textfile(path: str, command: str, families: list[Metric], replace: bool) -> None:
    """``families`` into the textfile at ``path``, temp + rename. Of what the file held,
    other commands' lines are kept, and this command's too where the run (``replace``
    False: a failed one) has no figure of that name. A file that does not parse is
    replaced."""
    merged = {f.name: f for f in families}
    try:
        previous = list(text_string_to_metric_families(Path(path).read_text()))
    except FileNotFoundError:
        previous = []
    except ValueError:
        log.warning("meddx: --metrics-file held no Prometheus text: replaced")
        previous = []
    for old in previous:
        for sample in old.samples:
            if sample.labels.get("command") == command and (replace or old.name in merged):
                continue
            kept = merged.setdefault(old.name, Metric(old.name, old.documentation, old.type))
            kept.samples.append(sample)
    write_to_textfile(path, Families(list(merged.values())))


def push(url: str, command: str, families: list[Metric], replace: bool) -> None:
    """``families`` to the Pushgateway at ``url`` as job ``meddx_COMMAND``: a PUT that
    replaces the job's metrics, or (``replace`` False) a POST that replaces only those
    of the same names."""
    send = push_to_gateway if replace else pushadd_to_gateway
    send(url, job=f"meddx_{command}", registry=Families(families), timeout=PUSH_TIMEOUT)


# ---- meddx listen ---------------------------------------------------------------------------

# Receive-to-result seconds: a study waits --settle (60 s by default) after its last
# instance, then its batch runs for seconds to minutes; the buckets resolve that range,
# and the hour beyond it (a batch waiting for a nightly run's lease).
LATENCY_BUCKETS = (1, 2.5, 5, 10, 30, 60, 90, 120, 180, 300, 600, 1200, 1800, 3600)


class ListenMetrics:
    """``meddx listen``'s metrics, in a registry of its own (not the process-wide one:
    each listener counts its own studies)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.studies_scored = Counter(
            "meddx_listen_studies_scored",
            "Studies whose batch was committed and reported.",
            registry=self.registry,
        )
        self.studies_failed = Counter(
            "meddx_listen_studies_failed",
            "Studies whose batch failed (held again, tried with the next batch).",
            registry=self.registry,
        )
        self.alarms = Counter(
            "meddx_listen_alarms", "Alarms the batches raised.", registry=self.registry
        )
        self.latency = Histogram(
            "meddx_listen_receive_to_result_seconds",
            "From a study's last instance received to its batch's rows committed and "
            "its report written.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.today: dict[str, float] = {}  # the run date's figures, as the last run left them
        self.today_psi: dict[tuple[str, str], float] = {}

    def committed(self, summary=None, studies=()) -> None:
        """A run committed and reported (a batch of ``studies``, the receiver's
        ``Study`` objects, or the start's run over the archive): each study's wait from
        its last instance, once; the day's figures from its ``NightSummary`` (a batch's
        covers the run date's rows)."""
        now = time.monotonic()
        for study in studies:
            self.latency.observe(now - study.last)
        self.studies_scored.inc(len(studies))
        if summary is not None:
            self.today = night_figures(summary)
            self.today_psi = psi_of(summary)
            self.alarms.inc(len(summary.alarms))

    def failed(self, studies) -> None:
        self.studies_failed.inc(len(studies))

    def watch(self, receiver, counts) -> None:
        """Also report the receiver's counts and queue, and the listener's ``counts``,
        as they are at each scrape."""
        self.registry.register(Live(receiver, counts, self))

    def page(self) -> bytes:
        return generate_latest(self.registry)


class Live(Collector):
    """What the receiver and the listener count, read at each scrape."""

    def __init__(self, receiver, counts, metrics: ListenMetrics):
        self.receiver, self.counts, self.metrics = receiver, counts, metrics

    def collect(self) -> Iterator[Metric]:
        r, c = self.receiver, self.counts
        studies, instances = r.pending()
        for name, text, value in (
            ("instances_received", "Instances received and kept.", r.received),
            ("instances_refused", "Instances refused (no DICOM image).", r.refused),
            ("studies_received", "Studies received (a study that receives more after its "
             "batch was handed over counts again).", r.studies_received),
            ("batches", "Batches committed.", c.batches),
            ("batches_failed", "Batches that failed.", c.failed_batches),
        ):  # fmt: skip
            yield CounterMetricFamily(f"meddx_listen_{name}", text, value=value)
        for name, text, value in (
            ("queue_studies", "Studies received and not yet handed to a batch.", studies),
            ("queue_instances", "Their instances.", instances),
            ("accepting", "1 while associations are accepted.", float(c.accepting)),
            ("caught_up", "1 once the start's run over the archive is done.", float(c.caught_up)),
        ):
            yield GaugeMetricFamily(f"meddx_listen_{name}", text, value=value)
        for name, value in self.metrics.today.items():
            text = f"The run date's {name.replace('_', ' ')}, as the last run left them."
            yield GaugeMetricFamily(f"meddx_listen_today_{name}", text, value=value)
        if self.metrics.today_psi:
            family = GaugeMetricFamily(
                "meddx_listen_today_psi",
                "Score drift of today's rows against the recent run dates (PSI), by model.",
                labels=["model", "sha256"],
            )
            for (model, sha), value in self.metrics.today_psi.items():
                family.add_metric([model, sha], value)
            yield family
