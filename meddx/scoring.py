"""Batch scoring with Ray Data, top-down as the data flow:

    list inputs -> read bytes -> decode + preprocess (CPU tasks)
        -> predict (actor pool, one model per actor, GPU if present)
        -> assemble rows -> write Parquet to OUT/dt=RUN_DATE/

Every input gives exactly one row. A read or decode failure is caught per image and
becomes a row with ``status="error"``; the model never sees a bad tensor.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
import uuid
from dataclasses import dataclass, field

import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray

from meddx import MeddxError, __version__, decode, models, sources, storage
from meddx.decode import DecodeSettings
from meddx.predict import OUTPUT_SCHEMA, Predictor, checkpoint_precision
from meddx.storage import StorageSettings

PSEUDONYM_KEY_ENV = "MEDDX_PSEUDONYM_KEY"
PREDICTOR_RESTARTS = 3
# A CPU predictor holds the model (resnet50: 100 MB), torch's runtime and a batch's
# activations (resnet18 at batch 64 peaked at 970 MiB).
PREDICTOR_MEMORY = 3 * 2**29
# Inference batch when none is asked for: a GPU needs large batches to stay busy (the
# uint8 batch is 38 MB at 224 px); on CPU larger batches gain nothing and hold memory.
GPU_BATCH = 256
CPU_BATCH = 64
INPUTS_PER_CPU_ACTOR = 1000  # a CPU job this long gets one more predictor actor


@dataclass(frozen=True)
class ScoreConfig:
    input: str
    model: str
    out: str
    batch_size: int | None = None  # None: GPU_BATCH with GPUs, else CPU_BATCH
    actors: int | None = None  # None: one per GPU, or one on a CPU-only cluster
    run_date: str = field(default_factory=lambda: dt.date.today().isoformat())
    precision: str = "auto"
    max_pixels: int = decode.DEFAULT_MAX_PIXELS
    max_object_bytes: int = sources.DEFAULT_MAX_OBJECT_BYTES  # objects and tar members
    modalities: str | None = None  # "CR,DX", "any", or None: the checkpoint's list
    model_sha256: str | None = None  # pin: refuse any other checkpoint file
    compile_model: bool = False  # torch.compile in each predictor (GPU runs)
    storage: StorageSettings = StorageSettings()


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

    @property
    def pipeline_seconds(self) -> float:
        """From the first block read to the last Parquet file (actor start included)."""
        return self.seconds - self.startup_seconds

    @property
    def images_per_s(self) -> float:
        return self.inputs / self.seconds if self.seconds > 0 else 0.0


# ---- the pipeline --------------------------------------------------------------------


def predictor_resources(
    actors: int | None, inputs: int
) -> tuple[ray.data.ActorPoolStrategy, int | None, dict[str, float]]:
    """The predictor pool, torch threads for each actor (None: the node's CPUs), and
    what each actor asks of Ray."""
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    if gpus:
        return ray.data.ActorPoolStrategy(size=actors or gpus), None, {"num_gpus": 1}
    nodes = max(1, sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")))
    cpus = int(total.get("CPU", 1))
    # On CPU, by default one actor per node uses the node's cores through torch's
    # threads. A long job instead runs up to one single-thread actor per core: separate
    # processes do not stall at each other's thread barriers when a decode task takes a
    # core (resnet18 on 2 cores: 2 x 1 thread 28.0 images/s, 1 x 2 threads 25.4), but
    # each loads its own model, seconds of start-up a short job would not win back.
    # Their memory reservations may take at most half of the cluster's.
    fits = int(total.get("memory", 0) / 2 // PREDICTOR_MEMORY)
    wanted = actors or max(nodes, min(cpus, fits, inputs // INPUTS_PER_CPU_ACTOR))
    threads = max(1, cpus // wanted) if wanted > nodes else None
    # At least one CPU stays free for reading and decoding, or the actors would hold
    # every CPU slot and the pipeline would wait on itself. The memory reservation also
    # makes the actors' resources differ from the decode tasks', so Ray does not fuse
    # decoding into the actors: decoding stays on parallel CPU tasks.
    share = min(1.0, max(0.1, (cpus - 1) / wanted))
    return (
        ray.data.ActorPoolStrategy(size=wanted),
        threads,
        {"num_cpus": share, "memory": PREDICTOR_MEMORY},
    )


def partition_uri(out: str, run_date: str) -> str:
    return storage.join(out, f"dt={run_date}")


def file_metadata(ckpt: dict, sha: str, run_id: str, cfg: ScoreConfig) -> dict[str, str]:
    """Provenance in every Parquet file's key-value metadata (no credentials, no PHI)."""
    return {
        "meddx.version": __version__,
        "meddx.run_id": run_id,
        "meddx.run_date": cfg.run_date,
        "meddx.model_name": ckpt["model_name"],
        "meddx.model_sha256": sha,
        "meddx.class_names": json.dumps(ckpt["class_names"]),
        "meddx.positive_class": ckpt["positive_class"],
        "meddx.threshold": repr(float(ckpt["threshold"])),
        # Multi-label: the findings are class_names; label uses one threshold each.
        "meddx.multi_label": json.dumps(models.is_multi_label(ckpt)),
        "meddx.thresholds": json.dumps(ckpt.get("thresholds", [float(ckpt["threshold"])])),
        "meddx.input_size": str(ckpt["input_size"]),
        "meddx.precision": checkpoint_precision(cfg.precision, ckpt),
    }


def resolve_modalities(option: str | None, ckpt: dict) -> tuple[str, ...] | None:
    """Which DICOM Modality values to score: the option, else the checkpoint's list."""
    if option is None:
        chosen = ckpt.get("modalities", list(decode.DEFAULT_MODALITIES))
    elif option.strip().lower() == "any":
        return None
    else:
        chosen = [m.strip().upper() for m in option.split(",") if m.strip()]
    return tuple(chosen) or None


def pseudonym_key() -> bytes | None:
    """The site's HMAC key for DICOM UID pseudonyms (never logged; no key, no UIDs)."""
    key = os.environ.get(PSEUDONYM_KEY_ENV, "")
    return key.encode() if key else None


def build_dataset(
    cfg: ScoreConfig,
    uris: list[str],
    ckpt: dict,
    run_id: str,
    known: dict[str, list[str]] | None = None,
    sha: str | None = None,
) -> ray.data.Dataset:
    """list -> read -> [drop already-scored bytes] -> decode -> predict, as a Ray Dataset."""
    decode_settings = DecodeSettings(
        size=int(ckpt["input_size"]),
        max_pixels=cfg.max_pixels,
        modalities=resolve_modalities(cfg.modalities, ckpt),
        pseudonym_key=pseudonym_key(),
    )
    pool, threads, resources = predictor_resources(cfg.actors, len(uris))
    # Small read tasks keep every CPU busy and memory flat: ~64 objects per block, and
    # at least one block per tar shard (a shard holds many images).
    shards = sum(sources.is_shard(u) for u in uris)
    blocks = max(1, min(len(uris), max(shards, -(-len(uris) // 64))))
    ds = ray.data.from_items([{"image_uri": u} for u in uris], override_num_blocks=blocks)
    ds = ds.map_batches(
        sources.read_objects,
        fn_kwargs={"settings": cfg.storage, "max_bytes": cfg.max_object_bytes},
        batch_size=None,
    )
    if known:
        ds = ds.map_batches(sources.drop_known, fn_kwargs={"known": known}, batch_size=None)
    ds = ds.map_batches(
        decode.decode_images, fn_kwargs={"settings": decode_settings}, batch_size=None
    )
    return ds.map_batches(
        Predictor,
        fn_constructor_args=(cfg.model, cfg.storage, cfg.precision, run_id, sha),
        fn_constructor_kwargs={"threads": threads, "compile_model": cfg.compile_model},
        batch_size=cfg.batch_size or (GPU_BATCH if "num_gpus" in resources else CPU_BATCH),
        compute=pool,
        # A predictor whose process dies (OOM kill, lost node, preempted GPU) is
        # restarted and its unfinished batches re-run: the model is pure, so a re-run
        # batch gives the same rows, and Ray Data writes each block once. Bounded, so a
        # batch that kills its actor every time fails the run instead of looping.
        max_restarts=PREDICTOR_RESTARTS,
        max_task_retries=PREDICTOR_RESTARTS,
        **resources,
    )


def score(cfg: ScoreConfig) -> ScoreSummary:
    """Score every input under ``cfg.input`` and write ``OUT/dt=RUN_DATE/``."""
    start = time.perf_counter()
    check_run_date(cfg.run_date)
    storage.require_bucket(cfg.out, cfg.storage)
    uris = sources.list_inputs(cfg.input, cfg.storage)
    run_id = f"{cfg.run_date}-{uuid.uuid4().hex[:12]}"
    # Fail fast, in the driver; the actors then insist on the very same file.
    ckpt, sha = models.read_checkpoint(cfg.model, cfg.storage, cfg.model_sha256)
    init_ray()
    ds = build_dataset(cfg, uris, ckpt, run_id, sha=sha)
    startup = time.perf_counter() - start
    target = partition_uri(cfg.out, cfg.run_date)
    fs = storage.arrow_filesystem(target, cfg.storage)
    schema = OUTPUT_SCHEMA.with_metadata(file_metadata(ckpt, sha, run_id, cfg))
    ds.write_parquet(storage.strip_scheme(target), filesystem=fs, mode="overwrite", schema=schema)
    table = pads.dataset(storage.strip_scheme(target), filesystem=fs, format="parquet").to_table(
        columns=["status"]
    )
    ok = pc.sum(pc.equal(table["status"], "ok")).as_py() or 0
    if table.num_rows < len(uris):  # every input gives at least one row (a shard, many)
        raise MeddxError(f"wrote {table.num_rows} rows for {len(uris)} inputs under {target}")
    seconds = time.perf_counter() - start
    return ScoreSummary(
        inputs=len(uris),
        ok=ok,
        errors=table.num_rows - ok,
        rows_written=table.num_rows,
        seconds=seconds,
        output=target,
        run_id=run_id,
        startup_seconds=startup,
    )


def init_ray(dashboard: bool = False) -> None:
    """Join the cluster this runs on (``ray job submit``) or start a local one."""
    if not ray.is_initialized():
        # No usage reports leave the machine. A local scoring run skips the dashboard
        # (its processes cost seconds of start-up and a share of the CPUs); training
        # keeps it, as Ray Train watches its workers through the state API it serves.
        # Joining a cluster ignores the flag.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(
            include_dashboard=None if dashboard else False,  # None: when installed
            log_to_driver=os.environ.get("MEDDX_QUIET_WORKERS") is None,
        )
    ray.data.DataContext.get_current().enable_progress_bars = False


def check_run_date(run_date: str) -> None:
    try:
        dt.date.fromisoformat(run_date)
    except ValueError:
        raise MeddxError(f"--run-date must be YYYY-MM-DD, got {run_date!r}") from None
