"""Scoring on a real local Ray against a real S3 endpoint: one row per object, always."""

import datetime as dt
import json
import os

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from meddx.inputs.storage import arrow_filesystem, filesystem
from meddx.names import OUTPUT_SCHEMA
from meddx.pipelines.scoring import ScoreConfig, score

from .helpers import MEDDX, refused_score, session_env
from .images import broken_inputs, jpeg, png

GOOD = {
    "cases/gray.png": png("L"),
    "cases/sixteen.png": png("I;16"),
    "cases/rgb.png": png("RGB"),
    "cases/rgba.png": png("RGBA"),
    "cases/nested/deeper/photo.jpg": jpeg(),
    "cases/no-extension": png("L"),
    "cases/looks-like-text.txt": jpeg(mode="RGB"),
}
HIDDEN = {
    "cases/_manifest.csv": b"uri,label\n",
    "cases/.DS_Store": b"\0\0",
    "cases/_tmp/x.png": png(),
}


def upload(fs, bucket, objects):
    for key, data in objects.items():
        fs.pipe_file(f"{bucket.removeprefix('s3://')}/{key}", data)


def read_rows(uri, settings):
    fs = arrow_filesystem(uri, settings)
    ds = pads.dataset(
        uri.removeprefix("s3://"), filesystem=fs, format="parquet", partitioning="hive"
    )
    return ds.to_table(), ds


def test_every_object_gives_exactly_one_row(ray_session, bucket, settings, random_checkpoint):
    fs = filesystem(bucket, settings)
    broken = {f"cases/bad/{name}": data for name, data in broken_inputs().items()}
    upload(fs, bucket, {**GOOD, **broken, **HIDDEN})
    ckpt_path, ckpt_sha = random_checkpoint
    model_uri = f"{bucket}/models/seednet.pt"
    fs.put_file(ckpt_path, model_uri.removeprefix("s3://"))

    summary = score(
        ScoreConfig(
            input=f"{bucket}/cases",
            model=model_uri,
            out=f"{bucket}/results",
            batch_size=4,
            run_date="2026-01-02",
            storage=settings,
        )
    )
    n_inputs = len(GOOD) + len(broken)
    assert (summary.inputs, summary.rows_written) == (n_inputs, n_inputs)
    assert (summary.ok, summary.errors) == (len(GOOD), len(broken))

    table, ds = read_rows(f"{bucket}/results", settings)
    assert table.num_rows == n_inputs
    rows = {r["image_uri"]: r for r in table.to_pylist()}
    assert set(rows) == {f"{bucket}/{key}" for key in [*GOOD, *broken]}  # hidden names skipped
    assert {r["dt"] for r in rows.values()} == {"2026-01-02"}
    assert len({r["run_id"] for r in rows.values()}) == 1

    for key in GOOD:
        row = rows[f"{bucket}/{key}"]
        assert row["status"] == "ok" and row["error"] is None, row
        assert row["label"] in ("normal", "opacity")
        assert len(row["probs"]) == 2 and abs(sum(row["probs"]) - 1) < 1e-4
        assert row["score"] == pytest.approx(row["probs"][1])
        assert (row["label"] == "opacity") == (row["score"] >= row["threshold"])
        assert len(row["content_sha256"]) == 64
    for key in broken:
        row = rows[f"{bucket}/{key}"]
        assert row["status"] == "error" and row["error"], row
        assert "\n" not in row["error"]
        assert row["label"] is None and row["score"] is None and row["probs"] is None
    assert "decompression bomb" in rows[f"{bucket}/cases/bad/bomb.png"]["error"]
    assert "empty object" in rows[f"{bucket}/cases/bad/empty.png"]["error"]

    for row in rows.values():
        assert row["model_name"] == "seednet" and row["model_sha256"] == ckpt_sha
        assert row["threshold"] == pytest.approx(0.5)
        assert row["scored_at"].tzinfo is not None
        assert dt.datetime.now(dt.UTC) - row["scored_at"] < dt.timedelta(hours=1)

    # The file schema is the design's, with provenance in the key-value metadata.
    file_schema = ds.schema
    for field in OUTPUT_SCHEMA:
        assert file_schema.field(field.name).type == field.type, field.name
    assert file_schema.field("score").type == pa.float32()
    meta = {k.decode(): v.decode() for k, v in file_schema.metadata.items()}
    assert json.loads(meta["meddx.class_names"]) == ["normal", "opacity"]
    assert meta["meddx.positive_class"] == "opacity"
    assert meta["meddx.model_sha256"] == ckpt_sha


def test_local_folder_and_rerun_replaces_the_partition(ray_session, tmp_path, random_checkpoint):
    inputs = tmp_path / "in"
    (inputs / "a").mkdir(parents=True)
    for i in range(5):
        (inputs / "a" / f"{i}.png").write_bytes(png("L", size=40 + i))
    (inputs / "a" / "_SUCCESS").write_bytes(b"")
    cfg = ScoreConfig(
        input=str(inputs),
        model=random_checkpoint[0],
        out=str(tmp_path / "out"),
        run_date="2026-03-04",
    )
    first = score(cfg)
    second = score(cfg)
    assert first.rows_written == second.rows_written == 5
    table = pads.dataset(str(tmp_path / "out"), format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 5  # a rerun of the same date does not duplicate rows
    assert set(table["run_id"].to_pylist()) == {second.run_id}


def test_empty_prefix_is_a_clear_error(ray_session, bucket, settings, random_checkpoint):
    upload(filesystem(bucket, settings), bucket, {"only/_manifest.csv": b"uri\n"})
    refused_score(
        f"{bucket}/only", f"{bucket}/o", random_checkpoint[0], settings, "no inputs under"
    )


def test_missing_output_bucket_is_refused_not_created(bucket, settings, random_checkpoint):
    fs = filesystem(bucket, settings)
    upload(fs, bucket, {"in/a.png": png("L")})
    missing = f"{bucket}-typo"
    match = rf"^bucket {missing} does not exist"
    refused_score(f"{bucket}/in", f"{missing}/results", random_checkpoint[0], settings, match)
    assert not fs.exists(missing.removeprefix("s3://"))


@pytest.mark.slow
def test_killed_predictor_still_one_row_per_input(ray_session, tmp_path, random_checkpoint):
    import signal
    import subprocess
    import threading
    import time

    inputs = tmp_path / "in"
    inputs.mkdir()
    # Enough images that the run outlasts the actor's first batches by many seconds, and
    # fewer than a second actor would be started for.
    n = 900
    for i in range(n):
        (inputs / f"{i:03d}.png").write_bytes(png("L", size=48 + i % 32))
    killed = []

    def kill_predictor():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            pids = subprocess.run(
                ["pgrep", "-f", r"MapBatches\(Predictors\)"], capture_output=True, text=True
            ).stdout.split()
            if pids:
                time.sleep(1.0)  # let it score a few batches first
                try:
                    os.kill(int(pids[0]), signal.SIGKILL)
                    killed.append(int(pids[0]))
                except ProcessLookupError:  # a process of the pool's start-up: try again
                    pass
            time.sleep(0.1)

    killer = threading.Thread(target=kill_predictor)
    killer.start()
    summary = score(
        ScoreConfig(
            input=str(inputs),
            model=random_checkpoint[0],
            out=str(tmp_path / "out"),
            batch_size=2,
            run_date="2026-01-05",
        )
    )
    killer.join()
    assert killed, "the predictor actor should have been killed"
    table = pads.dataset(str(tmp_path / "out"), format="parquet", partitioning="hive").to_table()
    uris = table["image_uri"].to_pylist()
    assert summary.rows_written == len(uris) == len(set(uris)) == n
    assert set(table["status"].to_pylist()) == {"ok"}


def test_an_import_that_fails_beside_ray_start_is_left_to_the_caller(ray_session):
    import importlib

    import ray

    from meddx.pipelines.cluster import init_ray_importing

    # The importer thread swallows the error; the caller's own import raises it.
    init_ray_importing("meddx.no_such_module")
    assert ray.is_initialized()
    with pytest.raises(ModuleNotFoundError, match="meddx.no_such_module"):
        importlib.import_module("meddx.no_such_module")


@pytest.mark.slow
def test_a_killed_score_run_leaves_no_rows_visible(ray_session, tmp_path, random_checkpoint):
    """SIGKILL `meddx score` once it has staged files: dt= still holds the earlier run's
    rows and nothing of the killed one; the next run discards the staging and commits."""
    import signal
    import subprocess
    import time

    from meddx.inputs.storage import StorageSettings
    from meddx.store.commit import read_results

    first, many = tmp_path / "first", tmp_path / "many"
    for folder, n in ((first, 3), (many, 300)):
        folder.mkdir()
        for i in range(n):
            (folder / f"{i:04d}.png").write_bytes(png("L", size=64 + i % 7))
    out = tmp_path / "results"
    settings = StorageSettings()
    args = ["--model", random_checkpoint[0], "--out", str(out), "--run-date", "2026-11-05"]
    env = session_env(ray_session)
    done = subprocess.run([MEDDX, "score", str(first), *args], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert read_results(str(out), settings, ["image_uri"]).num_rows == 3

    proc = subprocess.Popen(
        [MEDDX, "score", str(many), *args, "--batch-size", "4"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    staged, deadline = [], time.monotonic() + 240
    while not staged and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        staged = list((out / "_staging").rglob("*.parquet"))
    assert staged and proc.poll() is None, "the run should be caught half way"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The killed run wrote staged files, yet readers of dt=* see only the first run.
    assert list((out / "_staging").rglob("*.parquet"))
    visible = read_results(str(out), settings, ["image_uri"])
    assert sorted(visible["image_uri"].to_pylist()) == sorted(str(p) for p in first.iterdir())
    table, _ = read_rows(str(out), settings)  # any engine's view of the tree agrees
    assert table.num_rows == 3

    # Its lease on OUT is left behind, renewed by nobody: the next run waits until it is
    # silent for --lock-timeout, takes it over and recovers what the killed run staged.
    lock = json.loads((out / "_LOCK").read_text())
    assert lock["command"] == "score" and lock["pid"] == proc.pid
    again = subprocess.run(
        [MEDDX, "score", str(many), *args, "--lock-timeout", "2", "--wait-for-lock", "60"],
        env=env,
        capture_output=True,
    )
    assert again.returncode == 0, again.stderr.decode()[-2000:]
    assert f"took over the lease on {out} from {lock['run_id']}" in again.stderr.decode()
    assert "recovered: discarded uncommitted run" in again.stdout.decode()
    assert not (out / "_LOCK").exists()  # released at the end
    rows = read_results(str(out), settings, ["image_uri"])["image_uri"].to_pylist()
    # The finished re-run replaced the partition: exactly one row per input of its own.
    assert sorted(rows) == sorted(str(p) for p in many.iterdir())
    assert not list((out / "_staging").rglob("*.parquet"))


def test_the_console_shows_meddx_lines_not_ray_datas(ray_session, tmp_path, random_checkpoint):
    """Ray Data's own INFO lines (its plan, its log folder, "execution finished", "data
    sink finished") stay in its log file: the console has meddx's progress and summary,
    with the workers' output brought to it as users run it."""
    import subprocess

    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(png("L", size=64))
    # The session's own runs keep the workers' lines out; this one brings them.
    env = session_env(ray_session, quiet_workers=False)
    done = subprocess.run(
        [MEDDX, "score", str(tmp_path), "--model", random_checkpoint[0]]
        + ["--out", str(tmp_path / "out"), "--progress-seconds", "0.2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "inputs=3 ok=3 errors=0 rows_written=3" in done.stdout
    assert "scored: 3/3 (100%)" in done.stderr
    for ray_data_line in ("Starting execution of Dataset", "Execution plan of Dataset"):
        assert ray_data_line not in done.stderr, done.stderr
    assert "execution finished" not in done.stderr and "Data sink" not in done.stderr
