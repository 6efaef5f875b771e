"""The DICOM receiver of ``meddx listen``: a C-STORE SCP (pynetdicom) that keeps what it
is sent, as it was sent, and knows when a study has settled.

    modality / PACS --C-STORE--> Receiver --write, fsync (or S3 PUT)--> ARCHIVE --> success
                                     \\--> arrivals: each study's instances and last arrival

An instance is answered with success only once its bytes are durably in ARCHIVE: on
local disk written to a hidden name, fsync'd, renamed and its folder fsync'd; on S3 once
the PUT has returned. The bytes are kept in the transfer syntax they came in (JPEG 2000,
HTJ2K, JPEG-LS, RLE, JPEG, uncompressed): nothing is transcoded. Instances are kept as
``ARCHIVE/STUDY/INSTANCE.dcm``, both the keyed pseudonyms of their UIDs (no UID in a
path, so none in the results' ``image_uri``): the same instance sent twice is one
object, written once when its bytes are the same. Calling AE titles other than those
allowed are rejected at association; data that is not a DICOM instance is answered with
a failure status and one line in the log, and the receiver keeps serving.

It must not import pipelines or the command line: ``meddx.pipelines.listening`` scores
the studies it hands over.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field

import pydicom
import pydicom.uid
from pynetdicom import AE, StoragePresentationContexts, evt

from meddx.imaging.dicom import pseudonym
from meddx.inputs import storage
from meddx.inputs.storage import StorageSettings

log = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 B.2.3): success, and "cannot understand" for what is no
# DICOM instance, "out of resources" when it could not be kept.
SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC000
OUT_OF_RESOURCES = 0xA700
# Every transfer syntax pydicom knows, compressed ones included: stored as received.
TRANSFER_SYNTAXES = [str(ts) for ts in pydicom.uid.AllTransferSyntaxes]


@dataclass
class Study:
    """The instances of one study received and not yet handed over, by archive URI
    (with their size and content hash), and when the last one came."""

    last: float = 0.0
    instances: dict[str, tuple[int, str]] = field(default_factory=dict)


class Receiver:
    """A C-STORE SCP writing each instance durably into ``archive`` before answering."""

    def __init__(
        self,
        archive: str,
        settings: StorageSettings,
        key: bytes,
        ae_title: str,
        allow_ae: tuple[str, ...],
    ):
        self.archive = storage.absolute(archive)
        self.settings, self.key = settings, key
        self.fs = storage.filesystem(self.archive, settings)
        self.local = not storage.is_s3(self.archive)
        self.ae = AE(ae_title=ae_title)
        self.ae.require_calling_aet = list(allow_ae)
        # No limit on the PDUs a sender may send: at pynetdicom's default of 16 KB a
        # 13 MB film is 800 PDUs, each handled in Python.
        self.ae.maximum_pdu_size = 0
        for context in StoragePresentationContexts:
            self.ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        self.lock = threading.Lock()
        self.studies: dict[str, Study] = {}
        self.received = self.refused = 0
        # Studies begun: a study that receives more after it was handed over counts again.
        self.studies_received = 0
        self.server = None

    def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        """Serve on (host, port) in the background, over TLS with ``tls``."""
        self.server = self.ae.start_server(
            (host, port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self.on_store)],
            ssl_context=tls,
        )

    def stop(self) -> None:
        """Refuse new associations and end the open ones (an instance being written is
        answered first: its handler runs to the end)."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def on_store(self, event) -> int:
        try:
            data = event.encoded_dataset(include_meta=True)
            ds = pydicom.dcmread(io.BytesIO(data))  # the pixel data read, not decoded
            study, instance = ds.get("StudyInstanceUID"), ds.get("SOPInstanceUID")
            if not (study and instance and "PixelData" in ds):
                raise ValueError("no study, instance or pixel data")
            study, instance = str(study), str(instance)
        except Exception as exc:  # what came is no DICOM instance: said, never its values
            with self.lock:
                self.refused += 1
            log.warning("meddx listen: an instance refused (%s)", type(exc).__name__)
            return CANNOT_UNDERSTAND
        study_key = pseudonym(study, self.key)
        uri = storage.join(self.archive, study_key, f"{pseudonym(instance, self.key)}.dcm")
        sha = hashlib.sha256(data).hexdigest()
        try:
            self.keep(uri, data, sha)
        except Exception as exc:
            log.warning("meddx listen: an instance not kept (%s)", type(exc).__name__)
            return OUT_OF_RESOURCES
        with self.lock:
            self.received += 1
            self.studies_received += study_key not in self.studies
            held = self.studies.setdefault(study_key, Study())
            held.last = time.monotonic()
            held.instances[uri] = (len(data), sha)
        return SUCCESS

    def keep(self, uri: str, data: bytes, sha: str) -> None:
        """``data`` durably at ``uri``; the same bytes there already: nothing written."""
        path = storage.strip_scheme(uri)
        if self.fs.exists(path) and self.fs.size(path) == len(data):
            if hashlib.sha256(self.fs.cat_file(path)).hexdigest() == sha:
                return
        if not self.local:
            self.fs.pipe_file(path, data)  # returns once the PUT has
            return
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        temporary = os.path.join(folder, f".{uuid.uuid4().hex}.tmp")
        with open(temporary, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, path)
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def settled(self, seconds: float) -> dict[str, Study]:
        """The studies nothing has arrived for in ``seconds``, handed over (removed)."""
        now = time.monotonic()
        with self.lock:
            due = {k: s for k, s in self.studies.items() if now - s.last >= seconds}
            for k in due:
                del self.studies[k]
        return due

    def give_back(self, studies: dict[str, Study]) -> None:
        """Studies whose scoring failed: held again, to be handed over with the next."""
        with self.lock:
            for k, s in studies.items():
                held = self.studies.setdefault(k, Study())
                held.instances = {**s.instances, **held.instances}
                held.last = max(held.last, s.last)

    def pending(self) -> tuple[int, int]:
        """(studies, instances) received and not yet handed over."""
        with self.lock:
            return len(self.studies), sum(len(s.instances) for s in self.studies.values())


def tls_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """A server's TLS context (TLS 1.2 at least) from PEM files; with ``ca``, a sender
    without a certificate that CA signed is refused in the handshake."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if ca is not None:
        context.load_verify_locations(ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
