"""Scan what a run wrote for values that must never leave it: credentials, the pseudonym
key, patient identifiers. One place for every test that checks for leaks.

Bytes are searched as written, and Parquet files also decoded (rows and key-value
metadata), since compressed column data would hide a value from a plain byte search.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from pathlib import Path

import pyarrow.parquet as pq


def leaks(name: str, data: bytes, needles: Mapping[str, bytes]) -> list[str]:
    """``"LABEL in NAME"`` for each needle found in ``data``."""
    blobs = [data]
    if name.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
        blobs.append(repr((table.to_pylist(), table.schema.metadata)).encode())
    return [
        f"{label} in {name}"
        for label, needle in needles.items()
        if any(needle in blob for blob in blobs)
    ]


def leaks_in_files(paths: Iterable[Path], needles: Mapping[str, bytes]) -> list[str]:
    found = []
    for path in paths:
        found += leaks(str(path), Path(path).read_bytes(), needles)
    return found


def files_under(root: Path) -> list[Path]:
    """Every regular file under ``root`` (sockets, pipes and links left out)."""
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and not p.is_symlink())


def leaks_in_tree(root: Path, needles: Mapping[str, bytes]) -> list[str]:
    return leaks_in_files(files_under(root), needles)


def leaks_in_s3(fs, prefix: str, needles: Mapping[str, bytes]) -> tuple[list[str], int]:
    """(leaks, number of objects scanned) under an s3fs ``prefix``."""
    fs.invalidate_cache()
    keys = fs.find(prefix.removeprefix("s3://"))
    found = []
    for key in keys:
        found += leaks(key, fs.cat_file(key), needles)
    return found, len(keys)


def ray_session_dir() -> Path:
    """The session folder (logs and all) of the Ray this process is connected to."""
    import ray

    return Path(ray._private.worker._global_node.get_session_dir_path())
