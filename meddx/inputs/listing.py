"""What to read: INPUT as an Arrow table of inputs, and the manifests that name inputs
and labels.

INPUT is one of
- a folder or s3:// prefix: every object under it, recursively;
- a ``.csv`` or ``.parquet`` manifest with a ``uri`` column (optional ``label`` and
  ``study_id``): only the listed objects, nothing is listed, so a night's new studies
  start scoring at once;
- a DICOMweb query (``dicomweb.py``): the instances it finds.

A listing is data, not a Python list: ``list_table`` gives ``image_uri``, ``size`` and
``mtime`` as the one recursive listing returned them (no per-object ``info()`` or HEAD),
null where a manifest or a PACS says nothing of them.

Wherever an object ends in ``.tar`` (``.tar.gz``, ``.tgz``) it is a shard whose image
members are the inputs (``shards.py``). Names starting with ``_`` or ``.`` are metadata
(manifests, markers, run artefacts), never inputs, everywhere in meddx.
"""

from __future__ import annotations

import io
import posixpath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from meddx import MeddxError, one_line
from meddx.inputs import dicomweb, storage
from meddx.inputs.storage import StorageSettings
from meddx.names import DEFAULT_MAX_OBJECT_BYTES, MANIFEST_NAME

MANIFEST_SUFFIXES = (".csv", ".parquet")


def is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_SUFFIXES)


# The columns of a listing: what the one listing of a prefix returns for each object.
LISTING_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("size", pa.int64()),  # bytes; null when the source does not say (a manifest)
        ("mtime", pa.timestamp("us", tz="UTC")),  # last modified; null when unknown
    ]
)


def list_table(
    input_uri: str, settings: StorageSettings, max_bytes: int = DEFAULT_MAX_OBJECT_BYTES
) -> pa.Table:
    """The inputs named by INPUT (prefix, folder or manifest) as a LISTING_SCHEMA table,
    sorted by URI for a prefix, in first-seen order for a manifest."""
    if is_manifest(input_uri):
        uris = read_manifest(input_uri, settings, max_bytes)["uri"]
        # A study listed twice is still one input (unique keeps the first occurrence).
        table = uris_table(pc.unique(uris.cast(pa.string())))
    else:
        table = list_prefix(input_uri, settings)
    if not table.num_rows:
        raise MeddxError(f"no inputs under {input_uri}")
    return table


def uris_table(uris) -> pa.Table:
    """A listing of URIs alone (a manifest's, a PACS's): size and mtime null."""
    uris = pa.chunked_array([uris]) if isinstance(uris, pa.Array) else uris
    if not isinstance(uris, pa.ChunkedArray):
        uris = pa.chunked_array([pa.array(list(uris), pa.string())], pa.string())
    n = len(uris)
    return pa.table(
        [uris, pa.nulls(n, pa.int64()), pa.nulls(n, LISTING_SCHEMA.field("mtime").type)],
        schema=LISTING_SCHEMA,
    )


def list_prefix(prefix: str, settings: StorageSettings) -> pa.Table:
    """Every object under ``prefix`` (recursively), without metadata names, sorted by URI,
    with the size and modification time the listing itself returned. A local folder is
    listed by Arrow (one stat per entry, in C++), S3 by one paged ListObjectsV2 walk."""
    root = storage.strip_scheme(prefix).rstrip("/") or "/"
    try:
        if storage.is_s3(prefix):
            paths, sizes, mtimes = _list_s3(prefix, root, settings)
        else:
            paths, sizes, mtimes = _list_local(root)
    except FileNotFoundError:
        raise MeddxError(f"input not found: {prefix}") from None
    except PermissionError as exc:
        raise MeddxError(f"cannot list {prefix}: access denied") from exc
    table = pa.table(
        {
            "image_uri": pa.array(paths, pa.string()),
            "size": pa.array(sizes, pa.int64()),
            "mtime": mtimes,
        }
    )
    # Metadata names (_x, .x) below the prefix are never inputs; the prefix itself may be.
    below = pc.utf8_slice_codeunits(table["image_uri"], len(root))
    table = table.filter(pc.invert(pc.match_substring_regex(below, r"(^|/)[_.]")))
    if storage.is_s3(prefix):
        uris = pc.binary_join_element_wise("s3://", table["image_uri"], "")
        table = table.set_column(0, "image_uri", uris)
    return table.sort_by("image_uri").cast(LISTING_SCHEMA)


def _list_local(root: str) -> tuple[list, list, pa.Array]:
    fs = pafs.LocalFileSystem()
    (top,) = fs.get_file_info([root])
    if top.type == pafs.FileType.NotFound:
        raise FileNotFoundError(root)
    entries = [top] if top.type == pafs.FileType.File else []
    if top.type == pafs.FileType.Directory:
        entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = [e for e in entries if e.type == pafs.FileType.File]
    mtimes = pa.array([e.mtime_ns for e in files], pa.int64())
    return [e.path for e in files], [e.size for e in files], _ns_to_timestamp(mtimes)


def _list_s3(prefix: str, root: str, settings: StorageSettings) -> tuple[list, list, pa.Array]:
    fs = storage.filesystem(prefix, settings)
    # find(detail=True) keeps what ListObjectsV2 returned for each key (Size,
    # LastModified): nothing is asked per object.
    found = fs.find(root, detail=True)
    if not found:  # nothing below: the prefix is one object, an empty folder, or nothing
        info = fs.info(root)  # raises FileNotFoundError for nothing
        found = {root: info} if info.get("type") != "directory" else {}
    infos = [info for info in found.values() if info.get("type") != "directory"]
    mtimes = [storage.modified_time(info) for info in infos]
    seconds = pa.array(mtimes, pa.float64())
    micros = pc.cast(pc.round(pc.multiply(seconds, 1e6)), pa.int64())
    return (
        [info["name"] for info in infos],
        [info.get("size") for info in infos],
        pc.cast(micros, pa.timestamp("us", tz="UTC")),
    )


def _ns_to_timestamp(ns: pa.Array) -> pa.Array:
    return pc.cast(pc.divide(ns, 1000), pa.int64()).cast(pa.timestamp("us", tz="UTC"))


def list_inputs(
    input_uri: str, settings: StorageSettings, max_bytes: int = DEFAULT_MAX_OBJECT_BYTES
) -> list[str]:
    """The inputs' URIs alone, as a list (training, and callers that want few)."""
    return list_table(input_uri, settings, max_bytes)["image_uri"].to_pylist()


def list_located(
    input_uri: str,
    settings: StorageSettings,
    key: bytes | None = None,
    since_days: int | None = None,
    max_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
) -> tuple[pa.Table, dict[str, str] | None]:
    """The inputs as a listing table, and for a DICOMweb source each one's locator
    (dicomweb.py: what its retrieval needs, never written out); None for storage.
    ``since_days`` narrows a DICOMweb query to the studies of the last days; an empty
    answer is not an error there (a quiet night), the caller decides."""
    if dicomweb.is_source(input_uri):
        located = dicomweb.list_instances(input_uri, settings, key, since_days)
        return uris_table(list(located)), located
    return list_table(input_uri, settings, max_bytes), None


def read_manifest(
    uri: str, settings: StorageSettings, max_bytes: int = DEFAULT_MAX_OBJECT_BYTES
) -> pa.Table:
    """A manifest as a table with a non-null string ``uri`` column (CSV or Parquet),
    refused unread past ``max_bytes`` like any object. Its URIs are read with the run's
    own credentials: a manifest names what the run may read, so it is trusted input."""
    try:
        data = storage.read_bytes(uri, settings, max_bytes)
    except FileNotFoundError:
        raise MeddxError(f"manifest not found: {uri}") from None
    except storage.TooLarge as exc:
        raise MeddxError(f"manifest {uri}: {exc} (--max-object-bytes)") from None
    try:
        if uri.lower().endswith(".parquet"):
            table = pq.read_table(io.BytesIO(data))
        else:
            strings = pacsv.ConvertOptions(
                column_types={"uri": pa.string(), "label": pa.string(), "study_id": pa.string()}
            )
            table = pacsv.read_csv(io.BytesIO(data), convert_options=strings)
    except (pa.ArrowInvalid, OSError) as exc:
        raise MeddxError(f"cannot read manifest {uri}: {one_line(exc)}") from None
    if "uri" not in table.column_names:
        raise MeddxError(f"manifest {uri} needs a 'uri' column")
    # URIs in a manifest are taken as written: absolute paths or s3:// URIs.
    return table.filter(pc.is_valid(table["uri"]))


def manifest_labels(uri: str, settings: StorageSettings) -> dict[str, str]:
    """``uri -> label`` from a manifest (rows without a label are left out)."""
    table = read_manifest(uri, settings)
    if "label" not in table.column_names:
        raise MeddxError(f"manifest {uri} needs a 'label' column")
    return {
        u: str(lbl)
        for u, lbl in zip(table["uri"].to_pylist(), table["label"].to_pylist(), strict=True)
        if lbl not in (None, "")
    }


def manifest_findings(
    uri: str, settings: StorageSettings, findings: list[str] | tuple[str, ...]
) -> dict[str, tuple[int, ...]]:
    """``uri -> (0/1 per finding)`` from a multi-label manifest: one 0/1 column per
    finding, named as the finding. Rows with a missing value are left out."""
    table = read_manifest(uri, settings)
    missing = [f for f in findings if f not in table.column_names]
    if missing:
        raise MeddxError(f"manifest {uri} has no column for finding(s) {', '.join(missing)}")
    columns = [table[f].to_pylist() for f in findings]
    out = {}
    for i, u in enumerate(table["uri"].to_pylist()):
        values = [c[i] for c in columns]
        if any(v in (None, "") for v in values):
            continue
        try:
            flags = tuple(int(float(v)) for v in values)
        except ValueError:
            flags = (-1,)
        if not set(flags) <= {0, 1}:
            raise MeddxError(f"manifest {uri}: finding columns hold 0 or 1, not {values} ({u})")
        out[u] = flags
    return out


def label_from_path(uri: str) -> str:
    """The class folder an input sits in: ``.../opacity/x.png`` -> ``opacity``."""
    return posixpath.basename(posixpath.dirname(storage.shard_of(uri)))


def labelled_inputs(data_uri: str, settings: StorageSettings) -> list[tuple[str, str]]:
    """(uri, label) for training: a manifest given as DATA, ``DATA/_manifest.csv`` if
    present, else class folder names."""
    if is_manifest(data_uri):
        return sorted(manifest_labels(data_uri, settings).items())
    manifest = storage.join(data_uri, MANIFEST_NAME)
    if storage.exists(manifest, settings):
        return sorted(manifest_labels(manifest, settings).items())
    return [(uri, label_from_path(uri)) for uri in list_inputs(data_uri, settings)]


def labelled_findings(
    data_uri: str, settings: StorageSettings, findings: list[str] | tuple[str, ...]
) -> list[tuple[str, tuple[int, ...]]]:
    """(uri, 0/1 per finding) for multi-label training: from a manifest given as DATA or
    ``DATA/_manifest.csv`` (folder names cannot carry several findings)."""
    manifest = data_uri if is_manifest(data_uri) else storage.join(data_uri, MANIFEST_NAME)
    if not storage.exists(manifest, settings):
        raise MeddxError(f"multi-label training needs a manifest with finding columns: {manifest}")
    return sorted(manifest_findings(manifest, settings, findings).items())
