"""How a run's rows name its inputs: by their path, or under ``--pseudonymize-paths`` by
a keyed pseudonym of it (file and member names often hold MRNs or accession numbers),
and ``--path-map``, the table that leads from each pseudonym back to its path.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from meddx import MeddxError, secret
from meddx.config import ScoreConfig
from meddx.inputs import path_pseudonyms, storage


def path_key(cfg: ScoreConfig) -> bytes | None:
    """The key of ``--pseudonymize-paths`` (the site's pseudonym key), else None."""
    if not cfg.pseudonymize_paths:
        return None
    key = secret.pseudonym_key()
    if key is None:
        raise MeddxError(
            f"--pseudonymize-paths needs the site's key: set {secret.PSEUDONYM_KEY_ENV} "
            f"or {secret.PSEUDONYM_KEY_ENV}_FILE"
        )
    return key


def as_indexed(cfg: ScoreConfig, uris) -> dict[str, str]:
    """How OUT's rows name each input: its pseudonym under --pseudonymize-paths, else
    itself (pseudonym -> input)."""
    key = path_key(cfg)
    return {path_pseudonyms.path_pseudonym(u, key) if key else u: u for u in uris}


def indexed_names(cfg: ScoreConfig, listed: pa.Table, key: bytes | None = None) -> pa.ChunkedArray:
    """Each listed input as OUT's rows name it: itself, or its keyed pseudonym under
    --pseudonymize-paths (an HMAC per input: the one per-input step Arrow cannot do).
    ``key``: the path key as the driver read it (a Ray task's process may not have the
    site's key in its environment)."""
    key = key or path_key(cfg)
    if not key:
        return listed["image_uri"]
    names = [path_pseudonyms.path_pseudonym(u, key) for u in listed["image_uri"].to_pylist()]
    return pa.chunked_array([pa.array(names, pa.string())], pa.string())


def write_path_map(cfg: ScoreConfig, run_id: str, uris: list[str]) -> None:
    """``--path-map``: this run's pseudonym -> path table, as PATH_MAP/RUN_ID.parquet
    (a tar member's pseudonym is its shard's, then the keyed hash of its name)."""
    if not cfg.path_map or not uris:
        return
    indexed = as_indexed(cfg, uris)
    table = pa.table({"image_uri": list(indexed), "path": list(indexed.values())})
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    target = storage.join(cfg.path_map, f"{run_id}.parquet")
    storage.write_bytes(target, buf.getvalue().to_pybytes(), cfg.storage)
