"""Nightly screening: score what arrived since the last run, commit atomically, triage.

    meddx screen SOURCE --model CKPT --out OUT --run-date 2026-11-26

The run is the skeleton of ``meddx.pipelines.run``, which ``meddx score`` runs too:

1. Recover: a run killed earlier left its files under ``OUT/_staging/RUN_ID/``. If it
   had committed (a ``_COMMIT`` list is there) its moves are finished; if not, its
   files are deleted and its inputs are simply scored again now.
2. Select (this module's policy): an input is new when OUT holds no row for it from this
   model, or when the object was modified after it was last scored (the listing's own
   mtime: one listing, no per-object request), as an Arrow join of the listing against
   the committed rows.
   Modified objects are read and hashed; rows whose (image_uri, content_sha256) were
   already scored are dropped before decoding, so a touched-but-unchanged object is not
   scored twice.
3. Score with the same Ray Data pipeline as ``meddx score``, into the staging folder.
4. Commit: write ``_COMMIT`` (the file list), move the files into ``OUT/dt=RUN_DATE/``,
   remove the staging folder. Readers of ``OUT/dt=*/`` never see uncommitted rows.
   (``meddx.store.commit`` holds this protocol.)
5. Triage and report under ``OUT/_runs/dt=RUN_DATE/``: the worklist (CSV and Parquet;
   ``meddx.pipelines.triage``), one entry per study, with its "positive" section and a
   "needs a human read" section for every study with an image whose ``qc`` is not ok,
   ``summary.json`` and a self-contained ``report.html``.
6. Alarms: error rate over ``--max-error-rate``, quality-control rate over
   ``--max-qc-rate`` or score drift (population stability index against the recent
   runs) over ``--max-psi`` -> one line and a non-zero exit.

Re-running a date scores nothing that is already there: exactly one row per input.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from meddx import MeddxAlarm
from meddx.analysis import drift, page
from meddx.config import ScreenConfig
from meddx.inputs import path_pseudonyms, storage
from meddx.model import ood
from meddx.model.registry import Checkpoint
from meddx.names import OUTPUT_SCHEMA, QC_LOW_QUALITY, QC_OK, QC_WRONG_VIEW
from meddx.pacs import results
from meddx.pipelines import metrics, run
from meddx.pipelines.path_names import as_indexed
from meddx.pipelines.selection import WhatIsNew
from meddx.pipelines.triage import needs_qc, positives, studies, worklist, write_worklist
from meddx.store import commit, films

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NightSummary:
    """What one screening night did: ``summary.json``, the report's counts, the CLI line."""

    run_id: str
    run_date: str
    source: str
    inputs_seen: int
    new_inputs: int
    rows: int
    ok: int
    errors: int
    error_rate: float
    errors_by_reason: dict[str, int]
    positives: int
    threshold: float
    model_name: str
    model_sha256: str
    seconds: float
    images_per_s: float
    recovered: list[str]
    versions: dict[str, str]
    drift: drift.Drift | None = None
    alarms: list[str] = dataclasses.field(default_factory=list)
    # Rows whose qc is not ok (the worklist's "needs a human read"), by qc value.
    qc_flagged: int = 0
    qc_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
    # The worklist's entries, one per (study, model): positives and those needing a
    # human read (the counts above are of rows, one per image and model).
    positive_studies: int = 0
    qc_flagged_studies: int = 0
    # --results-to: Structured Reports stored on the PACS, and those that were not.
    reports_stored: int = 0
    reports_failed: int = 0
    results: str = ""
    # Rows the selection rules left out (status "skipped"): neither scored nor errors.
    skipped: int = 0
    # Each model's figures, in --model order (model_name, model_sha256, threshold, rows,
    # ok, errors, positives, qc_flagged, psi): the fields above count every model's rows
    # and name the first model.
    models: list[dict] = dataclasses.field(default_factory=list)

    @property
    def qc_rate(self) -> float:
        return self.qc_flagged / self.ok if self.ok else 0.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, default=str) + "\n"


class NightAlarm(MeddxAlarm):
    """A night that wrote everything and raised alarms; its summary with it."""

    def __init__(self, summary: NightSummary):
        super().__init__("; ".join(summary.alarms))
        self.summary = summary


def screen(cfg: ScreenConfig) -> NightSummary:
    """One night, holding the lease on OUT from before recovery to after the report; its
    metrics published at its end, whatever the end (``--metrics-file``, ``--pushgateway``)."""
    with metrics.recorded("screen", cfg.metrics_file, cfg.pushgateway) as record:
        if cfg.store:
            from meddx.pipelines import prepare  # it builds on this module's policy

            prepare.write_through(cfg.input, cfg.store, cfg.storage, **prepare.run_options(cfg))
        try:
            summary = run.execute(cfg, Screening(cfg))
        except NightAlarm as alarm:
            record.night(alarm.summary)
            raise
        record.night(summary)
        return summary


# ---- the run --------------------------------------------------------------------------------


@dataclass
class Screening(WhatIsNew):
    """Screening's policy: what is new since the last night (``WhatIsNew``); rows
    another run committed meanwhile are dropped before the commit, which adds to the
    partition; then the worklist, report, summary and alarms."""

    cfg: ScreenConfig
    command: ClassVar[str] = "screen"
    verb: ClassVar[str] = "screened"
    replace: ClassVar[bool] = False
    columns: ClassVar[list[str]] = [f.name for f in OUTPUT_SCHEMA]
    schema: ClassVar[pa.Schema] = OUTPUT_SCHEMA

    def rows(self) -> run.Rows:
        return run.ModelRows(self.cfg)

    def finish(self, outcome: run.Outcome) -> NightSummary:
        cfg = self.cfg
        if cfg.whole_day:  # the run date's rows, of every run: the day's worklist
            rows = commit.read_results(
                cfg.out, cfg.storage, self.columns, dates=[cfg.run_date], schema=self.schema
            )
            outcome = dataclasses.replace(outcome, rows=rows)
        rows = outcome.rows
        summary = summarise(cfg, outcome)
        # Each model's drift against its own recent nights.
        drifts, histories = [], []
        for sha in outcome.shas:
            reference, history = drift.recent_scores(
                cfg.out, cfg.storage, sha, cfg.run_date, cfg.drift_window, page.HISTORY_RUNS
            )
            drifts.append(drift.measure(reference, ok_scores(of_model(rows, sha))))
            histories.append(history)
        models = [
            {**m, "psi": round(d.psi, 4) if d else None}
            for m, d in zip(summary.models, drifts, strict=True)
        ]
        summary = dataclasses.replace(summary, models=models)
        if outcome.sent:
            summary = dataclasses.replace(
                summary,
                reports_stored=outcome.sent.studies,
                reports_failed=len(outcome.sent.failed),
                results=results.describe(outcome.sent, cfg.results_to),
            )
        alarms = check_alarms(cfg, summary, drifts)
        summary = dataclasses.replace(summary, drift=drifts[0], alarms=alarms)
        paths = as_indexed(cfg, outcome.selection.todo["image_uri"].to_pylist())
        ckpts = dict(zip(outcome.shas, outcome.ckpts, strict=True))
        write_artefacts(cfg, summary, rows, ckpts, histories, outcome.located, paths)
        if summary.alarms:
            raise NightAlarm(summary)
        return summary


def of_model(rows: pa.Table, sha: str) -> pa.Table:
    return rows.filter(pc.equal(rows["model_sha256"], sha))


def ok_scores(rows: pa.Table) -> np.ndarray:
    ok = rows.filter(pc.equal(rows["status"], "ok"))
    return np.asarray(ok["score"].to_pylist(), dtype=float)


def summarise(cfg: ScreenConfig, outcome: run.Outcome) -> NightSummary:
    rows, ckpt, seconds = outcome.rows, outcome.ckpt, outcome.seconds
    status = rows["status"].to_pylist()
    errors = Counter(
        e.split(":", 1)[0]
        for e, s in zip(rows["error"].to_pylist(), status, strict=True)
        if s == "error"
    )
    ok, skipped = status.count("ok"), status.count("skipped")
    failed = len(status) - ok - skipped
    flagged = Counter(
        q for q, st in zip(rows["qc"].to_pylist(), status, strict=True) if st == "ok" and q != QC_OK
    )
    return NightSummary(
        run_id=outcome.run_id,
        run_date=cfg.run_date,
        source=cfg.input,
        inputs_seen=outcome.selection.seen,
        new_inputs=outcome.selection.todo.num_rows,
        rows=len(status),
        ok=ok,
        errors=failed,
        # Of the rows the rules selected: a skipped image is no failure.
        error_rate=failed / (len(status) - skipped) if len(status) > skipped else 0.0,
        skipped=skipped,
        errors_by_reason=dict(errors.most_common()),
        positives=positives(rows).num_rows,
        threshold=ckpt.threshold,
        model_name=ckpt.model_name,
        model_sha256=outcome.sha,
        seconds=round(seconds, 2),
        images_per_s=round(len(status) / seconds, 2) if seconds > 0 else 0.0,
        recovered=list(outcome.recovered),
        versions=page.versions(),
        qc_flagged=sum(flagged.values()),
        qc_by_reason=dict(flagged.most_common()),
        positive_studies=studies(positives(rows)),
        qc_flagged_studies=studies(rows.filter(needs_qc(rows))),
        models=[
            model_figures(of_model(rows, sha), c, sha)
            for c, sha in zip(outcome.ckpts, outcome.shas, strict=True)
        ],
    )


def model_figures(rows: pa.Table, ckpt: Checkpoint, sha: str) -> dict:
    """One model's counts of the night."""
    ok = pc.sum(pc.equal(rows["status"], "ok")).as_py() or 0
    skipped = pc.sum(pc.equal(rows["status"], "skipped")).as_py() or 0
    return {
        "model_name": ckpt.model_name,
        "model_sha256": sha,
        "threshold": ckpt.threshold,
        "rows": rows.num_rows,
        "ok": ok,
        "errors": rows.num_rows - ok - skipped,
        "skipped": skipped,
        "positives": positives(rows).num_rows,
        "qc_flagged": rows.filter(needs_qc(rows)).num_rows,
        # Why its out-of-distribution flags are not to be trusted ("" when they are).
        "density_doubt": (ood.untrusted(ckpt) or "") if ckpt is not None else "",
    }


def qc_cause(summary: NightSummary) -> str:
    """What most likely made a night's QC rate high, from what its flags say most: the
    view, the model's density (fitted on too few films), or the feed."""
    top = max(summary.qc_by_reason, key=summary.qc_by_reason.get, default="")
    if top == QC_WRONG_VIEW:
        return "the view: the feed sends views the model was not trained on (--views, --rules)"
    if top == QC_LOW_QUALITY:
        return "the feed: blank, saturated or low-contrast images"
    doubts = [m["density_doubt"] for m in summary.models if m.get("density_doubt")]
    if doubts:
        return f"the model's density: {doubts[0]}"
    return "the feed: films unlike the model's training films (another site, device or protocol)"


def check_alarms(cfg: ScreenConfig, summary: NightSummary, drifts: list[drift.Drift | None]):
    alarms = []
    if summary.rows and summary.error_rate > cfg.max_error_rate:
        alarms.append(
            f"error rate {summary.error_rate:.1%} is over --max-error-rate "
            f"{cfg.max_error_rate:.1%} ({summary.errors} of {summary.rows} rows)"
        )
    if summary.ok and summary.qc_rate > cfg.max_qc_rate:
        reasons = ", ".join(f"{n} {q}" for q, n in summary.qc_by_reason.items())
        alarms.append(
            f"quality-control rate {summary.qc_rate:.1%} is over --max-qc-rate "
            f"{cfg.max_qc_rate:.1%} ({reasons} of {summary.ok} scored rows); most likely "
            f"{qc_cause(summary)}"
        )
    if summary.reports_failed:
        alarms.append(
            f"{summary.reports_failed} studies' reports were not stored: {summary.results}"
        )
    several = len(summary.models) > 1
    for model, scored in zip(summary.models, drifts, strict=True):
        if scored is not None and scored.psi > cfg.max_psi:
            which = f" of {page.model_label(model)}" if several else ""
            alarms.append(
                f"score distribution{which} drifted: PSI {scored.psi:.3f} over --max-psi "
                f"{cfg.max_psi} against {len(scored.reference_dates)} earlier run date(s)"
            )
    return alarms


# Grad-CAM overlays for the top of the worklist in the report: enough to see what the
# model looked at, few enough to compute on the driver's CPU in seconds.
REPORT_HEATMAPS = 3


def store_of(cfg) -> str | None:
    """The store the run read its films from (``--store``, or INPUT itself), if any."""
    if cfg.store:
        return cfg.store
    return cfg.input if films.is_store(cfg.input, cfg.storage) else None


def worklist_heatmaps(
    cfg,
    triage: pa.Table,
    ckpts: dict[str, Checkpoint],
    located: dict[str, str] | None = None,
    paths: dict[str, str] | None = None,
) -> list[tuple[dict, bytes]]:
    """Overlays of the top positives, each by the model that found it (``ckpts``, by
    sha256); ``paths``: the input behind each image_uri (a pseudonym's path, read here
    and never written). A tar member's pseudonym has none: it gets no overlay."""
    from meddx.analysis.explain import cams, titled_overlays

    try:
        found = triage.filter(pc.equal(triage["section"], "positive"))
        rows = found.slice(0, REPORT_HEATMAPS).to_pylist()
        paths = paths or {}
        rows = [
            r
            for r in rows
            if not path_pseudonyms.is_path_pseudonym(r["image_uri"]) or r["image_uri"] in paths
        ]
        overlays = {}
        for sha, ckpt in ckpts.items():
            mine = [r for r in rows if r["model_sha256"] == sha]
            readable = [{**r, "image_uri": paths.get(r["image_uri"], r["image_uri"])} for r in mine]
            maps = cams(readable, ckpt, cfg.storage, cfg.max_object_bytes, located, store_of(cfg))
            for r, png in zip(mine, titled_overlays(mine, maps, ckpt), strict=True):
                overlays[(r["image_uri"], sha)] = png
        return [(r, overlays[(r["image_uri"], r["model_sha256"])]) for r in rows]
    except Exception as exc:  # a heatmap is a courtesy: never fail a night for it
        log.warning("meddx: no heatmaps in the report: %s", type(exc).__name__)
        return []


def write_artefacts(
    cfg,
    summary: NightSummary,
    rows,
    ckpts: dict[str, Checkpoint],
    histories: list,
    located=None,
    paths=None,
) -> None:
    """The worklist, report and summary of the night; ``ckpts``: each model by its
    sha256, ``histories``: each model's recent scores by date, in --model order."""
    folder = storage.join(cfg.out, commit.RUNS, f"dt={cfg.run_date}")
    triage = worklist(rows)
    write_worklist(folder, triage, cfg.storage)
    overlays = worklist_heatmaps(cfg, triage, ckpts, located, paths)
    html = page.render(summary, rows, triage, histories, overlays)
    storage.write_bytes(storage.join(folder, "report.html"), html.encode(), cfg.storage)
    storage.write_bytes(
        storage.join(folder, "summary.json"), summary.to_json().encode(), cfg.storage
    )
