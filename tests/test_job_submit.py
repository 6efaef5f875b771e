"""End to end as users run it: `ray start --head`, then `ray job submit -- python jobs/score.py`.

The head runs as a child process on free ports and is stopped by terminating that child
(never `ray stop`, which would end every Ray on the machine).
"""

import os
import subprocess

import pyarrow.dataset as pads
import pytest
import requests

from meddx.inputs.storage import arrow_filesystem, filesystem

from .helpers import BIN, REPO, current_cluster_restored, free_port, ray_env, ray_node
from .images import broken_inputs, png


@pytest.fixture
def ray_head(tmp_path, aws_credentials):
    """A Ray head on free ports; yields its dashboard (job API) address."""
    dashboard_port = free_port()
    address = f"http://127.0.0.1:{dashboard_port}"

    def job_api_up() -> bool:
        try:
            return requests.get(f"{address}/api/version", timeout=2).status_code < 500
        except requests.ConnectionError:
            return False

    env = ray_env()
    args = [
        "--head",
        f"--port={free_port()}",
        "--num-cpus=2",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={free_port()}",
    ]
    with (
        current_cluster_restored(),
        ray_node(args, env, tmp_path / "ray-head.log", ready=job_api_up),
    ):
        yield address, env


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
