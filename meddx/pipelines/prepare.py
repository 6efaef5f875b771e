"""``meddx prepare``: each input decoded once into a store of model-ready films, which
``score``, ``screen`` and ``train`` then read instead of decoding.

    meddx prepare INPUT --out STORE [--size 512]

The run is the skeleton of ``meddx.pipelines.run``, over STORE: the lease, recovery,
the listing, the selection of a screening night (only inputs the store has no row for,
or whose size, mtime, ETag or content changed), the staging and the commit. The rows
are the store's (``meddx.store.films``), made in the read task: a film's bytes never
leave it, only its PNG at the store's size does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import ray

from meddx import secret
from meddx.config import PrepareConfig, ScoreConfig
from meddx.inputs import reading
from meddx.inputs.storage import StorageSettings
from meddx.pipelines import cluster, run
from meddx.pipelines.dataset import scored_inputs, shard_count
from meddx.pipelines.selection import WhatIsNew
from meddx.store import films


@dataclass(frozen=True)
class PrepareSummary:
    store: str
    run_id: str
    inputs_seen: int
    prepared: int  # inputs decoded now (new or changed)
    rows: int  # their rows (a tar shard: one per member)
    ok: int
    errors: int
    seconds: float
    stored_bytes: int  # of the films written now (their PNGs)
    recovered: tuple[str, ...] = ()
    startup_seconds: float = 0.0  # listing, selection and Ray's start

    @property
    def pipeline_seconds(self) -> float:
        """From the first block read to the commit."""
        return self.seconds - self.startup_seconds

    @property
    def images_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def prepare(cfg: PrepareConfig, started: float | None = None) -> PrepareSummary:
    """Decode INPUT's new and changed inputs into STORE, holding the store's lease."""
    return run.execute(cfg, Preparing(cfg), started)


class FilmRows:
    """The store's rows, made by the decoder of ``films`` (``films.film_rows``)."""

    ckpts = (None,)

    def __init__(self, cfg: PrepareConfig, settings: films.FilmSettings):
        self.cfg, self.films = cfg, settings
        self.sha = settings.sha256
        self.shas = (self.sha,)

    def dataset(self, todo, run_id, located):
        cfg = self.cfg
        decode = self.films.decode(secret.pseudonym_key())
        uris = todo["image_uri"]
        ray.data.DataContext.get_current().op_resource_reservation_enabled = False
        blocks = cluster.read_blocks(len(uris), shard_count(uris))
        ds = ray.data.from_arrow(scored_inputs(todo, located), override_num_blocks=blocks)
        ds = ds.map_batches(
            reading.read_objects,
            fn_kwargs={
                "settings": cfg.storage,
                "max_bytes": cfg.max_object_bytes,
                "rows_of": _RowsOf(decode, self.sha, run_id),
            },
            batch_size=None,
            num_cpus=1,
        )
        meta = films.file_metadata(self.films, run_id, cfg.run_date)
        return ds, films.STORE_SCHEMA.with_metadata(meta)


@dataclass(frozen=True)
class _RowsOf:
    """``films.film_rows`` with its settings, as a picklable callable for the read task."""

    decode: object
    sha: str
    run_id: str

    def __call__(self, chunk):
        return films.film_rows(chunk, self.decode, self.sha, self.run_id)


@dataclass
class Preparing(WhatIsNew):
    """Preparing's policy: a screening night's selection and check (``WhatIsNew``),
    over the store; the commit adds to the run date's partition."""

    cfg: PrepareConfig
    command: ClassVar[str] = "prepare"
    verb: ClassVar[str] = "prepared"
    replace: ClassVar[bool] = False
    columns: ClassVar[list[str]] = ["status"]
    schema: ClassVar[pa.Schema] = films.STORE_SCHEMA

    def rows(self) -> FilmRows:
        settings = films.FilmSettings(
            size=self.cfg.size,
            max_pixels=self.cfg.max_pixels,
            key_id=films.key_id(secret.pseudonym_key()),
        )
        films.claim(self.cfg.out, self.cfg.storage, settings)  # under the store's lease
        return FilmRows(self.cfg, settings)

    def finish(self, outcome: run.Outcome) -> PrepareSummary:
        rows = outcome.rows
        ok = pc.sum(pc.equal(rows["status"], "ok")).as_py() or 0
        return PrepareSummary(
            store=self.cfg.out,
            run_id=outcome.run_id,
            inputs_seen=outcome.selection.seen,
            prepared=outcome.selection.todo.num_rows,
            rows=rows.num_rows,
            ok=ok,
            errors=rows.num_rows - ok,
            seconds=time.perf_counter() - outcome.started,
            stored_bytes=films.run_bytes(self.cfg.out, self.cfg.storage, outcome.run_id),
            recovered=outcome.recovered,
            startup_seconds=outcome.startup_seconds,
        )


def write_through(
    input: str,
    store: str,
    storage: StorageSettings,
    run_date: str | None = None,
    **options,
) -> PrepareSummary:
    """``--store``: INPUT's new and changed inputs decoded into the store before a run
    reads its films from it (the store's own run, under the store's lease), at the
    store's size and pixel limit, or the defaults for a new store. ``options``: other
    PrepareConfig fields (the lease's waits, progress, a DICOMweb source's)."""
    found = films.read_settings(store, storage)
    if found is not None:
        options.update(size=found.size, max_pixels=found.max_pixels)
    if run_date is not None:
        options["run_date"] = run_date
    return prepare(PrepareConfig(input=input, out=store, storage=storage, **options))


def run_options(cfg: ScoreConfig) -> dict:
    """What a scoring run passes on to the store's run it starts (``write_through``)."""
    return {
        "run_date": cfg.run_date,
        "max_pixels": cfg.max_pixels,  # a new store's; an existing store keeps its own
        "max_object_bytes": cfg.max_object_bytes,
        "wait_for_lock": cfg.wait_for_lock,
        "lock_timeout": cfg.lock_timeout,
        "progress_seconds": cfg.progress_seconds,
        "quiet": cfg.quiet,
        "since_days": getattr(cfg, "since_days", 2),
        "allow_insecure_http": cfg.allow_insecure_http,
    }
