"""`make bench-runtimes`: CPU inference runtimes side by side on the same model.

    python benchmarks/runtimes.py                   # resnet18 and densenet121, 10 s each
    python benchmarks/runtimes.py --models resnet18 --seconds 5

Model only: no decoding, no Ray, no meddx scoring. For each model (torchvision, random
weights, num_classes=2, torch.manual_seed(0); meddx never downloads weights), 224 px,
batch 32, every core (os.cpu_count()), images/s of:
  torch       eager fp32, channels_last, torch.inference_mode;
  openvino    fp32: ov.convert_model with a dynamic batch, compiled with the LATENCY hint,
              f32 inference precision and one thread per core (as meddx's predictor);
  openvino    int8: nncf.quantize of that model (fast_bias_correction=False, as
              `meddx optimize`), compiled the same way;
  onnxruntime fp32: torch.onnx.export (dynamic batch axis, opset 18), CPUExecutionProvider,
              intra_op_num_threads = cores, ORT_ENABLE_ALL;
  onnxruntime int8: quant_pre_process, then quantize_static (QDQ, per-channel QInt8
              weights, MinMax calibration) once with QUInt8 and once with QInt8
              activations (one calibration, cached and shared by both).
Calibration uses 300 synthetic chest films (meddx.synthetic.chest.render at 224 px, normalised as
meddx's models take them); 64 more films (other indices) are held out, and every row
but torch's reports the largest |probability difference| from torch fp32's softmax on
them. Weights are random, so the differences show numerical closeness, not the accuracy
of a trained model (`meddx optimize` gates int8 on a trained checkpoint).

Each runtime gets its batch ready in the layout it takes (channels_last for torch, NCHW
for the others) before timing; one warm-up call, then calls until --seconds have passed.
Each row also reports the CPU time other processes (and the hypervisor) took meanwhile,
from /proc/stat: on a small shared machine that is what makes a figure low.
Prints one table, the CPU (model name, SIMD flags) and the library versions, and writes
benchmarks/results/runtimes-cpu<N>-<date>.json. No network: OpenVINO's telemetry is
blocked as meddx blocks it.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torchvision

from meddx.imaging.transforms import to_model_input
from meddx.model.registry import IMAGENET_MEAN, IMAGENET_STD
from meddx.synthetic.chest import render

# No usage reports from OpenVINO's converter or NNCF (importing meddx did this too);
# openvino and nncf are imported below, inside the functions that use them.
sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]

MODELS = ("resnet18", "densenet121")
SIZE = 224
BATCH = 32
CALIBRATION = 300
HELD_OUT = 64
SEED = 0  # torch.manual_seed for the weights, and the synthetic films' seed
OPSET = 18  # torch.onnx's exporter has no opset 17 of its own (down-conversion fails)
ORT_CALIBRATION_BATCH = 10
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx")
PACKAGES = (
    "torch",
    "torchvision",
    "openvino",
    "nncf",
    "onnxruntime",
    "onnx",
    "onnxscript",
    "numpy",
)


def films(start: int, n: int) -> np.ndarray:
    """Synthetic chest films ``start .. start+n-1`` as the model's float input (N, 3, S, S),
    NCHW-contiguous; about half carry the opacity finding."""
    positive = np.random.default_rng([SEED, start, n]).random(n) < 0.5
    pixels = np.stack(
        [render(start + i, positive=bool(p), size=SIZE, seed=SEED) for i, p in enumerate(positive)]
    )
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return to_model_input(torch.from_numpy(pixels), mean, std).contiguous().numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def throughput(call, x, seconds: float) -> dict:
    """One warm-up call, then calls on ``x`` until ``seconds`` have passed."""
    call(x)
    times = []
    busy0, own0 = cpu_busy_s(), time.process_time()
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    others = cpu_busy_s() - busy0 - (time.process_time() - own0)
    return {
        "images_per_s": len(times) * len(x) / elapsed,
        "calls": len(times),
        "seconds": elapsed,
        "batch_ms_p50": 1000 * statistics.median(times),
        "batch_ms_min": 1000 * min(times),
        "best_call_images_per_s": len(x) / min(times),  # the least disturbed call
        # CPU time others used meanwhile (other processes, the hypervisor's steal), as a
        # share of all cores: above a few percent the figure is low.
        "others_cpu_pct": round(max(0.0, 100 * others / (elapsed * (os.cpu_count() or 1))), 1),
    }


def cpu_busy_s() -> float:
    """Seconds all CPUs spent busy (not idle, not waiting for I/O) since boot."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    guest = sum(fields[8:10])  # already counted in user and nice
    return (sum(fields) - idle - guest) / os.sysconf("SC_CLK_TCK")


def batched(call, x: np.ndarray) -> np.ndarray:
    return np.concatenate([call(x[i : i + BATCH]) for i in range(0, len(x), BATCH)])


def torch_runtime(model, cores: int):
    torch.set_num_threads(cores)
    eager = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def call(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return eager(x).numpy()

    return call


def openvino_compile(ov_model, cores: int):
    import openvino as ov

    config = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
        "INFERENCE_NUM_THREADS": cores,
    }
    compiled = ov.Core().compile_model(ov_model, "CPU", config)
    request = compiled.create_infer_request()
    output = compiled.output(0)

    def call(x: np.ndarray) -> np.ndarray:
        return request.infer({0: x}, share_inputs=True)[output].copy()

    return call


def openvino_convert(model):
    import openvino as ov

    with torch.no_grad():
        return ov.convert_model(
            model,
            example_input=torch.zeros(1, 3, SIZE, SIZE),
            input=[ov.PartialShape([-1, 3, SIZE, SIZE])],
        )


def openvino_int8(ov_model, calibration: np.ndarray):
    import nncf

    data = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    return nncf.quantize(ov_model, data, subset_size=len(calibration), fast_bias_correction=False)


def onnx_export(model, path: Path) -> None:
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, SIZE, SIZE),),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        opset_version=OPSET,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,
        verbose=False,
    )


def ort_session(path: Path, cores: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = cores
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def call(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    return call


def ort_int8(fp32: Path, out: Path, calibration: np.ndarray, activation: str, cache: Path):
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rewind()

        def get_next(self):
            return next(self.batches, None)

        def rewind(self):
            self.batches = iter(
                {"input": calibration[i : i + ORT_CALIBRATION_BATCH]}
                for i in range(0, len(calibration), ORT_CALIBRATION_BATCH)
            )

    quantize_static(
        str(fp32),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=getattr(QuantType, activation),
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        calibration_cache_path=str(cache),
    )


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = info.splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    flags = set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))
    amx = sorted(f for f in flags if f.startswith("amx"))
    return {
        "cpu": cpu or platform.processor(),
        "cpus": os.cpu_count(),
        "flags": {f: (bool(amx) if f == "amx" else f in flags) for f in CPU_FLAGS},
        "amx_flags": amx,
        "python": platform.python_version(),
    }


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def bench_model(name: str, args, calibration, held_out, tmp: Path) -> list[dict]:
    cores = os.cpu_count() or 1
    torch.manual_seed(SEED)
    model = getattr(torchvision.models, name)(weights=None, num_classes=2).eval()
    x = held_out[:BATCH]
    with torch.inference_mode():
        reference = softmax(batched(lambda b: model(torch.from_numpy(b)).numpy(), held_out))

    rows: list[dict] = []

    def measure(runtime: str, precision: str, build, layout=lambda b: b, **extra) -> None:
        row = {"model": name, "runtime": runtime, "precision": precision, **extra}
        print(f"-- {name} {runtime} {precision}", flush=True)
        try:
            t0 = time.perf_counter()
            call = build()
            row["prepare_s"] = round(time.perf_counter() - t0, 1)
            row.update(throughput(call, layout(x), args.seconds))
            if runtime != "torch":
                probs = softmax(batched(lambda b: call(layout(b)), held_out))
                row["max_prob_diff"] = float(np.abs(probs - reference).max())
        except Exception as exc:  # one runtime failing must not hide the others' figures
            traceback.print_exc()
            row["error"] = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        rows.append(row)

    def channels_last(b: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(b).contiguous(memory_format=torch.channels_last)

    measure(
        "torch",
        "fp32",
        lambda: torch_runtime(model, cores),
        layout=channels_last,
        settings="eager, channels_last, inference_mode",
    )

    ov_fp32 = {}

    def build_ov_fp32():
        ov_fp32["model"] = openvino_convert(model)
        return openvino_compile(ov_fp32["model"], cores)

    measure("openvino", "fp32", build_ov_fp32)
    measure(
        "openvino",
        "int8",
        lambda: openvino_compile(openvino_int8(ov_fp32["model"], calibration), cores),
        settings=f"nncf.quantize, fast_bias_correction=False, {CALIBRATION} films",
    )

    onnx_fp32 = tmp / f"{name}.onnx"
    prepared = tmp / f"{name}-pre.onnx"
    cache = tmp / f"{name}-calibration.json"

    def build_ort_fp32():
        onnx_export(model, onnx_fp32)
        return ort_session(onnx_fp32, cores)

    measure("onnxruntime", "fp32", build_ort_fp32, settings=f"opset {OPSET}")

    def build_ort_int8(activation: str):
        from onnxruntime.quantization.shape_inference import quant_pre_process

        if not prepared.exists():
            quant_pre_process(str(onnx_fp32), str(prepared))
        out = tmp / f"{name}-int8-{activation}.onnx"
        ort_int8(prepared, out, calibration, activation, cache)
        return ort_session(out, cores)

    for activation in args.ort_activations:
        measure(
            "onnxruntime",
            "int8",
            lambda a=activation: build_ort_int8(a),
            settings=f"QDQ, per-channel, {activation} activations, QInt8 weights, MinMax",
            activation=activation,
        )

    base = next(
        (r["images_per_s"] for r in rows if r["runtime"] == "torch" and "error" not in r), None
    )
    ort8 = [r for r in rows if r["runtime"] == "onnxruntime" and r["precision"] == "int8"]
    ok = [r for r in ort8 if "error" not in r]
    for r in rows:
        if base and "images_per_s" in r:
            r["x_torch_fp32"] = r["images_per_s"] / base
        if r in ort8:
            r["fastest_ort_int8"] = bool(ok) and r is max(ok, key=lambda s: s["images_per_s"])
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'model':<12} {'runtime':<12} {'precision':<16} {'images/s':>9} {'x torch':>8} "
    head += f"{'max prob diff':>14} {'best call':>9} {'others':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        precision = r["precision"]
        if "activation" in r:
            precision += f" ({'U8' if r['activation'] == 'QUInt8' else 'S8'}S8)"
            precision += "*" if r.get("fastest_ort_int8") else ""
        if "error" in r:
            lines.append(
                f"{r['model']:<12} {r['runtime']:<12} {precision:<16} failed: {r['error']}"
            )
            continue
        diff = f"{r['max_prob_diff']:.2e}" if "max_prob_diff" in r else "(reference)"
        lines.append(
            f"{r['model']:<12} {r['runtime']:<12} {precision:<16} {r['images_per_s']:>9.1f} "
            f"{r.get('x_torch_fp32', float('nan')):>7.2f}x {diff:>14} "
            f"{r['best_call_images_per_s']:>9.1f} {r['others_cpu_pct']:>6.1f}%"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed calls per runtime")
    parser.add_argument(
        "--ort-activations",
        default="QUInt8,QInt8",
        help="ORT int8 activation types to try (QUInt8, QInt8)",
    )
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: see doc)")
    args = parser.parse_args()
    args.ort_activations = [a.strip() for a in args.ort_activations.split(",") if a.strip()]
    names = [m.strip() for m in args.models.split(",") if m.strip()]

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    info = machine()
    libs = versions()
    started = time.perf_counter()
    t0 = time.perf_counter()
    calibration = films(0, CALIBRATION)
    held_out = films(CALIBRATION, HELD_OUT)
    print(f"rendered {CALIBRATION}+{HELD_OUT} films in {time.perf_counter() - t0:.1f} s")

    rows = []
    with tempfile.TemporaryDirectory(prefix="meddx-runtimes-") as tmp:
        for name in names:
            rows += bench_model(name, args, calibration, held_out, Path(tmp))

    flags = " ".join(f"{f}={'yes' if v else 'no'}" for f, v in info["flags"].items())
    print()
    print(f"CPU: {info['cpu']}, {info['cpus']} cores; {flags}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in libs.items()))
    print(f"batch {BATCH}, {SIZE} px, {cores} threads, {args.seconds:g} s per runtime")
    print()
    print(table(rows))
    if any("activation" in r for r in rows):
        print("* fastest ORT int8 activation type for the model (U8S8: QUInt8 activations)")
    print("best call: images/s of the fastest single call (the least disturbed one)")
    print(
        "others: CPU time other processes (and the hypervisor's steal) took while it was timed,"
        " as a share of all cores; above a few percent that figure is low"
    )

    date = dt.date.today().isoformat()
    out = args.out or Path("benchmarks/results") / f"runtimes-cpu{info['cpus']}-{date}.json"
    result = {
        "date": date,
        "machine": info,
        "versions": libs,
        "settings": {
            "models": names,
            "image_size": SIZE,
            "batch": BATCH,
            "threads": cores,
            "seconds": args.seconds,
            "seed": SEED,
            "calibration": (
                f"{CALIBRATION} synthetic films (meddx.synthetic.chest.render, seed {SEED})"
            ),
            "held_out": f"{HELD_OUT} synthetic films, indices {CALIBRATION}+",
            "onnx_opset": OPSET,
            "ort_calibration_batch": ORT_CALIBRATION_BATCH,
        },
        "rows": rows,
        "total_s": round(time.perf_counter() - started, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
