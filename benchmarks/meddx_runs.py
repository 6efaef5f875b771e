"""(c), (d) and (e) of bench.py, meddx itself timed: ``meddx score`` as a whole command,
the read and decode stages alone on Ray, ``meddx train``; and moto's S3 server they read
from."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ceilings import MODEL_SIZE
from film_archive import films
from process_tree import meddx_env, run_meddx

from meddx.imaging import decode
from meddx.inputs.storage import StorageSettings, filesystem

BIN = Path(sys.executable).parent
BUCKET = "bench"


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


# ---- (c) the whole command ----------------------------------------------------------


def meddx_score(
    env: dict,
    inputs: str,
    model: str | list[str],
    precision: str,
    out: str | None = None,
    args: tuple[str, ...] = (),
    **kw,
) -> dict:
    """``meddx score`` timed (several models in one pass, given a list), with ``args``
    added to its command line; its results are kept in ``out`` when one is given."""
    models = [model] if isinstance(model, str) else model
    with tempfile.TemporaryDirectory() as tmp:
        run = run_meddx(
            [
                "score",
                inputs,
                *(a for m in models for a in ("--model", m)),
                "--out",
                out or tmp,
                "--precision",
                precision,
                *args,
            ],  # fmt: skip
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
        "pipeline_seconds": pipeline,
        "summary": summary,
    }


def score_figures(run: dict) -> dict:
    """What a meddx_score run keeps in a result file (bench.py, store.py)."""
    return {
        "images_per_s": round(run["images_per_s"], 1),
        "inside_command": round(run["images_per_s_inside"], 1),
        "pipeline": round(run["images_per_s_pipeline"], 1),
        "core_busy": run["core_busy"],
        "core_seconds": run["core_seconds"],
        "rows": run["rows"],
        "summary": run["summary"],
    }


# ---- (d) decode only ----------------------------------------------------------------


def decode_only(settings: StorageSettings, uris: list[str], size: int = MODEL_SIZE) -> float:
    """meddx's read and decode stages on Ray with nothing after them (start-up excluded),
    films decoded to ``size`` (the model's input by default)."""
    import ray

    from meddx.inputs import reading

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        start = time.perf_counter()
        ds = ray.data.from_items(
            [{"image_uri": u} for u in uris], override_num_blocks=-(-len(uris) // 64)
        )
        ds = ds.map_batches(
            reading.read_objects,
            fn_kwargs={"settings": settings, "decode": decode.DecodeSettings(size=size)},
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


# ---- (e) training -------------------------------------------------------------------


def training(data: Path, model: str, workers: int, env: dict, epochs: int = 2) -> float:
    """Training images/s of the last of ``epochs`` (the first pays start-up); ``data``
    is a folder, a manifest or a store of films."""
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
                str(epochs),
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
