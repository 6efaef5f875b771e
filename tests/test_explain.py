import numpy as np
import pytest
import torch
from PIL import Image

from meddx import models
from meddx.explain import explain, grad_cam
from meddx.scoring import ScoreConfig, score
from meddx.storage import StorageSettings

from .images import png


@pytest.mark.parametrize("name", ["seednet", "resnet18", "densenet121"])
def test_grad_cam_shape_and_range(name):
    torch.manual_seed(0)
    model = models.build_model(name, 2).eval()
    cam = grad_cam(model, torch.randn(1, 3, 96, 96), 1)
    assert cam.shape == (96, 96) and cam.min() >= 0 and cam.max() <= 1 and cam.max() > 0


@pytest.mark.slow
def test_explain_top_k(ray_session, tmp_path, random_checkpoint):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.png").write_bytes(png("L", size=50 + i))
    (src / "bad.png").write_bytes(b"")
    score(ScoreConfig(input=str(src), model=random_checkpoint[0], out=str(tmp_path / "out")))
    written = explain(
        str(tmp_path / "out"), random_checkpoint[0], 2, str(tmp_path / "cams"), StorageSettings()
    )
    assert len(written) == 2 and [p.split("/")[-1][:4] for p in written] == ["001-", "002-"]
    for path in written:
        img = np.asarray(Image.open(path).convert("RGB"))
        assert img.shape[0] > 100 and img.std() > 5


def test_multi_label_heatmap_follows_the_top_finding(tmp_path, monkeypatch):
    from meddx import explain as explain_module

    ckpt = models.untrained_checkpoint(
        "seednet", input_size=64, findings=["opacity", "effusion", "nodule"]
    )
    image = tmp_path / "x.png"
    image.write_bytes(png("L", size=64))
    rows = [
        {"image_uri": str(image), "score": 0.7, "probs": [0.1, 0.7, 0.2], "label": "effusion"},
        {"image_uri": str(image), "score": 0.6, "label": "normal"},  # a worklist row: no probs
    ]
    targets = []
    real = explain_module.grad_cam
    monkeypatch.setattr(
        explain_module, "grad_cam", lambda m, x, c: targets.append(c) or real(m, x, c)
    )
    out = explain_module.heatmaps(rows, ckpt, StorageSettings())
    # The finding behind the score, else the model's highest output.
    assert targets == [1, None]
    assert len(out) == 2 and all(p[:4] == b"\x89PNG" for _, p in out)
