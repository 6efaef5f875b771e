"""The HTML page of a screening night (meddx.analysis.page), rendered from a summary,
the night's rows and its worklist without Ray: what it states, and what it never names.
tests/test_screen.py checks the page a real night writes, in a browser.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from meddx import __version__
from meddx.analysis import page
from meddx.analysis.drift import Drift
from meddx.imaging.dicom import pseudonymous_id
from meddx.names import QC_OK
from meddx.pipelines.screening import NightSummary
from meddx.pipelines.triage import worklist

RUN_DATE = "2026-11-26"
SHA = "5eed" * 16
THRESHOLD = 0.5
# A patient's name in the archive's file names, as some archives have them.
PATIENT = "DOE^JANE"
POSITIVES = 25  # above the threshold and qc ok: more than the page lists


class Parsed(HTMLParser):
    """The page's tables (each under the h2 heading before it, as rows of cell texts)
    and its images (alt text -> the PNG bytes of their data: URI)."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: list[tuple[str, list[list[str]]]] = []
        self.images: dict[str, bytes] = {}
        self.heading, self._in_heading, self._cell = "", False, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "h2":
            self._in_heading, self.heading = True, ""
        elif tag == "table":
            self.tables.append((self.heading, []))
        elif tag == "tr":
            self.tables[-1][1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            prefix = "data:image/png;base64,"
            assert attrs["src"].startswith(prefix)
            self.images[attrs["alt"]] = base64.b64decode(attrs["src"].removeprefix(prefix))

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_heading = False
        elif tag in ("td", "th"):
            self.tables[-1][1][-1].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._in_heading:
            self.heading += data
        if self._cell is not None:
            self._cell += data

    def table(self, heading: str, first: str | None = None) -> list[list[str]]:
        """The rows of the table under ``heading`` (whose first row's first cell is
        ``first``, when a heading has several)."""
        (rows,) = [
            rows
            for h, rows in self.tables
            if h.startswith(heading) and (first is None or rows[0][0] == first)
        ]
        return rows


def night_rows() -> pa.Table:
    """One night: POSITIVES qc-ok rows above the threshold (one of them a DICOM study
    named by its pseudonym), three below it, two the model should not judge alone, two
    errors. File names carry the patient's name."""
    at = dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)
    rows = []

    def add(i: int, status="ok", score=None, qc=QC_OK, ood=None, pseudonym=None, label=None):
        rows.append(
            {
                "image_uri": f"s3://archive/{PATIENT}/film-{i:03d}.png",
                "status": status,
                "score": score,
                "label": label or ("opacity" if (score or 0) >= THRESHOLD else "normal"),
                "probs": None if score is None else [1 - score, score],
                "qc": qc if status == "ok" else None,
                "ood_score": ood,
                "study_pseudonym": pseudonym,
                "instance_pseudonym": None,
                "modality": "CR" if pseudonym else None,
                "view_position": "PA",
                "model_name": "seednet",
                "model_sha256": SHA,
                "threshold": THRESHOLD,
                "run_id": "run-1",
                "scored_at": at + dt.timedelta(seconds=i),
            }
        )

    for i in range(POSITIVES):  # scores 0.98, 0.96, ... all different
        add(i, score=round(0.98 - 0.015 * i, 3), pseudonym="9f" * 16 if i == 3 else None)
    for i in range(POSITIVES, POSITIVES + 3):
        add(i, score=0.1 + 0.1 * (i - POSITIVES))
    add(40, score=0.99, qc="ood", ood=7.25)  # highest score, yet not on the worklist
    add(41, score=0.2, qc="low_quality")
    add(42, status="error")
    add(43, status="error")
    return pa.Table.from_pylist(rows)


def summary(rows: pa.Table, **kwargs) -> NightSummary:
    fields = dict(
        run_id="run-1",
        run_date=RUN_DATE,
        source="s3://archive/",
        inputs_seen=50,
        new_inputs=rows.num_rows,
        rows=rows.num_rows,
        ok=rows.num_rows - 2,
        errors=2,
        error_rate=2 / rows.num_rows,
        errors_by_reason={"empty object": 1, "<b>truncated</b> JPEG": 1},
        positives=POSITIVES,
        threshold=THRESHOLD,
        model_name="seednet",
        model_sha256=SHA,
        seconds=12.5,
        images_per_s=2.56,
        recovered=[],
        versions={"meddx": __version__, "torch": "2.14.1", "ray": "2.60.0"},
        qc_flagged=2,
        qc_by_reason={"low_quality": 1, "ood": 1},
        positive_studies=POSITIVES,
        qc_flagged_studies=2,
    )
    return NightSummary(**{**fields, **kwargs})


def history(rng_seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rng_seed)
    return {
        "2026-11-24": rng.beta(2, 5, 200),
        "2026-11-25": rng.beta(2, 5, 180),
        RUN_DATE: rng.beta(2, 3, 150),
    }


@pytest.fixture(scope="module")
def night():
    rows = night_rows()
    return rows, summary(rows), worklist(rows)


def render(night, **kwargs) -> tuple[str, Parsed]:
    rows, s, triage = night
    text = page.render(
        kwargs.pop("summary", s), rows, triage, [kwargs.pop("history", history())], **kwargs
    )
    return text, Parsed(text)


def test_the_page_states_the_nights_figures(night):
    text, parsed = render(night)
    counts = dict(parsed.table("Counts"))
    assert counts == {
        "inputs seen": "50",
        "new or changed": "32",
        "rows written": "32",
        "scored ok": "30",
        "errors": "2",
        "error rate": "6.2%",
        "positive images": str(POSITIVES),
        "positive studies (worklist)": str(POSITIVES),
        "images needing a human read (qc not ok)": "2",
        "studies needing a human read": "2",
        "quality-control rate": "6.7%",
        "seconds": "12.5",
        "images/s": "2.56",
    }
    # Reasons as text, never as markup.
    assert parsed.table("Errors by reason")[1:] == [
        ["empty object", "1"],
        ["<b>truncated</b> JPEG", "1"],
    ]
    assert "&lt;b&gt;truncated&lt;/b&gt;" in text and "<b>truncated" not in text
    assert "Alarms" not in text and "drift (PSI)" not in counts
    assert f"threshold {THRESHOLD:.3f}" in text and SHA[:16] in text


def test_drift_and_alarms_are_shown_when_there_are_some(night):
    rows = night[0]
    drifted = summary(
        rows,
        drift=Drift(psi=0.31234567, reference_dates=["2026-11-25"], reference_n=180, current_n=30),
        alarms=["score distribution drifted: PSI 0.312 over --max-psi 0.2"],
    )
    text, parsed = render(night, summary=drifted)
    assert dict(parsed.table("Counts"))["drift (PSI)"] == "0.3123"
    assert '<div class="alarm">' in text
    assert "<li>score distribution drifted: PSI 0.312 over --max-psi 0.2</li>" in text


def test_the_worklist_is_the_top_of_the_positives_by_score(night):
    rows, _, _ = night
    _, parsed = render(night)
    listed = parsed.table("Worklist")
    assert listed[0] == ["rank", "study", "score", "label", "images", "qc", "modality"]
    ok = [
        {**r, "modality": r["modality"] or ""}
        for r in rows.to_pylist()
        if r["status"] == "ok" and r["qc"] == QC_OK
    ]
    top = sorted((r for r in ok if r["score"] >= THRESHOLD), key=lambda r: -r["score"])
    expected = [
        [str(rank), pseudonymous_id(r), f"{r['score']:.3f}", "opacity", "1", "ok", r["modality"]]
        for rank, r in enumerate(top[: page.TOP_WORKLIST], start=1)
    ]
    assert page.TOP_WORKLIST < POSITIVES and listed[1:] == expected
    assert expected[3][1] == "9f" * 16 and expected[3][6] == "CR"  # the DICOM study
    # What the model should not judge alone is listed apart, whatever its score.
    human = parsed.table("Needs a human read (2)", first="rank")
    assert human[0][2:5] == ["qc", "images flagged", "score"]
    assert [(r[2], r[3], r[4]) for r in human[1:]] == [
        ("low_quality", "1 of 1", "0.200"),
        ("ood", "1 of 1", "0.990"),
    ]
    assert human[2][5] == "7.25"
    assert dict(parsed.table("Needs a human read", first="reason")[1:]) == {
        "low_quality": "1",
        "ood": "1",
    }


def test_a_study_of_several_images_is_one_line(night):
    """A PA and a lateral of one study: one worklist line naming the study, which counts
    both images and says the lateral needs a human read; one line there too."""
    rows, s, _ = night
    study = "5a" * 16
    base = rows.filter(pc.equal(rows["image_uri"], rows["image_uri"][0])).to_pylist()[0]
    pa_film = {**base, "image_uri": "s3://archive/x/pa.dcm", "study_pseudonym": study,
               "score": 0.995, "probs": [0.005, 0.995], "modality": "DX"}  # fmt: skip
    lateral = {**pa_film, "image_uri": "s3://archive/x/lat.dcm", "score": 0.6,
               "probs": [0.4, 0.6], "qc": "wrong_view", "view_position": "LL"}  # fmt: skip
    both = pa.concat_tables([rows, pa.Table.from_pylist([pa_film, lateral], schema=rows.schema)])
    _, parsed = render((both, s, worklist(both)))
    listed = [r for r in parsed.table("Worklist")[1:] if r[1] == study]
    assert listed == [["1", study, "0.995", "opacity", "2", "wrong_view", "DX"]]
    human = parsed.table("Needs a human read", first="rank")[1:]
    assert [r[1:5] for r in human if r[1] == study] == [[study, "wrong_view", "1 of 2", "0.600"]]


def test_a_night_without_positives_says_so(night):
    rows, s, _ = night
    quiet = rows.filter(pc.less(rows["score"], THRESHOLD))
    _, parsed = render((quiet, s, worklist(quiet)))
    assert parsed.table("Worklist")[1:] == [["no positives above the threshold"]]


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_the_score_history_is_plotted(night):
    _, parsed = render(night)
    assert set(parsed.images) == {"Score distribution", "Throughput"}
    plotted = png_pixels(parsed.images["Score distribution"])
    assert plotted.shape[0] > 100 and plotted.std() > 5
    # The plot is of the history given: other nights, another picture; the same, the same.
    again = Parsed(page.render(night[1], night[0], night[2], [history()])).images
    assert again["Score distribution"] == parsed.images["Score distribution"]
    other = Parsed(page.render(night[1], night[0], night[2], [history(rng_seed=1)])).images
    assert not np.array_equal(png_pixels(other["Score distribution"]), plotted)
    tonight_only = {RUN_DATE: history()[RUN_DATE]}
    alone = Parsed(page.render(night[1], night[0], night[2], [tonight_only])).images
    assert not np.array_equal(png_pixels(alone["Score distribution"]), plotted)


def test_heatmaps_given_are_embedded_in_worklist_order(night):
    rows = night[2].to_pylist()
    overlays = []
    for shade in (40, 200):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (shade, 0, 0)).save(buf, format="PNG")
        overlays.append(buf.getvalue())
    _, parsed = render(night, heatmaps=list(zip(rows[:2], overlays, strict=True)))
    assert parsed.images["Grad-CAM, worklist #1"] == overlays[0]
    assert parsed.images["Grad-CAM, worklist #2"] == overlays[1]
    assert len(parsed.images) == 4


def test_the_versions_are_stated(night):
    _, parsed = render(night)
    stated = dict(parsed.table("Versions"))
    assert stated == {
        "meddx": __version__,
        "torch": "2.14.1",
        "ray": "2.60.0",
        "model sha256": SHA,
    }
    found = page.versions()
    assert found["meddx"] == __version__ and {"torch", "ray", "pyarrow", "python"} <= set(found)


def test_nothing_from_a_patient_file_is_on_the_page(night):
    text, _ = render(night)
    assert PATIENT not in text and "DOE" not in text and "film-" not in text
    assert "s3://archive" not in text  # neither the inputs' URIs nor the source
    rows = night[0].to_pylist()
    assert pseudonymous_id(rows[0]) in text  # a file is named by a hash of its URI
