import hashlib
import io
import pickle

import pytest
import torch

from meddx import MeddxError
from meddx.inputs.storage import StorageSettings
from meddx.model import registry


@pytest.mark.parametrize("name", sorted(registry.MODELS))
def test_every_registered_model_runs_at_224(name):
    net = registry.build_model(name, 2).eval()
    with torch.inference_mode():
        out = net(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 2)


@pytest.mark.parametrize("size", [64, 128, 224, 300])
def test_seednet_is_size_agnostic(size):
    with torch.inference_mode():
        assert registry.build_model("seednet", 3).eval()(torch.randn(1, 3, size, size)).shape == (
            1,
            3,
        )


def test_unknown_model_is_a_clear_error():
    with pytest.raises(MeddxError, match="unknown model 'vgg'"):
        registry.build_model("vgg", 2)


def make(net=None):
    net = net or registry.build_model("seednet", 2)
    return registry.make_checkpoint(
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
    net = registry.build_model("seednet", 2).eval()
    path = tmp_path / "m.pt"
    sha = registry.save_checkpoint(make(net), str(path), StorageSettings())
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    ckpt, sha2 = registry.read_checkpoint(str(path), StorageSettings())
    assert sha2 == sha
    assert ckpt.class_names == ("normal", "opacity") and ckpt.threshold == 0.3
    assert ckpt.input_size == 96 and ckpt.metrics == {"val_auroc": 0.9}
    x = torch.randn(1, 3, 96, 96)
    with torch.inference_mode():
        torch.testing.assert_close(registry.model_from_checkpoint(ckpt)(x), net(x))


def test_checkpoint_on_s3(bucket, settings):
    uri = f"{bucket}/models/m.pt"
    sha = registry.save_checkpoint(make(), uri, settings)
    ckpt, sha2 = registry.read_checkpoint(uri, settings)
    assert sha2 == sha and ckpt.model_name == "seednet"


class RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    buf = io.BytesIO()
    torch.save({"format": 1, "payload": RunsCode()}, buf)
    evil.write_bytes(buf.getvalue())
    with pytest.raises(MeddxError, match="not a loadable meddx checkpoint"):
        registry.read_checkpoint(str(evil), StorageSettings())


def test_non_checkpoint_files_are_refused(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(MeddxError, match="checkpoint"):
        registry.read_checkpoint(str(junk), StorageSettings())
    with pytest.raises(MeddxError, match="checkpoint not found"):
        registry.read_checkpoint(str(tmp_path / "missing.pt"), StorageSettings())


def test_pinned_sha256(tmp_path):
    path = tmp_path / "m.pt"
    sha = registry.save_checkpoint(make(), str(path), StorageSettings())
    assert registry.read_checkpoint(str(path), StorageSettings(), sha)[1] == sha
    assert registry.read_checkpoint(str(path), StorageSettings(), sha.upper())[1] == sha
    with pytest.raises(MeddxError, match="not the pinned"):
        registry.read_checkpoint(str(path), StorageSettings(), "0" * 64)


def dict_layout(net, **fields) -> dict:
    """A checkpoint exactly as meddx writes it to disk (format 1), spelled out by hand."""
    return {
        "format": 1,
        "model_name": "seednet",
        "class_names": ["normal", "opacity"],
        "positive_class": "opacity",
        "input_size": 64,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "threshold": 0.4,
        "train_config": {"epochs": 3},
        "metrics": {"val_auroc": 0.91},
        "meddx_version": "0.1.0",
        "created_at": "2026-11-20T10:00:00+00:00",
        "state_dict": {k: v.clone() for k, v in net.state_dict().items()},
        **fields,
    }


def expected_probs(net, images, temperature, multi_label: bool):
    """What scoring must give, computed the plain way: eager model, logits / T."""
    from meddx.imaging.transforms import to_model_input

    x = to_model_input(
        torch.from_numpy(images),
        torch.tensor([0.485, 0.456, 0.406]),
        torch.tensor([0.229, 0.224, 0.225]),
    )
    with torch.inference_mode():
        logits = net.eval()(x) / torch.tensor(temperature)
    return (torch.sigmoid(logits) if multi_label else torch.softmax(logits, 1)).numpy()


LAYOUTS = {
    # Written before modalities, temperature or multi-label existed.
    "oldest": ({}, 1.0, False),
    "calibrated": ({"temperature": 1.7, "modalities": ["DX"], "precision": "fp32"}, 1.7, False),
    "multi-label": (
        {
            "class_names": ["opacity", "effusion", "nodule"],
            "positive_class": "abnormal",
            "multi_label": True,
            "thresholds": [0.3, 0.6, 0.5],
            "threshold": 0.3,
            "temperature": [1.0, 2.0, 0.5],
            "modalities": [],
        },
        [1.0, 2.0, 0.5],
        True,
    ),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_checkpoints_in_the_dict_layout_load_and_score_the_same(tmp_path, layout):
    import numpy as np

    from meddx.model.predictor import Predictor

    fields, temperature, multi_label = LAYOUTS[layout]
    torch.manual_seed(1)
    net = registry.build_model("seednet", 3 if multi_label else 2)
    path = tmp_path / "old.pt"
    torch.save(dict_layout(net, **fields), path)

    ckpt, _ = registry.read_checkpoint(str(path), StorageSettings())
    n_out = 3 if multi_label else 1
    assert ckpt.multi_label is multi_label
    assert len(ckpt.thresholds) == len(ckpt.temperatures) == n_out
    assert ckpt.temperatures == tuple(temperature if multi_label else [temperature])
    assert ckpt.positive_index == (None if multi_label else 1)
    assert ckpt.threshold == (0.3 if multi_label else 0.4)
    assert ckpt.modalities == tuple(fields.get("modalities", ["CR", "DX"]))
    assert ckpt.precision == fields.get("precision")
    assert ckpt.metrics == {"val_auroc": 0.91} and ckpt.train_config == {"epochs": 3}

    images = np.random.default_rng(0).integers(0, 255, (5, 64, 64), dtype=np.uint8)
    predictor = Predictor(str(path), StorageSettings(), "fp32", "r")
    np.testing.assert_allclose(
        predictor.predict_probs(images),
        expected_probs(net, images, temperature, multi_label),
        atol=1e-5,
    )
    # Written again, the file holds the same layout and scores the same.
    again = tmp_path / "again.pt"
    registry.save_checkpoint(ckpt, str(again), StorageSettings())
    ckpt2, _ = registry.read_checkpoint(str(again), StorageSettings())
    assert ckpt2 == ckpt and ckpt2.extra["created_at"] == "2026-11-20T10:00:00+00:00"
    np.testing.assert_allclose(
        Predictor(str(again), StorageSettings(), "fp32", "r").predict_probs(images),
        predictor.predict_probs(images),
        atol=1e-6,
    )


def test_a_checkpoint_missing_what_scoring_needs_is_one_line(tmp_path):
    torch.manual_seed(1)
    layout = dict_layout(registry.build_model("seednet", 2))
    del layout["class_names"]
    torch.save(layout, tmp_path / "m.pt")
    with pytest.raises(MeddxError, match="not a meddx checkpoint: bad or missing 'class_names'"):
        registry.read_checkpoint(str(tmp_path / "m.pt"), StorageSettings())
