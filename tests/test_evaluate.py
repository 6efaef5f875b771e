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


# Two checkpoints whose sha256s share their first 8 hex digits: a prefix of 9 tells
# them apart, one of 8 does not.
SHA_A = "abcdef01" + "1" * 56
SHA_B = "abcdef01" + "2" * 56


def model_meta(name, sha, threshold, **more):
    """The per-model file metadata of one model, as scoring writes it."""
    return {
        "meddx.model_name": name,
        "meddx.model_sha256": sha,
        "meddx.class_names": json.dumps(["normal", "opacity"]),
        "meddx.positive_class": "opacity",
        "meddx.threshold": repr(threshold),
        "meddx.multi_label": "false",
        "meddx.thresholds": json.dumps([threshold]),
        **more,
    }


def write_models(path, models):
    """One Parquet file holding the rows of several models (``[(rows, meta), ...]``, in
    --model order): the top-level keys describe the first, meddx.models each."""
    rows = [r for model_rows, _ in models for r in model_rows]
    meta = {
        **models[0][1],
        "meddx.run_id": "r1",
        "meddx.models": json.dumps([m for _, m in models]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA.with_metadata(meta)), path)


def single_label_rows(name, sha, threshold, positives, negatives):
    """Rows of /data/opacity/0.png ... then /data/normal/N.png with these scores."""
    scores = [("opacity", s) for s in positives] + [("normal", s) for s in negatives]
    return [
        {
            "image_uri": f"/data/{label}/{i}.png",
            "status": "ok",
            "label": "opacity" if score >= threshold else "normal",
            "score": score,
            "probs": [1 - score, score],
            "threshold": threshold,
            "model_name": name,
            "model_sha256": sha,
            "run_id": "r1",
        }
        for i, (label, score) in enumerate(scores)
    ]


def write_two_models(root):
    """seednet (SHA_A, the worse ranking, at 0.5) and resnet18 (SHA_B, the classes apart,
    at 0.35) scored the same eight films."""
    a = single_label_rows("seednet", SHA_A, 0.5, POSITIVE_SCORES, NEGATIVE_SCORES)
    b = single_label_rows("resnet18", SHA_B, 0.35, [0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.3, 0.4])
    a.append({**a[0], "image_uri": "/data/opacity/broken.png", "status": "error", "score": None})
    path = root / "dt=2026-01-01" / "part-0.parquet"
    write_models(
        path, [(a, model_meta("seednet", SHA_A, 0.5)), (b, model_meta("resnet18", SHA_B, 0.35))]
    )


def test_several_models_need_a_choice(tmp_path, capsys):
    from .test_calibration import user_error

    write_two_models(tmp_path)
    expected = (
        f"{tmp_path} holds 2 models (seednet abcdef011111, resnet18 abcdef012222): "
        "--model-sha256 picks one"
    )
    with pytest.raises(MeddxError) as refused:
        evaluate(EvaluateConfig(str(tmp_path)))
    assert str(refused.value) == expected
    # As users see it: one line on stderr, exit status 1, no traceback.
    assert user_error(capsys, ["evaluate", str(tmp_path)]) == (1, f"meddx: error: {expected}\n")
    from click.testing import CliRunner

    result = CliRunner().invoke(cli, ["evaluate", str(tmp_path)])
    assert result.exit_code != 0 and str(result.exception) == expected


def test_a_prefix_picks_each_models_rows_and_metadata(tmp_path):
    write_two_models(tmp_path)
    a = evaluate(EvaluateConfig(str(tmp_path), model_sha256="ABCDEF011")).as_dict()
    check(a)  # seednet's rows alone: its error row, not resnet18's eight
    assert (a["model_name"], a["model_sha256"], a["threshold"]) == ("seednet", SHA_A, 0.5)
    from click.testing import CliRunner

    out = tmp_path / "b.json"
    result = CliRunner().invoke(
        cli, ["evaluate", str(tmp_path), "--model-sha256", SHA_B[:12], "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "auroc=1.0000" in result.output
    b = json.loads(out.read_text())
    assert (b["model_name"], b["model_sha256"]) == ("resnet18", SHA_B)
    assert b["threshold"] == pytest.approx(0.35)
    assert (b["n"], b["rows"], b["errors"], b["auroc"]) == (8, 8, 0, 1.0)
    assert b["confusion_matrix"] == {"tn": 3, "fp": 1, "fn": 0, "tp": 4}  # 0.4 >= 0.35


@pytest.mark.parametrize(
    "prefix, message",
    [
        ("abcdef0", "--model-sha256 takes at least 8 hex digits of a sha256"),
        ("abcdef0g", "--model-sha256 takes at least 8 hex digits of a sha256"),
        ("abcdef01", "--model-sha256 abcdef01 matches 2 models of {root} ("),
        ("abcdef013", "--model-sha256 abcdef013 matches no model of {root} ("),
    ],
)
def test_a_prefix_must_name_one_model(tmp_path, prefix, message):
    write_two_models(tmp_path)
    with pytest.raises(MeddxError) as refused:
        evaluate(EvaluateConfig(str(tmp_path), model_sha256=prefix))
    assert str(refused.value).startswith(message.format(root=tmp_path))
    assert "\n" not in str(refused.value)


def test_one_models_results_need_no_choice(tmp_path):
    # Files scored one model at a time: no meddx.models, the top-level keys are its own.
    write_predictions(tmp_path)
    result = evaluate(EvaluateConfig(str(tmp_path), model_sha256="abab" * 4)).as_dict()
    check(result)
    assert result["model_sha256"] == "ab" * 32
    with pytest.raises(MeddxError, match="matches no model"):
        evaluate(EvaluateConfig(str(tmp_path), model_sha256="cd" * 32))


def test_model_metadata_of_each_model():
    from meddx.analysis.evaluation import model_metadata

    a, b = model_meta("seednet", SHA_A, 0.5), model_meta("resnet18", SHA_B, 0.35)
    meta = {**a, "meddx.run_id": "r1", "meddx.models": json.dumps([a, b])}
    assert model_metadata(meta, SHA_B) == {**b, "meddx.run_id": "r1"}
    assert model_metadata(meta, SHA_A) == {**a, "meddx.run_id": "r1"}
    assert model_metadata(a, SHA_A) == a  # written before meddx.models
    assert model_metadata({"meddx.positive_class": "opacity"}, SHA_B)["meddx.positive_class"]
    with pytest.raises(MeddxError, match="does not describe model abcdef012222"):
        model_metadata(a, SHA_B)
    with pytest.raises(MeddxError, match="does not describe model"):
        model_metadata({**a, "meddx.models": json.dumps([a])}, SHA_B)


def test_a_multi_label_model_beside_a_single_label_one(tmp_path):
    # The second model's own metadata (findings, thresholds, multi_label) is what counts,
    # not the top-level keys, which describe the first.
    from sklearn.metrics import roc_auc_score

    truth, probs = write_multi_label(tmp_path)
    scored = pq.read_table(tmp_path / "pred" / "dt=2026-01-01" / "part-0.parquet")
    multi = [{**r, "model_name": "densenet121", "model_sha256": SHA_B} for r in scored.to_pylist()]
    single = [
        {**r, "score": 0.5, "probs": [0.5, 0.5], "threshold": 0.5, "model_sha256": SHA_A}
        for r in multi
    ]
    multi_meta = model_meta(
        "densenet121",
        SHA_B,
        min(THRESHOLDS),
        **{
            "meddx.positive_class": "abnormal",
            "meddx.class_names": json.dumps(FINDINGS),
            "meddx.multi_label": "true",
            "meddx.thresholds": json.dumps(THRESHOLDS),
        },
    )
    both = tmp_path / "both" / "p.parquet"
    single_meta = model_meta(
        "seednet",
        SHA_A,
        0.5,
        **{"meddx.positive_class": "abnormal", "meddx.class_names": '["normal", "abnormal"]'},
    )
    write_models(both, [(single, single_meta), (multi, multi_meta)])
    labels = str(tmp_path / "labels.csv")
    m = evaluate(EvaluateConfig(str(both), labels, model_sha256=SHA_B[:9])).as_dict()
    assert m["multi_label"] is True and m["model_name"] == "densenet121"
    assert list(m["per_class"]) == FINDINGS and m["n"] == 60
    for k, name in enumerate(FINDINGS):
        assert m["per_class"][name]["threshold"] == pytest.approx(THRESHOLDS[k])
        assert m["per_class"][name]["auroc"] == pytest.approx(
            roc_auc_score(truth[:, k], probs[:, k].astype(float))
        )
    s = evaluate(EvaluateConfig(str(both), labels, model_sha256=SHA_A[:9])).as_dict()
    assert s["multi_label"] is False and s["model_name"] == "seednet"
    assert (s["rows"], s["n"], s["positives"]) == (61, 60, int(truth.max(axis=1).sum()))
    assert s["auroc"] == 0.5  # every score 0.5
