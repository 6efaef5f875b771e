"""The control plane's per-input work as Arrow data: the listing keeps what one listing
returned (no per-object request), and selecting the night's inputs runs no Python per
listed input or committed row."""

import datetime as dt
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from meddx import MeddxError
from meddx.config import ScreenConfig
from meddx.inputs import listing, prefixes, reading
from meddx.inputs.storage import StorageSettings, filesystem
from meddx.names import OUTPUT_SCHEMA
from meddx.pipelines import selection
from meddx.pipelines.selection import select_new

from .images import png

SHA = "a" * 64
SCORED_AT = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


def test_listing_table_of_a_folder(tmp_path):
    for name in ("b/2.png", "a/1.png", "_staging/x.png", ".hidden.png", "a/.DS_Store"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * len(name))
    table = listing.list_table(str(tmp_path), StorageSettings())
    assert table.schema == listing.LISTING_SCHEMA
    assert table["image_uri"].to_pylist() == [str(tmp_path / "a/1.png"), str(tmp_path / "b/2.png")]
    assert table["size"].to_pylist() == [len("a/1.png"), len("b/2.png")]
    stat = (tmp_path / "a/1.png").stat()
    assert table["mtime"][0].as_py().timestamp() == pytest.approx(stat.st_mtime, abs=1e-5)
    # One object named as INPUT is its own listing; a folder without inputs is refused.
    one = listing.list_table(str(tmp_path / "a/1.png"), StorageSettings())
    assert one["image_uri"].to_pylist() == [str(tmp_path / "a/1.png")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(MeddxError, match="no inputs under"):
        listing.list_table(str(tmp_path / "empty"), StorageSettings())
    with pytest.raises(MeddxError, match="input not found"):
        listing.list_table(str(tmp_path / "absent"), StorageSettings())


def test_manifest_listing_drops_repeats_in_first_seen_order(tmp_path):
    manifest = tmp_path / "night.csv"
    manifest.write_text("uri\n/c.png\n/a.png\n/c.png\n/b.png\n/a.png\n")
    table = listing.list_table(str(manifest), StorageSettings())
    assert table.schema == listing.LISTING_SCHEMA
    assert table["image_uri"].to_pylist() == ["/c.png", "/a.png", "/b.png"]
    assert table["size"].null_count == table["mtime"].null_count == 3


def test_a_folder_is_listed_subtree_by_subtree_in_uri_order(tmp_path):
    """A prefix streams one subtree at a time, never held whole, and the stream is in
    URI order ('a.png' < 'a/...' < 'a0.png'), metadata names left out."""
    names = ["z.png", "a/1.png", "a0.png", "b/c/2.png", "a.png", "_meta/x.png", "b/.x.png"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    source = listing.open_listing(str(tmp_path), StorageSettings())
    batches = list(source.batches())
    assert len(batches) == 5  # a.png, a/, a0.png, b/, z.png
    uris = [u for b in batches for u in b["image_uri"].to_pylist()]
    expected = ["a.png", "a/1.png", "a0.png", "b/c/2.png", "z.png"]
    assert uris == [str(tmp_path / n) for n in expected]
    assert source.table()["image_uri"].to_pylist() == uris
    with pytest.raises(MeddxError, match="input not found"):
        listing.open_listing(str(tmp_path / "absent"), StorageSettings())


def test_folders_whose_names_sort_below_the_slash_keep_uri_order(tmp_path):
    """'a-b/' and 'a b/' come before 'a/' in URI order ('-' and ' ' sort below '/'):
    every input once, in order, whatever the folder names."""
    names = ["a.png", "a/x.png", "a-b/y.png", "a b/z.png", "b.png", "a0/w.png"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    uris = listing.list_table(str(tmp_path), StorageSettings())["image_uri"].to_pylist()
    assert uris == sorted(str(tmp_path / n) for n in names)


def test_a_failure_below_the_prefix_is_one_line_without_the_path(tmp_path, monkeypatch):
    for name in ("a/MRN1234567/x.png", "b.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")

    def denied(folder, prefix, settings):
        raise PermissionError(13, "Permission denied", f"{folder}/MRN1234567")

    monkeypatch.setattr(prefixes, "_subtree", denied)
    source = listing.open_listing(str(tmp_path), StorageSettings())
    with pytest.raises(MeddxError) as failed:
        source.table()
    assert str(failed.value) == f"cannot list {tmp_path}: access denied below it"
    out = tmp_path / "out"
    write_history(out, ["/in/old.png"])
    with pytest.raises(MeddxError) as failed:  # through the query engine too
        select_new(
            screen_cfg(tmp_path, out),
            listing.open_listing(str(tmp_path), StorageSettings()),
            (SHA,),
        )
    assert str(failed.value) == f"cannot list {tmp_path}: access denied below it"
    assert "MRN" not in str(failed.value)


def test_the_task_takes_the_path_key_from_the_driver(tmp_path, monkeypatch):
    """Under --pseudonymize-paths the join names inputs by the key the driver read: a
    task's process needs no key of its own."""
    import dataclasses

    from meddx.inputs.path_pseudonyms import path_pseudonym

    key = b"k" * 32
    out = tmp_path / "out"
    write_history(out, [path_pseudonym("/in/a.png", key)])
    monkeypatch.delenv("MEDDX_PSEUDONYM_KEY", raising=False)
    monkeypatch.delenv("MEDDX_PSEUDONYM_KEY_FILE", raising=False)
    cfg = dataclasses.replace(screen_cfg(tmp_path, out), pseudonymize_paths=True)
    listed = listed_table(["/in/a.png", "/in/b.png"], [SCORED_AT, SCORED_AT])
    todo, seen = selection._select(cfg, listing.Listing("x", listed), (SHA,), key=key)
    assert todo["image_uri"].to_pylist() == ["/in/b.png"] and seen == 2


def test_the_query_engine_out_of_memory_is_one_line(tmp_path, monkeypatch):
    from meddx.store import sql

    out = tmp_path / "out"
    history = [f"/in/{i:06d}-{'x' * 80}.png" for i in range(200_000)]
    write_history(out, history)
    listed = listed_table(history, [SCORED_AT] * len(history))
    monkeypatch.setattr(sql, "MEMORY_LIMIT", "4MB")
    with pytest.raises(MeddxError) as failed:
        selection._select(screen_cfg(tmp_path, out), listing.Listing("x", listed), (SHA,))
    assert str(failed.value).startswith("selecting the night's inputs failed: ")
    assert "\n" not in str(failed.value)


def test_s3_listing_asks_nothing_per_object(bucket, settings, monkeypatch):
    fs = filesystem(bucket, settings)
    root = bucket.removeprefix("s3://")
    for i in range(12):
        fs.pipe_file(f"{root}/in/d{i % 3}/img-{i:02d}.png", png("L", size=32 + i))
    fs.pipe_file(f"{root}/in/_manifest.csv", b"uri\n")
    asked = []

    def counted(name):
        real = getattr(fs, name)

        def call(*args, **kwargs):
            asked.append(name)
            return real(*args, **kwargs)

        return call

    for name in ("info", "_info", "size", "_size"):
        monkeypatch.setattr(fs, name, counted(name))
    fs.invalidate_cache()
    table = listing.list_table(f"{bucket}/in", settings)
    assert asked == []  # no HEAD or info() per object: the listing's own fields
    assert table.num_rows == 12
    assert table["image_uri"].to_pylist() == sorted(table["image_uri"].to_pylist())
    assert all(u.startswith(f"{bucket}/in/d") for u in table["image_uri"].to_pylist())
    monkeypatch.undo()
    first = table["image_uri"][0].as_py().removeprefix("s3://")
    assert table["size"][0].as_py() == fs.info(first)["size"]
    assert table["mtime"].null_count == 0


def test_s3_sub_prefixes_are_listed_in_parallel_ray_tasks(bucket, settings, ray_session):
    """With Ray up and PARALLEL_PREFIXES sub-prefixes or more, the driver asks S3 for
    one delimited page and the tasks list the rest; the table is the one-walk table."""
    fs = filesystem(bucket, settings)
    root = bucket.removeprefix("s3://")
    fs.pipe({f"{root}/in/d{i % 5}/img-{i:02d}.png": b"x" * i for i in range(20)})
    fs.pipe({f"{root}/in/top.png": b"t", f"{root}/in/_meta/x.png": b"m"})
    fs.invalidate_cache()
    driver = filesystem(bucket, settings)
    calls = []
    driver.s3.meta.events.register(
        "before-call.s3.ListObjectsV2", lambda **kwargs: calls.append(kwargs["params"])
    )
    parallel = listing.list_table(f"{bucket}/in", settings)
    assert len(calls) == 1, calls  # the delimited page; the tasks did the rest
    assert calls[0]["query_string"]["delimiter"] == "/"
    assert parallel.num_rows == 21 and parallel["etag"].null_count == 0
    assert not any("/_meta/" in u for u in parallel["image_uri"].to_pylist())
    walked = listing.list_table(f"{bucket}/in", settings)
    assert prefixes.PARALLEL_PREFIXES > 5 or walked.equals(parallel)
    prefixes.PARALLEL_PREFIXES, before = 100, prefixes.PARALLEL_PREFIXES
    try:
        fs.invalidate_cache()
        one_walk = listing.list_table(f"{bucket}/in", settings)
    finally:
        prefixes.PARALLEL_PREFIXES = before
    assert one_walk.equals(parallel)


# ---- selection ------------------------------------------------------------------------


def write_history(out, uris: list[str], when=SCORED_AT, sha=SHA, name="part-0.parquet"):
    """Committed rows as meddx writes them: OUTPUT_SCHEMA, under dt=."""
    n = len(uris)
    columns = {f.name: pa.nulls(n, f.type) for f in OUTPUT_SCHEMA}
    columns["image_uri"] = pa.array(uris, pa.string())
    columns["status"] = pa.array(["ok"] * n, pa.string())
    columns["model_sha256"] = pa.array([sha] * n, pa.string())
    columns["content_sha256"] = pa.array([f"c{i}" for i in range(n)], pa.string())
    columns["scored_at"] = pa.array([when] * n, pa.timestamp("us", tz="UTC"))
    table = pa.table([columns[f.name] for f in OUTPUT_SCHEMA], schema=OUTPUT_SCHEMA)
    folder = out / "dt=2026-11-01"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / name)


def listed_table(uris, mtimes) -> pa.Table:
    return pa.table(
        {
            "image_uri": pa.array(uris, pa.string()),
            "size": pa.array([100] * len(uris), pa.int64()),
            "mtime": pa.array(mtimes, pa.timestamp("us", tz="UTC")),
            "etag": pa.nulls(len(uris), pa.string()),
        },
        schema=listing.LISTING_SCHEMA,
    )


def screen_cfg(tmp_path, out) -> ScreenConfig:
    model = tmp_path / "model.pt"
    model.write_bytes(b"")
    return ScreenConfig(
        input=str(tmp_path / "in"),
        model=str(model),
        out=str(out),
        run_date="2026-11-02",
        storage=StorageSettings(),
    )


def test_select_new_picks_new_and_changed_with_their_known_hashes(tmp_path):
    out = tmp_path / "out"
    history = ["/in/a.png", "/in/b.png", "/in/c.png", "/in/s.tar#x.png", "/in/s.tar#y.png"]
    write_history(out, history)
    before, after = SCORED_AT - dt.timedelta(days=1), SCORED_AT + dt.timedelta(hours=1)
    uris = ["/in/a.png", "/in/b.png", "/in/c.png", "/in/new.png", "/in/s.tar", "/in/t.tar"]
    listed = listed_table(uris, [before, after, None, before, after, before])
    todo, seen = select_new(screen_cfg(tmp_path, out), listed, (SHA,))
    assert seen == len(uris)
    # b changed, new and t.tar never scored, s.tar changed (its members' rows count for it);
    # a is older than its row, c has no time (a manifest's): neither is read again.
    assert todo["image_uri"].to_pylist() == ["/in/b.png", "/in/new.png", "/in/s.tar", "/in/t.tar"]
    known = dict(zip(todo["image_uri"].to_pylist(), todo["known"].to_pylist(), strict=True))
    sep = reading.KNOWN_SEPARATOR
    assert known["/in/b.png"] == [f"/in/b.png{sep}c1"]
    assert sorted(known["/in/s.tar"]) == [f"/in/s.tar#x.png{sep}c3", f"/in/s.tar#y.png{sep}c4"]
    assert known["/in/new.png"] is None and known["/in/t.tar"] is None
    # Nothing changed: nothing selected, and no known column to carry.
    quiet = listed_table(uris[:3], [before, before, None])
    assert select_new(screen_cfg(tmp_path, out), quiet, (SHA,))[0].num_rows == 0


def test_a_large_archive_is_selected_in_a_ray_task(tmp_path, ray_session, monkeypatch):
    """Past OFF_DRIVER_ROWS the join runs in a Ray task: the same inputs, hashes and
    count come back, and a user's error is still one line."""
    out = tmp_path / "out"
    write_history(out, ["/in/a.png", "/in/b.png"])
    later = SCORED_AT + dt.timedelta(hours=1)
    listed = listed_table(["/in/a.png", "/in/b.png", "/in/new.png"], [SCORED_AT, later, later])
    here = select_new(screen_cfg(tmp_path, out), listed, (SHA,))
    table = listing.Listing("x", listed)
    assert not selection.off_driver(table, 2)
    manifest = tmp_path / "night.parquet"
    pq.write_table(pa.table({"uri": [f"/in/{i}.png" for i in range(1000)]}), manifest)
    assert listing.open_listing(str(manifest), StorageSettings()).rows == 1000  # its footer
    assert selection.off_driver(table, selection.OFF_DRIVER_ROWS)
    monkeypatch.setattr(selection, "OFF_DRIVER_ROWS", 0)
    assert selection.off_driver(table, 2)
    there = select_new(screen_cfg(tmp_path, out), listed, (SHA,))
    assert there[1] == here[1] == 3
    assert there[0].equals(here[0])
    assert there[0]["image_uri"].to_pylist() == ["/in/b.png", "/in/new.png"]
    write_history(out, ["/in/c.png"], sha="b" * 64, name="part-1.parquet")
    with pytest.raises(MeddxError) as refused:
        select_new(screen_cfg(tmp_path, out), listed, (SHA,))
    assert str(refused.value) == (
        f"{out} holds results of another model (bbbbbbbbbbbb...): pass --new-model to score "
        "everything again with this one"
    )


def lines_run(fn, *args) -> tuple[object, int]:
    """fn(*args), and how many Python lines ran meanwhile, in any frame."""
    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return local

    def start(frame, event, arg):
        return local

    sys.settrace(start)
    try:
        result = fn(*args)
    finally:
        sys.settrace(None)
    return result, count


@pytest.mark.parametrize("changed", [0, 3])
def test_selection_runs_no_python_per_input(tmp_path, changed):
    """The Python that select_new runs is the same for 2,000 committed rows and a listing
    of 2,100 as for 20,000 and 20,100: its work on rows is Arrow's, whose cost grows
    linearly (a join), never with the archive times the night."""
    runs = {}
    for n in (2_000, 20_000):
        out = tmp_path / f"out-{n}"
        history = [f"/in/{i:06d}.png" for i in range(n)]
        write_history(out, history)
        uris = history + [f"/in/new-{i:04d}.png" for i in range(100)]
        mtimes = np.full(len(uris), SCORED_AT - dt.timedelta(days=1))
        mtimes[:changed] = SCORED_AT + dt.timedelta(days=1)
        listed = listed_table(uris, list(mtimes))
        (todo, _), lines = lines_run(select_new, screen_cfg(tmp_path, out), listed, (SHA,))
        assert todo.num_rows == 100 + changed
        if changed:  # only the changed inputs carry hashes
            assert pc.sum(pc.is_valid(todo["known"])).as_py() == changed
        else:
            assert "known" not in todo.column_names
        runs[n] = lines
    assert runs[20_000] <= runs[2_000] + 200, runs  # not 18,000 more


def test_read_stage_drops_known_bytes_from_the_column(tmp_path):
    films = [tmp_path / f"{i}.png" for i in range(3)]
    for i, f in enumerate(films):
        f.write_bytes(png("L", size=32 + i))
    uris = [str(f) for f in films]
    (first,) = reading.read_objects({"image_uri": np.array(uris, dtype=object)}, StorageSettings())
    sha0 = first["content_sha256"][0]
    known = np.empty(3, dtype=object)
    # Equal-length lists: the carried column must stay one list per row.
    known[0] = np.array([f"{uris[0]}{reading.KNOWN_SEPARATOR}{sha0}", "x"], dtype=object)
    known[1] = np.array([f"{uris[1]}{reading.KNOWN_SEPARATOR}{sha0}", "y"], dtype=object)
    known[2] = None
    batch = {"image_uri": np.array(uris, dtype=object), "known": known}
    (kept,) = reading.read_objects(batch, StorageSettings())
    # Only the first film's own (uri, hash) was scored already; the column stays behind.
    assert list(kept["image_uri"]) == uris[1:]
    assert "known" not in kept
