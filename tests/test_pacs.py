"""A PACS as source and target: DICOMweb against a real Orthanc (tests/pacs.py).

Seeded with detector-size JPEG 2000 DICOMs (meddx synth) over STOW-RS: five studies, one
of them with two series, three studies from today and two from 2020.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from meddx.config import SynthConfig
from meddx.imaging.dicom import pseudonym
from meddx.inputs import dicomweb
from meddx.inputs.storage import StorageSettings
from meddx.model import registry
from meddx.store import audit
from meddx.synthetic.chest import write_archive

from . import pacs as pacs_mod
from .helpers import processes_of_ray_session, trained_seednet
from .leaks import files_under, leaks, leaks_in_tree
from .s3_faults import FaultRules, FaultyS3Proxy

MEDDX = str(Path(sys.executable).with_name("meddx"))
KEY = "site-key-for-pseudonyms"
RECENT = 4  # instances in studies of today
# Patient values that pydicom and highdicom quote in their warnings and errors: a name
# of one part in capitals, and a birth date that is no DICOM date (DA is YYYYMMDD).
PROBE_NAME, PROBE_BIRTH = "ZQXPROBE KWYNAME", "1931-07-19"

pytestmark = pytest.mark.skipif(
    pacs_mod.missing() is not None, reason=f"NO PACS TESTS: {pacs_mod.missing()}"
)


@pytest.fixture(scope="module")
def films(tmp_path_factory) -> list[Path]:
    """Six detector-size films; film 1 joins film 0's study in a series of its own."""
    folder = tmp_path_factory.mktemp("films")
    write_archive(
        SynthConfig(
            out=str(folder / "synth"), n=6, size=2048, height=2500, format="dicom-j2k", seed=11
        )
    )
    files = sorted((folder / "synth").rglob("*.dcm"), key=lambda p: p.name)
    first = pydicom.dcmread(files[0])
    today = dt.date.today().strftime("%Y%m%d")
    out = []
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        if i == 1:
            ds.StudyInstanceUID, ds.PatientID = first.StudyInstanceUID, first.PatientID
        ds.StudyDate = ds.SeriesDate = today if i < RECENT else "20200101"
        target = folder / f"film-{i}.dcm"
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "seednet.pt"
    registry.save_checkpoint(trained_seednet(64), str(path), StorageSettings())
    return str(path)


@pytest.fixture
def pacs(tmp_path, films):
    with pacs_mod.orthanc_server(tmp_path / "orthanc") as server:
        pacs_mod.store(server, films)
        yield server


def env(password: str = pacs_mod.PASSWORD) -> dict[str, str]:
    return {
        **os.environ,
        "MEDDX_PSEUDONYM_KEY": KEY,
        "MEDDX_DICOMWEB_USER": pacs_mod.USER,
        "MEDDX_DICOMWEB_PASSWORD": password,
        "MEDDX_QUIET_WORKERS": "1",
    }


def meddx(*args, password: str = pacs_mod.PASSWORD):
    return subprocess.run(
        [MEDDX, *args], capture_output=True, text=True, env=env(password), timeout=600
    )


def rows_of(out: Path):
    return pq.read_table(out / f"dt={dt.date.today().isoformat()}").to_pylist()


COMPREHENSIVE_SR, SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.7"


def sr_instances(pacs, sop_class: str = COMPREHENSIVE_SR) -> list[dict]:
    url = f"{pacs.dicomweb}/instances"
    return pacs.session().get(url, params={"SOPClassUID": sop_class}).json()


def needles(films) -> dict[str, bytes]:
    """What must never reach OUT or a log: UIDs, patient identifiers, the password."""
    found = {"password": pacs_mod.PASSWORD.encode(), "pseudonym key": KEY.encode()}
    for path in films:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID"):
            found[f"{keyword} of {path.name}"] = str(ds.data_element(keyword).value).encode()
    found["PatientName"] = b"Synthetic^Film"
    return found


def dataset_sha256(path: Path) -> str:
    """The content hash of a PACS instance: of its file's bytes after the 128-byte
    preamble, "DICM" and the file meta group (its group length element, 12 bytes, then
    the length it gives), which each server writes its own way."""
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    start = 128 + 4 + 12 + meta.FileMetaInformationGroupLength
    return hashlib.sha256(path.read_bytes()[start:]).hexdigest()


def assert_nothing_leaked(secret: dict[str, bytes], out: Path, ray_dir: Path, runs) -> None:
    """None of ``secret`` in OUT, in the Ray session's files (its logs among them) or in
    what the ``runs`` printed."""
    assert leaks_in_tree(out, secret) == []
    assert len(files_under(ray_dir / "logs")) > 10
    assert leaks_in_tree(ray_dir, secret) == []
    for r in runs:
        assert leaks("stdout", r.stdout.encode(), secret) == []
        assert leaks("stderr", r.stderr.encode(), secret) == []


def test_scoring_a_pacs_gives_a_row_per_instance_and_a_report_in_each_study(
    pacs, films, checkpoint, tmp_path
):
    out = tmp_path / "out"
    args = ("score", pacs.source, "--model", checkpoint, "--out", str(out), "--quiet")
    run = meddx(*args, "--results-to", pacs.source)
    assert run.returncode == 0, run.stderr[-3000:]
    ray_dir = Path("/tmp/ray/session_latest").resolve()  # the run's own Ray: its logs
    assert "inputs=6 ok=6 errors=0 rows_written=6" in run.stdout
    # The command stopped the Ray it started (cluster.stop_ray) before it exited.
    assert processes_of_ray_session(ray_dir.name) == []
    assert "results: 5 reports on 6 instances stored on 127.0.0.1:" in run.stdout
    rows = {r["image_uri"]: r for r in rows_of(out)}
    assert len(rows) == 6
    host = pacs.http.removeprefix("http://")
    by_sop = {}
    for path in films:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uri = f"dicomweb://{host}/instances/{pseudonym(ds.SOPInstanceUID, KEY.encode())}"
        row = rows[uri]  # the keyed pseudonym, never the UID
        # WADO-RS brought the stored dataset: JPEG 2000, not transcoded by the server.
        assert row["content_sha256"] == dataset_sha256(path)
        assert row["transfer_syntax"] == "1.2.840.10008.1.2.4.90" and row["status"] == "ok"
        by_sop[ds.SOPInstanceUID] = row
    # One SR per study, in its study, found by QIDO-RS; its content is the Parquet's.

    studies = {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in films}
    assert len(sr_instances(pacs)) == len(studies) == 5
    # The audit log names each study reported by its pseudonym (an SR's UIDs follow from
    # it), and the target without credentials or query values (meddx.store.audit).
    (record,) = audit.runs(str(out), StorageSettings())
    assert record["reports_stored"] == 5 and record["results_to"] == audit.shown(pacs.source)
    assert sorted(record["reported_studies"]) == sorted(pseudonym(s, KEY.encode()) for s in studies)
    session = pacs.session()
    client = DICOMwebClient(pacs.dicomweb, session=pacs.session())
    seen = set()
    for study in studies:
        series = session.get(
            f"{pacs.dicomweb}/studies/{study}/series", params={"Modality": "SR"}
        ).json()
        assert len(series) == 1
        assert series[0]["0008103E"]["Value"] == [dicomweb.RESULTS_SERIES]
        series_uid = series[0]["0020000E"]["Value"][0]
        (instance,) = client.search_for_instances(study, series_uid)
        ds = client.retrieve_instance(study, series_uid, instance["00080018"]["Value"][0])
        assert ds.StudyInstanceUID == study and ds.PatientName == "Synthetic^Film"
        sr = hd.sr.ComprehensiveSR.from_dataset(ds)
        for group in sr.content.get_image_measurement_groups():
            (source,) = group.source_images
            row = by_sop[source.referenced_sop_instance_uid]
            seen.add(source.referenced_sop_instance_uid)
            (measurement,) = group.get_measurements()
            assert measurement.name.value == "opacity"
            assert measurement.value == pytest.approx(row["score"], abs=1e-6)
            (decision,) = group.get_qualitative_evaluations()
            assert decision.value.meaning == ("Present" if row["label"] == "opacity" else "Absent")
            # TID 4019 Algorithm Identification: DCM 111001 Name, 111003 Version.
            names = {
                item.ConceptNameCodeSequence[0].CodeValue: item.TextValue
                for item in group[0].ContentSequence  # the group's container
                if item.ValueType == "TEXT"
            }
            assert names.get("111001") == "seednet", names
            assert names.get("111003") == f"sha256:{row['model_sha256']}", names
    assert seen == set(by_sop)
    # Again: the same SRs, so no second copy in the PACS.
    again = meddx(*args, "--results-to", pacs.source)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(sr_instances(pacs)) == 5
    # No UID, patient identifier or credential in OUT or what the runs printed.
    assert_nothing_leaked(needles(films), out, ray_dir, (run, again))


def probe_film(like: Path, target: Path) -> Path:
    """A film of a study of its own, today, whose patient has the probe values."""
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(like)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID, ds.PatientName = "PROBE-PID-5521", PROBE_NAME
    with pytest.warns(UserWarning, match="Invalid value for VR DA"):
        ds.PatientBirthDate = PROBE_BIRTH
    ds.save_as(target, enforce_file_format=True)
    return target


def test_screening_a_pacs_scores_the_recent_studies_once(pacs, films, checkpoint, tmp_path):
    # One more study of today, with the probe patient: its SR cannot be built (the birth
    # date), and the night's alarm, page, summary and logs say so without a value.
    probe = probe_film(films[3], tmp_path / "probe.dcm")
    pacs_mod.store(pacs, [probe])
    out = tmp_path / "night"
    args = ("screen", pacs.source, "--model", checkpoint, "--out", str(out), "--quiet")
    night = (*args, "--since", "2", "--results-to", pacs.source, "--results-heatmaps")
    first = meddx(*night)
    ray_dir = Path("/tmp/ray/session_latest").resolve()  # the night's own Ray: its logs
    assert first.returncode == 3, first.stderr[-3000:]
    study = pseudonym(pydicom.dcmread(probe).StudyInstanceUID, KEY.encode())
    # The alarm, in one line: which study, the exception's type and the attribute's name.
    (alarm,) = [line for line in first.stderr.splitlines() if line.startswith("meddx:")]
    assert alarm == (
        "meddx: alarm: 1 studies' reports were not stored: results: 3 reports on 4 "
        f"instances stored on {pacs.http.removeprefix('http://')}; 1 not stored, first: "
        f"study {study}: ValueError building the report; invalid PatientBirthDate"
    )
    summary = json.loads(next(out.glob("_runs/dt=*/summary.json")).read_text())
    assert summary["reports_failed"] == 1 and summary["reports_stored"] == 3
    assert summary["new_inputs"] == RECENT + 1
    second = meddx(*night)
    assert second.returncode == 0, second.stderr[-3000:]
    # The results series (SR and heatmaps) are not inputs.
    assert f"inputs_seen={RECENT + 1} new=0 rows=0" in second.stdout
    assert len(sr_instances(pacs)) == 3
    # --results-heatmaps: each study's top finding as a Secondary Capture, in the SR's series.
    heatmaps = sr_instances(pacs, SECONDARY_CAPTURE)
    assert len(heatmaps) == 3
    client = DICOMwebClient(pacs.dicomweb, session=pacs.session())
    uids = [heatmaps[0][tag]["Value"][0] for tag in ("0020000D", "0020000E", "00080018")]
    sc = client.retrieve_instance(*uids)
    assert sc.pixel_array.shape == (64, 64, 3) and sc.PatientName == "Synthetic^Film"
    assert sc.SeriesDescription == dicomweb.RESULTS_SERIES
    (sr,) = client.search_for_instances(
        uids[0], uids[1], search_filters={"SOPClassUID": COMPREHENSIVE_SR}
    )
    assert sr
    assert len(rows_of(out)) == RECENT + 1
    secret = needles([*films, probe])
    secret.update(probe_name=PROBE_NAME.encode(), probe_birth_date=PROBE_BIRTH.encode())
    secret.update(probe_name_part=b"KWYNAME", probe_birth_date_digits=b"19310719")
    written = {p.name for p in files_under(out / "_runs")}
    assert {"report.html", "summary.json"} <= written
    assert_nothing_leaked(secret, out, ray_dir, (first, second))


def test_a_wrong_password_is_one_line(pacs, checkpoint, tmp_path):
    run = meddx(
        "score", pacs.source, "--model", checkpoint, "--out", str(tmp_path / "o"),
        password="not-the-password",
    )  # fmt: skip
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1, run.stderr
    assert "refused the credentials (HTTP 401)" in run.stderr
    assert "not-the-password" not in run.stderr + run.stdout
    assert not (tmp_path / "o" / f"dt={dt.date.today().isoformat()}").exists()


def test_503s_and_cut_bodies_on_retrieval_still_give_a_row_per_instance(
    pacs, films, checkpoint, tmp_path
):
    # Every instance's first retrieval answers 503, its second is cut half way.
    rules = FaultRules(transient={"/instances/": ["503", "truncate"]})
    with FaultyS3Proxy(pacs.http, rules) as proxy:
        run = meddx(
            "score", f"dicomweb+{proxy.url}/dicom-web", "--model", checkpoint,
            "--out", str(tmp_path / "out"), "--quiet",
        )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "inputs=6 ok=6 errors=0 rows_written=6" in run.stdout
    assert proxy.injected["503"] == 6 and proxy.injected["truncate"] == 6


def test_tls_is_verified_and_a_site_ca_can_be_given(pacs, films, checkpoint, tmp_path):
    # HTTPS in front of the PACS, its certificate signed by a site CA no system trusts.
    # (Debian's Orthanc 1.10 resets TLS connections after the handshake.)
    ca, cert, key = pacs_mod.site_ca(tmp_path / "tls")
    with FaultyS3Proxy(pacs.http, tls=(cert, key)) as https:
        patient = pydicom.dcmread(films[2], stop_before_pixels=True).PatientID
        source = f"dicomweb+{https.url}/dicom-web?PatientID={patient}"
        args = ("score", source, "--model", checkpoint, "--quiet")
        refused = meddx(*args, "--out", str(tmp_path / "refused"))
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
        assert "TLS verification failed for DICOMweb server 127.0.0.1:" in refused.stderr
        trusted = meddx(*args, "--out", str(tmp_path / "out"), "--ca-bundle", str(ca))
    assert trusted.returncode == 0, trusted.stderr[-3000:]
    assert "inputs=1 ok=1 errors=0 rows_written=1" in trusted.stdout


def test_listing_pages_through_every_level(pacs, films, monkeypatch):
    monkeypatch.setattr(dicomweb, "QIDO_PAGE", 2)
    monkeypatch.setenv("MEDDX_DICOMWEB_USER", pacs_mod.USER)
    monkeypatch.setenv("MEDDX_DICOMWEB_PASSWORD", pacs_mod.PASSWORD)
    table = dicomweb.list_instances(pacs.source, StorageSettings(), KEY.encode())
    assert table.schema == dicomweb.LOCATED_SCHEMA
    located = dicomweb.locators_of(table, table["image_uri"])
    assert len(located) == 6
    assert all(
        re.fullmatch(r"dicomweb://127\.0\.0\.1:\d+/instances/[0-9a-f]{32}", u) for u in located
    )
    recent = dicomweb.list_instances(pacs.source, StorageSettings(), KEY.encode(), since_days=2)
    assert len(recent) == RECENT
    # The query's own filters are the QIDO-RS study-level matching.
    (one,) = dicomweb.list_instances(
        f"{pacs.source}?PatientID={pydicom.dcmread(films[2]).PatientID}",
        StorageSettings(),
        KEY.encode(),
    ).to_pylist()
    assert located[one["image_uri"]] == one["locator"]


def test_a_truncated_multipart_body_is_told_from_a_whole_one():
    whole = b"--b1\r\nContent-Type: application/dicom\r\n\r\nDICM-bytes\r\n--b1--\r\n"
    kind = 'multipart/related; type="application/dicom"; boundary=b1'
    assert dicomweb.single_part(kind, whole) == b"DICM-bytes"
    with pytest.raises(dicomweb.Truncated):
        dicomweb.single_part(kind, whole[:-12])
    assert np.all([dicomweb.transient(dicomweb.Truncated())])


def test_credentials_in_the_url_or_results_without_a_pacs_are_refused(tmp_path):
    from meddx import MeddxError

    with pytest.raises(MeddxError, match="credentials do not belong in the URL"):
        dicomweb.endpoint("dicomweb+http://user:pw@pacs:8042/dicom-web")
    run = meddx(
        "score", str(tmp_path), "--model", "m.pt", "--out", str(tmp_path / "o"),
        "--results-to", "dicomweb+http://pacs/dicom-web",
    )  # fmt: skip
    assert run.returncode == 2
    assert "--results-to needs a PACS INPUT (DICOMweb or DIMSE)" in run.stderr
