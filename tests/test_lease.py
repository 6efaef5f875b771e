"""The lease on OUT, on moto's S3 server (conditional puts) and on a local disk."""

import json
import os
import posixpath
import socket
import subprocess
import sys
import threading
import time

import pytest

from meddx import MeddxBusy, MeddxError
from meddx.inputs.storage import filesystem, strip_scheme
from meddx.store import commit, lease


@pytest.fixture(params=["s3", "local"])
def out(request, tmp_path):
    if request.param == "s3":
        return request.getfixturevalue("bucket") + "/results"
    return str(tmp_path / "results")


def store_of(out, settings):
    return lease._Store(out, settings)


def test_one_holder_at_a_time_and_the_refusal_names_it(out, settings):
    first = lease.acquire(out, settings, "night-1", "screen", timeout=60)
    try:
        with pytest.raises(MeddxBusy, match=r"is being written by run night-1 \(screen on "):
            lease.acquire(out, settings, "night-2", "screen", timeout=60)
        started = time.monotonic()
        with pytest.raises(MeddxBusy, match=r"heartbeat \d+ s ago\); nothing was scored"):
            lease.acquire(out, settings, "night-2", "score", wait=1.5, timeout=60)
        assert time.monotonic() - started >= 1.5  # it waited as long as it was told
    finally:
        first.release()
    assert store_of(out, settings).read() is None  # released: no lock left behind
    second = lease.acquire(out, settings, "night-2", "score", timeout=60)
    second.release()


def test_runs_that_start_together_get_it_exactly_once(out, settings):
    won, refused = [], []
    barrier = threading.Barrier(4)

    def run(k):
        barrier.wait()
        try:
            won.append(lease.acquire(out, settings, f"run-{k}", "screen", timeout=60))
        except MeddxBusy:
            refused.append(k)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 3
    won[0].release()


def test_the_holder_renews_its_heartbeat(out, settings):
    held = lease.acquire(out, settings, "long-night", "screen", timeout=1.0)
    try:
        first = store_of(out, settings).read()[0].heartbeat
        time.sleep(0.7)
        holder = store_of(out, settings).read()[0]
        assert holder.heartbeat > first and holder.run_id == "long-night"
        assert holder.age < 1.0  # never stale while its run lives
        with pytest.raises(MeddxBusy):
            lease.acquire(out, settings, "next", "screen", timeout=1.0)
    finally:
        held.release()


def test_a_dead_holders_lease_is_taken_over_once_stale(out, settings, caplog):
    dead = lease.acquire(out, settings, "killed", "screen", timeout=1.0)
    dead._stop.set()  # as if its process were killed: no more heartbeats, no release
    dead._thread.join()
    with pytest.raises(MeddxBusy, match="run killed"):
        lease.acquire(out, settings, "early", "screen", timeout=1.0)
    # Waiting for it, the next run takes it over once it is silent for the timeout.
    taker = lease.acquire(out, settings, "next", "screen", wait=5, timeout=1.0)
    try:
        assert store_of(out, settings).read()[0].run_id == "next"
        assert "took over the lease on" in caplog.text
    finally:
        taker.release()


def test_a_holder_that_lost_its_lease_finds_out_before_committing(out, settings):
    slow = lease.acquire(out, settings, "stalled", "screen", timeout=1.0)
    store = store_of(out, settings)
    # Its heartbeat stalled long enough for another run to take over (forced here).
    assert store.take_stale(store.read()[1])
    other = lease.acquire(out, settings, "other", "screen", timeout=1.0)
    try:
        time.sleep(0.5)  # the stalled run's next renewal finds the lock changed
        with pytest.raises(MeddxError, match="taken over by another run; nothing committed"):
            slow.check()
        slow.release()  # and never removes the new holder's lock
        assert store.read()[0].run_id == "other"
    finally:
        other.release()


def test_a_signal_as_the_lock_is_created_still_releases_it(out, settings, monkeypatch):
    # A scheduler's SIGTERM can land in the instant after the lock exists and before the
    # run's clean-up is in place; the lease must be released all the same.
    import os
    import signal

    def terminated(signum, frame):
        raise SystemExit(128 + signum)

    create = lease._Store.create

    def create_then_terminated(self, holder):
        version = create(self, holder)
        os.kill(os.getpid(), signal.SIGTERM)
        return version

    monkeypatch.setattr(lease._Store, "create", create_then_terminated)
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        with pytest.raises(SystemExit) as stopped:
            with lease.held(out, settings, "cut-short", "score", wait=0, timeout=60):
                pytest.fail("the signal should stop the run before it starts work")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert store_of(out, settings).read() is None


# ---- the fence before a commit ----------------------------------------------------------

RUN = "2026-12-01-0123456789ab"


def stage_one_file(out, settings, run_id=RUN):
    """A staged Parquet file of ``run_id`` (commit never reads it); its path."""
    fs = filesystem(out, settings)
    staged = posixpath.join(commit.staging_path(out, run_id), "0.parquet")
    fs.makedirs(posixpath.dirname(staged), exist_ok=True)
    fs.pipe_file(staged, b"PAR1")
    return staged


def committed(out, settings):
    fs = filesystem(out, settings)
    fs.invalidate_cache()
    return fs.exists(posixpath.join(strip_scheme(out), "dt=2026-12-01"))


def test_a_lease_stolen_before_the_commit_refuses_it(out, settings):
    # A 60 s timeout: the background beat comes every 12 s, long after the commit, so
    # only the synchronous renewal at the fence can find out that the lock changed.
    run = lease.acquire(out, settings, RUN, "score", timeout=60)
    store = store_of(out, settings)
    try:
        staged = stage_one_file(out, settings)
        before = store.read()[0].heartbeat
        run.check()  # while it holds the lease, the fence renews it there and then
        assert store.read()[0].heartbeat > before and store.read()[1] == run.version
        # Its heartbeat stalled long enough for another run to judge it stale and take
        # the lease over (forced here), after this run started and before it commits.
        assert store.take_stale(store.read()[1])
        thief = lease.acquire(out, settings, "2026-12-01-thief", "screen", timeout=60)
        try:
            with pytest.raises(MeddxError) as refused:
                commit.commit(out, settings, RUN, "2026-12-01", fence=run.check, replace=True)
            assert str(refused.value) == (
                f"run {RUN} stopped: its lease on OUT was taken over by another run; "
                "nothing committed"
            )
            fs = filesystem(out, settings)
            assert not committed(out, settings)  # nothing moved into dt=
            assert fs.exists(staged)
            assert not fs.exists(posixpath.join(posixpath.dirname(staged), commit.COMMIT))
            run.release()  # and never removes the new holder's lock
            assert store.read()[0].run_id == "2026-12-01-thief"
        finally:
            thief.release()
    finally:
        run.release()


def test_a_lock_overwritten_by_hand_refuses_the_commit(out, settings):
    # Not through the protocol at all: someone (or a second run on a store that ignored
    # the conditional create) rewrites OUT/_LOCK outright.
    run = lease.acquire(out, settings, RUN, "score", timeout=60)
    try:
        stage_one_file(out, settings)
        store = store_of(out, settings)
        now = lease._now().isoformat()
        other = lease.Holder("2026-12-01-other", "elsewhere", 1, "screen", now, now)
        filesystem(out, settings).pipe_file(store.path, json.dumps(other.__dict__).encode())
        with pytest.raises(MeddxError, match="taken over by another run; nothing committed"):
            commit.commit(out, settings, RUN, "2026-12-01", fence=run.check)
        assert not committed(out, settings)
        assert store.read()[0].run_id == "2026-12-01-other"
    finally:
        run.release()


def test_a_lease_that_cannot_be_renewed_refuses_the_commit(out, settings, monkeypatch):
    run = lease.acquire(out, settings, RUN, "score", timeout=60)
    try:
        stage_one_file(out, settings)

        def unreachable(holder, version):
            raise ConnectionRefusedError(111, "Connection refused")

        monkeypatch.setattr(run.store, "replace", unreachable)
        with pytest.raises(MeddxError) as refused:
            commit.commit(out, settings, RUN, "2026-12-01", fence=run.check)
        assert str(refused.value) == (
            f"run {RUN} stopped: could not renew its lease on OUT "
            "([Errno 111] Connection refused); nothing committed"
        )
        assert not committed(out, settings)
    finally:
        monkeypatch.undo()
        run.release()
    assert store_of(out, settings).read() is None  # still its own lock: released


def test_the_fence_and_the_heartbeat_never_take_each_other_for_a_thief(out, settings):
    # Heartbeats every 10 ms race the fence's own renewals; each compares against the
    # version the other may be replacing, so they must take turns.
    run = lease.acquire(out, settings, RUN, "score", timeout=0.05)
    try:
        for _ in range(60):
            run.check()
        assert run.lost is None
        with run._renewing:  # between two beats: the lock is the last one it wrote
            assert store_of(out, settings).read()[1] == run.version
    finally:
        run.release()
    assert store_of(out, settings).read() is None


# ---- the pid shortcut needs the same PID namespace ------------------------------------------


def a_dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_lock_records_the_holders_pid_namespace(out, settings):
    run = lease.acquire(out, settings, RUN, "score", timeout=60)
    try:
        holder = store_of(out, settings).read()[0]
        ours = our_pid_namespace()
        assert (holder.boot_id, holder.pid_ns) == (ours["boot_id"], ours["pid_ns"])
        assert holder.host == socket.gethostname() and holder.pid == os.getpid()
    finally:
        run.release()


def our_pid_namespace() -> dict:
    with open("/proc/sys/kernel/random/boot_id") as fh:
        return {"boot_id": fh.read().strip(), "pid_ns": str(os.stat("/proc/self/ns/pid").st_ino)}


@pytest.mark.parametrize("namespace", ["another", "another boot", "unknown"])
def test_a_dead_pid_of_another_pid_namespace_is_not_taken_for_gone(out, settings, namespace):
    # A container with host networking has this host's name, yet its pids are its own:
    # a pid missing here says nothing about its process. Only the timeout can tell.
    ours = our_pid_namespace()
    recorded = {
        "another": {**ours, "pid_ns": str(int(ours["pid_ns"]) + 1)},
        "another boot": {**ours, "boot_id": "00000000-0000-0000-0000-000000000000"},
        "unknown": {},  # not recorded: an older lock, or a holder without /proc
    }[namespace]
    now = lease._now().isoformat()
    dead = lease.Holder(
        "2026-12-01-elsewhere", socket.gethostname(), a_dead_pid(), "screen", now, now, **recorded
    )
    store = store_of(out, settings)
    assert store.create(dead) is not None
    with pytest.raises(MeddxBusy, match="run 2026-12-01-elsewhere"):
        lease.acquire(out, settings, RUN, "score", timeout=60)
    assert store.read()[0].run_id == "2026-12-01-elsewhere"  # not taken over


def test_a_dead_pid_of_our_own_pid_namespace_is_taken_over_at_once(out, settings, caplog):
    now = lease._now().isoformat()
    pid = a_dead_pid()
    dead = lease.Holder(
        "2026-12-01-killed", socket.gethostname(), pid, "screen", now, now, **our_pid_namespace()
    )
    assert store_of(out, settings).create(dead) is not None
    run = lease.acquire(out, settings, RUN, "score", timeout=60)
    try:
        assert store_of(out, settings).read()[0].run_id == RUN
        assert f"from 2026-12-01-killed, its pid {pid} on this host is gone" in caplog.text
    finally:
        run.release()
