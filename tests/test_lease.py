"""The lease on OUT, on moto's S3 server (conditional puts) and on a local disk."""

import threading
import time

import pytest

from meddx import MeddxBusy, MeddxError, lease


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


def test_a_dead_holders_lease_is_taken_over_once_stale(out, settings, capsys):
    dead = lease.acquire(out, settings, "killed", "screen", timeout=1.0)
    dead._stop.set()  # as if its process were killed: no more heartbeats, no release
    dead._thread.join()
    with pytest.raises(MeddxBusy, match="run killed"):
        lease.acquire(out, settings, "early", "screen", timeout=1.0)
    # Waiting for it, the next run takes it over once it is silent for the timeout.
    taker = lease.acquire(out, settings, "next", "screen", wait=5, timeout=1.0)
    try:
        assert store_of(out, settings).read()[0].run_id == "next"
        assert "took over the lease on" in capsys.readouterr().err
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
