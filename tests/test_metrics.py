"""Prometheus metrics, read back as Prometheus reads them (``prometheus_client.parser``):
the textfile and the push of real `screen` and `score` runs, alarmed and failed ones
included; a `meddx listen` process's /metrics after a real C-STORE; the alert rules."""

import json
import re
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from meddx import MeddxError
from meddx.cli import main
from meddx.config import ScreenConfig, TrainConfig
from meddx.imaging.dicom import pseudonym
from meddx.pipelines import metrics
from meddx.pipelines.training import TrainSummary

from .helpers import REPO
from .images import broken_inputs, png
from .test_listen import KEY, STORESCU, STUDY, Listener, films

ALERTS = REPO / "deploy" / "prometheus" / "meddx-alerts.yaml"


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a page: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def last_run(text: str, command: str) -> dict[str, float]:
    """A command's meddx_last_run_* figures, by their short name."""
    return {
        name.removeprefix(metrics.LAST_RUN): v
        for (name, labels), v in samples(text).items()
        if name.startswith(metrics.LAST_RUN) and labels == (("command", command),)
    }


class Gateway:
    """A stand-in Pushgateway on a free port: records each push (method, path, body)."""

    def __init__(self):
        pushes = self.pushes = []

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self):  # noqa: N802 (http.server's name)
                self.record()

            def do_POST(self):  # noqa: N802
                self.record()

            def record(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                pushes.append((self.command, self.path, body.decode()))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def gateway():
    server = Gateway()
    yield server
    server.server.shutdown()
    server.server.server_close()


def test_nights_and_a_score_write_the_textfile_and_push_it(
    ray_session, tmp_path, random_checkpoint, gateway
):
    incoming, out = tmp_path / "incoming", tmp_path / "out"
    incoming.mkdir()
    for i in range(4):
        (incoming / f"img-{i}.png").write_bytes(png(size=48 + 4 * i))
    prom = tmp_path / "textfile" / "meddx.prom"
    prom.parent.mkdir()
    model = random_checkpoint[0]
    args = ["screen", str(incoming), "--model", model, "--out", str(out), "--quiet",
            "--metrics-file", str(prom), "--pushgateway", gateway.url]  # fmt: skip

    # A good night: its figures, as summary.json says them; pushed as written.
    main([*args, "--run-date", "2026-12-01"])
    text = prom.read_text()
    night = json.loads((out / "_runs" / "dt=2026-12-01" / "summary.json").read_text())
    figures = last_run(text, "screen")
    assert figures["success"] == 1 and figures["alarms"] == 0
    assert (figures["rows"], figures["errors"], figures["inputs"]) == (4, 0, 4)
    assert figures["qc_rate"] == pytest.approx(night["qc_flagged"] / night["ok"])
    assert figures["duration_seconds"] > 0 and abs(figures["timestamp_seconds"] - time.time()) < 60
    first_success = value(text, metrics.LAST_SUCCESS, command="screen")
    assert first_success == figures["timestamp_seconds"]
    method, path, body = gateway.pushes[-1]
    assert (method, path) == ("PUT", "/metrics/job/meddx_screen")
    assert samples(body) == samples(text)

    # An alarmed night (exit 3): written all the same, its alarm counted.
    (incoming / "notes.png").write_bytes(broken_inputs()["notes.png"])
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--run-date", "2026-12-02", "--max-error-rate", "0"])
    assert exit_info.value.code == 3
    text = prom.read_text()
    figures = last_run(text, "screen")
    assert figures["success"] == 1 and figures["alarms"] >= 1
    assert (figures["rows"], figures["errors"], figures["error_rate"]) == (1, 1, 1.0)
    alarmed_success = value(text, metrics.LAST_SUCCESS, command="screen")
    assert alarmed_success > first_success

    # A failed night (exit 1): success 0, the last success and the last figures kept;
    # pushed with POST, which leaves the gateway's last success as it was.
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--run-date", "2026-12-03", "--model-sha256", "0" * 64])
    assert exit_info.value.code == 1
    text = prom.read_text()
    figures = last_run(text, "screen")
    assert figures["success"] == 0 and figures["rows"] == 1 and figures["alarms"] >= 1
    assert value(text, metrics.LAST_SUCCESS, command="screen") == alarmed_success
    method, path, body = gateway.pushes[-1]
    assert (method, path) == ("POST", "/metrics/job/meddx_screen")
    pushed = last_run(body, "screen")
    assert pushed["success"] == 0 and "rows" not in pushed
    assert metrics.LAST_SUCCESS not in body
    assert len(gateway.pushes) == 3

    # A score run into the same file: its own lines beside the night's.
    main(["score", str(incoming), "--model", model, "--out", str(tmp_path / "scored"),
          "--quiet", "--metrics-file", str(prom)])  # fmt: skip
    text = prom.read_text()
    scored = last_run(text, "score")
    assert scored["success"] == 1 and (scored["rows"], scored["errors"]) == (5, 1)
    assert scored["error_rate"] == pytest.approx(1 / 5)
    assert last_run(text, "screen")["success"] == 0
    # No path or file name in any line: labels are the command (and a model) only.
    assert str(tmp_path) not in text and "notes.png" not in text


def test_a_successful_run_replaces_its_commands_lines_a_failed_one_only_its_own(tmp_path):
    prom = tmp_path / "m.prom"
    night = metrics.RunRecord("screen", success=True, figures={"rows": 7}, psi={("a", "1"): 0.3})
    metrics.write_textfile(str(prom), "screen", night.families(100.0), replace=True)
    trained = metrics.RunRecord("train")
    trained.trained(TrainSummary("m.pt", "ab", {"val_auroc": 0.91}, 12.0, n_train=80, n_val=20))
    metrics.write_textfile(str(prom), "train", trained.families(200.0), replace=True)
    text = prom.read_text()
    assert value(text, "meddx_last_run_val_auroc", command="train") == 0.91
    assert value(text, "meddx_last_run_rows", command="train") == 100
    assert value(text, metrics.PSI, command="screen", model="a", sha256="1") == 0.3

    # Another model's night: the first model's drift is gone, train's lines stay.
    other = metrics.RunRecord("screen", success=True, figures={"rows": 3}, psi={("b", "2"): 0.1})
    metrics.write_textfile(str(prom), "screen", other.families(300.0), replace=True)
    found = samples(prom.read_text())
    assert (metrics.PSI, (("command", "screen"), ("model", "a"), ("sha256", "1"))) not in found
    assert value(prom.read_text(), "meddx_last_run_rows", command="train") == 100

    # What is no Prometheus text is replaced, with a warning, not a failed run.
    prom.write_text("this is { not metrics\n")
    metrics.publish(night, str(prom), None)
    assert value(prom.read_text(), "meddx_last_run_rows", command="screen") == 7


def test_options_refuse_a_file_or_gateway_that_would_never_be_read(tmp_path):
    base = {"input": str(tmp_path), "model": "m.pt", "out": str(tmp_path / "out")}
    for bad, match in (
        ({"metrics_file": str(tmp_path / "meddx.txt")}, r"\*\.prom"),
        ({"metrics_file": "s3://bucket/meddx.prom"}, r"\*\.prom"),
        ({"metrics_file": str(tmp_path / "missing" / "meddx.prom")}, "folder does not exist"),
        ({"pushgateway": "gateway:9091"}, "http"),
    ):
        with pytest.raises(MeddxError, match=match):
            ScreenConfig(**base, **bad)
    with pytest.raises(MeddxError, match=r"\*\.prom"):
        TrainConfig(data=str(tmp_path), out="m.pt", metrics_file="meddx")
    assert ScreenConfig(**base, metrics_file=str(tmp_path / "m.prom")).pushgateway is None


@pytest.mark.skipif(not Path(STORESCU).exists(), reason="needs dcmtk's storescu")
def test_the_listener_serves_metrics_without_a_uid(ray_session, tmp_path, random_checkpoint):
    server = Listener(ray_session, tmp_path, random_checkpoint[0], settle=1.0)
    try:
        assert server.send(*films(tmp_path / "study", 2)).returncode == 0
        deadline, page = time.monotonic() + 120, ""
        while time.monotonic() < deadline:
            url = f"http://127.0.0.1:{server.health}/metrics"
            with urllib.request.urlopen(url, timeout=5) as reply:
                page = reply.read().decode()
                kind = reply.headers["Content-Type"]
            if samples(page).get(("meddx_listen_studies_scored_total", ())):
                break
            time.sleep(0.3)
        health = server.state()
    finally:
        server.stop()
    got = samples(page)
    assert kind.startswith("text/plain")
    assert got[("meddx_listen_instances_received_total", ())] == 2
    assert got[("meddx_listen_studies_received_total", ())] == 1
    assert got[("meddx_listen_studies_scored_total", ())] == 1, server.output()
    assert got[("meddx_listen_studies_failed_total", ())] == 0
    assert got[("meddx_listen_queue_studies", ())] == 0
    assert got[("meddx_listen_queue_instances", ())] == 0
    assert got[("meddx_listen_today_rows", ())] == 2 == health["rows_today"]
    assert got[("meddx_listen_today_error_rate", ())] == 0
    # One study observed once, after at least its settle time.
    assert got[("meddx_listen_receive_to_result_seconds_count", ())] == 1
    assert got[("meddx_listen_receive_to_result_seconds_sum", ())] >= 1.0
    # No UID, pseudonym, patient value or path in the page.
    key = KEY.encode()
    for secret in (STUDY, pseudonym(STUDY, key), "Doe^Jane", str(tmp_path)):
        assert secret not in page


def test_the_alert_rules_name_only_metrics_meddx_writes():
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {"MeddxNoSuccessfulNight", "MeddxNightErrorRate"}
    written = {metrics.LAST_RUN + name for name in metrics.RUN_FIGURES}
    written |= {metrics.LAST_SUCCESS, metrics.PSI}
    used = {m for r in rules for m in re.findall(r"\bmeddx_[a-z0-9_]+", r["expr"])}
    assert used and used <= written, used - written
    by_name = {r["alert"]: r["expr"] for r in rules}
    assert "26 * 3600" in by_name["MeddxNoSuccessfulNight"]
    assert "> 0.05" in by_name["MeddxNightErrorRate"]
