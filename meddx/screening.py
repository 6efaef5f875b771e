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
5. Triage and report under ``OUT/_runs/dt=RUN_DATE/``: worklist (CSV and Parquet),
   ``summary.json`` and a self-contained ``report.html``.
6. Alarms: error rate over ``--max-error-rate`` or score drift (population stability
   index against the recent runs) over ``--max-psi`` -> one line and a non-zero exit.

Re-running a date scores nothing that is already there: exactly one row per input.
"""

from __future__ import annotations

import datetime as dt
import json
import posixpath
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from meddx import MeddxAlarm, MeddxError, models, report, sources, storage
from meddx.predict import OUTPUT_SCHEMA
from meddx.scoring import ScoreConfig, build_dataset, check_run_date, file_metadata, init_ray
from meddx.storage import StorageSettings

STAGING = "_staging"
RUNS = "_runs"
COMMIT = "_COMMIT"
# PSI needs enough scores on both sides to mean anything.
MIN_DRIFT_SAMPLES = 30


@dataclass(frozen=True)
class ScreenConfig(ScoreConfig):
    """What ``meddx score`` takes (``input`` is the watched source) plus a night's own."""

    new_model: bool = False
    max_error_rate: float = 0.05
    max_psi: float = 0.25
    drift_window: int = 7  # how many earlier run dates form the reference distribution


# ---- staging and commit ----------------------------------------------------------------


def _fs(cfg: ScreenConfig):
    return storage.filesystem(cfg.out, cfg.storage)


def _path(cfg: ScreenConfig, *parts: str) -> str:
    return posixpath.join(storage.strip_scheme(cfg.out), *parts)


def recover(cfg: ScreenConfig) -> list[str]:
    """Finish committed runs left behind, delete uncommitted ones; return what was done."""
    fs, done = _fs(cfg), []
    root = _path(cfg, STAGING)
    if not fs.exists(root):
        return done
    for folder in sorted(fs.ls(root, detail=False)):
        marker = posixpath.join(folder, COMMIT)
        if fs.exists(marker):
            plan = json.loads(fs.cat_file(marker))
            _move_all(fs, plan)
            done.append(f"finished commit of {plan['run_id']}")
        else:
            done.append(f"discarded uncommitted run {posixpath.basename(folder)}")
        fs.rm(folder, recursive=True)
    fs.invalidate_cache()
    return done


def _move_all(fs, plan: dict) -> None:
    for source, target in plan["moves"]:
        if fs.exists(source):
            fs.makedirs(posixpath.dirname(target), exist_ok=True)
            fs.mv(source, target)


def commit(cfg: ScreenConfig, staging: str, run_id: str) -> list[str]:
    fs = _fs(cfg)
    fs.invalidate_cache()
    files = sorted(p for p in fs.find(staging) if p.endswith(".parquet"))
    partition = _path(cfg, f"dt={cfg.run_date}")
    moves = [(f, posixpath.join(partition, f"{run_id}-{posixpath.basename(f)}")) for f in files]
    plan = {"run_id": run_id, "run_date": cfg.run_date, "moves": moves}
    fs.pipe_file(posixpath.join(staging, COMMIT), json.dumps(plan).encode())
    _move_all(fs, plan)
    fs.rm(staging, recursive=True)
    fs.invalidate_cache()
    return [target for _, target in moves]


# ---- what is new ------------------------------------------------------------------------


RESULTS_SCHEMA = OUTPUT_SCHEMA.append(pa.field("dt", pa.string()))


def read_results(cfg: ScreenConfig, columns: list[str], where=None) -> pa.Table:
    """Committed rows under OUT (every ``dt=`` partition), or an empty table.

    Names starting with ``_`` (staging, run artefacts) are skipped, as every engine does.
    """
    fs = storage.arrow_filesystem(cfg.out, cfg.storage)
    root = _path(cfg)
    empty = RESULTS_SCHEMA.empty_table().select(columns)
    if not storage.filesystem(cfg.out, cfg.storage).exists(root):
        return empty
    partitioning = pads.partitioning(pa.schema([("dt", pa.string())]), flavor="hive")
    ds = pads.dataset(
        root, filesystem=fs, format="parquet", schema=RESULTS_SCHEMA, partitioning=partitioning
    )
    if not ds.files:
        return empty
    return ds.to_table(columns=columns, filter=where)


def select_new(cfg: ScreenConfig, listing: list[tuple[str, float | None]], sha: str):
    """(inputs to read, {uri: [known content hashes]}) for this model."""
    done = read_results(cfg, ["image_uri", "content_sha256", "model_sha256", "scored_at"])
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
    for uri, modified in listing:
        if uri not in last_scored:
            todo.append(uri)
        elif modified is not None and modified > last_scored[uri]:
            todo.append(uri)
            recheck[uri] = True
    known_for_todo = {u: shas for u, shas in known.items() if u.split("#", 1)[0] in recheck}
    return todo, known_for_todo


def listing_with_times(source: str, settings: StorageSettings) -> list[tuple[str, float | None]]:
    """Inputs with their modification time (None from a manifest: nothing is listed)."""
    uris = sources.list_inputs(source, settings)
    if sources.is_manifest(source):
        return [(u, None) for u in uris]
    fs = storage.filesystem(source, settings)
    return [(u, _mtime(fs.info(storage.strip_scheme(u)))) for u in uris]


def _mtime(info: dict) -> float | None:
    value = info.get("LastModified") or info.get("mtime") or info.get("created")
    if isinstance(value, dt.datetime):
        return value.timestamp()
    return float(value) if value is not None else None


# ---- drift --------------------------------------------------------------------------------


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index over the reference's deciles (0: same distribution)."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)))
    edges[0], edges[-1] = -np.inf, np.inf
    ref = np.histogram(reference, edges)[0] / len(reference)
    cur = np.histogram(current, edges)[0] / len(current)
    ref, cur = np.clip(ref, 1e-4, None), np.clip(cur, 1e-4, None)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def scores_by_date(cfg: ScreenConfig, sha: str) -> dict[str, np.ndarray]:
    """This model's ok scores per run date, read once for the drift reference and the
    report's history."""
    rows = read_results(
        cfg, ["score", "model_sha256", "status", "dt"], where=pc.field("status") == "ok"
    )
    rows = rows.filter(pc.equal(rows["model_sha256"], sha))
    dates = np.asarray(rows["dt"].to_pylist(), dtype=object)
    scores = np.asarray(rows["score"].to_pylist(), dtype=float)
    return {str(d): scores[dates == d] for d in sorted(set(dates.tolist()))}


# ---- the run --------------------------------------------------------------------------------


def screen(cfg: ScreenConfig) -> dict:
    start = time.perf_counter()
    check_run_date(cfg.run_date)
    storage.require_bucket(cfg.out, cfg.storage)
    recovered = recover(cfg)
    ckpt, sha = models.read_checkpoint(cfg.model, cfg.storage, cfg.model_sha256)
    listing = listing_with_times(cfg.input, cfg.storage)
    todo, known = select_new(cfg, listing, sha)
    run_id = f"{cfg.run_date}-{uuid.uuid4().hex[:12]}"
    if todo:
        init_ray()
        staging = _path(cfg, STAGING, run_id)
        schema = OUTPUT_SCHEMA.with_metadata(file_metadata(ckpt, sha, run_id, cfg))
        build_dataset(cfg, todo, ckpt, run_id, known=known, sha=sha).write_parquet(
            staging, filesystem=storage.arrow_filesystem(cfg.out, cfg.storage), schema=schema
        )
        commit(cfg, staging, run_id)
    seconds = time.perf_counter() - start
    rows = read_results(cfg, [f.name for f in OUTPUT_SCHEMA], where=pc.field("run_id") == run_id)
    summary = summarise(cfg, rows, listing, todo, ckpt, sha, run_id, seconds, recovered)
    by_date = scores_by_date(cfg, sha)
    # Drift is judged against the nights before this one (a re-run of the same night
    # is not its own reference); the report shows the recent nights up to this one.
    reference_dates = [d for d in by_date if d < cfg.run_date][-cfg.drift_window :]
    reference = np.concatenate([by_date[d] for d in reference_dates] or [np.array([])])
    history = {
        d: by_date[d] for d in [d for d in by_date if d <= cfg.run_date][-report.HISTORY_RUNS :]
    }
    alarms = check_alarms(cfg, summary, rows, reference, reference_dates)
    summary["alarms"] = alarms
    write_artefacts(cfg, summary, rows, ckpt, history)
    if alarms:
        raise MeddxAlarm("; ".join(alarms))
    return summary


def summarise(cfg, rows, listing, todo, ckpt, sha, run_id, seconds, recovered) -> dict:
    status = rows["status"].to_pylist()
    errors = Counter(
        e.split(":", 1)[0]
        for e, s in zip(rows["error"].to_pylist(), status, strict=True)
        if s == "error"
    )
    ok = status.count("ok")
    return {
        "run_id": run_id,
        "run_date": cfg.run_date,
        "source": cfg.input,
        "inputs_seen": len(listing),
        "new_inputs": len(todo),
        "rows": len(status),
        "ok": ok,
        "errors": len(status) - ok,
        "error_rate": (len(status) - ok) / len(status) if status else 0.0,
        "errors_by_reason": dict(errors.most_common()),
        "positives": int(
            sum(
                1
                for s, v in zip(status, rows["score"].to_pylist(), strict=True)
                if s == "ok" and v >= float(ckpt["threshold"])
            )
        ),
        "threshold": float(ckpt["threshold"]),
        "model_name": ckpt["model_name"],
        "model_sha256": sha,
        "seconds": round(seconds, 2),
        "images_per_s": round(len(status) / seconds, 2) if seconds > 0 else 0.0,
        "recovered": recovered,
        "versions": report.versions(),
    }


def check_alarms(cfg, summary, rows, reference, reference_dates) -> list[str]:
    alarms = []
    if summary["rows"] and summary["error_rate"] > cfg.max_error_rate:
        alarms.append(
            f"error rate {summary['error_rate']:.1%} is over --max-error-rate "
            f"{cfg.max_error_rate:.1%} ({summary['errors']} of {summary['rows']} rows)"
        )
    current = np.asarray(
        [
            v
            for v, s in zip(rows["score"].to_pylist(), rows["status"].to_pylist(), strict=True)
            if s == "ok"
        ],
        dtype=float,
    )
    summary["drift"] = None
    if len(current) >= MIN_DRIFT_SAMPLES and len(reference) >= MIN_DRIFT_SAMPLES:
        value = psi(reference, current)
        summary["drift"] = {
            "psi": round(value, 4),
            "reference_dates": reference_dates,
            "reference_n": len(reference),
            "current_n": len(current),
        }
        if value > cfg.max_psi:
            alarms.append(
                f"score distribution drifted: PSI {value:.3f} over --max-psi {cfg.max_psi} "
                f"against {len(reference_dates)} earlier run date(s)"
            )
    return alarms


def worklist(rows: pa.Table, threshold: float) -> pa.Table:
    """Positives above the threshold, highest score first. Triage only orders the reading."""
    positives = rows.filter(
        pc.and_(pc.equal(rows["status"], "ok"), pc.greater_equal(rows["score"], threshold))
    )
    positives = positives.sort_by([("score", "descending"), ("image_uri", "ascending")])
    cols = [
        "image_uri",
        "score",
        "label",
        "study_pseudonym",
        "instance_pseudonym",
        "modality",
        "view_position",
        "model_name",
        "run_id",
    ]
    table = positives.select(cols)
    return table.add_column(0, "rank", pa.array(range(1, table.num_rows + 1), pa.int32()))


# Grad-CAM overlays for the top of the worklist in the report: enough to see what the
# model looked at, few enough to compute on the driver's CPU in seconds.
REPORT_HEATMAPS = 3


def worklist_heatmaps(cfg, triage: pa.Table, ckpt: dict) -> list[tuple[dict, bytes]]:
    from meddx.explain import heatmaps

    try:
        return heatmaps(triage.slice(0, REPORT_HEATMAPS).to_pylist(), ckpt, cfg.storage)
    except Exception as exc:  # a heatmap is a courtesy: never fail a night for it
        print(f"meddx: no heatmaps in the report: {type(exc).__name__}")
        return []


def write_artefacts(cfg, summary, rows, ckpt, history) -> None:
    folder = storage.join(cfg.out, RUNS, f"dt={cfg.run_date}")
    triage = worklist(rows, summary["threshold"])
    buf = pa.BufferOutputStream()
    pq.write_table(triage, buf)
    storage.write_bytes(
        storage.join(folder, "worklist.parquet"), buf.getvalue().to_pybytes(), cfg.storage
    )
    csv_buf = pa.BufferOutputStream()
    pacsv.write_csv(triage, csv_buf)
    storage.write_bytes(
        storage.join(folder, "worklist.csv"), csv_buf.getvalue().to_pybytes(), cfg.storage
    )
    html = report.render(summary, rows, triage, history, worklist_heatmaps(cfg, triage, ckpt))
    storage.write_bytes(storage.join(folder, "report.html"), html.encode(), cfg.storage)
    storage.write_bytes(
        storage.join(folder, "summary.json"),
        (json.dumps(summary, indent=2, default=str) + "\n").encode(),
        cfg.storage,
    )
