"""(a) of bench.py: the model's ceiling, forward passes on ready tensors in this process,
in torch and in OpenVINO (fp32, plain int8 and what ``meddx optimize`` keeps), and what
the predictor stage's out-of-distribution score costs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from film_archive import archive, first_films_manifest

from meddx import MeddxError
from meddx.inputs.storage import StorageSettings
from meddx.model import engine, optimize, registry
from meddx.names import CPU_BATCH, GPU_BATCH

MODEL_SIZE = 224  # the input size every part of the bench decodes to and runs the model at
CALIBRATION_FILMS = 120  # what plain int8 quantization of the (a) ceiling calibrates on


def ceiling(model: torch.nn.Module, dtype, device: torch.device, seconds: float = 15.0):
    batch = GPU_BATCH if device.type == "cuda" else CPU_BATCH  # meddx score's defaults
    x = torch.randn(batch, 3, MODEL_SIZE, MODEL_SIZE, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
    ):
        model(x)
        sync()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(x)
            n += batch
        sync()
    return n / (time.perf_counter() - start)


def ood_cost(ckpt, device: torch.device, seconds: float) -> dict:
    """The predictor stage (Predictor.__call__: forward pass, probabilities, rows) with and
    without an out-of-distribution density, timed in alternating rounds on one batch of
    the same uint8 images: what ood_score costs in throughput."""
    from meddx.imaging.decode import INFO_DEFAULTS
    from meddx.model import ood
    from meddx.model.ood import features_of
    from meddx.model.predictor import Predictor

    batch_size = GPU_BATCH if device.type == "cuda" else CPU_BATCH
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size, MODEL_SIZE, MODEL_SIZE), dtype=np.uint8)
    features = features_of(ckpt, [images])
    groups = np.arange(len(features)) % 2
    with_density = ood.with_density(ckpt, features, groups, features)
    batch = {
        "image_uri": np.array([f"x/{i}.png" for i in range(batch_size)], dtype=object),
        "status": np.array(["ok"] * batch_size, dtype=object),
        "error": np.array([""] * batch_size, dtype=object),
        "qc": np.array(["ok"] * batch_size, dtype=object),
        "content_sha256": np.array([""] * batch_size, dtype=object),
        "image": images,
        **{
            k: np.array([v] * batch_size, dtype=np.int64 if isinstance(v, int) else object)
            for k, v in INFO_DEFAULTS.items()
        },
    }
    settings = StorageSettings()
    predictors = {
        "without": Predictor(ckpt, settings, "fp32", "bench"),
        "with": Predictor(with_density, settings, "fp32", "bench"),
    }
    counts = {k: 0 for k in predictors}
    elapsed = {k: 0.0 for k in predictors}
    rounds = 6  # alternating, so drift of the machine's speed falls on both alike
    for p in predictors.values():
        p(batch)  # warm-up
    for _ in range(rounds):
        for name, p in predictors.items():
            start = time.perf_counter()
            while time.perf_counter() - start < seconds / rounds:
                p(batch)
                counts[name] += batch_size
            elapsed[name] += time.perf_counter() - start
    rates = {k: counts[k] / elapsed[k] for k in predictors}
    return {
        "predictor_images_per_s_without_ood": round(rates["without"], 1),
        "predictor_images_per_s_with_ood": round(rates["with"], 1),
        "ood_cost": round(1 - rates["with"] / rates["without"], 4),
    }


def openvino_part(args) -> tuple[str | None, dict]:
    """(a) for the OpenVINO runtimes and ``meddx optimize`` of the bench's model: the
    optimized checkpoint's path (None when the gate refused it) and the figures."""
    torch.set_num_threads(os.cpu_count() or 1)
    ckpt = registry.untrained_checkpoint(args.model, input_size=MODEL_SIZE)
    folder = archive(args.n, args.size, args.mix, args.cache, args.unique)
    optimized, gate, calibration = optimized_checkpoint(ckpt, folder, args)
    figures = openvino_ceilings(optimized or ckpt, gate, args.ceiling_seconds, calibration)
    return (str(args.cache / f"{args.model}-int8.pt") if optimized else None), figures


def optimized_checkpoint(ckpt, folder: Path, args):
    """``meddx optimize`` (OpenVINO int8) of the bench's checkpoint, calibrated and checked
    on the archive's first films: the checkpoint with the artefact, or None when the
    accuracy gate refused it; and the gate's figures (or its one-line refusal)."""
    source = args.cache / f"{args.model}-trained.pt"
    out = args.cache / f"{args.model}-int8.pt"
    manifest = first_films_manifest(folder, args.train_n, args.cache)
    # The gate compares AUROC: on random weights (AUROC ~0.5, near-equal scores) any
    # rounding reorders them, so the model is trained first, briefly, on the same films.
    ckpt, images = trained(ckpt, manifest)
    calibration = optimize.model_inputs(ckpt, images[:CALIBRATION_FILMS])
    registry.save_checkpoint(ckpt, str(source), StorageSettings())
    try:
        r = optimize.optimize(str(source), str(manifest), str(out), StorageSettings())
    except MeddxError as exc:
        return None, {"holds": False, "refused": str(exc)}, calibration
    optimized, _ = registry.read_checkpoint(str(out), StorageSettings())
    return optimized, r.check, calibration


def trained(ckpt, manifest: Path, epochs: int = 8, lr: float = 1e-4, augment=None):
    """``ckpt``'s model trained in this process on the manifest's films (decoded as
    scoring decodes them): AUROC near 1 on synth's films, with scores spread out.

    A model that ranks the films poorly fails the int8 gate on AUROC whatever int8 does:
    at 1e-3 resnet18's scores all came out above 0.96 (AUROC 0.771 -> 0.809 for a 0.002
    score change, on an Intel Xeon); 4 epochs at 3e-4 gave AUROC 0.870 on an AMD EPYC
    (-> 0.933 for 0.016). 8 epochs at 1e-4: AUROC 1.000, 96 of 240 films between 0.05
    and 0.95. ``augment``: uint8 (N, H, W) -> float (N, 1, H, W) in [0, 1], such as
    ``meddx train``'s meddx.imaging.transforms.TrainAugment()."""
    from meddx.imaging.transforms import to_model_input

    images, truth = optimize.labelled_images(ckpt, str(manifest), StorageSettings(), 10**6)
    torch.manual_seed(0)
    model = registry.model_from_checkpoint(ckpt).train()
    mean, std = torch.tensor(ckpt.mean), torch.tensor(ckpt.std)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    labels = torch.from_numpy(truth.astype(np.int64))
    for _ in range(epochs):
        for i in torch.randperm(len(images)).split(32):
            x = torch.from_numpy(images[i.numpy()])
            x = to_model_input(augment(x) if augment else x, mean, std)
            loss = torch.nn.functional.cross_entropy(model(x), labels[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    trained_ckpt = registry.make_checkpoint(
        model.eval(),
        model_name=ckpt.model_name,
        class_names=list(ckpt.class_names),
        positive_class=ckpt.positive_class,
        input_size=ckpt.input_size,
    )
    return trained_ckpt, images


def openvino_ceilings(ckpt, gate: dict, seconds: float, calibration: np.ndarray) -> dict:
    """(a) for the OpenVINO runtimes: fp32; int8 by plain post-training quantization on
    ``calibration`` (the speed int8 gives, gate or not); and the artefact that meddx
    optimize kept, when its accuracy gate held (int8, or fp32 where accuracy control
    returned every layer to fp32)."""
    x = np.random.default_rng(0).standard_normal((CPU_BATCH, 3, MODEL_SIZE, MODEL_SIZE))
    x = x.astype(np.float32)
    out = {}
    for name in ("fp32", "int8_ptq", "gated"):
        if name == "gated":
            if not engine.usable(ckpt):
                continue
            probe = ckpt
            out["openvino_gated_precision"] = engine.artefact(ckpt)["precision"]
        else:
            precision = name.split("_")[0]
            xml, weights = optimize.export(ckpt, precision, calibration)
            entry = {"runtime": "openvino", "precision": precision, "xml": xml, "bin": weights}
            probe = ckpt.replace(extra={**ckpt.extra, engine.OPTIMIZED_KEY: entry})
        compiled = engine.CompiledModel(probe, os.cpu_count())
        compiled(x)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            compiled(x)
            n += len(x)
        out[f"openvino_{name}"] = n / (time.perf_counter() - start)
    out["openvino_int8_gate"] = {
        k: v for k, v in gate.items() if not isinstance(v, bytes | torch.Tensor)
    }
    return out
