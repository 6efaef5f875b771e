import datetime as dt
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from meddx import MeddxError
from meddx.analysis.evaluation import evaluate
from meddx.cli import cli
from meddx.config import EvaluateConfig
from meddx.names import OUTPUT_SCHEMA

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
    check(evaluate(EvaluateConfig(str(tmp_path))).as_dict())


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
        evaluate(EvaluateConfig(str(tmp_path / "none")))


def test_youden_threshold_separates_the_classes():
    import numpy as np

    from meddx.model.metrics import youden_threshold

    truth = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4])  # all below 0.5
    cut = youden_threshold(truth, scores)
    assert 0.2 < cut <= 0.25
    assert youden_threshold(np.zeros(4), np.ones(4)) == 0.5


FINDINGS = ["opacity", "effusion", "nodule"]
THRESHOLDS = [0.5, 0.4, 0.6]


def write_multi_label(root, n=60, seed=0):
    """Multi-label predictions (probs informative per finding) and their manifest."""
    import numpy as np

    rng = np.random.default_rng(seed)
    truth = (rng.random((n, 3)) < [0.4, 0.3, 0.25]).astype(int)
    probs = np.clip(0.3 * truth + rng.uniform(0, 0.7, (n, 3)), 0, 1).astype("float32")
    rows = []
    for i in range(n):
        found = [f for f, p, t in zip(FINDINGS, probs[i], THRESHOLDS, strict=True) if p >= t]
        rows.append(
            {
                "image_uri": f"/data/{i}.png",
                "status": "ok",
                "label": ";".join(found) or "normal",
                "score": float(probs[i].max()),
                "probs": probs[i].tolist(),
                "threshold": min(THRESHOLDS),
                "model_name": "seednet",
                "model_sha256": "ab" * 32,
                "run_id": "r1",
            }
        )
    rows.append({**rows[0], "image_uri": "/data/unlisted.png"})
    schema = OUTPUT_SCHEMA.with_metadata(
        {
            "meddx.positive_class": "abnormal",
            "meddx.class_names": json.dumps(FINDINGS),
            "meddx.multi_label": "true",
            "meddx.thresholds": json.dumps(THRESHOLDS),
        }
    )
    part = root / "pred" / "dt=2026-01-01"
    part.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), part / "part-0.parquet")
    manifest = root / "labels.csv"
    lines = ["uri,label," + ",".join(FINDINGS)] + [
        f"/data/{i}.png,{'abnormal' if t.any() else 'normal'}," + ",".join(map(str, t))
        for i, t in enumerate(truth)
    ]
    manifest.write_text("\n".join(lines) + "\n")
    return truth, probs


def test_multi_label_per_class_and_any_finding(tmp_path):
    import numpy as np
    from sklearn.metrics import roc_auc_score

    truth, probs = write_multi_label(tmp_path)
    out = tmp_path / "m.json"
    from click.testing import CliRunner

    result = CliRunner().invoke(
        cli,
        ["evaluate", str(tmp_path / "pred"), "--labels", str(tmp_path / "labels.csv")]
        + ["--json", str(out), "--plots", str(tmp_path / "plots")],
    )
    assert result.exit_code == 0, result.output
    assert "nodule: n=60" in result.output
    m = json.loads(out.read_text())
    for key in (
        *("n", "auroc", "auroc_ci95", "sensitivity", "specificity", "ppv", "npv", "f1"),
        *("threshold", "ece", "per_class", "macro"),
    ):
        assert key in m, key
    assert m["multi_label"] is True and m["unlabelled"] == 1
    assert list(m["per_class"]) == FINDINGS
    for k, name in enumerate(FINDINGS):
        y, p, cut = truth[:, k], probs[:, k].astype(float), THRESHOLDS[k]
        got = m["per_class"][name]
        assert got["threshold"] == pytest.approx(cut)
        assert got["positives"] == int(y.sum()) and got["n"] == 60
        assert got["auroc"] == pytest.approx(roc_auc_score(y, p))
        assert got["auroc_ci95"][0] < got["auroc"] < got["auroc_ci95"][1]
        assert got["sensitivity"] == pytest.approx((p[y == 1] >= cut).mean())
        assert got["specificity"] == pytest.approx((p[y == 0] < cut).mean())
        assert got["ppv"] == pytest.approx(y[p >= cut].mean())
        assert 0 <= got["ece"] <= 1
    aurocs = [m["per_class"][f]["auroc"] for f in FINDINGS]
    assert m["macro"]["auroc"] == pytest.approx(np.mean(aurocs))
    # Top level: any finding against none, by the highest probability, at the lowest cut.
    anything, top = truth.max(axis=1), probs.max(axis=1).astype(float)
    assert m["n"] == 60 and m["positives"] == int(anything.sum())
    assert m["threshold"] == pytest.approx(min(THRESHOLDS))
    assert m["auroc"] == pytest.approx(roc_auc_score(anything, top))
    assert m["sensitivity"] == pytest.approx((top[anything == 1] >= min(THRESHOLDS)).mean())
    assert (tmp_path / "plots" / "nodule" / "roc.png").read_bytes()[:4] == b"\x89PNG"


def test_multi_label_needs_finding_columns(tmp_path):
    write_multi_label(tmp_path)
    with pytest.raises(MeddxError, match="--labels MANIFEST with a 0/1 column per finding"):
        evaluate(EvaluateConfig(str(tmp_path / "pred")))
    single = tmp_path / "single.csv"
    single.write_text("uri,label\n/data/0.png,normal\n")
    with pytest.raises(MeddxError, match="no column for finding"):
        evaluate(EvaluateConfig(str(tmp_path / "pred"), str(single)))
