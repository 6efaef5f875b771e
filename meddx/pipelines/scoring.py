"""Batch scoring with Ray Data, top-down as the data flow:

    list inputs -> read bytes -> decode + preprocess (CPU tasks)
        -> predict (actor pool, one model per actor, GPU if present)
        -> assemble rows -> stage Parquet -> commit into OUT/dt=RUN_DATE/

Every input gives exactly one row. A read or decode failure is caught per image and
becomes a row with ``status="error"``; the model never sees a bad tensor. Rows reach
``dt=RUN_DATE`` only through ``commit.py``: a run killed at any moment leaves nothing
visible there, and a finished run replaces the partition's earlier rows in one commit.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass

import pyarrow.compute as pc
import ray

from meddx import MeddxError, __version__, secret
from meddx.config import ScoreConfig
from meddx.imaging.decode import DecodeSettings
from meddx.inputs import dicomweb, sources, storage
from meddx.model import ood, optimize, registry
from meddx.model.inference import Predictor, checkpoint_precision
from meddx.model.registry import Checkpoint
from meddx.names import CPU_BATCH, GPU_BATCH, OUTPUT_SCHEMA, QC_VALUES
from meddx.pacs import stow
from meddx.pipelines import cluster
from meddx.store import commit, lease, progress

PREDICTOR_RESTARTS = 3


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

    @property
    def pipeline_seconds(self) -> float:
        """From the first block read to the commit (actor start included)."""
        return self.seconds - self.startup_seconds

    @property
    def images_per_s(self) -> float:
        return self.inputs / self.seconds if self.seconds > 0 else 0.0


# ---- the pipeline --------------------------------------------------------------------


def resolve_runtime(cfg: ScoreConfig, ckpt: Checkpoint) -> str:
    """torch, or the checkpoint's OpenVINO artefact (on a CPU-only cluster, with --runtime
    auto, when it passed its check): decided once, in the driver, once Ray is up."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    return optimize.resolve_runtime(cfg.runtime, ckpt, gpus)


def file_metadata(ckpt: Checkpoint, sha: str, run_id: str, cfg: ScoreConfig) -> dict[str, str]:
    """Provenance in every Parquet file's key-value metadata (no credentials, no PHI)."""
    model_runtime = resolve_runtime(cfg, ckpt)
    density = ood.density_of(ckpt)
    return {
        "meddx.version": __version__,
        "meddx.run_id": run_id,
        "meddx.run_date": cfg.run_date,
        "meddx.model_name": ckpt.model_name,
        "meddx.model_sha256": sha,
        "meddx.class_names": json.dumps(list(ckpt.class_names)),
        "meddx.positive_class": ckpt.positive_class,
        "meddx.threshold": repr(ckpt.threshold),
        # Multi-label: the findings are class_names; label uses one threshold each.
        "meddx.multi_label": json.dumps(ckpt.multi_label),
        "meddx.thresholds": json.dumps(list(ckpt.thresholds)),
        "meddx.input_size": str(ckpt.input_size),
        "meddx.precision": optimize.runtime_precision(
            model_runtime, ckpt, checkpoint_precision(cfg.precision, ckpt)
        ),
        "meddx.pipelines.cluster": model_runtime,
        # Quality control: the qc column's values, the views accepted, and the
        # ood_score above which a row is out_of_distribution ("" without a density).
        "meddx.qc_values": json.dumps(list(QC_VALUES)),
        "meddx.views": json.dumps(list(ckpt.views if cfg.views is None else cfg.views)),
        "meddx.ood_threshold": repr(density.threshold) if density else "",
        "meddx.ood_method": "mahalanobis" if density else "",
    }


def path_key(cfg: ScoreConfig) -> bytes | None:
    """The key of ``--pseudonymize-paths`` (the site's pseudonym key), else None."""
    if not cfg.pseudonymize_paths:
        return None
    key = secret.pseudonym_key()
    if key is None:
        raise MeddxError(
            f"--pseudonymize-paths needs the site's key: set {secret.PSEUDONYM_KEY_ENV} "
            f"or {secret.PSEUDONYM_KEY_ENV}_FILE"
        )
    return key


def as_indexed(cfg: ScoreConfig, uris) -> dict[str, str]:
    """How OUT's rows name each input: its pseudonym under --pseudonymize-paths, else
    itself (pseudonym -> input)."""
    key = path_key(cfg)
    return {sources.path_pseudonym(u, key) if key else u: u for u in uris}


def write_path_map(cfg: ScoreConfig, run_id: str, uris: list[str]) -> None:
    """``--path-map``: this run's pseudonym -> path table, as PATH_MAP/RUN_ID.parquet
    (a tar member's pseudonym is its shard's, then the keyed hash of its name)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not cfg.path_map or not uris:
        return
    indexed = as_indexed(cfg, uris)
    table = pa.table({"image_uri": list(indexed), "path": list(indexed.values())})
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    target = storage.join(cfg.path_map, f"{run_id}.parquet")
    storage.write_bytes(target, buf.getvalue().to_pybytes(), cfg.storage)


def build_dataset(
    cfg: ScoreConfig,
    uris: list[str],
    ckpt: Checkpoint,
    run_id: str,
    known: dict[str, list[str]] | None = None,
    sha: str | None = None,
    located: dict[str, str] | None = None,
) -> ray.data.Dataset:
    """list -> read + [drop already-scored bytes] + decode -> predict, as a Ray Dataset
    (reading and decoding are one task: the bytes never leave it). ``located``: each
    DICOMweb input's locator, which the read task fetches it by."""
    modalities = ckpt.modalities if cfg.modalities is None else cfg.modalities
    views = ckpt.views if cfg.views is None else cfg.views
    decode_settings = DecodeSettings(
        size=ckpt.input_size,
        max_pixels=cfg.max_pixels,
        modalities=modalities or None,
        views=views or None,
        pseudonym_key=secret.pseudonym_key(),
    )
    pool, threads, resources = cluster.predictor_pool(cfg.actors, len(uris))
    model_runtime = resolve_runtime(cfg, ckpt)
    blocks = cluster.read_blocks(len(uris), sum(sources.is_shard(u) for u in uris))
    # Ray Data's default keeps part of the CPUs for each stage of the plan; on a small
    # node that let one decode task run at a time while a core idled (2 CPUs, 960 films:
    # cores 53% and 91% busy, 16.7 images/s with an int8 model; without it 93% and 92%,
    # 25.1 images/s). Backpressure on the object store still bounds what is in flight.
    ray.data.DataContext.get_current().op_resource_reservation_enabled = False
    rows = (
        [{"image_uri": u, "locator": located[u]} for u in uris]
        if located
        else [{"image_uri": u} for u in uris]
    )
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(
        sources.read_objects,
        fn_kwargs={
            "settings": cfg.storage,
            "max_bytes": cfg.max_object_bytes,
            "decode": decode_settings,
            "known": known,
            "path_key": path_key(cfg),
        },
        batch_size=None,
        num_cpus=cluster.decode_task_cpus(resources, pool.max_size),
    )
    with warnings.catch_warnings():
        # max_restarts and max_task_retries have no named parameter yet: Ray 2.60 warns
        # that passing them as remote args is deprecated.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(
            Predictor,
            fn_constructor_args=(cfg.model, cfg.storage, cfg.precision, run_id, sha),
            fn_constructor_kwargs={
                "threads": threads,
                "compile_model": cfg.compile_model,
                "runtime": model_runtime,
            },
            batch_size=cfg.batch_size or (GPU_BATCH if "num_gpus" in resources else CPU_BATCH),
            compute=pool,
            # A predictor whose process dies (OOM kill, lost node, preempted GPU) is
            # restarted and its unfinished batches re-run: the model is pure, so a re-run
            # batch gives the same rows, and Ray Data writes each block once. The restarts
            # are bounded, so a batch that kills its actor every time fails the run instead
            # of looping. Its batches retry until then: while Ray has not yet declared a lost
            # node dead (seconds of health checks), each try fails at once as "actor
            # unavailable", and a fixed number of tries ran out before the restart came.
            max_restarts=PREDICTOR_RESTARTS,
            max_task_retries=-1,
            **resources,
        )


def score(cfg: ScoreConfig, started: float | None = None) -> ScoreSummary:
    """Score every input under ``cfg.input``; commit the rows into ``OUT/dt=RUN_DATE/``,
    holding the lease on OUT throughout. ``started``: the perf_counter() the run's clock
    starts from, where the caller started Ray before calling."""
    start = time.perf_counter() if started is None else started
    path_key(cfg)  # --pseudonymize-paths without a key: refused before OUT is touched
    storage.require_bucket(cfg.out, cfg.storage)
    run_id = cluster.new_run_id(cfg.run_date)
    with lease.held(
        cfg.out, cfg.storage, run_id, "score", cfg.wait_for_lock, cfg.lock_timeout
    ) as held:
        return _score(cfg, run_id, held, start)


def _score(cfg: ScoreConfig, run_id: str, held: lease.Lease, start: float) -> ScoreSummary:
    resumed = commit.last_uncommitted(cfg.out, cfg.storage, cfg.run_date) if cfg.resume else None
    recovered = commit.recover(cfg.out, cfg.storage, keep=resumed)
    uris, located = sources.list_located(
        cfg.input, cfg.storage, secret.pseudonym_key(), max_bytes=cfg.max_object_bytes
    )
    if not uris:
        raise MeddxError(f"no instances match the query on {dicomweb.endpoint(cfg.input).host}")
    # Fail fast, in the driver, before the dataset is built; the actors then insist on
    # the very same file.
    ckpt, sha = registry.read_checkpoint(cfg.model, cfg.storage, cfg.model_sha256)
    todo, kept = uris, 0
    if resumed:
        run_id, todo, kept = resume(cfg, resumed, uris, sha)
    elif cfg.resume:
        recovered.append(f"nothing to resume for {cfg.run_date}: scoring every input")
    startup = time.perf_counter() - start
    if todo:
        cluster.init_ray()
        ds = build_dataset(cfg, todo, ckpt, run_id, sha=sha, located=located)
        startup = time.perf_counter() - start
        schema = OUTPUT_SCHEMA.with_metadata(file_metadata(ckpt, sha, run_id, cfg))
        with progress.shown(
            cfg.out, cfg.storage, run_id, len(todo), "scored", cfg.progress_seconds, cfg.quiet
        ):
            commit.write_staged(ds, cfg.out, cfg.storage, run_id, schema)
    table = commit.read_staged(cfg.out, cfg.storage, run_id, ["status"])
    if table.num_rows < len(uris):  # every input gives at least one row (a shard, many)
        commit.discard(cfg.out, cfg.storage, run_id)
        raise MeddxError(f"staged {table.num_rows} rows for {len(uris)} inputs: not committed")
    # Re-scoring a run date replaces that partition, in the same commit; the lease is
    # renewed, or the commit refused, just before the plan is written.
    commit.commit(cfg.out, cfg.storage, run_id, cfg.run_date, fence=held.check, replace=True)
    write_path_map(cfg, run_id, uris)
    ok = pc.sum(pc.equal(table["status"], "ok")).as_py() or 0
    sent = None
    if cfg.results_to and located:
        sent = stow.send_run(cfg, run_id, located, ckpt, sha)
    return ScoreSummary(
        inputs=len(uris),
        ok=ok,
        errors=table.num_rows - ok,
        rows_written=table.num_rows,
        seconds=time.perf_counter() - start,
        output=commit.partition_uri(cfg.out, cfg.run_date),
        run_id=run_id,
        startup_seconds=startup,
        recovered=tuple(recovered),
        resumed_rows=kept,
        scored_now=len(todo),
        results=stow.describe(sent, cfg.results_to) if sent else "",
        results_failed=len(sent.failed) if sent else 0,
    )


def resume(cfg: ScoreConfig, run_id: str, uris: list[str], sha: str) -> tuple[str, list, int]:
    """``--resume``: the killed run's id, the inputs it has no rows for, and the rows it
    staged. Its half-written files are dropped (their inputs are scored again)."""
    commit.readable_staged(cfg.out, cfg.storage, run_id)
    staged = commit.read_staged(cfg.out, cfg.storage, run_id, ["image_uri", "model_sha256"])
    models_used = set(staged["model_sha256"].to_pylist()) - {sha}
    if models_used:
        raise MeddxError(
            f"run {run_id} was scoring with another checkpoint ({sorted(models_used)[0][:12]}"
            "...): run without --resume to start over"
        )
    done = {u.split("#", 1)[0] for u in staged["image_uri"].to_pylist()}
    indexed = as_indexed(cfg, uris)  # how the staged rows name the inputs
    listed = set(indexed)
    if done - listed:
        raise MeddxError(
            f"run {run_id} scored inputs that INPUT no longer lists: run without --resume"
        )
    return run_id, [u for p, u in indexed.items() if p not in done], staged.num_rows
