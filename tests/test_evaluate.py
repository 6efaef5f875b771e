import datetime as dt
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from meddx import MeddxError
from meddx.cli import cli
from meddx.evaluation import evaluate
from meddx.scoring import OUTPUT_SCHEMA
from meddx.storage import StorageSettings

POSITIVE_SCORES = [0.9, 0.8, 0.7, 0.4]
NEGATIVE_SCORES = [0.1, 0.2, 0.3, 0.6]


def write_predictions(root, with_folders=True):
    rows = []
    scores = [("opacity", s) for s in POSITIVE_SCORES] + [("normal", s) for s in NEGATIVE_SCORES]
    for i, (label, score) in enumerate(scores):
        folder = f"{label}/" if with_folders else ""
        rows.append(
            {
                "image_uri": f"/data/{folder}{i}.png",
                "status": "ok",
                "error": None,
                "label": "opacity" if score >= 0.5 else "normal",
                "score": score,
                "probs": [1 - score, score],
                "threshold": 0.5,
                "model_name": "seednet",
                "model_sha256": "ab" * 32,
                "content_sha256": "cd" * 32,
                "run_id": "r1",
                "scored_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
            }
        )
    rows.append(
        {
            **rows[0],
            "image_uri": "/data/opacity/broken.png",
            "status": "error",
            "error": "empty object (0 bytes)",
            "label": None,
            "score": None,
            "probs": None,
        }
    )
    schema = OUTPUT_SCHEMA.with_metadata(
        {"meddx.positive_class": "opacity", "meddx.model_name": "seednet"}
    )
    part = root / "dt=2026-01-01"
    part.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), part / "part-0.parquet")
    return rows


def check(result):
    assert result["n"] == 8 and result["errors"] == 1 and result["rows"] == 9
    assert result["confusion_matrix"] == {"tn": 3, "fp": 1, "fn": 1, "tp": 3}
    assert result["sensitivity"] == pytest.approx(0.75)
    assert result["specificity"] == pytest.approx(0.75)
    assert result["auroc"] == pytest.approx(15 / 16)  # one positive ranks below one negative
    assert result["accuracy"] == pytest.approx(0.75) and result["f1"] == pytest.approx(0.75)


def test_labels_from_class_folders(tmp_path):
    write_predictions(tmp_path)
    check(evaluate(str(tmp_path), None, StorageSettings()))


def test_labels_from_manifest_and_json(tmp_path):
    rows = write_predictions(tmp_path / "pred", with_folders=False)
    manifest = tmp_path / "labels.csv"
    lines = ["uri,label"] + [
        f"{r['image_uri']},{'opacity' if i < 4 else 'normal'}" for i, r in enumerate(rows[:8])
    ]
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "metrics.json"
    from click.testing import CliRunner

    result = CliRunner().invoke(
        cli, ["evaluate", str(tmp_path / "pred"), "--labels", str(manifest), "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "auroc=0.9375" in result.output
    check(json.loads(out.read_text()))


def test_missing_predictions_is_clear(tmp_path):
    with pytest.raises(MeddxError, match="predictions"):
        evaluate(str(tmp_path / "none"), None, StorageSettings())


def test_youden_threshold_separates_the_classes():
    import numpy as np

    from meddx.metrics import youden_threshold

    truth = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4])  # all below 0.5
    cut = youden_threshold(truth, scores)
    assert 0.2 < cut <= 0.25
    assert youden_threshold(np.zeros(4), np.ones(4)) == 0.5
