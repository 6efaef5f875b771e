"""DDP training on a real local Ray, fed from a real S3 endpoint."""

import io
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from meddx import MeddxError
from meddx.config import SynthConfig
from meddx.inputs.storage import StorageSettings, filesystem
from meddx.model import registry
from meddx.pipelines.training import TrainConfig, split, train
from meddx.store import audit
from meddx.synthetic.chest import write_archive

from .helpers import MEDDX

# One epoch of seednet on 64 px films, 8 a batch: seconds on a CPU.
ONE_EPOCH = {"model": "seednet", "epochs": 1, "batch_size": 8, "image_size": 64}


@pytest.mark.slow
def test_train_one_epoch_two_workers_from_s3(ray_session, bucket, settings, tmp_path):
    write_archive(SynthConfig(out=f"{bucket}/data", n=40, size=64, seed=5, storage=settings))
    out = f"{bucket}/models/seednet.pt"
    summary = train(
        TrainConfig(
            data=f"{bucket}/data",
            out=out,
            workers=2,
            storage_path=str(tmp_path / "runs"),
            optimize=True,
            **ONE_EPOCH,
            storage=settings,
        )
    )
    assert (summary.n_train, summary.n_val) == (32, 8)
    # Too few validation images to check an int8 model on: a trained model all the same,
    # written without one, and said so.
    assert summary.optimized == (
        "not optimized: the validation split has 8 labelled images; optimizing needs 20 or more"
    )
    ckpt, sha = registry.read_checkpoint(out, settings)
    assert sha == summary.sha256
    # The run's audit records, beside the checkpoint (meddx.store.audit).
    (run,) = audit.runs(f"{bucket}/models", settings)
    assert (run["command"], run["outcome"], run["model_sha256"]) == ("train", "committed", [sha])
    assert run["inputs"] == 40
    assert ckpt.model_name == "seednet" and ckpt.input_size == 64
    assert ckpt.class_names == ("normal", "opacity") and ckpt.positive_class == "opacity"
    assert ckpt.train_config["workers"] == 2 and ckpt.train_config["epochs"] == 1
    for key in ("val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1", "val_auroc"):
        assert key in ckpt.metrics, key
    assert 0.0 <= ckpt.metrics["val_auroc"] <= 1.0
    assert 0.0 <= ckpt.threshold <= 1.0 and ckpt.threshold == ckpt.metrics["val_threshold"]
    # The out-of-distribution density: fitted to the 32 training films' features, its
    # threshold the 99th percentile of the 8 validation films' scores.
    density = ckpt.extra["ood"]
    assert (density["fit_images"], density["threshold_images"]) == (32, 8)
    assert density["threshold_source"] == "validation" and density["percentile"] == 99.0
    assert tuple(density["means"].shape) == (2, 256) and 0 < density["threshold"] < 1e6
    assert ckpt.views == ("PA", "AP")  # the frontal views, recorded for scoring
    # The file holds seednet's weights for two classes, as one epoch of training left them,
    # and the model scoring builds from it holds exactly those.
    saved = torch.load(
        io.BytesIO(filesystem(bucket, settings).cat_file(out.removeprefix("s3://"))),
        weights_only=True,
    )["state_dict"]
    state = registry.model_from_checkpoint(ckpt).state_dict()
    torch.manual_seed(TrainConfig(data="", out="").seed)  # how rank 0 (DDP's source) began
    initial = registry.build_model("seednet", 2).state_dict()
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in initial.items()}
    assert saved["classifier.4.weight"].shape == (2, 256)  # one output per class
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    assert all(v.isfinite().all() for v in saved.values() if v.is_floating_point())
    for layer in ("features.0.0.weight", "classifier.4.weight"):  # first and last, trained
        assert not torch.allclose(saved[layer], initial[layer]), layer
    # bf16 checked against fp32 on the validation images; pinned to fp32 if it moved.
    check = ckpt.extra["precision_check"]
    assert check["images"] == 8 and check["precision"] == "bf16"
    assert ckpt.precision == (None if check["holds"] else "fp32")
    assert summary.last["train_images_per_s"] > 0
    assert "optimized" not in ckpt.extra


def test_split_is_stratified_and_seeded():
    items = [(f"n{i}", "normal") for i in range(80)] + [(f"o{i}", "opacity") for i in range(20)]
    train_a, val_a = split(items, 0.2, seed=1)
    train_b, val_b = split(items, 0.2, seed=1)
    assert val_a == val_b and train_a == train_b
    assert len(val_a) == 20 and sum(lbl == "opacity" for _, lbl in val_a) == 4
    assert not {u for u, _ in train_a} & {u for u, _ in val_a}


BAD_CONFIGS = textwrap.dedent(
    """
    import json, sys
    import ray
    from meddx import MeddxError
    from meddx.pipelines.training import TrainConfig, train

    data = sys.argv[1]
    errors = []
    for model in ("vgg", "seednet"):  # an unknown model; a folder of one class
        try:
            train(TrainConfig(data=data, out=data + "/m.pt", model=model))
        except MeddxError as exc:
            errors.append(str(exc))
    print(json.dumps({"errors": errors, "ray_initialized": ray.is_initialized()}))
    """
)


def test_bad_training_config_fails_before_ray(tmp_path):
    """In a process of its own: the session's Ray (ray_session) may be up in this one."""
    (tmp_path / "normal").mkdir()
    (tmp_path / "normal" / "a.png").write_bytes(b"x")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-c", BAD_CONFIGS, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(out["errors"]) == 2, out
    assert out["errors"][0].startswith("unknown model 'vgg'; choose from seednet")
    assert out["errors"][1] == "training needs at least two classes, found ['normal']"
    assert out["ray_initialized"] is False


FINDINGS = ("opacity", "effusion", "nodule")


@pytest.mark.slow
def test_multi_label_train_score_evaluate(ray_session, tmp_path):
    """Three findings end to end: train, score with the Ray pipeline, evaluate."""
    import json

    import pyarrow.dataset as pads

    from meddx.analysis import evaluation
    from meddx.config import EvaluateConfig
    from meddx.inputs.storage import StorageSettings
    from meddx.pipelines.scoring import ScoreConfig, score

    data = tmp_path / "data"
    write_archive(
        SynthConfig(
            out=str(data), n=40, size=64, seed=9, findings=tuple((f, 0.4) for f in FINDINGS)
        )
    )
    out = str(tmp_path / "ml.pt")
    summary = train(
        TrainConfig(
            data=str(data),
            out=out,
            workers=1,
            findings=FINDINGS,
            storage_path=str(tmp_path / "runs"),
            **ONE_EPOCH,
        )
    )
    ckpt, _ = registry.read_checkpoint(out, StorageSettings())
    assert ckpt.multi_label and ckpt.class_names == FINDINGS
    assert len(ckpt.thresholds) == 3 and ckpt.threshold == min(ckpt.thresholds)
    assert ckpt.positive_class == "abnormal"
    for name in FINDINGS:
        assert f"val_auroc_{name}" in summary.metrics
        assert ckpt.metrics[f"val_threshold_{name}"] == ckpt.thresholds[FINDINGS.index(name)]

    summary = score(
        ScoreConfig(input=str(data), model=out, out=str(tmp_path / "res"), run_date="2026-01-01")
    )
    assert summary.ok == 40
    rows = pads.dataset(str(tmp_path / "res"), partitioning="hive").to_table().to_pylist()
    assert len(rows) == 40
    for r in rows:
        assert len(r["probs"]) == 3 and r["score"] == max(r["probs"])
        found = [f for f, p, t in zip(FINDINGS, r["probs"], ckpt.thresholds, strict=True) if p >= t]
        assert r["label"] == (";".join(found) or "normal")
        assert r["threshold"] == pytest.approx(ckpt.threshold)
    meta = pads.dataset(str(tmp_path / "res" / "dt=2026-01-01")).schema.metadata
    assert json.loads(meta[b"meddx.thresholds"]) == list(ckpt.thresholds)

    result = evaluation.evaluate(
        EvaluateConfig(str(tmp_path / "res"), str(data / "_manifest.csv"))
    ).as_dict()
    assert list(result["per_class"]) == list(FINDINGS)
    for name in FINDINGS:
        assert result["per_class"][name]["n"] == 40
        assert result["per_class"][name]["positives"] == 16
        assert 0.0 <= result["per_class"][name]["auroc"] <= 1.0


def test_multi_label_split_keeps_every_finding_in_validation():
    from meddx.synthetic.chest import FINDINGS as PREVALENCE
    from meddx.synthetic.chest import finding_labels

    truth = finding_labels(48, tuple(PREVALENCE.items()), seed=3)
    items = [(f"u{i}", tuple(int(v) for v in row)) for i, row in enumerate(truth)]
    train_a, val_a = split(items, 0.2, seed=0)
    assert (train_a, val_a) == split(items, 0.2, seed=0)
    assert len(val_a) == 10 and not {u for u, _ in train_a} & {u for u, _ in val_a}
    val_truth = [t for _, t in val_a]
    assert all(sum(t[k] for t in val_truth) >= 1 for k in range(3))


def test_multi_label_config_errors(tmp_path):
    from meddx.names import parse_finding_names

    assert parse_finding_names("opacity, nodule") == ("opacity", "nodule")
    for bad in ("label", "a;b", "nodule,nodule", "", "normal"):
        with pytest.raises(MeddxError, match="--findings"):
            parse_finding_names(bad)
    write_archive(SynthConfig(out=str(tmp_path / "single"), n=4, size=64))
    out = str(tmp_path / "model" / "m.pt")  # its audit records go beside it
    with pytest.raises(MeddxError, match="no column for finding"):
        train(TrainConfig(data=str(tmp_path / "single"), out=out, findings=("nodule",)))
    (tmp_path / "loose" / "a").mkdir(parents=True)
    with pytest.raises(MeddxError, match="needs a manifest"):
        train(TrainConfig(data=str(tmp_path / "loose"), out=out, findings=("nodule",)))
    write_archive(
        SynthConfig(out=str(tmp_path / "rare"), n=4, size=64, findings=(("nodule", 0.0),))
    )
    with pytest.raises(MeddxError, match="'nodule' needs positive and negative"):
        train(TrainConfig(data=str(tmp_path / "rare"), out=out, findings=("nodule",)))
    # Each refused training is in the audit log beside the checkpoint it would have been.
    assert len(list((tmp_path / "model" / "_audit").rglob("*-end.parquet"))) == 3


def train_command(tmp_path, env, epochs: int, *extra: str):
    """`meddx train` of seednet on tmp_path/data with two workers and a progress line as
    often as it can; its result and all it printed, once it succeeded."""
    result = subprocess.run(
        [MEDDX, "train", str(tmp_path / "data")]
        + ["--out", str(tmp_path / "m.pt"), "--model", "seednet", "--workers", "2"]
        + ["--epochs", str(epochs), "--image-size", "64"]
        + ["--storage-path", str(tmp_path / "runs")]
        + ["--batch-size", "4", "--progress-seconds", "0.01", *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return result, output


@pytest.mark.slow
def test_train_command_on_its_own_ray_prints_no_state_api_noise(tmp_path):
    """`meddx train` starts its own Ray with the dashboard: Ray Train watches its
    workers through the state API, which otherwise fails and logs about once a second."""
    write_archive(SynthConfig(out=str(tmp_path / "data"), n=40, size=64, seed=3))
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a Ray of its own, not the session's
    env.pop("MEDDX_QUIET_WORKERS", None)  # the workers' lines reach the driver, as for users
    result, output = train_command(tmp_path, env, 3)
    assert "trained seednet on 32 images (validation 8)" in result.stdout
    # Progress within each epoch (rank 0), then each epoch's line.
    line = r"\[meddx train\] epoch (\d)/3: ([\d,]+)/32 images, [\d.]+ images/s"
    within = re.findall(line, output)
    assert {e for e, _ in within} == {"1", "2", "3"}, output[-3000:]
    assert all(0 < int(n) <= 32 for _, n in within)
    assert set(re.findall(r"\[meddx train\] epoch (\d)/3 train_loss=", output)) == {"1", "2", "3"}
    assert "State API may be temporarily unavailable" not in output
    assert "Use 'expr' instead of 'fn'" not in output  # Ray Data's warning on a fn filter
    ckpt, _ = registry.read_checkpoint(str(tmp_path / "m.pt"), StorageSettings())
    assert ckpt.model_name == "seednet"


@pytest.mark.slow
@pytest.mark.parametrize("quiet", [True, False], ids=["quiet", "progress"])
def test_train_quiet_prints_no_progress(ray_session, tmp_path, quiet):
    write_archive(SynthConfig(out=str(tmp_path / "data"), n=40, size=64, seed=3))
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    env.pop("MEDDX_QUIET_WORKERS", None)  # the workers' lines would reach the driver
    env.pop("RAY_TRAIN_ENABLE_PRINT_PATCH", None)
    result, output = train_command(tmp_path, env, 2, *(["--quiet"] if quiet else []))
    # Ray Train's and Ray Data's own INFO lines stay off the console.
    for ray_line in (
        "Reporting training result",  # Ray Train's worker, through its root logger
        "Started training worker group",  # Ray Train's controller
        "Execution plan of Dataset",  # Ray Data's, in the workers that run one
        "execution finished",
        "Progress bars disabled",
        "exclude_resources",  # a deprecation in Ray Train's own use of Ray Data
    ):
        assert ray_line not in output, output[-3000:]
    if not quiet:
        # Each epoch's line reaches the driver once (Ray Train's print patch doubled it).
        for epoch in (1, 2):
            assert output.count(f"[meddx train] epoch {epoch}/2 train_loss=") == 1, output
        return
    assert "[meddx train]" not in output, output[-3000:]
    assert "trained seednet on 32 images (validation 8)" in result.stdout  # the summary stays
