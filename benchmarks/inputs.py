"""Scoring throughput by input layout: loose PNGs, tar shards, and a manifest.

    python benchmarks/inputs.py --n 2000 --size 512 --model resnet18

The same N synthetic radiographs are put on a local S3 endpoint (moto's server) three
ways: loose objects under a prefix, WebDataset-style tar shards, and a CSV manifest
naming the loose objects. Each is scored by the same Ray (started once) with the same
checkpoint (random weights: throughput does not depend on them), and images/s is
printed side by side. Images are cached under --cache so repeated runs skip synthesis.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import time
from pathlib import Path

import ray

from meddx.config import ScoreConfig, SynthConfig
from meddx.inputs.storage import StorageSettings, filesystem
from meddx.model import registry
from meddx.pipelines.local_s3 import s3_server
from meddx.pipelines.scoring import score
from meddx.synthetic.chest import write_archive

BUCKET = "meddx-bench"


def local_archive(n: int, size: int, cache: Path) -> list[Path]:
    folder = cache / f"synth-{n}-{size}"
    if not (folder / "_manifest.csv").exists():
        write_archive(SynthConfig(out=str(folder), n=n, size=size, seed=11))
    return sorted(folder.rglob("*.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--model", default="resnet18", choices=sorted(registry.MODELS))
    parser.add_argument("--shard-size", type=int, default=100, help="images per tar shard")
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/.cache"))
    parser.add_argument("--out", type=Path, default=None, help="write results JSON here")
    args = parser.parse_args()

    files = local_archive(args.n, args.size, args.cache)
    with s3_server() as endpoint:
        settings = StorageSettings(s3_endpoint=endpoint)
        fs = filesystem("s3://", settings)
        fs.mkdir(BUCKET)
        try:
            loose = {f"{BUCKET}/loose/{p.parent.name}/{p.name}": p.read_bytes() for p in files}
            fs.pipe(loose)
            for start in range(0, len(files), args.shard_size):
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w") as tar:
                    for p in files[start : start + args.shard_size]:
                        data = p.read_bytes()
                        info = tarfile.TarInfo(f"{p.parent.name}-{p.stem}.png")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
                fs.pipe_file(
                    f"{BUCKET}/shards/shard-{start // args.shard_size:05d}.tar", buf.getvalue()
                )
            manifest = "uri\n" + "".join(f"s3://{key}\n" for key in loose)
            fs.pipe_file(f"{BUCKET}/manifests/all.csv", manifest.encode())

            ckpt = registry.untrained_checkpoint(args.model, input_size=224)
            model_uri = f"s3://{BUCKET}/models/{args.model}.pt"
            registry.save_checkpoint(ckpt, model_uri, settings)

            ray.init()
            results = {}
            layouts = {
                "loose": f"s3://{BUCKET}/loose",
                "tar": f"s3://{BUCKET}/shards",
                "manifest": f"s3://{BUCKET}/manifests/all.csv",
            }
            for name, source in layouts.items():
                start = time.perf_counter()
                summary = score(
                    ScoreConfig(
                        input=source,
                        model=model_uri,
                        out=f"s3://{BUCKET}/out-{name}",
                        storage=settings,
                    )
                )
                seconds = time.perf_counter() - start
                assert summary.rows_written == len(files) and summary.ok == len(files), summary
                results[name] = {
                    "images": summary.rows_written,
                    "seconds": round(seconds, 2),
                    "images_per_s": round(summary.rows_written / seconds, 1),
                }
                print(
                    f"{name:9s} {summary.rows_written} images in {seconds:6.1f}s: "
                    f"{summary.rows_written / seconds:6.1f} images/s",
                    flush=True,
                )
        finally:
            ray.shutdown()
    report = {
        "model": args.model,
        "n": len(files),
        "size": args.size,
        "cpus": os.cpu_count(),
        "layouts": results,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
