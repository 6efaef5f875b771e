"""What to read: INPUT as a stream of Arrow batches of inputs, and the manifests that
name inputs and labels.

INPUT is one of
- a folder or s3:// prefix: every object under it, recursively (``prefixes.py``);
- a ``.csv`` or ``.parquet`` manifest with a ``uri`` column (optional ``label`` and
  ``study_id``), or an S3 Inventory listing: only the listed objects, nothing is listed,
  so a night's new studies start scoring at once;
- a DICOMweb query (``dicomweb.py``) or a DIMSE one (C-FIND, ``dimse.py``): the
  instances it finds.

A listing is data, not a Python list: ``Listing`` streams ``image_uri``, ``size``,
``mtime`` and ``etag`` (``names.LISTING_SCHEMA``) as the listing returned them (no
per-object ``info()`` or HEAD), null where a manifest or a PACS says nothing of them.

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
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from meddx import MeddxError, one_line
from meddx.inputs import dicomweb, dimse, storage
from meddx.inputs.prefixes import Prefix
from meddx.inputs.storage import StorageSettings
from meddx.names import (
    DEFAULT_MAX_OBJECT_BYTES,
    LISTING_SCHEMA,
    MANIFEST_NAME,
)
from meddx.names import (
    LISTING_BATCH_ROWS as BATCH_ROWS,
)

MANIFEST_SUFFIXES = (".csv", ".parquet")


def is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_SUFFIXES)


# An S3 Inventory's version columns, where it lists versions.
INVENTORY_VERSIONS = {"is_latest", "is_delete_marker"}
CSV_ROW_BYTES = 64  # about what a CSV manifest's row of URI (and label) takes
# Columns a manifest may carry beside ``uri``, and an S3 Inventory listing's names for
# them (its ``bucket`` and ``key`` make the URI): taken as the listing's facts.
MANIFEST_FACTS = {
    "size": ("size",),
    "mtime": ("mtime", "last_modified_date"),
    "etag": ("etag", "e_tag"),
}


class Listing:
    """The inputs INPUT names, as LISTING_SCHEMA batches: ``batches()`` streams them (a
    manifest batch by batch, a prefix subtree by subtree: neither is held whole),
    ``table()`` gathers them, unique by URI, in the listing's order. ``failure`` holds
    the error a stream met, for a consumer (a query engine) that reports it as its own."""

    def __init__(
        self,
        source: str,
        table=None,
        settings=None,
        empty_ok: bool = False,
        prefix: Prefix | None = None,
    ):
        self.source, self._table, self._settings = source, table, settings
        self._prefix = prefix
        self.empty_ok = empty_ok  # a PACS's quiet night is no error: the caller decides
        # A manifest may name an input twice; a prefix, a table or a PACS each once.
        self.may_repeat = table is None and prefix is None
        self.failure: Exception | None = None

    @property
    def rows(self) -> int:
        """The inputs listed where the listing is held; a manifest's rows as its Parquet
        footer says, or a CSV's as its bytes suggest; a prefix's: 0 (not known yet)."""
        if self._table is not None:
            return self._table.num_rows
        if self._prefix is not None:
            return 0
        path = storage.strip_scheme(self.source)
        filesystem = storage.arrow_filesystem(self.source, self._settings)
        try:
            if self.source.lower().endswith(".parquet"):
                with filesystem.open_input_file(path) as fh:
                    return pq.read_metadata(fh).num_rows
            return (filesystem.get_file_info(path).size or 0) // CSV_ROW_BYTES
        except (OSError, pa.ArrowInvalid):
            return 0  # the stream will say what is wrong with it

    def batches(self) -> pa.RecordBatchReader:
        if self._table is not None:
            return pa.RecordBatchReader.from_batches(
                LISTING_SCHEMA, self._table.to_batches(BATCH_ROWS)
            )
        if self._prefix is not None:
            return pa.RecordBatchReader.from_batches(LISTING_SCHEMA, self._prefix_batches())
        return pa.RecordBatchReader.from_batches(LISTING_SCHEMA, self._manifest_batches())

    def table(self) -> pa.Table:
        if self._table is None:
            try:
                table = self.batches().read_all()
            except Exception:
                if self.failure:
                    raise self.failure from None
                raise
            if self.may_repeat:  # a study listed twice is still one input (the first)
                table = table.take(pc.index_in(pc.unique(table["image_uri"]), table["image_uri"]))
            self._table = table
        if not (self._table.num_rows or self.empty_ok):
            raise MeddxError(f"no inputs under {self.source}")
        return self._table

    def _prefix_batches(self):
        """The prefix's batches; a failure below its top level (a folder it may not read,
        a lost connection, a listing task that died) is one line naming INPUT, never the
        path below it, which may hold patient data."""
        try:
            yield from self._prefix.batches()
        except PermissionError:
            self.failure = MeddxError(f"cannot list {self.source}: access denied below it")
            raise self.failure from None
        except Exception as exc:
            self.failure = MeddxError(f"listing {self.source} failed ({type(exc).__name__})")
            raise self.failure from None

    def _manifest_batches(self):
        try:
            scanner = _manifest_scanner(self.source, self._settings)
            for batch in scanner.to_batches():
                yield _listing_batch(batch)
        except MeddxError as exc:
            self.failure = exc
            raise
        except (pa.ArrowException, OSError) as exc:
            if isinstance(exc, FileNotFoundError):
                self.failure = MeddxError(f"manifest not found: {self.source}")
            else:
                self.failure = MeddxError(f"cannot read manifest {self.source}: {one_line(exc)}")
            raise self.failure from None


def _manifest_scanner(uri: str, settings: StorageSettings) -> pads.Scanner:
    if uri.lower().endswith(".parquet"):
        # Row group by row group, not every column chunk read ahead at once.
        no_read_ahead = pads.ParquetFragmentScanOptions(pre_buffer=False)
        fmt = pads.ParquetFileFormat(default_fragment_scan_options=no_read_ahead)
    else:
        strings = {c: pa.string() for c in ("uri", "label", "study_id", "etag", "e_tag")}
        fmt = pads.CsvFileFormat(convert_options=pacsv.ConvertOptions(column_types=strings))
    path = storage.strip_scheme(uri)
    filesystem = storage.arrow_filesystem(uri, settings)
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    dataset = pads.dataset(path, filesystem=filesystem, format=fmt)
    names = set(dataset.schema.names)
    if "uri" in names:
        columns = {"uri": pc.field("uri")}
    elif {"bucket", "key"} <= names:  # an S3 Inventory listing
        columns = {"bucket": pc.field("bucket"), "key": pc.field("key")}
        for version in INVENTORY_VERSIONS & names:
            columns[version] = pc.field(version)
    else:
        raise MeddxError(f"manifest {uri} needs a 'uri' column (or an S3 Inventory's bucket, key)")
    for fact, candidates in MANIFEST_FACTS.items():
        found = next((c for c in candidates if c in names), None)
        if found:
            columns[fact] = pc.field(found)
    return dataset.scanner(
        columns=columns, batch_size=BATCH_ROWS, batch_readahead=1, fragment_readahead=1
    )


def _listing_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A manifest's batch as LISTING_SCHEMA: rows without a URI left out. An S3
    Inventory's rows are its objects as a prefix listing would give them: metadata names
    (``_x``, ``.x``) and folder markers left out, and, in a versioned inventory, only
    the current version of each object that is not deleted."""
    names = batch.schema.names
    if "uri" in names:
        uris = batch["uri"].cast(pa.string())
    else:
        bucket, key = batch["bucket"].cast(pa.string()), batch["key"].cast(pa.string())
        metadata = pc.match_substring_regex(key, storage.HIDDEN_PART + "|/$")  # or a folder
        keep = pc.invert(pc.fill_null(metadata, True))
        if "is_latest" in names:
            keep = pc.and_(keep, pc.fill_null(batch["is_latest"].cast(pa.bool_()), True))
        if "is_delete_marker" in names:
            deleted = pc.fill_null(batch["is_delete_marker"].cast(pa.bool_()), False)
            keep = pc.and_(keep, pc.invert(deleted))
        batch = batch.filter(keep)
        bucket, key = batch["bucket"].cast(pa.string()), batch["key"].cast(pa.string())
        uris = pc.binary_join_element_wise("s3://", bucket, "/", key, "")
    n = batch.num_rows
    columns = [uris]
    for field in LISTING_SCHEMA:
        if field.name == "image_uri":
            continue
        if field.name not in names:
            columns.append(pa.nulls(n, field.type))
            continue
        values = batch[field.name]
        if field.name == "mtime" and pa.types.is_timestamp(values.type) and values.type.tz is None:
            values = pc.assume_timezone(values, "UTC")
        if field.name == "mtime" and (
            pa.types.is_integer(values.type) or pa.types.is_floating(values.type)
        ):
            # Seconds since the epoch, as many exports write them.
            micros = pc.round(pc.multiply(values.cast(pa.float64()), 1e6))
            values = micros.cast(pa.int64())
        columns.append(pc.cast(values, field.type, safe=False))
    table = pa.RecordBatch.from_arrays(columns, schema=LISTING_SCHEMA)
    return table.filter(pc.is_valid(table["image_uri"]))


def open_listing(input_uri: str, settings: StorageSettings) -> Listing:
    """The inputs named by INPUT: a manifest streamed as it is read, a prefix or folder
    listed subtree by subtree, sorted by URI (its top level is listed now: a prefix
    that does not exist is refused at once)."""
    if is_manifest(input_uri):
        return Listing(input_uri, settings=settings)
    return Listing(input_uri, settings=settings, prefix=Prefix(input_uri, settings))


def list_table(input_uri: str, settings: StorageSettings) -> pa.Table:
    """The inputs named by INPUT (prefix, folder or manifest) as a LISTING_SCHEMA table,
    sorted by URI for a prefix, in first-seen order for a manifest."""
    return open_listing(input_uri, settings).table()


def uris_table(uris) -> pa.Table:
    """A listing of URIs alone (a manifest's, a PACS's): size, mtime and etag null."""
    uris = pa.chunked_array([uris]) if isinstance(uris, pa.Array) else uris
    if not isinstance(uris, pa.ChunkedArray):
        uris = pa.chunked_array([pa.array(list(uris), pa.string())], pa.string())
    n = len(uris)
    nulls = [pa.nulls(n, f.type) for f in LISTING_SCHEMA][1:]
    return pa.table([uris, *nulls], schema=LISTING_SCHEMA)


def list_inputs(input_uri: str, settings: StorageSettings) -> list[str]:
    """The inputs' URIs alone, as a list (training, and callers that want few)."""
    return list_table(input_uri, settings)["image_uri"].to_pylist()


def list_located(
    input_uri: str,
    settings: StorageSettings,
    key: bytes | None = None,
    since_days: int | None = None,
) -> tuple[Listing, pa.Table | None]:
    """The inputs as a Listing, and for a PACS source (DICOMweb or DIMSE) each one's
    locator (``dicomweb.LOCATED_SCHEMA``: what its retrieval needs, never written out);
    None for storage.
    ``since_days`` narrows a PACS query to the studies of the last days; an empty
    answer is not an error there (a quiet night), the caller decides."""
    for pacs in (dicomweb, dimse):
        if pacs.is_source(input_uri):
            located = pacs.list_instances(input_uri, settings, key, since_days)
            listed = Listing(input_uri, uris_table(located["image_uri"]), empty_ok=True)
            return listed, located
    return open_listing(input_uri, settings), None


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
