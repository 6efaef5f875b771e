"""Secrets stay secret: nothing a run writes or prints holds a credential or the site's
pseudonym key. A real scoring run and a real screening night, through the CLI, with
credentials in the environment, then every output, Ray's session folder, what the
commands printed and the text of exceptions are searched for them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import traceback

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from meddx import MeddxError, secret
from meddx.inputs import dicomweb
from meddx.inputs.storage import arrow_filesystem, filesystem
from meddx.pipelines import cluster
from meddx.secret import pseudonym_key

from .helpers import DUMMY_AWS, MEDDX, refused_score
from .images import broken_inputs, dicom_cr, png
from .leaks import files_under, leaks, leaks_in_s3, leaks_in_tree, ray_session_dir

# The driver's credentials and key, distinct from the ones Ray's workers inherited.
DRIVER_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIALEAKCHECK7Q2W9E4R",
    "AWS_SECRET_ACCESS_KEY": "leakcheck/9fQ2+Secret+Zx7Kp3Lm8Nb4Vc1",
    "MEDDX_PSEUDONYM_KEY": "pseudonym-key-leakcheck-5Hj8Kq",
}
NEEDLES = {
    "driver AWS key id": DRIVER_ENV["AWS_ACCESS_KEY_ID"].encode(),
    "driver AWS secret": DRIVER_ENV["AWS_SECRET_ACCESS_KEY"].encode(),
    "pseudonym key": DRIVER_ENV["MEDDX_PSEUDONYM_KEY"].encode(),
    "worker AWS key id": DUMMY_AWS["AWS_ACCESS_KEY_ID"].encode(),
    "worker AWS secret": DUMMY_AWS["AWS_SECRET_ACCESS_KEY"].encode(),
}
MISSING_BUCKET = "s3://meddx-leakcheck-no-such-bucket"


def test_the_scanner_finds_what_it_looks_for(tmp_path):
    secret = NEEDLES["driver AWS secret"]
    (tmp_path / "a.log").write_bytes(b"x " + secret + b" y")
    # Compressed column data (without min/max statistics) hides a value from a byte search.
    pq.write_table(
        pa.table({"v": [f"{secret.decode()}-{i}" for i in range(50)]}),
        tmp_path / "b.parquet",
        compression="gzip",
        use_dictionary=False,
        write_statistics=False,
    )
    assert secret not in (tmp_path / "b.parquet").read_bytes()
    assert leaks_in_tree(tmp_path, NEEDLES) == [
        f"driver AWS secret in {tmp_path / 'a.log'}",
        f"driver AWS secret in {tmp_path / 'b.parquet'}",
    ]


@pytest.mark.slow
def test_no_secret_in_outputs_logs_or_errors(ray_session, bucket, settings, random_checkpoint):
    fs = filesystem(bucket, settings)
    root = bucket.removeprefix("s3://")
    for i in range(3):
        fs.pipe_file(f"{root}/in/cr-{i}.dcm", dicom_cr(patient_name=f"Leak^Check{i}"))
    for i in range(3):
        fs.pipe_file(f"{root}/in/img-{i}.png", png("L", size=48 + i))
    fs.pipe_file(f"{root}/in/broken.png", broken_inputs()["truncated.png"])
    fs.put_file(random_checkpoint[0], f"{root}/models/m.pt")
    env = {k: v for k, v in os.environ.items() if k != "MEDDX_QUIET_WORKERS"}
    env.update(DRIVER_ENV, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    common = ["--model", f"{bucket}/models/m.pt", "--s3-endpoint", settings.s3_endpoint]

    def meddx(*args):
        return subprocess.run(
            [MEDDX, *args, *common], env=env, capture_output=True, text=True, timeout=300
        )

    scored = meddx("score", f"{bucket}/in", "--out", f"{bucket}/out", "--run-date", "2026-06-01")
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "inputs=7 ok=6 errors=1 rows_written=7" in scored.stdout
    night = meddx(
        "screen",
        f"{bucket}/in",
        "--out",
        f"{bucket}/nightly",
        "--run-date",
        "2026-06-01",
        "--max-error-rate",
        "1",
    )
    assert night.returncode == 0, night.stderr[-3000:]
    wrong = meddx("score", f"{MISSING_BUCKET}/in", "--out", f"{bucket}/o2")
    assert wrong.returncode == 1
    assert wrong.stderr.startswith("meddx: error:") and wrong.stderr.count("\n") == 1

    # The text of exceptions, tracebacks and chained causes included.
    model = random_checkpoint[0]
    missing_input = refused_score(
        f"{MISSING_BUCKET}/in", f"{bucket}/x", model, settings, "^input not found: s3://"
    )
    missing_output = refused_score(
        f"{bucket}/in",
        f"{MISSING_BUCKET}/o",
        model,
        settings,
        "^bucket s3://meddx-leakcheck-no-such-bucket does not",
    )
    errors = ["".join(traceback.format_exception(e.value)) for e in (missing_input, missing_output)]

    found, scanned = [], 0
    for prefix in (f"{bucket}/out", f"{bucket}/nightly"):
        hits, n = leaks_in_s3(fs, prefix, NEEDLES)
        found, scanned = found + hits, scanned + n
    written = {key.rsplit("/", 1)[-1] for key in fs.find(f"{root}/nightly")}
    assert {"report.html", "summary.json", "worklist.csv", "worklist.parquet"} <= written
    assert scanned >= 6
    session = ray_session_dir()
    assert len(files_under(session / "logs")) > 10
    found += leaks_in_tree(session, NEEDLES)
    for name, result in (("score", scored), ("screen", night), ("wrong bucket", wrong)):
        found += leaks(f"{name} stdout", result.stdout.encode(), NEEDLES)
        found += leaks(f"{name} stderr", result.stderr.encode(), NEEDLES)
    for i, text in enumerate(errors):
        found += leaks(f"exception {i}", text.encode(), NEEDLES)
    assert found == []
    # The pseudonym key was in use: the DICOM rows carry keyed pseudonyms.
    rows = pads.dataset(
        f"{root}/out", filesystem=arrow_filesystem(bucket, settings), format="parquet"
    ).to_table(columns=["image_uri", "study_pseudonym"])
    assert sum(p is not None for p in rows["study_pseudonym"].to_pylist()) == 3


# ---- secrets from files, and out of Ray's job metadata ---------------------------------

FILE_SECRET = "mounted-s3cret-Wq81"


def no_meddx_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("MEDDX_"):
            monkeypatch.delenv(name)


def test_a_secret_can_come_from_the_file_its_FILE_variable_names(monkeypatch, tmp_path):
    no_meddx_env(monkeypatch)
    path = tmp_path / "key"
    path.write_text(FILE_SECRET + "\n")  # as `echo` or a Secret's manifest leaves it
    monkeypatch.setenv("MEDDX_PSEUDONYM_KEY_FILE", str(path))
    assert secret.value("MEDDX_PSEUDONYM_KEY") == FILE_SECRET
    # Every reader of a secret goes through it: the pseudonym key, the DICOMweb ones.
    assert pseudonym_key() == FILE_SECRET.encode()
    monkeypatch.setenv("MEDDX_DICOMWEB_USER", "reader")
    monkeypatch.setenv("MEDDX_DICOMWEB_PASSWORD_FILE", str(path))
    assert dicomweb.credentials() == (("reader", FILE_SECRET), None)
    monkeypatch.delenv("MEDDX_DICOMWEB_USER")
    monkeypatch.delenv("MEDDX_DICOMWEB_PASSWORD_FILE")
    monkeypatch.setenv("MEDDX_DICOMWEB_TOKEN_FILE", str(path))
    assert dicomweb.credentials() == (None, FILE_SECRET)
    # Neither set: no secret, as before.
    assert secret.value("MEDDX_NOT_SET") == ""


def test_a_secret_set_twice_or_unreadable_is_one_line_without_its_value(monkeypatch, tmp_path):
    no_meddx_env(monkeypatch)
    path = tmp_path / "key"
    path.write_text(FILE_SECRET)
    monkeypatch.setenv("MEDDX_PSEUDONYM_KEY", "direct-s3cret-Zt40")
    monkeypatch.setenv("MEDDX_PSEUDONYM_KEY_FILE", str(path))
    errors = []
    with pytest.raises(MeddxError) as both:
        pseudonym_key()
    errors.append(str(both.value))
    assert errors[-1] == "set MEDDX_PSEUDONYM_KEY or MEDDX_PSEUDONYM_KEY_FILE, not both"
    monkeypatch.delenv("MEDDX_PSEUDONYM_KEY")
    for content, expected in (
        (None, f"cannot read MEDDX_PSEUDONYM_KEY_FILE ({path}): No such file or directory"),
        (b"", f"MEDDX_PSEUDONYM_KEY_FILE ({path}) is empty"),
        (b"\xff" + FILE_SECRET.encode(), f"MEDDX_PSEUDONYM_KEY_FILE ({path}) is not UTF-8 text"),
    ):
        path.unlink(missing_ok=True)
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(MeddxError) as refused:
            secret.value("MEDDX_PSEUDONYM_KEY")
        errors.append(str(refused.value))
        assert errors[-1] == expected
    path.write_text(FILE_SECRET)
    path.chmod(0)
    if not os.access(path, os.R_OK):  # (root reads it anyway)
        with pytest.raises(MeddxError, match=r"^cannot read .*: Permission denied$"):
            secret.value("MEDDX_PSEUDONYM_KEY")
    assert not [e for e in errors if FILE_SECRET in e or "\n" in e or "direct-s3cret" in e]


def test_the_cli_says_a_secret_set_twice_in_one_line(tmp_path):
    (tmp_path / "token").write_text(FILE_SECRET)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDDX_")}
    env.update(
        MEDDX_DICOMWEB_TOKEN="direct-s3cret-Zt40",
        MEDDX_DICOMWEB_TOKEN_FILE=str(tmp_path / "token"),
    )
    run = subprocess.run(
        [MEDDX, "score", "dicomweb+http://pacs.example.org/dicom-web", "--model", "m.pt",
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(
        "meddx: error: set MEDDX_DICOMWEB_TOKEN or MEDDX_DICOMWEB_TOKEN_FILE, not both"
    )
    assert FILE_SECRET not in run.stderr and "direct-s3cret" not in run.stderr


def test_secrets_in_the_jobs_runtime_env_are_named_in_a_warning(monkeypatch, caplog):
    values = {
        "MEDDX_DICOMWEB_PASSWORD": "pw-in-job-metadata-1",
        "MEDDX_PSEUDONYM_KEY": "key-in-job-metadata-2",
        "AWS_SECRET_ACCESS_KEY": "aws-in-job-metadata-3",
    }
    runtime_env = {
        "env_vars": {
            **values,
            "MEDDX_DICOMWEB_TOKEN_FILE": "/run/secrets/meddx/token",  # a path: fine
            "MEDDX_DICOMWEB_USER": "reader",
        },
        "working_dir": ".",
    }
    line = secret.runtime_env_warning(runtime_env)
    assert line.startswith(
        "AWS_SECRET_ACCESS_KEY, MEDDX_DICOMWEB_PASSWORD, MEDDX_PSEUDONYM_KEY are set in this "
        "Ray job's runtime_env, which Ray keeps in the job's metadata"
    )
    assert "\n" not in line and not [v for v in values.values() if v in line]
    assert "TOKEN" not in line and "USER" not in line
    for fine in (None, {}, {"env_vars": {}}, {"env_vars": {"MEDDX_PSEUDONYM_KEY_FILE": "/k"}}):
        assert secret.runtime_env_warning(fine) is None
    # The driver logs it once Ray is up, from the job's own runtime_env.
    context = type("Context", (), {"runtime_env": runtime_env})()
    monkeypatch.setattr(cluster.ray, "get_runtime_context", lambda: context)
    cluster.warn_secrets_in_runtime_env()
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and record.getMessage() == f"meddx: {line}"
    context.runtime_env = {"env_vars": {"MEDDX_PSEUDONYM_KEY_FILE": "/k"}}
    cluster.warn_secrets_in_runtime_env()
    assert len(caplog.records) == 1
