"""The DICOM Structured Report meddx sends back (meddx.pacs.stow): what one study's SR
states, how it is named, and that the same results sent twice are the same SR. Built in
memory and sent to tests/dicomweb_server.py; tests/test_dicomweb.py checks which study
an SR is filed in, tests/test_pacs.py the whole path against Orthanc.
"""

from __future__ import annotations

import highdicom as hd
import pyarrow as pa
import pytest
from pydicom.dataset import Dataset

from meddx.imaging.dicom import pseudonym
from meddx.inputs import dicomweb
from meddx.inputs.storage import StorageSettings
from meddx.model import registry
from meddx.pacs import reports, results

from .dicomweb_server import Server, serving, uids

KEY = b"site-key-for-pseudonyms"
SHA = "0123abcd" * 8
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
# The patient's values in the sources: the SR's patient module carries them (so the PACS
# files it with the study), its content never does.
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-4471", "PatientBirthDate": "19611027"}
FINDINGS = ["opacity", "effusion", "nodule"]


def source(study: str, series: str, sop: str) -> Dataset:
    """The attributes WADO-RS metadata gives of a 64 x 64 CR (no pixels), as
    results.Sources leaves them."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CR_IMAGE, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.PatientSex = "CR", "F"
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    for keyword in reports.TYPE2_COPIED:
        if keyword not in ds:
            setattr(ds, keyword, "")
    ds.Rows = ds.Columns = 64
    return ds


def study_sources(i: int, n: int) -> list[Dataset]:
    study, series, first = uids(i)
    return [source(study, series, first if k == 0 else f"{series}.{k + 1}") for k in range(n)]


@pytest.fixture(scope="module")
def single():
    return registry.untrained_checkpoint("seednet", input_size=64, threshold=0.4)


@pytest.fixture(scope="module")
def multi():
    return registry.untrained_checkpoint(
        "seednet", input_size=64, findings=FINDINGS, thresholds=[0.3, 0.6, 0.9]
    )


def groups_of(sr: Dataset) -> dict[str, hd.sr.MeasurementsAndQualitativeEvaluations]:
    """The SR's measurement groups (read back from its dataset), by the SOP Instance UID
    of the image each reports on."""
    parsed = hd.sr.ComprehensiveSR.from_dataset(sr)
    found = {}
    for group in parsed.content.get_image_measurement_groups():
        (image,) = group.source_images
        found[image.referenced_sop_instance_uid] = group
    return found


def stated(group) -> dict[str, tuple[float, str, str]]:
    """finding -> (probability, its unit's code, the decision's meaning)."""
    decisions = {d.name.value: d.value.meaning for d in group.get_qualitative_evaluations()}
    out = {}
    for m in group.get_measurements():
        assert m.name.scheme_designator == reports.FINDINGS_SCHEME
        assert m.name.meaning == f"Probability of {m.name.value}"
        out[m.name.value] = (m.value, m.unit.value, decisions[m.name.value])
    assert set(decisions) == set(out)
    return out


def texts(group) -> dict[str, str]:
    """The group's TEXT items by concept code (TID 4019: 111001 name, 111003 version)."""
    return {
        item.ConceptNameCodeSequence[0].CodeValue: item.TextValue
        for item in group[0].ContentSequence
        if item.ValueType == "TEXT"
    }


def test_the_sr_states_the_positive_finding_of_each_instance(single):
    sources = study_sources(0, 2)
    study = pseudonym(sources[0].StudyInstanceUID, KEY)
    sr = reports.sr_document(sources, [[0.65, 0.35], [0.9, 0.1]], single, SHA, study)
    groups = groups_of(sr)
    assert set(groups) == {ds.SOPInstanceUID for ds in sources}
    # The positive class's probability, and its decision at the checkpoint's threshold
    # (0.4): 0.35 is under it, 0.1 too; the normal class is no finding.
    assert stated(groups[sources[0].SOPInstanceUID]) == {"opacity": (0.35, "1", "Absent")}
    assert stated(groups[sources[1].SOPInstanceUID]) == {"opacity": (0.1, "1", "Absent")}
    above = reports.sr_document(sources, [[0.2, 0.8], [0.59, 0.41]], single, SHA, study)
    assert [stated(g)["opacity"][2] for g in groups_of(above).values()] == ["Present"] * 2
    for group in groups.values():
        assert texts(group)["111001"] == "seednet"
        assert texts(group)["111003"] == f"sha256:{SHA}"
    assert sr.SeriesDescription == dicomweb.RESULTS_SERIES
    assert sr.Manufacturer == "meddx" and sr.SeriesNumber == reports.SERIES_NUMBER


def test_a_multi_label_sr_states_every_finding_at_its_own_threshold(multi):
    sources = study_sources(1, 1)
    study = pseudonym(sources[0].StudyInstanceUID, KEY)
    sr = reports.sr_document(sources, [[0.35, 0.55, 0.95]], multi, SHA, study)
    (group,) = groups_of(sr).values()
    assert stated(group) == {
        "opacity": (0.35, "1", "Present"),  # threshold 0.3
        "effusion": (0.55, "1", "Absent"),  # threshold 0.6
        "nodule": (0.95, "1", "Present"),  # threshold 0.9
    }


def test_the_srs_own_uids_are_functions_of_the_study_pseudonym_and_model(single):
    sources = study_sources(2, 2)
    real_study = sources[0].StudyInstanceUID
    study = pseudonym(real_study, KEY)
    probs = [[0.5, 0.5], [0.4, 0.6]]
    sr = reports.sr_document(sources, probs, single, SHA, study)
    # Filed in the listed study, in a results series named by the study's pseudonym.
    assert sr.StudyInstanceUID == real_study
    assert sr.SeriesInstanceUID == reports.uid("series", study, SHA)
    own = (sr.SeriesInstanceUID, sr.SOPInstanceUID)
    assert all(u.startswith("2.25.") for u in own)
    source_uids = {real_study, *(ds.SeriesInstanceUID for ds in sources)}
    source_uids |= {ds.SOPInstanceUID for ds in sources}
    assert not source_uids & set(own)
    # One report per study and model: the same study's report, on more or fewer
    # instances, has the same UIDs (sent again, it replaces the one before); another
    # model's is another.
    again = reports.sr_document(list(reversed(sources)), probs[::-1], single, SHA, study)
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == own
    other_model = reports.sr_document(sources, probs, single, "ff" * 32, study)
    assert other_model.SOPInstanceUID != sr.SOPInstanceUID
    fewer = reports.sr_document(sources[:1], probs[:1], single, SHA, study)
    assert (fewer.SeriesInstanceUID, fewer.SOPInstanceUID) == own


def content_values(item) -> list[str]:
    """Every text, code meaning and person name in an SR's content tree."""
    found = []
    for element in item.iterall():
        if element.VR in ("UT", "ST", "LO", "SH", "PN", "LT", "DA"):
            found.extend(str(v) for v in (element.value if element.VM > 1 else [element.value]))
    return found


def test_the_patient_stays_in_the_patient_module(single):
    sources = study_sources(3, 1)
    study = pseudonym(sources[0].StudyInstanceUID, KEY)
    sr = reports.sr_document(sources, [[0.2, 0.8]], single, SHA, study)
    # The PACS files the SR with its patient: the module is the sources'.
    assert {k: str(sr.get(k)) for k in PATIENT} == PATIENT
    # Nothing of the patient in what the SR states: its observer, tracking, findings.
    content = Dataset()
    content.ContentSequence = sr.ContentSequence
    said = content_values(content)
    assert "seednet" in said and said
    for value in PATIENT.values():
        assert not [v for v in said if value in v], value


def rows_for(server: Server, sources: list[Dataset], probs) -> tuple[pa.Table, dict[str, str]]:
    """A run's rows for ``sources`` as listed on ``server``, and their locators."""
    host = server.url.removeprefix("http://")
    rows, located = [], {}
    for ds, p in zip(sources, probs, strict=True):
        uri = f"dicomweb://{host}/instances/{pseudonym(ds.SOPInstanceUID, KEY)}"
        parts = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        located[uri] = " ".join((f"{server.url}/dicom-web", *parts))
        rows.append({"image_uri": uri, "status": "ok", "probs": p, "score": p[1], "label": ""})
        server.metadata[ds.SOPInstanceUID] = ds.to_json_dict()
    return pa.Table.from_pylist(rows), located


def test_send_stores_one_sr_per_study_and_the_same_one_again(single):
    a, b = study_sources(4, 2), study_sources(5, 1)
    probs = [[0.3, 0.7], [0.9, 0.1], [0.5, 0.5]]
    with serving(Server()) as server:
        rows, located = rows_for(server, [*a, *b], probs)
        # An error row, and a row listed nowhere, are no instance to report on.
        scored = rows.to_pylist()[0]
        others = [{**scored, "status": "error"}, {**scored, "image_uri": "s3://bucket/x.png"}]
        rows = pa.concat_tables([rows, pa.Table.from_pylist(others, schema=rows.schema)])
        first = results.send(server.source, rows, located, single, SHA, StorageSettings(), KEY)
        second = results.send(server.source, rows, located, single, SHA, StorageSettings(), KEY)
    studies = tuple(sorted(pseudonym(s[0].StudyInstanceUID, KEY) for s in (a, b)))
    assert first == second == results.Sent(studies=2, instances=3, reported=studies)
    sent = server.stored_datasets()
    assert len(sent) == 4 and all(ds.Modality == "SR" for ds in sent)
    # Twice the same two SRs: the PACS keeps one copy of each.
    assert len({ds.SOPInstanceUID for ds in sent}) == 2
    by_study = {ds.StudyInstanceUID: ds for ds in sent}
    for sources, p in ((a, probs[:2]), (b, probs[2:])):
        sr = by_study[sources[0].StudyInstanceUID]
        groups = groups_of(sr)
        assert set(groups) == {ds.SOPInstanceUID for ds in sources}
        for ds, q in zip(sources, p, strict=True):
            assert stated(groups[ds.SOPInstanceUID])["opacity"][0] == pytest.approx(q[1])
    line = results.describe(first, server.source)
    assert line == f"results: 2 reports on 3 instances stored on {server.url[7:]}"
