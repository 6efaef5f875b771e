"""The index of what OUT holds (``meddx.store.index``): written by every commit inside the
commit protocol, read back against the results, rebuilt when lost, caught up when stale,
finished by recovery after a crash, compacted without losing or doubling a row. On
moto's S3 server and on a local disk."""

import datetime as dt
import logging
import posixpath
import subprocess
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from meddx import MeddxError
from meddx.cli import cli
from meddx.inputs.storage import filesystem, strip_scheme
from meddx.names import OUTPUT_SCHEMA
from meddx.store import commit, index

SHA = "a" * 64
WHEN = dt.datetime(2026, 11, 1, 2, tzinfo=dt.UTC)


@pytest.fixture(params=["s3", "local"])
def out(request, tmp_path):
    if request.param == "s3":
        return request.getfixturevalue("bucket") + "/results"
    return str(tmp_path / "results")


def rows(uris: list[str], run_id: str) -> pa.Table:
    n = len(uris)
    columns = {f.name: pa.nulls(n, f.type) for f in OUTPUT_SCHEMA}
    columns["image_uri"] = pa.array(uris, pa.string())
    columns["status"] = pa.array(["ok"] * n, pa.string())
    columns["model_sha256"] = pa.array([SHA] * n, pa.string())
    columns["content_sha256"] = pa.array([f"c-{u}" for u in uris], pa.string())
    columns["scored_at"] = pa.array([WHEN] * n, pa.timestamp("us", tz="UTC"))
    columns["run_id"] = pa.array([run_id] * n, pa.string())
    return pa.table([columns[f.name] for f in OUTPUT_SCHEMA], schema=OUTPUT_SCHEMA)


def stage(out, settings, run_id: str, uris: list[str], sizes=None) -> None:
    """A run's staged rows and the listing facts of its inputs, as run.execute leaves them."""
    fs = filesystem(out, settings)
    staging = commit.staging_path(out, run_id)
    fs.makedirs(staging, exist_ok=True)
    with fs.open(f"{staging}/0.parquet", "wb") as fh:
        pq.write_table(rows(uris, run_id), fh)
    names = sorted({u.split("#")[0] for u in uris})
    facts = pa.table(
        {
            "name": names,
            "size": sizes or [len(n) for n in names],
            "mtime": pa.array([WHEN] * len(names), pa.timestamp("us", tz="UTC")),
            "etag": [f'"{n}"' for n in names],
        }
    )
    index.stage_inputs(out, settings, staging, facts)


def committed(out, settings, run_id: str, uris: list[str], run_date="2026-11-01", **kw):
    stage(out, settings, run_id, uris)
    return commit.commit(out, settings, run_id, run_date, fence=lambda: None, **kw)


def scanned(out, settings) -> pa.Table:
    return index.scan(out, settings).read_all().sort_by("image_uri")


def index_files(out, settings) -> list[str]:
    fs = filesystem(out, settings)
    fs.invalidate_cache()
    root = f"{strip_scheme(out)}/_index"
    return sorted(p[len(root) + 1 :] for p in fs.find(root)) if fs.exists(root) else []


def test_a_commit_indexes_its_rows_with_what_the_listing_said(out, settings):
    committed(out, settings, "2026-11-01-run1", ["/in/a.png", "/in/s.tar#x.png"])
    assert index_files(out, settings) == ["runs/2026-11-01-run1.parquet"]
    table = scanned(out, settings)
    assert table["image_uri"].to_pylist() == ["/in/a.png", "/in/s.tar#x.png"]
    assert table["name"].to_pylist() == ["/in/a.png", "/in/s.tar"]  # a member: its shard
    assert table["size"].to_pylist() == [len("/in/a.png"), len("/in/s.tar")]
    assert table["etag"].to_pylist() == ['"/in/a.png"', '"/in/s.tar"']
    assert table["content_sha256"].to_pylist() == ["c-/in/a.png", "c-/in/s.tar#x.png"]
    assert set(table["file"].to_pylist()) == {"dt=2026-11-01/2026-11-01-run1-0.parquet"}
    # The staged facts are metadata: never moved into the results.
    fs = filesystem(out, settings)
    assert [posixpath.basename(p) for p in fs.find(f"{strip_scheme(out)}/dt=2026-11-01")] == [
        "2026-11-01-run1-0.parquet"
    ]


def test_a_lost_index_is_read_again_from_the_results(out, settings, caplog, monkeypatch):
    committed(out, settings, "2026-11-01-run1", ["/in/a.png", "/in/b.png"])
    committed(out, settings, "2026-11-02-run2", ["/in/c.png"], run_date="2026-11-02")
    before = scanned(out, settings)
    filesystem(out, settings).rm(f"{strip_scheme(out)}/_index", recursive=True)
    monkeypatch.setattr(index, "CATCH_UP_ROWS", 2)  # a history is read a few rows at a time
    with caplog.at_level(logging.INFO, logger="meddx.store.index"):
        after = scanned(out, settings)
    assert "meddx: index: 2 result files read into it" in caplog.messages
    read = [f for f in index_files(out, settings) if f.startswith("runs/read-")]
    assert len(read) == 2  # the first file's 2 rows, then the second's 1
    assert after["image_uri"].to_pylist() == before["image_uri"].to_pylist()
    assert after["content_sha256"].to_pylist() == before["content_sha256"].to_pylist()
    assert after["size"].null_count == 3  # the listing's facts are not in the results
    # Read once: the next scan reads no result file.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="meddx.store.index"):
        assert scanned(out, settings).num_rows == 3
    assert not [m for m in caplog.messages if "read into it" in m]


def test_a_stale_index_follows_the_results(out, settings):
    committed(out, settings, "2026-11-01-run1", ["/in/a.png", "/in/b.png"])
    # Rows an older meddx (or a hand) put in OUT, with no index file for them.
    fs = filesystem(out, settings)
    fs.makedirs(f"{strip_scheme(out)}/dt=2026-10-01", exist_ok=True)
    with fs.open(f"{strip_scheme(out)}/dt=2026-10-01/legacy.parquet", "wb") as fh:
        pq.write_table(rows(["/in/old.png"], "legacy"), fh)
    assert scanned(out, settings)["image_uri"].to_pylist() == [
        "/in/a.png",
        "/in/b.png",
        "/in/old.png",
    ]
    # A run that replaces a partition: the replaced run's rows leave the index.
    committed(out, settings, "2026-11-01-run2", ["/in/z.png"], replace=True)
    table = scanned(out, settings)
    assert table["image_uri"].to_pylist() == ["/in/old.png", "/in/z.png"]
    assert set(table["run_id"].to_pylist()) == {"legacy", "2026-11-01-run2"}


def test_a_crash_between_the_moves_and_the_index_is_finished_by_recovery(
    out, settings, monkeypatch
):
    class Killed(BaseException):  # the process dies: nothing of the run's own code runs
        pass

    def killed(*args):
        raise Killed

    stage(out, settings, "2026-11-01-run1", ["/in/a.png"])
    monkeypatch.setattr(index, "record_run", killed)
    with pytest.raises(Killed):
        commit.commit(out, settings, "2026-11-01-run1", "2026-11-01", fence=lambda: None)
    monkeypatch.undo()
    assert index_files(out, settings) == []  # the rows are in, the index is not
    assert commit.recover(out, settings) == ["finished commit of 2026-11-01-run1"]
    assert index_files(out, settings) == ["runs/2026-11-01-run1.parquet"]
    table = scanned(out, settings)
    assert table["size"].to_pylist() == [len("/in/a.png")]  # the staged facts, kept


def test_compaction_keeps_every_row_once(out, settings, monkeypatch):
    monkeypatch.setattr(index, "COMPACT_AFTER", 2)
    for i in range(3):
        committed(out, settings, f"2026-11-01-run{i}", [f"/in/{i}.png"])
    # The third commit passed COMPACT_AFTER: one base for the three runs.
    assert index_files(out, settings) == ["base-000001.parquet"]
    three = ["/in/0.png", "/in/1.png", "/in/2.png"]
    assert scanned(out, settings)["image_uri"].to_pylist() == three
    committed(out, settings, "2026-11-01-run3", ["/in/3.png"])
    # A compaction killed after writing its base, before removing what it covers: the
    # run file it left is not read beside the base.
    fs = filesystem(out, settings)
    run3 = f"{strip_scheme(out)}/_index/runs/2026-11-01-run3.parquet"
    left = fs.cat_file(run3)
    assert index.compact(out, settings, force=True)
    fs.pipe_file(run3, left)
    assert index_files(out, settings) == ["base-000002.parquet", "runs/2026-11-01-run3.parquet"]
    table = scanned(out, settings)
    assert table["image_uri"].to_pylist() == [f"/in/{i}.png" for i in range(4)]
    assert pc.count_distinct(table["image_uri"]).as_py() == table.num_rows


def test_an_unreadable_index_file_is_left_out_and_read_again(tmp_path, settings, caplog):
    out = str(tmp_path / "results")
    committed(out, settings, "2026-11-01-run1", ["/in/a.png"])
    (tmp_path / "results/_index/runs/2026-11-01-run1.parquet").write_bytes(b"not parquet")
    (tmp_path / "results/_index/.0123.tmp").write_bytes(b"a write killed midway")
    with caplog.at_level(logging.INFO, logger="meddx.store.index"):
        assert scanned(out, settings)["image_uri"].to_pylist() == ["/in/a.png"]
    assert any("is unreadable: left out" in m for m in caplog.messages)
    # The next compaction clears what is of no use.
    assert index.compact(out, settings, force=True)
    assert index_files(out, settings) == ["base-000001.parquet"]
    assert scanned(out, settings)["image_uri"].to_pylist() == ["/in/a.png"]


def test_meddx_reindex_rebuilds_the_index(tmp_path, settings):
    out = str(tmp_path / "results")
    committed(out, settings, "2026-11-01-run1", ["/in/a.png", "/in/b.png"])
    committed(out, settings, "2026-11-02-run2", ["/in/c.png"], run_date="2026-11-02")
    result = CliRunner().invoke(cli, ["reindex", out])
    assert result.exit_code == 0, result.output
    # The library's log lines first (INFO), then the command's one line.
    assert result.output.splitlines()[-1] == f"reindexed {out}: 3 rows from 2 result files"
    assert index_files(out, settings) == ["base-000001.parquet"]
    assert scanned(out, settings).num_rows == 3
    absent = tmp_path / "absent"
    bad = subprocess.run(
        [sys.executable, "-m", "meddx", "reindex", str(absent)], capture_output=True, text=True
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [f"meddx: error: no results under {absent}"]


def test_the_query_engine_stays_offline_quiet_and_within_its_budget():
    from meddx.store import sql

    con = sql.connect()
    settings = con.execute(
        "SELECT current_setting('autoinstall_known_extensions'),"
        " current_setting('autoload_known_extensions'), current_setting('enable_progress_bar'),"
        " current_setting('memory_limit')"
    ).fetchall()
    assert settings[0][:3] == (False, False, False)
    assert settings[0][3].endswith("MiB") and float(settings[0][3].split()[0]) <= 256


def test_the_results_are_found_in_the_partitions_alone(out, settings):
    """Parquet files under OUT's own folders (the audit log, run artefacts) are no
    results, and are not listed to find them: the audit log grows with every run."""
    committed(out, settings, "2026-11-01-run1", ["/in/a.png"])
    fs = filesystem(out, settings)
    root = strip_scheme(out)
    for extra in ("_audit/runs/dt=2026-11-01/r-start.parquet", "_runs/dt=2026-11-01/w.parquet"):
        fs.makedirs(f"{root}/{extra.rsplit('/', 1)[0]}", exist_ok=True)
        with fs.open(f"{root}/{extra}", "wb") as fh:
            pq.write_table(rows(["/in/ghost.png"], "ghost"), fh)
    fs.invalidate_cache()
    found = index._result_files(fs, out)
    assert len(found) == 1 and next(iter(found)).startswith("dt=2026-11-01/")
    assert scanned(out, settings)["image_uri"].to_pylist() == ["/in/a.png"]


def test_a_snapshot_since_another_reads_what_came_between(out, settings):
    """The commit's re-check reads only what the index gained since the selection."""
    committed(out, settings, "2026-11-01-run1", ["/in/a.png", "/in/b.png"])
    before = index.Snapshot(out, settings)
    committed(out, settings, "2026-11-01-run2", ["/in/c.png"])
    between = index.Snapshot(out, settings).since(before)
    assert between.rows == 1
    assert between.scan().read_all()["image_uri"].to_pylist() == ["/in/c.png"]
    index.compact(out, settings, force=True)  # a new base: all of it again
    assert index.Snapshot(out, settings).since(before).rows == 3


def test_an_unreadable_result_file_stops_the_run_in_one_line(tmp_path, settings):
    out = str(tmp_path / "results")
    committed(out, settings, "2026-11-01-run1", ["/in/a.png"])
    (tmp_path / "results/dt=2026-11-02").mkdir()
    (tmp_path / "results/dt=2026-11-02/broken-0.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(MeddxError) as stopped:
        scanned(out, settings)
    assert str(stopped.value) == (
        "result file dt=2026-11-02/broken-0.parquet is unreadable (ArrowInvalid): repair or "
        "remove it, then run meddx reindex"
    )
