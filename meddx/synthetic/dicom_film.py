"""Synthetic films as the DICOM objects chest archives hold.

Each film becomes a CR or DX image with the attributes real detectors write: a PA or AP
view, 10-16 stored bits, a Rescale Slope/Intercept on some, a VOI window, MONOCHROME1 on
some CR films, deterministic UIDs. Its pixel data is uncompressed or encoded with a
well-kept encoder: pydicom's (JPEG 2000 through pylibjpeg-openjpeg, RLE through
pylibjpeg-rle, JPEG-LS through pyjpegls), Pillow's JPEG baseline, imagecodecs' HTJ2K.
Every value depends only on ``(seed, index)``: the same seed gives the same bytes.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
# Bits Stored of chest detectors: 12 most often, 10 on old CR plates, 14-16 on flat panels.
BITS_STORED = (10, 12, 14, 16)
BITS_WEIGHTS = (0.15, 0.5, 0.2, 0.15)
# Lossy JPEG 2000 at 10:1, the ratio VNAs commonly archive radiographs at.
J2K_LOSSY_RATIO = 10
# JPEG baseline quality of modality-side 8-bit exports.
JPEG_QUALITY = 90
# Compressed formats pydicom encodes itself, with the plugin that does it.
PYDICOM_ENCODED = {
    "dicom-j2k": (JPEG2000Lossless, "pylibjpeg", {}),
    "dicom-j2k-lossy": (JPEG2000, "pylibjpeg", {"j2k_cr": [J2K_LOSSY_RATIO]}),
    "dicom-rle": (RLELossless, "pylibjpeg", {}),
    "dicom-jpegls": (JPEGLSLossless, "pyjpegls", {}),
}


def encode_film(film: np.ndarray, fmt: str, *, index: int, seed: int) -> bytes:
    """DICOM bytes (with preamble) of ``film`` (float in [0, 1], bright = dense)."""
    rng = np.random.default_rng([seed, index, 5])  # this film's acquisition attributes
    modality = str(rng.choice(["CR", "DX"]))
    baseline = fmt == "dicom-jpeg"  # JPEG baseline holds 8 bits only
    bits = 8 if baseline else int(rng.choice(BITS_STORED, p=BITS_WEIGHTS))
    monochrome1 = modality == "CR" and not baseline and rng.random() < 0.4
    rescaled = not baseline and rng.random() < 0.3
    slope, intercept = (float(rng.choice([0.5, 1.0, 2.0])), -1000.0) if rescaled else (1.0, 0.0)
    top = 2**bits - 1

    stored = np.rint(film * top).astype(np.uint8 if baseline else np.uint16)
    if monochrome1:
        stored = top - stored  # MONOCHROME1: high values display dark
    ds = _dataset(rng, modality, index=index, seed=seed)
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = 8 if baseline else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if rescaled:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
    # The VOI window the modality chose: the used range, a little wider.
    lo, hi = float(stored.min()) * slope + intercept, float(stored.max()) * slope + intercept
    ds.WindowCenter = round((lo + hi) / 2, 1)
    ds.WindowWidth = round(max(hi - lo, 1.0) * 1.05, 1)

    if fmt == "dicom":
        ds.PixelData = stored.tobytes()
    elif fmt in PYDICOM_ENCODED:
        syntax, plugin, kwargs = PYDICOM_ENCODED[fmt]
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.compress(syntax, stored, encoding_plugin=plugin, generate_instance_uid=False, **kwargs)
        if fmt == "dicom-j2k-lossy":
            ds.LossyImageCompression = "01"
            ds.LossyImageCompressionRatio = J2K_LOSSY_RATIO
            ds.LossyImageCompressionMethod = "ISO_15444_1"
    elif fmt == "dicom-jpeg":
        buf = io.BytesIO()
        Image.fromarray(stored, mode="L").save(buf, format="JPEG", quality=JPEG_QUALITY)
        _encapsulated(ds, buf.getvalue(), JPEGBaseline8Bit)
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    elif fmt == "dicom-htj2k":
        import imagecodecs

        _encapsulated(ds, imagecodecs.htj2k_encode(stored), HTJ2KLossless)
    else:
        raise ValueError(f"not a DICOM synth format: {fmt!r}")
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def _encapsulated(ds: Dataset, frame: bytes, syntax: str) -> None:
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = syntax


def _dataset(rng: np.random.Generator, modality: str, *, index: int, seed: int) -> Dataset:
    def uid(kind: str) -> str:
        return generate_uid(entropy_srcs=["meddx-synth", str(seed), str(index), kind])

    sop_class = CR_IMAGE if modality == "CR" else DX_IMAGE_FOR_PRESENTATION
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uid("instance")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid("instance")
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.PatientName = "Synthetic^Film"
    ds.PatientID = f"synth-{seed}-{index:06d}"
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = str(rng.choice(["PA", "AP"], p=[0.7, 0.3]))
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.StudyDate = ds.SeriesDate = "20260101"
    ds.InstanceNumber = 1
    return ds
