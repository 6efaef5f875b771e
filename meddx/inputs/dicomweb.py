"""The PACS as a source and as the place results go back to, over DICOMweb.

    meddx score 'dicomweb+http://pacs:8042/dicom-web?ModalitiesInStudy=CR' ...

- Listing (QIDO-RS, in the driver): studies matching the query's filters, then their
  series, then their instances, each level paged with ``limit`` and ``offset`` until an
  empty page (``_paged``: a server may cap its pages, or ignore ``offset``). Series
  that are not images (SR, KO, PR, ...) and meddx's own results series are skipped.
- Every instance is one input. Its ``image_uri`` is ``dicomweb://HOST/instances/P``
  where P is the keyed pseudonym of its SOP Instance UID (``MEDDX_PSEUDONYM_KEY``), so
  no UID reaches the results tree; the site holding the key can join back. The UIDs the
  retrieval needs travel beside it in the read stage's rows (``locator``), never into
  an output row.
- Retrieval (WADO-RS, in the read tasks): ``application/dicom`` with
  ``transfer-syntax=*``, so the stored, compressed bytes arrive and meddx's own
  reduced-resolution decode reads them. 5xx, 408, 429, connection resets and truncated
  bodies are retried with back-off; an instance that stays unreadable is an error row.
- Credentials come from the environment (``MEDDX_DICOMWEB_USER`` and
  ``MEDDX_DICOMWEB_PASSWORD``, or ``MEDDX_DICOMWEB_TOKEN``; each also as ``..._FILE``,
  the path of a mounted secret: secret.py) and are never printed. TLS is verified,
  against ``--ca-bundle`` when given. Credentials go over plain http only to loopback,
  unless ``--allow-insecure-http`` says so (``check_transport``).
- Redirects are followed only within the origin asked (scheme, host, port): another
  origin would receive the credentials' request, a re-POSTed report with its patient
  module, or bytes whose hash then names the input.

dicomweb-client does QIDO-RS and STOW-RS. WADO-RS is a plain GET on the same session:
the client's retrieve parses every instance into a pydicom Dataset, and its multipart
decoder returns a truncated body as if whole, so the body is checked here instead.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from urllib.parse import parse_qsl, urljoin, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.compute as pc

from meddx import MeddxError, one_line, secret
from meddx.imaging.dicom import pseudonym
from meddx.inputs.storage import StorageSettings, TooLarge
from meddx.names import DICOMWEB_SCHEMES

SCHEMES = DICOMWEB_SCHEMES
URI_SCHEME = "dicomweb://"  # of image_uri: dicomweb://HOST/instances/PSEUDONYM
USER_ENV, PASSWORD_ENV, TOKEN_ENV = (
    "MEDDX_DICOMWEB_USER",
    "MEDDX_DICOMWEB_PASSWORD",
    "MEDDX_DICOMWEB_TOKEN",
)
QIDO_PAGE = 500  # results per QIDO-RS request (limit=, offset=); a server may send fewer
# Results listed per level (studies; series of a study; instances of a series) before
# the listing stops with a warning: a server that never sends an empty page cannot hold
# the driver forever. A night's query lists thousands of studies; this is an archive's
# worth, about 200 MB of QIDO-RS JSON held in the driver.
QIDO_MAX_RESULTS = 100_000
ATTEMPTS = 5  # per request, for the transient failures below
BACKOFF_S = 0.2  # first wait; doubled each try, with jitter
MAX_BACKOFF_S = 8.0
TIMEOUT_S = (10, 120)  # connect, read
RETRIED_STATUS = {408, 429, 500, 502, 503, 504}
# Series of these modalities hold no image to score (reports, key objects, states).
NOT_IMAGES = frozenset({"SR", "KO", "PR", "SEG", "REG", "RWV", "DOC", "FID", "PLAN"})
# meddx's results series (pacs/reports.py) carry this description: never scored as inputs.
RESULTS_SERIES = "meddx AI results"

# dicomweb-client names UIDs in its INFO lines: they must not reach any log.
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)
log = logging.getLogger(__name__)


def is_source(uri: str) -> bool:
    return uri.lower().startswith(SCHEMES)


def is_instance(uri: str) -> bool:
    return uri.startswith(URI_SCHEME)


@dataclass(frozen=True)
class Endpoint:
    url: str  # http(s)://HOST[:PORT]/PATH: the DICOMweb root, no query, no credentials
    filters: tuple[tuple[str, str], ...]  # QIDO-RS study-level matching, as given

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc


def endpoint(source: str) -> Endpoint:
    """``dicomweb+http(s)://HOST[:PORT]/PATH?QUERY`` -> the root URL and the filters."""
    if not is_source(source):
        raise MeddxError(f"not a DICOMweb source: {source!r} (dicomweb+http(s)://HOST/PATH)")
    parts = urlsplit(source[len("dicomweb+") :])
    if parts.username or parts.password:
        raise MeddxError(
            f"credentials do not belong in the URL: set {USER_ENV} and {PASSWORD_ENV}, "
            f"or {TOKEN_ENV}"
        )
    if not parts.hostname:
        raise MeddxError(f"no host in DICOMweb source {source!r}")
    url = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    return Endpoint(url, tuple(parse_qsl(parts.query)))


# ---- sessions, credentials and retries -------------------------------------------------


def credentials() -> tuple[tuple[str, str] | None, str | None]:
    """(basic auth, bearer token) from the environment, each variable or the file its
    ``_FILE`` twin names (secret.value): at most one of them."""
    user, password = secret.value(USER_ENV), secret.value(PASSWORD_ENV)
    token = secret.value(TOKEN_ENV)
    if token and (user or password):
        raise MeddxError(f"set either {TOKEN_ENV} or {USER_ENV}/{PASSWORD_ENV}, not both")
    if bool(user) != bool(password):
        raise MeddxError(f"{USER_ENV} and {PASSWORD_ENV} go together: set both or neither")
    return ((user, password) if user else None), (token or None)


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address: traffic that never leaves the machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport(source: str, allow_insecure_http: bool = False) -> None:
    """Refuse, in one line, a DICOMweb URL (``dicomweb+http(s)://``) that would send the
    environment's credentials in clear text: plain http to a host other than loopback,
    unless ``allow_insecure_http`` (``--allow-insecure-http``). Without credentials,
    or over https, nothing is refused."""
    parts = urlsplit(endpoint(source).url)
    if parts.scheme != "http" or allow_insecure_http or is_loopback(parts.hostname or ""):
        return
    auth, token = credentials()
    if auth or token:
        raise MeddxError(
            f"refusing to send DICOMweb credentials ({TOKEN_ENV if token else USER_ENV}) "
            f"over plain http to {parts.netloc}: use dicomweb+https://, or "
            "--allow-insecure-http on a network you trust"
        )


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL, the port made explicit (None: not a valid one)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port


class Redirected(MeddxError):
    """A server answered with a redirect to another origin, which is not followed."""


def _same_origin_redirects(response, *args, **kwargs):
    """A response hook: requests calls it on every answer, before it follows a redirect."""
    if response.is_redirect:
        target = urljoin(response.url, response.headers["Location"])
        if origin(target) != origin(response.url) or None in origin(target):
            response.close()
            scheme, host, port = origin(target)
            raise Redirected(
                f"DICOMweb server {urlsplit(response.url).netloc} redirected to another "
                f"origin ({scheme}://{host}:{port}): not followed"
            )
    return response


_local = threading.local()


def session(settings: StorageSettings):
    """A requests session with the environment's credentials and TLS verified (against
    the site's CA bundle when given), following redirects only within an origin: one
    per thread, reused for its connections."""
    import requests

    sessions = _local.__dict__.setdefault("sessions", {})
    auth, token = credentials()
    key = (settings.ca_bundle, auth, token)
    if key not in sessions:
        s = requests.Session()
        s.verify = settings.ca_bundle or True
        s.auth = auth
        if token:
            s.headers["Authorization"] = f"Bearer {token}"
        s.trust_env = False  # no proxies or .netrc credentials from elsewhere
        s.hooks["response"].append(_same_origin_redirects)
        sessions[key] = s
    return sessions[key]


def client(url: str, settings: StorageSettings):
    from dicomweb_client.api import DICOMwebClient

    c = DICOMwebClient(url, session=session(settings), timeout=TIMEOUT_S)
    c.set_http_retry_params(retry=False)  # retried here, resets and truncations too
    return c


class Truncated(Exception):
    """A body that ended before its multipart close delimiter or its Content-Length."""


def transient(exc: Exception) -> bool:
    import requests

    if isinstance(exc, requests.HTTPError):
        status = exc.response.status_code if exc.response is not None else 0
        return status in RETRIED_STATUS
    return isinstance(
        exc,
        (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
        + (Truncated,),
    )


def retried(call, attempts: int = ATTEMPTS):
    """call(), tried again with exponential back-off and jitter on a transient failure."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as exc:
            if attempt == attempts - 1 or not transient(exc):
                raise
            time.sleep(min(MAX_BACKOFF_S, BACKOFF_S * 2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def reason(exc: Exception, host: str) -> str:
    """One line for a failed request: the status and what it means, never a URL (it
    names UIDs) nor a credential."""
    import requests

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in (401, 403):
            return (
                f"DICOMweb server {host} refused the credentials (HTTP {status}): check "
                f"{USER_ENV}/{PASSWORD_ENV} or {TOKEN_ENV}"
            )
        if status == 404:
            return f"not found on DICOMweb server {host} (HTTP 404)"
        return f"DICOMweb server {host} answered HTTP {status} {exc.response.reason or ''}".strip()
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS verification failed for DICOMweb server {host} (see --ca-bundle)"
    if isinstance(exc, requests.ConnectionError):
        return f"cannot reach DICOMweb server {host}"
    if isinstance(exc, Truncated):
        return f"truncated response from DICOMweb server {host}"
    return f"DICOMweb request to {host} failed: {type(exc).__name__}"


# ---- listing (QIDO-RS) ----------------------------------------------------------------


def _value(item: dict, keyword: str) -> str:
    from pydicom.datadict import tag_for_keyword

    element = item.get(f"{tag_for_keyword(keyword):08X}", {})
    values = element.get("Value") or [""]
    return str(values[0])


def _paged(search, cut: Counter, what: str, **kwargs) -> list[dict]:
    """Every result of a QIDO-RS search, page by page until an empty page. A server may
    cap a page below ``limit`` (PS3.18 6.7.1.2), so a short page is not the last. A page
    the server already sent (it ignores ``offset``) ends the listing, and so do
    QIDO_MAX_RESULTS results; either may leave results out, and is counted in ``cut``
    under ``("repeated" | "capped", what)`` for the caller's warning."""
    found: list[dict] = []
    seen: set[str] = set()
    while True:
        offset = len(found)
        page = retried(lambda at=offset: search(limit=QIDO_PAGE, offset=at, **kwargs))
        if not page:
            return found
        fingerprint = hashlib.sha256(json.dumps(page, sort_keys=True).encode()).hexdigest()
        if fingerprint in seen:
            cut["repeated", what] += 1
            return found
        seen.add(fingerprint)
        found.extend(page)
        if len(found) > QIDO_MAX_RESULTS:
            cut["capped", what] += 1
            return found[:QIDO_MAX_RESULTS]


def warn_cut(host: str, cut: Counter) -> None:
    """A warning line for each way ``_paged`` cut listings short, naming how many at
    each level: a run that goes on without some studies says so in its log."""
    for why in ("repeated", "capped"):
        levels = ", ".join(f"{n} of {what}" for (w, what), n in sorted(cut.items()) if w == why)
        if levels and why == "repeated":
            log.warning(
                "meddx: DICOMweb server %s ignores QIDO-RS offset: listings (%s) ended on a "
                "page it had sent before; any results beyond it are missing",
                host, levels,
            )  # fmt: skip
        elif levels:
            log.warning(
                "meddx: DICOMweb server %s: listings (%s) stopped at %d results, the most "
                "meddx lists at one level; the rest are missing: narrow the query",
                host, levels, QIDO_MAX_RESULTS,
            )  # fmt: skip


def since_filter(days: int, today: dt.date | None = None) -> str:
    """QIDO-RS StudyDate range: the last DAYS days up to today."""
    start = (today or dt.date.today()) - dt.timedelta(days=days)
    return f"{start:%Y%m%d}-"


# What a DICOMweb listing gives: each instance's input name and its locator.
LOCATED_SCHEMA = pa.schema([("image_uri", pa.string()), ("locator", pa.string())])


def list_instances(
    source: str, settings: StorageSettings, key: bytes | None, since_days: int | None = None
) -> pa.Table:
    """Every image instance the source's query matches, as a LOCATED_SCHEMA table built
    page by page (one Arrow batch per QIDO-RS page of instances): its ``image_uri`` and
    its locator, "URL STUDY SERIES SOP", what WADO-RS needs (it never leaves the run).
    With ``since_days``, only studies of the last that many days (unless the query sets
    its own StudyDate). A listing cut short (``_paged``) is a warning, not an error: the
    night goes on with what was listed."""
    if key is None:
        raise MeddxError(
            "a DICOMweb source needs MEDDX_PSEUDONYM_KEY: each instance is named by the "
            "keyed pseudonym of its UID, never by the UID"
        )
    where = endpoint(source)
    filters = dict(where.filters)
    if since_days is not None and "StudyDate" not in filters:
        filters["StudyDate"] = since_filter(since_days)
    c = client(where.url, settings)
    batches: list[pa.RecordBatch] = []
    cut: Counter = Counter()
    try:
        for study in _paged(c.search_for_studies, cut, "studies", search_filters=filters):
            study_uid = _value(study, "StudyInstanceUID")
            for series in _paged(
                c.search_for_series, cut, "series of a study", study_instance_uid=study_uid
            ):
                if _value(series, "Modality").upper() in NOT_IMAGES:
                    continue
                if _value(series, "SeriesDescription") == RESULTS_SERIES:
                    continue
                series_uid = _value(series, "SeriesInstanceUID")
                found = _paged(
                    c.search_for_instances,
                    cut,
                    "instances of a series",
                    study_instance_uid=study_uid,
                    series_instance_uid=series_uid,
                )
                sops = [_value(inst, "SOPInstanceUID") for inst in found]
                batches.append(
                    pa.record_batch(
                        [
                            [
                                f"{URI_SCHEME}{where.host}/instances/{pseudonym(u, key)}"
                                for u in sops
                            ],
                            [" ".join((where.url, study_uid, series_uid, u)) for u in sops],
                        ],
                        schema=LOCATED_SCHEMA,
                    )
                )
    except MeddxError:
        raise
    except Exception as exc:
        raise MeddxError(f"listing {where.host} failed: {reason(exc, where.host)}") from None
    warn_cut(where.host, cut)
    table = pa.Table.from_batches(batches, LOCATED_SCHEMA)
    # An instance listed twice (in two series' answers) is one input.
    return table.take(pc.index_in(pc.unique(table["image_uri"]), table["image_uri"]))


def locators_of(located: pa.Table, uris) -> dict[str, str]:
    """{image_uri: locator} for ``uris`` alone (the night's inputs), from a listing."""
    uris = pa.chunked_array([uris]) if isinstance(uris, pa.Array) else uris
    where = pc.index_in(uris, value_set=located["image_uri"].combine_chunks())
    return dict(zip(uris.to_pylist(), located["locator"].take(where).to_pylist(), strict=True))


def locator_parts(locator: str) -> tuple[str, str, str, str]:
    url, study, series, sop = locator.split(" ")
    return url, study, series, sop


# ---- retrieval (WADO-RS) --------------------------------------------------------------

ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def retrieve(locator: str, settings: StorageSettings, max_bytes: int | None = None) -> bytes:
    """The instance's stored bytes, as the PACS holds them (no transcoding)."""
    url, study, series, sop = locator_parts(locator)
    target = f"{url}/studies/{study}/series/{series}/instances/{sop}"

    def get() -> bytes:
        with session(settings).get(
            target, headers={"Accept": ACCEPT}, stream=True, timeout=TIMEOUT_S
        ) as response:
            response.raise_for_status()
            body = bytearray()
            for chunk in response.iter_content(2**20):
                body += chunk
                if max_bytes is not None and len(body) > max_bytes + 2**16:
                    raise TooLarge(len(body), max_bytes)
            # A body shorter than its Content-Length raises in urllib3 (which counts the
            # bytes on the wire: a gzip'd body's length is not its decoded length).
            return single_part(response.headers.get("Content-Type", ""), bytes(body))

    data = retried(get)
    if max_bytes is not None and len(data) > max_bytes:
        raise TooLarge(len(data), max_bytes)
    return data


def single_part(content_type: str, body: bytes) -> bytes:
    """The one part of a WADO-RS instance response. A body without its close delimiter
    was cut short (Truncated, retried); a bare application/dicom body is taken whole,
    as some servers send one."""
    media, *params = [p.strip() for p in content_type.split(";")]
    if media.lower() != "multipart/related":
        return body
    boundary = next(
        (v.strip('"') for k, _, v in (p.partition("=") for p in params) if k.lower() == "boundary"),
        None,
    )
    if not boundary:
        return body
    marker = b"--" + boundary.encode()
    start = body.find(marker)
    end = body.rfind(b"\r\n" + marker + b"--")
    if start < 0 or end < 0 or end <= start:
        raise Truncated()
    part = body[start + len(marker) : end]
    head_end = part.find(b"\r\n\r\n")
    if head_end < 0:
        raise Truncated()
    content = part[head_end + 4 :]
    if (b"\r\n" + marker) in content:
        raise MeddxError("the server sent more than one instance for one SOP Instance UID")
    return content


def read(locator: str, settings: StorageSettings, max_bytes: int) -> tuple[bytes, str]:
    """(bytes, "") or (b"", one-line reason), as reading.read_object gives."""
    host = urlsplit(locator.split(" ", 1)[0]).netloc
    try:
        return retrieve(locator, settings, max_bytes), ""
    except TooLarge as exc:
        return b"", f"{exc} (--max-object-bytes)"
    except MeddxError as exc:
        return b"", one_line(exc)
    except Exception as exc:
        return b"", f"read failed: {reason(exc, host)}"
