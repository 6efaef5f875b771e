"""Progress of a run (meddx.store.progress), counted from the Parquet files staged in a
tmp OUT: rows, errors, rate, ETA, and the lines a terminal or a log gets."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from meddx.inputs.storage import StorageSettings
from meddx.store import commit
from meddx.store.progress import Progress

RUN = "run-7"


def stage(out: Path, name: str, statuses: list[str], run: str = RUN) -> Path:
    """A finished file of ``run``'s staged rows with these statuses."""
    folder = Path(commit.staging_path(str(out), run))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    pq.write_table(pa.table({"image_uri": [f"f{i}" for i in range(len(statuses))],
                             "status": statuses}), path)  # fmt: skip
    return path


def progress(out: Path, stream=None, **kwargs) -> Progress:
    kwargs = {"total": 10, "label": "scoring", "every": 0.05, **kwargs}
    return Progress(str(out), StorageSettings(), RUN, stream=stream or io.StringIO(), **kwargs)


def test_rows_and_errors_are_counted_from_finished_files_of_the_run(tmp_path):
    p = progress(tmp_path)
    assert p.counts() == (0, 0)  # nothing staged yet: no folder at all
    stage(tmp_path, "a.parquet", ["ok", "ok", "error"])
    stage(tmp_path, "b.parquet", ["error", "skipped", "ok", "ok"])  # skipped: not ok
    stage(tmp_path, "other.parquet", ["error"] * 5, run="run-8")  # another run's
    folder = Path(commit.staging_path(str(tmp_path), RUN))
    (folder / "_SUCCESS").write_text("")  # not a Parquet file
    partial = folder / "c.parquet"
    whole = stage(tmp_path, "c.tmp", ["ok"] * 4).read_bytes()
    partial.write_bytes(whole[: len(whole) // 2])  # still being written
    assert p.counts() == (7, 3)
    partial.write_bytes(whole)  # now whole: counted
    assert p.counts() == (11, 3)


def test_a_line_gives_share_rate_eta_and_errors(tmp_path):
    p = progress(tmp_path, total=200)
    p.start = time.monotonic() - 10  # ten seconds in
    assert p.line(50, 3) == "scoring: 50/200 (25%), 5.0 images/s, ETA 30 s, errors 3"
    p.start = time.monotonic() - 100
    assert p.line(50, 0) == "scoring: 50/200 (25%), 0.5 images/s, ETA 5 min 00 s, errors 0"
    big = progress(tmp_path, total=100_000, label="screening")
    big.start = time.monotonic() - 10
    assert big.line(10, 0) == (
        "screening: 10/100,000 (0%), 1.0 images/s, ETA 27 h 46 min, errors 0"
    )
    # The last line has no ETA, even short of the total; nothing to do has no share.
    assert p.line(200, 1, final=True).endswith("(100%), 2.0 images/s, errors 1")
    assert p.line(150, 1, final=True).endswith("(75%), 1.5 images/s, errors 1")
    assert progress(tmp_path, total=0).line(0, 0).startswith("scoring: 0/0, 0.")


def test_off_a_terminal_plain_lines_then_the_totals(tmp_path):
    stream = io.StringIO()
    stage(tmp_path, "a.parquet", ["ok", "error", "ok"])
    with progress(tmp_path, stream, total=6):
        deadline = time.monotonic() + 30
        while "\n" not in stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)  # until the first plain line
        stage(tmp_path, "b.parquet", ["ok", "ok", "error"])
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) >= 2
    assert lines[0].startswith("scoring: 3/6 (50%), ") and lines[0].endswith(", errors 1")
    last = lines[-1]
    assert last.startswith("scoring: 6/6 (100%), ") and "ETA" not in last
    assert re.search(r", errors 2; done in \d+ s$", last), last


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_one_line_kept_up_to_date(tmp_path):
    stream = Terminal()
    stage(tmp_path, "a.parquet", ["ok"] * 4)
    with progress(tmp_path, stream, every=60, total=4) as p:
        assert p.every < 60  # a terminal's line is refreshed often, whatever `every`
    text = stream.getvalue()
    assert text.startswith("\r\033[K") and re.search(r"; done in \d+ s\n$", text)
    assert text.count("\n") == 1
    assert "scoring: 4/4 (100%)" in text.split("\r\033[K")[-1]


@pytest.mark.parametrize("stream", [io.StringIO(), Terminal()], ids=["log", "terminal"])
def test_quiet_shows_nothing(tmp_path, stream):
    stage(tmp_path, "a.parquet", ["ok"])
    with progress(tmp_path, stream, quiet=True):
        time.sleep(0.2)
    assert stream.getvalue() == ""
