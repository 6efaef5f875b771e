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
from meddx.inputs import listing, reading
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
SELECT name, list(image_uri || $separator || content_sha256) AS known
FROM idx WHERE name IN (SELECT name FROM again) GROUP BY name
"""
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
    sha: str,
    snapshot: index.Snapshot | None = None,
    key: bytes | None = None,
):
    """The inputs of ``source`` to read for this model, in the listing's order, and how
    many distinct inputs it listed: those OUT's index holds no row for, and those
    changed since (modified after they were last scored, or another size, mtime or
    etag than the listing gave then; a tar member counts for its shard).

    A re-checked input carries ``known``: the ``NAME<NUL>CONTENT_SHA256`` of each row OUT
    holds for it (NAME as ``as_indexed`` names it, a pseudonym under
    --pseudonymize-paths), which the read stage drops unscored when the bytes are the
    same; null for a new input. The listing and the index stream through DuckDB within
    its memory budget (``meddx.store.sql``): nothing here holds either whole, and no
    step runs per row in Python."""
    snapshot = snapshot or index.Snapshot(cfg.out, cfg.storage)
    if not cfg.new_model:
        for batch in snapshot.scan(["model_sha256"], where=pc.field("model_sha256") != sha):
            if batch.num_rows:
                other = batch["model_sha256"][0].as_py()
                raise MeddxError(
                    f"{cfg.out} holds results of another model ({other[:12]}...): "
                    "pass --new-model to score everything again with this one"
                )
    mine = (pc.field("model_sha256") == sha) & pc.field("content_sha256").is_valid()
    named = _Named(cfg, source, key if key is not None else path_key(cfg))
    con = sql.connect()
    try:
        con.register("listing", named.reader())
        con.register("idx", snapshot.scan(["name", "scored_at", "size", "mtime", "etag"], mine))
        picked = named.todo(con.sql(SELECT_SQL).to_arrow_table())
        seen = named.rows
        if source.may_repeat:  # a manifest may name an input twice
            con.register("listing", named.reader())
            ((seen,),) = con.execute(DISTINCT_SQL).fetchall()
        known = None
        if pc.any(picked["again"]).as_py():
            con.register("again", picked.filter(picked["again"]).select(["name"]))
            con.register("idx", snapshot.scan(["name", "image_uri", "content_sha256"], mine))
            params = {"separator": reading.KNOWN_SEPARATOR}
            known = con.sql(KNOWN_SQL, params=params).to_arrow_table()
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
    sha: str,
    snapshot: index.Snapshot | None = None,
):
    """The inputs of ``source`` to read for this model (a listing table, in the
    listing's order, with ``known`` where some were scored already) and how many
    distinct inputs it listed, against ``snapshot`` (by default the index as it stands):
    ``_select``, in the driver for small work and in a Ray task for large
    (``OFF_DRIVER_ROWS``)."""
    if isinstance(source, pa.Table):
        source = listing.Listing(cfg.input, source, empty_ok=True)
    snapshot = snapshot or index.Snapshot(cfg.out, cfg.storage)
    rows = snapshot.rows
    key = path_key(cfg)  # read here: a task's process may not have the site's key
    if not off_driver(source, rows):
        return _select(cfg, source, sha, snapshot, key)
    import ray

    from meddx.pipelines import cluster

    cluster.init_ray()
    log.debug("meddx: selection in a Ray task (index of %d rows)", rows)
    task = ray.remote(num_cpus=1, max_retries=0)(_select).options(name="meddx.select")
    try:
        return ray.get(task.remote(cfg, source, sha, snapshot, key))
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

    @property
    def since_days(self) -> int:
        return self.cfg.since_days

    def resumable(self) -> None:
        return None  # a night's inputs are selected anew: nothing of a killed one is kept

    def select(self, listed: listing.Listing, located, sha: str, resumed: None):
        from meddx.pipelines.run import Selection  # here: the join's task imports no model

        self.snapshot = index.Snapshot(self.cfg.out, self.cfg.storage)
        todo, seen = select_new(self.cfg, listed, sha, self.snapshot)
        self.selected = todo.select(listing.LISTING_SCHEMA.names)
        return Selection(todo=todo, inputs=self.selected, seen=seen)

    def check(self, run_id: str, sha: str, selection, held: lease.Lease) -> None:
        cfg = self.cfg
        held.check()
        # Defence in depth, for a store that ignores conditional writes: inputs another
        # run committed since they were selected are not committed again. Only what the
        # index gained since the selection is read: the night's cost, not the archive's.
        since = index.Snapshot(cfg.out, cfg.storage).since(self.snapshot)
        still_new = select_new(cfg, self.selected, sha, since)[0]["image_uri"]
        uris = self.selected["image_uri"]
        gone = uris.filter(pc.invert(pc.is_in(uris, value_set=still_new.combine_chunks())))
        if len(gone):
            names = set(as_indexed(cfg, gone.to_pylist()))
            dropped = commit.drop_staged(cfg.out, cfg.storage, run_id, names)
            log.warning(
                "meddx: %d inputs were committed by another run meanwhile: dropped their %d rows",
                len(gone),
                dropped,
            )
