"""The int8 gate's figures on a trained model: ways of quantizing it, each with the
largest score change against torch fp32 on the held-out half of the mix's first 240
films (docs/benchmarks.md, "Start-up, 16-bit PNG and the int8 gate").

    python benchmarks/int8_variants.py [MODEL [SIZE [VARIANT,...]]]
    AC=ac MAXDROP=0.0125 python benchmarks/int8_variants.py resnet18 224 none  # accuracy control
    AC=ac_smooth50 python benchmarks/int8_variants.py densenet121 224 none  # after SmoothQuant
    SPEED=1 python benchmarks/int8_variants.py densenet121 224 smooth50_ignore_fc  # and img/s
    python benchmarks/int8_variants.py densenet121 224 finetune5  # quantization-aware
    EXTRA=data/more python benchmarks/int8_variants.py densenet121 224 finetune3_extra
    KEEP=smooth50_nobc_ignore_fc KS=1,8,32 python benchmarks/int8_variants.py densenet121 224 none
        # the k convolutions whose return to fp32 helps most, kept in fp32, for each k

Needs the mix archive `make bench` renders (benchmarks/.cache/mix-240-2400x2800).
"""

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nncf
import openvino as ov
from ceilings import trained
from fake_quantize import keeping_only, quantized_convs, reverting, within
from film_archive import first_films_manifest
from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters as AQP
from nncf.quantization.advanced_parameters import AdvancedSmoothQuantParameters as SQP
from nncf.quantization.range_estimator import RangeEstimatorParametersSet as RE
from sklearn.metrics import roc_auc_score

from meddx.inputs.storage import StorageSettings
from meddx.model import optimize, registry
from meddx.model.forward import inference_model, probabilities, probs_from_logits

torch.set_num_threads(2)
model_name = sys.argv[1] if len(sys.argv) > 1 else "resnet18"
size = int(sys.argv[2]) if len(sys.argv) > 2 else 224
cache = Path(__file__).resolve().parent / ".cache"
# AUG=1: a model trained with meddx train's augmentation (EPOCHS of them, default 4);
# AUG=1 NOISE=0.01: and Gaussian noise of that standard deviation (1 = white) on top.
aug = "-aug" if os.environ.get("AUG") else ""
noise_sd = float(os.environ.get("NOISE", "0"))
aug += f"-noise{noise_sd:g}" if aug and noise_sd else ""
# TRAIN=folder: the model trained on that synth archive's films instead of the mix's
# 240, which it is then checked on (films it never saw).
train_on = os.environ.get("TRAIN")
aug += f"-{Path(train_on).name}" if train_on else ""


def augment(x: torch.Tensor) -> torch.Tensor:
    from meddx.imaging.transforms import TrainAugment

    out = TrainAugment()(x)
    return (out + noise_sd * torch.randn_like(out)).clamp(0, 1) if noise_sd else out


ck_path = cache / f"gate-{model_name}-{size}-trained{aug}.pt"
img_path = cache / f"gate-{model_name}-{size}-images.npz"
folder = cache / "mix-240-2400x2800"
manifest = first_films_manifest(folder, 240, cache)
t = time.time()
if ck_path.exists():
    ck, _ = registry.read_checkpoint(str(ck_path), StorageSettings())
    z = np.load(img_path)
    images, truth = z["images"], z["truth"]
else:
    ck0 = registry.untrained_checkpoint(model_name, input_size=size)
    # LR: densenet121 at 1e-3 collapsed to one score on a Xeon with AMX (AUROC 0.5).
    ck, images = trained(
        ck0,
        Path(train_on, "_manifest.csv") if train_on else manifest,
        int(os.environ.get("EPOCHS", "4")),
        float(os.environ.get("LR", "1e-3")),
        augment=augment if aug else None,
    )
    images, truth = optimize.labelled_images(ck, str(manifest), StorageSettings(), 10**6)
    registry.save_checkpoint(ck, str(ck_path), StorageSettings())
    np.savez(img_path, images=images, truth=truth)
print("trained/loaded", round(time.time() - t), "s", len(images), flush=True)
ref = probabilities(ck, images)
print(
    "auroc",
    roc_auc_score(truth, ref[:, list(ck.class_names).index(ck.positive_class)]),
    "p in (0.05,0.95):",
    int(((ref[:, 1] > 0.05) & (ref[:, 1] < 0.95)).sum()),
    flush=True,
)
X = optimize.model_inputs(ck, images)
tune, held = slice(0, None, 2), slice(1, None, 2)
# For scale: torch fp32's own scores when each pixel moves by at most one grey level.
noise = np.abs(probabilities(ck, optimize.grey_level_noise(images)) - ref).max(axis=1)
print(
    f"one grey level of noise: held max {noise[held].max():.4f}"
    f" p99 {np.quantile(noise[held], 0.99):.4f} mean {noise[held].mean():.4f}",
    flush=True,
)
base = ov.convert_model(
    registry.features_model(ck),
    example_input=torch.zeros(1, 3, size, size),
    input=[ov.PartialShape([-1, 3, size, size])],
)
core = ov.Core()


def probs(logits: np.ndarray) -> np.ndarray:
    return probs_from_logits(logits, ck.multi_label, ck.temperatures)


def evaluate(m, precision="f32"):
    c = core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": precision})
    o = c.output(0)
    p = np.concatenate([probs(c(X[i : i + 32])[o]) for i in range(0, len(X), 32)])
    d = np.abs(p - ref).max(axis=1)
    dh, dt = d[held], d[tune]
    top = np.argsort(-dh)[:3]
    worst = [round(float(ref[held][i, 1]), 3) for i in top]
    return (
        f"held max {dh.max():.4f} p99 {np.quantile(dh, 0.99):.4f} mean {dh.mean():.4f}"
        f" | tune max {dt.max():.4f} | worst refs {worst}"
    )


names = [n.get_friendly_name() for n in base.get_ops()]
convs = [
    n.get_friendly_name() for n in base.get_ops() if n.get_type_name() in ("Convolution", "MatMul")
]
print("convs/matmuls", len(convs), convs[0], convs[-1], flush=True)


def q(cal, **kw):
    ds = nncf.Dataset([cal[i : i + 1] for i in range(len(cal))])
    kw.setdefault("fast_bias_correction", False)
    return nncf.quantize(base.clone(), ds, subset_size=min(300, len(cal)), **kw)


def head_fp32(**kw):
    """Quantized on the tuning half with the classifier head left in fp32."""
    return q(X[tune], ignored_scope=nncf.IgnoredScope(names=[convs[-1]]), **kw)


def extra() -> np.ndarray:
    """Model inputs of the films under EXTRA (env), up to EXTRA_N of them."""
    films, _ = optimize.labelled_images(
        ck, os.environ["EXTRA"], StorageSettings(), int(os.environ.get("EXTRA_N", "720"))
    )
    print("extra films", len(films), flush=True)
    return optimize.model_inputs(ck, films)


def plain_finetune(epochs: int, inputs: np.ndarray):
    """optimize.finetuned as it was first measured: from plain quantization, with the
    quantizers' ranges at the weights' rate."""
    return optimize.finetuned(
        registry.features_model(ck), inputs, epochs, optimize.FINETUNE_LR, smooth_quant=0
    )


def smoothed_finetune(epochs: int, inputs: np.ndarray, range_lr: float = optimize.FINETUNE_LR):
    """optimize.finetuned from SmoothQuant (alpha 0.5), with the ranges at ``range_lr``
    (meddx optimize's own: FINETUNE_RANGE_LR)."""
    return optimize.finetuned(registry.features_model(ck), inputs, epochs, range_lr, 0.5)


variants = {
    "default_tune": lambda: q(X[tune]),
    "default_all": lambda: q(X),
    "ignore_fc": head_fp32,
    "ignore_first_fc": lambda: q(
        X[tune], ignored_scope=nncf.IgnoredScope(names=[convs[0], convs[-1]])
    ),
    "mixed_ignore_fc": lambda: head_fp32(preset=nncf.QuantizationPreset.MIXED),
    **{
        f"{name.lower()}_ignore_fc": (
            lambda ranges=ranges: head_fp32(
                advanced_parameters=AQP(activations_range_estimator_params=ranges)
            )
        )
        for name, ranges in (
            ("MEAN_QUANTILE", RE.MEAN_QUANTILE),
            ("MEAN_MINMAX", RE.MEAN_MINMAX),
            ("HISTOGRAM", RE.HISTOGRAM),
        )
    },
    "channel_alignment_ignore_fc": lambda: head_fp32(
        advanced_parameters=AQP(disable_channel_alignment=False)
    ),
    # densenet121 with one or more of its parts kept in fp32: where its quantization error
    # comes from, and what int8 then leaves of the speed.
    **{
        f"fp32_{'_'.join(parts)}_fc": (
            lambda parts=parts: q(
                X[tune], ignored_scope=nncf.IgnoredScope(names=[convs[-1], *within(base, parts)])
            )
        )
        for parts in (
            ("denseblock1",),
            ("denseblock2",),
            ("denseblock3",),
            ("denseblock4",),
            ("transition3", "denseblock4"),
            ("denseblock3", "transition3", "denseblock4"),
        )
    },
    # Quantization-aware fine-tuning (meddx optimize --finetune-epochs N) on the tuning half.
    **{
        f"finetune{n}": (lambda n=n: optimize.to_openvino(plain_finetune(n, X[tune]), size))
        for n in (2, 5, 10)
    },
    # The quantizers' ranges learning faster than the weights (LSQ-like), from SmoothQuant.
    **{
        f"finetune3_smooth50_range{lr:g}": (
            lambda lr=lr: optimize.to_openvino(smoothed_finetune(3, X[tune], lr), size)
        )
        for lr in (1e-4, 1e-3, 1e-2)
    },
    # The same on the tuning half and its mirror images: twice the films to distil on.
    "finetune3_flipped": lambda: optimize.to_openvino(
        plain_finetune(3, np.concatenate([X[tune], X[tune][..., ::-1]])),
        size,
    ),
    # The tuning half and EXTRA's films (another meddx synth archive, decoded as scoring
    # decodes): more films to distil on than the 120 the model was fitted to imitate.
    **{
        f"finetune{n}_extra": (
            lambda n=n: optimize.to_openvino(
                plain_finetune(n, np.concatenate([X[tune], extra()])),
                size,
            )
        )
        for n in (2, 3, 5)
    },
    # Fine-tuning that starts from SmoothQuant (alpha 0.5) instead of plain quantization,
    # on the tuning half, or on it and EXTRA's films.
    **{
        f"finetune{n}_smooth50{'_extra' * more}": (
            lambda n=n, more=more: optimize.to_openvino(
                smoothed_finetune(n, np.concatenate([X[tune], extra()]) if more else X[tune]),
                size,
            )
        )
        for n in (3, 5, 8)
        for more in (False, True)
    },
    # SmoothQuant on convolutions: per input channel, range moves from activations to
    # weights (NNCF runs it only for its TRANSFORMER model type).
    **{
        f"smooth{int(alpha * 100)}_ignore_fc": (
            lambda alpha=alpha: head_fp32(
                model_type=nncf.ModelType.TRANSFORMER,
                advanced_parameters=AQP(smooth_quant_alphas=SQP(convolution=alpha, matmul=-1)),
            )
        )
        for alpha in (0.3, 0.5, 0.8)
    },
    # The same without bias correction: a layer returned to fp32 (KEEP below) is then
    # exactly the fp32 model's, as no bias of it was moved to make up for int8.
    "smooth50_nobc_ignore_fc": lambda: head_fp32(
        model_type=nncf.ModelType.TRANSFORMER,
        advanced_parameters=AQP(
            smooth_quant_alphas=SQP(convolution=0.5, matmul=-1), disable_bias_correction=True
        ),
    ),
    # The same at alpha 0.5 with NNCF's fast bias correction (less memory and time).
    "smooth50_fastbc_ignore_fc": lambda: head_fp32(
        model_type=nncf.ModelType.TRANSFORMER,
        fast_bias_correction=True,
        advanced_parameters=AQP(smooth_quant_alphas=SQP(convolution=0.5, matmul=-1)),
    ),
}
only = sys.argv[3].split(",") if len(sys.argv) > 3 else list(variants)
print("fp32 IR:", evaluate(base), flush=True)
quantized = {}
for name in only:
    t = time.time()
    try:
        quantized[name] = variants[name]()
        print(f"{name:24s}", evaluate(quantized[name]), f"({time.time() - t:.0f}s)", flush=True)
    except Exception as e:
        print(name, "failed", repr(e)[:300], flush=True)


def speed(m, seconds=8, precision="f32"):
    c = core.compile_model(
        m,
        "CPU",
        {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": 2,
        },
    )
    return rate(c, np.ascontiguousarray(X[:32]), seconds)


def torch_speed(seconds=8):
    m = inference_model(ck, torch.device("cpu")).eval()
    x = torch.from_numpy(np.ascontiguousarray(X[:32])).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return rate(m, x, seconds)


def rate(run, x, seconds) -> float:
    """Images per second of ``run`` on the batch ``x``, after one warm-up call."""
    run(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        run(x)
        n += len(x)
    return round(n / (time.perf_counter() - t0), 1)


def ac(cal_idx, ignored, **kw):
    ds = nncf.Dataset([X[cal_idx][i : i + 1] for i in range(len(X[cal_idx]))])
    ref_t = ref[cal_idx]
    Xt = X[cal_idx]
    check = nncf.Dataset([(Xt[i : i + 1], ref_t[i]) for i in range(len(Xt))])

    def closeness(compiled, data):
        out = compiled.output(0)
        diffs = [float(np.abs(probs(compiled(x)[out])[0] - r).max()) for x, r in data]
        return 1 - max(diffs), [1 - d for d in diffs]

    return nncf.quantize_with_accuracy_control(
        base.clone(),
        ds,
        check,
        validation_fn=closeness,
        max_drop=float(os.environ.get("MAXDROP", "0.015")),
        drop_type=nncf.DropType.ABSOLUTE,
        subset_size=300,
        # ACFAST=1: NNCF's fast bias correction (SmoothQuant with the full one took
        # over 24 GiB on densenet121).
        fast_bias_correction=bool(os.environ.get("ACFAST")),
        ignored_scope=nncf.IgnoredScope(names=ignored) if ignored else None,
        **kw,
    )


if os.environ.get("SPEED"):  # images/s of each variant, beside torch fp32's, one run
    print("torch fp32 img/s", torch_speed(), flush=True)
    for name, m in quantized.items():
        print(f"{name:24s} img/s", speed(m), flush=True)

if "ac" in os.environ.get("AC", ""):
    # AC=ac_smooth50: accuracy control after SmoothQuant on convolutions at alpha 0.5.
    smooth = os.environ["AC"].partition("smooth")[2]
    smoothing = (
        {
            "model_type": nncf.ModelType.TRANSFORMER,
            "advanced_quantization_parameters": AQP(
                smooth_quant_alphas=SQP(convolution=int(smooth) / 100, matmul=-1)
            ),
        }
        if smooth
        else {}
    )
    for label, ign in (("ac_ignore_fc", [convs[-1]]), ("ac_no_ignore", None))[
        int(os.environ.get("ACFROM", "0")) : int(os.environ.get("ACTO", "1"))
    ]:
        t = time.time()
        m = ac(tune, ign, **smoothing)
        fq = sum(1 for n in m.get_ops() if n.get_type_name() == "FakeQuantize")
        print(f"{label:24s}", evaluate(m), f"FQ {fq} ({time.time() - t:.0f}s)", flush=True)
        print("speed int8 img/s", speed(m), "torch fp32", torch_speed(), flush=True)


def tune_error(m) -> float:
    """The mean of the five largest score changes on the tuning half: what reverting a
    layer is ranked by (the held-out half is only ever reported)."""
    c = core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    o = c.output(0)
    Xt = X[tune]
    p = np.concatenate([probs(c(Xt[i : i + 32])[o]) for i in range(0, len(Xt), 32)])
    d = np.abs(p - ref[tune]).max(axis=1)
    return float(np.sort(d)[-5:].mean())


if os.environ.get("KEEP"):
    # KEEP=finetune3_smooth50: rank that variant's quantized convolutions by how much the
    # tuning half's worst films move when each alone runs in fp32, then keep the top k in
    # fp32 for growing k; held-out figures and speed for each k.
    name = os.environ["KEEP"]
    saved = cache / f"gate-{model_name}-{size}-{name}{aug}.xml"
    if saved.exists():
        start = core.read_model(saved)
    else:
        start = quantized.get(name) or variants[name]()
        ov.save_model(start, saved, compress_to_fp16=False)
    print("start", evaluate(start), flush=True)
    layers = quantized_convs(start)
    base_err = tune_error(start)
    t = time.time()
    gains = sorted(
        ((base_err - tune_error(reverting(start, [n])), n) for n in layers), reverse=True
    )
    print(f"ranked {len(layers)} layers ({time.time() - t:.0f}s); tune top5 {base_err:.4f}")
    for g, n in gains[:12]:
        print(f"  {g:+.4f} {n}", flush=True)
    print("torch fp32 img/s", torch_speed(5), flush=True)
    for k in [int(k) for k in os.environ.get("KS", "1,2,4,8,16,32").split(",")]:
        m = reverting(start, [n for _, n in gains[:k]])
        print(f"fp32 top {k:3d}:", evaluate(m), "img/s", speed(m, 5), flush=True)


if os.environ.get("SPLIT"):
    # SPLIT=ignore_fc,...: each variant with only its weights quantized, then only its
    # activations, each against torch fp32.
    for name in os.environ["SPLIT"].split(","):
        m = quantized.get(name) or variants[name]()
        print(f"{name:24s}", evaluate(m), flush=True)
        print("  weights only          ", evaluate(keeping_only(m, weights=True)), flush=True)
        print("  activations only      ", evaluate(keeping_only(m, weights=False)), flush=True)


if os.environ.get("BF16"):
    # BF16=1: the fp32 IR run by OpenVINO in bf16 (this CPU's native bf16, if it has it)
    # and torch's bf16 autocast as the predictor runs it, against torch fp32.
    print("OpenVINO bf16           ", evaluate(base, "bf16"), flush=True)
    print("img/s: OpenVINO bf16", speed(base, 8, "bf16"), "fp32", speed(base, 8), flush=True)
    print("torch fp32 img/s", torch_speed(8), flush=True)


def rounded_weights(bits: int, part: str = "") -> torch.nn.Module:
    """The fp32 model with the weights of its convolutions (those whose name holds
    ``part``) rounded per output channel to ``bits``, symmetric, and nothing else."""
    m = registry.features_model(ck).eval()
    levels = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for name, conv in m.named_modules():
            if isinstance(conv, torch.nn.Conv2d) and part in name:
                w = conv.weight
                step = w.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12) / levels
                w.copy_((w / step).round().clamp(-levels, levels) * step)
    return m


def torch_changes(label: str, m, x: np.ndarray = X) -> None:
    with torch.inference_mode():
        t = torch.from_numpy(np.ascontiguousarray(x))
        logits = np.concatenate([m(t[i : i + 32])[0].numpy() for i in range(0, len(t), 32)])
    d = np.abs(probs(logits) - ref).max(axis=1)[held]
    print(
        f"{label:40s} held max {d.max():.4f} p99 {np.quantile(d, 0.99):.4f} mean {d.mean():.4f}",
        flush=True,
    )


if os.environ.get("ROUND"):
    # ROUND=8,7,10: torch fp32 with only its convolutions' weights rounded to those bits
    # (and, at 8 bits, only conv0's), and with the films shifted by one pixel: how
    # stable the model's own scores are, beside what int8 does to them.
    for bits in [int(b) for b in os.environ["ROUND"].split(",")]:
        torch_changes(f"convolution weights at {bits} bits", rounded_weights(bits))
    torch_changes("conv0's weights at 8 bits", rounded_weights(8, "conv0"))
    fp32 = registry.features_model(ck).eval()
    torch_changes("films shifted one pixel", fp32, np.roll(X, 1, axis=-1))
