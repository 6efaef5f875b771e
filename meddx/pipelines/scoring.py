"""``meddx score``: every input under INPUT scored, and the run date's partition of OUT
replaced by the rows, in one commit.

    meddx score INPUT --model CKPT --out OUT --run-date 2026-11-26

The run is the skeleton of ``meddx.pipelines.run`` (lease, recover, list, build, stage,
check, commit, results back); this module holds scoring's policy. Every input gives at
least one row (a tar shard, one per member): a run that staged fewer commits nothing.
``--resume`` continues the last uncommitted run of the run date: its staged rows are
kept, and only the inputs it has no rows for are read and scored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from meddx import MeddxError
from meddx.config import ScoreConfig
from meddx.inputs import dicomweb, dimse, storage
from meddx.names import OUTPUT_SCHEMA, QC_OK
from meddx.pacs import results
from meddx.pipelines import metrics, prepare, run
from meddx.pipelines.path_names import indexed_names
from meddx.store import commit, lease


@dataclass(frozen=True)
class ScoreSummary:
    inputs: int
    ok: int
    errors: int
    rows_written: int
    seconds: float
    output: str
    run_id: str
    startup_seconds: float = 0.0  # listing, checkpoint check and Ray's start
    recovered: tuple[str, ...] = ()  # what was left of earlier runs, and what became of it
    resumed_rows: int = 0  # --resume: rows the killed run had staged, kept
    scored_now: int = 0  # inputs this run read and scored
    results: str = ""  # --results-to: what reached the PACS, in one line
    results_failed: int = 0  # studies whose report could not be stored
    qc_flagged: int = 0  # scored rows whose qc is not ok (they need a human read)
    skipped: int = 0  # rows the selection rules left out (status "skipped")

    @property
    def pipeline_seconds(self) -> float:
        """From the first block read to the commit (actor start included)."""
        return self.seconds - self.startup_seconds

    @property
    def images_per_s(self) -> float:
        return self.inputs / self.seconds if self.seconds > 0 else 0.0


def score(cfg: ScoreConfig, started: float | None = None) -> ScoreSummary:
    """Score every input under ``cfg.input``; commit the rows into ``OUT/dt=RUN_DATE/``,
    holding the lease on OUT throughout. ``started``: the perf_counter() the run's clock
    starts from, where the caller started Ray before calling. Its metrics are published
    at its end, whatever the end (``--metrics-file``, ``--pushgateway``)."""
    with metrics.recorded("score", cfg.metrics_file, cfg.pushgateway, started) as record:
        if cfg.store:
            prepare.write_through(cfg.input, cfg.store, cfg.storage, **prepare.run_options(cfg))
        summary = run.execute(cfg, Scoring(cfg), started)
        record.scored(summary)
        return summary


@dataclass(frozen=True)
class Scoring:
    """Scoring's policy: every input listed (or, resumed, those without rows yet); the
    commit replaces the partition, and the summary counts its rows."""

    cfg: ScoreConfig
    command: ClassVar[str] = "score"
    verb: ClassVar[str] = "scored"
    replace: ClassVar[bool] = True  # re-scoring a run date replaces that partition
    columns: ClassVar[list[str]] = ["status", "qc"]
    schema: ClassVar[pa.Schema] = OUTPUT_SCHEMA
    since_days: ClassVar[None] = None  # a DICOMweb INPUT's query says what it lists

    def rows(self) -> run.Rows:
        return run.ModelRows(self.cfg)

    def resumable(self) -> str | None:
        if not self.cfg.resume:
            return None
        return commit.last_uncommitted(self.cfg.out, self.cfg.storage, self.cfg.run_date)

    def select(self, source, located, shas, resumed: str | None) -> run.Selection:
        listed = source.table()  # scoring reads every input: the listing is the work
        if not listed.num_rows:  # a folder or manifest without inputs is refused as listed
            pacs = self.cfg.input
            if dimse.is_source(pacs):
                host = dimse.peer(pacs).where
            else:
                host = dicomweb.endpoint(pacs).host
            raise MeddxError(f"no instances match the query on {host}")
        if resumed:
            return resume(self.cfg, resumed, listed, shas)
        notes = ()
        if self.cfg.resume:
            notes = (f"nothing to resume for {self.cfg.run_date}: scoring every input",)
        return run.Selection(todo=listed, inputs=listed, seen=listed.num_rows, notes=notes)

    def check(self, run_id: str, shas, selection: run.Selection, held: lease.Lease) -> None:
        cfg = self.cfg
        staged = commit.read_staged(cfg.out, cfg.storage, run_id, ["model_sha256"])
        # At least one row an input (a shard, many) from each model.
        for sha in shas:
            rows = pc.sum(pc.equal(staged["model_sha256"], sha)).as_py() or 0
            if rows < selection.inputs.num_rows:
                commit.discard(cfg.out, cfg.storage, run_id)
                of = f" of model {sha[:12]}..." if len(shas) > 1 else ""
                raise MeddxError(
                    f"staged {rows} rows{of} for {selection.inputs.num_rows} inputs: not committed"
                )

    def finish(self, outcome: run.Outcome) -> ScoreSummary:
        rows = outcome.rows.num_rows
        ok = pc.sum(pc.equal(outcome.rows["status"], "ok")).as_py() or 0
        skipped = pc.sum(pc.equal(outcome.rows["status"], "skipped")).as_py() or 0
        sent = outcome.sent
        flagged = pc.and_(
            pc.equal(outcome.rows["status"], "ok"), pc.not_equal(outcome.rows["qc"], QC_OK)
        )
        return ScoreSummary(
            inputs=outcome.selection.seen,
            ok=ok,
            errors=rows - ok - skipped,
            skipped=skipped,
            rows_written=rows,
            seconds=time.perf_counter() - outcome.started,
            output=commit.partition_uri(self.cfg.out, self.cfg.run_date),
            run_id=outcome.run_id,
            startup_seconds=outcome.startup_seconds,
            recovered=outcome.recovered,
            resumed_rows=outcome.selection.kept_rows,
            scored_now=outcome.selection.todo.num_rows,
            results=results.describe(sent, self.cfg.results_to) if sent else "",
            results_failed=len(sent.failed) if sent else 0,
            qc_flagged=pc.sum(flagged).as_py() or 0,
        )


def resume(cfg: ScoreConfig, run_id: str, listed: pa.Table, shas) -> run.Selection:
    """``--resume``: continue the killed run ``run_id`` under its id, keeping the rows it
    staged and scoring the inputs it has none for (an anti-join of the listing against
    the staged rows, by the name OUT's rows give each input). Its half-written files are
    dropped (their inputs are scored again)."""
    commit.readable_staged(cfg.out, cfg.storage, run_id)
    staged = commit.read_staged(cfg.out, cfg.storage, run_id, ["image_uri", "model_sha256"])
    used = set(pc.unique(staged["model_sha256"]).to_pylist())
    if used - set(shas):
        raise MeddxError(
            f"run {run_id} was scoring with another checkpoint ({sorted(used - set(shas))[0][:12]}"
            "...): run without --resume to start over"
        )
    if used and used != set(shas):  # its inputs have rows of each of its models, or none
        raise MeddxError(
            f"run {run_id} was scoring {len(used)} of these {len(shas)} checkpoints: "
            "run without --resume to start over"
        )
    # A member counts for its shard; the staged rows name inputs as indexed_names does.
    done = pc.unique(storage.shards_of(staged["image_uri"]).combine_chunks())
    names = indexed_names(cfg, listed).combine_chunks()
    if pc.any(pc.invert(pc.is_in(done, value_set=names))).as_py():
        raise MeddxError(
            f"run {run_id} scored inputs that INPUT no longer lists: run without --resume"
        )
    todo = listed.filter(pc.invert(pc.is_in(names, value_set=done)))
    return run.Selection(
        todo=todo,
        inputs=listed,
        seen=listed.num_rows,
        resumed=run_id,
        kept_rows=staged.num_rows,
    )
