"""Results per study: the worklist (Parquet, CSV and the report's tables) has one entry per
study and model, OUT keeps one row per image, and ``meddx evaluate --by-study`` counts a
study as positive when any of its images is."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from meddx.analysis.evaluation import by_study, evaluate
from meddx.cli import cli
from meddx.config import EvaluateConfig, ScreenConfig
from meddx.inputs.storage import StorageSettings
from meddx.names import HUMAN_READ, OUTPUT_SCHEMA, QC_LOW_QUALITY, QC_OK, QC_WRONG_VIEW
from meddx.pipelines.screening import screen
from meddx.pipelines.triage import WORKLIST_COLUMNS, as_csv_cells, worklist
from meddx.store.commit import read_results

from .images import dicom_cr, gradient, png

SHA = "5eed" * 16
STUDY = "ab" * 16  # a study pseudonym


def row(uri, score, study=None, qc=QC_OK, status="ok", probs=None, label=None, sha=SHA):
    return {
        "image_uri": uri,
        "status": status,
        "label": label or ("opacity" if (score or 0) >= 0.5 else "normal"),
        "score": score,
        "probs": probs or (None if score is None else [1 - score, score]),
        "threshold": 0.5,
        "qc": qc if status == "ok" else None,
        "study_pseudonym": study,
        "model_name": "seednet",
        "model_sha256": sha,
        "run_id": "run-1",
    }


def table(rows) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


def section(triage: pa.Table, name: str) -> list[dict]:
    return [r for r in triage.to_pylist() if r["section"] == name]


def test_a_pa_and_lateral_with_a_finding_are_one_entry():
    rows = table(
        [
            row("s3://a/study/lateral.dcm", 0.7, STUDY),
            row("s3://a/study/pa.dcm", 0.9, STUDY),
            row("s3://a/film.png", 0.8),  # no study: its own
            row("s3://a/quiet.png", 0.1),
        ]
    )
    triage = worklist(rows)
    assert triage.column_names == WORKLIST_COLUMNS
    found = section(triage, "positive")
    assert [(r["rank"], r["image_uri"]) for r in found] == [
        (1, "s3://a/study/pa.dcm"),  # the study's top image names it
        (2, "s3://a/film.png"),
    ]
    study = found[0]
    assert study["study_pseudonym"] == STUDY and study["score"] == pytest.approx(0.9)
    assert (study["other_images"], study["other_image_uris"]) == (1, ["s3://a/study/lateral.dcm"])
    assert (study["qc"], study["flagged_images"]) == (QC_OK, 0)
    assert found[1]["study_pseudonym"] is None and found[1]["other_image_uris"] == []
    assert section(triage, HUMAN_READ) == []


def test_a_study_with_a_flagged_image_needs_a_human_read_once():
    rows = table(
        [
            row("s3://a/s/pa.dcm", 0.9, STUDY),
            row("s3://a/s/lateral.dcm", 0.95, STUDY, qc=QC_WRONG_VIEW),
            row("s3://a/s/blank.dcm", 0.2, STUDY, qc=QC_LOW_QUALITY),
            row("s3://a/s/broken.dcm", None, STUDY, status="error"),
            row("s3://a/blank.png", 0.3, qc=QC_LOW_QUALITY),
        ]
    )
    triage = worklist(rows)
    human = section(triage, HUMAN_READ)
    assert [(r["rank"], r["study_pseudonym"], r["qc"], r["flagged_images"]) for r in human] == [
        (1, None, QC_LOW_QUALITY, 1),
        (2, STUDY, f"{QC_LOW_QUALITY};{QC_WRONG_VIEW}", 2),
    ]
    # Its top flagged image, and the study's every other image, the unreadable one too.
    assert human[1]["image_uri"] == "s3://a/s/lateral.dcm"
    assert human[1]["score"] == pytest.approx(0.95) and human[1]["other_images"] == 3
    # The PA's finding stays a positive, where the study's QC state shows.
    (positive,) = section(triage, "positive")
    assert positive["image_uri"] == "s3://a/s/pa.dcm"
    assert positive["score"] == pytest.approx(0.9)  # the lateral's 0.95 is not judged
    assert positive["qc"] == f"{QC_LOW_QUALITY};{QC_WRONG_VIEW}"
    assert positive["flagged_images"] == 2 and positive["other_images"] == 3


def test_findings_of_a_study_are_each_at_their_highest():
    """A multi-label study: each finding's highest probability over its images, and the
    findings of all of them (the top image's first)."""
    rows = table(
        [
            row("s3://a/s/pa.dcm", 0.8, STUDY, probs=[0.8, 0.1, 0.2], label="opacity"),
            row("s3://a/s/lat.dcm", 0.7, STUDY, probs=[0.3, 0.7, 0.1], label="effusion"),
            row("s3://a/s/ap.dcm", 0.55, STUDY, probs=[0.55, 0.6, 0.1], label="opacity;effusion"),
        ]
    )
    (entry,) = section(worklist(rows), "positive")
    assert entry["label"] == "opacity;effusion"
    assert entry["probs"] == pytest.approx([0.8, 0.7, 0.2])
    assert entry["image_uri"] == "s3://a/s/pa.dcm" and entry["other_images"] == 2


def test_several_models_an_entry_per_study_and_model_together():
    other = "c0" * 32
    rows = table(
        [
            row("s3://a/s/pa.dcm", 0.6, STUDY),
            row("s3://a/s/lat.dcm", 0.65, STUDY),
            row("s3://a/s/pa.dcm", 0.97, STUDY, sha=other),
            row("s3://a/s/lat.dcm", 0.2, STUDY, sha=other),
            row("s3://a/film.png", 0.9),
            row("s3://a/film.png", 0.8, sha=other),
        ]
    )
    found = section(worklist(rows), "positive")
    assert [(r["image_uri"], r["model_sha256"], round(r["score"], 2)) for r in found] == [
        ("s3://a/s/pa.dcm", other, 0.97),  # the study of the highest score first
        ("s3://a/s/lat.dcm", SHA, 0.65),
        ("s3://a/film.png", SHA, 0.9),
        ("s3://a/film.png", other, 0.8),
    ]
    # Each model's entry lists the study's other image: scored, by that model.
    assert [r["other_image_uris"] for r in found[:2]] == [["s3://a/s/lat.dcm"], ["s3://a/s/pa.dcm"]]


def test_the_csv_holds_lists_as_json_and_no_formula():
    hostile = '=HYPERLINK("http://x","y")'
    rows = table([row("s3://a/s/pa.dcm", 0.9, STUDY), row(hostile, 0.6, STUDY)])
    buf = io.BytesIO()
    pacsv.write_csv(as_csv_cells(worklist(rows)), buf)
    (entry,) = csv.DictReader(io.StringIO(buf.getvalue().decode()))
    assert list(entry) == WORKLIST_COLUMNS
    assert json.loads(entry["other_image_uris"]) == [hostile]  # starts with "[": no formula
    assert json.loads(entry["probs"]) == [0.4, 0.9]  # each class at its highest, as float32
    empty = worklist(table([row("s3://a/q.png", 0.1)]))
    assert empty.num_rows == 0 and empty.schema.names == WORKLIST_COLUMNS


@pytest.mark.slow
def test_a_night_lists_studies(ray_session, tmp_path, triage_checkpoint, monkeypatch):
    """Real DICOM studies on a real Ray: a PA and an AP of one study are one entry; a
    PA and a lateral (a view the model was not trained on) are one positive entry and
    one human read; the rows stay one per image."""
    monkeypatch.setenv("MEDDX_PSEUDONYM_KEY", "study-test-key")
    films = tmp_path / "in"
    films.mkdir()
    one, two = "1.2.826.0.1.3680043.8.498.11", "1.2.826.0.1.3680043.8.498.22"
    (films / "one-pa.dcm").write_bytes(dicom_cr(study=one, view="PA"))
    flipped = (gradient(64)[::-1] * 4095).astype(np.uint16)
    (films / "one-ap.dcm").write_bytes(dicom_cr(flipped, study=one, view="AP"))
    (films / "two-pa.dcm").write_bytes(dicom_cr(study=two, view="PA"))
    (films / "two-lateral.dcm").write_bytes(dicom_cr(study=two, view="LL"))
    (films / "film.png").write_bytes(png("L", size=60))
    out = tmp_path / "out"
    cfg = ScreenConfig(input=str(films), model=triage_checkpoint, out=str(out),
                       run_date="2026-12-08", max_qc_rate=0.5)  # fmt: skip
    night = screen(cfg)
    assert (night.rows, night.positives, night.qc_flagged) == (5, 4, 1)
    assert (night.positive_studies, night.qc_flagged_studies) == (3, 1)
    rows = read_results(str(out), StorageSettings(), ["image_uri", "study_pseudonym", "score"])
    assert rows.num_rows == 5
    pseudonym = {r["image_uri"].rsplit("/", 1)[1]: r["study_pseudonym"] for r in rows.to_pylist()}
    runs = out / "_runs" / "dt=2026-12-08"
    triage = pq.read_table(runs / "worklist.parquet")
    found, human = section(triage, "positive"), section(triage, HUMAN_READ)
    assert len(found) == 3 and len(human) == 1
    by_study = {r["study_pseudonym"]: r for r in found}
    first = by_study[pseudonym["one-pa.dcm"]]
    score = {r["image_uri"]: r["score"] for r in rows.to_pylist()}
    top = min(("one-pa.dcm", "one-ap.dcm"), key=lambda n: (-score[str(films / n)], n))
    other = "one-ap.dcm" if top == "one-pa.dcm" else "one-pa.dcm"
    assert first["image_uri"] == str(films / top)
    assert first["other_image_uris"] == [str(films / other)] and first["qc"] == QC_OK
    second = by_study[pseudonym["two-pa.dcm"]]
    assert second["image_uri"] == str(films / "two-pa.dcm") and second["qc"] == QC_WRONG_VIEW
    assert human[0]["study_pseudonym"] == pseudonym["two-pa.dcm"]
    assert human[0]["image_uri"] == str(films / "two-lateral.dcm")
    assert human[0]["flagged_images"] == 1 and human[0]["other_images"] == 1
    listed = list(csv.DictReader((runs / "worklist.csv").open()))
    assert [(r["section"], r["image_uri"]) for r in listed] == [
        (r["section"], r["image_uri"]) for r in triage.to_pylist()
    ]
    report = (runs / "report.html").read_text()
    assert "Needs a human read (1)" in report and str(films) not in report
    assert report.count(pseudonym["one-pa.dcm"]) >= 1


# ---- evaluate --by-study ----------------------------------------------------------------

# (image, score, its label, its study pseudonym or None, the manifest's study_id or "")
IMAGES = [
    ("s1-pa", 0.9, "opacity", "a" * 32, ""),
    ("s1-lat", 0.2, "normal", "a" * 32, ""),
    ("s2-pa", 0.6, "normal", "b" * 32, ""),
    ("s2-lat", 0.1, "normal", "b" * 32, ""),
    ("s3-pa", 0.4, "opacity", "c" * 32, ""),  # the finding seen better on the lateral
    ("s3-lat", 0.7, "normal", "c" * 32, ""),
    ("s4-pa", 0.3, "normal", "d" * 32, ""),
    ("alone", 0.8, "opacity", None, ""),
    ("m1-pa", 0.55, "opacity", None, "ACC-1"),  # a study known from the manifest only
    ("m1-lat", 0.35, "normal", None, "ACC-1"),
]


def write_labelled(root):
    rows = [
        {**row(f"/data/{name}.png", score, study), "content_sha256": "cd" * 32}
        for name, score, _, study, _ in IMAGES
    ]
    schema = OUTPUT_SCHEMA.with_metadata(
        {"meddx.positive_class": "opacity", "meddx.model_name": "seednet"}
    )
    part = root / "pred" / "dt=2026-01-01"
    part.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), part / "part-0.parquet")
    manifest = root / "labels.csv"
    lines = ["uri,label,study_id"] + [
        f"/data/{name}.png,{label},{study_id}" for name, _, label, _, study_id in IMAGES
    ]
    manifest.write_text("\n".join(lines) + "\n")
    return str(root / "pred"), str(manifest)


def test_evaluate_by_study(tmp_path):
    predictions, manifest = write_labelled(tmp_path)
    images = evaluate(EvaluateConfig(predictions, labels=manifest))
    truth = [label == "opacity" for _, _, label, _, _ in IMAGES]
    assert images.overall.n == 10 and images.studies is None
    assert images.overall.auroc == pytest.approx(roc_auc_score(truth, [s for _, s, *_ in IMAGES]))
    assert images.overall.auroc == pytest.approx(20 / 24)
    # Six studies: four by pseudonym, one image alone, one by the manifest's study_id.
    # Each is its highest score and positive if any image is: s3's finding, scored low
    # on its PA, is found by its lateral.
    out = tmp_path / "metrics.json"
    args = ["evaluate", predictions, "--labels", manifest, "--by-study", "--json", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "by study: 6 studies, each positive if any of its images is" in result.output
    studies = json.loads(out.read_text())
    assert (studies["studies"], studies["n"], studies["positives"]) == (6, 6, 4)
    study_truth, study_scores = [1, 0, 1, 0, 1, 1], [0.9, 0.6, 0.7, 0.3, 0.8, 0.55]
    assert studies["auroc"] == pytest.approx(roc_auc_score(study_truth, study_scores))
    assert studies["auroc"] == pytest.approx(7 / 8) and "auroc=0.8750" in result.output
    assert studies["confusion_matrix"] == {"tn": 1, "fp": 1, "fn": 0, "tp": 4}
    assert (studies["rows"], studies["unlabelled"]) == (10, 0)  # the rows are still images


def test_a_studys_findings_are_each_at_their_highest():
    rows = [
        {"image_uri": "/a.png", "study_pseudonym": STUDY, "score": 0.8, "probs": [0.8, 0.1]},
        {"image_uri": "/b.png", "study_pseudonym": STUDY, "score": 0.6, "probs": [0.2, 0.6]},
        {"image_uri": "/c.png", "study_pseudonym": None, "score": 0.3, "probs": [0.3, 0.1]},
    ]
    truth = np.array([[1, 0], [0, 1], [0, 0]])
    tops, flags = by_study(rows, truth, None)
    assert [t["image_uri"] for t in tops] == ["/a.png", "/c.png"]
    assert tops[0]["probs"] == pytest.approx([0.8, 0.6]) and tops[0]["score"] == 0.8
    assert flags.tolist() == [[1, 1], [0, 0]]
