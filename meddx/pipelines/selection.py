"""What a screening night reads: the listing's inputs that OUT's index holds no row for
from this model, or that changed since, as one join.

The listing and the index stream through DuckDB (``meddx.store.sql``) within its memory
budget, and no step runs per input in Python. The join's own memory grows with the
archive (its index side holds one entry per name, spilled past the budget), so on an
archive (or manifest) of ``OFF_DRIVER_ROWS`` or more it runs in a Ray task beside the
driver: the driver holds only the night's selection. This module imports no model, so
that task starts in a second.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from meddx import MeddxError
from meddx.config import ScreenConfig
from meddx.inputs import listing, reading, storage
from meddx.pipelines.path_names import as_indexed, indexed_names, path_key
from meddx.store import commit, index, lease, sql

# Listings or indexes this large are joined in a Ray task, not in the driver (a prefix
# is listed as the join reads it: its size is known only from the index's).
OFF_DRIVER_ROWS = 100_000

log = logging.getLogger(__name__)


# What a listed input is tested against: the index rows of its scorings by this model
# (with a content hash; the scan keeps no others). New: none; changed: modified after
# the last, or its size, mtime or etag differ from what the listing said then (where
# both say). The listing streams through the join; the index's side is one row per name.
SELECT_SQL = """
SELECT l.*, s.last IS NOT NULL AS again
FROM listing l LEFT JOIN (
    SELECT name, max(scored_at) AS last, arg_max(size, scored_at) AS size,
           arg_max(mtime, scored_at) AS mtime, arg_max(etag, scored_at) AS etag
    FROM idx GROUP BY name
) s USING (name)
WHERE s.last IS NULL OR l.mtime > s.last OR l.size <> s.size OR l.mtime <> s.mtime
   OR l.etag <> s.etag
"""
KNOWN_SQL = """
SELECT name, list($model || image_uri || $separator || content_sha256) AS known
FROM idx WHERE name IN (SELECT name FROM again) GROUP BY name
"""
# Several models: each input's models (a bit mask, ``reading.drop_known``) and what
# each of them holds of it.
MODELS_SQL = "SELECT name, bit_or(models) AS models FROM picks GROUP BY name"
KNOWNS_SQL = "SELECT name, flatten(list(known)) AS known FROM knowns GROUP BY name"
DISTINCT_SQL = "SELECT count(*) FROM (SELECT DISTINCT name FROM listing)"


class _Named:
    """A listing's batches as the join reads them: ``name`` (each input as OUT's rows
    name it), ``ordinal`` (its place in the listing), size, mtime, etag, and the
    ``image_uri`` only where it differs from the name (--pseudonymize-paths). Counts
    the rows it streamed."""

    def __init__(self, cfg: ScreenConfig, source: listing.Listing, key: bytes | None):
        self.cfg, self.source, self.rows, self.key = cfg, source, 0, key
        self.renamed = key is not None
        facts = [f for f in listing.LISTING_SCHEMA if f.name != "image_uri"]
        uri = [listing.LISTING_SCHEMA.field("image_uri")] if self.renamed else []
        self.schema = pa.schema(
            [pa.field("name", pa.string()), pa.field("ordinal", pa.int64()), *facts, *uri]
        )

    def reader(self) -> pa.RecordBatchReader:
        return pa.RecordBatchReader.from_batches(self.schema, self._batches())

    def _batches(self):
        self.rows = 0
        for batch in self.source.batches():
            table = pa.Table.from_batches([batch], listing.LISTING_SCHEMA)
            n = batch.num_rows
            ordinal = pa.array(np.arange(self.rows, self.rows + n, dtype=np.int64))
            self.rows += n
            table = table.append_column("name", indexed_names(self.cfg, table, self.key))
            yield from (
                table.append_column("ordinal", ordinal).select(self.schema.names).to_batches()
            )

    def todo(self, picked: pa.Table) -> pa.Table:
        """The picked rows as a listing table, each name once (its first listing), in
        the listing's order."""
        picked = picked.sort_by("ordinal")
        picked = picked.take(pc.index_in(pc.unique(picked["name"]), picked["name"]))
        if not self.renamed:
            picked = picked.append_column("image_uri", picked["name"])
        return picked


def _select(
    cfg: ScreenConfig,
    source: listing.Listing,
    shas: tuple[str, ...],
    snapshot: index.Snapshot | None = None,
    key: bytes | None = None,
):
    """The inputs of ``source`` to read for these models, in the listing's order, and
    how many distinct inputs it listed: those OUT's index holds no row for from a model,
    and those changed since (modified after they were last scored, or another size,
    mtime or etag than the listing gave then; a tar member counts for its shard).

    A re-checked input carries ``known``: the ``NAME<NUL>CONTENT_SHA256`` of each row OUT
    holds for it (NAME as ``as_indexed`` names it, a pseudonym under
    --pseudonymize-paths), which the read stage drops unscored when the bytes are the
    same; null for a new input. With several models, each input carries ``models``, the
    bit mask of those it is new or changed for (bit i: ``shas[i]``), and each ``known``
    string starts with its model's number and a NUL. The listing and the index stream
    through DuckDB within its memory budget (``meddx.store.sql``; the listing is kept
    in a table of its own, spilled past the budget, when several models join it): no
    step runs per row in Python."""
    snapshot = snapshot or index.Snapshot(cfg.out, cfg.storage)
    if not cfg.new_model:
        others = pc.invert(pc.field("model_sha256").isin(list(shas)))
        for batch in snapshot.scan(["model_sha256"], where=others):
            if batch.num_rows:
                other = batch["model_sha256"][0].as_py()
                raise MeddxError(
                    f"{cfg.out} holds results of another model ({other[:12]}...): "
                    "pass --new-model to score everything again with this one"
                )
    several = len(shas) > 1
    named = _Named(cfg, source, key if key is not None else path_key(cfg))
    con = sql.connect()
    try:
        if several:  # one listing, joined once per model
            con.register("listed", named.reader())
            con.execute("CREATE TEMP TABLE listing AS SELECT * FROM listed")
            con.unregister("listed")
        else:
            con.register("listing", named.reader())
        picks, knowns = [], []
        for m, sha in enumerate(shas):
            mine = (pc.field("model_sha256") == sha) & pc.field("content_sha256").is_valid()
            con.register("idx", snapshot.scan(["name", "scored_at", "size", "mtime", "etag"], mine))
            picked = con.sql(SELECT_SQL).to_arrow_table()
            picks.append(
                picked.append_column("models", pa.array([1 << m] * picked.num_rows, pa.int64()))
            )
            if pc.any(picked["again"]).as_py():
                con.register("again", picked.filter(picked["again"]).select(["name"]))
                con.register("idx", snapshot.scan(["name", "image_uri", "content_sha256"], mine))
                params = {
                    "separator": reading.KNOWN_SEPARATOR,
                    "model": f"{m}{reading.KNOWN_SEPARATOR}" if several else "",
                }
                knowns.append(con.sql(KNOWN_SQL, params=params).to_arrow_table())
        seen = named.rows
        if source.may_repeat and not several:  # a manifest may name an input twice
            con.register("listing", named.reader())
        if source.may_repeat:
            ((seen,),) = con.execute(DISTINCT_SQL).fetchall()
        picked = named.todo(pa.concat_tables(picks))
        known = pa.concat_tables(knowns) if knowns else None
        if several:
            con.register("picks", pa.concat_tables(picks).select(["name", "models"]))
            masks = con.sql(MODELS_SQL).to_arrow_table()
            where = pc.index_in(picked["name"], value_set=masks["name"].combine_chunks())
            picked = picked.set_column(
                picked.schema.get_field_index("models"), "models", masks["models"].take(where)
            )
            if known is not None:
                con.register("knowns", known)
                known = con.sql(KNOWNS_SQL).to_arrow_table()
    except duckdb.Error as exc:
        if source.failure:  # the listing's own one-line reason
            raise source.failure from None
        # The engine's first line (out of memory, a temporary folder it cannot write),
        # never a row's value: the streams' own errors are the listing's, above.
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise MeddxError(f"selecting the night's inputs failed: {reason}") from None
    finally:
        con.close()
    if not seen and not source.empty_ok:
        raise MeddxError(f"no inputs under {source.source}")
    todo = picked.select(listing.LISTING_SCHEMA.names).cast(listing.LISTING_SCHEMA)
    if several:
        todo = todo.append_column("models", picked["models"].cast(pa.int64()))
    if known is None:
        return todo, seen
    # Each picked input's list (null for a new one), by position: a take, not a join.
    where = pc.index_in(picked["name"], value_set=known["name"].combine_chunks())
    return todo.append_column("known", known["known"].take(where)), seen


def off_driver(source: listing.Listing, index_rows: int) -> bool:
    """Whether the join runs in a Ray task: for a listing (a manifest's, as its size
    says) or an index of OFF_DRIVER_ROWS or more."""
    return max(source.rows, index_rows) >= OFF_DRIVER_ROWS


def select_new(
    cfg: ScreenConfig,
    source: listing.Listing | pa.Table,
    shas: tuple[str, ...],
    snapshot: index.Snapshot | None = None,
):
    """The inputs of ``source`` to read for these models (a listing table, in the
    listing's order, with ``known`` where some were scored already, and ``models`` with
    several) and how many
    distinct inputs it listed, against ``snapshot`` (by default the index as it stands):
    ``_select``, in the driver for small work and in a Ray task for large
    (``OFF_DRIVER_ROWS``)."""
    if isinstance(source, pa.Table):
        source = listing.Listing(cfg.input, source, empty_ok=True)
    snapshot = snapshot or index.Snapshot(cfg.out, cfg.storage)
    rows = snapshot.rows
    key = path_key(cfg)  # read here: a task's process may not have the site's key
    if not off_driver(source, rows):
        return _select(cfg, source, shas, snapshot, key)
    import ray

    from meddx.pipelines import cluster

    cluster.init_ray()
    log.debug("meddx: selection in a Ray task (index of %d rows)", rows)
    task = ray.remote(num_cpus=1, max_retries=0)(_select).options(name="meddx.select")
    try:
        return ray.get(task.remote(cfg, source, shas, snapshot, key))
    except ray.exceptions.RayError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, MeddxError):  # a user's error, one line as in the driver
            raise cause from None
        # A worker killed (out of memory, a lost node): one line; Ray logged the rest.
        raise MeddxError(f"the selection task failed ({type(exc).__name__})") from None


@dataclass
class WhatIsNew:
    """The selection and check of a run that reads only what is new (``screen``,
    ``prepare``): the listing's inputs OUT's index holds no row for from ``sha`` (or that
    changed since), and before the commit, the rows of inputs another run committed
    meanwhile dropped. A policy of ``meddx.pipelines.run`` builds on it."""

    cfg: ScreenConfig
    # The selected inputs (listing rows), which check selects by again.
    selected: pa.Table = field(default_factory=lambda: listing.uris_table([]))
    snapshot: index.Snapshot | None = None  # the index the selection read
    # ... of them, those read again to compare their bytes (a new mtime, say).
    again: pa.Table = field(default_factory=lambda: listing.uris_table([]))

    @property
    def since_days(self) -> int:
        return self.cfg.since_days

    def resumable(self) -> None:
        return None  # a night's inputs are selected anew: nothing of a killed one is kept

    def select(self, listed: listing.Listing, located, shas: tuple[str, ...], resumed: None):
        from meddx.pipelines.run import Selection  # here: the join's task imports no model

        self.snapshot = index.Snapshot(self.cfg.out, self.cfg.storage)
        todo, seen = select_new(self.cfg, listed, shas, self.snapshot)
        names = listing.LISTING_SCHEMA.names
        self.selected = todo.select([c for c in (*names, "models") if c in todo.column_names])
        if "known" in todo.column_names:
            self.again = self.selected.filter(pc.is_valid(todo["known"]))
        return Selection(todo=todo, inputs=todo.select(names), seen=seen)

    def check(self, run_id: str, shas: tuple[str, ...], selection, held: lease.Lease) -> None:
        cfg = self.cfg
        held.check()
        # Defence in depth, for a store that ignores conditional writes: inputs another
        # run committed since they were selected are not committed again, per model. Only
        # what the index gained since the selection is read: the night's cost, not the
        # archive's.
        since = index.Snapshot(cfg.out, cfg.storage).since(self.snapshot)
        listed = self.selected.select(listing.LISTING_SCHEMA.names)
        still = select_new(cfg, listed, shas, since)[0]
        wanted = models_of(self.selected, len(shas))
        at = pc.index_in(self.selected["image_uri"], value_set=still["image_uri"].combine_chunks())
        needed = np.zeros(len(wanted), dtype=np.int64)
        needed[pc.is_valid(at).to_numpy(zero_copy_only=False)] = models_of(still, len(shas))[
            pc.drop_null(at).to_numpy()
        ]
        for m, sha in enumerate(shas):
            gone = self.selected["image_uri"].filter(
                pa.array(((wanted >> m) & 1 == 1) & ((needed >> m) & 1 == 0))
            )
            if not len(gone):
                continue
            names = set(as_indexed(cfg, gone.to_pylist()))
            model = sha if len(shas) > 1 else None
            dropped = commit.drop_staged(cfg.out, cfg.storage, run_id, names, model)
            log.warning(
                "meddx: %d inputs were committed by another run meanwhile: dropped their %d rows",
                len(gone),
                dropped,
            )
        self.record_seen(run_id, shas)

    def record_seen(self, run_id: str, shas: tuple[str, ...]) -> None:
        """The inputs read again whose bytes a model had scored already (no row of it
        staged: the read stage dropped them), into the index with their new listing
        facts: touched, not changed, and not read again tomorrow."""
        if not self.again.num_rows:
            return
        cfg = self.cfg
        made_by = "model_sha256" if "model_sha256" in self.schema.names else "decode_sha256"
        staged = commit.read_staged(cfg.out, cfg.storage, run_id, ["image_uri", made_by])
        names = indexed_names(cfg, self.again.select(listing.LISTING_SCHEMA.names))
        masks = models_of(self.again, len(shas))
        facts = self.again.select(["size", "mtime", "etag"]).append_column("name", names)
        seen = []
        for m, sha in enumerate(shas):
            scored = storage.shards_of(staged["image_uri"].filter(pc.equal(staged[made_by], sha)))
            mine = pc.and_(
                pa.array((masks >> m) & 1 == 1),
                pc.invert(pc.is_in(names, value_set=scored.combine_chunks())),
            )
            part = facts.filter(mine)
            seen.append(
                part.append_column("model_sha256", pa.array([sha] * part.num_rows, pa.string()))
            )
        rows = index.record_seen(
            cfg.out, cfg.storage, run_id, pa.concat_tables(seen), self.snapshot
        )
        if rows:
            log.info("meddx: %d inputs read again were unchanged: noted in the index", rows)


def models_of(todo: pa.Table, k: int) -> np.ndarray:
    """Each selected input's models, as a bit mask (bit i: the run's model i): its
    ``models`` column, or all ``k`` where it has none (one model)."""
    if "models" in todo.column_names:
        return todo["models"].to_numpy()
    return np.full(todo.num_rows, (1 << k) - 1, dtype=np.int64)
