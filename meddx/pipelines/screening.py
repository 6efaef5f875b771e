"""Nightly screening: score what arrived since the last run, commit atomically, triage.

    meddx screen SOURCE --model CKPT --out OUT --run-date 2026-11-26

1. Recover: a run killed earlier left its files under ``OUT/_staging/RUN_ID/``. If it
   had committed (a ``_COMMIT`` list is there) its moves are finished; if not, its
   files are deleted and its inputs are simply scored again now.
2. Select: an input is new when OUT holds no row for it from this model, or when the
   object was modified after it was last scored (listing time). Modified objects are
   read and hashed; rows whose (image_uri, content_sha256) were already scored are
   dropped before decoding, so a touched-but-unchanged object is not scored twice.
3. Score with the same Ray Data pipeline as ``meddx score``, into the staging folder.
4. Commit: write ``_COMMIT`` (the file list), move the files into ``OUT/dt=RUN_DATE/``,
   remove the staging folder. Readers of ``OUT/dt=*/`` never see uncommitted rows.
   (``commit.py`` holds this protocol; ``meddx score`` commits the same way.)
5. Triage and report under ``OUT/_runs/dt=RUN_DATE/``: worklist (CSV and Parquet) with
   its "positive" section and a "needs a human read" section for every row whose ``qc``
   is not ok, ``summary.json`` and a self-contained ``page.html``.
6. Alarms: error rate over ``--max-error-rate``, quality-control rate over
   ``--max-qc-rate`` or score drift (population stability index against the recent
   runs) over ``--max-psi`` -> one line and a non-zero exit.

Re-running a date scores nothing that is already there: exactly one row per input.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from meddx import MeddxAlarm, MeddxError, secret
from meddx.analysis import drift, page
from meddx.config import ScreenConfig
from meddx.inputs import sources, storage
from meddx.model import registry
from meddx.model.registry import Checkpoint
from meddx.names import HUMAN_READ, OUTPUT_SCHEMA, QC_OK
from meddx.pacs import stow
from meddx.pipelines import cluster
from meddx.pipelines.scoring import (
    as_indexed,
    build_dataset,
    file_metadata,
    path_key,
    write_path_map,
)
from meddx.store import commit, lease, progress


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
    # --results-to: Structured Reports stored on the PACS, and those that were not.
    reports_stored: int = 0
    reports_failed: int = 0
    results: str = ""

    @property
    def qc_rate(self) -> float:
        return self.qc_flagged / self.ok if self.ok else 0.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, default=str) + "\n"


# ---- what is new ------------------------------------------------------------------------


def select_new(cfg: ScreenConfig, listing: list[tuple[str, float | None]], sha: str):
    """(inputs to read, {uri: [known content hashes]}) for this model. OUT's rows name
    inputs as ``as_indexed`` does (pseudonyms under --pseudonymize-paths), and so do the
    hashes' keys, as the read stage compares them."""
    done = commit.read_results(
        cfg.out, cfg.storage, ["image_uri", "content_sha256", "model_sha256", "scored_at"]
    )
    others = set(pc.unique(done["model_sha256"]).to_pylist()) - {sha, None}
    if others and not cfg.new_model:
        raise MeddxError(
            f"{cfg.out} holds results of another model ({sorted(others)[0][:12]}...): "
            "pass --new-model to score everything again with this one"
        )
    done = done.filter(
        pc.and_(pc.equal(done["model_sha256"], sha), pc.is_valid(done["content_sha256"]))
    )
    known: dict[str, list[str]] = {}
    last_scored: dict[str, float] = {}
    for uri, content, when in zip(
        done["image_uri"].to_pylist(),
        done["content_sha256"].to_pylist(),
        done["scored_at"].to_pylist(),
        strict=True,
    ):
        known.setdefault(uri, []).append(content)
        base = uri.split("#", 1)[0]  # a tar member counts for its shard
        last_scored[base] = max(last_scored.get(base, 0.0), when.timestamp())
    todo, recheck = [], {}
    key = path_key(cfg)
    for uri, modified in listing:
        name = sources.path_pseudonym(uri, key) if key else uri
        if name not in last_scored:
            todo.append(uri)
        elif modified is not None and modified > last_scored[name]:
            todo.append(uri)
            recheck[name] = True
    known_for_todo = {u: shas for u, shas in known.items() if u.split("#", 1)[0] in recheck}
    return todo, known_for_todo


def listing_with_times(
    cfg: ScreenConfig,
) -> tuple[list[tuple[str, float | None]], dict[str, str] | None]:
    """Inputs with their modification time (None from a manifest or a PACS: nothing is
    listed with a time, and a DICOM instance never changes), and a DICOMweb source's
    locators (sources.list_located)."""
    uris, located = sources.list_located(
        cfg.input, cfg.storage, secret.pseudonym_key(), cfg.since_days, cfg.max_object_bytes
    )
    if located is not None or sources.is_manifest(cfg.input):
        return [(u, None) for u in uris], located
    fs = storage.filesystem(cfg.input, cfg.storage)
    return [(u, _mtime(fs.info(storage.strip_scheme(u)))) for u in uris], None


def _mtime(info: dict) -> float | None:
    value = info.get("LastModified") or info.get("mtime") or info.get("created")
    if isinstance(value, dt.datetime):
        return value.timestamp()
    return float(value) if value is not None else None


# ---- the run --------------------------------------------------------------------------------


def screen(cfg: ScreenConfig) -> NightSummary:
    """One night, holding the lease on OUT from before recovery to after the report."""
    start = time.perf_counter()
    path_key(cfg)  # --pseudonymize-paths without a key: refused before OUT is touched
    storage.require_bucket(cfg.out, cfg.storage)
    run_id = cluster.new_run_id(cfg.run_date)
    with lease.held(
        cfg.out, cfg.storage, run_id, "screen", cfg.wait_for_lock, cfg.lock_timeout
    ) as held:
        return _screen(cfg, run_id, held, start)


def _screen(cfg: ScreenConfig, run_id: str, held: lease.Lease, start: float) -> NightSummary:
    recovered = commit.recover(cfg.out, cfg.storage)
    ckpt, sha = registry.read_checkpoint(cfg.model, cfg.storage, cfg.model_sha256)
    listing, located = listing_with_times(cfg)
    todo, known = select_new(cfg, listing, sha)
    if todo:
        cluster.init_ray()
        schema = OUTPUT_SCHEMA.with_metadata(file_metadata(ckpt, sha, run_id, cfg))
        ds = build_dataset(cfg, todo, ckpt, run_id, known=known, sha=sha, located=located)
        with progress.shown(
            cfg.out, cfg.storage, run_id, len(todo), "screened", cfg.progress_seconds, cfg.quiet
        ):
            commit.write_staged(ds, cfg.out, cfg.storage, run_id, schema)
        held.check()
        # Defence in depth, for a store that ignores conditional writes: inputs another
        # run committed since they were selected are not committed again.
        selected = [(u, m) for u, m in listing if u in set(todo)]
        still_new = set(select_new(cfg, selected, sha)[0])
        gone = {u for u, _ in selected if u not in still_new}
        if gone:
            dropped = commit.drop_staged(cfg.out, cfg.storage, run_id, set(as_indexed(cfg, gone)))
            print(
                f"meddx: {len(gone)} inputs were committed by another run meanwhile: "
                f"dropped their {dropped} rows",
                file=sys.stderr,
            )
        commit.commit(cfg.out, cfg.storage, run_id, cfg.run_date, fence=held.check)
        write_path_map(cfg, run_id, todo)
    seconds = time.perf_counter() - start
    rows = commit.read_results(
        cfg.out, cfg.storage, [f.name for f in OUTPUT_SCHEMA], where=pc.field("run_id") == run_id
    )
    summary = summarise(cfg, rows, listing, todo, ckpt, sha, run_id, seconds, recovered)
    reference, history = drift.recent_scores(
        cfg.out, cfg.storage, sha, cfg.run_date, cfg.drift_window, page.HISTORY_RUNS
    )
    scored = drift.measure(reference, ok_scores(rows))
    if cfg.results_to and located and todo:
        sent = stow.send_run(cfg, run_id, located, ckpt, sha)
        summary = dataclasses.replace(
            summary,
            reports_stored=sent.studies,
            reports_failed=len(sent.failed),
            results=stow.describe(sent, cfg.results_to),
        )
    summary = dataclasses.replace(summary, drift=scored, alarms=check_alarms(cfg, summary, scored))
    write_artefacts(cfg, summary, rows, ckpt, history, located, as_indexed(cfg, todo))
    if summary.alarms:
        raise MeddxAlarm("; ".join(summary.alarms))
    return summary


def ok_scores(rows: pa.Table) -> np.ndarray:
    ok = rows.filter(pc.equal(rows["status"], "ok"))
    return np.asarray(ok["score"].to_pylist(), dtype=float)


def summarise(cfg, rows, listing, todo, ckpt: Checkpoint, sha, run_id, seconds, recovered):
    status = rows["status"].to_pylist()
    errors = Counter(
        e.split(":", 1)[0]
        for e, s in zip(rows["error"].to_pylist(), status, strict=True)
        if s == "error"
    )
    ok = status.count("ok")
    flagged = Counter(
        q for q, st in zip(rows["qc"].to_pylist(), status, strict=True) if st == "ok" and q != QC_OK
    )
    return NightSummary(
        run_id=run_id,
        run_date=cfg.run_date,
        source=cfg.input,
        inputs_seen=len(listing),
        new_inputs=len(todo),
        rows=len(status),
        ok=ok,
        errors=len(status) - ok,
        error_rate=(len(status) - ok) / len(status) if status else 0.0,
        errors_by_reason=dict(errors.most_common()),
        positives=positives(rows, ckpt.threshold).num_rows,
        threshold=ckpt.threshold,
        model_name=ckpt.model_name,
        model_sha256=sha,
        seconds=round(seconds, 2),
        images_per_s=round(len(status) / seconds, 2) if seconds > 0 else 0.0,
        recovered=recovered,
        versions=page.versions(),
        qc_flagged=sum(flagged.values()),
        qc_by_reason=dict(flagged.most_common()),
    )


def check_alarms(cfg: ScreenConfig, summary: NightSummary, scored: drift.Drift | None):
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
            f"{cfg.max_qc_rate:.1%} ({reasons} of {summary.ok} scored rows)"
        )
    if summary.reports_failed:
        alarms.append(
            f"{summary.reports_failed} studies' reports were not stored: {summary.results}"
        )
    if scored is not None and scored.psi > cfg.max_psi:
        alarms.append(
            f"score distribution drifted: PSI {scored.psi:.3f} over --max-psi {cfg.max_psi} "
            f"against {len(scored.reference_dates)} earlier run date(s)"
        )
    return alarms


def needs_qc(rows: pa.Table) -> pa.Expression:
    return pc.and_(pc.equal(rows["status"], "ok"), pc.not_equal(rows["qc"], QC_OK))


def positives(rows: pa.Table, threshold: float) -> pa.Table:
    """Scored rows at or above the threshold that passed quality control."""
    return rows.filter(
        pc.and_(
            pc.and_(pc.equal(rows["status"], "ok"), pc.equal(rows["qc"], QC_OK)),
            pc.greater_equal(rows["score"], threshold),
        )
    )


WORKLIST_COLUMNS = [
    "image_uri",
    "score",
    "label",
    "qc",
    "ood_score",
    "study_pseudonym",
    "instance_pseudonym",
    "modality",
    "view_position",
    "model_name",
    "run_id",
]


def worklist(rows: pa.Table, threshold: float) -> pa.Table:
    """Two sections, each ranked from 1. ``positive``: rows above the threshold that
    passed quality control, highest score first. ``needs a human read``: every row whose
    qc is not ok, whatever its score (the model's score of an image it should not judge
    is no negative), grouped by reason, highest score first. Triage only orders the
    reading."""
    found = positives(rows, threshold).sort_by(
        [("score", "descending"), ("image_uri", "ascending")]
    )
    flagged = rows.filter(needs_qc(rows)).sort_by(
        [("qc", "ascending"), ("score", "descending"), ("image_uri", "ascending")]
    )
    sections = []
    for name, table in (("positive", found), (HUMAN_READ, flagged)):
        table = table.select(WORKLIST_COLUMNS)
        table = table.add_column(0, "rank", pa.array(range(1, table.num_rows + 1), pa.int32()))
        sections.append(
            table.add_column(0, "section", pa.array([name] * table.num_rows, pa.string()))
        )
    return pa.concat_tables(sections)


# A spreadsheet runs a cell that starts with one of these as a formula (=HYPERLINK(...)
# opens a URL, older ones ran commands): OWASP's CSV-injection list, tab and CR included.
FORMULA_START = r"^[=+\-@\t\r]"


def spreadsheet_safe(table: pa.Table) -> pa.Table:
    """Every string cell that a spreadsheet would run as a formula, prefixed with a
    quote (shown as text, OWASP's advice); numbers and other cells as they are."""
    for i, column in enumerate(table.columns):
        if pa.types.is_string(column.type):
            risky = pc.fill_null(pc.match_substring_regex(column, FORMULA_START), False)
            quoted = pc.binary_join_element_wise("'", column, "")
            table = table.set_column(i, table.field(i), pc.if_else(risky, quoted, column))
    return table


# Grad-CAM overlays for the top of the worklist in the report: enough to see what the
# model looked at, few enough to compute on the driver's CPU in seconds.
REPORT_HEATMAPS = 3


def worklist_heatmaps(
    cfg,
    triage: pa.Table,
    ckpt: Checkpoint,
    located: dict[str, str] | None = None,
    paths: dict[str, str] | None = None,
) -> list[tuple[dict, bytes]]:
    """Overlays of the top positives; ``paths``: the input behind each image_uri (a
    pseudonym's path, read here and never written). A tar member's pseudonym has none:
    it gets no overlay."""
    from meddx.analysis.explain import heatmaps

    try:
        found = triage.filter(pc.equal(triage["section"], "positive"))
        rows = found.slice(0, REPORT_HEATMAPS).to_pylist()
        paths = paths or {}
        rows = [
            r
            for r in rows
            if not sources.is_path_pseudonym(r["image_uri"]) or r["image_uri"] in paths
        ]
        readable = [{**r, "image_uri": paths.get(r["image_uri"], r["image_uri"])} for r in rows]
        made = heatmaps(readable, ckpt, cfg.storage, cfg.max_object_bytes, located)
        return [(row, png) for row, (_, png) in zip(rows, made, strict=True)]
    except Exception as exc:  # a heatmap is a courtesy: never fail a night for it
        print(f"meddx: no heatmaps in the report: {type(exc).__name__}")
        return []


def write_artefacts(
    cfg, summary: NightSummary, rows, ckpt: Checkpoint, history, located=None, paths=None
) -> None:
    folder = storage.join(cfg.out, commit.RUNS, f"dt={cfg.run_date}")
    triage = worklist(rows, summary.threshold)
    buf = pa.BufferOutputStream()
    pq.write_table(triage, buf)
    storage.write_bytes(
        storage.join(folder, "worklist.parquet"), buf.getvalue().to_pybytes(), cfg.storage
    )
    csv_buf = pa.BufferOutputStream()
    pacsv.write_csv(spreadsheet_safe(triage), csv_buf)
    storage.write_bytes(
        storage.join(folder, "worklist.csv"), csv_buf.getvalue().to_pybytes(), cfg.storage
    )
    overlays = worklist_heatmaps(cfg, triage, ckpt, located, paths)
    html = page.render(summary, rows, triage, history, overlays)
    storage.write_bytes(storage.join(folder, "page.html"), html.encode(), cfg.storage)
    storage.write_bytes(
        storage.join(folder, "summary.json"), summary.to_json().encode(), cfg.storage
    )
