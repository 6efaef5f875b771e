"""Throughput of the predict stage alone (no Ray, no decoding): the model's own ceiling.

    python benchmarks/predict_stage.py --model resnet50 --batch-size 256 --precision auto

Feeds ready uint8 batches to ``meddx.model.predictor.Predictor`` exactly as the actor pool does
and prints images/s for fp32 and for the precision meddx picks, side by side, plus the
largest score difference between the two.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import numpy as np
import torch

from meddx.imaging.decode import INFO_DEFAULTS
from meddx.inputs.storage import StorageSettings
from meddx.model import registry
from meddx.model.predictor import Predictor


def measure(predictor: Predictor, batch: dict, seconds: float) -> float:
    predictor(batch)  # warm-up: cuDNN autotuning, allocator
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        predictor(batch)
        n += len(batch["status"])
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", choices=sorted(registry.MODELS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()

    ckpt = registry.untrained_checkpoint(args.model, input_size=args.size)
    rng = np.random.default_rng(0)
    n = args.batch_size
    batch = {
        "image_uri": np.array([f"img-{i}" for i in range(n)], dtype=object),
        "image": rng.integers(0, 255, (n, args.size, args.size), dtype=np.uint8),
        "status": np.array(["ok"] * n, dtype=object),
        "qc": np.array(["ok"] * n, dtype=object),
        "error": np.array([""] * n, dtype=object),
        "content_sha256": np.array([""] * n, dtype=object),
        **{k: np.array([v] * n) for k, v in INFO_DEFAULTS.items()},
    }
    with tempfile.NamedTemporaryFile(suffix=".pt") as fh:
        registry.save_checkpoint(ckpt, fh.name, StorageSettings())
        fp32 = Predictor(fh.name, StorageSettings(), "fp32", "bench")
        picked = Predictor(fh.name, StorageSettings(), args.precision, "bench")
    result = {
        "model": args.model,
        "size": args.size,
        "batch_size": n,
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else platform.processor(),
        "torch": torch.__version__,
        "precision": str(picked.autocast_dtype or "fp32"),
        "fp32_images_per_s": measure(fp32, batch, args.seconds),
        "picked_images_per_s": measure(picked, batch, args.seconds),
        "max_score_diff": float(
            np.max(
                np.abs(
                    np.array(fp32(batch)["score"].to_pylist())
                    - np.array(picked(batch)["score"].to_pylist())
                )
            )
        ),
    }
    result["speedup"] = result["picked_images_per_s"] / result["fp32_images_per_s"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
