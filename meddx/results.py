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
metadata, no pixels), so the PACS files it in their study. It exists only in memory and
on the --results-to server: never in OUT, a log or the report. Its UIDs are derived
from the study pseudonym, the checkpoint and the instances it reports on, so sending
the same results again stores no second copy.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from meddx import MeddxError, __version__, commit, dicomweb, one_line
from meddx.models import Checkpoint
from meddx.storage import StorageSettings

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
COLUMNS = ["image_uri", "status", "probs", "score", "label", "study_pseudonym"]


@dataclass(frozen=True)
class Sent:
    studies: int  # reports stored
    instances: int  # scored instances they report on
    failed: tuple[str, ...] = ()  # one line per study whose report could not be stored


def uid(*parts: str) -> str:
    """A DICOM UID (2.25 form) that is a function of its parts."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]
    return f"2.25.{int(digest, 16)}"


def source_metadata(locator: str, settings: StorageSettings):
    """The instance's attributes (WADO-RS metadata: no pixel data) as a Dataset."""
    import pydicom

    url, study, series, sop = dicomweb.locator_parts(locator)
    c = dicomweb.client(url, settings)
    meta = dicomweb.retried(lambda: c.retrieve_instance_metadata(study, series, sop))
    ds = pydicom.Dataset.from_json(meta, bulk_data_uri_handler=lambda *_: b"")
    # Type 2 attributes of the patient and study modules, which the SR copies: present,
    # if empty, in a conformant instance; a server's JSON may leave empty ones out.
    for keyword in TYPE2_COPIED:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def findings(ckpt: Checkpoint) -> list[tuple[int, str, float]]:
    """(index into probs, name, threshold) of each finding the report states."""
    if ckpt.multi_label:
        return [
            (i, n, t)
            for i, (n, t) in enumerate(zip(ckpt.class_names, ckpt.thresholds, strict=True))
        ]
    return [(ckpt.positive_index, ckpt.positive_class, ckpt.threshold)]


def report(sources: list, probs: list[list[float]], ckpt: Checkpoint, sha: str, study: str):
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


def heatmap(source, row: dict, located: dict[str, str], ckpt, sha: str, study: str, settings):
    """The Grad-CAM overlay of ``row``'s top finding on the image the model saw, as a
    Secondary Capture in the study's results series."""
    import highdicom as hd

    from meddx.explain import cams, overlay_rgb

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


def send(
    target: str,
    rows: pa.Table,
    located: dict[str, str],
    ckpt: Checkpoint,
    sha: str,
    settings: StorageSettings,
    heatmaps: bool = False,
) -> Sent:
    """STOW-RS one SR per study among ``rows`` (a run's rows) to ``target``; with
    ``heatmaps``, also the Grad-CAM overlay of the study's top-scoring instance."""
    import requests

    where = dicomweb.endpoint(target)
    by_study: dict[str, list[dict]] = {}
    for row in rows.select(COLUMNS).to_pylist():
        if row["status"] != "ok" or row["image_uri"] not in located:
            continue
        by_study.setdefault(row["study_pseudonym"] or "", []).append(row)
    c = dicomweb.client(where.url, settings)
    stored, instances, failed = 0, 0, []
    for study, scored in sorted(by_study.items()):
        try:
            sources = [source_metadata(located[r["image_uri"]], settings) for r in scored]
            made = [report(sources, [r["probs"] for r in scored], ckpt, sha, study)]
            if heatmaps:
                top = max(range(len(scored)), key=lambda i: max(scored[i]["probs"]))
                made.append(heatmap(sources[top], scored[top], located, ckpt, sha, study, settings))
            dicomweb.retried(lambda made=made: c.store_instances(made))
        except MeddxError as exc:
            failed.append(f"study {study}: {exc}")
            continue
        except requests.RequestException as exc:
            failed.append(f"study {study}: {dicomweb.reason(exc, where.host)}")
            continue
        except Exception as exc:  # a report highdicom will not build: say which, go on
            failed.append(f"study {study}: {type(exc).__name__}: {one_line(exc)}")
            continue
        stored += 1
        instances += len(scored)
    return Sent(stored, instances, tuple(failed))


def send_run(cfg, run_id: str, located: dict[str, str], ckpt: Checkpoint, sha: str) -> Sent:
    """``--results-to``: the reports of the rows run ``run_id`` committed under cfg.out."""
    rows = commit.read_results(
        cfg.out, cfg.storage, COLUMNS, where=pc.field("run_id") == run_id, dates=[cfg.run_date]
    )
    return send(cfg.results_to, rows, located, ckpt, sha, cfg.storage, cfg.results_heatmaps)


def describe(sent: Sent, target: str) -> str:
    """One line: what reached the PACS (and the first reason when something did not)."""
    host = dicomweb.endpoint(target).host
    line = f"results: {sent.studies} reports on {sent.instances} instances stored on {host}"
    if sent.failed:
        line += f"; {len(sent.failed)} not stored, first: {sent.failed[0]}"
    return line
