"""`make bench`: meddx scoring against the model's ceiling and the loop users would write.

    python benchmarks/bench.py --n 2000 --size 512 --model resnet18
    python benchmarks/bench.py --scale 1000,10000,20000 --size 128 --model seednet   # memory

Measured side by side in one run, on the same synthetic PNGs and the same model:
  (a) ceiling: forward passes on ready 224 px tensors in this process, every core, of
      the model as meddx's predictor runs it (BatchNorm folded), in fp32 and in the
      precision `--precision auto` picks; and of the plain eager model in fp32;
  (b) the classic single-process loop: torchvision ImageFolder + DataLoader + model
      (fp32), from local disk;
  (c) `meddx score` as a whole command (start-up included) reading the same images from
      a local S3 endpoint (moto's server in its own process, sharing the CPUs) or, with
      `--source local`, from the folder (b) reads; in fp32 and in what `auto` picks;
  (d) decode only: meddx's read and decode stages on Ray, no model (the CPU bound);
  (e) training: `meddx train` images/s with 1 and 2 DDP workers.
Prints images/s and the ratios c/a and c/b, and writes
benchmarks/results/<host-or-gpu>-<date>.json with the machine's description.

`--scale N1,N2,...` instead scores N1, N2, ... images (CSV manifests over one uploaded
set) and samples the proportional set size (PSS) of the whole process tree of each
`meddx score` (driver, Ray's daemons, workers, object store pages) every half second;
it reports the peak for each N, the ratio of the largest to the smallest, and checks
one row per input.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms

from meddx import models
from meddx.config import SynthConfig
from meddx.names import CPU_BATCH, GPU_BATCH
from meddx.predict import inference_model, resolve_precision
from meddx.storage import StorageSettings, filesystem
from meddx.synth import write_archive

BIN = Path(sys.executable).parent
MEDDX = [sys.executable, "-m", "meddx"]  # works installed or from a checkout on PYTHONPATH
BATCH = 64  # the classic loop's batch
BUCKET = "bench"


def archive(n: int, size: int, cache: Path, unique: int | None = None) -> Path:
    """``n`` synthetic PNGs; with ``unique`` < n, only that many are rendered (about
    0.2 core-seconds each at 512 px) and the rest are hard links to them, each read and
    decoded on its own like any other file."""
    unique = min(unique or n, n)
    folder = cache / (f"synth-{n}-{size}" if unique == n else f"synth-{n}-{size}-u{unique}")
    if (folder / "_manifest.csv").exists():
        return folder
    if unique == n:
        write_archive(SynthConfig(out=str(folder), n=n, size=size, seed=11))
        return folder
    rendered = sorted(archive(unique, size, cache).rglob("*.png"))
    for i in range(n):
        src = rendered[i % unique]
        dst = folder / src.parent.name / f"cxr-{i:06d}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            os.link(src, dst)
    (folder / "_manifest.csv").write_text("links\n")
    return folder


# ---- (a) and (b): in this process --------------------------------------------------


def ceiling(model: torch.nn.Module, dtype, device: torch.device, seconds: float = 15.0):
    batch = GPU_BATCH if device.type == "cuda" else CPU_BATCH  # meddx score's defaults
    x = torch.randn(batch, 3, 224, 224, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
    ):
        model(x)
        sync()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(x)
            n += batch
        sync()
    return n / (time.perf_counter() - start)


def classic_loop(
    model: torch.nn.Module, folder: Path, device: torch.device, seconds: float | None = None
) -> float:
    """Images/s of the loop users would write; over the first ``seconds`` if given."""
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
            model(x.to(device).contiguous(memory_format=torch.channels_last)).cpu()
            n += len(x)
            if seconds is not None and time.perf_counter() - start > seconds:
                break
    return n / (time.perf_counter() - start)


# ---- the S3 endpoint and the subprocesses --------------------------------------------


class Store:
    """moto's S3 server in its own process, and the environment to reach it."""

    def __init__(self):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        creds = {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        os.environ.update(creds)
        self.env = {**meddx_env(), **creds, "MEDDX_S3_ENDPOINT": self.endpoint}
        self.proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.settings = StorageSettings(s3_endpoint=self.endpoint)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.fs = filesystem("s3://", self.settings)
        self.fs.mkdir(BUCKET)

    def upload(self, folder: Path, prefix: str, limit: int | None = None) -> list[str]:
        files = sorted(folder.rglob("*.png"))[:limit]
        uris = []
        for start in range(0, len(files), 500):
            part = {f"{BUCKET}/{prefix}/{p.parent.name}/{p.name}": p for p in files[start:][:500]}
            self.fs.pipe({key: p.read_bytes() for key, p in part.items()})
            uris += [f"s3://{key}" for key in part]
        return uris

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def meddx_env() -> dict:
    # A Ray of its own, never another running one; workers' logs stay out of the output.
    return {**os.environ, "RAY_ADDRESS": "local", "MEDDX_QUIET_WORKERS": "1"}


def tree_pss_bytes(root: int) -> int:
    """Proportional set size of ``root`` and all its descendants (shared pages, such as
    the object store's, counted once in total)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        match = re.search(r"^Pss:\s+(\d+) kB", rollup, re.M)
        total += int(match.group(1)) * 1024 if match else 0
    return total


def run_meddx(args: list[str], env: dict, sample_memory: bool = False) -> dict:
    """Run a meddx command; its wall time, last summary line and peak tree PSS."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [*MEDDX, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    peak = [0]
    if sample_memory:

        def sample():
            while proc.poll() is None:
                peak[0] = max(peak[0], tree_pss_bytes(proc.pid))
                time.sleep(0.5)

        threading.Thread(target=sample, daemon=True).start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"meddx {args[0]} failed ({proc.returncode}): {err[-2000:]}")
    return {"seconds": seconds, "stdout": out, "peak_pss_bytes": peak[0]}


def meddx_score(env: dict, inputs: str, model: str, precision: str, **kw) -> dict:
    with tempfile.TemporaryDirectory() as out:
        run = run_meddx(
            ["score", inputs, "--model", model, "--out", out, "--precision", precision],
            env,
            **kw,
        )
    summary = next(line for line in run["stdout"].splitlines()[::-1] if "rows_written=" in line)
    rows = int(summary.split("rows_written=")[1].split()[0])
    # The command's own clock starts after its imports and ends before it exits; its
    # pipeline clock starts once Ray is up and the dataset is planned.
    inside = float(re.search(r"\bseconds=([\d.]+)", summary).group(1))
    pipeline = float(re.search(r"\bpipeline_seconds=([\d.]+)", summary).group(1))
    return {
        **run,
        "rows": rows,
        "images_per_s": rows / run["seconds"],
        "images_per_s_inside": rows / inside,
        "images_per_s_pipeline": rows / pipeline,
        "summary": summary,
    }


# ---- (d) decode only ------------------------------------------------------------------


def decode_only(settings: StorageSettings, uris: list[str]) -> float:
    """meddx's read and decode stages on Ray with nothing after them (start-up excluded)."""
    import ray

    from meddx import decode, sources

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        start = time.perf_counter()
        ds = ray.data.from_items(
            [{"image_uri": u} for u in uris], override_num_blocks=-(-len(uris) // 64)
        )
        ds = ds.map_batches(sources.read_objects, fn_kwargs={"settings": settings}, batch_size=None)
        ds = ds.map_batches(
            decode.decode_images,
            fn_kwargs={"settings": decode.DecodeSettings(size=224)},
            batch_size=None,
        )
        n = sum(len(b["status"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))
        return n / (time.perf_counter() - start)
    finally:
        ray.shutdown()


# ---- (e) training ---------------------------------------------------------------------


def training(folder: Path, model: str, workers: int, env: dict) -> float:
    """Training images/s of the last of two epochs (the first pays start-up)."""
    with tempfile.TemporaryDirectory() as tmp:
        run = run_meddx(
            [
                "train",
                str(folder),
                "--out",
                f"{tmp}/m.pt",
                "--model",
                model,
                "--workers",
                str(workers),
                "--epochs",
                "2",
                "--image-size",
                "224",
                "--storage-path",
                f"{tmp}/runs",
            ],
            env,
        )
    rates = re.findall(r"train_images_per_s=([\d.]+)", run["stdout"])  # the CLI's summary
    if not rates:
        raise RuntimeError("meddx train printed no train_images_per_s")
    return float(rates[-1])


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
    flags = set(open("/proc/cpuinfo").read().split()) if Path("/proc/cpuinfo").exists() else set()
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def write_result(result: dict, kind: str) -> None:
    print(json.dumps(result, indent=2))
    host = result["machine"]["gpu"] or f"cpu{result['machine']['cpus']}"
    parts = [host, result["model"], result.get("source"), result["date"]]
    name = "-".join(str(p).replace(" ", "-") for p in parts if p)
    path = Path("benchmarks/results") / f"{kind}{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def throughput(args) -> None:
    folder = archive(args.n, args.size, args.cache, args.unique)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    ckpt = models.untrained_checkpoint(args.model, input_size=224)
    eager = models.model_from_checkpoint(ckpt).eval()
    eager = eager.to(device, memory_format=torch.channels_last)
    model = inference_model(ckpt, device)  # as meddx's predictor runs it
    picked = resolve_precision(args.precision, device)
    a_eager = ceiling(eager, None, device)
    a_fp32 = ceiling(model, None, device)
    a_picked = (
        ceiling(inference_model(ckpt, device, fold=False), picked, device)  # as the predictor
        if picked is not None
        else a_fp32
    )
    b = classic_loop(eager, folder, device, args.loop_seconds)
    del model, eager
    store = Store() if args.source == "s3" else None
    env = store.env if store else meddx_env()
    try:
        if store:
            uris, inputs, model_uri = (
                store.upload(folder, "images"),
                f"s3://{BUCKET}/images",
                f"s3://{BUCKET}/model.pt",
            )
            settings = store.settings
        else:
            uris = [str(p) for p in sorted(folder.rglob("*.png"))]
            inputs, model_uri = str(folder), str(args.cache / f"{args.model}.pt")
            settings = StorageSettings()
        models.save_checkpoint(ckpt, model_uri, settings)
        c_fp32 = meddx_score(env, inputs, model_uri, "fp32")
        c_picked = (
            meddx_score(env, inputs, model_uri, args.precision) if picked is not None else c_fp32
        )
        d = decode_only(settings, uris)
    finally:
        if store:
            store.close()
    c, cp = c_fp32["images_per_s"], c_picked["images_per_s"]
    result = {
        "date": dt.date.today().isoformat(),
        "model": args.model,
        "n": args.n,
        "unique": min(args.unique or args.n, args.n),
        "size": args.size,
        "source": args.source,
        "precision_auto_picks": str(picked or "fp32").replace("torch.", ""),
        "machine": machine(),
        "a_ceiling_fp32_eager": round(a_eager, 1),
        "a_ceiling_fp32": round(a_fp32, 1),
        "a_ceiling_picked": round(a_picked, 1),
        "b_classic_loop": round(b, 1),
        "c_meddx_score_fp32": round(c, 1),
        "c_meddx_score_picked": round(cp, 1),
        "c_fp32_inside_command": round(c_fp32["images_per_s_inside"], 1),
        "c_picked_inside_command": round(c_picked["images_per_s_inside"], 1),
        "c_fp32_pipeline": round(c_fp32["images_per_s_pipeline"], 1),
        "c_picked_pipeline": round(c_picked["images_per_s_pipeline"], 1),
        "d_decode_only": round(d, 1),
        "c_fp32_over_a_fp32": round(c / a_fp32, 3),
        "c_fp32_over_b": round(c / b, 3),
        "c_picked_over_a_fp32": round(cp / a_fp32, 3),
        "c_picked_over_b": round(cp / b, 3),
        "c_picked_over_d": round(cp / d, 3),
        "meddx_summary_fp32": c_fp32["summary"],
        "meddx_summary_picked": c_picked["summary"],
    }
    write_result(result, "")
    if not args.skip_training:
        subset = archive(args.train_n, args.size, args.cache)
        result["train_n"] = args.train_n
        result["train_images_per_s"] = {
            f"{workers}_workers": round(training(subset, args.model, workers, env), 1)
            for workers in (1, 2)
        }
        write_result(result, "")


def scale(args) -> None:
    sizes = sorted(int(n) for n in args.scale.split(","))
    # Any cached archive at least this large serves: the first N images are taken.
    cached = [p for p in args.cache.glob(f"synth-*-{args.size}") if p.is_dir()]
    big = [p for p in cached if int(p.name.split("-")[1]) >= sizes[-1]]
    folder = min(big, key=lambda p: int(p.name.split("-")[1])) if big else None
    folder = folder or archive(sizes[-1], args.size, args.cache)
    store = Store()
    runs = []
    try:
        uris = store.upload(folder, "scale", limit=sizes[-1])
        ckpt = models.untrained_checkpoint(args.model, input_size=224)
        models.save_checkpoint(ckpt, f"s3://{BUCKET}/model.pt", store.settings)
        for n in sizes:
            manifest = f"{BUCKET}/manifests/{n}.csv"
            with store.fs.open(manifest, "w") as fh:
                writer = csv.writer(fh)
                writer.writerow(["uri"])
                writer.writerows([u] for u in uris[:n])
            run = meddx_score(
                store.env,
                f"s3://{manifest}",
                f"s3://{BUCKET}/model.pt",
                args.precision,
                sample_memory=True,
            )
            runs.append(
                {
                    "n": n,
                    "rows": run["rows"],
                    "one_row_per_input": run["rows"] == n,
                    "seconds": round(run["seconds"], 1),
                    "images_per_s": round(run["images_per_s"], 1),
                    "peak_pss_mib": round(run["peak_pss_bytes"] / 2**20),
                }
            )
            print(json.dumps(runs[-1]), flush=True)
    finally:
        store.close()
    result = {
        "date": dt.date.today().isoformat(),
        "model": args.model,
        "size": args.size,
        "machine": machine(),
        "runs": runs,
        "peak_ratio_largest_over_smallest": round(
            runs[-1]["peak_pss_mib"] / runs[0]["peak_pss_mib"], 3
        ),
    }
    write_result(result, "scale-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--model", default="resnet18", choices=sorted(models.MODELS))
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--train-n", type=int, default=256, help="images per training run")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument(
        "--source",
        choices=["s3", "local"],
        default="s3",
        help="where (c) and (d) read: moto's S3 server, or the local folder (a GPU node "
        "outruns one moto process)",
    )
    parser.add_argument(
        "--unique",
        type=int,
        default=None,
        help="render only this many distinct images; the rest of --n are hard links",
    )
    parser.add_argument(
        "--loop-seconds",
        type=float,
        default=None,
        help="time (b) over its first seconds instead of all --n images",
    )
    parser.add_argument("--scale", default=None, metavar="N1,N2,...")
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/.cache"))
    args = parser.parse_args()
    scale(args) if args.scale else throughput(args)


if __name__ == "__main__":
    main()
