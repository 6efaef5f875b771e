"""Training survives a killed DDP worker, and a stopped run continues by its name."""

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from meddx.config import SynthConfig
from meddx.inputs.storage import StorageSettings
from meddx.model import registry
from meddx.pipelines.train_worker import FailureLines
from meddx.pipelines.training import TrainConfig, train
from meddx.synthetic.chest import write_archive


def checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.rglob("checkpoint_*")) if folder.exists() else []


def kill_a_worker_after_first_checkpoint(runs: Path, killed: list, deadline_s=300):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and not checkpoints(runs):
        time.sleep(0.2)
    # Mid-way through the next epoch: the first checkpoint is registered by then (its
    # folder appears while rank 0 reports, before the controller has recorded it).
    time.sleep(2.5)
    pids = subprocess.run(
        ["pgrep", "-f", "ray::RayTrainWorker"], capture_output=True, text=True
    ).stdout.split()
    if pids:
        os.kill(int(pids[-1]), signal.SIGKILL)
        killed.append(int(pids[-1]))


def failure_lines(ray_session) -> list[str]:
    """The "[meddx train] worker N failed" lines Ray Train's controller printed in this
    session (its workers' output stays in the session's log files here)."""
    logs = Path(ray_session._private.worker._global_node.get_session_dir_path()) / "logs"
    return [
        line
        for out in logs.glob("worker-*.out")
        for line in out.read_text(errors="replace").splitlines()
        if "[meddx train] worker " in line and " failed: " in line
    ]


def test_failure_lines_name_each_failed_rank_on_one_line(capsys):
    FailureLines().after_exception(None, {1: RuntimeError("lost\nits node"), 0: OSError()})
    assert capsys.readouterr().out.splitlines() == [
        "[meddx train] worker 0 failed: OSError",
        "[meddx train] worker 1 failed: lost its node",
    ]


@pytest.mark.slow
def test_killed_worker_restarts_from_last_checkpoint(ray_session, tmp_path):
    before = len(failure_lines(ray_session))
    data = tmp_path / "data"
    write_archive(SynthConfig(out=str(data), n=48, size=64, seed=9))
    runs = tmp_path / "runs"
    killed: list[int] = []
    killer = threading.Thread(target=kill_a_worker_after_first_checkpoint, args=(runs, killed))
    killer.start()
    summary = train(
        TrainConfig(
            data=str(data),
            out=str(tmp_path / "m.pt"),
            model="seednet",
            epochs=3,
            workers=2,
            batch_size=8,
            image_size=64,
            storage_path=str(runs),
            run_name="faulty",
            max_failures=2,
        )
    )
    killer.join()
    assert killed, "a training worker should have been killed"
    # The run finished all epochs, and the worker group that finished had resumed.
    assert summary.last["epoch"] == 3
    assert summary.last["resumed_from_epoch"] >= 1
    registry.read_checkpoint(str(tmp_path / "m.pt"), StorageSettings())
    # The console was told which worker failed, and why, before the group restarted.
    assert len(failure_lines(ray_session)) > before


@pytest.mark.slow
def test_same_run_name_continues(ray_session, tmp_path):
    data = tmp_path / "data"
    write_archive(SynthConfig(out=str(data), n=32, size=64, seed=10))
    common = dict(
        data=str(data),
        model="seednet",
        workers=2,
        batch_size=8,
        image_size=64,
        storage_path=str(tmp_path / "runs"),
        run_name="long-run",
    )
    first = train(TrainConfig(out=str(tmp_path / "a.pt"), epochs=1, **common))
    assert first.last["epoch"] == 1 and first.last["resumed_from_epoch"] == 0
    second = train(TrainConfig(out=str(tmp_path / "b.pt"), epochs=2, **common))
    assert second.last["epoch"] == 2 and second.last["resumed_from_epoch"] == 1
