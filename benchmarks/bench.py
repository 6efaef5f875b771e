"""`make bench`: meddx scoring against the model's ceiling and the loop users would write.

    python benchmarks/bench.py                      # preset mix: 240 detector-size films
    python benchmarks/bench.py --preset png512      # 2,000 PNGs of 512 px (the old run)
    python benchmarks/bench.py --scale 1000,10000,20000 --size 128 --model seednet   # memory

Presets (--n, --size and --mix/--no-mix override them):
  mix     240 films of 2400 x 2800 px in a realistic archive's mix of formats (DICOM
          uncompressed, JPEG 2000, HTJ2K, JPEG-LS, RLE, JPEG baseline; JPEG, 16-bit PNG,
          1,024 px PNG; meddx/synthetic/chest.py's MIX), the default;
  png512  2,000 8-bit PNGs of 512 x 512 px.
The archive is written once and cached under benchmarks/.cache.

Measured side by side in one run, on the same archive and the same model:
  (a) ceiling: forward passes on ready 224 px tensors in this process, every core, of
      the model as meddx's predictor runs it (BatchNorm folded), in fp32 and in the
      precision `--precision auto` picks; and of the plain eager model in fp32;
  (b) the loop users write for such an archive: a torch Dataset over its files that
      decodes DICOM with pydicom (pixel_array, modality LUT, VOI LUT, MONOCHROME1
      inverted) and other files with PIL (16-bit PNG as I;16), scales to [0, 1], resizes
      with torchvision's antialiased Resize to 224 and normalises 3 channels as meddx
      does; DataLoader batch 64 into the eager model (fp32), from local disk, with
      num_workers=0 and with num_workers=os.cpu_count();
  (c) `meddx score` as a whole command (start-up included), in fp32 and in what `auto`
      picks, reading the archive from the local folder and from a local S3 endpoint
      (moto's server in its own process, sharing the CPUs); `--source` picks one; from
      local disk also in fp32 on LONG_RUN (4) times the films (hard links), where
      start-up weighs less; each run's core-seconds by role (TreeCPU: read + decode
      tasks, predictor, the command's own process, Ray's daemons and helper actors);
  (d) decode only: meddx's read and decode stages on Ray, no model (the CPU bound), from
      each source (c) reads;
  (e) training: `meddx train` images/s with 1 and 2 DDP workers (first --train-n films);
and decode ms per film (p50, one core) for each format in the archive, grouped by
synth.film_format: meddx's decode_image against the decode of (b)'s loop
(benchmarks/decode_formats.py's users_loop). Prints images/s, c/a (same precision) and
c/b (against the better of the two (b) runs), and writes
benchmarks/results/<host-or-gpu>-<model>-<preset>-<date>.json with the machine (CPU
model and SIMD flags, GPU if any); a later run the same day adds -b, -c, ... to the name.

`--scale N1,N2,...` instead scores N1, N2, ... PNGs (CSV manifests over one uploaded
set) and samples the proportional set size (PSS) of the whole process tree of each
`meddx score` (driver, Ray's daemons, workers, object store pages) every half second;
it reports the peak for each N, the ratio of the largest to the smallest, and checks
one row per input. With `--preset mix` (`make bench-scale-dicom`) the films are the
detector-size mix read from local disk, hard links to `--unique` rendered ones.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import multiprocessing
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
import torchvision
from decode_formats import best_ms, users_loop  # benchmarks/, beside this script
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from meddx import MeddxError
from meddx.config import SynthConfig
from meddx.imaging import decode
from meddx.inputs.sources import IMAGE_SUFFIXES
from meddx.inputs.storage import StorageSettings, filesystem
from meddx.model import optimize, registry
from meddx.model.inference import inference_model, resolve_precision
from meddx.names import CPU_BATCH, GPU_BATCH, SYNTH_FORMATS, parse_film_size
from meddx.synthetic.chest import film_format, write_archive

BIN = Path(sys.executable).parent
MEDDX = [sys.executable, "-m", "meddx"]  # works installed or from a checkout on PYTHONPATH
BATCH = 64  # the users' loop's batch
BUCKET = "bench"
MODEL_SIZE = 224
SEED = 11
CALIBRATION_FILMS = 120  # what plain int8 quantization of the (a) ceiling calibrates on
STARTED = time.perf_counter()
PRESETS = {
    "mix": {"n": 240, "size": "2400x2800", "mix": True},
    "png512": {"n": 2000, "size": "512", "mix": False},
}


def log(message: str) -> None:
    """Progress on stderr, with the seconds since the start."""
    print(f"[{time.perf_counter() - STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


# ---- the archive ----------------------------------------------------------------------


def synth_config(folder: Path, n: int, size: str, mix: bool) -> SynthConfig:
    width, height = parse_film_size(size)
    return SynthConfig(out=str(folder), n=n, size=width, height=height, mix=mix, seed=SEED)


def films(folder: Path) -> list[Path]:
    """The archive's image files (``_``/``.`` names are metadata), in a stable order."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(("_", "."))
    )


def archive(n: int, size: str, mix: bool, cache: Path, unique: int | None = None) -> Path:
    """``n`` synthetic films of ``size`` (``512`` or ``2400x2800``), PNG or the realistic
    mix; with ``unique`` < n, only that many are rendered (about 0.2 core-seconds each
    at 512 px, seconds each at detector size) and the rest are hard links to them, each
    read and decoded on its own like any other file."""
    unique = min(unique or n, n)
    kind = "mix" if mix else "synth"  # synth-N-SIZE: the PNG archives' names as before
    folder = cache / (f"{kind}-{n}-{size}" if unique == n else f"{kind}-{n}-{size}-u{unique}")
    if (folder / "_manifest.csv").exists():
        return folder
    if unique == n:
        log(f"writing {folder}")
        write_archive(synth_config(folder, n, size, mix))
        return folder
    rendered = films(archive(unique, size, mix, cache))
    for i in range(n):
        src = rendered[i % unique]
        dst = folder / src.parent.name / f"cxr-{i:06d}{src.suffix}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            os.link(src, dst)
    (folder / "_manifest.csv").write_text("links\n")
    return folder


def film_formats(folder: Path, n: int, size: str, mix: bool) -> dict[Path, str]:
    """Each film of a rendered archive (not a linked one) and its synth format."""
    cfg = synth_config(folder, n, size, mix)
    return {p: film_format(cfg, int(p.stem.split("-")[1])) for p in films(folder)}


START_UP_FILMS = 10  # issue 13's small night: a 10-image run as a whole command
LONG_RUN = 4  # (c) also runs on this many times the archive's films, from local disk


def first_films_manifest(folder: Path, k: int, cache: Path) -> Path:
    """A manifest (uri, label from the class folder) of the archive's first ``k`` films
    by index (by path they are sorted by class)."""
    first = sorted(films(folder), key=lambda p: p.name)[:k]
    path = cache / f"_{folder.name}-first{k}.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["uri", "label"])
        writer.writerows((str(p.resolve()), p.parent.name) for p in first)
    return path


# ---- (a) and (b): in this process --------------------------------------------------


def ceiling(model: torch.nn.Module, dtype, device: torch.device, seconds: float = 15.0):
    batch = GPU_BATCH if device.type == "cuda" else CPU_BATCH  # meddx score's defaults
    x = torch.randn(batch, 3, MODEL_SIZE, MODEL_SIZE, device=device)
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


def ood_cost(ckpt, device: torch.device, seconds: float) -> dict:
    """The predictor stage (Predictor.__call__: forward pass, probabilities, rows) with and
    without an out-of-distribution density, timed in alternating rounds on one batch of
    the same uint8 images: what ood_score costs in throughput."""
    from meddx.imaging.decode import INFO_DEFAULTS
    from meddx.model import ood
    from meddx.model.inference import Predictor, features_of

    batch_size = GPU_BATCH if device.type == "cuda" else CPU_BATCH
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size, MODEL_SIZE, MODEL_SIZE), dtype=np.uint8)
    features = features_of(ckpt, [images])
    groups = np.arange(len(features)) % 2
    with_density = ood.with_density(ckpt, features, groups, features)
    batch = {
        "image_uri": np.array([f"x/{i}.png" for i in range(batch_size)], dtype=object),
        "status": np.array(["ok"] * batch_size, dtype=object),
        "error": np.array([""] * batch_size, dtype=object),
        "qc": np.array(["ok"] * batch_size, dtype=object),
        "content_sha256": np.array([""] * batch_size, dtype=object),
        "image": images,
        **{
            k: np.array([v] * batch_size, dtype=np.int64 if isinstance(v, int) else object)
            for k, v in INFO_DEFAULTS.items()
        },
    }
    settings = StorageSettings()
    predictors = {
        "without": Predictor(ckpt, settings, "fp32", "bench"),
        "with": Predictor(with_density, settings, "fp32", "bench"),
    }
    counts = {k: 0 for k in predictors}
    elapsed = {k: 0.0 for k in predictors}
    rounds = 6  # alternating, so drift of the machine's speed falls on both alike
    for p in predictors.values():
        p(batch)  # warm-up
    for _ in range(rounds):
        for name, p in predictors.items():
            start = time.perf_counter()
            while time.perf_counter() - start < seconds / rounds:
                p(batch)
                counts[name] += batch_size
            elapsed[name] += time.perf_counter() - start
    rates = {k: counts[k] / elapsed[k] for k in predictors}
    return {
        "predictor_images_per_s_without_ood": round(rates["without"], 1),
        "predictor_images_per_s_with_ood": round(rates["with"], 1),
        "ood_cost": round(1 - rates["with"] / rates["without"], 4),
    }


class ArchiveDataset(Dataset):
    """The Dataset users write over an archive's files: decode_formats.users_loop (pydicom
    pixel_array + modality and VOI LUTs, MONOCHROME1 inverted, or PIL, 16-bit PNG as
    I;16; scaled to [0, 1]; antialiased Resize to 224), then 3 channels normalised with
    the checkpoint's mean and std, as meddx's to_model_input feeds the model."""

    def __init__(self, paths: list[Path], mean, std):
        self.paths = paths
        self.normalize = transforms.Normalize(mean, std)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        x = users_loop(path.read_bytes(), MODEL_SIZE)  # (1, 224, 224) float in [0, 1]
        return self.normalize(x.expand(3, -1, -1)), path.parent.name


def users_loop_rate(
    model: torch.nn.Module,
    dataset: Dataset,
    device: torch.device,
    workers: int,
    seconds: float | None = None,
) -> float:
    """Images/s of the users' loop with ``workers`` DataLoader processes (their start-up
    included, as a user pays it); over the first ``seconds`` if given."""
    start, n = time.perf_counter(), 0
    loader = DataLoader(dataset, batch_size=BATCH, num_workers=workers)
    with torch.inference_mode():
        for x, _ in loader:
            model(x.to(device).contiguous(memory_format=torch.channels_last)).cpu()
            n += len(x)
            if seconds is not None and time.perf_counter() - start > seconds:
                break
    return n / (time.perf_counter() - start)


def decode_ms_per_format(formats: dict[Path, str], per_format: int) -> dict[str, dict]:
    """Decode ms per film, p50 over up to ``per_format`` films of each format (best of 3
    each), on one core: meddx's decode_image against the users' loop's decode."""
    counts = Counter(formats.values())
    sample = defaultdict(list)
    for path, fmt in formats.items():
        if len(sample[fmt]) < per_format:
            sample[fmt].append(path.read_bytes())
    settings = decode.DecodeSettings(size=MODEL_SIZE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core, as one decode task has
    rows = {}
    try:
        for fmt in (f for f in SYNTH_FORMATS if f in sample):
            data = sample[fmt]
            meddx_ms = statistics.median(
                best_ms(lambda d=d: decode.decode_image(d, settings)) for d in data
            )
            loop_ms = statistics.median(
                best_ms(lambda d=d: users_loop(d, MODEL_SIZE)) for d in data
            )
            rows[fmt] = {
                "share": round(counts[fmt] / len(formats), 3),
                "films_timed": len(data),
                "mb_per_film": round(statistics.mean(len(d) for d in data) / 1e6, 2),
                "meddx_p50_ms": round(meddx_ms, 1),
                "users_loop_p50_ms": round(loop_ms, 1),
                "users_loop_over_meddx": round(loop_ms / meddx_ms, 2),
            }
    finally:
        torch.set_num_threads(threads)
    return rows


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
        files = films(folder)[:limit]
        uris = []
        for start in range(0, len(files), 64):  # 64 detector-size films: about 0.4 GB
            part = {f"{BUCKET}/{prefix}/{p.parent.name}/{p.name}": p for p in files[start:][:64]}
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


def cpu_times() -> list[int]:
    """Per-core (busy, total) jiffies from /proc/stat ([] where there is none)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        if line.startswith("cpu") and line[3:4].isdigit():
            ticks = [int(v) for v in line.split()[1:]]
            idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
            out.append((sum(ticks) - idle, sum(ticks)))
    return out


def busy_per_core(before: list, after: list) -> list[float]:
    """Each core's busy share between two cpu_times() readings."""
    return [
        round((b1 - b0) / max(1, t1 - t0), 3)
        for (b0, t0), (b1, t1) in zip(before, after, strict=True)
    ]


# Where a run's core-seconds go: Ray names a worker's process after what it runs.
ROLES = (("MapBatches(read_objects)", "read_decode"), ("MapBatches(Predictor)", "predictor"))


class TreeCPU:
    """Core-seconds of a command's process tree by role: its read + decode tasks' workers,
    its predictor actors, the command's own process, and the rest (Ray's daemons and
    Ray Data's helper actors). Sampled every half second while the tree lives, so a
    process's last half second may be missed."""

    def __init__(self, root: int):
        self.root = root
        self.seconds: dict[int, float] = {}
        self.role: dict[int, str] = {}

    def sample(self) -> None:
        import psutil

        try:
            tree = [psutil.Process(self.root)]
            tree += tree[0].children(recursive=True)
        except psutil.Error:
            return
        for proc in tree:
            try:
                times = proc.cpu_times()
                title = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            self.seconds[proc.pid] = times.user + times.system
            if proc.pid == self.root:
                self.role[proc.pid] = "command"
            elif proc.pid not in self.role or self.role[proc.pid] == "ray":
                # A worker keeps the first role it is seen in (decode workers later
                # run the Parquet writes too).
                found = [role for name, role in ROLES if name in title]
                self.role[proc.pid] = found[0] if found else "ray"

    def by_role(self) -> dict[str, float]:
        out = dict.fromkeys(("read_decode", "predictor", "command", "ray"), 0.0)
        for pid, seconds in self.seconds.items():
            out[self.role[pid]] += seconds
        return {role: round(seconds, 1) for role, seconds in out.items()}


def run_meddx(args: list[str], env: dict, sample_memory: bool = False) -> dict:
    """Run a meddx command; its wall time, last summary line, peak tree PSS, how busy
    each core was while it ran (the whole machine's account, start-up included) and
    its process tree's core-seconds by role (TreeCPU)."""
    cores_before = cpu_times()
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
    account = TreeCPU(proc.pid)

    def sample():
        while proc.poll() is None:
            if sample_memory:
                peak[0] = max(peak[0], tree_pss_bytes(proc.pid))
            account.sample()
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"meddx {args[0]} failed ({proc.returncode}): {err[-2000:]}")
    return {
        "seconds": seconds,
        "stdout": out,
        "peak_pss_bytes": peak[0],
        "core_busy": busy_per_core(cores_before, cpu_times()),
        "core_seconds": account.by_role(),
    }


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

    from meddx.inputs import sources

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        start = time.perf_counter()
        ds = ray.data.from_items(
            [{"image_uri": u} for u in uris], override_num_blocks=-(-len(uris) // 64)
        )
        ds = ds.map_batches(
            sources.read_objects,
            fn_kwargs={"settings": settings, "decode": decode.DecodeSettings(size=MODEL_SIZE)},
            batch_size=None,
        )
        status = [
            s for b in ds.iter_batches(batch_size=None, batch_format="numpy") for s in b["status"]
        ]
        rate = len(status) / (time.perf_counter() - start)
    finally:
        ray.shutdown()
    if status.count("ok") != len(uris):
        raise RuntimeError(f"decode only: {status.count('ok')} of {len(uris)} films decoded")
    return rate


# ---- (e) training ---------------------------------------------------------------------


def training(data: Path, model: str, workers: int, env: dict) -> float:
    """Training images/s of the last of two epochs (the first pays start-up); ``data``
    is a folder or a manifest."""
    with tempfile.TemporaryDirectory() as tmp:
        run = run_meddx(
            [
                "train",
                str(data),
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


# SIMD flags that decide decode and inference speed on the CPU.
CPU_FLAGS = ("avx", "amx", "fma", "f16c", "sse4")


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = info.splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    gpu = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu or platform.processor(),
        "cpus": os.cpu_count(),
        "cpu_flags": sorted(f for f in flags if f.startswith(CPU_FLAGS)),
        "native_bf16": bool(set(flags) & {"avx512_bf16", "amx_bf16"}),
        "gpu": gpu.name if gpu else None,
        "gpu_memory_gib": round(gpu.total_memory / 2**30, 1) if gpu else None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def write_result(result: dict, kind: str) -> None:
    print(json.dumps(result, indent=2))
    host = result["machine"]["gpu"] or f"cpu{result['machine']['cpus']}"
    source = result.get("source")
    parts = [host, result["model"], result.get("preset"), source != "both" and source]
    name = "-".join(str(p).replace(" ", "-") for p in [*parts, result["date"]] if p)
    path = Path("benchmarks/results") / f"{kind}{name}.json"
    # A second run the same day gets -b, -c, ...: results already kept stay as they are.
    for suffix in "bcdefghijklmnopqrstuvwxyz":
        if not path.exists():
            break
        path = path.with_name(f"{kind}{name}-{suffix}.json")
    if path.exists():
        raise SystemExit(f"{path} and the day's 25 before it exist: move some away")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def openvino_part(args) -> tuple[str | None, dict]:
    """(a) for the OpenVINO runtimes and ``meddx optimize`` of the bench's model: the
    optimized checkpoint's path (None when the gate refused it) and the figures."""
    torch.set_num_threads(os.cpu_count() or 1)
    ckpt = registry.untrained_checkpoint(args.model, input_size=MODEL_SIZE)
    folder = archive(args.n, args.size, args.mix, args.cache, args.unique)
    optimized, gate, calibration = optimized_checkpoint(ckpt, folder, args)
    figures = openvino_ceilings(optimized or ckpt, gate, args.ceiling_seconds, calibration)
    return (str(args.cache / f"{args.model}-int8.pt") if optimized else None), figures


def optimized_checkpoint(ckpt, folder: Path, args):
    """``meddx optimize`` (OpenVINO int8) of the bench's checkpoint, calibrated and checked
    on the archive's first films: the checkpoint with the artefact, or None when the
    accuracy gate refused it; and the gate's figures (or its one-line refusal)."""
    source = args.cache / f"{args.model}-trained.pt"
    out = args.cache / f"{args.model}-int8.pt"
    manifest = first_films_manifest(folder, args.train_n, args.cache)
    # The gate compares AUROC: on random weights (AUROC ~0.5, near-equal scores) any
    # rounding reorders them, so the model is trained first, briefly, on the same films.
    ckpt, images = trained(ckpt, manifest)
    calibration = optimize.model_inputs(ckpt, images[:CALIBRATION_FILMS])
    registry.save_checkpoint(ckpt, str(source), StorageSettings())
    try:
        r = optimize.optimize(str(source), str(manifest), str(out), StorageSettings())
    except MeddxError as exc:
        return None, {"holds": False, "refused": str(exc)}, calibration
    optimized, _ = registry.read_checkpoint(str(out), StorageSettings())
    return optimized, r.check, calibration


def trained(ckpt, manifest: Path, epochs: int = 8, lr: float = 1e-4, augment=None):
    """``ckpt``'s model trained in this process on the manifest's films (decoded as
    scoring decodes them): AUROC near 1 on synth's films, with scores spread out.

    A model that ranks the films poorly fails the int8 gate on AUROC whatever int8 does:
    at 1e-3 resnet18's scores all came out above 0.96 (AUROC 0.771 -> 0.809 for a 0.002
    score change, on an Intel Xeon); 4 epochs at 3e-4 gave AUROC 0.870 on an AMD EPYC
    (-> 0.933 for 0.016). 8 epochs at 1e-4: AUROC 1.000, 96 of 240 films between 0.05
    and 0.95. ``augment``: uint8 (N, H, W) -> float (N, 1, H, W) in [0, 1], such as
    ``meddx train``'s meddx.imaging.transforms.TrainAugment()."""
    from meddx.imaging.transforms import to_model_input

    images, truth = optimize.labelled_images(ckpt, str(manifest), StorageSettings(), 10**6)
    torch.manual_seed(0)
    model = registry.model_from_checkpoint(ckpt).train()
    mean, std = torch.tensor(ckpt.mean), torch.tensor(ckpt.std)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    labels = torch.from_numpy(truth.astype(np.int64))
    for _ in range(epochs):
        for i in torch.randperm(len(images)).split(32):
            x = torch.from_numpy(images[i.numpy()])
            x = to_model_input(augment(x) if augment else x, mean, std)
            loss = torch.nn.functional.cross_entropy(model(x), labels[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    trained_ckpt = registry.make_checkpoint(
        model.eval(),
        model_name=ckpt.model_name,
        class_names=list(ckpt.class_names),
        positive_class=ckpt.positive_class,
        input_size=ckpt.input_size,
    )
    return trained_ckpt, images


def openvino_ceilings(ckpt, gate: dict, seconds: float, calibration: np.ndarray) -> dict:
    """(a) for the OpenVINO runtimes: fp32; int8 by plain post-training quantization on
    ``calibration`` (the speed int8 gives, gate or not); and the artefact that meddx
    optimize kept, when its accuracy gate held (int8, or fp32 where accuracy control
    returned every layer to fp32)."""
    x = np.random.default_rng(0).standard_normal((CPU_BATCH, 3, MODEL_SIZE, MODEL_SIZE))
    x = x.astype(np.float32)
    out = {}
    for name in ("fp32", "int8_ptq", "gated"):
        if name == "gated":
            if not optimize.usable(ckpt):
                continue
            probe = ckpt
            out["openvino_gated_precision"] = optimize.artefact(ckpt)["precision"]
        else:
            precision = name.split("_")[0]
            xml, weights = optimize.export(ckpt, precision, calibration)
            entry = {"runtime": "openvino", "precision": precision, "xml": xml, "bin": weights}
            probe = ckpt.replace(extra={**ckpt.extra, optimize.OPTIMIZED_KEY: entry})
        compiled = optimize.CompiledModel(probe, os.cpu_count())
        compiled(x)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            compiled(x)
            n += len(x)
        out[f"openvino_{name}"] = n / (time.perf_counter() - start)
    out["openvino_int8_gate"] = {
        k: v for k, v in gate.items() if not isinstance(v, bytes | torch.Tensor)
    }
    return out


def score_from(source: str, folder: Path, ckpt, args, picked, optimized=None) -> dict:
    """(c) and (d) reading the archive from ``source`` (local or s3); with ``optimized``
    also ``meddx score --runtime auto`` with the OpenVINO int8 checkpoint."""
    log(f"(c) meddx score and (d) decode only from {source}")
    store = Store() if source == "s3" else None
    try:
        if store:
            uris = store.upload(folder, "images")
            inputs, model_uri = f"s3://{BUCKET}/images", f"s3://{BUCKET}/model.pt"
            settings, env = store.settings, store.env
        else:
            uris = [str(p) for p in films(folder)]
            inputs, model_uri = str(folder), str(args.cache / f"{args.model}.pt")
            settings, env = StorageSettings(), meddx_env()
        registry.save_checkpoint(ckpt, model_uri, settings)
        fp32 = meddx_score(env, inputs, model_uri, "fp32")
        chosen = meddx_score(env, inputs, model_uri, args.precision) if picked else fp32
        runs = {"fp32": fp32, "picked": chosen}
        if optimized is not None:
            int8_uri = model_uri.replace(".pt", "-int8.pt")
            registry.save_checkpoint(optimized, int8_uri, settings)
            runs["runtime_auto"] = meddx_score(env, inputs, int8_uri, "auto")
        d = decode_only(settings, uris)
        start_up = None
        if not store:  # a small night: what the command costs beyond its images
            ten = first_films_manifest(folder, START_UP_FILMS, args.cache)
            start_up = [meddx_score(env, str(ten), model_uri, "fp32") for _ in range(2)]
            # A longer run, where start-up weighs less: LONG_RUN times the films, hard
            # links to the same ones, each read and decoded on its own.
            longer = archive(len(uris) * LONG_RUN, args.size, args.mix, args.cache, len(uris))
            runs["fp32_long"] = meddx_score(env, str(longer), model_uri, "fp32")
    finally:
        if store:
            store.close()
    return {
        **(
            {
                "start_up_10": {
                    "whole_command_seconds": [round(r["seconds"], 2) for r in start_up],
                    "summaries": [r["summary"] for r in start_up],
                }
            }
            if start_up
            else {}
        ),
        "c": {
            name: {
                "images_per_s": round(run["images_per_s"], 1),
                "inside_command": round(run["images_per_s_inside"], 1),
                "pipeline": round(run["images_per_s_pipeline"], 1),
                "core_busy": run["core_busy"],
                "core_seconds": run["core_seconds"],
                "rows": run["rows"],
                "summary": run["summary"],
            }
            for name, run in runs.items()
        },
        "d": round(d, 1),
    }


def throughput(args) -> None:
    folder = archive(args.n, args.size, args.mix, args.cache, args.unique)
    unique = min(args.unique or args.n, args.n)
    formats = film_formats(
        archive(unique, args.size, args.mix, args.cache), unique, args.size, args.mix
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    ckpt = registry.untrained_checkpoint(args.model, input_size=MODEL_SIZE)
    eager = registry.model_from_checkpoint(ckpt).eval()
    eager = eager.to(device, memory_format=torch.channels_last)
    model = inference_model(ckpt, device)  # as meddx's predictor runs it
    picked = resolve_precision(args.precision, device)
    seconds = args.ceiling_seconds
    log(f"(a) ceiling on {device}, {seconds:.0f} s each")
    a = {"fp32_eager": ceiling(eager, None, device, seconds)}
    a["fp32"] = ceiling(model, None, device, seconds)
    a["picked"] = a["fp32"]
    if picked is not None:  # autocast over the unfolded model, as the predictor runs it
        unfolded = inference_model(ckpt, device, fold=False)
        a["picked"] = ceiling(unfolded, picked, device, seconds)
    del model
    log("(a) the predictor stage with and without the out-of-distribution score")
    a.update(ood_cost(ckpt, device, seconds * 2))
    optimized = None
    if optimize.available() and device.type == "cpu":
        log("(a) OpenVINO fp32 and int8; meddx optimize on the first films")
        # In a process of its own: OpenVINO's thread pool and state stay out of the rest
        # of the bench (in-process, the bench died of a segfault once (c) began).
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            path, figures = pool.apply(openvino_part, (args,))
        a.update(figures)
        optimized = registry.read_checkpoint(path, StorageSettings())[0] if path else None
    dataset = ArchiveDataset(films(folder), ckpt.mean, ckpt.std)
    log("(b) the users' loop, DataLoader workers 0 and all cores")
    b = {
        f"workers_{workers}": users_loop_rate(eager, dataset, device, workers, args.loop_seconds)
        for workers in (0, os.cpu_count() or 1)
    }
    del eager
    log("decode ms per format, one core")
    decode_ms = decode_ms_per_format(formats, args.format_films)
    sources = ["local", "s3"] if args.source == "both" else [args.source]
    by_source = {
        source: score_from(source, folder, ckpt, args, picked, optimized) for source in sources
    }
    b_best = max(b.values())
    ratios = {
        source: {
            "c_fp32_over_a_fp32": round(s["c"]["fp32"]["images_per_s"] / a["fp32"], 3),
            "c_picked_over_a_picked": round(s["c"]["picked"]["images_per_s"] / a["picked"], 3),
            "c_fp32_over_b_best": round(s["c"]["fp32"]["images_per_s"] / b_best, 3),
            "c_picked_over_b_best": round(s["c"]["picked"]["images_per_s"] / b_best, 3),
            "c_picked_over_d": round(s["c"]["picked"]["images_per_s"] / s["d"], 3),
            # The optional runs: the longer one (local only) and --runtime auto.
            **{
                f"c_{run}_over_{ref}": round(s["c"][run]["images_per_s"] / value, 3)
                for run in ("fp32_long", "runtime_auto")
                if run in s["c"]
                for ref, value in (("a_fp32", a["fp32"]), ("b_best", b_best))
            },
        }
        for source, s in by_source.items()
    }
    result = {
        "date": dt.date.today().isoformat(),
        "model": args.model,
        "preset": args.preset,
        "n": args.n,
        "unique": unique,
        "size": args.size,
        "mix": args.mix,
        "source": args.source,
        "formats": dict(Counter(formats.values()).most_common()),
        "precision_auto_picks": str(picked or "fp32").replace("torch.", ""),
        "machine": machine(),
        "a_ceiling": {k: round(v, 1) if isinstance(v, float) else v for k, v in a.items()},
        "b_users_loop": {k: round(v, 1) for k, v in b.items()},
        "c_meddx_score": {source: s["c"] for source, s in by_source.items()},
        "d_decode_only": {source: s["d"] for source, s in by_source.items()},
        "start_up_10": by_source.get("local", {}).get("start_up_10"),
        "ratios": ratios,
        "decode_ms_p50_one_core": decode_ms,
    }
    write_result(result, "")
    print_summary(result)
    if not args.skip_training:
        log("(e) training with 1 and 2 workers")
        subset = first_films_manifest(folder, args.train_n, args.cache)
        result["train_n"] = min(args.train_n, args.n)
        result["train_images_per_s"] = {
            f"{workers}_workers": round(training(subset, args.model, workers, meddx_env()), 1)
            for workers in (1, 2)
        }
        write_result(result, "")
        print_summary(result)


def print_summary(r: dict) -> None:
    """The run's figures in a few lines (the JSON has them all)."""
    m, a, picked = r["machine"], r["a_ceiling"], r["precision_auto_picks"]
    print(f"\n{r['preset']}: {r['n']} films of {r['size']} px, {r['model']}")
    print(f"machine: {m['cpu']} x {m['cpus']} ({' '.join(m['cpu_flags'])}); GPU {m['gpu']}")
    print(f"(a) ceiling        fp32 {a['fp32']:.1f}, {picked} {a['picked']:.1f} images/s")
    if "ood_cost" in a:
        print(
            f"    predictor stage without / with ood_score"
            f" {a['predictor_images_per_s_without_ood']:.1f} /"
            f" {a['predictor_images_per_s_with_ood']:.1f} images/s"
            f" (cost {a['ood_cost']:.1%})"
        )
    if "openvino_fp32" in a:
        gate = a["openvino_int8_gate"]
        gated = a.get("openvino_gated")
        kept = f"{a['openvino_gated_precision']} {gated:.1f}" if gated else "none"
        print(
            f"    OpenVINO       fp32 {a['openvino_fp32']:.1f}, int8 (plain PTQ)"
            f" {a['openvino_int8_ptq']:.1f} images/s"
            f" ({a['openvino_int8_ptq'] / a['fp32_eager']:.2f}x torch fp32 eager);"
            f" kept by meddx optimize: {kept}"
        )
        print(f"    gate: {gate}")
    loops = ", ".join(f"{k} {v:.1f}" for k, v in r["b_users_loop"].items())
    print(f"(b) users' loop    {loops} images/s")
    for source, c in r["c_meddx_score"].items():
        q = r["ratios"][source]
        fp32, best = c["fp32"]["images_per_s"], c["picked"]["images_per_s"]
        print(
            f"(c) meddx {source:5s}    fp32 {fp32:.1f}, {picked} {best:.1f} images/s;"
            f" c/a {q['c_fp32_over_a_fp32']}, {q['c_picked_over_a_picked']};"
            f" c/b {q['c_fp32_over_b_best']}, {q['c_picked_over_b_best']};"
            f" cores busy {c['fp32'].get('core_busy')}, {c['picked'].get('core_busy')}"
        )
        for name, run in c.items():
            print(f"    core-seconds of {name} ({run['rows']} films): {run['core_seconds']}")
        if "fp32_long" in c:
            long = c["fp32_long"]
            print(
                f"    fp32, {long['rows']} films: {long['images_per_s']:.1f} images/s"
                f" (pipeline {long['pipeline']:.1f}); c/a {q['c_fp32_long_over_a_fp32']},"
                f" c/b {q['c_fp32_long_over_b_best']}; cores busy {long['core_busy']}"
            )
        if "runtime_auto" in c:
            auto = c["runtime_auto"]["images_per_s"]
            print(
                f"    --runtime auto (OpenVINO {a['openvino_gated_precision']})"
                f" {auto:.1f} images/s;"
                f" / a fp32 {q['c_runtime_auto_over_a_fp32']};"
                f" / b {q['c_runtime_auto_over_b_best']}"
            )
    if r.get("start_up_10"):
        secs = r["start_up_10"]["whole_command_seconds"]
        print(f"    10 images, whole command, fp32: {', '.join(f'{v:.1f}' for v in secs)} s")
    for source, d in r["d_decode_only"].items():
        c_over_d = r["ratios"][source]["c_picked_over_d"]
        print(f"(d) decode {source:5s}   {d:.1f} images/s; c/d {c_over_d}")
    if "train_images_per_s" in r:
        print(f"(e) training       {r['train_images_per_s']} images/s")
    print("decode ms p50, one core: format share MB/film meddx users' loop")
    for fmt, row in r["decode_ms_p50_one_core"].items():
        print(
            f"  {fmt:16s} {row['share']:5.2f} {row['mb_per_film']:6.2f}"
            f" {row['meddx_p50_ms']:7.1f} {row['users_loop_p50_ms']:7.1f}"
            f" ({row['users_loop_over_meddx']}x)"
        )


def scale(args) -> None:
    sizes = sorted(int(n) for n in args.scale.split(","))
    ckpt = registry.untrained_checkpoint(args.model, input_size=MODEL_SIZE)
    if args.mix:
        # Detector-size films from local disk (hard links to --unique rendered films: 5,000
        # uncompressed DICOMs would be 65 GB, far beyond what moto's server holds).
        folder = archive(sizes[-1], args.size, True, args.cache, args.unique)
        store, env, model_uri = None, meddx_env(), str(args.cache / f"scale-{args.model}.pt")
        uris = [str(p.resolve()) for p in sorted(films(folder), key=lambda p: p.name)]
        registry.save_checkpoint(ckpt, model_uri, StorageSettings())
    else:
        # Any cached archive at least this large serves: the first N images are taken.
        cached = [p for p in args.cache.glob(f"synth-*-{args.size}") if p.is_dir()]
        big = [p for p in cached if int(p.name.split("-")[1]) >= sizes[-1]]
        folder = min(big, key=lambda p: int(p.name.split("-")[1])) if big else None
        folder = folder or archive(sizes[-1], args.size, False, args.cache)
        store = Store()
        env, model_uri = store.env, f"s3://{BUCKET}/model.pt"
    runs = []
    try:
        if store:
            uris = store.upload(folder, "scale", limit=sizes[-1])
            registry.save_checkpoint(ckpt, model_uri, store.settings)
        for n in sizes:
            if store:
                manifest = f"s3://{BUCKET}/manifests/{n}.csv"
                opened = store.fs.open(manifest.removeprefix("s3://"), "w")
            else:
                manifest = str(args.cache / f"_scale-{folder.name}-{n}.csv")
                opened = open(manifest, "w", newline="")
            with opened as fh:
                writer = csv.writer(fh)
                writer.writerow(["uri"])
                writer.writerows([u] for u in uris[:n])
            run = meddx_score(env, manifest, model_uri, args.precision, sample_memory=True)
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
        if store:
            store.close()
    result = {
        "date": dt.date.today().isoformat(),
        "model": args.model,
        "size": args.size,
        "mix": args.mix,
        "source": "local" if args.mix else "s3",
        "machine": machine(),
        "runs": runs,
        "peak_ratio_largest_over_smallest": round(
            runs[-1]["peak_pss_mib"] / runs[0]["peak_pss_mib"], 3
        ),
    }
    write_result(result, "scale-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="mix: 240 films of 2400x2800 px in a realistic mix of formats (the default); "
        "png512: 2,000 PNGs of 512 px (the default with --scale)",
    )
    parser.add_argument("--n", type=int, default=None, help="films [the preset's]")
    parser.add_argument(
        "--size", default=None, help="film size, SIDE or WIDTHxHEIGHT [the preset's]"
    )
    parser.add_argument(
        "--mix",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="draw each film's format from a realistic archive mix [the preset's]",
    )
    parser.add_argument("--model", default="resnet18", choices=sorted(registry.MODELS))
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--train-n", type=int, default=256, help="films per training run")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument(
        "--source",
        choices=["both", "local", "s3"],
        default="both",
        help="where (c) and (d) read: the local folder and moto's S3 server, or one of "
        "them (a GPU node outruns one moto process)",
    )
    parser.add_argument(
        "--unique",
        type=int,
        default=None,
        help="render only this many distinct films; the rest of --n are hard links",
    )
    parser.add_argument(
        "--loop-seconds",
        type=float,
        default=None,
        help="time each (b) run over its first seconds instead of all --n films",
    )
    parser.add_argument(
        "--ceiling-seconds", type=float, default=15.0, help="time each (a) run this long"
    )
    parser.add_argument(
        "--format-films",
        type=int,
        default=5,
        help="films of each format timed for the decode ms per format",
    )
    parser.add_argument(
        "--only-ood-cost",
        action="store_true",
        help="only time the predictor stage with and without the out-of-distribution score",
    )
    parser.add_argument("--scale", default=None, metavar="N1,N2,...")
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/.cache"))
    args = parser.parse_args()
    args.preset = args.preset or ("png512" if args.scale else "mix")
    preset = PRESETS[args.preset]
    custom = {k for k in preset if getattr(args, k) not in (None, preset[k])}
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    parse_film_size(args.size)  # fails early on a malformed size
    if custom:  # the preset's name no longer describes the run
        args.preset = f"{args.preset}+{'+'.join(sorted(custom))}"
    if args.only_ood_cost:
        torch.set_num_threads(os.cpu_count() or 1)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        ckpt = registry.untrained_checkpoint(args.model, input_size=MODEL_SIZE)
        result = {"model": args.model, "machine": machine()}
        result.update(ood_cost(ckpt, device, args.ceiling_seconds * 2))
        print(json.dumps(result, indent=2))
        return
    scale(args) if args.scale else throughput(args)


if __name__ == "__main__":
    main()
