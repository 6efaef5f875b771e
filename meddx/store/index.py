"""The index of what OUT holds: one row per committed result row, a few columns of it,
in a few files, so that "what is new tonight" reads the index, not every partition.

    OUT/_index/base-GENERATION.parquet     the compacted rows of many runs
    OUT/_index/runs/dt=RUN_DATE/RUN_ID.parquet   one run's rows, since the last compaction

A row holds ``name`` (the input as listed, as OUT's rows name it: a tar member counts
for its shard), ``image_uri``, ``content_sha256``, ``model_sha256``, ``scored_at``,
``run_id``, ``dt`` and what the listing said of the input when it was selected
(``size``, ``mtime``, ``etag``; null where the source said nothing, or the row was
rebuilt from the results).

The results are the truth; the index follows them:

- a commit writes its run's file after the moves and before its staging folder goes, so
  ``commit.recover`` finishes it with the moves of a run killed in between;
- every reader (``scan``) checks which runs the results hold against those the index
  covers, by file names alone (one listing of OUT): rows of runs whose files are gone (a
  replaced partition, a deleted one) are left out, and runs the index lacks (lost, an
  older meddx, a crash) are read from their result files and added before it answers;
- past ``COMPACT_AFTER`` run files, ``compact`` streams the live rows into a new base
  and removes what it covers. A reader takes the newest readable base and ignores run
  files it covers, so a compaction killed midway loses nothing.

``rebuild`` (``meddx reindex OUT``) removes the index and reads it again from the
results. Index files are written under the run's lease on OUT, like the results.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import posixpath
import re
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from meddx import MeddxError
from meddx.inputs import storage
from meddx.inputs.storage import StorageSettings
from meddx.names import OUTPUT_SCHEMA

INDEX = "_index"
RUNS = "runs"
# The listing facts of a run's selected inputs, staged beside its rows until the commit.
INPUTS_FILE = "_inputs.parquet"
# Under the index: each run's inputs read again and found unchanged (``record_seen``).
SEEN = "seen"
COMPACT_AFTER = 16  # run files the index holds before they are merged into a base
CATCH_UP_ROWS = 1_000_000  # result rows per index file when they are read into it
BATCH_ROWS = 65_536
COVERED_KEY = b"meddx.index.files"  # an index file's result files, relative to OUT

INDEX_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("image_uri", pa.string()),
        ("content_sha256", pa.string()),
        ("model_sha256", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
        ("run_id", pa.string()),
        ("dt", pa.string()),
        ("size", pa.int64()),
        ("mtime", pa.timestamp("us", tz="UTC")),
        ("etag", pa.string()),
        ("file", pa.string()),  # the result file it stands for, relative to OUT
    ]
)
# What a run's selected inputs carried from the listing, by name.
INPUTS_SCHEMA = pa.schema([INDEX_SCHEMA.field(n) for n in ("name", "size", "mtime", "etag")])
# The columns of a result row the index keeps.
FROM_RESULTS = ["image_uri", "content_sha256", "model_sha256", "scored_at", "run_id"]
# ... and what a store's rows (``films.py``) name them: what made the row, and when.
ALIASES = {"model_sha256": "decode_sha256", "scored_at": "prepared_at"}
_BASE = re.compile(r"base-(\d{6})\.parquet")

log = logging.getLogger(__name__)


def _root(out: str) -> str:
    return posixpath.join(storage.strip_scheme(out).rstrip("/"), INDEX)


def _out_root(out: str) -> str:
    return storage.strip_scheme(out).rstrip("/")


def _result_files(fs, out: str) -> set[str]:
    """OUT's committed Parquet files (``dt=*/NAME.parquet``), relative to OUT, from one
    listing."""
    root = _out_root(out)
    if not fs.exists(root):
        return set()
    files = set()
    # Only the dt= partitions: OUT also holds _audit/ (files a run, never compacted),
    # _index/ and _runs/, which would make every listing grow with the history. One
    # listing of the keys starting "dt=" on S3; the partitions' folders on local disk.
    if storage.is_s3(out):
        found = fs.find(root, prefix="dt=")
    else:
        found = [p for d in fs.glob(posixpath.join(root, "dt=*")) for p in fs.find(d)]
    for path in found:
        relative = path[len(root) + 1 :]
        parts = relative.split("/")
        if (
            len(parts) == 2
            and parts[0].startswith("dt=")
            and parts[1].endswith(".parquet")
            and not parts[1].startswith(("_", "."))
        ):
            files.add(relative)
    return files


def _covers(fs, path: str) -> tuple[set[str], int]:
    """The result files an index file stands for (its key-value metadata), and its rows."""
    with fs.open(path, "rb") as fh:
        meta = pq.read_metadata(fh)
    return set(json.loads((meta.metadata or {})[COVERED_KEY])), meta.num_rows


class _State:
    """The index as storage holds it now, against the results."""

    def __init__(self, fs, out: str):
        self.fs, self.out, self.root = fs, out, _root(out)
        fs.invalidate_cache()
        found = fs.find(self.root) if fs.exists(self.root) else []
        self.base, self.in_base = None, set()
        self.rows: dict[str, int] = {}  # of each readable index file
        bases = sorted((p for p in found if _BASE.fullmatch(posixpath.basename(p))), reverse=True)
        for path in bases:  # the newest readable one
            try:
                self.in_base, self.rows[path] = _covers(fs, path)
                self.base = path
                break
            except Exception:  # half-written, or not ours: an older base or the results
                name = posixpath.basename(path)
                log.warning("meddx: index file %s is unreadable: left out", name)
        self.old_bases = [p for p in bases if p != self.base]
        runs_dir = posixpath.join(self.root, RUNS) + "/"
        self.run_files: dict[str, set[str]] = {}  # every run file -> the files it covers
        for path in found:
            if path.startswith(runs_dir) and path.endswith(".parquet"):
                try:
                    self.run_files[path], self.rows[path] = _covers(fs, path)
                except Exception:
                    log.warning(
                        "meddx: index file %s is unreadable: left out", path[len(runs_dir) :]
                    )
        # Inputs runs read again and found unchanged (``record_seen``), a file a run.
        seen_dir = posixpath.join(self.root, SEEN) + "/"
        self.seen_files = []
        for path in found:
            if path.startswith(seen_dir) and path.endswith(".parquet"):
                try:
                    _, self.rows[path] = _covers(fs, path)
                    self.seen_files.append(path)
                except Exception:
                    log.warning(
                        "meddx: index file %s is unreadable: left out", path[len(seen_dir) :]
                    )
        # Run files a base already holds (a compaction stopped before removing them).
        self.loose = {p: f for p, f in self.run_files.items() if not f <= self.in_base}
        self.covered = set(self.in_base).union(*self.loose.values())
        self.results = _result_files(fs, out)

    def live(self) -> set[str]:
        """Covered result files still in OUT."""
        return self.covered & self.results

    def uncovered(self) -> list[str]:
        """Result files the index does not stand for."""
        return sorted(self.results - self.covered)


def _results_rows(
    out: str, settings: StorageSettings, files: list[str], inputs: pa.Table | None = None
) -> pa.Table:
    """Index rows of some of OUT's result files (relative to OUT), with the listing facts
    of ``inputs`` (INPUTS_SCHEMA) where given, else null."""
    fs = storage.arrow_filesystem(out, settings)
    root = _out_root(out)
    parts = []
    for relative in files:
        table = _result_columns(fs, posixpath.join(root, relative), relative)
        n = table.num_rows
        dt = relative.split("/")[0][3:]
        table = table.append_column("dt", pa.array([dt] * n, pa.string()))
        parts.append(table.append_column("file", pa.array([relative] * n, pa.string())))
    return _as_index_rows(pa.concat_tables(parts) if parts else None, inputs)


def _result_columns(fs, path: str, relative: str) -> pa.Table:
    """The index's columns of one result file, null where an older file lacks one; an
    unreadable file stops the run in one line (its rows cannot be told apart from new)."""
    try:
        present = set(pq.read_schema(path, filesystem=fs).names)
        table = _read_columns(path, fs, present)
    except (OSError, pa.ArrowException) as exc:
        raise MeddxError(
            f"result file {relative} is unreadable ({type(exc).__name__}): repair or "
            "remove it, then run meddx reindex"
        ) from None
    n = table.num_rows
    schema = OUTPUT_SCHEMA
    return pa.table(
        {
            c: table[c] if c in table.column_names else pa.nulls(n, schema.field(c).type)
            for c in FROM_RESULTS
        }
    )


def _read_columns(path: str, fs, present: set[str]) -> pa.Table:
    """The index's columns of a result file, or of a store's (``films.py``), whose
    ``decode_sha256`` and ``prepared_at`` stand for what made the row and when."""
    wanted = {c: c if c in present else ALIASES.get(c) for c in FROM_RESULTS}
    table = pq.read_table(path, filesystem=fs, columns=[c for c in wanted.values() if c in present])
    return table.rename_columns([c for c, a in wanted.items() if a in present])


def _as_index_rows(rows: pa.Table | None, inputs: pa.Table | None = None) -> pa.Table:
    if rows is None or not rows.num_rows:
        return INDEX_SCHEMA.empty_table()
    rows = rows.append_column("name", storage.shards_of(rows["image_uri"]))
    if inputs is not None and inputs.num_rows:
        facts = inputs.group_by("name").aggregate(
            [("size", "max"), ("mtime", "max"), ("etag", "max")]
        )
        facts = facts.rename_columns({f"{c}_max": c for c in ("size", "mtime", "etag")})
        rows = rows.join(facts, "name", join_type="left outer")
    n = rows.num_rows
    columns = [
        rows[f.name] if f.name in rows.column_names else pa.nulls(n, f.type) for f in INDEX_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=INDEX_SCHEMA)


def _write(fs, path: str, table: pa.Table, covers) -> None:
    """Write whole or not at all (to a hidden name, then moved into place), with the
    result files it stands for in its metadata."""
    folder = posixpath.dirname(path)
    fs.makedirs(folder, exist_ok=True)
    temporary = posixpath.join(folder, f".{uuid.uuid4().hex}.tmp")
    table = table.replace_schema_metadata({COVERED_KEY: json.dumps(sorted(covers))})
    with fs.open(temporary, "wb") as fh:
        pq.write_table(table, fh, row_group_size=BATCH_ROWS)
    fs.mv(temporary, path)


def record_run(
    fs, out: str, settings: StorageSettings, run_id: str, targets: list[str], staging: str
) -> int:
    """After a run's moves: its index file, from its committed files ``targets`` (paths
    of ``fs``) and the listing facts staged beside them (``INPUTS_FILE``, where the run
    wrote one). Rows written."""
    fs.invalidate_cache()
    root = _out_root(out)
    files = [t[len(root) + 1 :] for t in targets if fs.exists(t)]
    inputs_path = posixpath.join(staging, INPUTS_FILE)
    inputs = None
    if fs.exists(inputs_path):
        with fs.open(inputs_path, "rb") as fh:
            inputs = pq.read_table(fh, schema=INPUTS_SCHEMA)
    rows = _results_rows(out, settings, files, inputs)
    _write(fs, posixpath.join(_root(out), RUNS, f"{run_id}.parquet"), rows, files)
    return rows.num_rows


SEEN_SQL = """
SELECT s.name, arg_max(i.image_uri, i.scored_at) AS image_uri,
       arg_max(i.content_sha256, i.scored_at) AS content_sha256, s.model_sha256,
       $now AS scored_at, arg_max(i.run_id, i.scored_at) AS run_id,
       arg_max(i.dt, i.scored_at) AS dt, s.size, s.mtime, s.etag,
       arg_max(i.file, i.scored_at) AS file
FROM seen s JOIN idx i ON i.name = s.name AND i.model_sha256 = s.model_sha256
GROUP BY ALL
"""


def record_seen(
    out: str, settings: StorageSettings, run_id: str, seen: pa.Table, snapshot: Snapshot
) -> int:
    """Index rows for inputs a run read again and found unchanged (touched: a new mtime,
    the same bytes, so no new result row): for each (``name``, ``model_sha256``) of
    ``seen``, its latest row in ``snapshot`` once more, with the listing's new size,
    mtime and etag and the time of this check, so that the next run does not read it
    again. A file of this run's under ``_index/seen/``; its rows stand for the result
    files they name (gone with them), and a compaction folds them into the base. Rows
    written."""
    from meddx.store import sql

    con = sql.connect()
    try:
        con.register("seen", seen.select(["name", "model_sha256", "size", "mtime", "etag"]))
        names = pa.array(sorted(set(seen["name"].to_pylist())), pa.string())
        con.register("idx", snapshot.scan(where=pc.field("name").isin(names)))
        now = datetime.datetime.now(datetime.UTC)
        rows = con.sql(SEEN_SQL, params={"now": now}).to_arrow_table()
    finally:
        con.close()
    if not rows.num_rows:
        return 0
    rows = rows.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA)
    fs = storage.filesystem(out, settings)
    _write(fs, posixpath.join(_root(out), SEEN, f"{run_id}.parquet"), rows, ())
    return rows.num_rows


def stage_inputs(out: str, settings: StorageSettings, staging: str, inputs: pa.Table) -> None:
    """Keep what the listing said of a run's inputs (``name``, as OUT's rows name them,
    with size, mtime and etag) in its staging folder, for ``record_run``."""
    fs = storage.filesystem(out, settings)
    n = inputs.num_rows
    table = pa.Table.from_arrays(
        [
            inputs[f.name] if f.name in inputs.column_names else pa.nulls(n, f.type)
            for f in INPUTS_SCHEMA
        ],
        schema=INPUTS_SCHEMA,
    )
    _write(fs, posixpath.join(staging, INPUTS_FILE), table, ())


def _catch_up(state: _State, settings: StorageSettings) -> int:
    """Index files for the result files the index lacks, about CATCH_UP_ROWS rows each
    (a whole history is read in bounded memory); how many result files it read."""
    files = state.uncovered()
    group: list[str] = []
    parts: list[pa.Table] = []
    for i, relative in enumerate(files):
        group.append(relative)
        parts.append(_results_rows(state.out, settings, [relative]))
        if sum(t.num_rows for t in parts) >= CATCH_UP_ROWS or i == len(files) - 1:
            name = f"read-{uuid.uuid4().hex}.parquet"
            _write(state.fs, posixpath.join(state.root, RUNS, name), pa.concat_tables(parts), group)
            group, parts = [], []
    if files:
        log.info("meddx: index: %d result files read into it", len(files))
    return len(files)


class Snapshot:
    """The index as it stands, caught up with the results once: ``scan`` it as often as
    a selection needs. Take it while holding OUT's lease (catching up writes)."""

    def __init__(self, out: str, settings: StorageSettings):
        self.out, self.settings = out, settings
        fs = storage.filesystem(out, settings)
        state = _State(fs, out)
        if _catch_up(state, settings):
            state = _State(fs, out)
        self.live = state.live()
        self.base = state.base
        self.files = sorted(p for p, covers in state.loose.items() if covers & self.live)
        if state.base and state.in_base & self.live:
            self.files.insert(0, state.base)
        self.files += sorted(state.seen_files)
        self._rows = {p: state.rows[p] for p in self.files}

    @property
    def rows(self) -> int:
        """Rows of the index files it reads (those of result files gone included)."""
        return sum(self._rows.values())

    def since(self, earlier: Snapshot) -> Snapshot:
        """This snapshot less the index files ``earlier`` read: the rows committed in
        between, whatever the archive's size (all of it, when a compaction came in
        between)."""
        if self.base != earlier.base:
            return self
        later = copy.copy(self)
        later.files = [p for p in self.files if p not in set(earlier.files)]
        later._rows = {p: self._rows[p] for p in later.files}
        return later

    def scan(self, columns: list[str] | None = None, where=None) -> pa.RecordBatchReader:
        """The live index rows (of result files OUT still holds), in batches; ``where``:
        an Arrow expression they must meet besides."""
        columns = columns or INDEX_SCHEMA.names
        if not self.files:
            return pa.RecordBatchReader.from_batches(
                INDEX_SCHEMA.empty_table().select(columns).schema, []
            )
        dataset = pads.dataset(
            self.files,
            filesystem=storage.arrow_filesystem(self.out, self.settings),
            format="parquet",
            schema=INDEX_SCHEMA,
        )
        live = pc.field("file").isin(pa.array(sorted(self.live), pa.string()))
        return dataset.scanner(
            columns=columns,
            filter=live if where is None else live & where,
            batch_size=BATCH_ROWS,
            # Row group by row group: not the whole file's columns read ahead at once.
            fragment_scan_options=pads.ParquetFragmentScanOptions(pre_buffer=False),
            batch_readahead=1,
            fragment_readahead=1,
        ).to_reader()


def scan(
    out: str, settings: StorageSettings, columns: list[str] | None = None
) -> pa.RecordBatchReader:
    """The live index rows, in batches (``Snapshot(...).scan``)."""
    return Snapshot(out, settings).scan(columns)


def compact(out: str, settings: StorageSettings, force: bool = False) -> bool:
    """Past ``COMPACT_AFTER`` run files (or with ``force``), stream the live rows into a
    new base and remove what it covers; True when it did."""
    fs = storage.filesystem(out, settings)
    state = _State(fs, out)
    if not force and len(state.loose) <= COMPACT_AFTER:
        return False
    reader = scan(out, settings)
    state = _State(fs, out)  # as scan left it (it may have caught up)
    live = sorted(state.live())
    generation = 1 + max(
        (
            int(_BASE.fullmatch(posixpath.basename(p)).group(1))
            for p in [*([state.base] if state.base else []), *state.old_bases]
        ),
        default=0,
    )
    target = posixpath.join(state.root, f"base-{generation:06d}.parquet")
    temporary = posixpath.join(state.root, f".{uuid.uuid4().hex}.tmp")
    schema = INDEX_SCHEMA.with_metadata({COVERED_KEY: json.dumps(live)})
    fs.makedirs(state.root, exist_ok=True)
    with fs.open(temporary, "wb") as fh, pq.ParquetWriter(fh, schema) as writer:
        for batch in reader:
            writer.write_batch(batch, row_group_size=BATCH_ROWS)
    fs.mv(temporary, target)
    # Everything else the index folder holds is covered by the new base or is of no use:
    # earlier bases, run files, unreadable files, what a killed write left.
    fs.invalidate_cache()
    for path in fs.find(state.root):
        if path != target:
            fs.rm(path)
    fs.invalidate_cache()
    log.info(
        "meddx: index: compacted %d result files into %s", len(live), posixpath.basename(target)
    )
    return True


def rebuild(out: str, settings: StorageSettings) -> tuple[int, int]:
    """Remove the index and read it again from the results (compacted); its rows and
    the result files they came from."""
    fs = storage.filesystem(out, settings)
    root = _root(out)
    if fs.exists(root):
        fs.rm(root, recursive=True)
    fs.invalidate_cache()
    compact(out, settings, force=True)
    files = set()
    rows = 0
    for batch in scan(out, settings, ["file"]):
        rows += batch.num_rows
        files.update(pc.unique(batch["file"]).to_pylist())
    return rows, len(files)
