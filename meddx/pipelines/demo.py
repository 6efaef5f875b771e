"""`make demo`: the whole path on one machine against a real local S3 endpoint.

moto's S3 server on a free loopback port -> synthetic archive (train + held-out) ->
DDP training with 2 CPU workers -> Ray Data scoring of the held-out prefix -> Parquet ->
evaluation. The endpoint is stopped at the end; the checkpoint, predictions and metrics
stay in the work folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time

import click

from meddx import MeddxError
from meddx.analysis import evaluation
from meddx.config import ScreenConfig, SynthConfig, TrainConfig
from meddx.inputs.storage import StorageSettings, filesystem
from meddx.model import metrics
from meddx.names import MANIFEST_NAME
from meddx.pipelines.screening import screen
from meddx.pipelines.training import train
from meddx.synthetic.chest import write_archive

BUCKET = "meddx-demo"
# The demo trains to at least this AUROC on its held-out images, or fails loudly.
MIN_AUROC = 0.90


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_s3_server():
    """moto's S3 server on loopback, with dummy credentials every Ray worker inherits."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise MeddxError(
            "meddx demo runs a local S3 endpoint with moto's server: "
            "pip install 'meddx[demo]' (make demo installs it)"
        ) from None

    for key, value in {
        "AWS_ACCESS_KEY_ID": "meddx-demo",
        "AWS_SECRET_ACCESS_KEY": "meddx-demo",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(key, value)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per S3 request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def run_demo(workdir: str, n_train: int, n_holdout: int, epochs: int) -> dict:
    import ray

    start = time.perf_counter()
    workdir = os.path.abspath(workdir)
    server, endpoint = start_s3_server()
    os.makedirs(workdir, exist_ok=True)
    try:
        settings = StorageSettings(s3_endpoint=endpoint)
        filesystem(f"s3://{BUCKET}", settings).mkdir(BUCKET)
        click.echo(f"[demo] S3 endpoint {endpoint}, bucket s3://{BUCKET}")

        t = time.perf_counter()
        for name, n, seed in (("train", n_train, 1), ("holdout", n_holdout, 2)):
            write_archive(
                SynthConfig(out=f"s3://{BUCKET}/{name}", n=n, size=256, seed=seed, storage=settings)
            )
        click.echo(
            f"[demo] wrote {n_train} training and {n_holdout} held-out images "
            f"in {time.perf_counter() - t:.1f}s"
        )

        ckpt = os.path.join(workdir, "model.pt")
        # 128 px keeps CPU training to a couple of minutes; the opacity stays visible.
        trained = train(
            TrainConfig(
                data=f"s3://{BUCKET}/train",
                out=ckpt,
                model="resnet18",
                epochs=epochs,
                workers=2,
                batch_size=16,  # per worker: 24 steps an epoch, BatchNorm settles sooner
                lr=1e-3,
                image_size=128,
                storage_path=os.path.join(workdir, "ray"),
                storage=settings,
            )
        )
        click.echo(
            f"[demo] trained in {trained.seconds:.1f}s: best val_auroc "
            f"{trained.metrics['val_auroc']:.4f} -> {ckpt}"
        )

        # Score the held-out archive as a nightly screening run: results, worklist, report.
        # Each demo trains a new model: the results of an earlier demo in the same folder
        # (another model's, which screening refuses to mix with) go first.
        predictions = os.path.join(workdir, "results")
        shutil.rmtree(predictions, ignore_errors=True)
        night = screen(
            ScreenConfig(
                input=f"s3://{BUCKET}/holdout", model=ckpt, out=predictions, storage=settings
            )
        )
        click.echo(
            f"[demo] scored {night.rows} images from S3 in {night.seconds:.1f}s "
            f"({night.images_per_s:.1f} images/s): ok={night.ok} errors={night.errors}"
            f" worklist={night.positives}"
        )

        result = evaluation.evaluate_predictions(
            predictions, f"s3://{BUCKET}/holdout/{MANIFEST_NAME}", settings
        )
        evaluation.write_json(result, os.path.join(workdir, "metrics.json"), StorageSettings())
        click.echo(metrics.format_metrics(result))
    finally:
        ray.shutdown()
        server.stop()
    click.echo(f"[demo] results: {predictions}/dt=*/  metrics: {workdir}/metrics.json")
    click.echo(f"[demo] report: {predictions}/_runs/dt={night.run_date}/report.html")
    click.echo(
        f"[demo] done in {time.perf_counter() - start:.1f}s, held-out AUROC {result['auroc']:.4f}"
    )
    if not result["auroc"] >= MIN_AUROC:
        raise MeddxError(f"held-out AUROC {result['auroc']:.4f} is below {MIN_AUROC}")
    return result
