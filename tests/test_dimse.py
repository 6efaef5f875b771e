"""A PACS over DIMSE as a source: C-FIND, C-GET and C-MOVE against a real Orthanc
(tests/pacs.py).

One Orthanc for the module, seeded as test_pacs.py seeds its own (six detector-size
JPEG 2000 films, five studies, four films of today), and one more that allows no C-GET.
What a DIMSE listing finds and what it retrieves must be what the same PACS gives over
DICOMweb: the same instances, the same content hashes.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import tempfile
from pathlib import Path

import pydicom
import pytest
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from meddx import MeddxError
from meddx.inputs import dicomweb, dimse, listing, reading
from meddx.inputs.storage import StorageSettings

from . import pacs as pacs_mod
from .helpers import free_port
from .test_pacs import (
    KEY,
    RECENT,
    assert_nothing_leaked,
    checkpoint,  # noqa: F401 (a fixture)
    dataset_sha256,
    films,  # noqa: F401 (a fixture)
    meddx,
    needles,
    rows_of,
)

pytestmark = pytest.mark.skipif(
    pacs_mod.missing() is not None, reason=f"NO PACS TESTS: {pacs_mod.missing()}"
)

# What Orthanc lets a DIMSE peer do: find and get for any calling AE title; a called AE
# title other than its own is rejected.
DIMSE_RIGHTS = {
    "DicomAet": "ORTHANC",
    "DicomCheckCalledAet": True,
    "DicomAlwaysAllowFind": True,
    "DicomAlwaysAllowGet": True,
}
MOVE_AE = "MEDDX-MOVE"  # where a C-MOVE sends to: the run's receiver, as Orthanc knows it


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, films):  # noqa: F811 (the fixture imported above)
    folder = tmp_path_factory.mktemp("orthanc")
    with pacs_mod.orthanc_server(folder, extra=DIMSE_RIGHTS) as server:
        pacs_mod.store(server, films)
        yield server


def source(pacs, query: str = "", ae_title: str = "ORTHANC") -> str:
    return f"dimse://{ae_title}@127.0.0.1:{pacs.dicom_port}" + (f"?{query}" if query else "")


def listed(uri: str, **kwargs) -> dict[str, str]:
    """{image_uri: locator} of a PACS listing, in this process."""
    _, located = listing.list_located(uri, StorageSettings(), KEY.encode(), **kwargs)
    return dict(zip(located["image_uri"].to_pylist(), located["locator"].to_pylist(), strict=True))


def instance_of(uri: str) -> str:
    return uri.rsplit("/", 1)[1]


def test_screening_over_dimse_scores_what_dicomweb_scores_once(
    pacs,
    films,  # noqa: F811
    checkpoint,  # noqa: F811
    tmp_path,
):
    by_dimse, by_dicomweb = tmp_path / "dimse", tmp_path / "dicomweb"
    args = ("--model", checkpoint, "--since", "2", "--quiet")
    night = meddx("screen", source(pacs), "--out", str(by_dimse), *args)
    ray_dir = Path("/tmp/ray/session_latest").resolve()  # the night's own Ray: its logs
    assert night.returncode == 0, night.stderr[-3000:]
    web = meddx("screen", pacs.source, "--out", str(by_dicomweb), *args)
    assert web.returncode == 0, web.stderr[-3000:]
    rows, web_rows = rows_of(by_dimse), rows_of(by_dicomweb)
    assert len(rows) == len(web_rows) == RECENT
    assert {r["status"] for r in rows} == {"ok"}
    assert all(
        re.fullmatch(rf"dimse://127\.0\.0\.1:{pacs.dicom_port}/instances/[0-9a-f]{{32}}", r)
        for r in (row["image_uri"] for row in rows)
    )
    # The same instances (named by the same keyed pseudonyms), the same datasets: C-GET
    # brought the JPEG 2000 the PACS stores, untranscoded, as WADO-RS does.
    hashes = {(instance_of(r["image_uri"]), r["content_sha256"]) for r in rows}
    assert hashes == {(instance_of(r["image_uri"]), r["content_sha256"]) for r in web_rows}
    assert {sha for _, sha in hashes} == {dataset_sha256(p) for p in films[:RECENT]}
    assert {r["transfer_syntax"] for r in rows} == {"1.2.840.10008.1.2.4.90"}
    assert {r["score"] for r in rows} == {r["score"] for r in web_rows}
    again = meddx("screen", source(pacs), "--out", str(by_dimse), *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"inputs_seen={RECENT} new=0 rows=0" in again.stdout
    assert len(rows_of(by_dimse)) == RECENT
    assert_nothing_leaked(needles(films), by_dimse, ray_dir, (night, again))


def results_series_and_report(like: Path, folder: Path) -> list[Path]:
    """Two instances in the study of ``like`` that are no input: an image in meddx's
    results series, and a report (modality SR) in a series of its own."""
    out = []
    for name, modality, description in (
        ("results.dcm", "OT", dicomweb.RESULTS_SERIES),
        ("report.dcm", "SR", "a report"),
    ):
        ds = pydicom.dcmread(like)
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Modality, ds.SeriesDescription = modality, description
        ds.save_as(folder / name, enforce_file_format=True)
        out.append(folder / name)
    return out


def test_the_query_narrows_the_listing_and_results_are_no_inputs(
    pacs,
    films,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    monkeypatch.setenv(dicomweb.USER_ENV, pacs_mod.USER)
    monkeypatch.setenv(dicomweb.PASSWORD_ENV, pacs_mod.PASSWORD)
    pacs_mod.store(pacs, results_series_and_report(films[0], tmp_path))
    every = listed(source(pacs))
    assert len(every) == len(films)
    # What DICOMweb lists of the same PACS: the same instances, by the same pseudonyms.
    assert {instance_of(u) for u in every} == {instance_of(u) for u in listed(pacs.source)}
    # The locator: the peer, then the UIDs C-GET needs (never written out).
    first = pydicom.dcmread(films[0], stop_before_pixels=True)
    (locator,) = [v for v in every.values() if first.SOPInstanceUID in v]
    peer, study, series, sop, sop_class = dimse.locator_parts(locator)
    assert peer.where == f"ORTHANC@127.0.0.1:{pacs.dicom_port}"
    assert (study, series, sop, sop_class) == (
        first.StudyInstanceUID,
        first.SeriesInstanceUID,
        first.SOPInstanceUID,
        first.SOPClassUID,
    )
    assert len(listed(source(pacs), since_days=2)) == RECENT
    assert len(listed(source(pacs, "StudyDate=20200101-20201231"))) == len(films) - RECENT
    modalities = [pydicom.dcmread(p, stop_before_pixels=True).Modality for p in films]
    assert len(listed(source(pacs, "ModalitiesInStudy=CR"))) == modalities.count("CR") > 0
    assert len(listed(source(pacs, "ModalitiesInStudy=CR,DX"))) == len(films)
    assert listed(source(pacs, "ModalitiesInStudy=CT")) == {}
    patient = pydicom.dcmread(films[2], stop_before_pixels=True).PatientID
    assert len(listed(source(pacs, f"PatientID={patient}"))) == 1


def test_a_level_with_too_many_answers_is_cut_with_a_warning(pacs, monkeypatch, caplog):
    monkeypatch.setattr(dicomweb, "QIDO_MAX_RESULTS", 1)
    with caplog.at_level(logging.WARNING, logger="meddx"):
        found = listed(source(pacs, "StudyDate=20200101-20201231"))  # two studies
    # One study, its one instance: the association went on after the cancelled C-FIND.
    assert len(found) == 1
    (warning,) = [r.getMessage() for r in caplog.records if "C-FIND" in r.getMessage()]
    assert "stopped at 1, the most meddx lists at one level" in warning
    assert "1 of studies" in warning


def test_answers_without_a_usable_uid_are_skipped_and_counted():
    from collections import Counter

    cut: Counter = Counter()
    finder = dimse.Finder(None, "", cut)
    answers = []
    for value in (None, "", ["1.2.3", "1.2.4"], "1.2 3", "1.2.840.5"):
        ds = Dataset()
        if value is not None:  # as a PACS may send it: not validated
            ds.add(DataElement(0x0020000D, "UI", value, validation_mode=config.IGNORE))
        answers.append(ds)
    usable = [finder.usable(a, "studies", "StudyInstanceUID") for a in answers]
    assert usable == [(None,)] * 4 + [("1.2.840.5",)]
    assert cut == Counter({("unusable", "studies"): 4})


def test_retrieval_refuses_what_is_too_large_or_missing_in_one_line(
    pacs,
    films,  # noqa: F811
):
    every = listed(source(pacs))
    locator = next(iter(every.values()))
    data, error = dimse.read(locator, StorageSettings(), 10**9)
    assert error == "" and data[128:132] == b"DICM"
    data, error = dimse.read(locator, StorageSettings(), 1000)
    assert data == b"" and error.endswith("is over the limit of 1,000 (--max-object-bytes)")
    *head, sop, sop_class = locator.split(" ")
    gone = " ".join((*head, generate_uid(), sop_class))
    data, error = dimse.read(gone, StorageSettings(), 10**9)
    assert data == b"" and error.startswith("C-GET from ORTHANC@127.0.0.1:")
    assert "\n" not in error and not any(uid in error for uid in locator.split(" ")[1:])
    # A DIMSE instance whose locator this run does not hold is a row, not a crash.
    (result,) = reading.fetch_all([next(iter(every))], StorageSettings(), 10**9, {})
    assert result == (b"", "a DIMSE instance is read only in the run that listed it")


def test_peers_that_refuse_or_are_not_there_and_bad_urls_are_one_line(
    pacs,
    checkpoint,  # noqa: F811
    tmp_path,
):
    out = str(tmp_path / "out")
    cases = (
        (source(pacs, ae_title="NOT-ORTHANC"), "rejected the association"),
        (f"dimse://ORTHANC@127.0.0.1:{free_port()}", "cannot be reached"),
        (source(pacs, "NoSuchKeyword=1"), "not a DICOM keyword in the query: 'NoSuchKeyword'"),
        (f"dimse://127.0.0.1:{pacs.dicom_port}", "a DIMSE peer needs an AE title and a host"),
        ("dimse://ORTHANC@127.0.0.1:port", "not a port in"),
    )
    for uri, says in cases:
        run = meddx("score", uri, "--model", checkpoint, "--out", out, "--quiet")
        assert run.returncode != 0 and run.stderr.count("\n") == 1, run.stderr
        assert says in run.stderr and "Traceback" not in run.stderr, run.stderr
    # A peer that refuses, retried and then told in the row's one line.
    locator = next(iter(listed(source(pacs)).values()))
    refused = locator.replace("ORTHANC@", "NOT-ORTHANC@", 1)
    data, error = dimse.read(refused, StorageSettings(), 10**9)
    assert data == b"" and error == (
        f"NOT-ORTHANC@127.0.0.1:{pacs.dicom_port} rejected the association "
        "(is meddx's AE title known to it?)"
    )
    assert not (tmp_path / "out" / f"dt={dt.date.today().isoformat()}").exists()


def test_a_pacs_that_allows_only_c_move_is_read_through_the_runs_receiver(
    films,  # noqa: F811
    checkpoint,  # noqa: F811
    tmp_path,
):
    move_port, out = free_port(), tmp_path / "out"
    rights = {
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowMove": True,  # and no C-GET
        "DicomModalities": {"meddx": [MOVE_AE, "127.0.0.1", move_port]},
    }
    spools = set(Path(tempfile.gettempdir()).glob("meddx-spool-*"))
    with pacs_mod.orthanc_server(tmp_path / "orthanc", extra=rights) as pacs:
        pacs_mod.store(pacs, films)
        by_move = source(pacs, f"retrieve=move&move_to={MOVE_AE}&move_port={move_port}")
        run = meddx("score", by_move, "--model", checkpoint, "--out", str(out), "--quiet")
        ray_dir = Path("/tmp/ray/session_latest").resolve()
        # C-GET is refused here; and C-MOVE without the run's receiver has nowhere to go.
        (locator, *_) = listed(by_move).values()
        _, error = dimse.read(locator.replace(by_move, source(pacs)), StorageSettings(), 10**9)
        assert "during C-GET" in error
        _, error = dimse.read(locator, StorageSettings(), 10**9)
        assert error == "retrieve=move: the run's C-MOVE receiver is not on this node, or gone"
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"inputs={len(films)} ok={len(films)} errors=0" in run.stdout
    rows = rows_of(out)
    assert {r["content_sha256"] for r in rows} == {dataset_sha256(p) for p in films}
    assert {r["transfer_syntax"] for r in rows} == {"1.2.840.10008.1.2.4.90"}
    # The spool went with the run, and what passed through it left no trace.
    assert set(Path(tempfile.gettempdir()).glob("meddx-spool-*")) == spools
    assert_nothing_leaked(needles(films), out, ray_dir, (run,))


def test_a_dimse_url_is_parsed_or_refused():
    peer = dimse.peer("dimse://PACS@pacs.example:11112?ModalitiesInStudy=DX&StudyDate=20260101-")
    assert (peer.ae_title, peer.host, peer.port, peer.where) == (
        "PACS",
        "pacs.example",
        11112,
        "PACS@pacs.example:11112",
    )
    assert dict(peer.filters) == {"ModalitiesInStudy": "DX", "StudyDate": "20260101-"}
    assert dimse.peer("dimse://PACS@pacs.example").port == dimse.DEFAULT_PORT
    assert dimse.is_source("dimse://PACS@pacs.example")
    uri = "dimse://pacs.example:104/instances/" + "ab" * 16
    assert dimse.is_instance(uri) and not dimse.is_source(uri)
    assert not dimse.is_instance("dimse://PACS@pacs.example:104")
    for bad in (
        "dimse://PACS:pw@pacs.example",
        "dimse://pacs.example",
        "dimse://PACS@pacs.example/studies",
        "dimse://A-TITLE-OF-MORE-THAN-16@pacs.example",
    ):
        with pytest.raises(MeddxError):
            dimse.peer(bad)
    # The options of a C-MOVE retrieval travel with the locator's peer; C-FIND keys do not.
    move = dimse.peer("dimse://PACS@h:104?retrieve=move&move_to=MX&move_port=11113&PatientID=7")
    assert dimse.move_of(move) == ("MX", 11113)
    assert move.url == "dimse://PACS@h:104?retrieve=move&move_to=MX&move_port=11113"
    assert dimse.move_of(dimse.peer("dimse://PACS@h")) is None
    for bad, says in (
        ("retrieve=move&move_to=MX", "needs move_to=AET and move_port=PORT"),
        ("retrieve=move&move_to=MX&move_port=70000", "needs move_to=AET and move_port=PORT"),
        ("move_to=MX&move_port=11113", "go with retrieve=move"),
        ("retrieve=copy", "retrieve= is get or move"),
    ):
        with pytest.raises(MeddxError, match=re.escape(says)):
            dimse.peer(f"dimse://PACS@h?{bad}")
    # A refused URL's line never quotes its query: a patient's ID may be a key there.
    with pytest.raises(MeddxError) as refused:
        dimse.peer("dimse://PACS@h:port?PatientID=PID-5521")
    assert "PID-5521" not in str(refused.value)
    with pytest.raises(MeddxError, match="needs MEDDX_PSEUDONYM_KEY"):
        dimse.list_instances("dimse://PACS@127.0.0.1:1", StorageSettings(), None)
