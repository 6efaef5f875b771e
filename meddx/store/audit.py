"""The audit log: what each run that read patient data or wrote results did, appended
under ``OUT/_audit/`` and never rewritten (the automatic logs of EU AI Act Art. 12).

    OUT/_audit/runs/dt=DATE/RUN_ID-start.parquet    the run began (RECORD_SCHEMA)
    OUT/_audit/runs/dt=DATE/RUN_ID-end.parquet      ... and how it ended
    OUT/_audit/inputs/dt=DATE/RUN_ID.parquet        each committed row (INPUT_SCHEMA)

One small Parquet file per record, under a name no other run has (its run id), created
only where nothing is (a conditional put on S3, ``link(2)`` on disk): records need no
lease, so a run the lease refused is recorded too, and no record is ever overwritten.
DATE is the day the record was written. Any engine reads the folders as tables
(``read_parquet('OUT/_audit/runs/**/*.parquet', hive_partitioning=true)``).

A run's start record is written once it holds the lease and has read its checkpoints,
before it lists an input; its end record on every way out, saying how it ended
(``committed``, ``nothing new``, ``alarm``, ``failed``, ``refused``, ``interrupted``)
and the exit status that means. A run refused or failed before its start record gets
both at the end. A run killed (SIGKILL, a lost node) leaves a start record without an
end: ``did not finish``.

Nothing in a record identifies a patient or carries a secret: URIs are shown without
credentials or query values (a PACS query's values may be a patient's), options as the
command line gave them (never from the environment), errors by their type alone (a
message may quote a path), and each input by a pseudonymous id: its URI when it is a
pseudonym already, else a keyed hash of it (the ``--pseudonymize-paths`` pseudonym), or
a plain sha256 without a key.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import getpass
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import socket
import uuid
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from meddx import MeddxAlarm, MeddxBusy, MeddxError, __version__
from meddx.inputs import dicomweb, dimse, path_pseudonyms, storage
from meddx.inputs.storage import StorageSettings

log = logging.getLogger(__name__)

AUDIT = "_audit"
RUNS, INPUTS = "runs", "inputs"
# A run with a start record and no end: killed, or (until it ends) still running.
DID_NOT_FINISH = "did not finish"
# Exit statuses as meddx's command line gives them (meddx/cli/__init__.py).
EXIT_ERROR, EXIT_ALARM, EXIT_BUSY, EXIT_INTERRUPTED = 1, 3, 4, 130

RECORD_SCHEMA = pa.schema(
    [
        ("event", pa.string()),  # start, end
        ("time", pa.timestamp("us", tz="UTC")),  # start: when the run began
        ("run_id", pa.string()),
        ("command", pa.string()),  # what ran: score, screen, prepare, train
        ("invoked", pa.string()),  # the command line's command ("meddx listen"); "" = API
        ("options", pa.string()),  # JSON: the options given on the command line
        ("host", pa.string()),
        ("user", pa.string()),  # the OS user
        ("pid", pa.int64()),
        ("meddx_version", pa.string()),
        ("input", pa.string()),
        ("out", pa.string()),
        ("model_names", pa.list_(pa.string())),
        ("model_sha256", pa.list_(pa.string())),
        # The end record's: how it ended, and what it committed and sent.
        ("outcome", pa.string()),
        ("exit_status", pa.int32()),
        ("error_type", pa.string()),  # the exception's type: its message stays out
        ("resumed", pa.string()),  # --resume: the run whose id its rows carry
        ("rows", pa.int64()),  # committed: one per input and model
        ("errors", pa.int64()),  # of them, status error
        ("inputs", pa.int64()),  # distinct inputs among them
        ("results_to", pa.string()),
        ("reports_stored", pa.int64()),
        ("reports_failed", pa.int64()),
        # The studies whose report was stored, by pseudonym: an SR's UIDs are functions
        # of its study's pseudonym and the model's sha256 (meddx.pacs.reports).
        ("reported_studies", pa.list_(pa.string())),
    ]
)
INPUT_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("time", pa.timestamp("us", tz="UTC")),  # the commit's
        ("input_id", pa.string()),
        ("study_pseudonym", pa.string()),
        ("model_name", pa.string()),
        ("model_sha256", pa.string()),  # a store's rows: its decoder's fingerprint
        ("status", pa.string()),  # ok, error, skipped
        ("qc", pa.string()),
    ]
)


@dataclass(frozen=True)
class Invocation:
    """What the command line ran: set by the CLI around each command (``INVOCATION``)."""

    command: str  # "meddx screen"
    options: dict  # name -> value as given, shown without credentials (``shown``)


INVOCATION: contextvars.ContextVar[Invocation | None] = contextvars.ContextVar(
    "meddx_invocation", default=None
)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_run_id() -> str:
    """An id for a run that has none of its own (``meddx train``), as runs' ids read."""
    return f"{_now().date().isoformat()}-{uuid.uuid4().hex[:12]}"


URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Option names whose values are secrets, should one ever be given on the command line.
SECRET_NAME = re.compile(r"password|token|secret", re.IGNORECASE)


def shown(value: str | None) -> str:
    """A URI as a record shows it: no user info (a DIMSE peer keeps its AE title, which
    is no credential), no fragment, and a query's keys without their values. A path
    stays as it is."""
    if not value or not URL.match(value):
        return value or ""
    parts = urlsplit(value)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host + (f":{port}" if port else "")
    if dimse.is_source(value) and parts.username:
        netloc = f"{parts.username}@{netloc}"
    keys = "&".join(k for k, _ in parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit((parts.scheme, netloc, parts.path, keys, ""))


def shown_option(name: str, value):
    """An option's value for a record: numbers and flags as they are, text as ``shown``."""
    if SECRET_NAME.search(name):
        return "(hidden)"
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return [shown_option(name, v) for v in value]
    if isinstance(value, str | os.PathLike):
        return shown(os.fspath(value))
    return "(given)"


def input_ids(uris: list[str], key: bytes | None) -> list[str]:
    """Each input's pseudonymous id: a PACS instance's URI or a path pseudonym as it is,
    else the keyed pseudonym ``--pseudonymize-paths`` would give it, or without a key a
    plain sha256 (a path may hold an MRN)."""
    out = []
    for uri in uris:
        if dicomweb.is_instance(uri) or dimse.is_instance(uri):
            out.append(uri)
        elif path_pseudonyms.is_path_pseudonym(uri) or key:
            out.append(path_pseudonyms.path_pseudonym(uri, key))
        else:
            out.append("sha256:" + hashlib.sha256(uri.encode()).hexdigest()[:32])
    return out


def beside(checkpoint: str) -> str:
    """Where a checkpoint's run is recorded: its folder (``FOLDER/_audit/``)."""
    uri = storage.absolute(checkpoint)
    return uri.rsplit("/", 1)[0] if storage.is_s3(uri) else os.path.dirname(uri)


# ---- writing --------------------------------------------------------------------------


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a passwd entry
        return str(os.getuid())


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def append(out: str, settings: StorageSettings, name: str, data: bytes) -> None:
    """Create ``OUT/_audit/NAME`` holding ``data``, only where nothing is: a conditional
    put on S3; on disk a fully written hidden file ``link(2)``ed to the name, so no
    reader ever sees a torn record. An existing name is an error, never overwritten."""
    uri = storage.join(out, AUDIT, name)
    path = storage.strip_scheme(uri)
    fs = storage.filesystem(uri, settings)
    if storage.is_s3(uri):
        bucket, key, _ = fs.split_path(path)
        try:
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except OSError as exc:
            raise MeddxError(
                f"cannot write the audit record {name} ({type(exc).__name__})"
            ) from None
        return
    folder, base = os.path.split(path)
    tmp = os.path.join(folder, f".{base}.{uuid.uuid4().hex}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)  # fails if the name exists: never rewritten
    except OSError as exc:
        raise MeddxError(f"cannot write the audit record {name} ({type(exc).__name__})") from None
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _ended_by(exc: BaseException | None) -> tuple[str, int, str]:
    """(outcome, exit status, error type) of a run that ended with ``exc``."""
    if exc is None:
        return "", 0, ""
    name = type(exc).__name__
    if isinstance(exc, MeddxBusy):
        return "refused", EXIT_BUSY, name
    if isinstance(exc, MeddxAlarm):
        return "alarm", EXIT_ALARM, name
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", EXIT_INTERRUPTED, name
    if isinstance(exc, SystemExit):  # SIGTERM: 128 + 15
        code = exc.code if isinstance(exc.code, int) else EXIT_ERROR
        return "interrupted", code, name
    return "failed", EXIT_ERROR, name


@dataclass
class Record:
    """One run's audit records: a context manager around the run, which the run tells
    what it ran (``begin``), committed (``committed``) and sent (``sent``). Its end
    record is written on every way out."""

    out: str
    settings: StorageSettings
    command: str
    input: str
    run_id: str
    results_to: str | None = None
    started: dt.datetime = field(default_factory=_now)
    invocation: Invocation | None = field(default_factory=INVOCATION.get)
    models: list[tuple[str, str]] = field(default_factory=list)
    begun: bool = False
    wrote: bool = False  # rows committed, a checkpoint written
    counts: dict = field(default_factory=dict)  # rows, errors, inputs, resumed
    sent: object = None  # meddx.pacs.results.Sent

    def __enter__(self) -> Record:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if not self.begun:
                self._write("start", self._fields())
            outcome, status, error = _ended_by(exc)
            if exc is None:
                outcome = "committed" if self.wrote else "nothing new"
            sent = self.sent
            end = self._fields(
                outcome=outcome,
                exit_status=status,
                error_type=error,
                results_to=shown(self.results_to) if self.results_to else None,
                reports_stored=getattr(sent, "studies", None),
                reports_failed=len(sent.failed) if sent is not None else None,
                reported_studies=list(getattr(sent, "reported", ()) or []) or None,
                **self.counts,
            )
            self._write("end", {**end, "time": _now()})
        except Exception as failed:  # never hides how the run ended
            log.warning("meddx: the end of run %s was not recorded: %s", self.run_id, failed)

    def begin(self, ckpts, shas) -> None:
        """The run holds what it needs and is about to read its first input: its start
        record, naming its models (``ckpts``: checkpoints, None for a store's decoder)."""
        names = [getattr(c, "model_name", "") if c is not None else "" for c in ckpts]
        self._begin(list(zip(names, shas, strict=True)))

    def begin_training(self, architecture: str) -> None:
        """A training run's start record: the model it makes has no sha256 yet."""
        self._begin([(architecture, "")])

    def _begin(self, models: list[tuple[str, str]]) -> None:
        self.models = models
        self._write("start", self._fields())
        self.begun = True

    def trained(self, model_name: str, sha: str, images: int) -> None:
        """A checkpoint was written, trained and validated on ``images`` inputs: the
        model the end record names."""
        self.models, self.wrote = [(model_name, sha)], True
        self.counts = {"inputs": images}

    def committed(self, rows_run_id: str, run_date: str, schema: pa.Schema, key) -> None:
        """The run committed: each of its rows (those of ``rows_run_id``, its own or the
        run it resumed) as an input's pseudonymous id and outcome."""
        from meddx.store import commit  # it reads the rows just committed

        wanted = ["image_uri", "status", "study_pseudonym", "model_name", "model_sha256"]
        wanted += ["decode_sha256", "qc"]
        rows = commit.read_results(
            self.out,
            self.settings,
            [c for c in wanted if c in schema.names],
            where=pc.field("run_id") == rows_run_id,
            dates=[run_date],
            schema=schema,
        )
        n = rows.num_rows

        def column(name: str, default: str | None = "") -> pa.Array:
            if name in rows.column_names:
                return rows[name].combine_chunks()
            return pa.array([default] * n, pa.string())

        uris = rows["image_uri"].to_pylist()
        # A store's rows name what made them by its decoder's fingerprint.
        made_by = "model_sha256" if "model_sha256" in rows.column_names else "decode_sha256"
        now = _now()
        table = pa.table(
            {
                "run_id": pa.array([self.run_id] * n, pa.string()),
                "time": pa.array([now] * n, INPUT_SCHEMA.field("time").type),
                "input_id": pa.array(input_ids(uris, key), pa.string()),
                "study_pseudonym": column("study_pseudonym", None),
                "model_name": column("model_name"),
                "model_sha256": column(made_by),
                "status": column("status"),
                "qc": column("qc", None),
            },
            schema=INPUT_SCHEMA,
        )
        day = now.date().isoformat()
        append(self.out, self.settings, f"{INPUTS}/dt={day}/{self.run_id}.parquet", _parquet(table))
        errors = pc.sum(pc.equal(table["status"], "error")).as_py() or 0
        self.counts = {
            "rows": n,
            "errors": errors,
            "inputs": len(set(uris)),
            "resumed": rows_run_id if rows_run_id != self.run_id else None,
        }
        self.wrote = True

    def _fields(self, **end) -> dict:
        how = self.invocation
        return {
            "time": self.started,
            "run_id": self.run_id,
            "command": self.command,
            "invoked": how.command if how else "",
            "options": json.dumps(how.options if how else {}, sort_keys=True),
            "host": socket.gethostname(),
            "user": _user(),
            "pid": os.getpid(),
            "meddx_version": __version__,
            "input": shown(self.input),
            "out": shown(self.out),
            "model_names": [name for name, _ in self.models],
            "model_sha256": [sha for _, sha in self.models],
            **end,
        }

    def _write(self, event: str, fields: dict) -> None:
        table = pa.Table.from_pylist([{**fields, "event": event}], schema=RECORD_SCHEMA)
        day = fields["time"].date().isoformat()
        name = f"{RUNS}/dt={day}/{self.run_id}-{event}.parquet"
        append(self.out, self.settings, name, _parquet(table))


def recorded(
    out: str,
    settings: StorageSettings,
    command: str,
    input: str,
    run_id: str,
    results_to: str | None = None,
) -> Record:
    """The audit records of run ``run_id`` of ``command`` over ``input`` into ``out``:
    ``with recorded(...) as record:`` around the run."""
    return Record(out, settings, command, input, run_id, results_to)


# ---- reading ------------------------------------------------------------------------


def _files(out: str, settings: StorageSettings, kind: str, since: dt.date | None) -> list[str]:
    """The record files of ``kind`` (runs, inputs), of days from ``since`` on."""
    fs = storage.filesystem(out, settings)
    root = posixpath.join(storage.strip_scheme(out), AUDIT, kind)
    fs.invalidate_cache()
    if not fs.exists(root):
        return []
    first = f"dt={since.isoformat()}" if since else ""
    days = sorted(p for p in fs.ls(root, detail=False) if posixpath.basename(p) >= first)
    return sorted(
        f
        for day in days
        if posixpath.basename(day).startswith("dt=")
        for f in fs.find(day)
        if f.endswith(".parquet") and not posixpath.basename(f).startswith((".", "_"))
    )


def _read(out: str, settings: StorageSettings, files: list[str], schema: pa.Schema, where=None):
    if not files:
        return schema.empty_table()
    import pyarrow.dataset as pads

    ds = pads.dataset(
        files, filesystem=storage.arrow_filesystem(out, settings), format="parquet", schema=schema
    )
    return ds.to_table(filter=where)


def runs(out: str, settings: StorageSettings, since: dt.date | None = None) -> list[dict]:
    """Each recorded run under OUT, by when it began: its start record's fields, updated
    by its end record's (outcome ``did not finish`` where there is none). ``since``:
    runs with a record on or after that day."""
    table = _read(out, settings, _files(out, settings, RUNS, since), RECORD_SCHEMA)
    found: dict[str, dict] = {}
    for row in table.sort_by([("time", "ascending")]).to_pylist():
        run = found.setdefault(row["run_id"], {})
        if row["event"] == "start":
            run.update(row)
            run["started"] = row["time"]
        else:
            run.update({k: v for k, v in row.items() if v is not None})
            run.setdefault("started", row["time"])  # its start fell before ``since``
            run["ended"] = row["time"]
    for run in found.values():
        if "ended" not in run:
            run["outcome"], run["exit_status"] = DID_NOT_FINISH, None
    return sorted(found.values(), key=lambda r: r["started"])


def inputs_of_study(
    out: str, settings: StorageSettings, study: str, since: dt.date | None = None
) -> pa.Table:
    """Every recorded input of study ``study`` (its pseudonym): which run, model and
    outcome, oldest first."""
    files = _files(out, settings, INPUTS, since)
    found = _read(out, settings, files, INPUT_SCHEMA, pc.field("study_pseudonym") == study)
    return found.sort_by([("time", "ascending"), ("input_id", "ascending")])
