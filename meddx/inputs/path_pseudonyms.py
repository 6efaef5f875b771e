"""Keyed pseudonyms of input paths: what ``image_uri`` holds when a site's paths may
name patients (folders and file names often do).

A path becomes ``pseudonym:HASH``, a tar member ``pseudonym:HASH#HASH`` (a shard's
members stay grouped under their shard's pseudonym): HMAC-SHA256 with the site's key,
in a domain of its own, so no path hashes like a UID. The site holding the key can join
back; nobody else can.
"""

from __future__ import annotations

import hashlib
import hmac

import numpy as np

from meddx.inputs import dicomweb, dimse, storage
from meddx.inputs.storage import MEMBER_SEPARATOR

PATH_PSEUDONYM = "pseudonym:"


def path_pseudonym(uri: str, key: bytes) -> str:
    """``uri`` as ``pseudonym:HASH[#HASH]``. A PACS instance's URI (DICOMweb or DIMSE) is
    already a pseudonym and stays as it is."""
    if dicomweb.is_instance(uri) or dimse.is_instance(uri) or is_path_pseudonym(uri):
        return uri
    base, sep, member = uri.partition(MEMBER_SEPARATOR)
    out = PATH_PSEUDONYM + _keyed(base, key)
    return out + MEMBER_SEPARATOR + _keyed(member, key) if sep else out


def is_path_pseudonym(uri: str) -> bool:
    return uri.startswith(PATH_PSEUDONYM)


def _keyed(text: str, key: bytes) -> str:
    return hmac.new(key, b"path\0" + text.encode(), hashlib.sha256).hexdigest()[:32]


def pseudonymize_paths(chunk: dict[str, np.ndarray], key: bytes) -> dict[str, np.ndarray]:
    """The read stage's rows with image_uri pseudonymized, and each path the row's
    error text quotes (a shard's, say) replaced by its pseudonym."""
    real = chunk["image_uri"]
    fake = np.array([path_pseudonym(u, key) for u in real], dtype=object)
    errors = []
    for uri, error in zip(real, chunk["read_error"], strict=True):
        base = storage.shard_of(uri)
        for path in (base, storage.strip_scheme(base)):  # as given, or as fsspec says it
            error = error.replace(path, path_pseudonym(base, key)) if error else error
        errors.append(error)
    return {**chunk, "image_uri": fake, "read_error": np.array(errors, dtype=object)}
