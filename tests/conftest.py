"""Shared fixtures: a real S3 HTTP endpoint (moto's server) and a real local Ray.

The moto server runs as its own process on a free loopback port, as in s3fs's test
suite; Ray workers are separate processes and reach it over HTTP like any S3 store.
Dummy credentials are set before Ray starts (workers inherit the environment) and
restored afterwards.
"""

from __future__ import annotations

import os
import uuid

import pytest

from meddx.pipelines.local_s3 import s3_server

from .helpers import DUMMY_AWS


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
    with s3_server() as url:
        yield url


@pytest.fixture(scope="session")
def settings(s3_endpoint):
    from meddx.inputs.storage import StorageSettings

    return StorageSettings(s3_endpoint=s3_endpoint)


@pytest.fixture
def bucket(settings):
    """A clean bucket per test, removed afterwards; its s3:// URI."""
    from meddx.inputs.storage import filesystem

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
    from meddx.inputs.storage import StorageSettings
    from meddx.model import registry

    ckpt = registry.untrained_checkpoint("seednet", input_size=64)
    path = tmp_path_factory.mktemp("ckpt") / "seednet.pt"
    sha = registry.save_checkpoint(ckpt, str(path), StorageSettings())
    return str(path), sha


@pytest.fixture(scope="session")
def triage_checkpoint(tmp_path_factory):
    """Random seednet whose threshold 0 puts every scored study on the worklist."""
    from meddx.inputs.storage import StorageSettings
    from meddx.model import registry

    ckpt = registry.untrained_checkpoint("seednet", input_size=64, seed=1, threshold=0.0)
    path = tmp_path_factory.mktemp("triage") / "m.pt"
    registry.save_checkpoint(ckpt, str(path), StorageSettings())
    return str(path)
