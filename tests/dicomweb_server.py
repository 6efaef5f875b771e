"""A DICOMweb server for what Orthanc cannot be made to do: cap its QIDO-RS pages, ignore
``offset``, redirect to another origin. Python's http.server in a thread on a free
loopback port, started and stopped by ``serving``; it records every request.

Each study has one CR series of one instance (``uids(i)``). Instance metadata comes
from ``metadata`` (SOP Instance UID -> DICOM JSON), set by the test; STOW-RS bodies are
kept in ``stored``.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

ROOT = "/dicom-web"
UID_ROOT = "1.2.826.0.1.3680043.9.7"
# Requests the server answers before it refuses with 400: a client that pages forever
# fails the test instead of hanging it.
REQUEST_BUDGET = 2000


def uids(i: int) -> tuple[str, str, str]:
    """(study, series, instance) UIDs of study ``i``."""
    study = f"{UID_ROOT}.{i + 1}"
    return study, f"{study}.1", f"{study}.1.1"


def element(vr: str, *values) -> dict:
    return {"vr": vr, "Value": list(values)}


@dataclass
class Server:
    studies: int = 0
    page_cap: int | None = None  # results per page at most (the server's own limit)
    ignore_offset: bool = False
    # Answer every request of these methods with 307 to the same path on this origin.
    redirect_to: str | None = None
    redirect_methods: tuple[str, ...] = ("GET", "POST")
    metadata: dict[str, dict] = field(default_factory=dict)
    seen: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    stored: list[tuple[str, bytes]] = field(default_factory=list)  # (content type, body)
    url: str = ""

    @property
    def source(self) -> str:
        return f"dicomweb+{self.url}{ROOT}"

    def stored_datasets(self) -> list:
        """The DICOM instances of every STOW-RS body received, in order."""
        import pydicom

        found = []
        for content_type, body in self.stored:
            boundary = content_type.split("boundary=")[1].strip('"').encode()
            for part in body.split(b"--" + boundary)[1:-1]:
                found.append(pydicom.dcmread(io.BytesIO(part.split(b"\r\n\r\n", 1)[1][:-2])))
        return found

    def requests_to(self, suffix: str) -> int:
        return sum(1 for _, path in self.seen if urlsplit(path).path.endswith(suffix))

    def results(self, path: str, query: dict) -> list[dict] | None:
        """The QIDO-RS answer for ``path`` (None: not a QIDO-RS path)."""
        parts = path.removeprefix(ROOT).strip("/").split("/")
        if parts == ["studies"]:
            everything = [{"0020000D": element("UI", uids(i)[0])} for i in range(self.studies)]
        elif len(parts) == 3 and parts[0] == "studies" and parts[2] == "series":
            everything = [
                {"0020000E": element("UI", f"{parts[1]}.1"), "00080060": element("CS", "CR")}
            ]
        elif len(parts) == 5 and parts[4] == "instances":
            everything = [{"00080018": element("UI", f"{parts[3]}.1")}]
        else:
            return None
        limit = int(query.get("limit", ["1000000"])[0])
        offset = 0 if self.ignore_offset else int(query.get("offset", ["0"])[0])
        size = min(limit, self.page_cap or limit)
        return everything[offset : offset + size]


def _handler(server: Server):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a PACS
        # Headers and body go out in two writes: without this, each answer waits out
        # the client's delayed ACK (40 ms).
        disable_nagle_algorithm = True

        def log_message(self, *args):  # no line per request on stderr
            pass

        def body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    chunk = self.rfile.read(size)
                    self.rfile.readline()
                    if not size:
                        return data
                    data += chunk
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def answer(self, status: int, body: bytes = b"", headers: dict | None = None):
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def handle_one(self, method: str) -> None:
            server.seen.append((method, self.path))
            data = self.body() if method == "POST" else b""
            if len(server.seen) > REQUEST_BUDGET:
                return self.answer(400)
            if server.redirect_to and method in server.redirect_methods:
                return self.answer(307, headers={"Location": server.redirect_to + self.path})
            path, query = urlsplit(self.path).path, parse_qs(urlsplit(self.path).query)
            if path.startswith("/moved" + ROOT):  # a redirect within the origin
                return self.answer(307, headers={"Location": self.path.removeprefix("/moved")})
            if method == "POST":
                server.stored.append((self.headers.get("Content-Type", ""), data))
                return self.answer(200)
            if path.endswith("/metadata"):
                sop = path.split("/")[-2]
                if sop not in server.metadata:
                    return self.answer(404)
                body = json.dumps([server.metadata[sop]]).encode()
                return self.answer(200, body, {"Content-Type": "application/dicom+json"})
            found = server.results(path, query)
            if found is None:
                return self.answer(404)
            return self.answer(
                200, json.dumps(found).encode(), {"Content-Type": "application/json"}
            )

        def do_GET(self):
            self.handle_one("GET")

        def do_POST(self):
            self.handle_one("POST")

    return Handler


@contextmanager
def serving(server: Server) -> Iterator[Server]:
    """``server`` answering on a free loopback port (its ``url`` set) until the block ends."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(server))
    httpd.daemon_threads = True
    server.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
