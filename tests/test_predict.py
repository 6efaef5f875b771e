"""The predict stage alone, without Ray: error rows pass through, ok rows get scores."""

import numpy as np
import pytest
import torch

from meddx.imaging.decode import INFO_DEFAULTS
from meddx.inputs.storage import StorageSettings
from meddx.model.precision import cpu_has_native_bf16, resolve_precision
from meddx.model.predictor import Predictor
from meddx.names import OUTPUT_SCHEMA


def batch(n_ok=3, n_err=2, size=64):
    rng = np.random.default_rng(0)
    status = ["ok"] * n_ok + ["error"] * n_err
    return {
        "image_uri": np.array([f"s3://b/{i}.png" for i in range(n_ok + n_err)], dtype=object),
        "image": rng.integers(0, 255, (n_ok + n_err, size, size), dtype=np.uint8),
        "status": np.array(status, dtype=object),
        "error": np.array([""] * n_ok + ["empty object (0 bytes)"] * n_err, dtype=object),
        "qc": np.array(["ok"] * n_ok + [""] * n_err, dtype=object),
        "content_sha256": np.array(["ab" * 32] * (n_ok + n_err), dtype=object),
        **{
            name: np.array([default] * (n_ok + n_err), dtype=object if default == "" else np.int64)
            for name, default in INFO_DEFAULTS.items()
        },
    }


def test_rows_in_output_schema(random_checkpoint):
    path, sha = random_checkpoint
    table = Predictor(path, StorageSettings(), "fp32", "run-1")(batch())
    assert table.schema == OUTPUT_SCHEMA
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 3 + ["error"] * 2
    for r in rows[:3]:
        assert r["error"] is None and len(r["probs"]) == 2 and r["label"] in ("normal", "opacity")
        assert r["score"] == pytest.approx(r["probs"][1])
        assert r["qc"] == "ok" and r["ood_score"] is None  # no density in this checkpoint
    for r in rows[3:]:
        assert r["error"] == "empty object (0 bytes)"
        assert r["score"] is None and r["probs"] is None and r["label"] is None
        assert r["qc"] is None and r["ood_score"] is None
    assert {r["model_sha256"] for r in rows} == {sha} and {r["run_id"] for r in rows} == {"run-1"}


def test_all_error_batch_never_calls_the_model(random_checkpoint):
    predictor = Predictor(random_checkpoint[0], StorageSettings(), "fp32", "r")
    predictor.model = None  # any forward pass would fail
    assert predictor(batch(n_ok=0, n_err=3)).num_rows == 3


def test_same_scores_whatever_the_batching(random_checkpoint):
    predictor = Predictor(random_checkpoint[0], StorageSettings(), "fp32", "r")
    whole = predictor(batch(n_ok=6, n_err=0))["score"].to_pylist()
    b = batch(n_ok=6, n_err=0)
    halves = []
    for part in (slice(0, 3), slice(3, 6)):
        halves += predictor({k: v[part] for k, v in b.items()})["score"].to_pylist()
    np.testing.assert_allclose(whole, halves, rtol=1e-5)


def test_precision_choice():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    assert resolve_precision("fp16", cpu) is torch.float16
    expected = torch.bfloat16 if cpu_has_native_bf16() else None
    assert resolve_precision("auto", cpu) is expected


@pytest.mark.gpu
def test_gpu_bf16_matches_cpu_fp32(random_checkpoint):
    gpu = Predictor(random_checkpoint[0], StorageSettings(), "auto", "r")
    assert gpu.device.type == "cuda" and gpu.autocast_dtype is not None
    b = batch(n_ok=8, n_err=0)
    gpu_scores = np.array(gpu(b)["score"].to_pylist())
    cpu = Predictor(random_checkpoint[0], StorageSettings(), "fp32", "r")
    cpu.device = torch.device("cpu")
    cpu.model, cpu.mean, cpu.std = cpu.model.cpu(), cpu.mean.cpu(), cpu.std.cpu()
    np.testing.assert_allclose(gpu_scores, np.array(cpu(b)["score"].to_pylist()), atol=0.01)


FINDINGS = ["opacity", "effusion", "nodule"]


@pytest.fixture(scope="module")
def multi_label_checkpoint(tmp_path_factory):
    """A random seednet with one sigmoid output per finding; per-finding thresholds."""
    from meddx.model import registry

    ckpt = registry.untrained_checkpoint(
        "seednet", input_size=64, findings=FINDINGS, thresholds=[0.45, 0.5, 0.55]
    )
    path = tmp_path_factory.mktemp("ml") / "seednet-ml.pt"
    registry.save_checkpoint(ckpt, str(path), StorageSettings())
    return str(path)


def test_multi_label_rows(multi_label_checkpoint):
    predictor = Predictor(multi_label_checkpoint, StorageSettings(), "fp32", "r")
    table = predictor(batch(n_ok=6, n_err=1))
    assert table.schema == OUTPUT_SCHEMA
    rows = table.to_pylist()
    for r in rows[:6]:
        probs = r["probs"]
        assert len(probs) == 3 and all(0 < p < 1 for p in probs)
        assert sum(probs) != pytest.approx(1.0)  # sigmoids, not a softmax
        assert r["score"] == max(probs)
        assert r["threshold"] == pytest.approx(0.45)  # the lowest finding threshold
        found = [f for f, p, t in zip(FINDINGS, probs, [0.45, 0.5, 0.55], strict=True) if p >= t]
        assert r["label"] == (";".join(found) or "normal")
    assert rows[6]["probs"] is None and rows[6]["label"] is None


@pytest.mark.parametrize(
    "thresholds, label",
    [([0.0, 2.0, 2.0], "opacity"), ([2.0, 0.0, 0.0], "effusion;nodule"), ([2.0] * 3, "normal")],
)
def test_multi_label_label_follows_each_threshold(tmp_path, thresholds, label):
    from meddx.model import registry

    ckpt = registry.untrained_checkpoint(
        "seednet", input_size=64, findings=FINDINGS, thresholds=thresholds
    )
    registry.save_checkpoint(ckpt, str(tmp_path / "m.pt"), StorageSettings())
    rows = Predictor(str(tmp_path / "m.pt"), StorageSettings(), "fp32", "r")(batch(n_err=0))
    assert {r["label"] for r in rows.to_pylist()} == {label}
