"""What meddx files in a study: one DICOM Structured Report per study and model, and
the Grad-CAM overlay of its top finding as a Secondary Capture.

The SR is a Comprehensive SR in a results series of its own (``dicomweb.RESULTS_SERIES``)
holding a TID 1500 Measurement Report (highdicom): one measurement group per scored
instance, referencing it, with per finding the probability (a numeric measurement, UCUM
"1") and the decision at the finding's threshold (a qualitative evaluation, SNOMED CT
Present/Absent). The algorithm is identified by TID 4019 (DCM 111001 Algorithm Name: the
model's name; 111003 Algorithm Version: the checkpoint's sha256). docs/pacs.md records
the choice.

The SR carries the patient and study modules of its sources, so the PACS files it in
their study. Its UIDs are functions of the study's pseudonym and the checkpoint alone:
a study's report is one instance, sent again whole (every instance scored so far) when
more of the study is scored, so a PACS that takes an instance again under its UID holds
the latest report and never two. The heatmap likewise.

The libraries on this path (pydicom, highdicom) warn and log with the values they
complain about (``Invalid value for VR DA: '1980-01-01'``, a patient's name): they are
silenced here, and an SR that cannot be built is recorded by the exception's type and
the attributes' names, never by its text.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings

from meddx import MeddxError, __version__
from meddx.inputs import dicomweb
from meddx.model.registry import Checkpoint

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
# Libraries whose warnings and log records on this path can quote a patient's values.
QUIETED = ("pydicom", "highdicom", "dicomweb_client", "pynetdicom")


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
    return hd.sr.ComprehensiveSR(
        evidence=sources,
        content=content,
        series_instance_uid=uid("series", study, sha),
        series_number=SERIES_NUMBER,
        sop_instance_uid=uid("sr", study, sha),
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
        sop_instance_uid=uid("heatmap", study, sha),
        instance_number=2,
        manufacturer="meddx",
        series_description=dicomweb.RESULTS_SERIES,
    )
    if len(stated) != 2:
        image.PatientOrientation = ""  # type 2C: present, unknown
    return image


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


def prime(ckpt: Checkpoint, sha: str) -> None:
    """Build one report of a made-up instance and drop it: highdicom and pydicom read
    their tables of the standard (IODs, modules, coded concepts) on first use, about a
    second and a half that would otherwise fall on the first study of the day
    (``meddx listen``, at its start)."""
    from pydicom.dataset import Dataset

    source = Dataset()
    source.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    source.StudyInstanceUID, source.SeriesInstanceUID = uid("prime", "study"), uid("series")
    source.SOPInstanceUID, source.Modality = uid("prime", "instance"), "CR"
    source.Rows = source.Columns = 64
    source.SamplesPerPixel, source.PhotometricInterpretation = 1, "MONOCHROME2"
    source.BitsAllocated, source.BitsStored, source.HighBit = 16, 12, 11
    source.PixelRepresentation = 0
    for keyword in TYPE2_COPIED:
        setattr(source, keyword, "")
    with quiet_libraries():
        sr_document([source], [[0.5] * len(ckpt.class_names)], ckpt, sha, "prime")
