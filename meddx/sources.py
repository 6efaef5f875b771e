"""What to read: the inputs under a prefix, and their labels where known.

Names starting with ``_`` or ``.`` are metadata (manifests, markers, run artefacts),
never inputs, everywhere in meddx.
"""

from __future__ import annotations

import csv
import io
import posixpath

import numpy as np

from meddx import MeddxError, storage
from meddx.storage import StorageSettings


def one_line(exc: BaseException) -> str:
    """An exception as one short line (no newlines, bounded length) for an error column."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


MANIFEST_NAME = "_manifest.csv"


def list_inputs(input_uri: str, settings: StorageSettings) -> list[str]:
    """Every object under ``input_uri`` (a local folder or an s3:// prefix), sorted."""
    uris = storage.list_files(input_uri, settings)
    if not uris:
        raise MeddxError(f"no inputs under {input_uri}")
    return uris


def read_manifest(uri: str, settings: StorageSettings) -> dict[str, str]:
    """``uri -> label`` from a CSV manifest with columns ``uri`` and ``label``."""
    try:
        text = storage.read_bytes(uri, settings).decode("utf-8-sig")
    except FileNotFoundError:
        raise MeddxError(f"manifest not found: {uri}") from None
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "uri" not in reader.fieldnames:
        raise MeddxError(f"manifest {uri} needs a 'uri' column")
    if "label" not in reader.fieldnames:
        raise MeddxError(f"manifest {uri} needs a 'label' column")
    return {row["uri"]: row["label"] for row in reader if row["uri"]}


def label_from_path(uri: str) -> str:
    """The class folder an input sits in: ``.../opacity/x.png`` -> ``opacity``."""
    return posixpath.basename(posixpath.dirname(uri.split("#", 1)[0]))


def labelled_inputs(data_uri: str, settings: StorageSettings) -> list[tuple[str, str]]:
    """(uri, label) for training: ``DATA/_manifest.csv`` if present, else class folders."""
    manifest = storage.join(data_uri, MANIFEST_NAME)
    if storage.exists(manifest, settings):
        labels = read_manifest(manifest, settings)
        return sorted(labels.items())
    return [(uri, label_from_path(uri)) for uri in list_inputs(data_uri, settings)]


def read_objects(batch: dict[str, np.ndarray], settings: StorageSettings) -> dict[str, np.ndarray]:
    """Fetch each object's bytes; a missing or unreadable object becomes an error value.

    Columns crossing Ray stages use "" for "no error": an all-None column does not
    survive Arrow conversion as None.
    """
    data, errors = [], []
    for uri in batch["image_uri"]:
        try:
            data.append(storage.read_bytes(uri, settings))
            errors.append("")
        except FileNotFoundError:
            data.append(b"")
            errors.append("object not found")
        except PermissionError:
            data.append(b"")
            errors.append("access denied")
        except Exception as exc:  # network, throttling past retries, ...
            data.append(b"")
            errors.append(f"read failed: {one_line(exc)}")
    batch["bytes"] = np.array(data, dtype=object)
    batch["read_error"] = np.array(errors, dtype=object)
    return batch
