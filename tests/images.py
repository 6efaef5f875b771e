"""Small test images of every kind meddx must read, and the broken ones it must survive."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image


def gradient(size=80) -> np.ndarray:
    row = np.linspace(0, 1, size, dtype=np.float32)
    return np.outer(row, row)


def png(mode="L", size=80) -> bytes:
    g = gradient(size)
    if mode == "L":
        img = Image.fromarray((g * 255).astype(np.uint8), "L")
    elif mode == "I;16":
        img = Image.fromarray((g * 4095).astype(np.uint16))  # 12-bit data in 16-bit PNG
    elif mode == "RGB":
        img = Image.fromarray(np.stack([(g * 255).astype(np.uint8)] * 3, -1), "RGB")
    elif mode == "RGBA":
        rgb = np.stack([(g * 255).astype(np.uint8)] * 3, -1)
        alpha = np.full((size, size, 1), 128, np.uint8)
        img = Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA")
    else:
        raise ValueError(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg(size=80, mode="L") -> bytes:
    g = (gradient(size) * 255).astype(np.uint8)
    img = Image.fromarray(g, "L") if mode == "L" else Image.fromarray(np.stack([g] * 3, -1))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_bomb(width=100_000, height=100_000) -> bytes:
    """A valid-looking PNG header declaring 10^10 pixels, with a tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )


def broken_inputs() -> dict[str, bytes]:
    """name -> bytes for every kind of bad object a scoring run must turn into an error row."""
    good_png, good_jpeg = png(), jpeg(size=256)
    return {
        "truncated.png": good_png[: len(good_png) // 2],
        "empty.png": b"",
        "notes.png": b"this is a text file, not an image\n",
        "random.jpg": np.random.default_rng(0).bytes(4096),
        "half.jpg": good_jpeg[: len(good_jpeg) // 2],
        "bomb.png": png_bomb(),
    }


def dicom_cr(
    pixels: np.ndarray | None = None,
    *,
    patient_name: str = "Doe^Jane",
    photometric: str = "MONOCHROME2",
    modality: str = "CR",
    view: str = "PA",
    window: tuple[float, float] | None = (2048.0, 4096.0),
    preamble: bool = True,
    study: str = "1.2.826.0.1.3680043.8.498.1",
) -> bytes:
    """A 12-bit computed radiograph as DICOM bytes (explicit VR little endian); pixels
    of shape (frames, rows, columns) make a multi-frame object."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    if pixels is None:
        pixels = (gradient(64) * 4095).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.PatientName = patient_name
    ds.PatientID = "MRN-0042"
    ds.PatientBirthDate = "19700101"
    ds.Modality = modality
    ds.ViewPosition = view
    ds.BodyPartExamined = "CHEST"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    return data if preamble else data[132:]


def make_tar(members: list[tuple[str, bytes | None]], *, symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            link = tarfile.TarInfo(symlink)
            link.type = tarfile.SYMTYPE
            link.linkname = "/etc/passwd"
            tar.addfile(link)
    return buf.getvalue()
