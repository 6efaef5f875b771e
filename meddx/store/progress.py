"""Progress a person can follow during a long run, counted from rows actually written.

A thread of the driver looks at the run's staging folder (``OUT/_staging/RUN_ID/``):
every Parquet file Ray Data has finished there holds finished rows, and their
``status`` column says how many were errors. On a terminal it keeps one line up to
date; elsewhere (``ray job logs``, cron mail, a systemd journal) it prints a plain line
every ``every`` seconds. Either way a last line gives the totals, which agree with the
run's summary.
"""

from __future__ import annotations

import sys
import threading
import time

import pyarrow.compute as pc
import pyarrow.parquet as pq

from meddx.inputs import storage
from meddx.inputs.storage import StorageSettings
from meddx.store import commit

TTY_REFRESH = 1.0  # seconds between updates of a terminal's line


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Counts of one run's written rows, and their display around the writing (none with
    ``quiet``)."""

    def __init__(
        self,
        out: str,
        settings: StorageSettings,
        run_id: str,
        total: int,
        label: str,
        every: float,
        quiet: bool = False,
        stream=None,
    ):
        self.out, self.settings, self.run_id = out, settings, run_id
        self.total, self.label, self.quiet = total, label, quiet
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = TTY_REFRESH if self.tty else every
        self.counted: dict[str, tuple[int, int]] = {}  # file -> (rows, errors)
        self.start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def counts(self) -> tuple[int, int]:
        """(rows, errors) in the files written so far; a file still being written is
        counted once it can be read whole."""
        fs = storage.filesystem(self.out, self.settings)
        staging = commit.staging_path(self.out, self.run_id)
        fs.invalidate_cache(staging)
        try:
            files = commit.parquet_files(fs, staging)
        except OSError:
            files = []
        for path in files:
            if path in self.counted:
                continue
            try:
                with fs.open(path, "rb") as fh:
                    status = pq.read_table(fh, columns=["status"])["status"]
            except Exception:  # not whole yet: next time
                continue
            errors = pc.sum(pc.not_equal(status, "ok")).as_py() or 0
            self.counted[path] = (len(status), errors)
        rows = sum(r for r, _ in self.counted.values())
        return rows, sum(e for _, e in self.counted.values())

    def line(self, rows: int, errors: int, final: bool = False) -> str:
        elapsed = time.monotonic() - self.start
        rate = rows / elapsed if elapsed > 0 else 0.0
        share = f" ({100 * rows / self.total:.0f}%)" if self.total else ""
        left = self.total - rows
        eta = f", ETA {_duration(left / rate)}" if rate > 0 and left > 0 and not final else ""
        return (
            f"{self.label}: {rows:,}/{self.total:,}{share}, {rate:.1f} images/s{eta}, "
            f"errors {errors:,}"
        )

    def _show(self, text: str, final: bool = False) -> None:
        if self.tty:
            end = "\n" if final else ""
            self.stream.write(f"\r\033[K{text}{end}")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._show(self.line(*self.counts()))

    def __enter__(self) -> Progress:
        if not self.quiet:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.quiet:
            return
        self._stop.set()
        self._thread.join()
        rows, errors = self.counts()
        elapsed = _duration(time.monotonic() - self.start)
        self._show(f"{self.line(rows, errors, final=True)}; done in {elapsed}", final=True)
