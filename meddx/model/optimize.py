"""A checkpoint's model for CPU nodes: OpenVINO IR in fp32, or int8 after NNCF's
post-training quantization, gated on accuracy against torch fp32.

The artefact (the IR's xml and its weights) lives inside the one-file checkpoint as two
uint8 tensors, with the check that admitted it: ``weights_only`` loads it, OpenVINO
reads it from those bytes, nothing is unpickled or fetched, and the checkpoint's sha256
(and a ``--model-sha256`` pin) covers it. A predictor uses it only when its check held;
reading and choosing it is engine.py's, which scoring imports instead of this module.

OpenVINO and NNCF are an optional extra (``pip install meddx[openvino]``, which ``make
install`` does). Without them meddx runs the torch model and says so once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import warnings
from dataclasses import dataclass

import numpy as np

from meddx import MeddxError
from meddx.model import engine, gate
from meddx.model.engine import OPTIMIZED_KEY
from meddx.model.forward import probabilities
from meddx.model.registry import Checkpoint
from meddx.names import DEFAULT_CHECK_IMAGES

log = logging.getLogger(__name__)

# NNCF imports torch's C++ extension builder, which warns on a CPU node that it found no
# CUDA runtime: nothing meddx's user can act on.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

# The gate (gate.py) is checked against torch fp32 on the labelled images of DATA.
CALIBRATION_IMAGES = 300  # NNCF's default subset size
# The classifier head stays fp32: the logits are its output, so its rounding moves the
# scores most (trained resnet18, largest change on held-out films: 0.085 with the head
# in int8, 0.022 without), and it is a thousandth of the model's work.
HEAD_SCOPE = r"__module\.head/.*"
TEACHER_BATCH = 32  # images per fp32 forward pass for the fine-tuning targets
# Quantization-aware fine-tuning (``--finetune-epochs``): distillation toward torch fp32's
# logits with the quantizers in the graph, at a rate small enough not to undo the
# trained model (densenet121: 2e-5 diverged in the first epoch, 1e-5 did not).
FINETUNE_LR = 1e-5
FINETUNE_BATCH = 8
# The quantizers' ranges learn faster than the weights, and fine-tuning starts from
# SmoothQuant (alpha 0.5 on convolutions: per input channel, range moves from the
# activations into the weights). The ranges' best rate depends on the model (held-out
# largest change, 3 epochs: resnet18 0.0680 at 1e-3 and 0.1563 at 1e-2; densenet121
# 0.0683 at 1e-3 and 0.0503 at 1e-2), so fine-tuning tries each of these and keeps the
# one with the smaller largest change on the tuning half, which picked the better rate
# for all three models measured (docs/int8.md).
FINETUNE_RANGE_LRS = (1e-3, 1e-2)
FINETUNE_SMOOTH_QUANT = 0.5


# ---- making the artefact ---------------------------------------------------------------


@contextlib.contextmanager
def quiet_nncf():
    """NNCF logs INFO lines to stdout through a handler of its own and draws progress
    bars there, and stdout is the CLI's: its log goes to meddx's logging at WARNING and
    above, its bars nowhere."""
    from nncf.common.logging.logger import nncf_logger

    for handler in list(nncf_logger.handlers):
        nncf_logger.removeHandler(handler)
    nncf_logger.setLevel(logging.WARNING)
    nncf_logger.propagate = True
    with contextlib.redirect_stdout(io.StringIO()):
        yield


@dataclass(frozen=True)
class OptimizeResult:
    runtime: str
    precision: str
    check: dict
    sha256: str | None  # of CKPT2; None when the check failed and nothing was written


@quiet_nncf()
def export(
    ckpt: Checkpoint,
    precision: str,
    calibration: np.ndarray | None,
    finetune_epochs: int = 0,
    range_lr: float = FINETUNE_RANGE_LRS[0],
) -> tuple[bytes, bytes]:
    """The model as OpenVINO IR (xml bytes, weights bytes). int8 quantizes it on the
    float inputs ``calibration`` (N, 3, S, S) by post-training quantization, or with
    ``finetune_epochs`` by quantization-aware fine-tuning (``finetuned``, the
    quantizers' ranges learning at ``range_lr``)."""
    import openvino as ov

    from meddx.model.registry import features_model

    # Logits first, then the penultimate features the out-of-distribution score needs.
    model = features_model(ckpt)
    if precision == "int8" and finetune_epochs:
        model = finetuned(model, calibration, finetune_epochs, range_lr)
    ov_model = to_openvino(model, ckpt.input_size)
    if precision == "int8" and not finetune_epochs:
        import nncf

        # Full bias correction: on a trained seednet the largest score change fell from
        # 0.56 (NNCF's fast correction) to 0.055.
        ov_model = nncf.quantize(
            ov_model,
            nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))]),
            subset_size=min(CALIBRATION_IMAGES, len(calibration)),
            fast_bias_correction=False,
            ignored_scope=nncf.IgnoredScope(patterns=[HEAD_SCOPE]),
        )
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "model.xml")
        ov.save_model(ov_model, xml, compress_to_fp16=False)
        with open(xml, "rb") as fh:
            xml_bytes = fh.read()
        with open(os.path.join(tmp, "model.bin"), "rb") as fh:
            bin_bytes = fh.read()
    return xml_bytes, bin_bytes


def to_openvino(model, size: int):
    """A torch module (plain, or with NNCF's quantizers) as an OpenVINO model taking any
    batch of (3, size, size)."""
    import openvino as ov
    import torch

    # OpenVINO converts through TorchScript tracing, which torch 2.14 calls deprecated on
    # every call, and which finds NNCF's quantizers data-dependent: warnings for their
    # authors, not for whoever runs meddx.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch.jit.trace", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        return ov.convert_model(
            model,
            example_input=torch.zeros(1, 3, size, size),
            input=[ov.PartialShape([-1, 3, size, size])],
        )


@quiet_nncf()
def finetuned(
    model,
    inputs: np.ndarray,
    epochs: int,
    range_lr: float = FINETUNE_RANGE_LRS[0],
    smooth_quant: float = FINETUNE_SMOOTH_QUANT,
):
    """Quantization-aware fine-tuning of ``model`` (logits first) on the float ``inputs``:
    NNCF's post-training quantization in torch with the head in fp32 (after SmoothQuant
    at alpha ``smooth_quant`` on convolutions; 0: none), then ``epochs`` passes of
    distillation toward the fp32 model's logits on the same inputs, in eval mode; the
    quantizers' ranges learn at ``range_lr``, the weights at FINETUNE_LR. Returns the
    module with its quantizers, for ``to_openvino``."""
    import copy

    import nncf
    import torch

    torch.manual_seed(0)
    x = torch.from_numpy(np.ascontiguousarray(inputs))
    teacher = copy.deepcopy(model).eval()  # nncf.quantize may change the module it takes
    with torch.no_grad():
        target = torch.cat(
            [teacher(x[i : i + TEACHER_BATCH])[0] for i in range(0, len(x), TEACHER_BATCH)]
        )
    student = nncf.quantize(
        model.eval(),
        nncf.Dataset([x[i : i + 1] for i in range(len(x))]),
        subset_size=min(CALIBRATION_IMAGES, len(x)),
        fast_bias_correction=True,  # the only one NNCF's torch backend has
        ignored_scope=nncf.IgnoredScope(patterns=[r".*head.*"]),
        **smoothing(smooth_quant),
    )
    # Eval mode throughout: BatchNorm keeps the fp32 model's statistics and dropout stays
    # off (seednet's made the logits 13x further from fp32's), so that only weights and
    # quantization ranges move, toward the fp32 model's logits.
    student.eval()
    params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    ranges = [p for n, p in params if n.endswith("_param_storage")]
    weights = [p for n, p in params if not n.endswith("_param_storage")]
    opt = torch.optim.Adam(
        [{"params": weights}, {"params": ranges, "lr": range_lr}], lr=FINETUNE_LR
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(FINETUNE_BATCH):
            loss = torch.nn.functional.mse_loss(student(x[batch])[0], target[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        schedule.step()
    return student.eval()


def smoothing(alpha: float) -> dict:
    """nncf.quantize's options for SmoothQuant on convolutions at ``alpha`` (NNCF runs
    it only for its TRANSFORMER model type); none for 0."""
    if not alpha:
        return {}
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters as AQP
    from nncf.quantization.advanced_parameters import AdvancedSmoothQuantParameters as SQP

    return {
        "model_type": nncf.ModelType.TRANSFORMER,
        "advanced_parameters": AQP(smooth_quant_alphas=SQP(convolution=alpha, matmul=-1)),
    }


def gate_check(
    ckpt: Checkpoint,
    images: np.ndarray,
    reference: np.ndarray,
    truth: np.ndarray,
    candidate: Checkpoint | np.ndarray,
) -> dict:
    """The gate's figures (gate.int8_gate) on the uint8 ``images``: torch fp32's
    probabilities ``reference`` on them against the candidate's (a checkpoint whose
    artefact scores them, or its probabilities), with torch fp32 under one grey level of
    noise on the same images for scale."""
    if isinstance(candidate, Checkpoint):
        candidate = probabilities(candidate, images, runtime="openvino")
    noisy = probabilities(ckpt, grey_level_noise(images))
    return gate.int8_gate(ckpt, reference, candidate, noisy, truth)


def with_entry(ckpt: Checkpoint, runtime: str, precision: str, xml: bytes, weights: bytes):
    """The checkpoint with an unchecked artefact in it, to score with."""
    entry = {"runtime": runtime, "precision": precision, "xml": xml, "bin": weights}
    return ckpt.replace(extra={**ckpt.extra, OPTIMIZED_KEY: entry})


def tuned(
    ckpt: Checkpoint, precision: str, images: np.ndarray, reference: np.ndarray, epochs: int
) -> tuple[bytes, bytes, dict]:
    """The artefact made on the tuning images alone (uint8 ``images``, torch fp32's
    ``reference`` probabilities on them): its xml, weights and how it was made. int8 by
    fine-tuning (``epochs``) runs at each of FINETUNE_RANGE_LRS and keeps the one whose
    largest score change here is the smaller."""
    inputs = model_inputs(ckpt, images)
    if precision != "int8" or not epochs:
        return (*export(ckpt, precision, inputs), {})
    tried = {}
    for lr in FINETUNE_RANGE_LRS:
        xml, weights = export(ckpt, precision, inputs, epochs, lr)
        scores = probabilities(
            with_entry(ckpt, "openvino", precision, xml, weights), images, runtime="openvino"
        )
        change = gate.score_change(reference, scores)["max"]
        log.info("fine-tuned with the ranges at %g: largest tuning change %.4f", lr, change)
        tried[lr] = (change, xml, weights)
    best = min(tried, key=lambda lr: tried[lr][0])
    how = {
        "finetune_range_lr": best,
        "finetune_tuning_max_diff": {f"{lr:g}": round(c, 6) for lr, (c, _, _) in tried.items()},
    }
    return tried[best][1], tried[best][2], how


def optimize(
    checkpoint: str,
    data: str,
    out: str,
    settings,
    runtime: str = "openvino",
    precision: str = "int8",
    max_images: int = DEFAULT_CHECK_IMAGES,
    finetune_epochs: int = 0,
) -> OptimizeResult:
    """Export CHECKPOINT's model to ``runtime``, quantize it on DATA's images, check it
    against torch fp32 on DATA's labelled images and write CKPT2 with the artefact when
    the check holds. A failed check writes nothing and raises with the figures."""
    if runtime != "openvino":
        raise MeddxError(f"--runtime must be openvino, got {runtime!r}")
    if not engine.available():
        raise MeddxError("meddx optimize needs OpenVINO and NNCF: pip install 'meddx[openvino]'")
    from meddx.model import registry

    ckpt, _ = registry.read_checkpoint(checkpoint, settings)
    images, truth = labelled_images(ckpt, data, settings, max_images)
    ckpt, result = with_artefact(ckpt, images, truth, runtime, precision, data, finetune_epochs)
    return dataclasses.replace(result, sha256=registry.save_checkpoint(ckpt, out, settings))


def with_artefact(
    ckpt: Checkpoint,
    images: np.ndarray,
    truth: np.ndarray,
    runtime: str = "openvino",
    precision: str = "int8",
    source: str = "the labelled images",
    finetune_epochs: int = 0,
) -> tuple[Checkpoint, OptimizeResult]:
    """The checkpoint with its model for ``runtime`` inside, tuned on every other of the
    uint8 ``images`` and checked on the rest against torch fp32. Raises, with the
    figures, when the check fails. ``finetune_epochs``: quantization-aware fine-tuning
    on the tuning half instead of post-training quantization."""
    if len(images) < 20:
        raise MeddxError(f"{source} has {len(images)} labelled images; optimizing needs 20 or more")
    reference = probabilities(ckpt, images)
    # Tuned and chosen on every other image, checked on the rest: the gate is not the
    # images the quantization was fitted to.
    tune, held = slice(0, None, 2), slice(1, None, 2)
    xml, weights, how = tuned(ckpt, precision, images[tune], reference[tune], finetune_epochs)
    candidate = with_entry(ckpt, runtime, precision, xml, weights)
    check = gate_check(ckpt, images[held], reference[held], truth[held], candidate)
    check |= how
    check["quantized_ops"] = xml.count(b'type="FakeQuantize"')
    check["finetune_epochs"] = finetune_epochs if precision == "int8" else 0
    if not check["holds"]:
        raise GateRefused(OptimizeResult(runtime, precision, check, None), ckpt)
    import torch

    stored = {
        "runtime": runtime,
        "precision": precision,
        "xml": torch.frombuffer(bytearray(xml), dtype=torch.uint8),
        "bin": torch.frombuffer(bytearray(weights), dtype=torch.uint8),
        "check": check,
    }
    result = OptimizeResult(runtime, precision, check, None)
    return ckpt.replace(extra={**ckpt.extra, OPTIMIZED_KEY: stored}), result


class GateRefused(MeddxError):
    """The candidate failed its accuracy check: nothing was written. ``result`` holds the
    check's figures; the message is ``refusal(result)``."""

    def __init__(self, result: OptimizeResult, ckpt: Checkpoint | None = None):
        super().__init__(refusal(result, ckpt))
        self.result = result


def refusal(result: OptimizeResult, ckpt: Checkpoint | None = None) -> str:
    """One line: which of the gate's figures refused the candidate, the rest of them,
    and the next step (the runtime scoring uses meanwhile, as ``ckpt`` resolves it)."""
    c = result.check
    return (
        f"{result.runtime} {result.precision} refused by the accuracy gate, no artefact "
        f"written: {'; '.join(c['failed'])}. {figures(c)}; {next_step(result, ckpt)}"
    )


def next_step(result: OptimizeResult, ckpt: Checkpoint | None = None) -> str:
    """What to do about a refusal, and what scores the model meanwhile."""
    c = result.check
    meanwhile = f"--runtime auto scores it with {fallback_runtime(ckpt)}"
    if any("undefined" in f for f in c["failed"]):
        return f"check it on labelled films of both classes; {meanwhile}"
    if c.get("finetune_epochs"):
        return f"fine-tuning did not hold it either: {meanwhile}"
    if result.precision != "int8":
        return meanwhile
    if unsteady(c):
        return (
            f"one grey level of noise already moves the fp32 model this far, so fine-tuning "
            f"will not hold it (a model trained with more films or augmentation may): {meanwhile}"
        )
    return f"fine-tuning may hold it (meddx optimize --finetune-epochs 3); until then {meanwhile}"


def unsteady(check: dict) -> bool:
    """Whether torch fp32 under one grey level of noise itself fails the gate's ranking or
    calibration limits: int8 cannot be held closer than the model holds itself."""
    for f in check["findings"].values():
        lo, hi = f["auroc_band"]
        if not lo <= f["auroc_noise"] <= hi or f["ece_noise_change"] > gate.MAX_ECE_CHANGE:
            return True
    return False


def fallback_runtime(ckpt: Checkpoint | None) -> str:
    """The runtime ``--runtime auto`` uses for a model without an artefact, on a CPU
    node like this one."""
    import torch

    from meddx.model.precision import checkpoint_precision, resolve_precision

    precision = checkpoint_precision("auto", ckpt) if ckpt is not None else "auto"
    dtype = resolve_precision(precision, torch.device("cpu"))
    names = {torch.bfloat16: "bf16", torch.float16: "fp16"}
    return f"torch {names.get(dtype, 'fp32')}"


def figures(c: dict) -> str:
    """The gate's figures, in words, for one line."""
    parts = [
        f"{c['images']} images: decision flips {c['decision_flips']} "
        f"(one grey level: {c['noise_flips']})"
    ]
    for name, f in c["findings"].items():
        lo, hi = f["auroc_band"]
        parts.append(
            f"{name}: AUROC {f['auroc_reference']:.4f} -> {f['auroc_candidate']:.4f} "
            f"(interval {lo:.4f}-{hi:.4f}), ECE {f['ece_reference']:.4f} -> "
            f"{f['ece_candidate']:.4f}"
        )
    s, n = c["score_change"], c["noise_score_change"]
    parts.append(
        f"score change p50 {s['p50']:.4f} p99 {s['p99']:.4f} max {s['max']:.4f} "
        f"(one grey level: {n['p50']:.4f} {n['p99']:.4f} {n['max']:.4f})"
    )
    return "; ".join(parts)


def describe(result: OptimizeResult) -> str:
    """One line: what was kept and the gate's figures."""
    c = result.check
    how = ""
    if c.get("finetune_epochs"):
        how = f" (fine-tuned {c['finetune_epochs']} epochs, ranges at {c['finetune_range_lr']:g})"
    return f"{result.runtime} {result.precision}{how} holds the accuracy gate on {figures(c)}"


def grey_level_noise(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """The uint8 ``images`` with each pixel moved by at most one grey level, about half
    of them by one (seeded): how far a model's scores move under it says how stable they
    are before any runtime changes them."""
    rng = np.random.default_rng(seed)
    step = np.rint(rng.uniform(-1, 1, images.shape)).astype(np.int16)
    return np.clip(images.astype(np.int16) + step, 0, 255).astype(np.uint8)


def labelled_images(ckpt: Checkpoint, data: str, settings, max_images: int):
    """DATA's labelled images decoded as scoring decodes them, and their truth: 0/1 for
    the positive class, or per finding (multi-label)."""
    from meddx.imaging.decode import DecodeSettings, decode_images
    from meddx.inputs import listing, reading

    if ckpt.multi_label:
        items = listing.labelled_findings(data, settings, list(ckpt.class_names))
    else:
        items = listing.labelled_inputs(data, settings)
    items = items[:max_images]
    if not items:
        raise MeddxError(f"no labelled images under {data}")
    read = reading.read_uris([u for u, _ in items], settings)
    batch = {
        "image_uri": np.array([u for u, _ in items], dtype=object),
        "bytes": np.array([b for b, _ in read], dtype=object),
        "read_error": np.array([e for _, e in read], dtype=object),
    }
    decoded = decode_images(batch, DecodeSettings(size=ckpt.input_size, modalities=None))
    ok = decoded["status"] == "ok"
    if not ok.any():
        raise MeddxError(f"none of the images under {data} could be decoded")
    if ckpt.multi_label:
        truth = np.array([t for (_, t), k in zip(items, ok, strict=True) if k], dtype=np.float32)
    else:
        truth = np.array(
            [float(lbl == ckpt.positive_class) for (_, lbl), k in zip(items, ok, strict=True) if k]
        )
    return decoded["image"][ok], truth


def model_inputs(ckpt: Checkpoint, images: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S) -> the normalised float (N, 3, S, S) the model takes."""
    import torch

    from meddx.imaging.transforms import to_model_input

    mean, std = torch.tensor(ckpt.mean), torch.tensor(ckpt.std)
    x = to_model_input(torch.from_numpy(images), mean, std)
    return x.contiguous().numpy()
