"""``meddx listen`` against real DICOM peers: dcmtk's storescu (Debian's) and pynetdicom
as sending modalities, the listener as a process of its own on the session's Ray,
started on free ports and stopped by its pid."""

import contextlib
import io
import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from meddx.inputs.storage import StorageSettings
from meddx.store.commit import read_results
from meddx.synthetic.dicom_film import encode_film

from . import pacs as pacs_mod
from .helpers import MEDDX, free_port, session_env, terminate
from .images import dicom_cr, gradient

# Debian's dcmtk, by its path: pynetdicom installs a storescu of its own in the venv.
STORESCU = "/usr/bin/storescu"
pytestmark = pytest.mark.skipif(not Path(STORESCU).exists(), reason="needs dcmtk's storescu")
KEY = "listen-test-key-0123456789abcdef"
STUDY = "1.2.826.0.1.3680043.8.498.77"


class Listener:
    """A `meddx listen` process on free ports, its log in a file."""

    def __init__(self, ray, tmp: Path, model: str, settle: float = 2.0, extra=()):
        self.tmp, self.archive, self.out = tmp, tmp / "archive", tmp / "out"
        self.port, self.health = free_port(), free_port()
        args = [MEDDX, "listen", "--ae-title", "MEDDX", "--port", str(self.port),
                "--allow-ae", "CR1,PACS", "--archive", str(self.archive), "--model", model,
                "--out", str(self.out), "--settle", str(settle),
                "--health-port", str(self.health), *extra]  # fmt: skip
        self.log = open(tmp / f"listen-{self.port}.log", "wb")
        env = {**session_env(ray), "MEDDX_PSEUDONYM_KEY": KEY}
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait(lambda h: h["accepting"], 120, "accepting")

    def state(self) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health}/health", timeout=2) as r:
                return json.loads(r.read())
        except OSError:
            return None

    def wait(self, until, seconds: float, what: str) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            state = self.state()
            if state is not None and until(state):
                return state
            assert self.proc.poll() is None, self.output()
            time.sleep(0.3)
        raise AssertionError(f"listener not {what} in {seconds} s: {self.state()}\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return (self.tmp / f"listen-{self.port}.log").read_text(errors="replace")[-3000:]

    def send(self, *files: Path, aet: str = "CR1", propose=()) -> subprocess.CompletedProcess:
        args = [STORESCU, *propose, "-aet", aet, "-aec", "MEDDX", "127.0.0.1", str(self.port)]
        return subprocess.run([*args, *map(str, files)], capture_output=True, text=True, timeout=60)

    def rows(self) -> list[dict]:
        if not self.out.exists():
            return []
        return read_results(
            str(self.out), StorageSettings(), ["image_uri", "status", "dt"]
        ).to_pylist()

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            if sig == signal.SIGKILL:
                self.proc.kill()
                self.proc.wait(30)
            else:
                terminate(self.proc, 30)
        self.log.close()


def films(folder: Path, n: int, start: int = 0, study: str = STUDY) -> list[Path]:
    """``n`` computed radiographs of one study, each its own instance."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        pixels = (np.roll(gradient(64), 7 * i, axis=1) * 4095).astype(np.uint16)
        ds = pydicom.dcmread(io.BytesIO(dicom_cr(pixels)))
        ds.StudyInstanceUID = study
        path = folder / f"film-{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture
def listener(ray_session, tmp_path, random_checkpoint):
    started = []

    def start(**kw):
        started.append(Listener(ray_session, tmp_path, random_checkpoint[0], **kw))
        return started[-1]

    yield start
    for one in started:
        one.stop()


def test_a_study_is_scored_once_it_settles_and_each_instance_once(listener, tmp_path):
    server = listener()
    sent = films(tmp_path / "study", 3)
    for path in sent:  # one by one, as a modality sends them
        assert server.send(path).returncode == 0
    server.wait(lambda h: h["rows_today"] >= 3, 120, "done scoring")
    rows = server.rows()
    assert len(rows) == 3 and {r["status"] for r in rows} == {"ok"}
    kept = sorted(server.archive.rglob("*.dcm"))
    assert len(kept) == 3 and len({r["image_uri"] for r in rows}) == 3
    # No UID in a path, so none in the results; the bytes kept are the instance sent.
    assert not any(STUDY in r["image_uri"] or STUDY in str(p) for r in rows for p in kept)
    uids = {pydicom.dcmread(p).SOPInstanceUID for p in kept}
    assert uids == {pydicom.dcmread(p).SOPInstanceUID for p in sent}

    # A fourth film later: scored; the first sent again: kept once, not scored again.
    late = films(tmp_path / "study", 1, start=3)
    assert server.send(*late, sent[0]).returncode == 0
    server.wait(lambda h: h["rows_today"] >= 4 and h["pending_instances"] == 0, 120, "idle")
    time.sleep(1.0)
    rows = server.rows()
    assert len(rows) == 4 and len({r["image_uri"] for r in rows}) == 4
    assert len(list(server.archive.rglob("*.dcm"))) == 4
    # A restart's run over the whole archive finds nothing the batches did not score.
    server.stop()
    again = listener()
    assert again.wait(lambda h: h["caught_up"], 120, "caught up")["rows_today"] == 4
    assert len(again.rows()) == 4


@contextlib.contextmanager
def orthanc_for(server: Listener, dicom_port: int, tmp: Path):
    """Orthanc as the PACS (AE title PACS, on ``dicom_port``): it knows the listener as
    the modality "meddx" and takes an instance sent again under its UID as the newer."""
    if pacs_mod.missing() is not None:
        pytest.skip(pacs_mod.missing())
    extra = {
        "DicomAet": "PACS",
        "DicomPort": dicom_port,
        "DicomModalities": {"meddx": ["MEDDX", "127.0.0.1", server.port]},
        "OverwriteInstances": True,
    }
    with pacs_mod.orthanc_server(tmp / "orthanc", extra=extra) as pacs:
        yield pacs


def reports_in(pacs) -> dict[str, pydicom.Dataset]:
    """The SRs Orthanc holds, by SOP Instance UID."""
    s = pacs.session()
    found = {}
    for series in s.get(f"{pacs.http}/series", params={"expand": ""}).json():
        if series["MainDicomTags"].get("Modality") != "SR":
            continue
        for instance in series["Instances"]:
            data = s.get(f"{pacs.http}/instances/{instance}/file").content
            ds = pydicom.dcmread(io.BytesIO(data))
            found[ds.SOPInstanceUID] = ds
    return found


def reported(sr: pydicom.Dataset) -> set[str]:
    """The SOP Instance UIDs an SR's measurement groups reference."""
    import highdicom as hd

    groups = hd.sr.ComprehensiveSR.from_dataset(sr).content.get_image_measurement_groups()
    return {image.referenced_sop_instance_uid for g in groups for image in g.source_images}


def test_orthanc_pushes_a_study_and_its_report_is_replaced_when_it_grows(listener, tmp_path):
    dicom_port = free_port()
    server = listener(extra=["--results-to", f"dimse://PACS@127.0.0.1:{dicom_port}"])
    with orthanc_for(server, dicom_port, tmp_path) as pacs:
        s = pacs.session()
        three, late = films(tmp_path / "study", 3), films(tmp_path / "study", 1, start=3)
        ids = [s.post(f"{pacs.http}/instances", data=p.read_bytes()).json() for p in three]
        # Orthanc pushes the study to the listener (C-STORE), as a routing rule would.
        study = ids[0]["ParentStudy"]
        assert s.post(f"{pacs.http}/modalities/meddx/store", data=study).ok
        server.wait(lambda h: h["batches"] >= 1 and h["rows_today"] >= 3, 120, "scored")
        first = reports_in(pacs)
        assert len(first) == 1, server.output()
        (sr,) = first.values()
        assert sr.StudyInstanceUID == STUDY
        assert reported(sr) == {pydicom.dcmread(p).SOPInstanceUID for p in three}

        # A fourth film of the study, later: scored, and the study's report replaced.
        more = s.post(f"{pacs.http}/instances", data=late[0].read_bytes()).json()
        assert s.post(f"{pacs.http}/modalities/meddx/store", data=more["ID"]).ok
        server.wait(lambda h: h["batches"] >= 2 and h["rows_today"] >= 4, 120, "scored again")
        second = reports_in(pacs)
        assert list(second) == list(first), "one report per study, replaced"
        assert reported(second[sr.SOPInstanceUID]) == {
            pydicom.dcmread(p).SOPInstanceUID for p in [*three, *late]
        }
        rows = server.rows()
        assert len(rows) == 4 and len({r["image_uri"] for r in rows}) == 4
        assert "not stored" not in server.output()


def test_forty_studies_from_four_clients_at_once(listener, tmp_path):
    dicom_port = free_port()
    server = listener(extra=["--results-to", f"dimse://PACS@127.0.0.1:{dicom_port}"])
    batches = [
        [f for k in range(10) for f in films(tmp_path / f"c{c}", 1, k, f"{STUDY}.{c}.{k}")]
        for c in range(4)
    ]
    with orthanc_for(server, dicom_port, tmp_path) as pacs:
        clients = [
            subprocess.Popen(
                [STORESCU, "-aet", "PACS", "-aec", "MEDDX", "127.0.0.1", str(server.port), *files],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for files in batches
        ]
        assert [c.wait(120) for c in clients] == [0, 0, 0, 0]
        state = server.wait(
            lambda h: h["rows_today"] >= 40 and h["pending_instances"] == 0, 180, "done scoring"
        )
        assert state["received"] == 40 and state["failed_batches"] == 0
        rows = server.rows()
        assert len(rows) == 40 and len({r["image_uri"] for r in rows}) == 40
        assert len({p.parent for p in server.archive.rglob("*.dcm")}) == 40  # a folder a study
        # Each study's report in the PACS, in its study.
        reports = reports_in(pacs)
        assert len(reports) == 40, server.output()
        assert {sr.StudyInstanceUID for sr in reports.values()} == {
            f"{STUDY}.{c}.{k}" for c in range(4) for k in range(10)
        }


def test_unknown_callers_and_what_is_no_instance_are_refused(listener, tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import ComputedRadiographyImageStorage

    server = listener(settle=60)
    (film,) = films(tmp_path / "study", 1)
    refused = server.send(film, aet="STRANGER")
    assert refused.returncode != 0 and not list(server.archive.rglob("*.dcm"))

    ae = AE(ae_title="PACS")
    ae.add_requested_context(ComputedRadiographyImageStorage)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="MEDDX")
    assert assoc.is_established
    broken = pydicom.dcmread(film)
    del broken.PixelData  # an instance without its image
    broken.SOPInstanceUID = generate_uid()
    assert assoc.send_c_store(broken).Status == 0xC000
    good = pydicom.dcmread(film)
    assert assoc.send_c_store(good).Status == 0x0000  # and it keeps serving
    assoc.release()
    assert len(list(server.archive.rglob("*.dcm"))) == 1
    # A JPEG 2000 film is kept as it was sent: its transfer syntax, its pixel data's bytes.
    film = tmp_path / "j2k.dcm"
    film.write_bytes(encode_film(gradient(96), "dicom-j2k", index=0, seed=0))
    assert server.send(film, propose=["-xv"]).returncode == 0  # propose JPEG 2000 lossless
    sent = pydicom.dcmread(film)
    (kept,) = [p for p in server.archive.rglob("*.dcm") if pydicom.dcmread(p).SOPInstanceUID
               == sent.SOPInstanceUID]  # fmt: skip
    kept = pydicom.dcmread(kept)
    assert kept.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    assert kept.file_meta.TransferSyntaxUID.is_compressed and kept.PixelData == sent.PixelData
    state = server.state()
    assert (state["received"], state["refused"]) == (2, 1)
    assert "PatientName" not in server.output() and "Doe" not in server.output()


def test_killed_after_the_acknowledgement_loses_nothing(listener, tmp_path):
    first = listener(settle=3600)  # nothing settles before the kill
    sent = films(tmp_path / "study", 2)
    assert first.send(*sent).returncode == 0
    first.stop(signal.SIGKILL)
    assert len(list(first.archive.rglob("*.dcm"))) == 2  # acknowledged: kept
    again = listener(settle=3600)  # the same archive and OUT: catches up on start
    again.wait(lambda h: h["caught_up"] and h["rows_today"] == 2, 120, "caught up")
    again.stop()
    third = listener(settle=3600)  # and a third start scores nothing twice
    third.wait(lambda h: h["caught_up"], 120, "caught up")
    rows = third.rows()
    assert len(rows) == 2 and len({r["image_uri"] for r in rows}) == 2


def test_deploy_manifests_run_the_listener_with_options_it_takes():
    import re

    import yaml

    from meddx.cli.listening import listen

    from .helpers import REPO

    docs = list(yaml.safe_load_all((REPO / "deploy" / "listen.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    service = next(d for d in docs if d["kind"] == "Service")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    command = [re.sub(r"\$\((\w+)\)", "X", a) for a in container["command"]]
    assert command[:2] == ["meddx", "listen"]
    ctx = listen.make_context("listen", command[2:])  # every option one listen takes
    assert ctx.params["port"] == 11112 and ctx.params["health_port"] == 8080
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert service["spec"]["ports"][0]["targetPort"] == "dicom"
    unit = (REPO / "deploy" / "systemd" / "meddx-listen.service").read_text()
    line = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    args = re.sub(r'"\$\w+"', "X", line.split("meddx listen ", 1)[1].rstrip("'")).split()
    assert listen.make_context("listen", args).params["settle"] == 60.0


def test_over_tls_a_plain_association_is_refused(listener, tmp_path):
    import ssl

    from pynetdicom import AE
    from pynetdicom.sop_class import ComputedRadiographyImageStorage

    from .pacs import site_ca

    ca, cert, key = site_ca(tmp_path / "tls")
    server = listener(settle=60, extra=["--tls-cert", str(cert), "--tls-key", str(key)])
    (film,) = films(tmp_path / "study", 1)
    ae = AE(ae_title="PACS")
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context(ComputedRadiographyImageStorage)
    assert not ae.associate("127.0.0.1", server.port, ae_title="MEDDX").is_established
    client = ssl.create_default_context(cafile=str(ca))
    assoc = ae.associate("127.0.0.1", server.port, ae_title="MEDDX", tls_args=(client, "127.0.0.1"))
    assert assoc.is_established
    assert assoc.send_c_store(pydicom.dcmread(film)).Status == 0x0000
    assoc.release()
    assert len(list(server.archive.rglob("*.dcm"))) == 1
