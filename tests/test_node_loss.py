"""A node lost mid-run: a real two-node Ray cluster on this machine, `meddx score` as
users run it, and the second node killed (SIGKILL, every process of it) while it decodes.

The cluster runs as child processes on free ports (as in test_job_submit.py) and is
separate from the session's local Ray. Ray Data retries the lost node's tasks and
rebuilds its lost blocks from lineage; the predictor actor restarts if it was there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pyarrow.dataset as pads
import pytest

from .helpers import (
    MEDDX,
    command_of,
    current_cluster_restored,
    descendants,
    free_port,
    ray_env,
    ray_node,
)
from .images import png

# Small object stores: the run holds a few MB, and this machine runs other Rays too.
NODE_FLAGS = ("--num-cpus=2", "--object-store-memory=200000000")
IMAGES = 300  # 20-40 s of scoring on 2 cores: time to land work on the node, then lose it


def kill_tree(proc: subprocess.Popen) -> list[int]:
    """SIGKILL a node: the `ray start` process and everything it started, at once."""
    tree = [proc.pid, *descendants(proc.pid)]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    return tree


@pytest.fixture
def two_nodes(tmp_path):
    """A head and a second node, each a child process; yields (address, env, second node)."""
    env = ray_env()
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = [
        "--head",
        f"--port={port}",
        "--include-dashboard=false",
        f"--ray-client-server-port={free_port()}",
        *NODE_FLAGS,
    ]
    with (
        current_cluster_restored(),
        ray_node(head, env, tmp_path / "head.log", stop_timeout=5),
        ray_node(
            [f"--address={address}", *NODE_FLAGS], env, tmp_path / "victim.log", stop_timeout=5
        ) as victim,
    ):
        yield address, env, victim


def busy_on(node: subprocess.Popen) -> list[str]:
    """Ray tasks the node is running now: read and decode tasks."""
    tasks = (command_of(pid) for pid in descendants(node.pid))
    return [t for t in tasks if t.startswith("ray::MapBatches(read_objects)")]


@pytest.mark.slow
def test_lost_node_still_one_row_per_input(two_nodes, tmp_path, random_checkpoint):
    address, env, victim = two_nodes
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(IMAGES):
        (inputs / f"{i:04d}.png").write_bytes(png("L", size=64 + i % 32))
    out, log = tmp_path / "out", tmp_path / "meddx.log"
    with open(log, "w") as printed:
        run = subprocess.Popen(
            [
                MEDDX,
                "score",
                str(inputs),
                "--model",
                random_checkpoint[0],
                "--out",
                str(out),
                "--batch-size",
                "4",
                "--run-date",
                "2026-07-01",
            ],
            env={**env, "RAY_ADDRESS": address},
            stdout=printed,
            stderr=subprocess.STDOUT,
        )
    # Wait until the second node is decoding, let it hold some results, then lose it.
    busy: list[str] = []
    deadline = time.monotonic() + 180
    while not busy and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        busy = busy_on(victim)
    assert busy and run.poll() is None, "work should land on the second node mid-run"
    time.sleep(1.0)
    killed = kill_tree(victim)
    deadline = time.monotonic() + 10
    while any(command_of(pid) for pid in killed) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(command_of(pid) for pid in killed), "every process of the node is gone"

    assert run.wait(timeout=300) == 0, log.read_text()[-4000:]
    assert f"inputs={IMAGES} ok={IMAGES} errors=0 rows_written={IMAGES}" in log.read_text()
    table = pads.dataset(str(out), format="parquet", partitioning="hive").to_table()
    uris = table["image_uri"].to_pylist()
    assert len(uris) == len(set(uris)) == IMAGES
    assert set(uris) == {str(p) for p in inputs.iterdir()}
    assert set(table["status"].to_pylist()) == {"ok"}
