"""Join scored rows with ground truth and compute screening metrics."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as pads

from meddx import MeddxError, metrics, sources, storage
from meddx.storage import StorageSettings


def read_predictions(uri: str, settings: StorageSettings):
    """All rows under a results tree, a ``dt=`` partition or one Parquet file."""
    fs = storage.arrow_filesystem(uri, settings)
    try:
        ds = pads.dataset(
            storage.strip_scheme(uri),
            filesystem=fs,
            format="parquet",
            partitioning="hive",
            exclude_invalid_files=False,
        )
        table = ds.to_table(columns=["image_uri", "status", "score", "threshold"])
    except (FileNotFoundError, OSError) as exc:
        raise MeddxError(f"cannot read predictions at {uri}: {exc}") from None
    if table.num_rows == 0:
        raise MeddxError(f"no prediction rows under {uri}")
    meta = ds.schema.metadata or {}
    return table, {k.decode(): v.decode() for k, v in meta.items()}


def evaluate(predictions: str, labels: str | None, settings: StorageSettings) -> dict:
    table, meta = read_predictions(predictions, settings)
    positive = meta.get("meddx.positive_class")
    if positive is None:
        raise MeddxError(f"{predictions} has no meddx metadata (meddx.positive_class)")
    truth = sources.manifest_labels(labels, settings) if labels else None
    rows = table.to_pylist()
    errors = sum(r["status"] != "ok" for r in rows)
    y_true, scores, unlabelled = [], [], 0
    for r in rows:
        if r["status"] != "ok":
            continue
        label = (
            truth.get(r["image_uri"])
            if truth is not None
            else sources.label_from_path(r["image_uri"])
        )
        if not label:
            unlabelled += 1
            continue
        y_true.append(label == positive)
        scores.append(r["score"])
    if not y_true:
        raise MeddxError("no scored row has a label: pass --labels MANIFEST")
    thresholds = {r["threshold"] for r in rows}
    if len(thresholds) > 1:
        raise MeddxError(f"predictions mix thresholds {sorted(thresholds)}: evaluate one model")
    result = metrics.binary_metrics(np.array(y_true), np.array(scores), thresholds.pop())
    result.update(
        rows=len(rows),
        errors=errors,
        unlabelled=unlabelled,
        positive_class=positive,
        model_name=meta.get("meddx.model_name"),
        model_sha256=meta.get("meddx.model_sha256"),
    )
    return result


def write_json(result: dict, uri: str, settings: StorageSettings) -> None:
    text = json.dumps(result, indent=2, allow_nan=True) + "\n"
    storage.write_bytes(uri, text.encode(), settings)
