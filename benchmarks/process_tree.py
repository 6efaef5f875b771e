"""A meddx command run in a process of its own, with its whole process tree measured while
it runs: proportional set size, each core's busy share, core-seconds by role."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

MEDDX = [sys.executable, "-m", "meddx"]  # works installed or from a checkout on PYTHONPATH


def meddx_env() -> dict:
    # A Ray of its own, never another running one; workers' logs stay out of the output.
    return {**os.environ, "RAY_ADDRESS": "local", "MEDDX_QUIET_WORKERS": "1"}


def tree_pss_bytes(root: int) -> int:
    """Proportional set size of ``root`` and all its descendants (shared pages, such as
    the object store's, counted once in total)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        match = re.search(r"^Pss:\s+(\d+) kB", rollup, re.M)
        total += int(match.group(1)) * 1024 if match else 0
    return total


def cpu_times() -> list[int]:
    """Per-core (busy, total) jiffies from /proc/stat ([] where there is none)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        if line.startswith("cpu") and line[3:4].isdigit():
            ticks = [int(v) for v in line.split()[1:]]
            idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
            out.append((sum(ticks) - idle, sum(ticks)))
    return out


def busy_per_core(before: list, after: list) -> list[float]:
    """Each core's busy share between two cpu_times() readings."""
    return [
        round((b1 - b0) / max(1, t1 - t0), 3)
        for (b0, t0), (b1, t1) in zip(before, after, strict=True)
    ]


# Where a run's core-seconds go: Ray names a worker's process after what it runs (a run
# over a store of films reads and unpacks them in read_films).
ROLES = (
    ("MapBatches(read_objects)", "read_decode"),
    ("MapBatches(read_films)", "read_decode"),
    ("MapBatches(Predictors)", "predictor"),
)


class TreeCPU:
    """Core-seconds of a command's process tree by role: its read + decode tasks' workers,
    its predictor actors, the command's own process, and the rest (Ray's daemons and
    Ray Data's helper actors). Sampled every half second while the tree lives, so a
    process's last half second may be missed."""

    def __init__(self, root: int):
        self.root = root
        self.seconds: dict[int, float] = {}
        self.role: dict[int, str] = {}

    def sample(self) -> None:
        import psutil

        try:
            tree = [psutil.Process(self.root)]
            tree += tree[0].children(recursive=True)
        except psutil.Error:
            return
        for proc in tree:
            try:
                times = proc.cpu_times()
                title = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            self.seconds[proc.pid] = times.user + times.system
            if proc.pid == self.root:
                self.role[proc.pid] = "command"
            elif proc.pid not in self.role or self.role[proc.pid] == "ray":
                # A worker keeps the first role it is seen in (decode workers later
                # run the Parquet writes too).
                found = [role for name, role in ROLES if name in title]
                self.role[proc.pid] = found[0] if found else "ray"

    def by_role(self) -> dict[str, float]:
        out = dict.fromkeys(("read_decode", "predictor", "command", "ray"), 0.0)
        for pid, seconds in self.seconds.items():
            out[self.role[pid]] += seconds
        return {role: round(seconds, 1) for role, seconds in out.items()}


def run_meddx(args: list[str], env: dict, sample_memory: bool = False) -> dict:
    """Run a meddx command; its wall time, last summary line, peak tree PSS, how busy
    each core was while it ran (the whole machine's account, start-up included) and
    its process tree's core-seconds by role (TreeCPU)."""
    cores_before = cpu_times()
    start = time.perf_counter()
    proc = subprocess.Popen(
        [*MEDDX, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    peak = [0]
    account = TreeCPU(proc.pid)

    def sample():
        while proc.poll() is None:
            if sample_memory:
                peak[0] = max(peak[0], tree_pss_bytes(proc.pid))
            account.sample()
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"meddx {args[0]} failed ({proc.returncode}): {err[-2000:]}")
    return {
        "seconds": seconds,
        "stdout": out,
        "peak_pss_bytes": peak[0],
        "core_busy": busy_per_core(cores_before, cpu_times()),
        "core_seconds": account.by_role(),
    }
