"""A real PACS for tests: Orthanc with its DICOMweb plugin, from Debian's packages.

``orthanc_server`` starts ``/usr/sbin/Orthanc`` as a child on free HTTP and DICOM ports,
with its own storage folder and HTTP authentication on, waits until it answers, and
stops it by its own pid; ``extra`` adds to its configuration (what DIMSE peers may do).
``store`` sends DICOM files to it over STOW-RS.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from .helpers import free_port, terminate

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
USER, PASSWORD = "meddx-reader", "pacs-s3cret-7f2c"


def missing() -> str | None:
    """Why Orthanc cannot run here (None when it can)."""
    for path in (ORTHANC, DICOMWEB_PLUGIN):
        if not os.path.exists(path):
            return (
                f"{path} is missing: install Debian's orthanc and orthanc-dicomweb "
                "(make pacs-deps; .ci/run does)"
            )
    return None


@dataclass(frozen=True)
class Pacs:
    http: str  # http://127.0.0.1:PORT
    pid: int
    dicom_port: int = 0  # its DIMSE port (C-STORE, C-FIND, C-GET, C-MOVE)

    @property
    def dicomweb(self) -> str:
        return f"{self.http}/dicom-web"

    @property
    def source(self) -> str:
        return f"dicomweb+{self.dicomweb}"

    def session(self) -> requests.Session:
        s = requests.Session()
        s.auth = (USER, PASSWORD)
        return s


def site_ca(folder: Path) -> tuple[Path, Path, Path]:
    """A site CA's certificate, and a server certificate for 127.0.0.1 that it signed
    with that certificate's key (openssl)."""
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
            "-out", "ca.pem", "-days", "2", "-subj", "/CN=meddx test site CA")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
            "-out", "server.csr", "-subj", "/CN=127.0.0.1")  # fmt: skip
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "2",
            "-extfile", "san.cnf")  # fmt: skip
    return folder / "ca.pem", folder / "server.crt", folder / "server.key"


@contextmanager
def orthanc_server(folder: Path, timeout: float = 60, extra: dict | None = None) -> Iterator[Pacs]:
    """``extra``: more of Orthanc's configuration (DICOM modalities, say)."""
    http_port, dicom_port = free_port(), free_port()
    storage = folder / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "meddx-test-pacs",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomServerEnabled": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
        "HttpCompressionEnabled": True,  # Orthanc's default: gzip'd answers
        **(extra or {}),
    }
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([ORTHANC, str(path)], stdout=log, stderr=subprocess.STDOUT)
    pacs = Pacs(f"http://127.0.0.1:{http_port}", proc.pid, config["DicomPort"])
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if pacs.session().get(f"{pacs.http}/system", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "Orthanc did not start: " + (folder / "orthanc.log").read_text()[-2000:]
                )
            time.sleep(0.2)
        yield pacs
    finally:
        terminate(proc, timeout=20)
        log.close()


def store(pacs: Pacs, files: list[Path]) -> None:
    """STOW-RS the DICOM files, as they are (their transfer syntax kept)."""
    import pydicom
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(pacs.dicomweb, session=pacs.session())
    client.store_instances([pydicom.dcmread(f) for f in files])
