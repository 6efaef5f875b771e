"""How rows reach ``OUT/dt=RUN_DATE/``: staged first, committed whole, for every command.

A run writes its Parquet files to ``OUT/_staging/RUN_ID/``, where no reader looks (every
engine skips ``_`` names). When every file is written, the run records its plan in
``_staging/RUN_ID/_COMMIT`` (which files move where, and which earlier files of the
partition it replaces), carries it out and removes the staging folder. A run killed
before the plan is written leaves nothing visible and the next run discards its files;
one killed during the moves is finished by the next run (``recover``), which reads the
plan and completes it. Readers of ``OUT/dt=*/`` therefore never see a partial run.

The plan is written just after the run's lease passes its fence (``Lease.check``: a
run whose lease was taken over never writes one). A plan found by ``recover`` is data
from storage, not an instruction: it is carried out only if every step stays inside
OUT's commit protocol (``check_plan``): moves from that run's own staging folder to
``OUT/dt=RUN_DATE/RUN_ID-*.parquet``, removals of Parquet files of that same partition.
Anything else (another bucket, a path outside OUT, ``..``, a symlinked folder below OUT
on a local disk) refuses the whole plan with one line in the log; nothing is moved or
deleted and the folder is left for someone to look at.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import posixpath
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from meddx import MeddxError
from meddx.inputs import storage
from meddx.inputs.storage import StorageSettings
from meddx.names import OUTPUT_SCHEMA
from meddx.store import index

STAGING = "_staging"
COMMIT = "_COMMIT"
RUNS = "_runs"  # run artefacts (report, summary, worklist) per run date
RESULTS_SCHEMA = OUTPUT_SCHEMA.append(pa.field("dt", pa.string()))
PARTITIONING = pads.partitioning(pa.schema([("dt", pa.string())]), flavor="hive")
PLAN_TEXT_CHARS = 120  # how much of a refused path a warning quotes

log = logging.getLogger(__name__)


def _path(out: str, *parts: str) -> str:
    return posixpath.join(storage.strip_scheme(out), *parts)


def parquet_files(fs, folder: str) -> list[str]:
    """The Parquet files below ``folder`` (a path of ``fs``), sorted, but metadata names
    (``_x``, ``.x``: a run's ``_inputs.parquet``); none when it is absent."""
    return sorted(
        p
        for p in fs.find(folder)
        if p.endswith(".parquet") and not posixpath.basename(p).startswith(("_", "."))
    )


def partition_uri(out: str, run_date: str) -> str:
    return storage.join(out, f"dt={run_date}")


def staging_path(out: str, run_id: str) -> str:
    """Where a run writes its files (a path of ``storage.arrow_filesystem(out)``)."""
    return _path(out, STAGING, run_id)


def write_staged(ds, out: str, settings: StorageSettings, run_id: str, schema: pa.Schema) -> str:
    """Write a Ray Dataset of output rows into this run's staging folder."""
    staging = staging_path(out, run_id)
    # The folder exists before the write: Ray removes it when no row was written (every
    # input read was dropped as scored already), which on S3 fails for a prefix with no
    # object under it.
    fs = storage.filesystem(out, settings)
    fs.makedirs(staging, exist_ok=True)
    fs.pipe_file(posixpath.join(staging, "_started"), b"")
    ds.write_parquet(staging, filesystem=storage.arrow_filesystem(out, settings), schema=schema)
    return staging


def read_staged(out: str, settings: StorageSettings, run_id: str, columns: list[str]) -> pa.Table:
    """The rows a run has staged (none yet: an empty table)."""
    fs = storage.filesystem(out, settings)
    staging = staging_path(out, run_id)
    fs.invalidate_cache()
    files = parquet_files(fs, staging) if fs.exists(staging) else []
    if not files:  # (a store's columns that results lack are strings: its hashes)
        known = OUTPUT_SCHEMA.names
        fields = [
            OUTPUT_SCHEMA.field(c) if c in known else pa.field(c, pa.string()) for c in columns
        ]
        return pa.schema(fields).empty_table()
    return pads.dataset(
        files, filesystem=storage.arrow_filesystem(out, settings), format="parquet"
    ).to_table(columns=columns)


class ForgedPlan(MeddxError):
    """A commit plan with a step outside the commit protocol: refused whole."""


def _quoted(path) -> str:
    text = repr(path)
    return text if len(text) <= PLAN_TEXT_CHARS else text[: PLAN_TEXT_CHARS - 3] + "..."


def _plain(name: str) -> str:
    """A listed name for a one-line message: an S3 key may hold a newline."""
    return repr(name)[1:-1]


def _below(path, folder: str, what: str) -> str:
    """``path`` if, as written, it names something inside ``folder``: a string in normal
    form (no ``.``, ``..``, doubled ``/`` or scheme) starting with ``folder/``."""
    if not isinstance(path, str) or posixpath.normpath(path) != path:
        raise ForgedPlan(f"{what} {_quoted(path)} is not a normal path")
    if not path.startswith(folder + "/"):
        raise ForgedPlan(f"{what} {_quoted(path)} is outside {folder}")
    return path


def _unlinked(path: str, root: str, what: str) -> None:
    """On a local disk: no folder between ``root`` and ``path`` is a symlink, so the
    path goes where it says (``root``'s own parents are the user's business)."""
    parent = posixpath.dirname(path)
    if os.path.realpath(parent) != os.path.realpath(root) + parent[len(root) :]:
        raise ForgedPlan(f"{what} {_quoted(path)} goes through a symlink")


def check_plan(out: str, run_id: str, plan) -> dict:
    """``plan`` if it is one that ``commit`` writes for ``run_id`` under OUT, else raise
    ForgedPlan saying which step is not: every move takes a ``.parquet`` file from
    ``OUT/_staging/RUN_ID/`` to ``OUT/dt=RUN_DATE/RUN_ID-NAME.parquet`` (one partition,
    the plan's ``run_date`` where it names one), every removal is a ``.parquet`` file
    below that partition, and nothing else is in it."""
    if not isinstance(plan, dict) or plan.get("run_id") != run_id:
        raise ForgedPlan(f"it is not the plan of run {_plain(run_id)}")
    moves, removes = plan.get("moves", []), plan.get("removes", [])
    if not isinstance(moves, list) or not isinstance(removes, list):
        raise ForgedPlan("its moves and removes are not lists")
    run_date = plan.get("run_date")
    if run_date is not None and not (isinstance(run_date, str) and _is_date(run_date)):
        raise ForgedPlan(f"run date {_quoted(run_date)} is not YYYY-MM-DD")
    local = not storage.is_s3(out)
    root = posixpath.normpath(_path(out))
    staging = posixpath.join(root, STAGING, run_id)
    partitions = {f"dt={run_date}"} if run_date else set()
    for step in moves:
        if not (isinstance(step, list | tuple) and len(step) == 2):
            raise ForgedPlan(f"move {_quoted(step)} is not a pair of paths")
        source, target = step
        _below(source, staging, "source")
        parts = _below(target, root, "target")[len(root) + 1 :].split("/")
        if not (
            len(parts) == 2
            and parts[0].startswith("dt=")
            and _is_date(parts[0][3:])
            and parts[1].startswith(f"{run_id}-")
        ):
            raise ForgedPlan(f"target {_quoted(target)} is not a result file of this run")
        partitions.add(parts[0])
        for path in (source, target):
            if not path.endswith(".parquet"):
                raise ForgedPlan(f"{_quoted(path)} is not a Parquet file")
        if local:
            _unlinked(source, root, "source")
            _unlinked(target, root, "target")
            if os.path.islink(source):  # moved, it would put a link to elsewhere in dt=
                raise ForgedPlan(f"source {_quoted(source)} is a symlink")
    if len(partitions) > 1:
        raise ForgedPlan(f"it writes to more than one partition: {', '.join(sorted(partitions))}")
    if removes and not partitions:
        raise ForgedPlan("it removes files but names no partition")
    for old in removes:
        _below(old, posixpath.join(root, *partitions), "removal")
        if not old.endswith(".parquet"):
            raise ForgedPlan(f"removal {_quoted(old)} is not a Parquet file")
        if local:
            _unlinked(old, root, "removal")
    return plan


def _is_date(text: str) -> bool:
    try:
        return dt.date.fromisoformat(text).isoformat() == text
    except ValueError:
        return False


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
    out: str,
    settings: StorageSettings,
    run_id: str,
    run_date: str,
    *,
    fence: Callable[[], None],
    replace: bool = False,
) -> list[str]:
    """Move a run's staged files into ``dt=RUN_DATE``; with ``replace`` the partition's
    earlier files go. Returns the committed paths.

    ``fence`` (the run's ``Lease.check``) is called just before the plan is written and
    raises if the run no longer holds OUT: then nothing is written or moved. A plan that
    ``recover`` would refuse (see ``check_plan``) is not written either."""
    fs = storage.filesystem(out, settings)
    fs.invalidate_cache()
    staging = staging_path(out, run_id)
    files = parquet_files(fs, staging)
    partition = _path(out, f"dt={run_date}")
    moves = [(f, posixpath.join(partition, f"{run_id}-{posixpath.basename(f)}")) for f in files]
    removes = []
    if replace and fs.exists(partition):
        removes = parquet_files(fs, partition)
    plan = {"run_id": run_id, "run_date": run_date, "moves": moves, "removes": removes}
    try:
        check_plan(out, run_id, plan)
    except ForgedPlan as exc:
        raise MeddxError(f"run {run_id} not committed: its commit plan is unsafe: {exc}") from None
    fence()
    fs.pipe_file(posixpath.join(staging, COMMIT), json.dumps(plan).encode())
    _move_all(fs, plan)
    _index_run(fs, out, settings, plan, staging)
    fs.rm(staging, recursive=True)
    fs.invalidate_cache()
    return [target for _, target in moves]


def _index_run(fs, out: str, settings: StorageSettings, plan: dict, staging: str) -> None:
    """The index's part of a commit, after the moves and before the staging folder goes:
    the run's index file, then a compaction when enough have gathered. A failure leaves
    the results as committed: the next reader of the index adds the run from them."""
    try:
        targets = [target for _, target in plan["moves"]]
        index.record_run(fs, out, settings, plan["run_id"], targets, staging)
        index.compact(out, settings)
    except Exception as exc:
        log.warning(
            "meddx: index not updated for run %s (%s): the next run adds it from the results",
            plan["run_id"],
            type(exc).__name__,
        )
        log.debug("meddx: the index update's failure", exc_info=True)


def drop_staged(
    out: str, settings: StorageSettings, run_id: str, uris: set[str], model: str | None = None
) -> int:
    """Remove from a run's staged files the rows of ``uris`` (a shard's members go with
    their shard), of the model ``model`` only where given (a run of several); the
    number of rows removed."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs = storage.filesystem(out, settings)
    fs.invalidate_cache()
    removed = 0
    for path in parquet_files(fs, staging_path(out, run_id)):
        with fs.open(path, "rb") as fh:
            table = pq.read_table(fh)
        base = storage.shards_of(table["image_uri"])
        drop = pc.is_in(base, pa.array(sorted(uris), pa.string()))
        if model is not None:
            drop = pc.and_(drop, pc.equal(table["model_sha256"], model))
        keep = pc.invert(drop)
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
    being resumed); return what was done. A plan that ``check_plan`` refuses is not
    carried out: it is logged as a warning, reported, and its folder left as it is."""
    fs, done = storage.filesystem(out, settings), []
    root = _path(out, STAGING)
    fs.invalidate_cache()
    if not fs.exists(root):
        return done
    if not storage.is_s3(out) and os.path.islink(root):
        # Its folders would be listed, and discarded, wherever the link points.
        refused = f"refused to recover {root}: it is a symlink; nothing moved or deleted"
        log.warning("meddx: %s", refused)
        return [refused]
    for folder in sorted(fs.ls(root, detail=False)):
        marker = posixpath.join(folder, COMMIT)
        name = posixpath.basename(folder)
        if fs.exists(marker):
            try:
                plan = check_plan(out, name, _plan_of(fs.cat_file(marker)))
            except ForgedPlan as exc:
                refused = (
                    f"refused the commit plan of {_plain(name)}: {exc}; nothing moved or "
                    f"deleted, {_plain(folder)} left for inspection"
                )
                log.warning("meddx: %s", refused)
                done.append(refused)
                continue
            _move_all(fs, plan)
            _index_run(fs, out, settings, plan, folder)
            done.append(f"finished commit of {plan['run_id']}")
        elif posixpath.basename(folder) == keep:
            done.append(f"resuming uncommitted run {keep}")
            continue
        else:
            done.append(f"discarded uncommitted run {posixpath.basename(folder)}")
        fs.rm(folder, recursive=True)
    fs.invalidate_cache()
    return done


def _plan_of(data: bytes):
    try:
        return json.loads(data)
    except ValueError:  # UnicodeDecodeError is one
        raise ForgedPlan("it is not JSON") from None


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
        changed = max((storage.modified_time(f) or 0.0 for f in files), default=0.0)
        if changed > when:
            latest, when = run_id, changed
    return latest


def readable_staged(out: str, settings: StorageSettings, run_id: str) -> int:
    """Remove the staged files a killed run left half-written; how many went."""
    import pyarrow.parquet as pq

    fs = storage.filesystem(out, settings)
    fs.invalidate_cache()
    removed = 0
    for path in parquet_files(fs, staging_path(out, run_id)):
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
    schema: pa.Schema = OUTPUT_SCHEMA,
) -> pa.Table:
    """Committed rows under OUT, or an empty table: every ``dt=`` partition, or only
    those of ``dates`` (the others are never listed or read). ``dt`` is a column.
    ``schema``: the rows' (a store's are ``films.STORE_SCHEMA``).

    Names starting with ``_`` (staging, run artefacts) are skipped, as every engine does.
    """
    fs = storage.filesystem(out, settings)
    schema = schema.append(pa.field("dt", pa.string()))
    empty = schema.empty_table().select(columns)
    root = _path(out)
    if not fs.exists(root):
        return empty
    source, base = root, {}
    if dates is not None:  # only these partitions' files, listed folder by folder
        folders = [p for p in (_path(out, f"dt={d}") for d in dates) if fs.exists(p)]
        source = sorted(f for d in folders for f in parquet_files(fs, d))
        base = {"partition_base_dir": root}
        if not source:
            return empty
    ds = pads.dataset(
        source,
        filesystem=storage.arrow_filesystem(out, settings),
        format="parquet",
        schema=schema,
        partitioning=PARTITIONING,
        **base,
    )
    if not ds.files:
        return empty
    return ds.to_table(columns=columns, filter=where)


def latest_rows(
    out: str, settings: StorageSettings, uris: list[str], model_sha: str, columns: list[str]
) -> pa.Table:
    """The latest committed row of each of ``uris`` by checkpoint ``model_sha``, in
    ``columns``: the index says which result file holds it, and only those files are
    read. For the few instances of the studies a run touched (their reports), not for
    an archive's worth. Take it while holding OUT's lease (catching up writes)."""
    empty = OUTPUT_SCHEMA.empty_table().select(columns)
    if not uris:
        return empty
    wanted = pc.field("image_uri").isin(pa.array(sorted(set(uris)), pa.string()))
    found = (
        index.Snapshot(out, settings)
        .scan(
            ["image_uri", "scored_at", "run_id", "file"],
            where=wanted & (pc.field("model_sha256") == model_sha),
        )
        .read_all()
        .sort_by([("scored_at", "descending")])
        .to_pylist()
    )
    latest: dict[str, dict] = {}
    for row in found:
        latest.setdefault(row["image_uri"], row)
    if not latest:
        return empty
    files = sorted({_path(out, row["file"]) for row in latest.values()})
    runs = pa.array(sorted({row["run_id"] for row in latest.values()}), pa.string())
    table = pads.dataset(
        files,
        filesystem=storage.arrow_filesystem(out, settings),
        format="parquet",
        schema=OUTPUT_SCHEMA,
    ).to_table(
        columns=[*columns, "run_id"] if "run_id" not in columns else columns,
        filter=wanted & (pc.field("model_sha256") == model_sha) & pc.field("run_id").isin(runs),
    )
    keep = [
        latest[u]["run_id"] == r
        for u, r in zip(table["image_uri"].to_pylist(), table["run_id"].to_pylist(), strict=True)
    ]
    return table.filter(pa.array(keep, pa.bool_())).select(columns)
