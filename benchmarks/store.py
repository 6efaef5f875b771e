"""`make bench-store`: a store of model-ready films (``meddx prepare``) against decoding
the sources on every run, on the realistic mix of detector-size films.

    python benchmarks/store.py                  # 240 and 960 films of 2400 x 2800 px
    python benchmarks/store.py --n 24 --unique 24 --epochs 1 --ceiling-seconds 3  # smoke

Measured side by side in one run, resnet18 at 224 px, for each --n (the films above
--unique are hard links to the rendered ones, film_archive.archive):
  (d) decode only: meddx's read and decode stages on Ray, no model (meddx_runs), to the
      model's 224 px and (d512) to the store's 512 px, the decode (p) must do;
  (p) ``meddx prepare DIR --out STORE`` as a whole command, into a fresh store, and its
      pipeline (start-up excluded, as (d) excludes it); p/d and p/d512 of the pipeline;
      the store's bytes (STORE/dt=*/*.parquet) against the films' own;
  (a) the ceiling: fp32 forward passes on ready 224 px tensors (ceilings.ceiling);
  (c) ``meddx score DIR`` and (s) ``meddx score STORE``, fp32 whole commands; s/a, s/c;
      and ``meddx score STORE --runtime auto`` with the model's int8 OpenVINO checkpoint
      (meddx optimize's, when its accuracy check holds; else the fp32 checkpoint).
On the rendered mix (--unique films, measured whatever --n says) only:
  (t) training images/s of the last of --epochs, 1 worker, meddx's default batch (32):
      ``meddx train STORE`` (labels from the sources' class folders) against ``meddx
      train DIR``, and against the training step alone on ready tensors: meddx's own
      train_one_epoch (augment, normalise, forward, backward, AdamW) over random uint8
      224 px batches in this process, torch threads = cores;
  agreement: a resnet18 trained on the mix (ceilings.trained, cached) scores DIR and
      STORE in fp32: the share of films with the same decision at its threshold (target
      >= 99.5%), each AUROC and their difference (target <= 0.005), max and p99 |score
      difference|; beside them the model's own noise, max and p99 |score change| when
      each pixel of the direct path's input images (decode_image at 224 px, as meddx
      feeds the model) moves by at most one grey level (optimize.grey_level_noise); the
      same for a resnet18 trained with meddx train's augmentation (a less brittle one).
Writes benchmarks/results/store-<host-or-gpu>-resnet18-<preset>-<date>.json with the
machine, and prints a table. Every score, prepare and train is its own process with its
own Ray (process_tree.run_meddx); the temporary stores and results are removed at exit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pds
import torch
from ceilings import MODEL_SIZE, ceiling, trained
from film_archive import archive, films, first_films_manifest
from meddx_runs import decode_only, meddx_score, score_figures, training
from process_tree import meddx_env, run_meddx
from record import log, machine, write_result
from sklearn.metrics import roc_auc_score

from meddx import MeddxError
from meddx.config import TrainConfig
from meddx.imaging.decode import DecodeSettings, decode_image
from meddx.imaging.transforms import TrainAugment
from meddx.inputs.storage import StorageSettings
from meddx.model import engine, optimize, registry
from meddx.model.forward import inference_model, probabilities
from meddx.model.precision import resolve_precision

MODEL = "resnet18"
DEFAULT_N = "240,960"
DEFAULT_SIZE = "2400x2800"
STORE_SIZE = 512  # meddx prepare's default short side, which (p) makes
UNIQUE = 240  # films rendered (the mix bench.py uses); larger --n are hard links to them
# The store's promise: its films score as the sources do.
SAME_DECISION_TARGET = 0.995
AUROC_DIFFERENCE_TARGET = 0.005
LOCAL = StorageSettings()


# ---- the parts measured --------------------------------------------------------------


def prepare(env: dict, folder: Path, store: Path) -> dict:
    """(p) ``meddx prepare`` as a whole command (start-up included)."""
    run = run_meddx(["prepare", str(folder), "--out", str(store), "--quiet"], env)
    summary = next(line for line in run["stdout"].splitlines()[::-1] if "images_per_s=" in line)
    figures = {k: float(v) for k, v in re.findall(r"\b(\w+)=([\d.]+)", summary)}
    if figures["ok"] != figures["rows"]:
        raise RuntimeError(f"meddx prepare: {summary}")
    return {
        "images_per_s": round(figures["rows"] / run["seconds"], 1),
        "inside_command": figures["images_per_s"],
        # start-up (Ray, listing, selection) excluded, as (d) excludes it
        "pipeline": round(figures["rows"] / figures["pipeline_seconds"], 1),
        "core_busy": run["core_busy"],
        "core_seconds": run["core_seconds"],
        "rows": int(figures["rows"]),
        "summary": summary,
    }


def step_alone(n_train: int, epochs: int) -> tuple[float, str]:
    """(t) meddx's training step on ready tensors: train_worker.train_one_epoch over
    random uint8 images in batches of meddx's default size, on the CPU as ``meddx train``
    trains without --use-gpu, this process, every core; images/s of the last of
    ``epochs`` passes over ``n_train`` images, and the autocast dtype it trained in."""
    from meddx.imaging.transforms import TrainAugment
    from meddx.pipelines.train_worker import WEIGHT_DECAY, train_one_epoch

    device = torch.device("cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = registry.build_model(MODEL, 2).to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=TrainConfig.lr, weight_decay=WEIGHT_DECAY)
    loss_fn = torch.nn.CrossEntropyLoss()
    mean = torch.tensor(registry.IMAGENET_MEAN, device=device)
    std = torch.tensor(registry.IMAGENET_STD, device=device)
    amp = resolve_precision("auto", device)  # as the worker trains: bf16 where it has it
    amp = amp if amp is torch.bfloat16 else None
    gen = torch.Generator().manual_seed(0)
    sizes = [
        min(TrainConfig.batch_size, n_train - i) for i in range(0, n_train, TrainConfig.batch_size)
    ]
    batches = [
        {
            "image": torch.randint(
                0, 256, (k, MODEL_SIZE, MODEL_SIZE), dtype=torch.uint8, generator=gen
            ),
            "label": torch.randint(0, 2, (k,), generator=gen),
        }
        for k in sizes
    ]
    for _ in range(epochs):
        start = time.perf_counter()
        _, seen = train_one_epoch(
            model, batches, opt, loss_fn, TrainAugment(), mean, std, device, amp
        )
        rate = seen / (time.perf_counter() - start)
    return rate, str(amp or "fp32").replace("torch.", "")


def training_rates(env: dict, folder: Path, store: Path, epochs: int) -> dict:
    """(t) images/s of the last epoch: from the store, from the sources, the step alone."""
    from meddx.inputs import listing
    from meddx.pipelines.training import split

    items = listing.labelled_inputs(str(folder), LOCAL)
    n_train = len(split(items, TrainConfig.val_fraction, TrainConfig.seed)[0])
    log(f"(t) meddx train STORE, {epochs} epochs, 1 worker")
    from_store = training(store, MODEL, 1, env, epochs)
    log(f"(t) meddx train DIR, {epochs} epochs, 1 worker")
    direct = training(folder, MODEL, 1, env, epochs)
    log("(t) the training step alone on ready tensors")
    alone, autocast = step_alone(n_train, epochs)
    return {
        "n_train": n_train,
        "epochs": epochs,
        "workers": 1,
        "batch_size": TrainConfig.batch_size,
        "step_alone_autocast": autocast,
        "images_per_s": {
            "store": round(from_store, 1),
            "direct": round(direct, 1),
            "step_alone": round(alone, 1),
        },
        "store_over_direct": round(from_store / direct, 3),
        "store_over_step_alone": round(from_store / alone, 3),
        "direct_over_step_alone": round(direct / alone, 3),
    }


# ---- the model and the agreement ----------------------------------------------------------


def direct_images(folder: Path) -> tuple[list[str], np.ndarray]:
    """The mix's films decoded as meddx feeds them to the model (uint8, 224 px)."""
    settings = DecodeSettings(size=MODEL_SIZE, modalities=None, views=None)
    paths = films(folder)
    return [str(p) for p in paths], np.stack(
        [decode_image(p.read_bytes(), settings)[0] for p in paths]
    )


def trained_checkpoint(folder: Path, cache: Path, augmented: bool = False) -> Path:
    """A resnet18 that separates the mix's classes (ceilings.trained), cached; with
    ``augmented``, trained with ``meddx train``'s augmentation (a less brittle model)."""
    kind = "augmented" if augmented else "trained"
    path = cache / f"store-{MODEL}-{kind}-{folder.name}.pt"
    if not path.exists():
        log(f"training {MODEL} ({kind}) on {folder.name} in this process (once; cached)")
        untrained = registry.untrained_checkpoint(MODEL, input_size=MODEL_SIZE)
        manifest = first_films_manifest(folder, len(films(folder)), cache)
        ckpt, _ = trained(untrained, manifest, augment=TrainAugment() if augmented else None)
        registry.save_checkpoint(ckpt, str(path), LOCAL)
    return path


def int8_checkpoint(source: str, out: str, images: np.ndarray, truth: np.ndarray) -> dict:
    """``meddx optimize`` of ``source`` on the mix's images (int8 OpenVINO): its check's
    figures, and ``out`` written when the check holds. Run in a process of its own, as
    bench.py runs OpenVINO (in-process, its state once crashed the bench later on)."""
    torch.set_num_threads(os.cpu_count() or 1)
    ckpt, _ = registry.read_checkpoint(source, LOCAL)
    try:
        optimized, result = optimize.with_artefact(ckpt, images, truth, source="the mix")
    except MeddxError as exc:  # its accuracy check failed (GateRefused), or too few images
        return {"holds": False, "refused": str(exc)}
    registry.save_checkpoint(optimized, out, LOCAL)
    return {"holds": True, "check": optimize.describe(result)}


def int8_for(source: Path, images: np.ndarray, truth: np.ndarray) -> tuple[Path | None, dict]:
    """The cached int8 checkpoint of ``source`` and its check, made when missing."""
    out = source.with_name(source.name.replace("-trained-", "-int8-"))
    figures = out.with_suffix(".json")
    if (
        not figures.exists()
        or json.loads(figures.read_text())["source_mtime"] != source.stat().st_mtime
    ):
        log("meddx optimize (OpenVINO int8) of the trained model, in a process of its own")
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            check = pool.apply(int8_checkpoint, (str(source), str(out), images, truth))
        figures.write_text(json.dumps({**check, "source_mtime": source.stat().st_mtime}))
    check = {k: v for k, v in json.loads(figures.read_text()).items() if k != "source_mtime"}
    return (out if check["holds"] else None), check


def scores(out: Path) -> dict[str, float]:
    """image_uri -> score of a results folder, every row ok."""
    table = pds.dataset(out, partitioning="hive").to_table(columns=["image_uri", "status", "score"])
    rows = table.to_pydict()
    if set(rows["status"]) != {"ok"}:
        raise RuntimeError(f"{out}: rows not ok: {sorted(set(rows['status']))}")
    return dict(zip(rows["image_uri"], rows["score"], strict=True))


def agreement(ckpt, uris: list[str], images: np.ndarray, direct: Path, stored: Path) -> dict:
    """Scores from the sources against scores from the store, and the model's own noise."""
    a, b = scores(direct), scores(stored)
    if set(a) != set(b) or set(a) != set(uris):
        raise RuntimeError("the direct and stored runs scored different films")
    sa, sb = np.array([a[u] for u in uris]), np.array([b[u] for u in uris])
    truth = np.array([Path(u).parent.name == ckpt.positive_class for u in uris])
    diff = np.abs(sa - sb)
    auroc_dir, auroc_store = roc_auc_score(truth, sa), roc_auc_score(truth, sb)
    same = float(np.mean((sa >= ckpt.threshold) == (sb >= ckpt.threshold)))
    pos = ckpt.positive_index
    mine = probabilities(ckpt, images)[:, pos]
    noisy = probabilities(ckpt, optimize.grey_level_noise(images))[:, pos]
    noise = np.abs(noisy - mine)
    # The decisions one grey level of noise alone changes: the model's own floor.
    noise_same = float(np.mean((mine >= ckpt.threshold) == (noisy >= ckpt.threshold)))
    return {
        "films": len(uris),
        "threshold": ckpt.threshold,
        "same_decision": round(same, 4),
        "same_decision_target": SAME_DECISION_TARGET,
        "auroc_direct": round(auroc_dir, 4),
        "auroc_store": round(auroc_store, 4),
        "auroc_difference": round(abs(auroc_dir - auroc_store), 4),
        "auroc_difference_target": AUROC_DIFFERENCE_TARGET,
        "score_difference_max": round(float(diff.max()), 4),
        "score_difference_p99": round(float(np.quantile(diff, 0.99)), 4),
        "one_grey_level_max": round(float(noise.max()), 4),
        "one_grey_level_p99": round(float(np.quantile(noise, 0.99)), 4),
        "one_grey_level_same_decision": round(noise_same, 4),
        # Check of the noise's reference: these images are what `score DIR` scored.
        "in_process_vs_score_dir_max": round(float(np.abs(mine - sa).max()), 5),
        "holds": same >= SAME_DECISION_TARGET
        and abs(auroc_dir - auroc_store) <= AUROC_DIFFERENCE_TARGET,
    }


# ---- the run ----------------------------------------------------------------------------


def one_archive(n: int, args, env, models: dict, tmp: Path, a: float) -> dict:
    """(d), (p), store bytes, (c) and (s) on ``n`` films; the store and results kept."""
    folder = archive(n, args.size, True, args.cache, min(args.unique, n)).resolve()
    paths = films(folder)
    log(f"{n} films: (d) decode only")
    d = decode_only(LOCAL, [str(p) for p in paths])
    log(f"{n} films: (d512) decode only at the store's size")
    d512 = decode_only(LOCAL, [str(p) for p in paths], STORE_SIZE)
    store = tmp / f"store-{n}"
    log(f"{n} films: (p) meddx prepare")
    p = prepare(env, folder, store)
    film_bytes = sum(f.stat().st_size for f in paths)
    store_bytes = sum(f.stat().st_size for f in store.glob("dt=*/*.parquet"))
    outs = {"c": tmp / f"direct-{n}", "s": tmp / f"stored-{n}"}
    log(f"{n} films: (c) meddx score DIR, (s) meddx score STORE, fp32 and --runtime auto")
    c = meddx_score(env, str(folder), str(models["fp32"]), "fp32", out=str(outs["c"]))
    s = meddx_score(env, str(store), str(models["fp32"]), "fp32", out=str(outs["s"]))
    s_auto = meddx_score(env, str(store), str(models["auto"]), "auto")
    rate = {"c": c["images_per_s"], "s": s["images_per_s"], "s_auto": s_auto["images_per_s"]}
    return {
        "folder": folder,
        "store": store,
        "outs": outs,
        "figures": {
            "films": len(paths),
            "film_bytes": film_bytes,
            "store_bytes": store_bytes,
            "store_percent": round(100 * store_bytes / film_bytes, 2),
            "d_decode_only": round(d, 1),
            "p_prepare": p,
            "d512_decode_only_store_size": round(d512, 1),
            # the pipeline's rate (start-up excluded) against decoding alone
            "p_over_d": round(p["pipeline"] / d, 3),
            "p_over_d512": round(p["pipeline"] / d512, 3),
            "c_score_dir_fp32": score_figures(c),
            "s_score_store_fp32": score_figures(s),
            "s_score_store_runtime_auto": score_figures(s_auto),
            "ratios": {
                "s_over_a": round(rate["s"] / a, 3),
                "s_over_c": round(rate["s"] / rate["c"], 3),
                "s_auto_over_a": round(rate["s_auto"] / a, 3),
                "s_auto_over_c": round(rate["s_auto"] / rate["c"], 3),
            },
        },
    }


def several_models(env, folder: Path, source: Path, k_max: int, cache: Path, d, a) -> dict:
    """k = 1..k_max checkpoints in one pass of ``meddx score DIR --model ... --model ...``
    against k separate runs, fp32: the trained model, then models of the same
    architecture and input size with other weights (the same cost). The target, one
    decode plus k times the model, as pipeline seconds (start-up excluded) on this
    machine's cores: n/d + k n/a."""
    paths = [source]
    for seed in range(1, k_max):
        path = cache / f"{MODEL}-{MODEL_SIZE}-seed{seed}.pt"
        if not path.exists():
            ckpt = registry.untrained_checkpoint(MODEL, input_size=MODEL_SIZE, seed=seed)
            registry.save_checkpoint(ckpt, str(path), LOCAL)
        paths.append(path)
    n = len(films(folder))
    log(f"k models: {k_max} separate runs of meddx score DIR, {n} films")
    single = [meddx_score(env, str(folder), str(p), "fp32") for p in paths]
    by_k = {}
    for k in range(1, k_max + 1):
        log(f"k models: {k} in one pass")
        one = meddx_score(env, str(folder), [str(p) for p in paths[:k]], "fp32")
        separate = sum(r["seconds"] for r in single[:k])
        separate_pipeline = sum(r["pipeline_seconds"] for r in single[:k])
        bound = n / d + k * n / a
        by_k[str(k)] = {
            "rows": one["rows"],
            "one_pass_s": round(one["seconds"], 1),
            "one_pass_pipeline_s": round(one["pipeline_seconds"], 1),
            "separate_s": round(separate, 1),
            "separate_pipeline_s": round(separate_pipeline, 1),
            "one_over_separate": round(one["seconds"] / separate, 3),
            "bound_pipeline_s": round(bound, 1),
            "pipeline_over_bound": round(one["pipeline_seconds"] / bound, 3),
        }
    return {"films": n, "d_decode_only": round(d, 1), "a_ceiling": round(a, 1), "by_k": by_k}


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = meddx_env()
    mix = archive(args.unique, args.size, True, args.cache).resolve()
    log(f"decoding {mix.name} in this process (the direct path's images)")
    uris, images = direct_images(mix)
    source = trained_checkpoint(mix, args.cache)
    ckpt, _ = registry.read_checkpoint(str(source), LOCAL)
    truth = np.array([Path(u).parent.name == ckpt.positive_class for u in uris])
    int8, check = None, {"holds": False, "refused": "--no-int8, or OpenVINO not installed"}
    if args.int8 and engine.available() and device.type == "cpu" and not args.only_models:
        int8, check = int8_for(source, images, truth)
    models = {"fp32": source, "auto": int8 or source}
    torch.set_num_threads(os.cpu_count() or 1)
    log(f"(a) ceiling on {device}, fp32, {args.ceiling_seconds:.0f} s")
    a = ceiling(inference_model(ckpt, device), None, device, args.ceiling_seconds)
    by_n, agreed, agreed_steady, train, several = {}, None, None, None, None
    with tempfile.TemporaryDirectory(prefix="meddx-bench-store-") as tmp:
        if args.only_models:  # the k-models columns alone, on the mix
            d = decode_only(LOCAL, [str(p) for p in films(mix)])
            several = several_models(env, mix, source, args.models, args.cache, d, a)
        else:
            for n in sorted(set(args.n) | {args.unique}):
                by_n[n] = one_archive(n, args, env, models, Path(tmp), a)
            rendered = by_n[args.unique]
            if args.models:
                d = rendered["figures"]["d_decode_only"]
                several = several_models(env, mix, source, args.models, args.cache, d, a)
            log("agreement: scores from the sources against scores from the store")
            agreed = agreement(ckpt, uris, images, rendered["outs"]["c"], rendered["outs"]["s"])
            # ... and for a model trained as meddx train trains (augmented): less brittle.
            steady = trained_checkpoint(mix, args.cache, augmented=True)
            outs = {k: Path(tmp) / f"steady-{k}" for k in ("c", "s")}
            meddx_score(env, str(mix), str(steady), "fp32", out=str(outs["c"]))
            meddx_score(env, str(rendered["store"]), str(steady), "fp32", out=str(outs["s"]))
            steady_ckpt, _ = registry.read_checkpoint(str(steady), LOCAL)
            agreed_steady = agreement(steady_ckpt, uris, images, outs["c"], outs["s"])
            if args.epochs:
                train = training_rates(env, mix, rendered["store"], args.epochs)
    return {
        "date": dt.date.today().isoformat(),
        "model": MODEL,
        "preset": args.preset,
        "n": sorted(by_n),
        "unique": args.unique,
        "size": args.size,
        "machine": machine(),
        "precision_auto_picks": str(resolve_precision("auto", device) or "fp32").replace(
            "torch.", ""
        ),
        "runtime_auto_model": "int8 OpenVINO" if int8 else "fp32 (torch)",
        "int8_check": check,
        "a_ceiling_fp32": round(a, 1),
        "by_n": {str(n): r["figures"] for n, r in by_n.items()},
        "training": train,
        "agreement": agreed,
        "agreement_augmented_model": agreed_steady,
        "several_models": several,
    }


def print_table(r: dict) -> None:
    m = r["machine"]
    print(f"\nstore bench ({r['preset']}): {MODEL} at {MODEL_SIZE} px, films of {r['size']} px")
    print(f"machine: {m['cpu']} x {m['cpus']} ({' '.join(m['cpu_flags'])}); GPU {m['gpu']}")
    check = r["int8_check"].get("check") or r["int8_check"].get("refused")
    print(
        f"(a) ceiling fp32 {r['a_ceiling_fp32']:.1f} images/s; --runtime auto runs "
        f"{r['runtime_auto_model']} ({check})"
    )
    head = ("films", "d", "d512", "p_pipe", "p/d", "p/d512", "store%", "c", "s", "s/a", "s/c")
    head += ("s_auto", "/a", "/c")
    if r["by_n"]:
        print(" ".join(f"{h:>7s}" for h in head) + "   (images/s, whole commands)")
    for n, f in r["by_n"].items():
        q = f["ratios"]
        cells = (
            n,
            f["d_decode_only"],
            f["d512_decode_only_store_size"],
            f["p_prepare"]["pipeline"],
            f["p_over_d"],
            f["p_over_d512"],
            f["store_percent"],
            f["c_score_dir_fp32"]["images_per_s"],
            f["s_score_store_fp32"]["images_per_s"],
            q["s_over_a"],
            q["s_over_c"],
            f["s_score_store_runtime_auto"]["images_per_s"],
            q["s_auto_over_a"],
            q["s_auto_over_c"],
        )
        print(" ".join(f"{c:>7}" for c in cells))
    if r["training"]:
        t, v = r["training"], r["training"]["images_per_s"]
        print(
            f"(t) training, {t['n_train']} films, 1 worker, batch {t['batch_size']}, epoch "
            f"{t['epochs']} of {t['epochs']}: store {v['store']}, direct {v['direct']}, step "
            f"alone {v['step_alone']} images/s; store/direct {t['store_over_direct']}, "
            f"store/step {t['store_over_step_alone']}"
        )
    for title, g in (("", r["agreement"]), (" (augmented model)", r["agreement_augmented_model"])):
        if g:
            print_agreement(title, g)
    if r["several_models"]:
        m = r["several_models"]
        print(
            f"k models in one pass, meddx score DIR, {m['films']} films, fp32 (d "
            f"{m['d_decode_only']}, a {m['a_ceiling']} images/s; bound n/d + k n/a):"
        )
        head = ("k", "one", "sep", "one/sep", "one_pipe", "bound", "pipe/bnd")
        print(" ".join(f"{h:>8s}" for h in head) + "   (seconds)")
        for k, f in m["by_k"].items():
            names = ("one_pass_s", "separate_s", "one_over_separate", "one_pass_pipeline_s",
                     "bound_pipeline_s", "pipeline_over_bound")  # fmt: skip
            cells = (k, *(f[x] for x in names))
            print(" ".join(f"{c:>8}" for c in cells))


def print_agreement(title: str, g: dict) -> None:
    print(
        f"agreement{title}, {g['films']} films, fp32: same decision {g['same_decision']:.2%} "
        f"(>= {g['same_decision_target']:.1%}); AUROC direct {g['auroc_direct']}, store "
        f"{g['auroc_store']}, difference {g['auroc_difference']} (<= "
        f"{g['auroc_difference_target']}); |score difference| max "
        f"{g['score_difference_max']}, p99 {g['score_difference_p99']}"
    )
    print(
        f"    one grey level of noise on the direct path's images: |score change| max "
        f"{g['one_grey_level_max']}, p99 {g['one_grey_level_p99']}, same decision "
        f"{g.get('one_grey_level_same_decision', float('nan')):.2%}; "
        f"{'holds' if g['holds'] else 'DOES NOT HOLD'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default=DEFAULT_N, help=f"films, N1,N2,... [{DEFAULT_N}]")
    parser.add_argument("--size", default=DEFAULT_SIZE, help="film size, SIDE or WxH")
    parser.add_argument(
        "--unique",
        type=int,
        default=UNIQUE,
        help="films rendered; training and the agreement run on them [%(default)s]",
    )
    parser.add_argument(
        "--epochs", type=int, default=2, help="training epochs per run; 0: no training"
    )
    parser.add_argument("--ceiling-seconds", type=float, default=15.0, help="time (a) this long")
    parser.add_argument(
        "--int8",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--runtime auto with meddx optimize's int8 checkpoint (when its check holds)",
    )
    parser.add_argument(
        "--models", type=int, default=3, help="k = 1..K models in one pass; 0: none [3]"
    )
    parser.add_argument(
        "--only-models", action="store_true", help="only the k-models columns, on the mix"
    )
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/.cache"))
    args = parser.parse_args()
    args.n = [int(n) for n in args.n.split(",")]
    custom = [
        f"n{'_'.join(map(str, args.n))}" if args.n != [240, 960] else "",
        f"u{args.unique}" if args.unique != UNIQUE else "",
        args.size if args.size != DEFAULT_SIZE else "",
    ]
    custom.append("models" if args.only_models else "")
    args.preset = "+".join(["mix", *filter(None, custom)])
    result = run(args)
    write_result(result, "store-")
    print_table(result)


if __name__ == "__main__":
    main()
