"""`make demo`: the whole path on one machine against a real local S3 endpoint.

moto's S3 server on a free loopback port -> synthetic archive (train + held-out) ->
DDP training with 2 CPU workers -> Ray Data scoring of the held-out prefix -> Parquet ->
evaluation. The endpoint is stopped at the end; the checkpoint, predictions and metrics
stay in the work folder.
"""

from __future__ import annotations

import os
import shutil
import time

import click

from meddx import MeddxError
from meddx.analysis import evaluation
from meddx.config import EvaluateConfig, ScreenConfig, SynthConfig, TrainConfig
from meddx.inputs.storage import StorageSettings, filesystem
from meddx.names import MANIFEST_NAME
from meddx.pipelines.local_s3 import s3_server
from meddx.pipelines.screening import screen
from meddx.pipelines.training import train
from meddx.synthetic.chest import write_archive

BUCKET = "meddx-demo"
# The demo trains to at least this AUROC on its held-out images, or fails loudly.
MIN_AUROC = 0.90


def run_demo(workdir: str, n_train: int, n_holdout: int, epochs: int) -> evaluation.Evaluation:
    import ray

    start = time.perf_counter()
    workdir = os.path.abspath(workdir)
    with s3_server() as endpoint:
        os.makedirs(workdir, exist_ok=True)
        try:
            settings = StorageSettings(s3_endpoint=endpoint)
            filesystem(f"s3://{BUCKET}", settings).mkdir(BUCKET)
            click.echo(f"[demo] S3 endpoint {endpoint}, bucket s3://{BUCKET}")

            t = time.perf_counter()
            for name, n, seed in (("train", n_train, 1), ("holdout", n_holdout, 2)):
                write_archive(
                    SynthConfig(
                        out=f"s3://{BUCKET}/{name}", n=n, size=256, seed=seed, storage=settings
                    )
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
                f" worklist={night.positive_studies} studies"
            )

            result = evaluation.evaluate(
                EvaluateConfig(
                    predictions,
                    labels=f"s3://{BUCKET}/holdout/{MANIFEST_NAME}",
                    json_path=os.path.join(workdir, "metrics.json"),
                    storage=settings,
                )
            )
            click.echo(result.overall.describe())
        finally:
            ray.shutdown()
    click.echo(f"[demo] results: {predictions}/dt=*/  metrics: {workdir}/metrics.json")
    click.echo(f"[demo] report: {predictions}/_runs/dt={night.run_date}/report.html")
    click.echo(
        f"[demo] done in {time.perf_counter() - start:.1f}s, "
        f"held-out AUROC {result.overall.auroc:.4f}"
    )
    if not result.overall.auroc >= MIN_AUROC:
        raise MeddxError(f"held-out AUROC {result.overall.auroc:.4f} is below {MIN_AUROC}")
    return result
