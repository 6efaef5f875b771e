"""What several test modules share: the venv's executables, free ports (meddx's own, as
for its local S3 endpoint), and Ray nodes started with `ray start`, each a child process
stopped by its own pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from meddx.pipelines.local_s3 import free_port, terminate

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's executables: meddx, ray
MEDDX = str(BIN / "meddx")
DUMMY_AWS = {
    "AWS_ACCESS_KEY_ID": "meddx-test-key",
    "AWS_SECRET_ACCESS_KEY": "meddx-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# `ray start` leaves the address of its head here; a later plain ray.init() would join it.
CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")
# Every port a Ray node opens besides a head's own, so that nodes share a machine.
NODE_PORTS = (
    "node-manager-port",
    "object-manager-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
)


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


def session_env(ray, quiet_workers: bool = True) -> dict[str, str]:
    """The environment of a `meddx` command run on the session's Ray (``ray``): its
    address and token auth; with ``quiet_workers`` the workers' lines stay out of the
    command's output, as in the session's own runs, else they reach it as users see them."""
    env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "RAY_AUTH_MODE": "token",
        "MEDDX_QUIET_WORKERS": "1",
    }
    if not quiet_workers:
        env.pop("MEDDX_QUIET_WORKERS")
    return env


def refused_score(input: str, out: str, model: str, settings, match: str):
    """score() on INPUT into OUT, which must refuse with a MeddxError matching ``match``;
    the pytest.ExceptionInfo."""
    import pytest

    from meddx import MeddxError
    from meddx.pipelines.scoring import ScoreConfig, score

    with pytest.raises(MeddxError, match=match) as refused:
        score(ScoreConfig(input=input, model=model, out=out, storage=settings))
    return refused


def ray_env() -> dict[str, str]:
    """The environment for `ray` commands: the venv's executables first, token auth, and
    no RAY_ADDRESS of the caller's."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    return env


@contextmanager
def current_cluster_restored() -> Iterator[None]:
    """Put CURRENT_CLUSTER back as it was: a `ray start` head overwrites it."""
    before = CURRENT_CLUSTER.read_text() if CURRENT_CLUSTER.exists() else None
    try:
        yield
    finally:
        if before is None:
            CURRENT_CLUSTER.unlink(missing_ok=True)
        else:
            CURRENT_CLUSTER.write_text(before)


def stop_ray_node(node: subprocess.Popen, timeout: float = 60) -> None:
    """Terminate a `ray start --block` child (it stops its node's processes), then
    SIGKILL whatever of its own Ray processes outlived it."""
    if node.poll() is not None:
        return
    tree = descendants(node.pid)
    terminate(node, timeout)
    for pid in tree:
        if "ray" in command_of(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@contextmanager
def ray_node(
    args: list[str],
    env: dict[str, str],
    log: Path,
    *,
    ready: Callable[[], bool] | None = None,
    start_timeout: float = 120,
    stop_timeout: float = 60,
) -> Iterator[subprocess.Popen]:
    """`ray start --block ARGS` as a child process on free NODE_PORTS, its output in
    ``log``; yields it once it says its node runs (and ``ready()``), stops it afterwards.

    A head (``--head``) also needs its own ``--port`` and ``--ray-client-server-port``
    (and ``--dashboard-port`` with a dashboard) in ``args``."""
    ports = [f"--{name}={free_port()}" for name in NODE_PORTS]
    with open(log, "w") as out:
        node = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args, *ports],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + start_timeout
        while not ("Ray runtime started" in log.read_text() and (ready is None or ready())):
            assert node.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"Ray node did not start: {log.read_text()}"
            time.sleep(0.5)
        yield node
    finally:
        stop_ray_node(node, stop_timeout)


def synthetic_films(n: int, seed: int, size: int):
    """uint8 films (n, size, size) of synth's two classes and their 0/1 labels."""
    import numpy as np

    from meddx.synthetic import chest

    labels = np.array([lbl == "opacity" for lbl in chest.labels_for(n, 0.5, seed)], dtype=int)
    pixels = np.stack(
        [chest.render(i, positive=bool(y), size=size, seed=seed) for i, y in enumerate(labels)]
    )
    return pixels, labels


def trained_seednet(size: int = 64, epochs: int = 8):
    """A seednet trained in this process (seconds) on 256 synthetic films."""
    import torch

    from meddx.imaging.transforms import to_model_input
    from meddx.model import registry
    from meddx.synthetic import chest

    torch.manual_seed(0)
    x, y = synthetic_films(256, seed=5, size=size)
    model = registry.build_model("seednet", 2)
    mean = torch.tensor(registry.IMAGENET_MEAN)
    std = torch.tensor(registry.IMAGENET_STD)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for i in torch.randperm(len(x)).split(32):
            loss = torch.nn.functional.cross_entropy(
                model(to_model_input(torch.from_numpy(x[i.numpy()]), mean, std)),
                torch.from_numpy(y[i.numpy()]),
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    return registry.make_checkpoint(
        model.eval(),
        model_name="seednet",
        class_names=list(chest.CLASSES),
        positive_class="opacity",
        input_size=size,
    )


def processes_of_ray_session(name: str, grace: float = 10.0) -> list[str]:
    """The processes still running for the Ray session ``name`` (its folder's name
    under /tmp/ray, which every process of the session names in its command line),
    after up to ``grace`` seconds for those on their way out."""
    import psutil

    deadline = time.monotonic() + grace
    while True:
        alive = []
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if name in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(f"{proc.info['pid']} {cmdline[:120]}")
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)
