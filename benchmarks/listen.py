"""`meddx listen` on this machine: how fast it receives, and how soon a study is scored.

    python benchmarks/listen.py [--studies 40] [--per-study 2] [--clients 4] [--settle 10]

Films: the DICOM films of the realistic mix (2,400 x 2,800, each in its own transfer
syntax: JPEG 2000, HTJ2K, JPEG-LS, RLE, JPEG, uncompressed), grouped into studies of
``--per-study`` films (their headers rewritten with new study UIDs; the pixel data kept as
encoded). pynetdicom's storescu is the sender (``-cx``: each file in its own transfer
syntax; dcmtk's proposes one compressed family per run): ``--clients`` of them at once.

1. Receiving: a listener whose --settle is an hour (nothing is scored meanwhile) takes
   every study from the clients into local disk; MB/s = the bytes sent over the clients'
   wall time, all of them together.
2. On-arrival latency: a second listener (--settle S, --results-to Orthanc over DIMSE)
   takes the same studies, sent one study after another by the clients; for each study,
   the time from the end of its settle (its last instance acknowledged + S) to its rows
   being committed in OUT, and to its Structured Report being stored in Orthanc (both
   polled twice a second). Reported: median, p95 and max over the studies. Orthanc is
   Debian's (tests/pacs.py starts it); without it, the commit alone is measured.

The model is resnet18 at 224 px (random weights: its cost, not its scores, matters here).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import hmac
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
from film_archive import archive
from pydicom.uid import generate_uid
from record import log, machine, write_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.pacs: Orthanc
from meddx.inputs.storage import StorageSettings
from meddx.model import registry
from meddx.pipelines.local_s3 import free_port, terminate
from meddx.store.commit import read_results
from tests import pacs as pacs_mod  # noqa: E402

KEY = "bench-listen-key-0123456789abcdef"
KEEP_LOGS: Path | None = None  # --keep-logs
MODEL, SIZE = "resnet18", 224


def study_films(folder: Path, studies: int, per_study: int, cache: Path) -> list[list[Path]]:
    """``studies`` lists of ``per_study`` DICOM films from the mix, each list one study."""
    mix = archive(240, "2400x2800", True, cache).resolve()
    sources = sorted(mix.rglob("*.dcm"))
    out = []
    for s in range(studies):
        uid, paths = generate_uid(), []
        for k in range(per_study):
            ds = pydicom.dcmread(sources[(s * per_study + k) % len(sources)])
            ds.StudyInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
            # One patient a study (the mix's films are each their own): a report is
            # built only for a study of one patient.
            ds.PatientID, ds.PatientName = f"BENCH-{s:03d}", f"Bench^{s:03d}"
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            path = folder / f"study-{s:03d}" / f"film-{k}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path)
            paths.append(path)
        out.append(paths)
    return out


class Listener:
    def __init__(self, work: Path, model: Path, settle: float, extra=()):
        self.archive, self.out = work / "archive", work / "out"
        self.port, self.health = free_port(), free_port()
        self.log = open(work / "listen.log", "wb")
        meddx = str(Path(sys.executable).parent / "meddx")
        args = [meddx, "listen", "--port", str(self.port), "--allow-ae", "BENCH",
                "--archive", str(self.archive), "--model", str(model), "--out", str(self.out),
                "--settle", str(settle), "--health-port", str(self.health), *extra]  # fmt: skip
        env = {**os.environ, "MEDDX_PSEUDONYM_KEY": KEY}
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait(lambda h: h["caught_up"], 300)

    def state(self) -> dict | None:
        try:
            url = f"http://127.0.0.1:{self.health}/health"
            with urllib.request.urlopen(url, timeout=2) as r:
                return json.loads(r.read())
        except OSError:
            return None

    def wait(self, until, seconds: float) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            state = self.state()
            if state is not None and until(state):
                return state
            if self.proc.poll() is not None:
                raise RuntimeError("the listener exited: see listen.log")
            time.sleep(0.25)
        raise RuntimeError(f"the listener did not get there in {seconds} s: {self.state()}")

    def send(self, files: list[Path]) -> subprocess.CompletedProcess:
        storescu = str(Path(sys.executable).parent / "storescu")  # pynetdicom's
        args = [storescu, "-cx", "-aet", "BENCH", "-aec", "MEDDX", "127.0.0.1", str(self.port)]
        return subprocess.run([*args, *map(str, files)], capture_output=True, timeout=600)

    def stop(self) -> None:
        terminate(self.proc, 60)
        self.log.close()
        if KEEP_LOGS:  # the listener's own lines: its batches and their timings
            KEEP_LOGS.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.log.name, KEEP_LOGS / f"listen-{self.port}.log")


def receiving(work: Path, model: Path, studies: list[list[Path]], clients: int) -> dict:
    server = Listener(work, model, settle=3600)
    shares = [[f for s in studies[c::clients] for f in s] for c in range(clients)]
    start = time.perf_counter()
    threads = [threading.Thread(target=server.send, args=(files,)) for files in shares]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    state = server.state()
    server.stop()
    sent = sum(f.stat().st_size for s in studies for f in s)
    kept = sum(p.stat().st_size for p in server.archive.rglob("*.dcm"))
    return {
        "instances": sum(map(len, studies)),
        "received": state["received"],
        "mb_sent": round(sent / 1e6, 1),
        "mb_kept": round(kept / 1e6, 1),
        "seconds": round(seconds, 2),
        "mb_per_s": round(sent / 1e6 / seconds, 1),
    }


def study_key(uid: str) -> str:
    return hmac.new(KEY.encode(), uid.encode(), hashlib.sha256).hexdigest()[:32]


def reported_studies(pacs) -> set[str]:
    """The keys of the studies Orthanc holds an SR of."""
    found = pacs.session().post(
        f"{pacs.http}/tools/find",
        json={"Level": "Study", "Query": {"ModalitiesInStudy": "SR"}, "Expand": True},
        timeout=10,
    )
    return {study_key(s["MainDicomTags"]["StudyInstanceUID"]) for s in found.json()}


def latency(work: Path, model: Path, studies: list[list[Path]], clients: int, settle: float):
    if pacs_mod.missing() is not None:
        log(f"no PACS: {pacs_mod.missing()}; the commit alone is timed")
        return timed(work, model, studies, clients, settle, None)
    dicom_port = free_port()
    extra = ["--results-to", f"dimse://PACS@127.0.0.1:{dicom_port}"]
    server = Listener(work, model, settle, extra)
    config = {
        "DicomAet": "PACS",
        "DicomPort": dicom_port,
        "OverwriteInstances": True,
        "DicomModalities": {"meddx": ["MEDDX", "127.0.0.1", server.port]},
    }
    with pacs_mod.orthanc_server(work / "orthanc", extra=config) as pacs:
        return timed(work, model, studies, clients, settle, pacs, server)


def timed(work, model, studies, clients, settle, pacs, server=None):
    server = server or Listener(work, model, settle=settle)
    acked: dict[str, float] = {}
    keys = [study_key(str(pydicom.dcmread(s[0], stop_before_pixels=True).StudyInstanceUID))
            for s in studies]  # fmt: skip

    def client(c: int) -> None:
        for i in range(c, len(studies), clients):
            if server.send(studies[i]).returncode == 0:
                acked[keys[i]] = time.monotonic()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    committed: dict[str, float] = {}
    stored: dict[str, float] = {}
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and (
        len(committed) < len(studies) or (pacs is not None and len(stored) < len(studies))
    ):
        if len(committed) == len(studies):  # the reports have a minute more, no longer
            deadline = min(deadline, time.monotonic() + 60)
        time.sleep(0.5)
        if pacs is not None:
            now = time.monotonic()
            for key in reported_studies(pacs):
                stored.setdefault(key, now)
        if not server.out.exists():
            continue
        try:
            rows = read_results(str(server.out), StorageSettings(), ["image_uri"])
        except Exception:  # a commit in flight: look again
            continue
        now = time.monotonic()
        for uri in rows["image_uri"].to_pylist():
            committed.setdefault(Path(uri).parent.name, now)
    for t in threads:
        t.join()
    state = server.state()
    server.stop()
    result = {
        "studies": len(studies),
        "scored": len(committed),
        "batches": state["batches"],
        "settle_s": settle,
        "after_settle_s": spread(
            [committed[k] - (acked[k] + settle) for k in keys if k in committed]
        ),
    }
    if pacs is not None:
        result["reports_stored"] = len(stored)
        result["report_after_settle_s"] = spread(
            [stored[k] - (acked[k] + settle) for k in keys if k in stored]
        )
    return result


def spread(waits: list[float]) -> dict:
    if not waits:
        return {}
    w = np.array(waits)
    return {
        "median": round(float(np.median(w)), 2),
        "p95": round(float(np.quantile(w, 0.95)), 2),
        "max": round(float(w.max()), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--per-study", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--settle", type=float, default=10.0)
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/.cache"))
    parser.add_argument(
        "--keep-logs", type=Path, default=None, help="copy the listeners' logs here"
    )
    args = parser.parse_args()
    global KEEP_LOGS
    KEEP_LOGS = args.keep_logs
    with tempfile.TemporaryDirectory(prefix="meddx-bench-listen-") as tmp:
        tmp = Path(tmp)
        model = tmp / "model.pt"
        ckpt = registry.untrained_checkpoint(MODEL, input_size=SIZE)
        registry.save_checkpoint(ckpt, str(model), StorageSettings())
        log("writing the studies")
        studies = study_films(tmp / "films", args.studies, args.per_study, args.cache)
        log(f"receiving: {args.clients} clients, settle an hour")
        (tmp / "a").mkdir()
        received = receiving(tmp / "a", model, studies, args.clients)
        log(f"on-arrival: settle {args.settle} s")
        (tmp / "b").mkdir()
        arrival = latency(tmp / "b", model, studies, args.clients, args.settle)
    result = {
        "date": dt.date.today().isoformat(),
        "model": MODEL,
        "preset": f"{args.studies}x{args.per_study}-c{args.clients}",
        "machine": machine(),
        "receiving": received,
        "on_arrival": arrival,
    }
    write_result(result, "listen-")
    r, a = received, arrival
    print(
        f"\nreceiving: {r['instances']} instances, {r['mb_sent']} MB from {args.clients} "
        f"storescu clients in {r['seconds']} s: {r['mb_per_s']} MB/s into local disk"
    )
    w = a["after_settle_s"]
    print(
        f"on arrival: {a['scored']} of {a['studies']} studies scored in {a['batches']} "
        f"batches; committed after the settle's end: median {w['median']} s, p95 {w['p95']} "
        f"s, max {w['max']} s (settle {a['settle_s']} s)"
    )
    if "report_after_settle_s" in a:
        w = a["report_after_settle_s"]
        print(
            f"reports: {a['reports_stored']} of {a['studies']} stored in the PACS after the "
            f"settle's end: median {w['median']} s, p95 {w['p95']} s, max {w['max']} s"
        )


if __name__ == "__main__":
    main()
