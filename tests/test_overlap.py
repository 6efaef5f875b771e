"""Runs that share a results tree: overlapping nights, a hand re-run beside the
scheduled one, a holder SIGKILLed. Real `meddx` commands on the session's Ray, on moto's
S3 server and on a local disk; every case ends with exactly one row per input."""

import contextlib
import json
import os
import signal
import subprocess
import time

import pytest

from meddx.inputs.storage import StorageSettings, filesystem
from meddx.store.commit import read_results

from .helpers import MEDDX, session_env
from .images import png

N = 120


@pytest.fixture
def tree(request, tmp_path, settings):
    """(inputs, OUT, settings, env) on S3 or a local disk, with N small PNGs."""
    if request.param == "s3":
        root = request.getfixturevalue("bucket")
        fs = filesystem(root, settings)
        for i in range(N):
            fs.pipe_file(f"{root.removeprefix('s3://')}/in/{i:04d}.png", png("L", size=48))
        env_extra = {"MEDDX_S3_ENDPOINT": settings.s3_endpoint}
        use = settings
    else:
        root = str(tmp_path)
        os.makedirs(f"{root}/in")
        for i in range(N):
            with open(f"{root}/in/{i:04d}.png", "wb") as fh:
                fh.write(png("L", size=48))
        env_extra, use = {}, StorageSettings()
    env = {**session_env(request.getfixturevalue("ray_session")), **env_extra}
    return f"{root}/in", f"{root}/results", use, env


def command(kind, inputs, out, model, day, *extra):
    args = [MEDDX, kind, inputs, "--model", model, "--out", out, "--run-date", day]
    return [*args, "--batch-size", "4", *extra]


def start(env, *args, **popen) -> subprocess.Popen:
    """``command(*args)`` in the background, its output dropped unless ``popen`` asks."""
    popen = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, **popen}
    return subprocess.Popen(command(*args), env=env, **popen)


def lock_of(out, settings):
    fs = filesystem(out, settings)
    fs.invalidate_cache()
    path = f"{out.removeprefix('s3://')}/_LOCK"
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def wait_for_lock(out, settings, proc, seconds=120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        if holder := lock_of(out, settings):
            return holder
        time.sleep(0.1)
    raise AssertionError("the first run never took its lease")


def first_night(tree, model):
    """A screen of the night of 2026-12-01 on the tree, once it holds its lease."""
    inputs, out, settings, env = tree
    first = subprocess.Popen(
        command("screen", inputs, out, model, "2026-12-01"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return first, wait_for_lock(out, settings, first)


def rows_per_input(out, settings):
    uris = read_results(out, settings, ["image_uri"])["image_uri"].to_pylist()
    return len(uris), len(set(uris))


@pytest.mark.slow
@pytest.mark.parametrize("tree, second", [("s3", "screen"), ("local", "score")], indirect=["tree"])
def test_a_second_run_on_the_same_out_is_refused_in_one_line(tree, second, random_checkpoint):
    inputs, out, settings, env = tree
    first, holder = first_night(tree, random_checkpoint[0])
    # The next night's schedule fires (another date), or someone re-runs by hand.
    refused = subprocess.run(
        command(second, inputs, out, random_checkpoint[0], "2026-12-02"),
        env=env,
        capture_output=True,
        text=True,
    )
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert refused.returncode == 4, refused.stderr
    assert refused.stderr == (
        f"meddx: busy: {out} is being written by run {holder['run_id']} "
        f"(screen on {holder['host']}, pid {first.pid}; heartbeat "
        + refused.stderr.split("; heartbeat ", 1)[1]
    )
    assert refused.stderr.endswith(" s ago); nothing was scored\n")
    assert rows_per_input(out, settings) == (N, N)  # the first run's rows, once each
    assert lock_of(out, settings) is None  # released


@pytest.mark.slow
@pytest.mark.parametrize("tree", ["s3"], indirect=True)
def test_wait_for_lock_runs_once_the_first_run_ends(tree, random_checkpoint):
    inputs, out, settings, env = tree
    first, _ = first_night(tree, random_checkpoint[0])
    second = subprocess.run(
        command(
            "screen", inputs, out, random_checkpoint[0], "2026-12-02", "--wait-for-lock", "300"
        ),
        env=env,
        capture_output=True,
        text=True,
    )
    first.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, second.stderr[-2000:]
    # The second night ran after the first committed: it found nothing new.
    assert " new=0 " in second.stdout, second.stdout
    assert rows_per_input(out, settings) == (N, N)


@pytest.mark.slow
@pytest.mark.parametrize("tree", ["s3"], indirect=True)
def test_a_sigkilled_holders_lease_is_taken_over(tree, random_checkpoint):
    inputs, out, settings, env = tree
    fs = filesystem(out, settings)
    model = random_checkpoint[0]
    first = start(env, "screen", inputs, out, model, "2026-12-01", "--batch-size", "2",
                  start_new_session=True)  # fmt: skip
    holder = wait_for_lock(out, settings, first)
    staged, deadline = [], time.monotonic() + 240
    while not staged and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.2)
        fs.invalidate_cache()
        root = f"{out.removeprefix('s3://')}/_staging"
        staged = [p for p in fs.find(root) if p.endswith(".parquet")] if fs.exists(root) else []
    assert staged and first.poll() is None, "the run should be caught half way"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert lock_of(out, settings)["run_id"] == holder["run_id"]  # left behind
    # On this host its process is seen to be gone: the next run takes over at once (on
    # another host it would wait out --lock-timeout; tests/test_lease.py has that case).
    after = subprocess.run(
        command("screen", inputs, out, random_checkpoint[0], "2026-12-02"),
        env=env,
        capture_output=True,
        text=True,
    )
    assert after.returncode == 0, after.stderr[-2000:]
    assert (
        f"took over the lease on {out} from {holder['run_id']}, "
        f"its pid {first.pid} on this host is gone"
    ) in after.stderr
    assert f"discarded uncommitted run {holder['run_id']}" in after.stdout
    assert rows_per_input(out, settings) == (N, N)
    assert lock_of(out, settings) is None


@pytest.mark.parametrize("tree", ["local"], indirect=True)
def test_the_lease_is_released_on_an_error_and_on_sigterm(tree, random_checkpoint):
    inputs, out, settings, env = tree
    failed = subprocess.run(
        command("score", inputs, out, out + "/no-such-model.pt", "2026-12-01"),
        env=env,
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 1 and "checkpoint not found" in failed.stderr
    assert lock_of(out, settings) is None
    model = random_checkpoint[0]
    running = start(env, "score", inputs, out, model, "2026-12-01", "--batch-size", "1",
                    stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for_lock(out, settings, running)
    running.send_signal(signal.SIGTERM)  # a scheduler's timeout
    _, err = running.communicate(timeout=120)
    assert running.returncode != 0 and "Traceback" not in err, err[-2000:]
    assert lock_of(out, settings) is None
    assert rows_per_input(out, settings) == (0, 0)  # and nothing half-committed


def progress_lines(text):
    return [line for line in text.replace("\r", "\n").splitlines() if line.startswith("scored")]


@pytest.mark.slow
@pytest.mark.parametrize("tree", ["local"], indirect=True)
def test_progress_in_logs_and_on_a_terminal_agrees_with_the_summary(tree, random_checkpoint):
    import pty
    import re

    inputs, out, settings, env = tree
    # In a log: a plain line every --progress-seconds, counted from written rows.
    logged = subprocess.run(
        command(
            "score", inputs, out, random_checkpoint[0], "2026-12-01",
            "--batch-size", "1", "--progress-seconds", "0.5",
        ),
        env=env,
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert logged.returncode == 0, logged.stderr[-2000:]
    lines = progress_lines(logged.stderr)
    assert len(lines) >= 3 and "\r" not in logged.stderr
    counts = [int(re.match(r"scored: ([\d,]+)/", line).group(1).replace(",", "")) for line in lines]
    assert counts == sorted(counts) and counts[0] < N  # it moved while the run ran
    assert re.fullmatch(
        rf"scored: {N}/{N} \(100%\), [\d.]+ images/s, errors 0; done in \d+ s", lines[-1]
    )
    summary = next(line for line in logged.stdout.splitlines() if "rows_written=" in line)
    assert f"rows_written={N}" in summary and "errors=0" in summary
    # On a terminal: one line kept up to date with carriage returns, then the totals.
    leader, follower = pty.openpty()
    tty = subprocess.run(
        command("score", inputs, out, random_checkpoint[0], "2026-12-02", "--batch-size", "1"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=follower,
        text=True,
    )
    os.close(follower)
    seen = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(leader, 65536):
            seen += chunk
    os.close(leader)
    shown = seen.decode(errors="replace")
    assert tty.returncode == 0
    assert "\r\x1b[K" in shown
    assert re.search(rf"scored: {N}/{N} \(100%\), [\d.]+ images/s, errors 0; done in", shown)
    # --quiet: nothing of it.
    quiet = subprocess.run(
        command("score", inputs, out, random_checkpoint[0], "2026-12-03", "--quiet"),
        env=env,
        capture_output=True,
        text=True,
    )
    assert quiet.returncode == 0 and not progress_lines(quiet.stderr)


def whole(path: str) -> bool:
    """A staged file written to its end (Ray writes in place: a file can be seen half
    written, and --resume rightly discards such a one)."""
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)
    except (OSError, ValueError):
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("tree", ["local"], indirect=True)
def test_a_killed_score_resumes_scoring_only_the_inputs_it_had_not(tree, random_checkpoint):
    import datetime as dt
    import re

    inputs, base_out, settings, env = tree
    # The two blocks are decoded side by side and can be staged within the same tenth of
    # a second; a kill that lands after both leaves nothing to resume, so that attempt
    # is repeated on a fresh OUT.
    for attempt in range(3):
        out = base_out if attempt == 0 else f"{base_out}-{attempt}"
        ckpt = random_checkpoint[0]
        args = command("score", inputs, out, ckpt, "2026-12-01", "--batch-size", "1")
        killed = subprocess.Popen(
            args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        staging = os.path.join(out, "_staging")
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and killed.poll() is None:
            staged = [os.path.join(d, f) for d, _, fs in os.walk(staging) for f in fs]
            staged = [f for f in staged if f.endswith(".parquet")]
            if any(whole(f) for f in staged):  # one block of two written in full
                break
            time.sleep(0.1)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert killed.returncode == -signal.SIGKILL, "the run should be caught half way"
        when_killed = dt.datetime.now(dt.UTC)
        resumed = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        said = re.search(r"resumed: kept (\d+) staged rows, scored (\d+) inputs", resumed.stdout)
        kept, scored = int(said.group(1)), int(said.group(2))
        assert kept + scored == N
        if scored:
            break
    assert kept > 0 and scored > 0, (kept, scored)
    assert "resuming uncommitted run 2026-12-01-" in resumed.stdout
    rows = read_results(out, settings, ["image_uri", "scored_at", "run_id"])
    uris = rows["image_uri"].to_pylist()
    assert len(uris) == len(set(uris)) == N  # exactly one row per input
    assert len(set(rows["run_id"].to_pylist())) == 1  # one run, resumed
    # Only the inputs without rows were decoded and scored again.
    again = [t for t in rows["scored_at"].to_pylist() if t > when_killed]
    assert len(again) == scored
