"""Nightly screening on a real S3 endpoint and a real local Ray."""

import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pyarrow.csv as pacsv
import pytest
import yaml
from PIL import Image

from meddx import MeddxAlarm, MeddxError
from meddx.analysis.drift import psi
from meddx.cli import main
from meddx.config import ScreenConfig
from meddx.inputs.storage import StorageSettings, filesystem
from meddx.pipelines.screening import screen
from meddx.store.commit import COMMIT, read_results, recover

from .helpers import MEDDX, REPO, session_env
from .images import broken_inputs, png
from .leaks import leaks_in_s3


def upload(fs, prefix, start, stop, size=48):
    for i in range(start, stop):
        fs.pipe_file(f"{prefix}/img-{i:04d}.png", png("L", size=size + i % 16))


def config(bucket, settings, model, day, **kw):
    return ScreenConfig(
        input=f"{bucket}/incoming",
        model=model,
        out=f"{bucket}/results",
        run_date=day,
        storage=settings,
        **kw,
    )


def screen_args(bucket, settings, model):
    """`meddx screen`'s arguments for the night of ``config``, on the test's S3 server."""
    return ["screen", f"{bucket}/incoming", "--model", model, "--out", f"{bucket}/results",
            "--s3-endpoint", settings.s3_endpoint]  # fmt: skip


def files_of(fs, bucket, day):
    return sorted(fs.find(f"{bucket.removeprefix('s3://')}/results/dt={day}"))


@pytest.mark.slow
def test_nights_rerun_and_changed_object(ray_session, bucket, settings, triage_checkpoint):
    fs = filesystem(bucket, settings)
    incoming = f"{bucket.removeprefix('s3://')}/incoming"
    upload(fs, incoming, 0, 40)
    day1 = screen(config(bucket, settings, triage_checkpoint, "2026-11-01"))
    assert (day1.inputs_seen, day1.new_inputs, day1.rows, day1.ok) == (40, 40, 40, 40)

    upload(fs, incoming, 40, 60)
    day2 = screen(config(bucket, settings, triage_checkpoint, "2026-11-02"))
    assert (day2.inputs_seen, day2.new_inputs, day2.rows) == (60, 20, 20)
    before = files_of(fs, bucket, "2026-11-02")

    again = screen(config(bucket, settings, triage_checkpoint, "2026-11-02"))
    assert (again.new_inputs, again.rows) == (0, 0)
    assert files_of(fs, bucket, "2026-11-02") == before
    cfg = config(bucket, settings, triage_checkpoint, "2026-11-03")
    table = read_results(cfg.out, cfg.storage, ["image_uri", "dt"])
    assert table.num_rows == 60 and len(set(table["image_uri"].to_pylist())) == 60

    time.sleep(1.1)  # S3 modification times have one-second resolution
    fs.pipe_file(f"{incoming}/img-0003.png", png("RGB", size=90))  # new bytes, same name
    day3 = screen(cfg)
    assert (day3.new_inputs, day3.rows) == (1, 1)
    rows = read_results(cfg.out, cfg.storage, ["image_uri", "content_sha256", "dt"]).to_pylist()
    versions = [r for r in rows if r["image_uri"].endswith("img-0003.png")]
    assert len(versions) == 2 and versions[0]["content_sha256"] != versions[1]["content_sha256"]

    # Worklist and summary of night 1: every ok study (threshold 0), highest score first.
    runs = f"{bucket.removeprefix('s3://')}/results/_runs/dt=2026-11-01"
    summary = json.loads(fs.cat_file(f"{runs}/summary.json"))
    assert summary["rows"] == 40 and summary["ok"] == 40 and summary["positives"] == 40
    worklist = pacsv.read_csv(fs.open(f"{runs}/worklist.csv")).to_pylist()
    assert len(worklist) == 40 and [w["rank"] for w in worklist] == list(range(1, 41))
    # Each PNG is its own study: one entry each, no other image, quality control ok.
    assert summary["positive_studies"] == 40 and {w["other_images"] for w in worklist} == {0}
    assert {(w["section"], w["qc"], w["other_image_uris"]) for w in worklist} == {
        ("positive", "ok", "[]")
    }
    scores = [w["score"] for w in worklist]
    assert scores == sorted(scores, reverse=True)
    assert fs.exists(f"{runs}/report.html") and fs.exists(f"{runs}/worklist.parquet")
    # No credential in anything the nights wrote: Parquet (metadata too), reports, JSON.
    secrets = {
        "AWS secret": os.environ["AWS_SECRET_ACCESS_KEY"].encode(),
        "AWS key id": os.environ["AWS_ACCESS_KEY_ID"].encode(),
    }
    found, scanned = leaks_in_s3(fs, f"{bucket}/results", secrets)
    assert scanned > 10 and found == []


@pytest.mark.slow
def test_sigkill_half_way_then_recovery(ray_session, bucket, settings, triage_checkpoint):
    fs = filesystem(bucket, settings)
    root = bucket.removeprefix("s3://")
    upload(fs, f"{root}/incoming", 0, 200, size=96)
    cmd = [MEDDX, *screen_args(bucket, settings, triage_checkpoint)]
    cmd += ["--run-date", "2026-11-05", "--batch-size", "4"]
    proc = subprocess.Popen(
        cmd, env=session_env(ray_session), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    staged = []
    deadline = time.monotonic() + 240
    while not staged and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        fs.invalidate_cache()
        staged = [p for p in fs.find(f"{root}/results/_staging") if p.endswith(".parquet")]
    assert staged and proc.poll() is None, "the run should be caught half way"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    # The killed run's lease is stale after a second's silence for this run.
    cfg = config(bucket, settings, triage_checkpoint, "2026-11-05")
    cfg = dataclasses.replace(cfg, lock_timeout=1.0, wait_for_lock=60.0)
    assert (
        read_results(cfg.out, cfg.storage, ["image_uri"]).num_rows == 0
    )  # nothing half-written is visible
    summary = screen(cfg)
    assert summary.recovered and "discarded" in summary.recovered[0]
    table = read_results(cfg.out, cfg.storage, ["image_uri"])
    assert table.num_rows == 200 == len(set(table["image_uri"].to_pylist()))
    fs.invalidate_cache()
    assert not [p for p in fs.find(f"{root}/results/_staging") if p.endswith(".parquet")]


def test_recover_finishes_a_committed_run_and_drops_the_rest(tmp_path):
    out = tmp_path / "out"
    committed, partial = out / "_staging" / "run-a", out / "_staging" / "run-b"
    committed.mkdir(parents=True)
    partial.mkdir(parents=True)
    (committed / "x.parquet").write_bytes(b"PAR1")
    (partial / "y.parquet").write_bytes(b"PAR1")
    target = out / "dt=2026-01-01" / "run-a-x.parquet"
    (committed / COMMIT).write_text(
        json.dumps({"run_id": "run-a", "moves": [[str(committed / "x.parquet"), str(target)]]})
    )
    done = recover(str(out), StorageSettings())
    assert done == ["finished commit of run-a", "discarded uncommitted run run-b"]
    assert target.exists() and not (out / "_staging" / "run-a").exists()
    assert not partial.exists()


def test_drift_reads_only_the_nights_it_needs(tmp_path):
    """The reference window and the report's history come from their own partitions:
    an older partition is never read (here it is not even Parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from meddx.analysis.drift import recent_scores
    from meddx.names import OUTPUT_SCHEMA

    out = tmp_path / "results"
    for day in range(1, 11):
        folder = out / f"dt=2026-11-{day:02d}"
        folder.mkdir(parents=True)
        if day == 1:
            (folder / "old.parquet").write_bytes(b"not parquet: reading it would fail")
            continue
        rows = [
            {"image_uri": f"/x/{day}-{i}", "status": "ok", "score": day / 100, "model_sha256": m}
            for i, m in enumerate(["mine", "mine", "other"])
        ]
        pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), folder / "p.parquet")
    reference, history = recent_scores(str(out), StorageSettings(), "mine", "2026-11-09", 3, 4)
    assert list(reference) == ["2026-11-06", "2026-11-07", "2026-11-08"]
    assert list(history) == ["2026-11-06", "2026-11-07", "2026-11-08", "2026-11-09"]
    # This model's ok scores only, night by night.
    assert all(len(v) == 2 for v in history.values())
    assert reference["2026-11-07"].tolist() == pytest.approx([0.07, 0.07])
    with pytest.raises(pa.ArrowInvalid):  # the whole tree does hold a bad file
        read_results(str(out), StorageSettings(), ["score"])


def test_psi():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.3, 0.1, 2000), rng.normal(0.3, 0.1, 2000)
    assert psi(a, b) < 0.05
    assert psi(a, rng.normal(0.6, 0.1, 2000)) > 1.0


@pytest.mark.slow
def test_alarms_exit_non_zero_with_one_line(
    ray_session, bucket, settings, triage_checkpoint, capsys
):
    fs = filesystem(bucket, settings)
    root = bucket.removeprefix("s3://")
    upload(fs, f"{root}/incoming", 0, 8)
    for name, data in list(broken_inputs().items())[:2]:
        fs.pipe_file(f"{root}/incoming/{name}", data)
    # --quiet: no progress lines, the alarm is all there is on stderr
    args = [*screen_args(bucket, settings, triage_checkpoint), "--quiet"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--run-date", "2026-11-10"])
    assert exit_info.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("meddx: alarm: error rate 20.0% is over")
    # The results and the report were written all the same.
    assert fs.exists(f"{root}/results/_runs/dt=2026-11-10/report.html")

    # Drift: a night of very different images against the night before.
    for p in fs.find(f"{root}/incoming"):
        fs.rm(p)
    # Films with some contrast (blank ones would be qc=low_quality, another alarm).
    texture = np.outer(np.linspace(0, 1, 64), np.linspace(0, 1, 64)) * 60
    dark = [(v + texture).astype(np.uint8) for v in range(10, 50)]
    bright = [(v - 60 + texture).astype(np.uint8) for v in range(200, 240)]

    def put(name, pixels):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        fs.pipe_file(f"{root}/incoming/{name}", buf.getvalue())

    for i, px in enumerate(dark):
        put(f"dark-{i}.png", px)
    screen(config(bucket, settings, triage_checkpoint, "2026-11-11", max_error_rate=1.0))
    for i, px in enumerate(bright):
        put(f"bright-{i}.png", px)
    with pytest.raises(MeddxAlarm, match="score distribution drifted: PSI"):
        screen(config(bucket, settings, triage_checkpoint, "2026-11-12", max_error_rate=1.0))


@pytest.mark.slow
def test_other_model_needs_explicit_flag(
    ray_session, bucket, settings, triage_checkpoint, random_checkpoint
):
    fs = filesystem(bucket, settings)
    upload(fs, f"{bucket.removeprefix('s3://')}/incoming", 0, 4)
    screen(config(bucket, settings, triage_checkpoint, "2026-11-20"))
    with pytest.raises(MeddxError, match="--new-model"):
        screen(config(bucket, settings, random_checkpoint[0], "2026-11-21"))
    again = screen(config(bucket, settings, random_checkpoint[0], "2026-11-21", new_model=True))
    assert again.rows == 4


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (.ci/run)")
def test_report_renders_in_chromium(ray_session, tmp_path, triage_checkpoint):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(12):
        (src / f"{i}.png").write_bytes(png("L", size=40 + i))
    (src / "broken.png").write_bytes(b"")
    screen(
        ScreenConfig(
            input=str(src),
            model=triage_checkpoint,
            out=str(tmp_path / "out"),
            run_date="2026-11-15",
            max_error_rate=1.0,
        )
    )
    page = tmp_path / "out" / "_runs" / "dt=2026-11-15" / "report.html"
    assert "empty object" in page.read_text()
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--virtual-time-budget=5000",
    ]
    dom = subprocess.run(
        ["chromium", *flags, "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    # Every image (2 plots + 3 Grad-CAM overlays of the worklist's top) decoded by the browser.
    images = page.read_text().count("<img ")
    assert images == 5 and f'data-images="{images}/{images}"' in dom
    shot = tmp_path / "report.png"
    subprocess.run(
        ["chromium", *flags, "--window-size=1000,1600", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    image = np.asarray(Image.open(shot).convert("L"))
    assert image.shape == (1600, 1000) and image.std() > 10  # a page, not a blank


def test_deploy_manifests_parse():
    docs = list(yaml.safe_load_all((REPO / "deploy" / "kuberay-nightly.yaml").read_text()))
    kinds = {d["kind"] for d in docs}
    assert {"CronJob", "ConfigMap", "ServiceAccount", "Role", "RoleBinding"} <= kinds
    rayjob = yaml.safe_load(
        next(d for d in docs if d["kind"] == "ConfigMap")["data"]["rayjob.yaml"]
    )
    assert rayjob["kind"] == "RayJob" and "jobs/nightly.py" in rayjob["spec"]["entrypoint"]
    cron = (REPO / "deploy" / "crontab").read_text()
    assert "--submission-id nightly-$RUN_DATE" in cron and "jobs/nightly.py" in cron
    timer = (REPO / "deploy" / "systemd" / "meddx-nightly.timer").read_text()
    assert "OnCalendar=" in timer


def test_worklist_cells_a_spreadsheet_would_run_are_quoted():
    import pyarrow as pa

    from meddx.pipelines.triage import spreadsheet_safe

    cells = ['=HYPERLINK("http://x","PA")', "+1+cmd", "-2+3", "@SUM(A1)", "\tx", "PA", "a=b"]
    table = pa.table(
        {
            "view_position": pa.array(cells, pa.string()),
            "image_uri": pa.array([f"s3://b/{c}" for c in cells], pa.string()),
            "modality": pa.array([None, "CR", "CR", "CR", "CR", "CR", "CR"], pa.string()),
            "score": pa.array([-0.5, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]),
        }
    )
    buf = io.BytesIO()
    safe = spreadsheet_safe(table)
    pacsv.write_csv(safe, buf)
    read = pacsv.read_csv(io.BytesIO(buf.getvalue())).to_pydict()
    assert read["view_position"] == ["'" + c for c in cells[:5]] + ["PA", "a=b"]
    assert read["image_uri"] == table["image_uri"].to_pylist()  # nothing to quote there
    assert read["score"] == table["score"].to_pylist()  # numbers are numbers, - and all
    assert safe["modality"].to_pylist()[0] is None
