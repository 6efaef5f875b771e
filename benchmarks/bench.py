"""`make bench`: meddx scoring against the model's ceiling and the loop users would write.

    python benchmarks/bench.py --n 2000 --size 512 --model resnet18

Measured side by side in one run, on the same synthetic PNGs and the same model:
  (a) ceiling: forward passes on ready 224 px tensors in this process, every core, in
      fp32 and in the precision `--precision auto` picks;
  (b) the classic single-process loop: torchvision ImageFolder + DataLoader + model
      (fp32), from local disk;
  (c) `meddx score` as a whole command (start-up included) reading the same images from
      a local S3 endpoint (moto's server in its own process).
Prints images/s and the ratios c/a and c/b, and writes
benchmarks/results/<host-or-gpu>-<date>.json with the machine's description.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms

from meddx import models
from meddx.predict import resolve_precision
from meddx.storage import StorageSettings, filesystem
from meddx.synth import SynthConfig, write_archive

BIN = Path(sys.executable).parent
BATCH = 64  # the CLI's default inference batch


def archive(n: int, size: int, cache: Path) -> Path:
    folder = cache / f"synth-{n}-{size}"
    if not (folder / "_manifest.csv").exists():
        write_archive(SynthConfig(out=str(folder), n=n, size=size, seed=11))
    return folder


def ceiling(model: torch.nn.Module, dtype, seconds: float = 15.0) -> float:
    x = torch.randn(BATCH, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with (
        torch.inference_mode(),
        torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None),
    ):
        model(x)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(x)
            n += BATCH
    return n / (time.perf_counter() - start)


def classic_loop(model: torch.nn.Module, folder: Path) -> float:
    tf = transforms.Compose(
        [
            transforms.Grayscale(3),
            transforms.Resize((224, 224)),
            transforms.ToTensor(),
            transforms.Normalize(models.IMAGENET_MEAN, models.IMAGENET_STD),
        ]
    )
    loader = DataLoader(torchvision.datasets.ImageFolder(str(folder), tf), batch_size=BATCH)
    start, n = time.perf_counter(), 0
    with torch.inference_mode():
        for x, _ in loader:
            model(x.contiguous(memory_format=torch.channels_last))
            n += len(x)
    return n / (time.perf_counter() - start)


def meddx_command(folder: Path, model_name: str, precision: str) -> tuple[float, str]:
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    endpoint = f"http://127.0.0.1:{port.getsockname()[1]}"
    port.close()
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MEDDX_S3_ENDPOINT": endpoint,
        "MEDDX_QUIET_WORKERS": "1",
    }
    server = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", endpoint.rsplit(":", 1)[1]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(2)
        os.environ.update(
            {
                k: env[k]
                for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
            }
        )
        settings = StorageSettings(s3_endpoint=endpoint)
        fs = filesystem("s3://", settings)
        fs.mkdir("bench")
        fs.pipe(
            {
                f"bench/images/{p.parent.name}/{p.name}": p.read_bytes()
                for p in folder.rglob("*.png")
            }
        )
        ckpt = models.untrained_checkpoint(model_name, input_size=224)
        models.save_checkpoint(ckpt, "s3://bench/model.pt", settings)
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            done = subprocess.run(
                [
                    str(BIN / "meddx"),
                    "score",
                    "s3://bench/images",
                    "--model",
                    "s3://bench/model.pt",
                    "--out",
                    out,
                    "--precision",
                    precision,
                ],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            seconds = time.perf_counter() - start
        last = done.stdout.strip().splitlines()[-2]
        n = int(last.split("rows_written=")[1].split()[0])
        return n / seconds, last
    finally:
        server.terminate()


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--model", default="resnet18", choices=sorted(models.MODELS))
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/.cache"))
    args = parser.parse_args()

    folder = archive(args.n, args.size, args.cache)
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = models.build_model(args.model, 2).eval().to(memory_format=torch.channels_last)
    picked = resolve_precision(args.precision, torch.device("cpu"))
    a_fp32 = ceiling(model, None)
    a_picked = ceiling(model, picked) if picked is not None else a_fp32
    b = classic_loop(model, folder)
    c, line = meddx_command(folder, args.model, args.precision)
    result = {
        "date": dt.date.today().isoformat(),
        "model": args.model,
        "n": args.n,
        "size": args.size,
        "precision": str(picked or "fp32"),
        "machine": machine(),
        "a_ceiling_fp32": round(a_fp32, 1),
        "a_ceiling_picked": round(a_picked, 1),
        "b_classic_loop": round(b, 1),
        "c_meddx_score": round(c, 1),
        "c_over_a_fp32": round(c / a_fp32, 3),
        "c_over_a_picked": round(c / a_picked, 3),
        "c_over_b": round(c / b, 3),
        "meddx_summary": line,
    }
    print(json.dumps(result, indent=2))
    tag = (result["machine"]["gpu"] or socket.gethostname()).replace(" ", "-")
    path = Path("benchmarks/results") / f"{tag}-{result['date']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
