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
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from .conftest import free_port
from .images import png

BIN = Path(sys.executable).parent
CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")
# Every port a node opens, so that two nodes share this machine without clashing.
NODE_PORTS = (
    "node-manager-port",
    "object-manager-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
)
# Small object stores: the run holds a few MB, and this machine runs other Rays too.
NODE_FLAGS = ("--block", "--num-cpus=2", "--object-store-memory=200000000")
IMAGES = 300  # 20-40 s of scoring on 2 cores: time to land work on the node, then lose it


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Ray's workers start their own sessions, so a process
    group does not hold them all)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return ""


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


def start_node(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    ports = [f"--{name}={free_port()}" for name in NODE_PORTS]
    with open(log, "w") as out:
        return subprocess.Popen(
            [str(BIN / "ray"), "start", *args, *NODE_FLAGS, "--disable-usage-stats", *ports],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_started(node: subprocess.Popen, log: Path) -> None:
    """Until `ray start` says its node runs (and has joined the cluster)."""
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in log.read_text():
        assert node.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"Ray node did not start: {log.read_text()}"
        time.sleep(0.5)


@pytest.fixture
def two_nodes(tmp_path):
    """A head and a second node, each a child process; yields (address, env, second node)."""
    before = CURRENT_CLUSTER.read_text() if CURRENT_CLUSTER.exists() else None
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = start_node(
        [
            "--head",
            f"--port={port}",
            "--include-dashboard=false",
            f"--ray-client-server-port={free_port()}",
        ],
        env,
        tmp_path / "head.log",
    )
    victim = None
    try:
        wait_started(head, tmp_path / "head.log")
        victim = start_node([f"--address={address}"], env, tmp_path / "victim.log")
        wait_started(victim, tmp_path / "victim.log")
        yield address, env, victim
    finally:
        for node in (victim, head):
            if node is None or node.poll() is not None:
                continue
            tree = descendants(node.pid)
            node.terminate()  # `ray start --block` stops its node's processes
            try:
                node.wait(timeout=5)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
            for pid in tree:  # and whatever outlived it
                if "ray" in command_of(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        # ray start leaves its address behind; a later plain ray.init() would join a dead head.
        if before is None:
            CURRENT_CLUSTER.unlink(missing_ok=True)
        else:
            CURRENT_CLUSTER.write_text(before)


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
                str(BIN / "meddx"),
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
