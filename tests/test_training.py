"""DDP training on a real local Ray, fed from a real S3 endpoint."""

import pytest

from meddx import MeddxError, models
from meddx.synth import SynthConfig, write_archive
from meddx.training import TrainConfig, split, train


@pytest.mark.slow
def test_train_one_epoch_two_workers_from_s3(ray_session, bucket, settings, tmp_path):
    write_archive(SynthConfig(out=f"{bucket}/data", n=40, size=64, seed=5, storage=settings))
    out = f"{bucket}/models/seednet.pt"
    summary = train(
        TrainConfig(
            data=f"{bucket}/data",
            out=out,
            model="seednet",
            epochs=1,
            workers=2,
            batch_size=8,
            image_size=64,
            storage_path=str(tmp_path / "runs"),
            storage=settings,
        )
    )
    assert (summary.n_train, summary.n_val) == (32, 8)
    ckpt, sha = models.read_checkpoint(out, settings)
    assert sha == summary.sha256
    assert ckpt["model_name"] == "seednet" and ckpt["input_size"] == 64
    assert ckpt["class_names"] == ["normal", "opacity"] and ckpt["positive_class"] == "opacity"
    assert ckpt["train_config"]["workers"] == 2 and ckpt["train_config"]["epochs"] == 1
    for key in ("val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1", "val_auroc"):
        assert key in ckpt["metrics"], key
    assert 0.0 <= ckpt["metrics"]["val_auroc"] <= 1.0
    assert 0.0 <= ckpt["threshold"] <= 1.0 and ckpt["threshold"] == ckpt["metrics"]["val_threshold"]
    model = models.model_from_checkpoint(ckpt)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_split_is_stratified_and_seeded():
    items = [(f"n{i}", "normal") for i in range(80)] + [(f"o{i}", "opacity") for i in range(20)]
    train_a, val_a = split(items, 0.2, seed=1)
    train_b, val_b = split(items, 0.2, seed=1)
    assert val_a == val_b and train_a == train_b
    assert len(val_a) == 20 and sum(lbl == "opacity" for _, lbl in val_a) == 4
    assert not {u for u, _ in train_a} & {u for u, _ in val_a}


def test_bad_training_config_fails_before_ray(tmp_path):
    with pytest.raises(MeddxError, match="unknown model"):
        train(TrainConfig(data=str(tmp_path), out="m.pt", model="vgg"))
    with pytest.raises(MeddxError, match="at least two classes"):
        (tmp_path / "normal").mkdir()
        (tmp_path / "normal" / "a.png").write_bytes(b"x")
        train(TrainConfig(data=str(tmp_path), out="m.pt"))
