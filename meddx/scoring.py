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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray
import torch

from meddx import MeddxError, __version__, decode, models, sources, storage
from meddx.decode import DecodeSettings
from meddx.storage import StorageSettings
from meddx.transforms import to_model_input

OUTPUT_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("label", pa.string()),
        ("score", pa.float32()),
        ("probs", pa.list_(pa.float32())),
        ("threshold", pa.float32()),
        ("model_name", pa.string()),
        ("model_sha256", pa.string()),
        ("content_sha256", pa.string()),
        ("run_id", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
    ]
)


@dataclass(frozen=True)
class ScoreConfig:
    input: str
    model: str
    out: str
    batch_size: int = 64
    actors: int | None = None  # None: one per GPU, or one on a CPU-only cluster
    run_date: str = field(default_factory=lambda: dt.date.today().isoformat())
    precision: str = "auto"
    max_pixels: int = decode.DEFAULT_MAX_PIXELS
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

    @property
    def images_per_s(self) -> float:
        return self.inputs / self.seconds if self.seconds > 0 else 0.0


# ---- stage 3: predict (actor pool) ---------------------------------------------------


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain fp32)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None  # CPU: fp32 unless asked otherwise


class Predictor:
    """Loads the model once per actor and scores batches under inference mode."""

    def __init__(self, checkpoint_uri: str, settings: StorageSettings, precision: str, run_id: str):
        ckpt, self.model_sha256 = models.read_checkpoint(checkpoint_uri, settings)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = models.model_from_checkpoint(ckpt).to(self.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.autocast_dtype = resolve_precision(precision, self.device)
        self.class_names = list(ckpt["class_names"])
        self.positive_index = self.class_names.index(ckpt["positive_class"])
        self.threshold = float(ckpt["threshold"])
        self.model_name = ckpt["model_name"]
        self.run_id = run_id
        self.mean = torch.tensor(ckpt["mean"], device=self.device)
        self.std = torch.tensor(ckpt["std"], device=self.device)

    @torch.inference_mode()
    def predict_probs(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).to(self.device, non_blocking=True)
        x = to_model_input(x, self.mean, self.std)
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            logits = self.model(x)
        return torch.softmax(logits.float(), dim=1).cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ok = batch["status"] == "ok"
        probs = [None] * len(ok)
        scores = [None] * len(ok)
        labels = [None] * len(ok)
        if ok.any():
            p = self.predict_probs(batch["image"][ok])
            for i, row in zip(np.flatnonzero(ok), p, strict=True):
                probs[i] = row.tolist()
                scores[i] = float(row[self.positive_index])
                labels[i] = self.label_for(row)
        n = len(ok)
        columns = {
            "image_uri": batch["image_uri"].tolist(),
            "status": batch["status"].tolist(),
            "error": [e or None for e in batch["error"].tolist()],
            "label": labels,
            "score": scores,
            "probs": probs,
            "threshold": [self.threshold] * n,
            "model_name": [self.model_name] * n,
            "model_sha256": [self.model_sha256] * n,
            "content_sha256": [h or None for h in batch["content_sha256"].tolist()],
            "run_id": [self.run_id] * n,
            "scored_at": [dt.datetime.now(dt.UTC)] * n,
        }
        return pa.Table.from_pydict(columns, schema=OUTPUT_SCHEMA)

    def label_for(self, probs: np.ndarray) -> str:
        if len(self.class_names) == 2:
            positive = probs[self.positive_index] >= self.threshold
            return self.class_names[self.positive_index if positive else 1 - self.positive_index]
        return self.class_names[int(np.argmax(probs))]


# ---- the pipeline --------------------------------------------------------------------


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def predictor_resources(actors: int | None) -> tuple[int, dict]:
    """How many predictor actors, and what each asks of Ray."""
    gpus = cluster_gpus()
    if gpus:
        return actors or gpus, {"num_gpus": 1}
    # On CPU one actor uses every core through torch's intra-op threads; more actors
    # would only split the same cores (and load the model again for each).
    return actors or 1, {"num_cpus": 1}


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
        "meddx.input_size": str(ckpt["input_size"]),
        "meddx.precision": cfg.precision,
    }


def build_dataset(cfg: ScoreConfig, uris: list[str], ckpt: dict, run_id: str) -> ray.data.Dataset:
    decode_settings = DecodeSettings(size=int(ckpt["input_size"]), max_pixels=cfg.max_pixels)
    actors, resources = predictor_resources(cfg.actors)
    # Small read tasks keep every CPU busy and memory flat: ~64 objects per block.
    blocks = max(1, min(len(uris), -(-len(uris) // 64)))
    ds = ray.data.from_items([{"image_uri": u} for u in uris], override_num_blocks=blocks)
    ds = ds.map_batches(sources.read_objects, fn_kwargs={"settings": cfg.storage}, batch_size=None)
    ds = ds.map_batches(
        decode.decode_images, fn_kwargs={"settings": decode_settings}, batch_size=None
    )
    return ds.map_batches(
        Predictor,
        fn_constructor_args=(cfg.model, cfg.storage, cfg.precision, run_id),
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        **resources,
    )


def score(cfg: ScoreConfig) -> ScoreSummary:
    """Score every input under ``cfg.input`` and write ``OUT/dt=RUN_DATE/``."""
    start = time.perf_counter()
    _check_run_date(cfg.run_date)
    uris = sources.list_inputs(cfg.input, cfg.storage)
    run_id = f"{cfg.run_date}-{uuid.uuid4().hex[:12]}"
    ckpt, sha = models.read_checkpoint(cfg.model, cfg.storage)  # fail fast, in the driver
    init_ray()
    ds = build_dataset(cfg, uris, ckpt, run_id)
    target = partition_uri(cfg.out, cfg.run_date)
    fs = storage.arrow_filesystem(target, cfg.storage)
    schema = OUTPUT_SCHEMA.with_metadata(file_metadata(ckpt, sha, run_id, cfg))
    ds.write_parquet(storage.strip_scheme(target), filesystem=fs, mode="overwrite", schema=schema)
    table = pads.dataset(storage.strip_scheme(target), filesystem=fs, format="parquet").to_table(
        columns=["status"]
    )
    ok = pc.sum(pc.equal(table["status"], "ok")).as_py() or 0
    seconds = time.perf_counter() - start
    return ScoreSummary(
        inputs=len(uris),
        ok=ok,
        errors=table.num_rows - ok,
        rows_written=table.num_rows,
        seconds=seconds,
        output=target,
        run_id=run_id,
    )


def init_ray() -> None:
    """Join the cluster this runs on (``ray job submit``) or start a local one."""
    if not ray.is_initialized():
        ray.init(log_to_driver=os.environ.get("MEDDX_QUIET_WORKERS") is None)
    ray.data.DataContext.get_current().enable_progress_bars = False


def _check_run_date(run_date: str) -> None:
    try:
        dt.date.fromisoformat(run_date)
    except ValueError:
        raise MeddxError(f"--run-date must be YYYY-MM-DD, got {run_date!r}") from None
