"""The one run skeleton that ``meddx score`` and ``meddx screen`` share:

    take the lease on OUT -> recover -> read the checkpoint -> list -> select
        -> build -> stage -> check -> commit into OUT/dt=RUN_DATE/ -> results back (SR)
        -> the command's own ending, still under the lease

Rows reach ``dt=RUN_DATE`` only through the staging and commit protocol
(``meddx.store.commit``): a run killed at any moment leaves nothing visible there, and
the next run's recovery finishes or discards what it staged. What differs between the
commands is their :class:`Policy`: which inputs to score, what to check before the
commit, whether it replaces the partition, and what to write and return after.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from meddx import MeddxError, secret
from meddx.config import ScoreConfig
from meddx.inputs import dicomweb, listing, storage
from meddx.model import registry
from meddx.model.registry import Checkpoint
from meddx.names import OUTPUT_SCHEMA
from meddx.pacs import results
from meddx.pipelines import cluster
from meddx.pipelines.dataset import build_dataset, file_metadata, selection_rules
from meddx.pipelines.dimse_spool import dimse_spool
from meddx.pipelines.path_names import indexed_names, path_key, write_path_map
from meddx.store import audit, commit, films, index, lease, progress

if TYPE_CHECKING:
    import ray

T = TypeVar("T", covariant=True)


@dataclass(frozen=True)
class Selection:
    """What a policy chose to score in this run."""

    # The inputs read and scored now: listing rows (image_uri, size, mtime, etag), with a
    # ``known`` column where some were scored already (their content hashes, per input
    # as OUT's rows name it: those bytes are dropped after reading, before decoding).
    todo: pa.Table
    inputs: pa.Table  # every input the committed rows stand for (todo, a resumed run's)
    seen: int = 0  # the distinct inputs the source listed
    resumed: str | None = None  # the killed run this one continues, under its run id
    kept_rows: int = 0  # ... and the rows it had staged, which are kept
    notes: tuple[str, ...] = ()  # said beside what recovery did


class Rows(Protocol):
    """What a run's rows are made by: one model or several (``ModelRows``), or a store's
    decoder (``meddx.pipelines.prepare``)."""

    # What made the rows (checkpoints' hashes, a decoder's fingerprint), one per model:
    # every input gets a row from each.
    shas: tuple[str, ...]
    ckpts: tuple[Checkpoint | None, ...]

    def dataset(
        self, todo: pa.Table, run_id: str, located: dict[str, str] | None
    ) -> tuple[ray.data.Dataset, pa.Schema]:
        """The Ray Dataset of the run's rows, and their schema with its provenance."""


class ModelRows:
    """Rows scored by the checkpoints ``cfg.models`` (one row each per input, in one pass
    over the films): read in the driver before anything else (a wrong file fails fast),
    then insisted on by every actor."""

    def __init__(self, cfg: ScoreConfig):
        self.cfg = cfg
        read = [registry.read_checkpoint(m, cfg.storage, cfg.model_sha256) for m in cfg.models]
        self.ckpts = tuple(ckpt for ckpt, _ in read)
        self.shas = tuple(sha for _, sha in read)
        if len(set(self.shas)) < len(self.shas):
            twice = next(s for i, s in enumerate(self.shas) if s in self.shas[:i])
            raise MeddxError(f"two --model files are the same checkpoint ({twice[:12]}...)")
        # Read once, here: a bad --rules file is one line before anything else.
        self.rules = selection_rules(cfg, self.ckpts)
        # The store the films are read from (INPUT itself, or --store), if any: refused
        # here when its films are smaller than the largest model input.
        uri = cfg.store or cfg.input
        key = secret.pseudonym_key()
        size = max(ckpt.input_size for ckpt in self.ckpts)
        self.store = films.open_store(uri, cfg.storage, size, key)

    def dataset(self, todo, run_id, located):
        ds = build_dataset(
            self.cfg, todo, self.ckpts, run_id, self.shas, self.rules, located, self.store
        )
        meta = file_metadata(self.ckpts, self.shas, run_id, self.cfg, self.rules, self.store)
        return ds, OUTPUT_SCHEMA.with_metadata(meta)


@dataclass(frozen=True)
class Outcome:
    """What the skeleton did, for the policy's ending."""

    run_id: str
    ckpts: tuple[Checkpoint | None, ...]  # (None,): a store's run
    shas: tuple[str, ...]
    located: dict[str, str] | None  # a DICOMweb source's locators
    selection: Selection
    recovered: tuple[str, ...]  # what was left of earlier runs, and what became of it
    rows: pa.Table  # this run's committed rows, in the policy's columns
    sent: results.Sent | None  # --results-to: what reached the PACS
    started: float  # the perf_counter() the run's clock started from
    startup_seconds: float  # listing, the checkpoint's check and Ray's start
    seconds: float  # from the start to the commit

    @property
    def ckpt(self) -> Checkpoint | None:
        """The first (or only) model's checkpoint."""
        return self.ckpts[0]

    @property
    def sha(self) -> str:
        return self.shas[0]


class Policy(Protocol[T]):
    """What a command decides about its run; :func:`execute` does the rest."""

    command: ClassVar[str]  # the lease holder's name ("score", "screen")
    verb: ClassVar[str]  # the progress line's ("scored", "screened")
    replace: ClassVar[bool]  # the commit replaces the run date's partition, or adds to it
    columns: ClassVar[list[str]]  # of this run's rows, which the ending reads
    schema: ClassVar[pa.Schema]  # of the rows (OUTPUT_SCHEMA, or a store's)

    @property
    def since_days(self) -> int | None:
        """A DICOMweb source is asked for the studies of the last this many days."""

    def resumable(self) -> str | None:
        """An uncommitted run of the run date whose staged rows recovery must keep."""

    def select(
        self,
        listed: listing.Listing,
        located: pa.Table | None,
        shas: tuple[str, ...],
        resumed: str | None,
    ) -> Selection:
        """The inputs to score now, of those listed, for the checkpoints ``shas`` (with a
        ``models`` bit mask where some need only some of them)."""

    def check(
        self, run_id: str, shas: tuple[str, ...], selection: Selection, held: lease.Lease
    ) -> None:
        """After staging, before the commit: raise to commit nothing, or drop rows."""

    def finish(self, outcome: Outcome) -> T:
        """After the commit and the results, still under the lease: what the command
        writes after and returns."""

    def rows(self) -> Rows:
        """What makes the run's rows (called under the lease, after recovery)."""


def execute(cfg: ScoreConfig, policy: Policy[T], started: float | None = None) -> T:
    """One run of ``policy`` over ``cfg.out``, holding the lease on OUT from before
    recovery to the end of the policy's ending. ``started``: the perf_counter() the
    run's clock starts from, where the caller started Ray before calling."""
    start = time.perf_counter() if started is None else started
    path_key(cfg)  # --pseudonymize-paths without a key: refused before OUT is touched
    storage.require_bucket(cfg.out, cfg.storage)
    run_id = cluster.new_run_id(cfg.run_date)
    # The audit records (meddx.store.audit) need no lease: a refused run is recorded too.
    record = audit.recorded(cfg.out, cfg.storage, policy.command, cfg.input, run_id, cfg.results_to)
    with (
        record,
        lease.held(
            cfg.out, cfg.storage, run_id, policy.command, cfg.wait_for_lock, cfg.lock_timeout
        ) as held,
    ):
        resumed = policy.resumable()
        recovered = commit.recover(cfg.out, cfg.storage, keep=resumed)
        maker = policy.rows()
        shas = maker.shas
        record.begin(maker.ckpts, shas)  # before the first input is listed
        listed, listed_at = list_input(cfg, policy.since_days)
        chosen = policy.select(listed, listed_at, shas, resumed)
        # A DICOMweb source's locators, of this run's inputs alone.
        located = None
        if listed_at is not None:
            located = dicomweb.locators_of(listed_at, chosen.inputs["image_uri"])
        run_id = chosen.resumed or run_id
        startup = time.perf_counter() - start
        if chosen.todo.num_rows:
            cluster.init_ray()
            # A DIMSE source read by C-MOVE: its receiver runs while the reads do.
            with dimse_spool(cfg, located) as reading:
                ds, schema = maker.dataset(chosen.todo, run_id, reading)
                startup = time.perf_counter() - start
                with progress.Progress(
                    cfg.out,
                    cfg.storage,
                    run_id,
                    pairs(chosen.todo, len(shas)),
                    policy.verb,
                    cfg.progress_seconds,
                    cfg.quiet,
                ):
                    commit.write_staged(ds, cfg.out, cfg.storage, run_id, schema)
        committed = bool(chosen.todo.num_rows or chosen.kept_rows)
        if committed:
            policy.check(run_id, shas, chosen, held)
            # What the listing said of the inputs, for the index the commit updates.
            facts = chosen.inputs.append_column("name", indexed_names(cfg, chosen.inputs))
            index.stage_inputs(cfg.out, cfg.storage, commit.staging_path(cfg.out, run_id), facts)
            # The lease is renewed, or the commit refused, just before the plan is written.
            commit.commit(
                cfg.out, cfg.storage, run_id, cfg.run_date, fence=held.check, replace=policy.replace
            )
            record.committed(run_id, cfg.run_date, policy.schema, secret.pseudonym_key())
            write_path_map(cfg, run_id, chosen.inputs["image_uri"].to_pylist())
        seconds = time.perf_counter() - start
        sent = None
        if cfg.results_to and committed:
            sent = record.sent = results.send_run(cfg, run_id, listed_at, maker.ckpts[0], shas[0])
        rows = commit.read_results(
            cfg.out,
            cfg.storage,
            policy.columns,
            where=pc.field("run_id") == run_id,
            dates=[cfg.run_date],
            schema=policy.schema,
        )
        return policy.finish(
            Outcome(
                run_id=run_id,
                ckpts=maker.ckpts,
                shas=shas,
                located=located,
                selection=chosen,
                recovered=(*recovered, *chosen.notes),
                rows=rows,
                sent=sent,
                started=start,
                startup_seconds=startup,
                seconds=seconds,
            )
        )


def list_input(cfg, since_days: int | None) -> tuple[listing.Listing, pa.Table | None]:
    """INPUT's inputs, and a DICOMweb source's locators: a store's (``meddx prepare``)
    as it holds them, each input once under its source's URI; anything else as
    ``listing.list_located`` lists it."""
    if films.is_store(cfg.input, cfg.storage):
        table = films.located(cfg.input, cfg.storage).select(listing.LISTING_SCHEMA.names)
        return listing.Listing(cfg.input, table.cast(listing.LISTING_SCHEMA)), None
    if storage.is_s3(cfg.input) and not listing.is_manifest(cfg.input):
        cluster.init_ray()  # an S3 prefix is listed by sub-prefix in Ray tasks
    return listing.list_located(cfg.input, cfg.storage, secret.pseudonym_key(), since_days)


def pairs(todo: pa.Table, models: int) -> int:
    """The (input, model) rows a run's inputs are to give: each input's models (its
    ``models`` bit mask, or all of them)."""
    if "models" not in todo.column_names:
        return todo.num_rows * models
    masks = todo["models"].to_numpy()
    return int(sum(((masks >> m) & 1).sum() for m in range(models)))
