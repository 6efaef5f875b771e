"""Clinical evaluation figures and calibration, on constructed data with known answers."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from scipy.special import expit as sigmoid
from scipy.special import logit

from meddx.analysis.calibration import fit_temperature
from meddx.cli import cli, main
from meddx.inputs.storage import StorageSettings
from meddx.model import metrics, registry
from meddx.model.predictor import Predictor
from meddx.names import OUTPUT_SCHEMA

from .test_predict import batch


def synthetic_validation(n=4000, true_temperature=3.0, seed=0):
    """Labels drawn from sigmoid(z); the model is overconfident: it reports sigmoid(3 z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, n)
    y = (rng.random(n) < sigmoid(z)).astype(int)
    return y, sigmoid(true_temperature * z)


def test_temperature_recovers_the_overconfidence():
    y, scores = synthetic_validation()
    assert fit_temperature(y, scores) == pytest.approx(3.0, rel=0.1)


def test_clinical_metrics_known_points():
    y = np.array([0] * 100 + [1] * 100)
    scores = np.r_[np.linspace(0, 0.6, 100), np.linspace(0.4, 1.0, 100)]
    m = metrics.clinical_metrics(y, scores, 0.5)
    assert m["auroc_ci95"][0] < m["auroc"] < m["auroc_ci95"][1]
    assert 0.0 <= m["ece"] <= 1.0
    # Brute force over every cut: the best sensitivity with specificity >= 0.90, and back.
    cuts = np.r_[np.unique(scores), np.inf]
    sens = np.array([(scores[y == 1] >= c).mean() for c in cuts])
    spec = np.array([(scores[y == 0] < c).mean() for c in cuts])
    assert m["sensitivity_at_specificity"]["0.90"] == pytest.approx(sens[spec >= 0.90].max())
    assert m["specificity_at_sensitivity"]["0.95"] == pytest.approx(spec[sens >= 0.95].max())
    assert m["ppv"] == pytest.approx(m["precision"]) and 0 < m["npv"] <= 1
    y2, overconfident = synthetic_validation()
    assert metrics.calibration_fit(y2, overconfident)["calibration_slope"] == pytest.approx(
        1 / 3, rel=0.15
    )


def test_the_calibration_error_bins_scores_on_an_edge_as_its_curve_does():
    # Scores exactly on bin edges (0.3, 0.5, 0.8) count in the bin below, as in the curve:
    # 0.45 and 0.5 share one bin (np.histogram split them, and the weights misaligned).
    y = np.array([0, 1, 0, 1, 1, 0, 1, 1, 1])
    scores = np.array([0.5, 0.5, 0.8, 0.8, 0.8, 0.15, 0.95, 0.3, 0.45])
    from sklearn.calibration import calibration_curve

    prob_true, prob_pred = calibration_curve(y, scores, n_bins=10, strategy="uniform")
    sizes = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], scores), minlength=10)
    expected = np.sum(sizes[sizes > 0] / len(y) * np.abs(prob_true - prob_pred))
    assert metrics.calibration_fit(y, scores)["ece"] == pytest.approx(expected)
    assert metrics.calibration_fit(y, scores)["ece"] == pytest.approx(
        # 0.15 (y 0), 0.3 (y 1), 0.45 and 0.5 x2 (two thirds), 0.8 x3 (two thirds), 0.95
        (0.15 + 0.7 + 3 * (2 / 3 - 1.45 / 3) + 3 * (0.8 - 2 / 3) + 0.05) / 9
    )


def test_threshold_for_targets():
    y = np.array([0] * 50 + [1] * 50)
    scores = np.r_[np.linspace(0, 0.7, 50), np.linspace(0.3, 1.0, 50)]
    cut = metrics.threshold_for(y, scores, sensitivity=0.9)
    assert (scores[y == 1] >= cut).mean() >= 0.9
    cut = metrics.threshold_for(y, scores, specificity=0.95)
    assert (scores[y == 0] < cut).mean() >= 0.95


def write_scored(root, scores, y, sha):
    rows = []
    for i, (s, t) in enumerate(zip(scores, y, strict=True)):
        rows.append(
            {
                "image_uri": f"/v/{'opacity' if t else 'normal'}/{i}.png",
                "status": "ok",
                "score": float(s),
                "probs": [1 - float(s), float(s)],
                "threshold": 0.5,
                "label": "x",
                "model_name": "seednet",
                "model_sha256": sha,
                "run_id": "r",
                "modality": "DX" if i % 2 else "CR",
            }
        )
    schema = OUTPUT_SCHEMA.with_metadata(
        {"meddx.positive_class": "opacity", "meddx.model_sha256": sha}
    )
    (root / "dt=2026-01-01").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "dt=2026-01-01" / "p.parquet")


def test_evaluate_json_plots_and_subgroups(tmp_path):
    y, scores = synthetic_validation(n=400)
    write_scored(tmp_path / "pred", scores, y, "ab" * 32)
    out = tmp_path / "m.json"
    result = CliRunner().invoke(
        cli,
        ["evaluate", str(tmp_path / "pred"), "--json", str(out)]
        + ["--plots", str(tmp_path / "plots"), "--by", "modality"],
    )
    assert result.exit_code == 0, result.output
    m = json.loads(out.read_text())
    for key in (
        "n",
        "auroc",
        "auroc_ci95",
        "sensitivity",
        "specificity",
        "ppv",
        "npv",
        "f1",
        "threshold",
        "ece",
        "per_class",
    ):
        assert key in m, key
    assert m["n"] == 400 and len(m["auroc_ci95"]) == 2
    assert set(m["by"]["modality"]) == {"CR", "DX"}
    assert sum(g["n"] for g in m["by"]["modality"].values()) == 400
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["precision_recall.png", "reliability.png", "roc.png", "score_histograms.png"]
    assert all((tmp_path / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_calibrate_writes_a_new_checkpoint_that_scoring_applies(tmp_path, random_checkpoint):
    ckpt_path, sha = random_checkpoint
    y, scores = synthetic_validation(n=600)
    write_scored(tmp_path / "val", scores, y, sha)
    out = tmp_path / "calibrated.pt"
    result = CliRunner().invoke(
        cli,
        ["calibrate", str(tmp_path / "val"), "--model", ckpt_path, "--out", str(out)]
        + ["--target-sensitivity", "0.9", "--temperature"],
    )
    assert result.exit_code == 0, result.output
    ckpt, new_sha = registry.read_checkpoint(str(out), StorageSettings())
    assert new_sha != sha
    assert ckpt.temperatures[0] == pytest.approx(3.0, rel=0.15)
    stored = scores.astype(np.float32).astype(float)  # scores are float32 in the Parquet
    scaled = sigmoid(logit(stored) / ckpt.temperatures[0])
    assert (scaled[y == 1] >= ckpt.threshold - 1e-9).mean() >= 0.9
    assert ckpt.extra["calibration"]["target"] == {"sensitivity": 0.9}
    # Scoring with it: logits divided by the temperature, rows carry the new threshold.
    plain = Predictor(ckpt_path, StorageSettings(), "fp32", "r")
    calibrated = Predictor(str(out), StorageSettings(), "fp32", "r")
    b = batch(n_ok=4, n_err=0)
    p0 = np.array(plain(b)["score"].to_pylist())
    p1 = calibrated(b)
    expected = sigmoid(logit(p0) / ckpt.temperatures[0])
    np.testing.assert_allclose(p1["score"].to_pylist(), expected, atol=1e-5)
    assert p1["threshold"].to_pylist() == pytest.approx([ckpt.threshold] * 4, abs=1e-6)


def user_error(capsys, args: list[str]) -> tuple[int, str]:
    """`meddx ARGS` as users run it (the entry point, in this process): the exit status
    and what it printed on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(args)
    return exited.value.code, capsys.readouterr().err


def test_calibrate_refuses_other_models_predictions(tmp_path, random_checkpoint, capsys):
    y, scores = synthetic_validation(n=50)
    write_scored(tmp_path / "val", scores, y, "cd" * 32)
    status, stderr = user_error(
        capsys,
        [
            "calibrate",
            str(tmp_path / "val"),
            "--model",
            random_checkpoint[0],
            "--out",
            str(tmp_path / "c.pt"),
            "--target-specificity",
            "0.95",
        ],
    )
    assert (status, stderr) == (
        1,
        f"meddx: error: {tmp_path / 'val'} was not scored by {random_checkpoint[0]}"
        " (sha256 differs)\n",
    )
    assert not (tmp_path / "c.pt").exists()


FINDINGS = ["opacity", "effusion", "nodule"]


def write_multi_label_scored(root, sha, n=400, seed=0):
    """Nodule probabilities overconfident as in synthetic_validation; the others noise."""
    rng = np.random.default_rng(seed)
    y_nodule, p_nodule = synthetic_validation(n=n, seed=seed)
    other = rng.uniform(0.05, 0.95, (n, 2))
    truth = np.c_[rng.integers(0, 2, (n, 2)), y_nodule]
    rows = [
        {
            "image_uri": f"/v/{i}.png",
            "status": "ok",
            "probs": [float(other[i, 0]), float(other[i, 1]), float(p_nodule[i])],
            "score": float(max(other[i].max(), p_nodule[i])),
            "threshold": 0.5,
            "label": "x",
            "model_name": "seednet",
            "model_sha256": sha,
            "run_id": "r",
        }
        for i in range(n)
    ]
    schema = OUTPUT_SCHEMA.with_metadata(
        {
            "meddx.positive_class": "abnormal",
            "meddx.model_sha256": sha,
            "meddx.multi_label": "true",
            "meddx.class_names": json.dumps(FINDINGS),
            "meddx.thresholds": json.dumps([0.5] * 3),
        }
    )
    (root / "val" / "dt=2026-01-01").mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist(rows, schema=schema), root / "val" / "dt=2026-01-01" / "p.parquet"
    )
    lines = ["uri,label,opacity,effusion,nodule"] + [
        f"/v/{i}.png,x," + ",".join(map(str, t)) for i, t in enumerate(truth)
    ]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return y_nodule, p_nodule


def test_calibrate_one_finding_of_a_multi_label_checkpoint(tmp_path, capsys):
    ckpt = registry.untrained_checkpoint("seednet", input_size=64, findings=FINDINGS)
    sha = registry.save_checkpoint(ckpt, str(tmp_path / "ml.pt"), StorageSettings())
    y, scores = write_multi_label_scored(tmp_path, sha)
    args = ["calibrate", str(tmp_path / "val"), "--model", str(tmp_path / "ml.pt")]
    args += ["--labels", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "cal.pt")]
    args += ["--target-sensitivity", "0.9", "--temperature"]
    assert user_error(capsys, args) == (
        1,
        "meddx: error: a multi-label checkpoint is calibrated one finding at a time: "
        "--finding one of opacity, effusion, nodule\n",
    )
    assert not (tmp_path / "cal.pt").exists()
    result = CliRunner().invoke(cli, [*args, "--finding", "nodule"])
    assert result.exit_code == 0, result.output
    cal, _ = registry.read_checkpoint(str(tmp_path / "cal.pt"), StorageSettings())
    # Only the nodule's threshold and temperature move; the worklist cut is the lowest.
    assert cal.thresholds[:2] == (0.5, 0.5) and cal.thresholds[2] != 0.5
    assert cal.threshold == min(cal.thresholds)
    assert cal.temperatures[:2] == (1.0, 1.0)
    assert cal.temperatures[2] == pytest.approx(3.0, rel=0.15)
    assert list(cal.extra["calibration"]) == ["nodule"]
    stored = scores.astype(np.float32).astype(float)
    scaled = sigmoid(logit(stored) / cal.temperatures[2])
    assert (scaled[y == 1] >= cal.thresholds[2] - 1e-9).mean() >= 0.9
    # Scoring applies the nodule's temperature to the nodule's logit alone.
    b = batch(n_ok=4, n_err=0)
    p0 = np.array(Predictor(str(tmp_path / "ml.pt"), StorageSettings(), "fp32", "r")(b)["probs"])
    p1 = np.array(Predictor(str(tmp_path / "cal.pt"), StorageSettings(), "fp32", "r")(b)["probs"])
    p0, p1 = np.stack(p0), np.stack(p1)
    np.testing.assert_allclose(p1[:, :2], p0[:, :2], atol=1e-6)
    np.testing.assert_allclose(p1[:, 2], sigmoid(logit(p0[:, 2]) / cal.temperatures[2]), atol=1e-5)


def test_finding_option_needs_a_multi_label_checkpoint(tmp_path, random_checkpoint, capsys):
    y, scores = synthetic_validation(n=50)
    write_scored(tmp_path / "val", scores, y, random_checkpoint[1])
    status, stderr = user_error(
        capsys,
        ["calibrate", str(tmp_path / "val"), "--model", random_checkpoint[0]]
        + ["--out", str(tmp_path / "c.pt"), "--target-sensitivity", "0.9"]
        + ["--finding", "nodule"],
    )
    assert (status, stderr) == (
        1,
        f"meddx: error: --finding is for multi-label checkpoints; {random_checkpoint[0]}"
        " is not one\n",
    )
    assert not (tmp_path / "c.pt").exists()


def test_calibrate_reads_its_own_models_rows(tmp_path):
    # Results of two models, the other one first (so the top-level metadata is its):
    # the checkpoint's rows alone set the temperature, the threshold and the OOD cut.
    from .test_evaluate import model_meta, write_models

    # calibrate re-sets the density's threshold and leaves the rest of its entry as it is.
    ckpt = registry.untrained_checkpoint("seednet", input_size=64)
    ckpt = ckpt.replace(extra={**ckpt.extra, "ood": {"threshold": 50.0}})
    ckpt_path = str(tmp_path / "m.pt")
    sha = registry.save_checkpoint(ckpt, ckpt_path, StorageSettings())
    y, scores = synthetic_validation(n=600)
    own = [
        {
            "image_uri": f"/v/{'opacity' if t else 'normal'}/{i}.png",
            "status": "ok",
            "score": float(s),
            "probs": [1 - float(s), float(s)],
            "threshold": 0.5,
            "model_name": "seednet",
            "model_sha256": sha,
            "ood_score": float(i % 100) / 100,  # in [0, 0.99]
            "run_id": "r",
        }
        for i, (s, t) in enumerate(zip(scores, y, strict=True))
    ]
    # The other model ranks the films backwards and calls them all out of distribution.
    other = [
        {**r, "score": 1 - r["score"], "model_name": "resnet18", "model_sha256": "cd" * 32}
        | {"ood_score": 100.0}
        for r in own
    ]
    write_models(
        tmp_path / "val" / "p.parquet",
        [(other, model_meta("resnet18", "cd" * 32, 0.5)), (own, model_meta("seednet", sha, 0.5))],
    )
    out = tmp_path / "calibrated.pt"
    result = CliRunner().invoke(
        cli,
        ["calibrate", str(tmp_path / "val"), "--model", ckpt_path, "--out", str(out)]
        + ["--target-sensitivity", "0.9", "--temperature", "--ood-percentile", "99"],
    )
    assert result.exit_code == 0, result.output
    assert "of 600 rows" in result.output
    ckpt, _ = registry.read_checkpoint(str(out), StorageSettings())
    own_ood = np.array([r["ood_score"] for r in own], np.float32).astype(float)
    assert ckpt.extra["ood"]["threshold"] == pytest.approx(np.percentile(own_ood, 99))
    assert ckpt.extra["ood"]["threshold"] < 1  # the other model's 100s left out
    assert ckpt.extra["ood"]["threshold_images"] == 600
    record = ckpt.extra["calibration"]
    assert record["n"] == 600 and record["calibrated_from_sha256"] == sha
    assert record["metrics"]["auroc"] > 0.8  # its own ranking, not the backward one
    assert ckpt.temperatures[0] == pytest.approx(3.0, rel=0.15)
    stored = scores.astype(np.float32).astype(float)
    scaled = sigmoid(logit(stored) / ckpt.temperatures[0])
    assert (scaled[y == 1] >= ckpt.threshold - 1e-9).mean() >= 0.9
