"""`make bench-runtimes` (second part): the int8 gate on models trained as `meddx train`
trains them, on the realistic mix, and what the kept runtime buys `meddx score` through a
store of model-ready films.

    python benchmarks/int8_gate.py                      # resnet18 and densenet121
    python benchmarks/int8_gate.py --models resnet18 --epochs 1 --finetune-epochs 1 \\
        --score-n 24 --rounds 1                         # smoke

Side by side in one run, for each model:
  train  ``meddx train STORE --model M --epochs 8 --lr 3e-4`` (meddx's defaults besides:
         2 DDP workers, its augmentation, 20% validation) on a store (``meddx prepare``) of
         480 films of the realistic mix at 1,024 x 1,200 (seed 5); kept in
         benchmarks/.cache by its settings.
  gate   ``meddx optimize``'s own code (optimize.with_artefact, as the command runs it)
         with 240 other films of the mix at 2,400 x 2,800 (seed 12) as --calibration:
         tuned on 120, judged on the other 120. Post-training quantization, then
         --finetune-epochs F (which tries both range rates). Every figure of each check,
         or its refusal line.
  noise  torch fp32 under one grey level on the 120 judged films, seeds 0-4: decision
         flips, AUROC, ECE change and score change; the spread behind the gate's margin.
  kept   what ``--runtime auto`` then uses: int8 by quantization if it held, else int8
         by fine-tuning if that held, else torch. Model only, batch 32, 224 px: images/s
         of torch fp32 eager and of the kept artefact on the judged films.
  score  whole commands, each its own process with its own Ray, alternating for
         --rounds: ``meddx score STORE960 --runtime torch --precision fp32`` with the
         trained checkpoint against ``meddx score STORE960 --runtime auto`` with the kept
         one; STORE960 holds 960 films of the mix at 2,400 x 2,800 (240 rendered, the
         rest hard links), prepared once.
Writes benchmarks/results/int8-gate-<host>-<models>-<date>.json with the machine, and
prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from film_archive import archive
from meddx_runs import meddx_score, score_figures
from process_tree import meddx_env, run_meddx
from record import log, machine, write_result

from meddx import MeddxError
from meddx.inputs.storage import StorageSettings
from meddx.model import engine, gate, optimize, registry
from meddx.model.forward import probabilities

CACHE = Path(__file__).resolve().parent / ".cache"
SETTINGS = StorageSettings()


def synth_folder(role: str, n: int, size: str, seed: int) -> Path:
    """A rendered mix of its own seed (film_archive's mixes all use one seed)."""
    folder = CACHE / f"gate-{role}-mix-{n}-{size}-seed{seed}"
    if not (folder / "_manifest.csv").exists():
        log(f"writing {folder}")
        run_meddx(
            ["synth", str(folder), "--n", str(n), "--size", size, "--mix", "--seed", str(seed)],
            meddx_env(),
        )
    return folder


def store_of(folder: Path) -> Path:
    """``meddx prepare FOLDER`` once, kept beside it."""
    store, done = CACHE / f"store-{folder.name}", CACHE / f"store-{folder.name}.done"
    if not done.exists():
        log(f"meddx prepare {folder.name}")
        run_meddx(["prepare", str(folder), "--out", str(store), "--quiet"], meddx_env())
        done.write_text("prepared\n")
    return store


def train(model: str, store: Path, args) -> tuple[Path, dict]:
    path = CACHE / f"gate-{model}-{store.name}-e{args.epochs}-lr{args.lr:g}.pt"
    seconds = None
    if not path.exists():
        log(f"meddx train {model}")
        run = run_meddx(
            ["train", str(store), "--model", model, "--epochs", str(args.epochs)]
            + ["--lr", str(args.lr), "--out", str(path), "--quiet"],
            meddx_env(),
        )
        seconds = round(run["seconds"], 1)
    ckpt, _ = registry.read_checkpoint(str(path), SETTINGS)
    return path, {
        "command": f"meddx train STORE --model {model} --epochs {args.epochs} --lr {args.lr:g}",
        "seconds": seconds,
        "val_auroc": ckpt.metrics.get("val_auroc"),
        "threshold": ckpt.threshold,
        "precision_pinned": ckpt.precision,
    }


def gate_run(ckpt, images, truth, finetune_epochs: int, out: Path) -> dict:
    """One ``meddx optimize``: the check's figures, kept or refused, and its line."""
    start = time.perf_counter()
    try:
        kept, result = optimize.with_artefact(
            ckpt, images, truth, source="the check films", finetune_epochs=finetune_epochs
        )
    except optimize.GateRefused as exc:
        check, line, path = exc.result.check, str(exc), None
        precision = exc.result.precision
    else:
        registry.save_checkpoint(kept, str(out), SETTINGS)
        check, line, path = result.check, optimize.describe(result), str(out)
        precision = result.precision
    return {
        "finetune_epochs": finetune_epochs,
        "seconds": round(time.perf_counter() - start, 1),
        "holds": bool(check["holds"]),
        "precision": precision,
        "line": line,
        "check": check,
        "path": path,
    }


def noise_spread(ckpt, images, truth, reference, seeds=range(5)) -> list[dict]:
    """torch fp32 under one grey level of noise, seed by seed, on the judged films."""
    cols = [ckpt.positive_index]
    out = []
    for seed in seeds:
        noisy = probabilities(ckpt, optimize.grey_level_noise(images, seed))
        f = gate.finding_figures(
            truth, reference[:, cols[0]], noisy[:, cols[0]], noisy[:, cols[0]], ckpt.threshold
        )
        out.append(
            {
                "seed": seed,
                "decision_flips": f["decision_flips"],
                "auroc": f["auroc_candidate"],
                "ece_change": f["ece_change"],
                "score_change": gate.score_change(reference[:, cols], noisy[:, cols]),
            }
        )
    return out


def model_only(trained, kept, images, seconds: float) -> dict:
    """images/s, batch 32: torch fp32 eager against the kept artefact."""
    x = optimize.model_inputs(trained, images[:32])
    model = registry.model_from_checkpoint(trained).eval()
    xt = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)

    def rate(call) -> float:
        call()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            call()
            n += len(x)
        return n / (time.perf_counter() - start)

    with torch.inference_mode():
        out = {"torch_fp32": round(rate(lambda: model(xt)), 1)}
    if kept is not None and engine.usable(kept):
        compiled = engine.CompiledModel(kept)
        out["kept"] = round(rate(lambda: compiled(x)), 1)
        out["kept_over_torch_fp32"] = round(out["kept"] / out["torch_fp32"], 2)
    return out


def bench_model(name: str, args, train_store: Path, check: Path, store960: Path) -> dict:
    path, trained_info = train(name, train_store, args)
    ckpt, _ = registry.read_checkpoint(str(path), SETTINGS)
    images, truth = optimize.labelled_images(ckpt, str(check), SETTINGS, 10**6)
    held = slice(1, None, 2)
    reference = probabilities(ckpt, images[held])
    log(f"{name}: gate, post-training quantization")
    plain = gate_run(ckpt, images, truth, 0, CACHE / f"gate-{name}-int8.pt")
    log(f"{name}: {plain['line'][:300]}")
    log(f"{name}: gate, fine-tuned {args.finetune_epochs} epochs")
    tuned = gate_run(ckpt, images, truth, args.finetune_epochs, CACHE / f"gate-{name}-qat.pt")
    log(f"{name}: {tuned['line'][:300]}")
    noise = noise_spread(ckpt, images[held], truth[held], reference)
    kept_run = next((r for r in (plain, tuned) if r["holds"]), None)
    kept_path = kept_run["path"] if kept_run else str(path)
    kept, _ = registry.read_checkpoint(kept_path, SETTINGS)
    kept_runtime = engine.resolve_runtime("auto", kept, gpus=0)
    kept_label = (
        f"openvino {engine.artefact(kept)['precision']}"
        + (" fine-tuned" if kept_run is tuned else "")
        if kept_runtime == "openvino"
        else optimize.fallback_runtime(kept)
    )
    log(f"{name}: --runtime auto uses {kept_label}; model only")
    alone = model_only(ckpt, kept, images[held], args.model_seconds)
    rounds = []
    for r in range(args.rounds):
        log(f"{name}: score round {r + 1}: torch fp32, then --runtime auto")
        fp32 = meddx_score(
            meddx_env(), str(store960), str(path), "fp32", args=("--runtime", "torch")
        )
        auto = meddx_score(
            meddx_env(), str(store960), kept_path, "auto", args=("--runtime", "auto")
        )
        rounds.append(
            {
                "torch_fp32": score_figures(fp32),
                "runtime_auto": score_figures(auto),
                "auto_over_fp32": round(auto["images_per_s"] / fp32["images_per_s"], 3),
            }
        )
    return {
        "model": name,
        "trained": trained_info,
        "check_films": len(images),
        "plain": plain,
        "finetuned": tuned,
        "noise_seeds": noise,
        "kept": kept_label,
        "model_only": alone,
        "score": rounds,
        "score_ratio_mean": round(float(np.mean([r["auto_over_fp32"] for r in rounds])), 3),
    }


def fmt(x, digits=4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table(rows: list[dict], films: int) -> str:
    lines = [
        "model        int8 by      held  flips(noise,limit)  AUROC ref->int8 (interval)"
        "        ECE change  p50/p99/max score change"
    ]
    for r in rows:
        tuned = f"fine-tune {r['finetuned']['finetune_epochs']}"
        for label, g in (("quantization", r["plain"]), (tuned, r["finetuned"])):
            c = g["check"]
            (f,) = c["findings"].values()
            s = c["score_change"]
            lo, hi = f["auroc_band"]
            lines.append(
                f"{r['model']:<12} {label:<12} {'yes' if g['holds'] else 'no':<5} "
                f"{f['decision_flips']:>3} ({f['noise_flips']}, {f['flip_limit']})"
                f"{'':<10} {fmt(f['auroc_reference'])}->{fmt(f['auroc_candidate'])} "
                f"({fmt(lo)}-{fmt(hi)})  {fmt(f['ece_change'])}      "
                f"{fmt(s['p50'])}/{fmt(s['p99'])}/{fmt(s['max'])}"
            )
        lines.append(
            f"{'':<12} kept: {r['kept']}; model only {r['model_only']}; score {films} films "
            f"auto/fp32 = {[x['auto_over_fp32'] for x in r['score']]} "
            f"({[x['runtime_auto']['images_per_s'] for x in r['score']]} against "
            f"{[x['torch_fp32']['images_per_s'] for x in r['score']]} images/s)"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,densenet121")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--train-n", type=int, default=480)
    parser.add_argument("--check-n", type=int, default=240)
    parser.add_argument("--score-n", type=int, default=960)
    parser.add_argument("--rounds", type=int, default=2, help="alternating score pairs")
    parser.add_argument("--model-seconds", type=float, default=5.0)
    args = parser.parse_args()
    started = time.perf_counter()
    train_store = store_of(synth_folder("train", args.train_n, "1024x1200", 5))
    check = synth_folder("check", args.check_n, "2400x2800", 12)
    store960 = store_of(archive(args.score_n, "2400x2800", True, CACHE, unique=240))
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        try:
            rows.append(bench_model(name, args, train_store, check, store960))
        except MeddxError as exc:
            rows.append({"model": name, "error": str(exc)})
    ok = [r for r in rows if "error" not in r]
    print(table(ok, args.score_n))
    write_result(
        {
            "date": dt.date.today().isoformat(),
            "model": "+".join(r["model"] for r in rows),
            "machine": machine(),
            "settings": vars(args),
            "limits": {
                "flip_margin": gate.FLIP_MARGIN,
                "auroc_min_half_width": gate.AUROC_MIN_HALF_WIDTH,
                "max_ece_change": gate.MAX_ECE_CHANGE,
                "finetune_range_lrs": list(optimize.FINETUNE_RANGE_LRS),
            },
            "rows": json.loads(json.dumps(rows, default=float)),
            "total_s": round(time.perf_counter() - started, 1),
        },
        "int8-gate-",
    )


if __name__ == "__main__":
    main()
