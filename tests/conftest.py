"""Shared fixtures: a real S3 HTTP endpoint (moto's server) and a real local Ray.

The moto server runs as its own process on a free loopback port, as in s3fs's test
suite; Ray workers are separate processes and reach it over HTTP like any S3 store.
Dummy credentials are set before Ray starts (workers inherit the environment) and
restored afterwards.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
DUMMY_AWS = {
    "AWS_ACCESS_KEY_ID": "meddx-test-key",
    "AWS_SECRET_ACCESS_KEY": "meddx-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def aws_credentials():
    saved = {k: os.environ.get(k) for k in [*DUMMY_AWS, "AWS_PROFILE", "AWS_SESSION_TOKEN"]}
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.update(DUMMY_AWS)
    yield DUMMY_AWS
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def s3_endpoint(aws_credentials):
    """moto's S3 server as a child process on a free port; its URL."""
    port = free_port()
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(url, timeout=1).ok:
                break
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("moto server did not start")
        time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def settings(s3_endpoint):
    from meddx.storage import StorageSettings

    return StorageSettings(s3_endpoint=s3_endpoint)


@pytest.fixture
def bucket(settings):
    """A clean bucket per test, removed afterwards; its s3:// URI."""
    from meddx.storage import filesystem

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = filesystem("s3://", settings)
    fs.mkdir(name)
    yield f"s3://{name}"
    fs.rm(name, recursive=True)
    fs.invalidate_cache()


@pytest.fixture(scope="session")
def ray_session(aws_credentials):
    """A real local Ray for the whole session (a new one: never a stale head)."""
    import ray

    os.environ["MEDDX_QUIET_WORKERS"] = "1"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory):
    """A seednet checkpoint with random weights at 64 px: exercises scoring, fast."""
    from meddx import models
    from meddx.storage import StorageSettings

    ckpt = models.untrained_checkpoint("seednet", input_size=64)
    path = tmp_path_factory.mktemp("ckpt") / "seednet.pt"
    sha = models.save_checkpoint(ckpt, str(path), StorageSettings())
    return str(path), sha
