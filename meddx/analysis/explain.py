"""Grad-CAM heatmaps: where in the film the model looked for its positive score.

    meddx explain OUT/dt=2026-11-26 --model CKPT --top 10 --out heatmaps/

For the K highest-scoring studies, the gradient of the positive class's logit weights
the last convolutional block's feature maps (Selvaraju et al., Grad-CAM); the result is
overlaid on the preprocessed image the model saw. Files are named by rank and pseudonym.
For a multi-label model the class is the finding that gave the study its score (its
highest finding probability). From results of several models, the checkpoint's own rows.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from meddx import MeddxError  # noqa: E402
from meddx.imaging import decode
from meddx.imaging.dicom import pseudonymous_id  # noqa: E402
from meddx.imaging.transforms import to_model_input  # noqa: E402
from meddx.inputs import reading, storage
from meddx.inputs.storage import StorageSettings  # noqa: E402
from meddx.model import registry
from meddx.model.registry import Checkpoint  # noqa: E402
from meddx.names import DEFAULT_MAX_OBJECT_BYTES  # noqa: E402
from meddx.store import films  # noqa: E402


def last_conv_block(model: nn.Module) -> nn.Module:
    """The layer whose feature maps Grad-CAM weighs, for each registered architecture."""
    if hasattr(model, "layer4"):  # resnets
        return model.layer4[-1]
    if isinstance(getattr(model, "features", None), nn.Sequential):  # seednet, densenet
        return model.features[-1]
    raise MeddxError(f"no Grad-CAM layer known for {type(model).__name__}")


def grad_cam(model: nn.Module, x: torch.Tensor, class_index: int | None) -> np.ndarray:
    """(H, W) heatmap in [0, 1] for one image tensor (1, 3, H, W); ``None``: the class
    with the highest output."""
    layer = last_conv_block(model)
    captured = {}
    handle = layer.register_forward_hook(lambda m, i, o: captured.update(act=o))
    try:
        model.zero_grad(set_to_none=True)
        logits = model(x)
        act = captured["act"]
        if class_index is None:
            class_index = int(logits[0].argmax())
        grads = torch.autograd.grad(logits[0, class_index], act)[0]
    finally:
        handle.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam.detach().numpy()
    return cam / cam.max() if cam.max() > 0 else cam


def overlay_png(image: np.ndarray, cam: np.ndarray, title: str) -> bytes:
    fig, ax = plt.subplots(figsize=(3.2, 3.4))
    ax.imshow(image, cmap="gray", vmin=0, vmax=255)
    ax.imshow(cam, cmap="jet", alpha=0.35, vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def overlay_rgb(image: np.ndarray, cam: np.ndarray, alpha: float = 0.35) -> np.ndarray:
    """uint8 (H, W, 3): the heatmap blended over the gray image as overlay_png draws it,
    without axes or title (for a DICOM Secondary Capture)."""
    heat = plt.get_cmap("jet")(np.clip(cam, 0, 1))[..., :3]
    gray = (image.astype(np.float32) / 255)[..., None]
    return np.round(((1 - alpha) * gray + alpha * heat) * 255).astype(np.uint8)


def cams(
    rows: list[dict],
    ckpt: Checkpoint,
    settings: StorageSettings,
    max_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
    locators: dict[str, str] | None = None,
    store: str | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(model-size pixels, Grad-CAM) for each row, in order. The images are read as
    scoring reads them (the same limits; each tar shard streamed once for all its
    members; a DICOMweb instance by its locator), or from ``store``'s films (meddx
    prepare) where the run read them there."""
    model = registry.model_from_checkpoint(ckpt)
    mean, std = torch.tensor(ckpt.mean), torch.tensor(ckpt.std)
    decode_settings = decode.DecodeSettings(size=ckpt.input_size, modalities=None, views=None)
    out = []
    for row, pixels in zip(
        rows, _images(rows, settings, max_bytes, locators, store, decode_settings), strict=True
    ):
        x = to_model_input(torch.tensor(pixels).unsqueeze(0), mean, std).requires_grad_(False)
        target = ckpt.positive_index
        if ckpt.multi_label and row.get("probs"):  # the finding behind the score
            target = int(np.argmax(row["probs"]))
        out.append((pixels, grad_cam(model, x, target)))
    return out


def _images(rows, settings, max_bytes, locators, store, decode_settings):
    """Each row's model-size pixels, read and decoded, or from the store."""
    uris = [row["image_uri"] for row in rows]
    if store:
        for uri, (pixels, error) in zip(
            uris, films.read_uris(store, settings, uris, decode_settings), strict=True
        ):
            if pixels is None:
                raise MeddxError(f"cannot read {uri} from the store: {error}")
            yield pixels
        return
    for uri, (data, error) in zip(
        uris, reading.read_uris(uris, settings, max_bytes, locators), strict=True
    ):
        if error:
            raise MeddxError(f"cannot read {uri}: {error}")
        try:
            yield decode.decode_image(data, decode_settings)[0]
        except decode.DecodeError as exc:
            raise MeddxError(f"cannot decode {uri}: {exc}") from None


def titled_overlays(
    rows: list[dict], found: list[tuple[np.ndarray, np.ndarray]], ckpt: Checkpoint
) -> list[bytes]:
    """The overlay PNG of each row's (pixels, Grad-CAM) from ``cams``, titled with its
    rank, pseudonym and score (and finding, for a multi-label model), in order."""
    out = []
    for rank, (row, (pixels, cam)) in enumerate(zip(rows, found, strict=True), start=1):
        title = f"#{rank} {pseudonymous_id(row)} score {row['score']:.3f}"
        if ckpt.multi_label and row.get("label"):
            title += f" {row['label']}"
        out.append(overlay_png(pixels, cam, title))
    return out


def explain(
    predictions: str,
    model: str,
    top: int,
    out: str,
    settings: StorageSettings,
    max_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
) -> list[str]:
    """Write Grad-CAM overlays of the ``top`` highest-scoring ok rows; their URIs."""
    from meddx.analysis.evaluation import one_model, read_predictions

    ckpt, sha = registry.read_checkpoint(model, settings)
    table, meta = read_predictions(predictions, settings)
    if not pc.any(pc.equal(table["model_sha256"], sha)).as_py():
        raise MeddxError(f"{predictions} was not scored by {model} (sha256 differs)")
    table, meta, _ = one_model(table, meta, sha, predictions)  # its rows, not others'
    table = table.filter(pc.equal(table["status"], "ok")).sort_by([("score", "descending")])
    rows = table.slice(0, top).to_pylist()
    store = meta.get("meddx.store") or None  # the run read its films from a store
    if store and not films.is_store(store, settings):
        store = None  # moved or gone: the sources, then
    pngs = titled_overlays(rows, cams(rows, ckpt, settings, max_bytes, store=store), ckpt)
    written = []
    for rank, (row, png) in enumerate(zip(rows, pngs, strict=True), start=1):
        uri = storage.join(out, f"{rank:03d}-{pseudonymous_id(row)}.png")
        storage.write_bytes(uri, png, settings)
        written.append(uri)
    return written
