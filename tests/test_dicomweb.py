"""DICOMweb against servers that misbehave as real ones do: pages capped below the limit
asked, ``offset`` ignored, redirects to another origin, plain http, patient values a
library quotes in its warnings. Each runs against tests/dicomweb_server.py (no Orthanc,
no Ray); tests/test_pacs.py runs the same paths against a real PACS.
"""

from __future__ import annotations

import logging
import os
import subprocess
import warnings

import highdicom as hd
import pyarrow as pa
import pytest

from meddx import MeddxError
from meddx.config import ScoreConfig, ScreenConfig
from meddx.imaging.dicom import pseudonym
from meddx.inputs import dicomweb
from meddx.inputs.storage import StorageSettings
from meddx.model import registry
from meddx.pacs import reports as pacs_reports
from meddx.pacs import results

from .dicomweb_server import Server, element, serving, uids
from .helpers import MEDDX

KEY = b"site-key-for-pseudonyms"
SHA = "ab" * 32
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
TOKEN = "tok-9Qf2-never-printed"
# Patient values that pydicom and highdicom quote in their warnings and errors.
PROBE_NAME, PROBE_BIRTH = "ZQXPROBE KWYNAME", "1931-07-19"


@pytest.fixture(autouse=True)
def credentials(monkeypatch):
    """A bearer token, as a PACS would ask, and nothing else from the environment."""
    for name in list(os.environ):
        if name.startswith("MEDDX_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MEDDX_DICOMWEB_TOKEN", TOKEN)


def listed(server: Server, **kwargs) -> dict[str, str]:
    table = dicomweb.list_instances(server.source, StorageSettings(), KEY, **kwargs)
    return dict(zip(table["image_uri"].to_pylist(), table["locator"].to_pylist(), strict=True))


# ---- QIDO-RS paging -------------------------------------------------------------------


def test_listing_pages_past_a_server_that_caps_its_pages(caplog):
    # 250 studies, 100 a page at most whatever the limit asked (PS3.18 allows it).
    with serving(Server(studies=250, page_cap=100)) as server:
        located = listed(server)
    assert len(located) == 250
    # 100, 100, 50, then the empty page that ends it.
    assert server.requests_to("/studies") == 4
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_listing_ends_when_the_server_ignores_offset(monkeypatch, caplog):
    monkeypatch.setattr(dicomweb, "QIDO_PAGE", 10)
    # Every request answers the first ten studies: offset is ignored.
    with serving(Server(studies=30, ignore_offset=True)) as server:
        located = listed(server)
    assert len(located) == 10
    assert server.requests_to("/studies") == 2  # the second page repeated the first
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    host = server.url.removeprefix("http://")
    # Its series and instance listings ignore it too: one line says how many of each.
    assert warning.startswith(
        f"meddx: DICOMweb server {host} ignores QIDO-RS offset: listings (10 of instances "
        "of a series, 10 of series of a study, 1 of studies) ended on a page it had sent before"
    )
    assert "\n" not in warning and "1.2.826" not in warning  # one line, no UID


def test_listing_stops_at_its_cap_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(dicomweb, "QIDO_MAX_RESULTS", 25)
    with serving(Server(studies=60, page_cap=10)) as server:
        located = listed(server)
    assert len(located) == 25
    assert server.requests_to("/studies") == 3
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "listings (1 of studies) stopped at 25 results" in warning
    # Exactly the cap is no cut: the empty page after it ends the listing quietly.
    caplog.clear()
    with serving(Server(studies=25, page_cap=10)) as server:
        assert len(listed(server)) == 25
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ---- results back: which study, which patient, which values ---------------------------


def metadata(study, series, sop, patient_id, name="Doe^Jane", birth="19700101", header=True):
    """WADO-RS metadata of a 64 x 64 CR; ``header``: the StudyInstanceUID it states
    (True: ``study``; None: none)."""
    meta = {
        "00080016": element("UI", CR_IMAGE),
        "00080018": element("UI", sop),
        "00080060": element("CS", "CR"),
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": name}]},
        "00100020": element("LO", patient_id),
        "00100030": element("DA", birth),
        "00100040": element("CS", "F"),
        "0020000E": element("UI", series),
        "00280002": element("US", 1),
        "00280004": element("CS", "MONOCHROME2"),
        "00280010": element("US", 64),
        "00280011": element("US", 64),
        "00280100": element("US", 16),
    }
    if header is not None:
        meta["0020000D"] = element("UI", study if header is True else header)
    return meta


def scored(server: Server, instances: list[tuple[str, str, str, str | None]]):
    """(rows, located) for scored instances (study, series, sop, the study pseudonym
    their file gave), listed on ``server``."""
    rows, located = [], {}
    for study, series, sop, file_pseudonym in instances:
        uri = f"dicomweb://{server.url.removeprefix('http://')}/instances/{pseudonym(sop, KEY)}"
        located[uri] = " ".join((f"{server.url}/dicom-web", study, series, sop))
        rows.append(
            {"image_uri": uri, "status": "ok", "probs": [0.3, 0.7], "score": 0.7,
             "label": "opacity", "study_pseudonym": file_pseudonym}
        )  # fmt: skip
    return pa.Table.from_pylist(rows), located


@pytest.fixture(scope="module")
def ckpt():
    return registry.untrained_checkpoint("seednet", input_size=64)


def test_reports_are_filed_in_the_study_the_pacs_listed(ckpt):
    (a, a_series, a1), (b, b_series, b1), (c, c_series, c1) = uids(0), uids(1), uids(2)
    a2, c2 = f"{a_series}.2", f"{c_series}.2"
    with serving(Server()) as server:
        server.metadata = {
            # Listed in study A; its header names study B (stale after a reconciliation).
            a1: metadata(a, a_series, a1, "PID-A", header=b),
            a2: metadata(a, a_series, a2, "PID-A", header=None),  # no StudyInstanceUID
            b1: metadata(b, b_series, b1, "PID-B", header=None),
            # One listed study, two patients: no report rather than one under the first.
            c1: metadata(c, c_series, c1, "PID-C1"),
            c2: metadata(c, c_series, c2, "PID-C2"),
        }
        rows, located = scored(
            server,
            [(a, a_series, a1, pseudonym(b, KEY)), (a, a_series, a2, None),
             (b, b_series, b1, ""), (c, c_series, c1, None), (c, c_series, c2, None)],
        )  # fmt: skip
        assert sorted(results.by_study(rows, located, KEY)) == sorted(
            pseudonym(u, KEY) for u in (a, b, c)
        )
        sent = results.send(server.source, rows, located, ckpt, SHA, StorageSettings(), KEY)
    assert (sent.studies, sent.instances) == (2, 3)
    assert sent.failed == (
        f"study {pseudonym(c, KEY)}: its instances differ in PatientID: no report",
    )
    reports = {ds.StudyInstanceUID: ds for ds in server.stored_datasets()}
    assert set(reports) == {a, b}
    assert reports[a].PatientID == "PID-A" and reports[b].PatientID == "PID-B"
    for study, expected in ((a, {a1, a2}), (b, {b1})):
        sr = hd.sr.ComprehensiveSR.from_dataset(reports[study])
        referenced = {
            image.referenced_sop_instance_uid
            for group in sr.content.get_image_measurement_groups()
            for image in group.source_images
        }
        assert referenced == expected
    # Named by the listed study's pseudonym, as the SR's series UID derives from it.
    assert reports[a].SeriesInstanceUID == pacs_reports.uid("series", pseudonym(a, KEY), SHA)


def test_no_patient_value_reaches_a_warning_a_log_or_the_failure_line(ckpt, caplog, capfd):
    for name in ("pydicom", "highdicom"):  # their INFO lines name UIDs: none may show
        caplog.set_level(logging.DEBUG, logger=name)
    (a, a_series, a1), (b, b_series, b1) = uids(0), uids(1)
    with serving(Server()) as server:
        server.metadata = {
            # A date that is no DICOM date: pydicom warns with it, highdicom refuses it.
            a1: metadata(a, a_series, a1, "PID-A", name=PROBE_NAME, birth=PROBE_BIRTH),
            # A one-part name in capitals: highdicom warns with it, and builds the report.
            b1: metadata(b, b_series, b1, "PID-B", name=PROBE_NAME),
        }
        rows, located = scored(server, [(a, a_series, a1, None), (b, b_series, b1, None)])
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            sent = results.send(server.source, rows, located, ckpt, SHA, StorageSettings(), KEY)
    assert (sent.studies, sent.instances) == (1, 1)
    assert sent.failed == (
        f"study {pseudonym(a, KEY)}: ValueError building the report; invalid PatientBirthDate",
    )
    line = results.describe(sent, server.source)  # what the alarm, summary and report hold
    out, err = capfd.readouterr()
    said = [line, *sent.failed, out, err, caplog.text, *(str(w.message) for w in shown)]
    for probe in (PROBE_NAME, PROBE_BIRTH, "ZQXPROBE", "PID-A", a, a1, b1):
        assert not [text for text in said if probe in text], probe
    assert shown == [] and caplog.records == []
    # The libraries' own levels are back as they were.
    assert logging.getLogger("pydicom").level == logging.DEBUG


# ---- redirects ------------------------------------------------------------------------


def test_a_redirect_to_another_origin_is_refused_in_one_line(ckpt):
    with serving(Server()) as elsewhere:
        host = lambda server: server.url.removeprefix("http://")  # noqa: E731
        refused = f"redirected to another origin (http://{host(elsewhere)}): not followed"
        # STOW-RS: a 307 would have the report, patient module and all, POSTed elsewhere.
        with serving(Server(redirect_to=elsewhere.url, redirect_methods=("POST",))) as pacs:
            study, series, sop = uids(0)
            pacs.metadata = {sop: metadata(study, series, sop, "PID-A")}
            rows, located = scored(pacs, [(study, series, sop, None)])
            sent = results.send(pacs.source, rows, located, ckpt, SHA, StorageSettings(), KEY)
            assert sent.failed == (
                f"study {pseudonym(study, KEY)}: DICOMweb server {host(pacs)} {refused}",
            )
        # QIDO-RS and WADO-RS: the listing fails in one line; an instance is an error row.
        with serving(Server(studies=3, redirect_to=elsewhere.url)) as pacs:
            with pytest.raises(MeddxError) as listing:
                listed(pacs)
            assert str(listing.value) == f"DICOMweb server {host(pacs)} {refused}"
            locator = " ".join((f"{pacs.url}/dicom-web", *uids(0)))
            data, error = dicomweb.read(locator, StorageSettings(), 2**20)
            assert data == b"" and error == f"DICOMweb server {host(pacs)} {refused}"
    assert elsewhere.seen == []


def test_a_redirect_within_the_origin_is_followed():
    with serving(Server(studies=3)) as server:
        located = dicomweb.list_instances(
            f"dicomweb+{server.url}/moved/dicom-web", StorageSettings(), KEY
        )
    assert len(located) == 3
    assert server.requests_to("/studies") == 4  # 2 redirected + 2 answered


def test_an_origin_is_scheme_host_and_port():
    assert dicomweb.origin("http://PACS:80/a") == dicomweb.origin("http://pacs/b")
    assert dicomweb.origin("https://pacs/a") != dicomweb.origin("http://pacs/a")
    assert dicomweb.origin("http://pacs:8042/a") != dicomweb.origin("http://pacs:8043/a")
    assert dicomweb.origin("http://pacs:99999/a")[2] is None  # no port: never the same


# ---- credentials over plain http ------------------------------------------------------


def config(input: str, **kwargs) -> ScoreConfig:
    return ScoreConfig(input=input, model="m.pt", out="o", **kwargs)


def test_credentials_go_over_plain_http_only_to_loopback_or_when_allowed(monkeypatch, tmp_path):
    remote = "dicomweb+http://pacs.example.org:8042/dicom-web"
    with pytest.raises(MeddxError) as refused:
        config(remote)
    assert str(refused.value) == (
        "refusing to send DICOMweb credentials (MEDDX_DICOMWEB_TOKEN) over plain http to "
        "pacs.example.org:8042: use dicomweb+https://, or --allow-insecure-http on a "
        "network you trust"
    )
    with pytest.raises(MeddxError, match="over plain http to pacs.example.org"):
        ScreenConfig(input=remote, model="m.pt", out="o")
    with pytest.raises(MeddxError, match="over plain http to pacs.example.org"):
        config("dicomweb+https://pacs.example.org/dicom-web", results_to=remote)
    assert config(remote, allow_insecure_http=True).allow_insecure_http
    assert ScreenConfig(input=remote, model="m.pt", out="o", allow_insecure_http=True)
    for fine in (
        "dicomweb+https://pacs.example.org/dicom-web",
        "dicomweb+http://127.0.0.1:8042/dicom-web",
        "dicomweb+http://localhost:8042/dicom-web",
        "dicomweb+http://[::1]:8042/dicom-web",
    ):
        config(fine)
    # Basic credentials too, and a secret given as a file.
    monkeypatch.delenv("MEDDX_DICOMWEB_TOKEN")
    (tmp_path / "pw").write_text("pw-never-printed\n")
    monkeypatch.setenv("MEDDX_DICOMWEB_USER", "reader")
    monkeypatch.setenv("MEDDX_DICOMWEB_PASSWORD_FILE", str(tmp_path / "pw"))
    with pytest.raises(MeddxError, match=r"credentials \(MEDDX_DICOMWEB_USER\) over plain"):
        config(remote)
    # Without credentials there is nothing to protect here.
    monkeypatch.delenv("MEDDX_DICOMWEB_USER")
    monkeypatch.delenv("MEDDX_DICOMWEB_PASSWORD_FILE")
    config(remote)
    # The results server is held to it as well, when called as a library.
    monkeypatch.setenv("MEDDX_DICOMWEB_TOKEN", TOKEN)
    with pytest.raises(MeddxError, match="over plain http"):
        results.send(remote, pa.table({}), {}, None, SHA, StorageSettings(), KEY)


def test_the_cli_refuses_credentials_over_plain_http_unless_allowed(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDDX_")}
    env["MEDDX_DICOMWEB_TOKEN"] = TOKEN
    remote = "dicomweb+http://pacs.example.org/dicom-web"
    missing = str(tmp_path / "no-such-model.pt")

    def meddx(*args):
        return subprocess.run(
            [MEDDX, *args, "--model", missing, "--out", str(tmp_path / "o")],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip

    for args in (("score", remote), ("screen", remote),
                 ("score", remote.replace("http:", "https:"), "--results-to", remote)):  # fmt: skip
        run = meddx(*args)
        assert run.returncode == 2, run.stderr
        assert run.stderr.count("\n") == 1, run.stderr
        assert run.stderr.startswith(
            "meddx: error: refusing to send DICOMweb credentials (MEDDX_DICOMWEB_TOKEN) over "
            "plain http to pacs.example.org"
        ), run.stderr
        assert TOKEN not in run.stderr + run.stdout
    # The flag lets it through: the next check (the checkpoint) is what stops it.
    run = meddx("score", remote, "--allow-insecure-http")
    assert run.returncode == 1 and run.stderr == f"meddx: error: checkpoint not found: {missing}\n"
