"""Results back to the PACS: one DICOM Structured Report per scored study, STOW-RS'd.

    meddx score dicomweb+http://pacs/dicom-web?... --results-to dicomweb+http://pacs/dicom-web

After a run commits its rows, each study it scored gets a Comprehensive SR in a results
series of its own (``dicomweb.RESULTS_SERIES``) holding a TID 1500 Measurement Report
(highdicom): one measurement group per scored instance, referencing it, with per
finding the probability (a numeric measurement, UCUM "1") and the decision at the
finding's threshold (a qualitative evaluation, SNOMED CT Present/Absent). The algorithm
is identified by TID 4019 (DCM 111001 Algorithm Name: the model's name; 111003
Algorithm Version: the checkpoint's sha256). docs/pacs.md records the choice.

The SR carries the patient and study modules of its sources (read with WADO-RS
metadata, no pixels), so the PACS files it in their study. Instances are grouped by the
study QIDO-RS listed them in (their locator), which is where the PACS files them, never
by the StudyInstanceUID their files state (missing, or stale after a reconciliation).
It exists only in memory and on the --results-to server: never in OUT, a log or the
report. Its UIDs are derived from the study's pseudonym, the checkpoint and the
instances it reports on, so sending the same results again stores no second copy.

The libraries on this path (pydicom, highdicom, dicomweb-client) warn and log with the
values they complain about (``Invalid value for VR DA: '1980-01-01'``, a patient's
name): they are silenced here, and an SR that cannot be built is recorded by the
exception's type and the attributes' names, never by its text.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from meddx import MeddxError, __version__, secret
from meddx.imaging.dicom import pseudonym
from meddx.inputs import dicomweb
from meddx.inputs.storage import StorageSettings
from meddx.model.registry import Checkpoint
from meddx.store import commit

SERIES_NUMBER = 9900
# Codes of meddx's own findings: a private coding scheme, its values the class names.
FINDINGS_SCHEME = "99MEDDX"
PLAIN_CHEST_XRAY = ("399208008", "SCT", "Plain X-ray of chest")
TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
# The columns of a run's rows that the SRs are built from.
ROW_COLUMNS = ["image_uri", "status", "probs", "score", "label"]
# Libraries whose warnings and log records on this path can quote a patient's values.
QUIETED = ("pydicom", "highdicom", "dicomweb_client")


@dataclass(frozen=True)
class Sent:
    studies: int  # SRs stored, one per study
    instances: int  # scored instances they report on
    failed: tuple[str, ...] = ()  # one line per study whose SR could not be stored


def uid(*parts: str) -> str:
    """A DICOM UID (2.25 form) that is a function of its parts."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]
    return f"2.25.{int(digest, 16)}"


@contextlib.contextmanager
def quiet_libraries():
    """No warning and no log record from QUIETED while the block runs: their texts
    quote the values they refuse. Levels are restored after, whatever happens."""
    loggers = [logging.getLogger(name) for name in QUIETED]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.CRITICAL + 1)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def source_metadata(locator: str, settings: StorageSettings):
    """The instance's attributes (WADO-RS metadata: no pixel data) as a Dataset, its
    UIDs those it was listed under. Call it under quiet_libraries()."""
    import pydicom

    url, study, series, sop = dicomweb.locator_parts(locator)
    c = dicomweb.client(url, settings)
    meta = dicomweb.retried(lambda: c.retrieve_instance_metadata(study, series, sop))
    ds = pydicom.Dataset.from_json(meta, bulk_data_uri_handler=lambda *_: b"")
    # The SR is filed in its first source's study and references each source by UID:
    # those the PACS listed, whatever the header says (or leaves out).
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
    # Type 2 attributes of the patient and study modules, which the SR copies: present,
    # if empty, in a conformant instance; a server's JSON may leave empty ones out.
    for keyword in TYPE2_COPIED:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def findings(ckpt: Checkpoint) -> list[tuple[int, str, float]]:
    """(index into probs, name, threshold) of each finding the SR states."""
    if ckpt.multi_label:
        return [
            (i, n, t)
            for i, (n, t) in enumerate(zip(ckpt.class_names, ckpt.thresholds, strict=True))
        ]
    return [(ckpt.positive_index, ckpt.positive_class, ckpt.threshold)]


def sr_document(sources: list, probs: list[list[float]], ckpt: Checkpoint, sha: str, study: str):
    """The SR of one study: ``sources`` its scored instances' metadata, ``probs`` theirs."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.sr.AlgorithmIdentification(
        name=ckpt.model_name, version=f"sha256:{sha}", parameters=[f"meddx {__version__}"]
    )
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uid("device", sha), name=ckpt.model_name, manufacturer_name="meddx"
        ),
    )
    groups = []
    for ds, p in zip(sources, probs, strict=True):
        measurements, decisions = [], []
        for index, name, threshold in findings(ckpt):
            concept = hd.sr.CodedConcept(name, FINDINGS_SCHEME, name)
            measurements.append(
                hd.sr.Measurement(
                    name=hd.sr.CodedConcept(name, FINDINGS_SCHEME, f"Probability of {name}"),
                    value=float(p[index]),
                    unit=codes.UCUM.NoUnits,
                    algorithm_id=algorithm,
                )
            )
            present = p[index] >= threshold
            decisions.append(
                hd.sr.QualitativeEvaluation(
                    concept, codes.SCT.Present if present else codes.SCT.Absent
                )
            )
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=uid("group", sha, ds.SOPInstanceUID), identifier=ckpt.model_name
                ),
                algorithm_id=algorithm,
                measurements=measurements,
                qualitative_evaluations=decisions,
                source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds)],
            )
        )
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=hd.sr.CodedConcept(*PLAIN_CHEST_XRAY),
        imaging_measurements=groups,
    )
    instances = sorted(ds.SOPInstanceUID for ds in sources)
    return hd.sr.ComprehensiveSR(
        evidence=sources,
        content=content,
        series_instance_uid=uid("series", study, sha),
        series_number=SERIES_NUMBER,
        sop_instance_uid=uid("sr", study, sha, *instances),
        instance_number=1,
        manufacturer="meddx",
        series_description=dicomweb.RESULTS_SERIES,
        is_complete=True,
        is_final=True,
    )


def heatmap_capture(
    source, row: dict, located: dict[str, str], ckpt, sha: str, study: str, settings
):
    """The Grad-CAM overlay of ``row``'s top finding on the image the model saw, as a
    Secondary Capture in the study's results series."""
    import highdicom as hd

    from meddx.analysis.explain import cams, overlay_rgb

    ((pixels, cam),) = cams([row], ckpt, settings, locators=located)
    # The overlay keeps its source's orientation (only resized). highdicom wants one
    # for patient coordinates; when the source states none, the SC states none either.
    stated = tuple(source.get("PatientOrientation") or ())
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=overlay_rgb(pixels, cam),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=stated if len(stated) == 2 else ("L", "F"),
        series_instance_uid=uid("series", study, sha),
        series_number=SERIES_NUMBER,
        sop_instance_uid=uid("heatmap", study, sha, source.SOPInstanceUID),
        instance_number=2,
        manufacturer="meddx",
        series_description=dicomweb.RESULTS_SERIES,
    )
    if len(stated) != 2:
        image.PatientOrientation = ""  # type 2C: present, unknown
    return image


def by_listed_study(rows: pa.Table, located: dict[str, str]) -> dict[str, list[dict]]:
    """The scored (status ok) rows among ``rows`` that have a locator, by the Study
    Instance UID QIDO-RS listed each under: the study the PACS files it in."""
    grouped: dict[str, list[dict]] = {}
    for row in rows.select(ROW_COLUMNS).to_pylist():
        locator = located.get(row["image_uri"])
        if row["status"] != "ok" or locator is None:
            continue
        grouped.setdefault(dicomweb.locator_parts(locator)[1], []).append(row)
    return grouped


def one_patient(sources: list) -> None:
    """Refuse a study whose sources name more than one patient: the SR states the
    first source's, and would file the others' results under it."""
    for keyword in ("PatientID", "IssuerOfPatientID"):
        if len({str(ds.get(keyword, "")) for ds in sources}) > 1:
            raise MeddxError(f"its instances differ in {keyword}: no report")


def invalid_attributes(sources: list) -> list[str]:
    """The keywords of the copied patient and study attributes whose values their VR
    refuses (a date as 1980-01-01, say): the names only."""
    from pydicom.config import RAISE
    from pydicom.valuerep import validate_value

    bad = set()
    for ds in sources:
        for keyword in TYPE2_COPIED:
            if keyword not in ds:
                continue
            element = ds.data_element(keyword)
            values = element.value if element.VM > 1 else [element.value]
            try:
                for value in values:
                    if value not in (None, ""):
                        validate_value(element.VR, value, RAISE)
            except Exception:  # noqa: BLE001 - any refusal names the attribute
                bad.add(keyword)
    return sorted(bad)


def why_not_built(exc: Exception, sources: list) -> str:
    """One line for an SR that could not be built: the exception's type and the
    attributes at fault, never its text, which quotes values (``Unable to convert
    '1980-01-01' to 'DA' object``)."""
    from pydicom.datadict import tag_for_keyword

    line = f"{type(exc).__name__} building the report"
    with quiet_libraries():
        invalid = invalid_attributes(sources)
    if invalid:
        line += f"; invalid {', '.join(invalid)}"
    name = getattr(exc, "name", None)  # AttributeError's: the attribute asked for
    if isinstance(exc, AttributeError) and name and tag_for_keyword(name) is not None:
        line += f"; missing {name}"
    return line


def send(
    target: str,
    rows: pa.Table,
    located: dict[str, str],
    ckpt: Checkpoint,
    sha: str,
    settings: StorageSettings,
    key: bytes,
    heatmaps: bool = False,
    allow_insecure_http: bool = False,
) -> Sent:
    """STOW-RS one SR per listed study among ``rows`` (a run's rows) to ``target``;
    with ``heatmaps``, also the Grad-CAM overlay of the study's top-scoring instance.
    ``key`` names each study by its pseudonym (in the SR's UIDs, in ``failed``). A
    target that would get credentials over plain http is refused first, unless
    ``allow_insecure_http`` (dicomweb.check_transport)."""
    import requests

    dicomweb.check_transport(target, allow_insecure_http)
    where = dicomweb.endpoint(target)
    c = dicomweb.client(where.url, settings)
    stored, instances, failed = 0, 0, []
    for study_uid, scored in sorted(by_listed_study(rows, located).items()):
        study = pseudonym(study_uid, key)
        sources: list = []
        try:
            with quiet_libraries():
                for r in scored:
                    sources.append(source_metadata(located[r["image_uri"]], settings))
                one_patient(sources)
                made = [sr_document(sources, [r["probs"] for r in scored], ckpt, sha, study)]
                if heatmaps:
                    top = max(range(len(scored)), key=lambda i: max(scored[i]["probs"]))
                    made.append(
                        heatmap_capture(
                            sources[top], scored[top], located, ckpt, sha, study, settings
                        )
                    )
                dicomweb.retried(lambda made=made: c.store_instances(made))
        except MeddxError as exc:
            failed.append(f"study {study}: {exc}")
            continue
        except requests.RequestException as exc:
            failed.append(f"study {study}: {dicomweb.reason(exc, where.host)}")
            continue
        except Exception as exc:  # an SR highdicom will not build: say why, go on
            failed.append(f"study {study}: {why_not_built(exc, sources)}")
            continue
        stored += 1
        instances += len(scored)
    return Sent(stored, instances, tuple(failed))


def send_run(cfg, run_id: str, located: dict[str, str], ckpt: Checkpoint, sha: str) -> Sent:
    """``--results-to``: the SRs of the rows run ``run_id`` committed under cfg.out."""

    rows = commit.read_results(
        cfg.out, cfg.storage, ROW_COLUMNS, where=pc.field("run_id") == run_id, dates=[cfg.run_date]
    )
    key = secret.pseudonym_key()
    if key is None:  # the listing needed it: only a key removed since can miss here
        raise MeddxError("--results-to needs MEDDX_PSEUDONYM_KEY to name the studies")
    return send(
        cfg.results_to,
        rows,
        located,
        ckpt,
        sha,
        cfg.storage,
        key,
        cfg.results_heatmaps,
        cfg.allow_insecure_http,
    )


def describe(sent: Sent, target: str) -> str:
    """One line: what reached the PACS (and the first reason when something did not)."""
    host = dicomweb.endpoint(target).host
    line = f"results: {sent.studies} reports on {sent.instances} instances stored on {host}"
    if sent.failed:
        line += f"; {len(sent.failed)} not stored, first: {sent.failed[0]}"
    return line
