"""`make bench`: meddx scoring against the model's ceiling and the loop users would write.

    python benchmarks/bench.py                      # preset mix: 240 detector-size films
    python benchmarks/bench.py --preset png512      # 2,000 PNGs of 512 px (the old run)
    python benchmarks/bench.py --scale 1000,10000,20000 --size 128 --model seednet   # memory

Presets (--n, --size and --mix/--no-mix override them):
  mix     240 films of 2400 x 2800 px in a realistic archive's mix of formats (DICOM
          uncompressed, JPEG 2000, HTJ2K, JPEG-LS, RLE, JPEG baseline; JPEG, 16-bit PNG,
          1,024 px PNG; meddx/synthetic/chest.py's MIX), the default;
  png512  2,000 8-bit PNGs of 512 x 512 px.
The archive is written once and cached under benchmarks/.cache.

Measured side by side in one run, on the same archive and the same model:
  (a) ceiling: forward passes on ready 224 px tensors in this process, every core, of
      the model as meddx's predictor runs it (BatchNorm folded), in fp32 and in the
      precision `--precision auto` picks; and of the plain eager model in fp32;
  (b) the loop users write for such an archive: a torch Dataset over its files that
      decodes DICOM with pydicom (pixel_array, modality LUT, VOI LUT, MONOCHROME1
      inverted) and other files with PIL (16-bit PNG as I;16), scales to [0, 1], resizes
      with torchvision's antialiased Resize to 224 and normalises 3 channels as meddx
      does; DataLoader batch 64 into the eager model (fp32), from local disk, with
      num_workers=0 and with num_workers=os.cpu_count();
  (c) `meddx score` as a whole command (start-up included), in fp32 and in what `auto`
      picks, reading the archive from the local folder and from a local S3 endpoint
      (moto's server in its own process, sharing the CPUs); `--source` picks one; from
      local disk also in fp32 on LONG_RUN (4) times the films (hard links), where
      start-up weighs less; each run's core-seconds by role (TreeCPU: read + decode
      tasks, predictor, the command's own process, Ray's daemons and helper actors);
  (d) decode only: meddx's read and decode stages on Ray, no model (the CPU bound), from
      each source (c) reads;
  (e) training: `meddx train` images/s with 1 and 2 DDP workers (first --train-n films);
and decode ms per film (p50, one core) for each format in the archive, grouped by
synth.film_format: meddx's decode_image against the decode of (b)'s loop
(benchmarks/decode_formats.py's users_loop). Prints images/s, c/a (same precision) and
c/b (against the better of the two (b) runs), and writes
benchmarks/results/<host-or-gpu>-<model>-<preset>-<date>.json with the machine (CPU
model and SIMD flags, GPU if any); a later run the same day adds -b, -c, ... to the name.

`--scale N1,N2,...` instead scores N1, N2, ... PNGs (CSV manifests over one uploaded
set) and samples the proportional set size (PSS) of the whole process tree of each
`meddx score` (driver, Ray's daemons, workers, object store pages) every half second;
it reports the peak for each N, the ratio of the largest to the smallest, and checks
one row per input. With `--preset mix` (`make bench-scale-dicom`) the films are the
detector-size mix read from local disk, hard links to `--unique` rendered ones.

The parts live beside this script: film_archive.py (the archive), ceilings.py (a),
users_loop_timing.py (b and the decode ms per format), meddx_runs.py and
process_tree.py (c to e), record.py (the machine, the result file and the summary).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import multiprocessing
import os
from collections import Counter
from pathlib import Path

import torch
from ceilings import MODEL_SIZE, ceiling, ood_cost, openvino_part
from film_archive import archive, film_formats, films, first_films_manifest
from meddx_runs import BUCKET, Store, decode_only, meddx_score, score_figures, training
from process_tree import meddx_env
from record import log, machine, print_summary, write_result
from users_loop_timing import ArchiveDataset, decode_ms_per_format, users_loop_rate

from meddx.inputs.storage import StorageSettings
from meddx.model import engine, registry
from meddx.model.forward import inference_model
from meddx.model.precision import resolve_precision
from meddx.names import parse_film_size

PRESETS = {
    "mix": {"n": 240, "size": "2400x2800", "mix": True},
    "png512": {"n": 2000, "size": "512", "mix": False},
}
START_UP_FILMS = 10  # issue 13's small night: a 10-image run as a whole command
LONG_RUN = 4  # (c) also runs on this many times the archive's films, from local disk


def score_from(source: str, folder: Path, ckpt, args, picked, optimized=None) -> dict:
    """(c) and (d) reading the archive from ``source`` (local or s3); with ``optimized``
    also ``meddx score --runtime auto`` with the OpenVINO int8 checkpoint."""
    log(f"(c) meddx score and (d) decode only from {source}")
    store = Store() if source == "s3" else None
    try:
        if store:
            uris = store.upload(folder, "images")
            inputs, model_uri = f"s3://{BUCKET}/images", f"s3://{BUCKET}/model.pt"
            settings, env = store.settings, store.env
        else:
            uris = [str(p) for p in films(folder)]
            inputs, model_uri = str(folder), str(args.cache / f"{args.model}.pt")
            settings, env = StorageSettings(), meddx_env()
        registry.save_checkpoint(ckpt, model_uri, settings)
        fp32 = meddx_score(env, inputs, model_uri, "fp32")
        chosen = meddx_score(env, inputs, model_uri, args.precision) if picked else fp32
        runs = {"fp32": fp32, "picked": chosen}
        if optimized is not None:
            int8_uri = model_uri.replace(".pt", "-int8.pt")
            registry.save_checkpoint(optimized, int8_uri, settings)
            runs["runtime_auto"] = meddx_score(env, inputs, int8_uri, "auto")
        d = decode_only(settings, uris)
        start_up = None
        if not store:  # a small night: what the command costs beyond its images
            ten = first_films_manifest(folder, START_UP_FILMS, args.cache)
            start_up = [meddx_score(env, str(ten), model_uri, "fp32") for _ in range(2)]
            # A longer run, where start-up weighs less: LONG_RUN times the films, hard
            # links to the same ones, each read and decoded on its own.
            longer = archive(len(uris) * LONG_RUN, args.size, args.mix, args.cache, len(uris))
            runs["fp32_long"] = meddx_score(env, str(longer), model_uri, "fp32")
    finally:
        if store:
            store.close()
    return {
        **(
            {
                "start_up_10": {
                    "whole_command_seconds": [round(r["seconds"], 2) for r in start_up],
                    "summaries": [r["summary"] for r in start_up],
                }
            }
            if start_up
            else {}
        ),
        "c": {name: score_figures(run) for name, run in runs.items()},
        "d": round(d, 1),
    }


def throughput(args) -> None:
    folder = archive(args.n, args.size, args.mix, args.cache, args.unique)
    unique = min(args.unique or args.n, args.n)
    formats = film_formats(
        archive(unique, args.size, args.mix, args.cache), unique, args.size, args.mix
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    ckpt = registry.untrained_checkpoint(args.model, input_size=MODEL_SIZE)
    eager = registry.model_from_checkpoint(ckpt).eval()
    eager = eager.to(device, memory_format=torch.channels_last)
    model = inference_model(ckpt, device)  # as meddx's predictor runs it
    picked = resolve_precision(args.precision, device)
    seconds = args.ceiling_seconds
    log(f"(a) ceiling on {device}, {seconds:.0f} s each")
    a = {"fp32_eager": ceiling(eager, None, device, seconds)}
    a["fp32"] = ceiling(model, None, device, seconds)
    a["picked"] = a["fp32"]
    if picked is not None:  # autocast over the unfolded model, as the predictor runs it
        unfolded = inference_model(ckpt, device, fold=False)
        a["picked"] = ceiling(unfolded, picked, device, seconds)
    del model
    log("(a) the predictor stage with and without the out-of-distribution score")
    a.update(ood_cost(ckpt, device, seconds * 2))
    optimized = None
    if engine.available() and device.type == "cpu":
        log("(a) OpenVINO fp32 and int8; meddx optimize on the first films")
        # In a process of its own: OpenVINO's thread pool and state stay out of the rest
        # of the bench (in-process, the bench died of a segfault once (c) began).
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            path, figures = pool.apply(openvino_part, (args,))
        a.update(figures)
        optimized = registry.read_checkpoint(path, StorageSettings())[0] if path else None
    dataset = ArchiveDataset(films(folder), ckpt.mean, ckpt.std)
    log("(b) the users' loop, DataLoader workers 0 and all cores")
    b = {
        f"workers_{workers}": users_loop_rate(eager, dataset, device, workers, args.loop_seconds)
        for workers in (0, os.cpu_count() or 1)
    }
    del eager
    log("decode ms per format, one core")
    decode_ms = decode_ms_per_format(formats, args.format_films)
    sources = ["local", "s3"] if args.source == "both" else [args.source]
    by_source = {
        source: score_from(source, folder, ckpt, args, picked, optimized) for source in sources
    }
    b_best = max(b.values())
    ratios = {
        source: {
            "c_fp32_over_a_fp32": round(s["c"]["fp32"]["images_per_s"] / a["fp32"], 3),
            "c_picked_over_a_picked": round(s["c"]["picked"]["images_per_s"] / a["picked"], 3),
            "c_fp32_over_b_best": round(s["c"]["fp32"]["images_per_s"] / b_best, 3),
            "c_picked_over_b_best": round(s["c"]["picked"]["images_per_s"] / b_best, 3),
            "c_picked_over_d": round(s["c"]["picked"]["images_per_s"] / s["d"], 3),
            # The optional runs: the longer one (local only) and --runtime auto.
            **{
                f"c_{run}_over_{ref}": round(s["c"][run]["images_per_s"] / value, 3)
                for run in ("fp32_long", "runtime_auto")
                if run in s["c"]
                for ref, value in (("a_fp32", a["fp32"]), ("b_best", b_best))
            },
        }
        for source, s in by_source.items()
    }
    result = {
        "date": dt.date.today().isoformat(),
        "model": args.model,
        "preset": args.preset,
        "n": args.n,
        "unique": unique,
        "size": args.size,
        "mix": args.mix,
        "source": args.source,
        "formats": dict(Counter(formats.values()).most_common()),
        "precision_auto_picks": str(picked or "fp32").replace("torch.", ""),
        "machine": machine(),
        "a_ceiling": {k: round(v, 1) if isinstance(v, float) else v for k, v in a.items()},
        "b_users_loop": {k: round(v, 1) for k, v in b.items()},
        "c_meddx_score": {source: s["c"] for source, s in by_source.items()},
        "d_decode_only": {source: s["d"] for source, s in by_source.items()},
        "start_up_10": by_source.get("local", {}).get("start_up_10"),
        "ratios": ratios,
        "decode_ms_p50_one_core": decode_ms,
    }
    write_result(result, "")
    print_summary(result)
    if not args.skip_training:
        log("(e) training with 1 and 2 workers")
        subset = first_films_manifest(folder, args.train_n, args.cache)
        result["train_n"] = min(args.train_n, args.n)
        result["train_images_per_s"] = {
            f"{workers}_workers": round(training(subset, args.model, workers, meddx_env()), 1)
            for workers in (1, 2)
        }
        write_result(result, "")
        print_summary(result)


def scale(args) -> None:
    sizes = sorted(int(n) for n in args.scale.split(","))
    ckpt = registry.untrained_checkpoint(args.model, input_size=MODEL_SIZE)
    if args.mix:
        # Detector-size films from local disk (hard links to --unique rendered films: 5,000
        # uncompressed DICOMs would be 65 GB, far beyond what moto's server holds).
        folder = archive(sizes[-1], args.size, True, args.cache, args.unique)
        store, env, model_uri = None, meddx_env(), str(args.cache / f"scale-{args.model}.pt")
        uris = [str(p.resolve()) for p in sorted(films(folder), key=lambda p: p.name)]
        registry.save_checkpoint(ckpt, model_uri, StorageSettings())
    else:
        # Any cached archive at least this large serves: the first N images are taken.
        cached = [p for p in args.cache.glob(f"synth-*-{args.size}") if p.is_dir()]
        big = [p for p in cached if int(p.name.split("-")[1]) >= sizes[-1]]
        folder = min(big, key=lambda p: int(p.name.split("-")[1])) if big else None
        folder = folder or archive(sizes[-1], args.size, False, args.cache)
        store = Store()
        env, model_uri = store.env, f"s3://{BUCKET}/model.pt"
    runs = []
    try:
        if store:
            uris = store.upload(folder, "scale", limit=sizes[-1])
            registry.save_checkpoint(ckpt, model_uri, store.settings)
        for n in sizes:
            if store:
                manifest = f"s3://{BUCKET}/manifests/{n}.csv"
                opened = store.fs.open(manifest.removeprefix("s3://"), "w")
            else:
                manifest = str(args.cache / f"_scale-{folder.name}-{n}.csv")
                opened = open(manifest, "w", newline="")
            with opened as fh:
                writer = csv.writer(fh)
                writer.writerow(["uri"])
                writer.writerows([u] for u in uris[:n])
            run = meddx_score(env, manifest, model_uri, args.precision, sample_memory=True)
            runs.append(
                {
                    "n": n,
                    "rows": run["rows"],
                    "one_row_per_input": run["rows"] == n,
                    "seconds": round(run["seconds"], 1),
                    "images_per_s": round(run["images_per_s"], 1),
                    "peak_pss_mib": round(run["peak_pss_bytes"] / 2**20),
                }
            )
            print(json.dumps(runs[-1]), flush=True)
    finally:
        if store:
            store.close()
    result = {
        "date": dt.date.today().isoformat(),
        "model": args.model,
        "size": args.size,
        "mix": args.mix,
        "source": "local" if args.mix else "s3",
        "machine": machine(),
        "runs": runs,
        "peak_ratio_largest_over_smallest": round(
            runs[-1]["peak_pss_mib"] / runs[0]["peak_pss_mib"], 3
        ),
    }
    write_result(result, "scale-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="mix: 240 films of 2400x2800 px in a realistic mix of formats (the default); "
        "png512: 2,000 PNGs of 512 px (the default with --scale)",
    )
    parser.add_argument("--n", type=int, default=None, help="films [the preset's]")
    parser.add_argument(
        "--size", default=None, help="film size, SIDE or WIDTHxHEIGHT [the preset's]"
    )
    parser.add_argument(
        "--mix",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="draw each film's format from a realistic archive mix [the preset's]",
    )
    parser.add_argument("--model", default="resnet18", choices=sorted(registry.MODELS))
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--train-n", type=int, default=256, help="films per training run")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument(
        "--source",
        choices=["both", "local", "s3"],
        default="both",
        help="where (c) and (d) read: the local folder and moto's S3 server, or one of "
        "them (a GPU node outruns one moto process)",
    )
    parser.add_argument(
        "--unique",
        type=int,
        default=None,
        help="render only this many distinct films; the rest of --n are hard links",
    )
    parser.add_argument(
        "--loop-seconds",
        type=float,
        default=None,
        help="time each (b) run over its first seconds instead of all --n films",
    )
    parser.add_argument(
        "--ceiling-seconds", type=float, default=15.0, help="time each (a) run this long"
    )
    parser.add_argument(
        "--format-films",
        type=int,
        default=5,
        help="films of each format timed for the decode ms per format",
    )
    parser.add_argument(
        "--only-ood-cost",
        action="store_true",
        help="only time the predictor stage with and without the out-of-distribution score",
    )
    parser.add_argument("--scale", default=None, metavar="N1,N2,...")
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/.cache"))
    args = parser.parse_args()
    args.preset = args.preset or ("png512" if args.scale else "mix")
    preset = PRESETS[args.preset]
    custom = {k for k in preset if getattr(args, k) not in (None, preset[k])}
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    parse_film_size(args.size)  # fails early on a malformed size
    if custom:  # the preset's name no longer describes the run
        args.preset = f"{args.preset}+{'+'.join(sorted(custom))}"
    if args.only_ood_cost:
        torch.set_num_threads(os.cpu_count() or 1)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        ckpt = registry.untrained_checkpoint(args.model, input_size=MODEL_SIZE)
        result = {"model": args.model, "machine": machine()}
        result.update(ood_cost(ckpt, device, args.ceiling_seconds * 2))
        print(json.dumps(result, indent=2))
        return
    scale(args) if args.scale else throughput(args)


if __name__ == "__main__":
    main()
