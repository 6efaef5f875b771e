"""The PACS over DIMSE: who meddx talks to, how an association is opened, and the PACS
as a source (C-FIND to list; C-GET, or C-MOVE where a PACS allows only that, to read).

    meddx screen 'dimse://PACS@pacs.example:104?ModalitiesInStudy=DX' ...
    meddx listen ... --results-to dimse://PACS@pacs.example:104

A peer is ``dimse://AET@HOST:PORT``: the called AE title, the host and the port. A
source's study-level matching keys, by keyword, follow ``?`` as a DICOMweb source's
QIDO-RS filters do (a comma separates a code's or UID's values: ``ModalitiesInStudy=
CR,DX``). meddx calls as ``MEDDX_AE_TITLE`` (default ``MEDDX``), which the PACS must know.

- Listing (Study Root C-FIND, in the driver, one association): studies, then their
  series, then their instances. Series that are not images and meddx's own results
  series are skipped, as for DICOMweb. An answer without a usable UID is skipped, and a
  level past ``dicomweb.QIDO_MAX_RESULTS`` answers cancelled: either is a warning.
- Every instance is one input, ``dimse://HOST:PORT/instances/P``, P the keyed pseudonym
  of its SOP Instance UID; its locator ("dimse://AET@HOST:PORT STUDY SERIES SOP
  SOPCLASS") travels beside it in the read stage's rows, never further.
- Retrieval (C-GET, in the read tasks, one association per instance): the SOP class is
  proposed in one presentation context per transfer syntax, so the stored bytes (JPEG
  2000, say) arrive untranscoded. Orthanc 1.10, offered one context listing every
  syntax, accepts Explicit VR Little Endian alone, then fails ("Cannot transcode").
  Refused or aborted associations and failure statuses are retried with back-off; an
  instance that stays unreadable is an error row.

pynetdicom does the protocol. Its INFO and DEBUG records quote identifiers (C-FIND keys,
UIDs): its loggers are held at WARNING here, as dicomweb.py holds dicomweb-client's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import pyarrow as pa
import pyarrow.compute as pc

from meddx import MeddxError, one_line
from meddx.imaging.dicom import pseudonym
from meddx.inputs import dicomweb
from meddx.inputs.storage import StorageSettings, TooLarge
from meddx.names import DIMSE_SCHEME

AE_TITLE_ENV = "MEDDX_AE_TITLE"
DEFAULT_AE_TITLE = "MEDDX"
DEFAULT_PORT = 104
# Seconds: opening an association, a DIMSE answer, the network itself.
ACSE_TIMEOUT, DIMSE_TIMEOUT, NETWORK_TIMEOUT = 30, 120, 120
# Seconds to open the TCP connection: without it a host that drops packets holds a read
# for the system's two minutes (DICOMweb's connect timeout is the same).
CONNECTION_TIMEOUT = 10
URI_SCHEME = DIMSE_SCHEME  # of image_uri: dimse://HOST:PORT/instances/PSEUDONYM
INSTANCE = re.compile(r"dimse://[^@/?#\s]+/instances/[0-9a-f]+")
# An AE title (PS3.5 6.2, VR AE): 1-16 characters of the default repertoire, no
# backslash or control character, not only spaces.
AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")
# A UID as a locator carries it: one value, no space (the locator's separator), at most
# PS3.5's 64 characters.
UID = re.compile(r"[^\s\\]{1,64}")
# What C-FIND asks of each series, and of each instance.
SERIES_KEYS = {"SeriesInstanceUID": "", "Modality": "", "SeriesDescription": ""}
IMAGE_KEYS = {"SOPInstanceUID": "", "SOPClassUID": ""}
# Keys whose comma-separated values are a C-FIND value list (a backslash in DICOM).
LISTED_VRS = ("CS", "UI")
# Statuses (PS3.4 C.4): pending (more to come), success, cancelled; and a C-STORE
# sub-operation's "out of resources", for an instance over the byte limit.
PENDING, SUCCESS, CANCELLED, REFUSED = (0xFF00, 0xFF01), 0x0000, 0xFE00, 0xA700
ATTEMPTS = 3  # per instance: associations refused or aborted, failure statuses

for _name in ("pynetdicom", "pynetdicom.assoc", "pynetdicom.events", "pynetdicom.acse"):
    logging.getLogger(_name).setLevel(logging.WARNING)
log = logging.getLogger(__name__)


def is_source(uri: str) -> bool:
    return uri.lower().startswith(DIMSE_SCHEME) and not is_instance(uri)


def is_instance(uri: str) -> bool:
    """An input a DIMSE listing named (``dimse://HOST:PORT/instances/PSEUDONYM``)."""
    return INSTANCE.fullmatch(uri) is not None


@dataclass(frozen=True)
class Peer:
    ae_title: str  # the called AE title
    host: str
    port: int
    # A source's study-level matching keys, and the options of its retrieval.
    filters: tuple[tuple[str, str], ...] = ()

    @property
    def where(self) -> str:
        """AET@HOST:PORT, for messages and for the inputs' names."""
        return f"{self.ae_title}@{self.address}"

    @property
    def address(self) -> str:
        """HOST:PORT, an IPv6 host in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """dimse://AET@HOST:PORT, with the options of its retrieval but no C-FIND key."""
        options = [(k, v) for k, v in self.filters if k in RETRIEVAL_OPTIONS]
        return f"{DIMSE_SCHEME}{self.where}" + (f"?{urlencode(options)}" if options else "")


def peer(uri: str) -> Peer:
    """``dimse://AET@HOST[:PORT][?KEY=VALUE&...]`` as a Peer; one line when it is not,
    which never quotes the query (its keys may be a patient's)."""
    shown = repr(uri.split("?", 1)[0])
    if not uri.lower().startswith(DIMSE_SCHEME):
        raise MeddxError(f"not a DIMSE peer: {shown} (dimse://AET@HOST:PORT)")
    parts = urlsplit(uri)
    if parts.password is not None:
        raise MeddxError("a DIMSE peer takes no password: dimse://AET@HOST:PORT")
    if not parts.username or not parts.hostname:
        raise MeddxError(f"a DIMSE peer needs an AE title and a host: {shown} (dimse://AET@HOST)")
    title = ae_title(unquote(parts.username))
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise MeddxError(f"not a port in {shown}") from None
    if parts.path not in ("", "/"):
        raise MeddxError(f"a DIMSE peer has no path: {shown} (dimse://AET@HOST:PORT?QUERY)")
    found = Peer(title, parts.hostname, port, tuple(parse_qsl(parts.query)))
    move_of(found)  # options that do not go together: one line now
    return found


def ae_title(text: str) -> str:
    """``text``, checked as an AE title; one line for a bad one."""
    if not AE_TITLE.fullmatch(text) or not text.strip():
        raise MeddxError(f"not an AE title (1-16 characters, no backslash): {text!r}")
    return text


def calling_ae_title() -> str:
    """The AE title meddx calls as: MEDDX_AE_TITLE, or MEDDX."""
    return ae_title(os.environ.get(AE_TITLE_ENV) or DEFAULT_AE_TITLE)


def application_entity():
    """A pynetdicom AE that calls as calling_ae_title(), with meddx's timeouts and no
    limit on the PDUs it takes (a film is megabytes)."""
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae_title())
    ae.acse_timeout, ae.dimse_timeout = ACSE_TIMEOUT, DIMSE_TIMEOUT
    ae.network_timeout, ae.connection_timeout = NETWORK_TIMEOUT, CONNECTION_TIMEOUT
    ae.maximum_pdu_size = 0
    return ae


class Unassociated(MeddxError):
    """The peer refused the association, aborted it, or did not answer."""


def associate(ae, target: Peer, **kwargs):
    """An established association with ``target``, or one line why not (refused,
    aborted, nobody there): no identifier in it. Unless ``max_pdu`` says otherwise, the
    peer may send PDUs of any size (at pynetdicom's 16 KB a film is a thousand)."""
    from pynetdicom import evt

    kwargs.setdefault("max_pdu", 0)
    # pynetdicom says "aborted" when no connection was made too: told apart here.
    connected: list[bool] = []
    handlers = [*kwargs.pop("evt_handlers", []), (evt.EVT_CONN_OPEN, connected.append)]
    assoc = ae.associate(
        target.host, target.port, ae_title=target.ae_title, evt_handlers=handlers, **kwargs
    )
    if assoc.is_established:
        return assoc
    if not connected:
        why = "cannot be reached (nothing answers on that host and port)"
    elif assoc.is_rejected:
        why = "rejected the association (is meddx's AE title known to it?)"
    elif assoc.is_aborted:
        why = "aborted the association"
    else:
        why = "did not answer"
    raise Unassociated(f"{target.where} {why}")


# ---- listing (C-FIND) -----------------------------------------------------------------


def list_instances(
    source: str, settings: StorageSettings, key: bytes | None, since_days: int | None = None
) -> pa.Table:
    """Every image instance the source's query matches, as a ``dicomweb.LOCATED_SCHEMA``
    table (one Arrow batch per series): its ``image_uri`` and its locator. With
    ``since_days``, only studies of the last that many days (unless the query sets its
    own StudyDate). ``settings``: as for every source (DIMSE has no use for them yet)."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    if key is None:
        raise MeddxError(
            "a DIMSE source needs MEDDX_PSEUDONYM_KEY: instances are named by keyed pseudonyms"
        )
    target = peer(source)
    keys = {k: v for k, v in target.filters if k not in RETRIEVAL_OPTIONS}
    if since_days is not None and "StudyDate" not in keys:
        keys["StudyDate"] = dicomweb.since_filter(since_days)
    studies_query = identifier("STUDY", **{"StudyInstanceUID": "", **keys})
    ae = application_entity()
    ae.add_requested_context(FIND)
    cut: Counter = Counter()
    batches: list[pa.RecordBatch] = []
    prefix = f"{URI_SCHEME}{target.address}/instances/"
    try:
        assoc = associate(ae, target)
    except MeddxError as exc:  # it names the peer first
        why = str(exc).removeprefix(f"{target.where} ")
        raise MeddxError(f"listing {target.where} failed: {why}") from None
    try:
        if not any(cx.abstract_syntax == FIND for cx in assoc.accepted_contexts):
            raise MeddxError("it does not offer Study Root C-FIND to meddx")
        finder = Finder(assoc, FIND, cut)
        for (study,) in finder.uids(studies_query, "studies", "StudyInstanceUID"):
            query = identifier("SERIES", StudyInstanceUID=study, **SERIES_KEYS)
            for series_answer in finder.answers(query, "series of a study"):
                if str(series_answer.get("Modality", "")).upper() in dicomweb.NOT_IMAGES:
                    continue
                if str(series_answer.get("SeriesDescription", "")) == dicomweb.RESULTS_SERIES:
                    continue
                (series,) = finder.usable(series_answer, "series of a study", "SeriesInstanceUID")
                if series is None:
                    continue
                query = identifier("IMAGE", **IMAGE_KEYS, **within(study, series))
                found = finder.uids(query, "instances of a series", "SOPInstanceUID", "SOPClassUID")
                uris = [f"{prefix}{pseudonym(sop, key)}" for sop, _ in found]
                locators = [" ".join((target.url, study, series, *uids)) for uids in found]
                batches.append(pa.record_batch([uris, locators], schema=dicomweb.LOCATED_SCHEMA))
    except MeddxError as exc:
        raise MeddxError(f"listing {target.where} failed: {exc}") from None
    except Exception as exc:  # the network, or a PACS that breaks the protocol
        raise MeddxError(f"listing {target.where} failed: {type(exc).__name__}") from None
    finally:
        assoc.release()
    warn_cut(target, cut)
    table = pa.Table.from_batches(batches, dicomweb.LOCATED_SCHEMA)
    # An instance listed twice (in two series' answers) is one input.
    return table.take(pc.index_in(pc.unique(table["image_uri"]), table["image_uri"]))


def identifier(level: str, **keys: str):
    """A C-FIND or C-GET identifier at ``level``, its keys by keyword. A key that is no
    DICOM keyword is one line naming it (a keyword, never a value)."""
    from pydicom import config
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset

    ds = Dataset()
    for keyword, value in {**keys, "QueryRetrieveLevel": level}.items():
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise MeddxError(f"not a DICOM keyword in the query: {keyword!r}")
        vr = dictionary_VR(tag)
        if vr in LISTED_VRS:
            value = value.replace(",", "\\")
        # Not validated: pydicom's warning about a value (a range, say) quotes it.
        ds[tag] = DataElement(tag, vr, value, validation_mode=config.IGNORE)
    return ds


class Finder:
    """C-FIND on one association: each query's answers, counted in ``cut`` where they
    were cut short (``("capped", level)``) or had no usable UID (``("unusable",
    level)``)."""

    def __init__(self, assoc, model: str, cut: Counter):
        self.assoc, self.model, self.cut, self.msg_id = assoc, model, cut, 0

    def answers(self, query, level: str) -> list:
        """The answers to ``query``, at most ``dicomweb.QIDO_MAX_RESULTS``: past them the
        query is cancelled and the rest read and dropped, so that the association stays
        usable. A failure status, or an association ended early, is one line."""
        self.msg_id = self.msg_id % 65535 + 1
        found, capped = [], False
        for status, answer in self.assoc.send_c_find(query, self.model, msg_id=self.msg_id):
            if "Status" not in status:  # pynetdicom's empty status: aborted or timed out
                raise MeddxError("the association ended or timed out during C-FIND")
            code = status.Status
            if code in PENDING:
                if capped or answer is None:
                    continue
                if len(found) == dicomweb.QIDO_MAX_RESULTS:
                    capped = True
                    self.cut["capped", level] += 1
                    self.assoc.send_c_cancel(self.msg_id, query_model=self.model)
                    continue
                found.append(answer)
            elif code not in (SUCCESS, CANCELLED):
                raise MeddxError(f"C-FIND failed with status 0x{code:04X}")
        return found

    def usable(self, answer, level: str, *keywords: str) -> tuple[str | None, ...]:
        """The UIDs ``keywords`` of an answer, or Nones (counted) where one is missing,
        empty, multi-valued or no UID a locator can carry."""
        values = tuple(answer.get(k) for k in keywords)
        if all(isinstance(v, str) and UID.fullmatch(v) for v in values):
            return tuple(str(v) for v in values)
        self.cut["unusable", level] += 1
        return (None,) * len(keywords)

    def uids(self, query, level: str, *keywords: str) -> list[tuple[str, ...]]:
        """The usable UIDs ``keywords`` of each answer to ``query``."""
        out = [self.usable(a, level, *keywords) for a in self.answers(query, level)]
        return [uids for uids in out if uids[0] is not None]


CUT = {
    "capped": "stopped at {}, the most meddx lists at one level; the rest are missing: "
    "narrow the query",
    "unusable": "without a usable UID skipped",
}


def warn_cut(target: Peer, cut: Counter) -> None:
    """A warning line for each way a listing left answers out, with how many at each
    level: a run that goes on without some studies says so in its log."""
    for why, says in CUT.items():
        levels = ", ".join(f"{n} of {what}" for (w, what), n in sorted(cut.items()) if w == why)
        if levels:
            says = says.format(dicomweb.QIDO_MAX_RESULTS)
            log.warning("meddx: DIMSE peer %s: C-FIND answers (%s) %s", target.where, levels, says)


def locator_parts(locator: str) -> tuple[Peer, str, str, str, str]:
    """(peer, study, series, sop, sop_class) of a DIMSE locator (a C-MOVE spool file
    may follow: ``spooled``)."""
    url, study, series, sop, sop_class = locator.split(" ", 5)[:5]
    return peer(url), study, series, sop, sop_class


# ---- retrieval (C-GET) ----------------------------------------------------------------


class Failed(MeddxError):
    """A retrieval that failed on the peer's side (a failure status, an association
    ended early): tried again."""


def retrieve(locator: str, max_bytes: int | None = None) -> bytes:
    """The instance's stored bytes as a Part 10 file (pynetdicom's file meta before the
    dataset the PACS sent, untranscoded), by C-GET or, where the source's URL says so,
    C-MOVE; tried ATTEMPTS times with back-off."""
    fetch = c_move if move_of(locator_parts(locator)[0]) else c_get
    for attempt in range(ATTEMPTS):
        try:
            return fetch(locator, max_bytes)
        except (Unassociated, Failed):
            if attempt == ATTEMPTS - 1:
                raise
            wait = dicomweb.BACKOFF_S * 2**attempt
            time.sleep(min(dicomweb.MAX_BACKOFF_S, wait) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def retrieval(ae, target: Peer, model: str, what: str, query, *args, **kwargs) -> int | None:
    """The final status of one C-GET or C-MOVE (``what``) on an association of its own
    (milliseconds beside a film's transfer; none is shared between the read threads)."""
    ae.add_requested_context(model)
    assoc = associate(ae, target, **kwargs)
    try:
        if not any(cx.abstract_syntax == model for cx in assoc.accepted_contexts):
            raise MeddxError(f"{target.where} does not offer Study Root {what} to meddx")
        send = assoc.send_c_get if what == "C-GET" else assoc.send_c_move
        final = None
        for status, _ in send(query, *args, model):
            if "Status" not in status:  # pynetdicom's empty status: aborted or timed out
                raise Failed(f"{target.where} ended the association or timed out during {what}")
            final = status.Status
        return final
    finally:
        assoc.release()


def within(study: str, series: str, sop: str | None = None) -> dict[str, str]:
    """The UIDs of a series (of an instance, with ``sop``) as identifier keys."""
    keys = {"StudyInstanceUID": study, "SeriesInstanceUID": series}
    return {**keys, "SOPInstanceUID": sop} if sop else keys


def c_get(locator: str, max_bytes: int | None = None) -> bytes:
    """One C-GET of one instance at IMAGE level: the PACS sends it back on the same
    association, as a C-STORE sub-operation meddx answers."""
    import pydicom.uid
    from pynetdicom import build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

    target, study, series, sop, sop_class = locator_parts(locator)
    ae = application_entity()
    for syntax in pydicom.uid.AllTransferSyntaxes:  # one each: see the module's docstring
        ae.add_requested_context(sop_class, [syntax])
    received: list[bytes] = []
    too_large: list[int] = []

    def on_store(event) -> int:
        data = event.encoded_dataset(include_meta=True)
        if max_bytes is not None and len(data) > max_bytes:
            too_large.append(len(data))
            return REFUSED
        received.append(data)
        return SUCCESS

    query = identifier("IMAGE", **within(study, series, sop))
    role, handlers = [build_role(sop_class, scp_role=True)], [(evt.EVT_C_STORE, on_store)]
    final = retrieval(ae, target, GET, "C-GET", query, ext_neg=role, evt_handlers=handlers)
    if too_large:
        raise TooLarge(too_large[0], max_bytes or 0)
    if final not in (SUCCESS, *PENDING) and not received:
        raise Failed(f"C-GET from {target.where} failed with status 0x{final or 0:04X}")
    if len(received) != 1:
        what = "no instance" if not received else f"{len(received)} instances"
        raise MeddxError(f"C-GET from {target.where} brought {what} for one SOP Instance UID")
    return received[0]


# ---- retrieval where a PACS allows only C-MOVE ----------------------------------------

# Options of a source's URL that choose the retrieval, never sent as C-FIND keys:
# retrieve=move, and the destination the PACS knows meddx by (move_to=AET) and where
# meddx's storage SCP listens for it (move_port=PORT): pipelines/dimse_spool.py.
RETRIEVAL_OPTIONS = ("retrieve", "move_to", "move_port")


def move_of(target: Peer) -> tuple[str, int] | None:
    """The C-MOVE destination a peer's URL names, (AE title, port) of meddx's storage
    SCP, or None for C-GET; one line for options that do not go together."""
    options = dict(target.filters)
    how = options.get("retrieve", "get")
    if how not in ("get", "move"):
        raise MeddxError(f"retrieve= is get or move, got {how!r}")
    if how == "get":
        if {"move_to", "move_port"} & options.keys():
            raise MeddxError("move_to= and move_port= go with retrieve=move")
        return None
    port = options.get("move_port", "")
    if "move_to" not in options or not port.isdigit() or not 0 < int(port) < 65536:
        raise MeddxError("retrieve=move needs move_to=AET and move_port=PORT (1-65535)")
    return ae_title(options["move_to"]), int(port)


def spooled(locator: str, path: str) -> str:  # and the spool file its instance comes to
    return f"{locator} {path}"


def c_move(locator: str, max_bytes: int | None = None) -> bytes:
    """One C-MOVE of one instance at IMAGE level to the run's storage SCP, then its bytes
    taken out of the spool file the locator names (the run's Receiver wrote it, fsync'd,
    before it answered the PACS, so before the PACS answers this C-MOVE)."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

    target, study, series, sop, _ = locator_parts(locator)
    path = locator.split(" ", 5)[5] if locator.count(" ") >= 5 else ""
    # SPOOL/STUDY/INSTANCE.dcm: the spool folder lives while the run reads.
    if not path or not os.path.isdir(os.path.dirname(os.path.dirname(path))):
        raise MeddxError("retrieve=move: the run's C-MOVE receiver is not on this node, or gone")
    query, (destination, _) = identifier("IMAGE", **within(study, series, sop)), move_of(target)
    final = retrieval(application_entity(), target, MOVE, "C-MOVE", query, destination)
    if final != SUCCESS:
        raise Failed(f"C-MOVE from {target.where} failed with status 0x{final or 0:04X}")
    try:
        size = os.path.getsize(path)
        if max_bytes is not None and size > max_bytes:
            raise TooLarge(size, max_bytes)
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise MeddxError(f"C-MOVE from {target.where} succeeded but sent no instance") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)  # read once: the spool holds only what is in flight


def read(locator: str, settings: StorageSettings, max_bytes: int) -> tuple[bytes, str]:
    """(bytes, "") or (b"", one-line reason), as ``dicomweb.read`` gives."""
    try:
        return retrieve(locator, max_bytes), ""
    except TooLarge as exc:
        return b"", f"{exc} (--max-object-bytes)"
    except MeddxError as exc:
        return b"", one_line(exc)
    except Exception as exc:  # the network, or a PACS that breaks the protocol
        return b"", f"read failed: {type(exc).__name__}"
