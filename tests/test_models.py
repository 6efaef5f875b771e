import hashlib
import io
import pickle

import pytest
import torch

from meddx import MeddxError, models
from meddx.storage import StorageSettings


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_registered_model_runs_at_224(name):
    net = models.build_model(name, 2).eval()
    with torch.inference_mode():
        out = net(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 2)


@pytest.mark.parametrize("size", [64, 128, 224, 300])
def test_seednet_is_size_agnostic(size):
    with torch.inference_mode():
        assert models.build_model("seednet", 3).eval()(torch.randn(1, 3, size, size)).shape == (
            1,
            3,
        )


def test_unknown_model_is_a_clear_error():
    with pytest.raises(MeddxError, match="unknown model 'vgg'"):
        models.build_model("vgg", 2)


def make(net=None):
    net = net or models.build_model("seednet", 2)
    return models.make_checkpoint(
        net,
        model_name="seednet",
        class_names=["normal", "opacity"],
        positive_class="opacity",
        input_size=96,
        threshold=0.3,
        train_config={"epochs": 1},
        metrics={"val_auroc": 0.9},
    )


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    net = models.build_model("seednet", 2).eval()
    path = tmp_path / "m.pt"
    sha = models.save_checkpoint(make(net), str(path), StorageSettings())
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    ckpt, sha2 = models.read_checkpoint(str(path), StorageSettings())
    assert sha2 == sha
    assert ckpt["class_names"] == ["normal", "opacity"] and ckpt["threshold"] == 0.3
    assert ckpt["input_size"] == 96 and ckpt["metrics"] == {"val_auroc": 0.9}
    x = torch.randn(1, 3, 96, 96)
    with torch.inference_mode():
        torch.testing.assert_close(models.model_from_checkpoint(ckpt)(x), net(x))


def test_checkpoint_on_s3(bucket, settings):
    uri = f"{bucket}/models/m.pt"
    sha = models.save_checkpoint(make(), uri, settings)
    ckpt, sha2 = models.read_checkpoint(uri, settings)
    assert sha2 == sha and ckpt["model_name"] == "seednet"


class RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    buf = io.BytesIO()
    torch.save({"format": 1, "payload": RunsCode()}, buf)
    evil.write_bytes(buf.getvalue())
    with pytest.raises(MeddxError, match="not a loadable meddx checkpoint"):
        models.read_checkpoint(str(evil), StorageSettings())


def test_non_checkpoint_files_are_refused(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(MeddxError, match="checkpoint"):
        models.read_checkpoint(str(junk), StorageSettings())
    with pytest.raises(MeddxError, match="checkpoint not found"):
        models.read_checkpoint(str(tmp_path / "missing.pt"), StorageSettings())


def test_pinned_sha256(tmp_path):
    path = tmp_path / "m.pt"
    sha = models.save_checkpoint(make(), str(path), StorageSettings())
    assert models.read_checkpoint(str(path), StorageSettings(), sha)[1] == sha
    assert models.read_checkpoint(str(path), StorageSettings(), sha.upper())[1] == sha
    with pytest.raises(MeddxError, match="not the pinned"):
        models.read_checkpoint(str(path), StorageSettings(), "0" * 64)
