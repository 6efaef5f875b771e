"""Results back to the PACS: each scored study's report (pacs/reports.py), over
DICOMweb STOW-RS or DIMSE C-STORE.

    meddx screen dicomweb+http://pacs/dicom-web?... --results-to dicomweb+http://pacs/dicom-web
    meddx screen dimse://PACS@pacs:104?...          --results-to dimse://PACS@pacs:104
    meddx listen ...                                --results-to dimse://PACS@pacs:104

After a run commits its rows, every study it scored an instance of gets its report
again, whole: every instance of the study that this model has scored, the run's and
earlier runs' (their latest rows, found through OUT's index). A study's report has one
SOP Instance UID per model (reports.py), so a fourth film arriving after three were
reported replaces the report; it does not add a second one.

Which instances make a study, and where their attributes come from, depends on the
source:

- a PACS listed over DICOMweb or DIMSE: the instances listed under the study (the
  listing holds every instance of a matching study); attributes by WADO-RS metadata or
  an IMAGE-level C-FIND, no pixel data. Instances are grouped by the study the PACS
  listed them in, never by the StudyInstanceUID their files state (missing, or stale
  after a reconciliation).
- ``meddx listen``'s archive (``ARCHIVE/STUDY/INSTANCE.dcm``): the files of the study's
  folder; attributes from each file's header.

The reports exist only in memory and on the --results-to server: never in OUT, a log or
the run's report.
"""

from __future__ import annotations

import logging
import posixpath
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from meddx import MeddxError, secret
from meddx.imaging.dicom import pseudonym
from meddx.inputs import dicomweb, dimse, storage
from meddx.inputs.storage import StorageSettings
from meddx.model.registry import Checkpoint
from meddx.pacs.reports import (
    TYPE2_COPIED,
    heatmap_capture,
    one_patient,
    quiet_libraries,
    sr_document,
    why_not_built,
)
from meddx.store import commit

log = logging.getLogger(__name__)

# Reports in flight to the PACS at once, each sender with its association: a PACS
# answers a C-STORE once it has written and indexed the instance.
SENDERS = 3
# The columns of a run's rows that the SRs are built from.
ROW_COLUMNS = ["image_uri", "status", "probs", "score", "label"]
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# The reports are sent as highdicom writes them, or as the peer's default.
UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
# C-STORE statuses that store the instance (PS3.4 B.2.3: success, and the warnings
# "coercion of data elements", "elements discarded", "does not match SOP class").
STORED = {0x0000, 0xB000, 0xB006, 0xB007}
# What an IMAGE-level C-FIND asks of a source: what the report and its heatmap copy.
FIND_KEYS = (
    *TYPE2_COPIED,
    "IssuerOfPatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "Modality",
    "PatientOrientation",
)


@dataclass(frozen=True)
class Sent:
    studies: int  # SRs stored, one per study
    instances: int  # scored instances they report on
    failed: tuple[str, ...] = ()  # one line per study whose SR could not be stored
    reported: tuple[str, ...] = ()  # the studies whose SR was stored, by pseudonym


# ---- where a study's instances and their attributes come from -----------------------


def study_of(locator: str, key: bytes) -> str:
    """The pseudonym of the study an instance belongs to: the one a PACS listed it under
    ("PEER STUDY SERIES SOP ..."), or an archive file's folder (named so already)."""
    if " " in locator:
        return pseudonym(locator.split(" ")[1], key)
    return posixpath.basename(posixpath.dirname(locator))


class Sources:
    """Instances' attributes (no pixel data) as Datasets, by locator. One association
    per DIMSE peer, kept while it is used. Call it under quiet_libraries()."""

    def __init__(self, settings: StorageSettings):
        self.settings = settings
        self.associations: dict = {}

    def metadata(self, locator: str):
        first = locator.split(" ", 1)[0]
        if dimse.is_source(first):
            ds = self._found(locator)
        elif " " in locator:
            ds = self._wado(locator)
        else:
            ds = self._header(locator)
        # Type 2 attributes of the patient and study modules, which the SR copies:
        # present, if empty, in a conformant instance; an answer may leave them out.
        for keyword in TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
        return ds

    def _wado(self, locator: str):
        import pydicom

        url, study, series, sop = dicomweb.locator_parts(locator)
        c = dicomweb.client(url, self.settings)
        meta = dicomweb.retried(lambda: c.retrieve_instance_metadata(study, series, sop))
        ds = pydicom.Dataset.from_json(meta, bulk_data_uri_handler=lambda *_: b"")
        # The SR is filed in its first source's study and references each source by
        # UID: those the PACS listed, whatever the header says (or leaves out).
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
        return ds

    def _found(self, locator: str):
        import pydicom
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

        peer, study, series, sop, _ = dimse.locator_parts(locator)
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        for keyword in FIND_KEYS:
            setattr(query, keyword, "")
        query.StudyInstanceUID, query.SeriesInstanceUID, query.SOPInstanceUID = study, series, sop
        assoc = self.associations.get(peer)
        if assoc is None or not assoc.is_established:
            ae = dimse.application_entity()
            ae.add_requested_context(FIND)
            assoc = self.associations[peer] = dimse.associate(ae, peer)
        found = None
        for status, identifier in assoc.send_c_find(query, FIND):
            if status is None or "Status" not in status:
                raise MeddxError(f"{peer.where} did not answer the C-FIND")
            if status.Status in (0xFF00, 0xFF01) and identifier is not None and found is None:
                found = identifier
        if found is None:
            raise MeddxError(f"{peer.where} no longer has an instance of the study")
        found.StudyInstanceUID, found.SeriesInstanceUID, found.SOPInstanceUID = study, series, sop
        return found

    def _header(self, uri: str):
        import pydicom

        with storage.filesystem(uri, self.settings).open(storage.strip_scheme(uri), "rb") as fh:
            return pydicom.dcmread(fh, stop_before_pixels=True)

    def close(self) -> None:
        for assoc in self.associations.values():
            if assoc.is_established:
                assoc.release()
        self.associations.clear()


def by_study(rows: pa.Table, located: dict[str, str], key: bytes) -> dict[str, list[dict]]:
    """The scored (status ok) rows among ``rows`` that have a locator, by the pseudonym
    of their study (``study_of``): the study the PACS files them in."""
    grouped: dict[str, list[dict]] = {}
    for row in rows.select(ROW_COLUMNS).to_pylist():
        locator = located.get(row["image_uri"])
        if row["status"] != "ok" or locator is None:
            continue
        grouped.setdefault(study_of(locator, key), []).append(row)
    return grouped


# ---- where the reports go -----------------------------------------------------------


class Stow:
    """STOW-RS to a DICOMweb server. The class holds no error of its own: a request
    that failed raises as requests does (``why_failed`` words it)."""

    senders = 1  # one HTTP session, not shared between threads

    def __init__(self, target: str, settings: StorageSettings, allow_insecure_http: bool):
        dicomweb.check_transport(target, allow_insecure_http)
        self.where = dicomweb.endpoint(target)
        self.client = dicomweb.client(self.where.url, settings)

    def store(self, made: list) -> None:
        dicomweb.retried(lambda: self.client.store_instances(made))

    def close(self) -> None:
        pass


class CStore:
    """C-STORE to a DIMSE peer: an association per sending thread, kept for the whole
    run (opened again if the peer ends it)."""

    senders = SENDERS

    def __init__(self, target: str):
        self.peer = dimse.peer(target)
        self.local = threading.local()
        self.opened: list = []
        self.lock = threading.Lock()

    def store(self, made: list) -> None:
        assoc = getattr(self.local, "assoc", None)
        if assoc is None or not assoc.is_established:
            ae = dimse.application_entity()
            for sop_class in (COMPREHENSIVE_SR, SECONDARY_CAPTURE):
                ae.add_requested_context(sop_class, UNCOMPRESSED)
            assoc = self.local.assoc = dimse.associate(ae, self.peer)
            with self.lock:
                self.opened.append(assoc)
        for ds in made:
            status = assoc.send_c_store(ds)
            if status is None or "Status" not in status:
                raise MeddxError(f"{self.peer.where} did not answer the C-STORE")
            if status.Status not in STORED:
                raise MeddxError(
                    f"{self.peer.where} refused the report: status 0x{status.Status:04X}"
                )

    def close(self) -> None:
        for assoc in self.opened:
            if assoc.is_established:
                assoc.release()


def target_of(target: str, settings: StorageSettings, allow_insecure_http: bool):
    if dimse.is_source(target):
        return CStore(target)
    return Stow(target, settings, allow_insecure_http)


def host_of(target: str) -> str:
    return dimse.peer(target).where if dimse.is_source(target) else dicomweb.endpoint(target).host


# ---- sending --------------------------------------------------------------------------


def send(
    target: str,
    rows: pa.Table,
    located: dict[str, str],
    ckpt: Checkpoint,
    sha: str,
    settings: StorageSettings,
    key: bytes,
    heatmaps: bool = False,
    allow_insecure_http: bool = False,
) -> Sent:
    """One SR per study among ``rows`` (each instance's latest row) to ``target``
    (STOW-RS or C-STORE); with ``heatmaps``, also the Grad-CAM overlay of the study's
    top-scoring instance. ``key`` names each study by its pseudonym (in the SR's UIDs,
    in ``failed``). A DICOMweb target that would get credentials over plain http is
    refused first, unless ``allow_insecure_http`` (dicomweb.check_transport).

    Reports are sent by threads of their own while the next ones are built: the PACS
    answers a C-STORE once it has written and indexed the instance (about 120 ms from
    Orthanc on the same two cores), longer than building one takes (about 50 ms). For
    24 studies, building and sending one after the other took 6.0 s, with one sending
    thread 4.2 s, with three (DIMSE; STOW-RS keeps one) 2.7 s. The whole send runs
    under quiet_libraries(), so the threads' warnings and log records are held back
    too."""
    out = target_of(target, settings, allow_insecure_http)
    sources = Sources(settings)
    stored, instances, failed, reported = 0, 0, [], []
    pending: list[tuple[str, int, Future]] = []
    try:
        senders = ThreadPoolExecutor(out.senders, thread_name_prefix="meddx-sr")
        with quiet_libraries(), senders as sender:
            for study, scored in sorted(by_study(rows, located, key).items()):
                found: list = []
                try:
                    for r in scored:
                        found.append(sources.metadata(located[r["image_uri"]]))
                    one_patient(found)
                    made = [sr_document(found, [r["probs"] for r in scored], ckpt, sha, study)]
                    if heatmaps:
                        top = max(range(len(scored)), key=lambda i: max(scored[i]["probs"]))
                        made.append(
                            heatmap_capture(
                                found[top], scored[top], located, ckpt, sha, study, settings
                            )
                        )
                except Exception as exc:
                    failed.append(f"study {study}: {why_failed(exc, found, target)}")
                    continue
                pending.append((study, len(scored), sender.submit(out.store, made)))
            for study, n, stored_yet in pending:
                try:
                    stored_yet.result()
                except Exception as exc:
                    failed.append(f"study {study}: {why_failed(exc, [], target)}")
                    continue
                stored += 1
                instances += n
                reported.append(study)
    finally:
        out.close()
        sources.close()
    return Sent(stored, instances, tuple(failed), tuple(reported))


def why_failed(exc: Exception, found: list, target: str) -> str:
    """One line for a report not stored, without a value of the patient's."""
    import requests

    if isinstance(exc, MeddxError):
        return str(exc)
    if isinstance(exc, requests.RequestException):  # WADO-RS metadata, STOW-RS
        return dicomweb.reason(exc, host_of(target))
    if isinstance(exc, (OSError, RuntimeError)):  # the network, a file, an association
        return f"{type(exc).__name__} sending the report"
    return why_not_built(exc, found)  # an SR highdicom will not build: say why


def members(cfg, run_uris: list[str], listed_at: pa.Table | None) -> dict[str, str]:
    """{image_uri: locator} of every instance of the studies the run scored an instance
    of: those a PACS listed under them, or the files of their archive folders
    (``cfg.archive``, meddx listen's)."""
    if listed_at is not None:
        run = dicomweb.locators_of(listed_at, pa.array(run_uris, pa.string()))
        studies = {loc.split(" ")[1] for loc in run.values() if loc}
        listed = pc.list_element(pc.split_pattern(listed_at["locator"], " "), 1)
        chosen = listed_at.filter(pc.is_in(listed, pa.array(sorted(studies), pa.string())))
        return dict(
            zip(chosen["image_uri"].to_pylist(), chosen["locator"].to_pylist(), strict=True)
        )
    if cfg.archive is None:
        return {}
    folders = sorted({posixpath.dirname(u) for u in run_uris})
    found = {u: u for u in run_uris}
    fs = storage.filesystem(cfg.archive, cfg.storage)
    for folder in folders:
        for path in fs.ls(storage.strip_scheme(folder), detail=False):
            name = posixpath.basename(path)
            if name.endswith(".dcm") and not name.startswith("."):
                found.setdefault(f"{folder}/{name}", f"{folder}/{name}")
    return found


def send_run(cfg, run_id: str, listed_at: pa.Table | None, ckpt: Checkpoint, sha: str) -> Sent:
    """``--results-to``: the reports of the studies run ``run_id`` scored under cfg.out,
    each over all of its instances this model has scored."""
    key = secret.pseudonym_key()
    if key is None:  # the listing needed it: only a key removed since can miss here
        raise MeddxError("--results-to needs MEDDX_PSEUDONYM_KEY to name the studies")
    ran = commit.read_results(
        cfg.out,
        cfg.storage,
        ["image_uri"],
        where=pc.field("run_id") == run_id,
        dates=[cfg.run_date],
    )
    located = members(cfg, ran["image_uri"].to_pylist(), listed_at)
    rows = commit.latest_rows(cfg.out, cfg.storage, list(located), sha, ROW_COLUMNS)
    return send(
        cfg.results_to,
        rows,
        located,
        ckpt,
        sha,
        cfg.storage,
        key,
        cfg.results_heatmaps,
        cfg.allow_insecure_http,
    )


def describe(sent: Sent, target: str) -> str:
    """One line: what reached the PACS (and the first reason when something did not)."""
    line = f"results: {sent.studies} reports on {sent.instances} instances stored on "
    line += host_of(target)
    if sent.failed:
        line += f"; {len(sent.failed)} not stored, first: {sent.failed[0]}"
    return line
