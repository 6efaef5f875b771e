"""The audit log (meddx.store.audit, ``meddx audit``): every score and screen run leaves a
start and an end record and its inputs' outcomes under OUT/_audit/, readable by DuckDB
and pyarrow, without a secret or an identifier; a run SIGKILLed leaves a start without
an end ("did not finish"); a run the lease refused is recorded with exit status 4.
Real runs of the ``meddx`` command line on the session's Ray, on a local disk and on
moto's S3 server."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import duckdb
import pydicom
import pytest

from meddx import MeddxBusy, MeddxError
from meddx.cli import main
from meddx.config import ScoreConfig, TrainConfig
from meddx.imaging.dicom import pseudonym
from meddx.inputs.storage import StorageSettings
from meddx.pipelines.scoring import score
from meddx.pipelines.training import train
from meddx.store import audit, lease

from .helpers import MEDDX, session_env
from .images import dicom_cr, png
from .leaks import files_under, leaks_in_files

KEY = "audit-key-Vb71"
PASSWORD = "dicomweb-pass-Qz93"
STUDY_A, STUDY_B = "1.2.826.0.1.3680043.8.498.71", "1.2.826.0.1.3680043.8.498.72"
FOLDER = "MRN12345678"  # an identifier in a folder's name, as archives have them


def films(root: Path) -> dict[str, bytes]:
    """Three DICOM films of two studies, in a folder named by an MRN; their UIDs."""
    folder = root / FOLDER
    folder.mkdir(parents=True)
    uids = {}
    for name, study in (("a1", STUDY_A), ("a2", STUDY_A), ("b1", STUDY_B)):
        data = dicom_cr(study=study)
        (folder / f"{name}-{FOLDER}.dcm").write_bytes(data)
        uids[name] = pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID.encode()
    return uids


def record_files(out: Path) -> list[Path]:
    return files_under(out / "_audit")


@pytest.fixture
def site(monkeypatch):
    """The site's pseudonym key and a DICOMweb password, in the environment."""
    monkeypatch.setenv("MEDDX_PSEUDONYM_KEY", KEY)
    monkeypatch.setenv("MEDDX_DICOMWEB_USER", "dicomweb-user")
    monkeypatch.setenv("MEDDX_DICOMWEB_PASSWORD", PASSWORD)


def test_score_and_screen_are_recorded_without_a_secret_or_an_identifier(
    ray_session, tmp_path, random_checkpoint, site, capsys
):
    model, sha = random_checkpoint
    inputs, out = tmp_path / "in", tmp_path / "out"
    uids = films(inputs)
    main(["score", str(inputs), "--model", model, "--out", str(out), "--run-date", "2026-12-01"])
    # A fourth film arrives: the night's screen scores it alone.
    (inputs / FOLDER / f"b2-{FOLDER}.dcm").write_bytes(dicom_cr(study=STUDY_B))
    main(
        ["screen", str(inputs), "--model", model, "--out", str(out), "--run-date", "2026-12-02"]
        + ["--max-qc-rate", "1", "--max-psi", "100", "--quiet"]
    )
    capsys.readouterr()

    records = (
        duckdb.sql(
            f"select * from read_parquet('{out}/_audit/runs/**/*.parquet', hive_partitioning=true) "
            "order by time, event desc"
        )
        .fetch_arrow_table()
        .to_pylist()
    )
    assert [(r["command"], r["event"]) for r in records] == [
        ("score", "start"),
        ("score", "end"),
        ("screen", "start"),
        ("screen", "end"),
    ]
    for r in records:
        assert r["model_sha256"] == [sha] and r["model_names"] == ["seednet"]
        assert r["host"] and r["user"] and r["meddx_version"] and r["input"] == str(inputs)
        assert r["invoked"] == f"meddx {r['command']}"
        assert json.loads(r["options"])["model"] == [model]
    scored, screened = records[1], records[3]
    assert (scored["outcome"], scored["exit_status"], scored["rows"]) == ("committed", 0, 3)
    assert (screened["outcome"], screened["exit_status"], screened["rows"]) == ("committed", 0, 1)
    assert json.loads(screened["options"])["max_psi"] == 100.0

    key = KEY.encode()
    inputs_read = audit.inputs_of_study(str(out), StorageSettings(), pseudonym(STUDY_A, key))
    assert inputs_read.num_rows == 2 and set(inputs_read["status"].to_pylist()) == {"ok"}
    assert set(inputs_read["model_sha256"].to_pylist()) == {sha}
    assert all(i.startswith("pseudonym:") for i in inputs_read["input_id"].to_pylist())
    per_input = duckdb.sql(
        f"select run_id, count(*) from read_parquet('{out}/_audit/inputs/**/*.parquet') "
        "group by run_id order by 2 desc"
    ).fetchall()
    assert [n for _, n in per_input] == [3, 1]  # one row per input and model, per run

    # Nothing in the log names a patient or carries a secret.
    needles = {
        "folder's MRN": FOLDER.encode(),
        "patient id": b"MRN-0042",
        "patient name": b"Doe^Jane",
        "study uid": STUDY_A.encode(),
        "key": key,
        "dicomweb password": PASSWORD.encode(),
        "aws secret": os.environ["AWS_SECRET_ACCESS_KEY"].encode(),
        **{f"sop uid {n}": uid for n, uid in uids.items()},
    }
    assert len(record_files(out)) == 6
    assert leaks_in_files(record_files(out), needles) == []

    # What happened to study B, and with which model.
    main(["audit", str(out), "--study", pseudonym(STUDY_B, key)])
    said = capsys.readouterr().out
    assert said.startswith(f"study {pseudonym(STUDY_B, key)}: 2 inputs, 2 rows in 2 runs\n")
    assert said.count(f"seednet {sha[:12]}") == 2 and said.count(" ok ") == 2
    main(["audit", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("began (UTC)")
    assert " score " in lines[1] and " screen " in lines[2]
    assert all(" committed  0 " in line for line in lines[1:])
    main(["audit", str(out), "--since", "2999-01-01"])
    assert capsys.readouterr().out == f"no audit records under {out}\n"


def test_a_run_refused_by_the_lease_is_recorded_with_its_exit_status(tmp_path, random_checkpoint):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    (inputs / "a.png").write_bytes(png())
    argv = ["score", str(inputs), "--model", random_checkpoint[0], "--out", str(out)]
    with lease.held(str(out), StorageSettings(), "2026-12-01-holder", "screen", 0, 60):
        with pytest.raises(SystemExit) as refused:
            main(argv)
    assert refused.value.code == 4
    (run,) = audit.runs(str(out), StorageSettings())
    assert (run["outcome"], run["exit_status"], run["error_type"]) == ("refused", 4, "MeddxBusy")
    assert run["command"] == "score" and run["invoked"] == "meddx score"
    assert [p.name.rsplit("-", 1)[1] for p in record_files(out)] == ["end.parquet", "start.parquet"]
    assert not list(out.glob("dt=*"))  # nothing scored


def test_a_refusal_on_s3_is_recorded_there_without_the_lease(bucket, settings, random_checkpoint):
    out = f"{bucket}/results"
    cfg = ScoreConfig(input=f"{bucket}/in", model=random_checkpoint[0], out=out, storage=settings)
    with lease.held(out, settings, "2026-12-01-holder", "screen", 0, 60):
        with pytest.raises(MeddxBusy):
            score(cfg)
    (run,) = audit.runs(out, settings)
    assert (run["outcome"], run["exit_status"], run["out"]) == ("refused", 4, out)
    assert run["invoked"] == "" and run["options"] == "{}"  # the library, called directly
    # A record is never overwritten: the same name again is refused.
    name = f"runs/dt={run['started'].date()}/{run['run_id']}-end.parquet"
    with pytest.raises(MeddxError, match="cannot write the audit record"):
        audit.append(out, settings, name, b"not a record")
    assert audit.runs(out, settings)[0]["outcome"] == "refused"


def test_a_sigkilled_run_did_not_finish(ray_session, tmp_path, random_checkpoint, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for i in range(60):
        (inputs / f"{i:03d}.png").write_bytes(png(size=48))
    model, sha = random_checkpoint
    args = [MEDDX, "score", str(inputs), "--model", model, "--out", str(out), "--batch-size", "1"]
    killed = subprocess.Popen(
        args, env=session_env(ray_session), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and killed.poll() is None:
        if list((out / "_staging").rglob("*.parquet")):
            break
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run should be caught half way"
    (run,) = audit.runs(str(out), StorageSettings())
    assert run["outcome"] == audit.DID_NOT_FINISH and run["model_sha256"] == [sha]
    main(["audit", str(out)])
    (_, line) = capsys.readouterr().out.splitlines()
    assert f"seednet {sha[:12]}" in line and " did not finish  -" in line


def test_a_training_run_is_recorded_beside_its_checkpoint(tmp_path):
    data = tmp_path / "data" / "normal"
    data.mkdir(parents=True)
    (data / "a.png").write_bytes(png())  # one class: refused before Ray starts
    with pytest.raises(MeddxError, match="at least two classes"):
        train(TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "models" / "m.pt")))
    (run,) = audit.runs(str(tmp_path / "models"), StorageSettings())
    assert (run["command"], run["outcome"], run["exit_status"]) == ("train", "failed", 1)
    assert run["model_names"] == ["resnet18"] and run["input"] == str(tmp_path / "data")


@pytest.mark.parametrize(
    "given, shown",
    [
        ("dicomweb+https://u:secret@pacs:8042/dicom-web?PatientID=MRN9&Modality=CR",
         "dicomweb+https://pacs:8042/dicom-web?PatientID&Modality"),
        ("dimse://PACS@10.0.0.5:104?PatientName=Doe%5EJane", "dimse://PACS@10.0.0.5:104?PatientName"),
        ("http://user:pw@gateway:9091", "http://gateway:9091"),
        ("s3://bucket/in/", "s3://bucket/in/"),
        ("/data/in", "/data/in"),
    ],
)  # fmt: skip
def test_uris_are_shown_without_credentials_or_query_values(given, shown):
    assert audit.shown(given) == shown
