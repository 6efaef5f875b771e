"""What a bench run tells: progress on stderr, the machine it ran on, the result file
under benchmarks/results and the printed summary of bench.py's run."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torchvision

STARTED = time.perf_counter()


def log(message: str) -> None:
    """Progress on stderr, with the seconds since the start."""
    print(f"[{time.perf_counter() - STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


# SIMD flags that decide decode and inference speed on the CPU.
CPU_FLAGS = ("avx", "amx", "fma", "f16c", "sse4")


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = info.splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    gpu = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu or platform.processor(),
        "cpus": os.cpu_count(),
        "cpu_flags": sorted(f for f in flags if f.startswith(CPU_FLAGS)),
        "native_bf16": bool(set(flags) & {"avx512_bf16", "amx_bf16"}),
        "gpu": gpu.name if gpu else None,
        "gpu_memory_gib": round(gpu.total_memory / 2**30, 1) if gpu else None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def write_result(result: dict, kind: str) -> None:
    print(json.dumps(result, indent=2))
    host = result["machine"]["gpu"] or f"cpu{result['machine']['cpus']}"
    source = result.get("source")
    parts = [host, result["model"], result.get("preset"), source != "both" and source]
    name = "-".join(str(p).replace(" ", "-") for p in [*parts, result["date"]] if p)
    path = Path("benchmarks/results") / f"{kind}{name}.json"
    # A second run the same day gets -b, -c, ...: results already kept stay as they are.
    for suffix in "bcdefghijklmnopqrstuvwxyz":
        if not path.exists():
            break
        path = path.with_name(f"{kind}{name}-{suffix}.json")
    if path.exists():
        raise SystemExit(f"{path} and the day's 25 before it exist: move some away")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def print_summary(r: dict) -> None:
    """The run's figures in a few lines (the JSON has them all)."""
    m, a, picked = r["machine"], r["a_ceiling"], r["precision_auto_picks"]
    print(f"\n{r['preset']}: {r['n']} films of {r['size']} px, {r['model']}")
    print(f"machine: {m['cpu']} x {m['cpus']} ({' '.join(m['cpu_flags'])}); GPU {m['gpu']}")
    print(f"(a) ceiling        fp32 {a['fp32']:.1f}, {picked} {a['picked']:.1f} images/s")
    if "ood_cost" in a:
        print(
            f"    predictor stage without / with ood_score"
            f" {a['predictor_images_per_s_without_ood']:.1f} /"
            f" {a['predictor_images_per_s_with_ood']:.1f} images/s"
            f" (cost {a['ood_cost']:.1%})"
        )
    if "openvino_fp32" in a:
        gate = a["openvino_int8_gate"]
        gated = a.get("openvino_gated")
        kept = f"{a['openvino_gated_precision']} {gated:.1f}" if gated else "none"
        print(
            f"    OpenVINO       fp32 {a['openvino_fp32']:.1f}, int8 (plain PTQ)"
            f" {a['openvino_int8_ptq']:.1f} images/s"
            f" ({a['openvino_int8_ptq'] / a['fp32_eager']:.2f}x torch fp32 eager);"
            f" kept by meddx optimize: {kept}"
        )
        print(f"    gate: {gate}")
    loops = ", ".join(f"{k} {v:.1f}" for k, v in r["b_users_loop"].items())
    print(f"(b) users' loop    {loops} images/s")
    for source, c in r["c_meddx_score"].items():
        q = r["ratios"][source]
        fp32, best = c["fp32"]["images_per_s"], c["picked"]["images_per_s"]
        print(
            f"(c) meddx {source:5s}    fp32 {fp32:.1f}, {picked} {best:.1f} images/s;"
            f" c/a {q['c_fp32_over_a_fp32']}, {q['c_picked_over_a_picked']};"
            f" c/b {q['c_fp32_over_b_best']}, {q['c_picked_over_b_best']};"
            f" cores busy {c['fp32'].get('core_busy')}, {c['picked'].get('core_busy')}"
        )
        for name, run in c.items():
            print(f"    core-seconds of {name} ({run['rows']} films): {run['core_seconds']}")
        if "fp32_long" in c:
            long = c["fp32_long"]
            print(
                f"    fp32, {long['rows']} films: {long['images_per_s']:.1f} images/s"
                f" (pipeline {long['pipeline']:.1f}); c/a {q['c_fp32_long_over_a_fp32']},"
                f" c/b {q['c_fp32_long_over_b_best']}; cores busy {long['core_busy']}"
            )
        if "runtime_auto" in c:
            auto = c["runtime_auto"]["images_per_s"]
            print(
                f"    --runtime auto (OpenVINO {a['openvino_gated_precision']})"
                f" {auto:.1f} images/s;"
                f" / a fp32 {q['c_runtime_auto_over_a_fp32']};"
                f" / b {q['c_runtime_auto_over_b_best']}"
            )
    if r.get("start_up_10"):
        secs = r["start_up_10"]["whole_command_seconds"]
        print(f"    10 images, whole command, fp32: {', '.join(f'{v:.1f}' for v in secs)} s")
    for source, d in r["d_decode_only"].items():
        c_over_d = r["ratios"][source]["c_picked_over_d"]
        print(f"(d) decode {source:5s}   {d:.1f} images/s; c/d {c_over_d}")
    if "train_images_per_s" in r:
        print(f"(e) training       {r['train_images_per_s']} images/s")
    print("decode ms p50, one core: format share MB/film meddx users' loop")
    for fmt, row in r["decode_ms_p50_one_core"].items():
        print(
            f"  {fmt:16s} {row['share']:5.2f} {row['mb_per_film']:6.2f}"
            f" {row['meddx_p50_ms']:7.1f} {row['users_loop_p50_ms']:7.1f}"
            f" ({row['users_loop_over_meddx']}x)"
        )
