"""End to end as users run it: `ray start --head`, then `ray job submit -- python jobs/score.py`.

The head runs as a child process on free ports and is stopped by terminating that child
(never `ray stop`, which would end every Ray on the machine).
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import requests

from meddx.storage import arrow_filesystem, filesystem

from .conftest import REPO, free_port
from .images import broken_inputs, png

BIN = Path(sys.executable).parent
CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")


@pytest.fixture
def ray_head(tmp_path, aws_credentials):
    """A Ray head on free ports; yields its dashboard (job API) address."""
    before = CURRENT_CLUSTER.read_text() if CURRENT_CLUSTER.exists() else None
    ports = {
        name: free_port()
        for name in (
            "port",
            "dashboard-port",
            "ray-client-server-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "node-manager-port",
            "object-manager-port",
        )
    }
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    log = open(tmp_path / "ray-head.log", "w")
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--num-cpus=2",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            *(f"--{name}={port}" for name, port in ports.items()),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{address}/api/version", timeout=2).status_code < 500:
                    break
            except requests.ConnectionError:
                pass
            assert head.poll() is None, (tmp_path / "ray-head.log").read_text()
            assert time.monotonic() < deadline, "Ray head did not start"
            time.sleep(1)
        yield address, env
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        log.close()
        # ray start leaves its address behind; a later plain ray.init() would join a dead head.
        if before is None:
            CURRENT_CLUSTER.unlink(missing_ok=True)
        else:
            CURRENT_CLUSTER.write_text(before)


@pytest.mark.slow
def test_ray_job_submit_scores_from_s3(ray_head, bucket, settings, s3_endpoint, random_checkpoint):
    address, env = ray_head
    fs = filesystem(bucket, settings)
    root = bucket.removeprefix("s3://")
    for i in range(6):
        fs.pipe_file(f"{root}/in/img-{i}.png", png("L", size=48 + i))
    fs.pipe_file(f"{root}/in/broken.png", broken_inputs()["truncated.png"])
    fs.put_file(random_checkpoint[0], f"{root}/models/m.pt")

    result = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(REPO),
            "--",
            "python",
            "jobs/score.py",
            f"{bucket}/in",
            "--model",
            f"{bucket}/models/m.pt",
            "--out",
            f"{bucket}/out",
            "--run-date",
            "2026-02-03",
            "--s3-endpoint",
            s3_endpoint,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "inputs=7 ok=6 errors=1 rows_written=7" in result.stdout
    assert "succeeded" in result.stdout
    # Credentials never appear in what the job prints.
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in result.stdout + result.stderr

    ds = pads.dataset(
        f"{root}/out",
        filesystem=arrow_filesystem(bucket, settings),
        format="parquet",
        partitioning="hive",
    )
    table = ds.to_table()
    assert table.num_rows == 7
    assert sorted(table["status"].to_pylist()) == ["error"] + ["ok"] * 6
    assert set(table["dt"].to_pylist()) == {"2026-02-03"}
