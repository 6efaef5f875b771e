from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
from PIL import Image
from torch import nn

from meddx.analysis.explain import explain, grad_cam
from meddx.imaging.dicom import pseudonymous_id
from meddx.inputs.storage import StorageSettings
from meddx.model import registry
from meddx.pipelines.scoring import ScoreConfig, score

from .images import gradient, png


@pytest.mark.parametrize("name", ["seednet", "resnet18", "densenet121"])
def test_grad_cam_shape_and_range(name):
    torch.manual_seed(0)
    model = registry.build_model(name, 2).eval()
    cam = grad_cam(model, torch.randn(1, 3, 96, 96), 1)
    assert cam.shape == (96, 96) and cam.min() >= 0 and cam.max() <= 1 and cam.max() > 0


class TwoCues(nn.Module):
    """A model whose evidence is known: class 0's logit is the mean brightness of the red
    channel, class 1's the green's, seen through 4 x 4 pooled feature maps (the layer
    Grad-CAM weighs, as seednet's ``features``)."""

    def __init__(self):
        super().__init__()
        colour = nn.Conv2d(3, 2, kernel_size=1, bias=False)
        colour.weight.data = torch.eye(3)[:2].reshape(2, 3, 1, 1)  # red -> 0, green -> 1
        self.features = nn.Sequential(colour, nn.ReLU(), nn.AvgPool2d(4))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.head(self.features(x))


PATCH = 12  # pixels a side of each cue


def cue_image(red: tuple[int, int], green: tuple[int, int], size: int = 64) -> torch.Tensor:
    """Faint noise everywhere; a red patch at ``red`` and a green one at ``green``
    (top-left corners, PATCH pixels a side)."""
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(3)) * 0.2
    for channel, (row, col) in ((0, red), (1, green)):
        x[0, channel, row : row + PATCH, col : col + PATCH] = 1.0
    return x


@pytest.mark.parametrize(
    "red, green", [((4, 40), (44, 8)), ((44, 8), (4, 40))], ids=["red-top", "red-bottom"]
)
def test_grad_cam_lights_the_patch_that_made_the_class(red, green):
    # Each class's CAM must sit on its own cue, not on the other class's (equally bright)
    # one: the gradient weighting, the upsampling and the orientation all matter.
    model = TwoCues().eval()
    x = cue_image(red, green)
    for class_index, (row, col), (other_row, other_col) in ((0, red, green), (1, green, red)):
        cam = grad_cam(model, x, class_index)
        inside = np.zeros(cam.shape, dtype=bool)
        inside[row : row + PATCH, col : col + PATCH] = True
        peak = np.unravel_index(np.argmax(cam), cam.shape)
        assert inside[peak], (class_index, peak)
        assert cam[inside].mean() > 5 * cam[~inside].mean()
        other = cam[other_row : other_row + PATCH, other_col : other_col + PATCH]
        assert other.max() < 0.3


@pytest.mark.slow
def test_explain_top_k(ray_session, tmp_path, random_checkpoint):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(7)
    for i in range(6):  # films that differ, so that their scores do
        film = np.clip(gradient(64) * 255 * (0.3 + 0.1 * i) + rng.normal(0, 40, (64, 64)), 0, 255)
        Image.fromarray(film.astype(np.uint8), "L").save(src / f"{i}.png")
    (src / "bad.png").write_bytes(b"")
    score(ScoreConfig(input=str(src), model=random_checkpoint[0], out=str(tmp_path / "out")))
    top = 3
    written = explain(
        str(tmp_path / "out"), random_checkpoint[0], top, str(tmp_path / "cams"), StorageSettings()
    )
    rows = pads.dataset(str(tmp_path / "out"), format="parquet", partitioning="hive").to_table()
    ok = sorted((r for r in rows.to_pylist() if r["status"] == "ok"), key=lambda r: -r["score"])
    assert len(ok) == 6 and len({r["score"] for r in ok}) == 6  # one order, no ties
    by_name = sorted(ok, key=lambda r: r["image_uri"])
    assert [r["image_uri"] for r in ok[:top]] != [r["image_uri"] for r in by_name[:top]]
    expected = [f"{rank:03d}-{pseudonymous_id(r)}.png" for rank, r in enumerate(ok[:top], 1)]
    assert [Path(p).name for p in written] == expected
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == expected
    for path in written:
        img = np.asarray(Image.open(path).convert("RGB"))
        assert img.shape[0] > 100 and img.std() > 5


def test_multi_label_heatmap_follows_the_top_finding(tmp_path, monkeypatch):
    from meddx.analysis import explain as explain_module

    ckpt = registry.untrained_checkpoint(
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
    found = explain_module.cams(rows, ckpt, StorageSettings())
    out = explain_module.titled_overlays(rows, found, ckpt)
    # The finding behind the score, else the model's highest output.
    assert targets == [1, None]
    assert len(out) == 2 and all(p[:4] == b"\x89PNG" for p in out)


def test_explain_reads_its_own_models_rows(tmp_path, random_checkpoint):
    # Results of two models, the other one first: the heatmaps are of the checkpoint's
    # highest-scoring rows, never of rows another model ranked high.
    from .test_evaluate import model_meta, write_models

    ckpt_path, sha = random_checkpoint
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(png("L", size=64))
    own = [
        {
            "image_uri": str(tmp_path / f"{i}.png"),
            "status": "ok",
            "score": score,
            "model_name": "seednet",
            "model_sha256": sha,
        }
        for i, score in enumerate([0.2, 0.7, 0.4, 0.6])
    ]
    other = [{**r, "score": 1 - r["score"], "model_sha256": "cd" * 32} for r in own]
    results = tmp_path / "results" / "p.parquet"
    write_models(
        results,
        [(other, model_meta("resnet18", "cd" * 32, 0.5)), (own, model_meta("seednet", sha, 0.5))],
    )
    written = explain(str(results.parent), ckpt_path, 2, str(tmp_path / "cams"), StorageSettings())
    expected = [f"{rank:03d}-{pseudonymous_id(own[i])}.png" for rank, i in ((1, 1), (2, 3))]
    assert [Path(p).name for p in written] == expected
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == expected
