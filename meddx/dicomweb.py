"""The PACS as a source and as the place results go back to, over DICOMweb.

    meddx score 'dicomweb+http://pacs:8042/dicom-web?ModalitiesInStudy=CR' ...

- Listing (QIDO-RS, in the driver): studies matching the query's filters, then their
  series, then their instances, each level paged with ``limit`` and ``offset``. Series
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
  ``MEDDX_DICOMWEB_PASSWORD``, or ``MEDDX_DICOMWEB_TOKEN``) and are never printed.
  TLS is verified, against ``--ca-bundle`` when given.

dicomweb-client does QIDO-RS and STOW-RS. WADO-RS is a plain GET on the same session:
the client's retrieve parses every instance into a pydicom Dataset, and its multipart
decoder returns a truncated body as if whole, so the body is checked here instead.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from meddx import MeddxError, one_line
from meddx.dicom import pseudonym
from meddx.names import DICOMWEB_SCHEMES
from meddx.storage import StorageSettings, TooLarge

SCHEMES = DICOMWEB_SCHEMES
URI_SCHEME = "dicomweb://"  # of image_uri: dicomweb://HOST/instances/PSEUDONYM
USER_ENV, PASSWORD_ENV, TOKEN_ENV = (
    "MEDDX_DICOMWEB_USER",
    "MEDDX_DICOMWEB_PASSWORD",
    "MEDDX_DICOMWEB_TOKEN",
)
QIDO_PAGE = 500  # results per QIDO-RS request (limit=, offset=)
ATTEMPTS = 5  # per request, for the transient failures below
BACKOFF_S = 0.2  # first wait; doubled each try, with jitter
MAX_BACKOFF_S = 8.0
TIMEOUT_S = (10, 120)  # connect, read
RETRIED_STATUS = {408, 429, 500, 502, 503, 504}
# Series of these modalities hold no image to score (reports, key objects, states).
NOT_IMAGES = frozenset({"SR", "KO", "PR", "SEG", "REG", "RWV", "DOC", "FID", "PLAN"})
# meddx's results series (results.py) carry this description: never scored as inputs.
RESULTS_SERIES = "meddx AI results"

# dicomweb-client names UIDs in its INFO lines: they must not reach any log.
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)


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
    """(basic auth, bearer token) from the environment: at most one of them."""
    user, password = os.environ.get(USER_ENV, ""), os.environ.get(PASSWORD_ENV, "")
    token = os.environ.get(TOKEN_ENV, "")
    if token and (user or password):
        raise MeddxError(f"set either {TOKEN_ENV} or {USER_ENV}/{PASSWORD_ENV}, not both")
    if bool(user) != bool(password):
        raise MeddxError(f"{USER_ENV} and {PASSWORD_ENV} go together: set both or neither")
    return ((user, password) if user else None), (token or None)


_local = threading.local()


def session(settings: StorageSettings):
    """A requests session with the environment's credentials and TLS verified (against
    the site's CA bundle when given): one per thread, reused for its connections."""
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


def _paged(search, **kwargs) -> list[dict]:
    found, offset = [], 0
    while True:
        page = retried(lambda at=offset: search(limit=QIDO_PAGE, offset=at, **kwargs))
        found.extend(page)
        if len(page) < QIDO_PAGE:
            return found
        offset += len(page)


def since_filter(days: int, today: dt.date | None = None) -> str:
    """QIDO-RS StudyDate range: the last DAYS days up to today."""
    start = (today or dt.date.today()) - dt.timedelta(days=days)
    return f"{start:%Y%m%d}-"


def list_instances(
    source: str, settings: StorageSettings, key: bytes | None, since_days: int | None = None
) -> dict[str, str]:
    """{image_uri: locator} for every image instance the source's query matches (the
    locator, "URL STUDY SERIES SOP", is what WADO-RS needs; it never leaves the run).
    With ``since_days``, only studies of the last that many days (unless the query sets
    its own StudyDate)."""
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
    located: dict[str, str] = {}
    try:
        for study in _paged(c.search_for_studies, search_filters=filters):
            study_uid = _value(study, "StudyInstanceUID")
            for series in _paged(c.search_for_series, study_instance_uid=study_uid):
                if _value(series, "Modality").upper() in NOT_IMAGES:
                    continue
                if _value(series, "SeriesDescription") == RESULTS_SERIES:
                    continue
                series_uid = _value(series, "SeriesInstanceUID")
                for inst in _paged(
                    c.search_for_instances,
                    study_instance_uid=study_uid,
                    series_instance_uid=series_uid,
                ):
                    sop = _value(inst, "SOPInstanceUID")
                    uri = f"{URI_SCHEME}{where.host}/instances/{pseudonym(sop, key)}"
                    located[uri] = " ".join((where.url, study_uid, series_uid, sop))
    except MeddxError:
        raise
    except Exception as exc:
        raise MeddxError(f"listing {where.host} failed: {reason(exc, where.host)}") from None
    return located


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
    """(bytes, "") or (b"", one-line reason), as sources.read_object gives."""
    host = urlsplit(locator.split(" ", 1)[0]).netloc
    try:
        return retrieve(locator, settings, max_bytes), ""
    except TooLarge as exc:
        return b"", f"{exc} (--max-object-bytes)"
    except MeddxError as exc:
        return b"", one_line(exc)
    except Exception as exc:
        return b"", f"read failed: {reason(exc, host)}"
