"""How rows reach ``OUT/dt=RUN_DATE/``: staged first, committed whole, for every command.

A run writes its Parquet files to ``OUT/_staging/RUN_ID/``, where no reader looks (every
engine skips ``_`` names). When every file is written, the run records its plan in
``_staging/RUN_ID/_COMMIT`` (which files move where, and which earlier files of the
partition it replaces), carries it out and removes the staging folder. A run killed
before the plan is written leaves nothing visible and the next run discards its files;
one killed during the moves is finished by the next run (``recover``), which reads the
plan and completes it. Readers of ``OUT/dt=*/`` therefore never see a partial run.
"""

from __future__ import annotations

import json
import posixpath

import pyarrow as pa
import pyarrow.dataset as pads

from meddx import storage
from meddx.names import OUTPUT_SCHEMA
from meddx.storage import StorageSettings

STAGING = "_staging"
COMMIT = "_COMMIT"
RUNS = "_runs"  # run artefacts (report, summary, worklist) per run date
RESULTS_SCHEMA = OUTPUT_SCHEMA.append(pa.field("dt", pa.string()))
PARTITIONING = pads.partitioning(pa.schema([("dt", pa.string())]), flavor="hive")


def _path(out: str, *parts: str) -> str:
    return posixpath.join(storage.strip_scheme(out), *parts)


def partition_uri(out: str, run_date: str) -> str:
    return storage.join(out, f"dt={run_date}")


def staging_path(out: str, run_id: str) -> str:
    """Where a run writes its files (a path of ``storage.arrow_filesystem(out)``)."""
    return _path(out, STAGING, run_id)


def write_staged(ds, out: str, settings: StorageSettings, run_id: str, schema: pa.Schema) -> str:
    """Write a Ray Dataset of output rows into this run's staging folder."""
    staging = staging_path(out, run_id)
    ds.write_parquet(staging, filesystem=storage.arrow_filesystem(out, settings), schema=schema)
    return staging


def read_staged(out: str, settings: StorageSettings, run_id: str, columns: list[str]) -> pa.Table:
    """The rows a run has staged (none yet: an empty table)."""
    fs = storage.filesystem(out, settings)
    staging = staging_path(out, run_id)
    fs.invalidate_cache()
    files = (
        sorted(p for p in fs.find(staging) if p.endswith(".parquet")) if fs.exists(staging) else []
    )
    if not files:
        return OUTPUT_SCHEMA.empty_table().select(columns)
    return pads.dataset(
        files, filesystem=storage.arrow_filesystem(out, settings), format="parquet"
    ).to_table(columns=columns)


def _move_all(fs, plan: dict) -> None:
    for source, target in plan["moves"]:
        if fs.exists(source):
            fs.makedirs(posixpath.dirname(target), exist_ok=True)
            fs.mv(source, target)
    # Replaced files go after the new ones are in: a reader may briefly see both runs,
    # never neither.
    for old in plan.get("removes", []):
        if fs.exists(old):
            fs.rm(old)


def commit(
    out: str, settings: StorageSettings, run_id: str, run_date: str, *, replace: bool = False
) -> list[str]:
    """Move a run's staged files into ``dt=RUN_DATE``; with ``replace`` the partition's
    earlier files go. Returns the committed paths."""
    fs = storage.filesystem(out, settings)
    fs.invalidate_cache()
    staging = staging_path(out, run_id)
    files = sorted(p for p in fs.find(staging) if p.endswith(".parquet"))
    partition = _path(out, f"dt={run_date}")
    moves = [(f, posixpath.join(partition, f"{run_id}-{posixpath.basename(f)}")) for f in files]
    removes = []
    if replace and fs.exists(partition):
        removes = sorted(p for p in fs.find(partition) if p.endswith(".parquet"))
    plan = {"run_id": run_id, "run_date": run_date, "moves": moves, "removes": removes}
    fs.pipe_file(posixpath.join(staging, COMMIT), json.dumps(plan).encode())
    _move_all(fs, plan)
    fs.rm(staging, recursive=True)
    fs.invalidate_cache()
    return [target for _, target in moves]


def drop_staged(out: str, settings: StorageSettings, run_id: str, uris: set[str]) -> int:
    """Remove from a run's staged files the rows of ``uris`` (a shard's members go with
    their shard); the number of rows removed."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs = storage.filesystem(out, settings)
    fs.invalidate_cache()
    removed = 0
    for path in sorted(p for p in fs.find(staging_path(out, run_id)) if p.endswith(".parquet")):
        with fs.open(path, "rb") as fh:
            table = pq.read_table(fh)
        base = pc.list_element(pc.split_pattern(table["image_uri"], "#", max_splits=1), 0)
        keep = pc.invert(pc.is_in(base, pa.array(sorted(uris), pa.string())))
        kept = table.filter(keep)
        if kept.num_rows == table.num_rows:
            continue
        removed += table.num_rows - kept.num_rows
        if kept.num_rows:
            with fs.open(path, "wb") as fh:
                pq.write_table(kept, fh)
        else:
            fs.rm(path)
    fs.invalidate_cache()
    return removed


def discard(out: str, settings: StorageSettings, run_id: str) -> None:
    """Remove a run's staging folder without committing it."""
    fs = storage.filesystem(out, settings)
    staging = staging_path(out, run_id)
    if fs.exists(staging):
        fs.rm(staging, recursive=True)
    fs.invalidate_cache()


def recover(out: str, settings: StorageSettings, keep: str | None = None) -> list[str]:
    """Finish committed runs left behind, delete uncommitted ones (but ``keep``, a run
    being resumed); return what was done."""
    fs, done = storage.filesystem(out, settings), []
    root = _path(out, STAGING)
    fs.invalidate_cache()
    if not fs.exists(root):
        return done
    for folder in sorted(fs.ls(root, detail=False)):
        marker = posixpath.join(folder, COMMIT)
        if fs.exists(marker):
            plan = json.loads(fs.cat_file(marker))
            _move_all(fs, plan)
            done.append(f"finished commit of {plan['run_id']}")
        elif posixpath.basename(folder) == keep:
            done.append(f"resuming uncommitted run {keep}")
            continue
        else:
            done.append(f"discarded uncommitted run {posixpath.basename(folder)}")
        fs.rm(folder, recursive=True)
    fs.invalidate_cache()
    return done


def last_uncommitted(out: str, settings: StorageSettings, run_date: str) -> str | None:
    """The run id of the latest uncommitted run of ``run_date`` left under OUT (the one
    whose staged files changed last), or None."""
    fs = storage.filesystem(out, settings)
    root = _path(out, STAGING)
    fs.invalidate_cache()
    if not fs.exists(root):
        return None
    latest, when = None, -1.0
    for folder in fs.ls(root, detail=False):
        run_id = posixpath.basename(folder)
        if not run_id.startswith(f"{run_date}-") or fs.exists(posixpath.join(folder, COMMIT)):
            continue
        files = fs.find(folder, detail=True).values()
        changed = max((_modified(f) for f in files), default=0.0)
        if changed > when:
            latest, when = run_id, changed
    return latest


def _modified(info: dict) -> float:
    value = info.get("LastModified") or info.get("mtime") or 0.0
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def readable_staged(out: str, settings: StorageSettings, run_id: str) -> int:
    """Remove the staged files a killed run left half-written; how many went."""
    import pyarrow.parquet as pq

    fs = storage.filesystem(out, settings)
    fs.invalidate_cache()
    removed = 0
    for path in [p for p in fs.find(staging_path(out, run_id)) if p.endswith(".parquet")]:
        try:
            with fs.open(path, "rb") as fh:
                pq.read_metadata(fh)
        except Exception:
            fs.rm(path)
            removed += 1
    fs.invalidate_cache()
    return removed


def partition_dates(out: str, settings: StorageSettings) -> list[str]:
    """The run dates OUT holds a ``dt=`` partition for, sorted (one listing, no reads)."""
    fs = storage.filesystem(out, settings)
    root = _path(out)
    if not fs.exists(root):
        return []
    names = (posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
    return sorted(n[3:] for n in names if n.startswith("dt="))


def read_results(
    out: str,
    settings: StorageSettings,
    columns: list[str],
    where=None,
    dates: list[str] | None = None,
) -> pa.Table:
    """Committed rows under OUT, or an empty table: every ``dt=`` partition, or only
    those of ``dates`` (the others are never listed or read). ``dt`` is a column.

    Names starting with ``_`` (staging, run artefacts) are skipped, as every engine does.
    """
    fs = storage.filesystem(out, settings)
    empty = RESULTS_SCHEMA.empty_table().select(columns)
    root = _path(out)
    if not fs.exists(root):
        return empty
    source, base = root, {}
    if dates is not None:  # only these partitions' files, listed folder by folder
        folders = [p for p in (_path(out, f"dt={d}") for d in dates) if fs.exists(p)]
        source = sorted(f for d in folders for f in fs.find(d) if f.endswith(".parquet"))
        base = {"partition_base_dir": root}
        if not source:
            return empty
    ds = pads.dataset(
        source,
        filesystem=storage.arrow_filesystem(out, settings),
        format="parquet",
        schema=RESULTS_SCHEMA,
        partitioning=PARTITIONING,
        **base,
    )
    if not ds.files:
        return empty
    return ds.to_table(columns=columns, filter=where)
