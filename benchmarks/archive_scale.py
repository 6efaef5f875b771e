"""The control plane at archive scale: one `meddx screen` night over an archive of N
inputs whose history already holds all but K, against the same K films alone.

    python benchmarks/archive_scale.py --archive 100000,1000000 --night 2000
    python benchmarks/archive_scale.py --archive 10000000 --night 20000   # long: see docs

No N objects are put on disk. The archive is a Parquet manifest (a ``uri`` column, as an
S3 Inventory listing gives) of N URIs, of which only the K new ones exist: small PNGs
(64 px, a few rendered and the rest hard links, film_archive.py). The history is what
meddx would have committed for the N - K old ones: Parquet files with meddx's output
schema and file metadata under ``OUT/dt=YYYY-MM-DD/``, one file per earlier night, rows
of the very checkpoint the night uses (an untrained seednet at 64 px: the control plane,
not the model, is measured). Per (N, K), in this order:

- phases, in this process, on a copy of the history: reading the manifest (listing),
  selecting what is new, the re-selection the commit does against another writer
  (``check``) and the commit itself of K staged rows;
- the baseline: ``meddx screen`` of a manifest of the K films into an empty OUT;
- the night: ``meddx screen`` of the N-URI manifest into a fresh copy of the history.

Each command's wall time is measured around the whole process; the driver's resident
set (RSS) is sampled every 0.1 s with psutil. One JSON per run under benchmarks/results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from unittest import mock

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from film_archive import archive, films
from process_tree import MEDDX, meddx_env
from record import log, machine, write_result

from meddx.config import ScreenConfig
from meddx.inputs import listing
from meddx.inputs.storage import StorageSettings
from meddx.model import registry
from meddx.names import OUTPUT_SCHEMA
from meddx.pipelines import dataset, selection
from meddx.store import commit, index

MODEL = "seednet"
FILM_PX = 64  # small films: the data plane (decode, predict) stays cheap beside selection
RENDERED = 200  # films actually drawn; the other new films are hard links to them
HISTORY_DAYS = 30  # earlier nights the old inputs were scored over, one file each
FIRST_NIGHT = dt.date(2026, 1, 1)
PHASES_FILE = Path("_phases.json")  # set per (N, K) in the phases' process
# The untrained model's scores drift from the synthetic history's by construction, and
# its qc flags are not the point: these alarms would only end the night with exit 3.
NO_ALARMS = ["--max-psi", "1e9", "--max-qc-rate", "1.0", "--max-error-rate", "1.0"]


# ---- the data ----------------------------------------------------------------------------


def checkpoint(cache: Path) -> tuple[Path, str]:
    """An untrained seednet at FILM_PX, written once; its path and sha256."""
    path = cache / f"{MODEL}-{FILM_PX}.pt"
    if not path.exists():
        ckpt = registry.untrained_checkpoint(MODEL, input_size=FILM_PX)
        registry.save_checkpoint(ckpt, str(path), StorageSettings())
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def old_uris(root: Path, start: int, stop: int) -> list[str]:
    """URIs of old inputs that never exist on disk: only the history names them."""
    return [f"{root}/old/{i // 10000:04d}/cxr-{i:08d}.png" for i in range(start, stop)]


def write_manifest(path: Path, uris: list[str]) -> None:
    pq.write_table(pa.table({"uri": pa.array(uris, pa.string())}), path)


def history_rows(uris: list[str], sha: str, run_id: str, night: dt.date) -> pa.Table:
    """Rows as a night of meddx screen commits them: status ok, a score, the model's
    sha256, each input's content hash, scored at 02:00 UTC that night."""
    n = len(uris)
    rng = np.random.default_rng(n)
    score = rng.random(n, dtype=np.float32)
    probs = pa.ListArray.from_arrays(
        pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)),
        pa.array(np.stack([1 - score, score], axis=1).ravel()),
    )
    at = dt.datetime.combine(night, dt.time(2), tzinfo=dt.UTC)
    columns = {
        "image_uri": pa.array(uris, pa.string()),
        "status": pa.array(["ok"] * n, pa.string()),
        "label": pa.array(np.where(score >= 0.5, "opacity", "normal"), pa.string()),
        "score": pa.array(score),
        "probs": probs,
        "threshold": pa.array(np.full(n, 0.5, np.float32)),
        "model_name": pa.array([MODEL] * n, pa.string()),
        "model_sha256": pa.array([sha] * n, pa.string()),
        "content_sha256": pa.array(
            [hashlib.sha256(u.encode()).hexdigest() for u in uris], pa.string()
        ),
        "rows": pa.array(np.full(n, FILM_PX, np.int32)),
        "columns": pa.array(np.full(n, FILM_PX, np.int32)),
        "frames": pa.array(np.ones(n, np.int32)),
        "qc": pa.array(["ok"] * n, pa.string()),
        "run_id": pa.array([run_id] * n, pa.string()),
        "scored_at": pa.array([at] * n, pa.timestamp("us", tz="UTC")),
    }
    arrays = [columns.get(f.name, pa.nulls(n, f.type)) for f in OUTPUT_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=OUTPUT_SCHEMA)


def write_history(out: Path, root: Path, n_old: int, model: Path, sha: str) -> None:
    """The N - K old inputs' rows, spread over HISTORY_DAYS nights."""
    ckpt = registry.read_checkpoint(str(model), StorageSettings())[0]
    bounds = np.linspace(0, n_old, HISTORY_DAYS + 1, dtype=np.int64)
    rules = dataset.selection_rules(ScreenConfig(input="", model=str(model), out=str(out)), (ckpt,))
    for day in range(HISTORY_DAYS):
        night = FIRST_NIGHT + dt.timedelta(days=day)
        run_id = f"{night.isoformat()}T020000-bench{day:04d}"
        cfg = ScreenConfig(input="", model=str(model), out=str(out), run_date=night.isoformat())
        # The metadata meddx writes; the runtime is torch, as the nights on this untrained
        # checkpoint resolve it (file_metadata would ask a running Ray).
        with mock.patch.object(dataset, "resolve_runtime", return_value="torch"):
            metadata = dataset.file_metadata((ckpt,), (sha,), run_id, cfg, rules)
        rows = history_rows(old_uris(root, bounds[day], bounds[day + 1]), sha, run_id, night)
        folder = out / f"dt={night.isoformat()}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(rows.replace_schema_metadata(metadata), folder / f"{run_id}-0.parquet")


def prepare(n: int, k: int, cache: Path, model: Path, sha: str) -> dict[str, Path]:
    """The K films, the two manifests and the history template, made once per (N, K)."""
    folder = cache / f"archive-{n}-{k}"
    new = [str(p.resolve()) for p in films(archive(k, str(FILM_PX), False, cache, RENDERED))]
    paths = {
        "night": folder / "_night.parquet",
        "alone": folder / "_alone.parquet",
        "history": folder / "history",
    }
    if not (folder / "_ready").exists():
        log(f"writing the manifests and the history of {n - k:,} rows under {folder}")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        write_manifest(paths["night"], old_uris(folder, 0, n - k) + new)
        write_manifest(paths["alone"], new)
        write_history(paths["history"], folder, n - k, model, sha)
        (folder / "_ready").write_text("ok\n")
    if not (paths["history"] / "_index").exists():
        # What the earlier nights' commits left beside their rows: OUT's index.
        log(f"indexing the history of {n - k:,} rows")
        index.rebuild(str(paths["history"]), StorageSettings())
    return paths


# ---- measuring -----------------------------------------------------------------------------


def night_date() -> str:
    return (FIRST_NIGHT + dt.timedelta(days=HISTORY_DAYS)).isoformat()


def screen_config(manifest: Path, model: Path, out: Path) -> ScreenConfig:
    return ScreenConfig(
        input=str(manifest),
        model=str(model),
        out=str(out),
        run_date=night_date(),
    )


def timed(phases: dict, name: str, fn, *args):
    """``fn(*args)``, its seconds in ``phases[name]``; the phases so far, and the one
    under way, are kept in PHASES_FILE for a process stopped at the cap."""
    start = time.perf_counter()
    PHASES_FILE.write_text(json.dumps({**phases, "running": name, "since": time.time()}))
    value = fn(*args)
    phases[name] = round(time.perf_counter() - start, 2)
    PHASES_FILE.write_text(json.dumps(phases))
    return value


def stop_past(cap: int) -> None:
    """End this process when its RSS passes ``cap`` bytes (the phases' child)."""

    def watch() -> None:
        me = psutil.Process()
        while me.memory_info().rss < cap:
            time.sleep(0.1)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def phase_times(
    paths: dict[str, Path], model: Path, sha: str, k: int, work: Path, cap: int
) -> dict:
    """Listing, selection, the commit's re-selection and the commit of K staged rows,
    timed one by one in this process, as ``meddx.pipelines.run.execute`` calls them, on
    a copy of the history. A failure is reported as an error beside the whole-command
    figures, which stand alone."""
    out = work / "phases-out"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(paths["history"], out)
    cfg = screen_config(paths["night"], model, out)
    phases: dict = {}
    global PHASES_FILE
    PHASES_FILE = work / "_phases.json"
    PHASES_FILE.write_text("{}")
    stop_past(cap)
    try:
        # The listing streams through the selection: one figure for both. Here it runs in
        # this process (a night runs it in a Ray task): this process's peak is its memory.
        source = listing.open_listing(cfg.input, cfg.storage)
        snapshot = index.Snapshot(str(out), cfg.storage)
        todo, seen = timed(
            phases, "listing_selection_s", selection._select, cfg, source, (sha,), snapshot
        )
        phases["selected"], phases["seen"] = todo.num_rows, seen
        selected = todo.select(listing.LISTING_SCHEMA.names)
        run_id = f"{night_date()}T030000-benchphases"
        staged = history_rows(
            todo["image_uri"].to_pylist(), sha, run_id, dt.date.fromisoformat(night_date())
        )
        staging = Path(commit.staging_path(str(out), run_id))
        staging.mkdir(parents=True)
        pq.write_table(staged, staging / "0.parquet")
        # As Screening.check does it: against what the index gained since the selection.
        check = listing.Listing(cfg.input, selected, empty_ok=True)

        def recheck():
            since = index.Snapshot(str(out), cfg.storage).since(snapshot)
            return selection._select(cfg, check, (sha,), since)

        still, _ = timed(phases, "commit_check_s", recheck)
        phases["commit_check_still_new"] = still.num_rows
        timed(
            phases,
            "commit_s",
            lambda: commit.commit(str(out), cfg.storage, run_id, night_date(), fence=lambda: None),
        )
    except Exception as exc:  # the API moved on: the commands' figures still stand
        phases["error"] = f"{type(exc).__name__}: {exc}"[:300]
    if phases.get("selected", k) != k:
        phases["error"] = f"selected {phases['selected']} inputs, not the night's {k}"
    shutil.rmtree(out, ignore_errors=True)
    # This process's peak (imports included): what selection holds in a driver.
    phases["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return phases


def run_screen(manifest: Path, model: Path, out: Path, rss_cap: int) -> dict:
    """``meddx -v screen`` as a process of its own: wall seconds, the driver's peak RSS,
    its summary.json and its log lines (stderr) for phase timestamps. A driver past
    ``rss_cap`` bytes is stopped (SIGTERM, as a scheduler would) before it takes the
    machine, and the run says so."""
    args = ["-v", "screen", str(manifest), "--model", str(model), "--out", str(out)]
    args += ["--run-date", night_date(), "--quiet"]
    args += NO_ALARMS
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(
        [*MEDDX, *args],
        env=meddx_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # Not the checkout: ``-m`` would import ./meddx before PYTHONPATH's.
        cwd=out.parent,
    )
    peak, capped = [0], [False]

    def sample() -> None:
        driver = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], driver.memory_info().rss)
            except psutil.Error:
                return
            if peak[0] > rss_cap and not capped[0]:
                capped[0] = True
                proc.terminate()  # meddx unwinds on SIGTERM: lease released, Ray stopped
            time.sleep(0.1)

    threading.Thread(target=sample, daemon=True).start()
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    if capped[0]:
        return {
            "stopped_at_rss_cap_mib": round(rss_cap / 2**20),
            "seconds_until_stopped": round(seconds, 2),
            "load_average_1min_at_start": round(load, 2),
            "driver_peak_rss_mib": round(peak[0] / 2**20, 1),
        }
    if proc.returncode != 0:
        raise RuntimeError(f"meddx screen failed ({proc.returncode}): {stderr[-2000:]}")
    summary = json.loads((out / "_runs" / f"dt={night_date()}" / "summary.json").read_text())
    return {
        "seconds": round(seconds, 2),
        "load_average_1min_at_start": round(load, 2),
        "driver_peak_rss_mib": round(peak[0] / 2**20, 1),
        "summary_seconds": summary["seconds"],
        "inputs_seen": summary["inputs_seen"],
        "new_inputs": summary["new_inputs"],
        "rows": summary["rows"],
        # The command's own lines (Ray's are left out): summary, warnings, -v debug lines.
        "log_tail": [
            ln for ln in (stdout + stderr).splitlines() if ln.startswith(("meddx", "night "))
        ][-40:],
    }


def measure(n: int, k: int, cache: Path, model: Path, sha: str, repeat: int, cap: int) -> dict:
    """Phases, then ``repeat`` pairs of (baseline, night) in turn; the medians."""
    paths = prepare(n, k, cache, model, sha)
    work = cache / f"archive-{n}-{k}"
    log(f"N={n:,} K={k:,}: phases in-process")
    # In a child process: at 10^7 the selection's Python objects take gigabytes, which
    # must be gone before the nights' drivers are measured beside this process.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        try:
            phases = pool.submit(phase_times, paths, model, sha, k, work, cap).result()
        except BrokenProcessPool:
            phases = json.loads((work / "_phases.json").read_text())
            if "running" in phases:
                phases[phases.pop("running")] = f">{time.time() - phases.pop('since'):.0f}"
            phases["error"] = f"stopped past the RSS cap of {cap / 2**30:.1f} GiB"
    log(f"N={n:,} K={k:,}: phases {phases}")
    runs: dict[str, list[dict]] = {"baseline": [], "night": []}
    for _ in range(repeat):
        for what, manifest in (("baseline", paths["alone"]), ("night", paths["night"])):
            out = work / f"out-{what}"
            shutil.rmtree(out, ignore_errors=True)
            if what == "night":
                shutil.copytree(paths["history"], out)
            r = run_screen(manifest, model, out, cap)
            shutil.rmtree(out, ignore_errors=True)
            runs[what].append(r)
            if "stopped_at_rss_cap_mib" in r:
                log(f"N={n:,} K={k:,}: {what} stopped at the RSS cap: {r}")
                continue
            if r["new_inputs"] != k or r["rows"] != k:
                raise RuntimeError(f"{what}: {r['new_inputs']} selected, {r['rows']} rows, not {k}")
            log(f"N={n:,} K={k:,}: {what} {r['seconds']} s, driver {r['driver_peak_rss_mib']} MiB")

    def median(what: str, key: str) -> float | None:
        done = [r[key] for r in runs[what] if key in r]
        return round(float(np.median(done)), 2) if len(done) == repeat else None

    return {
        "archive": n,
        "night": k,
        "night_s": median("night", "seconds"),
        "baseline_s": median("baseline", "seconds"),
        "ratio": ratio(median("night", "seconds"), median("baseline", "seconds")),
        "driver_peak_rss_mib": max(r["driver_peak_rss_mib"] for r in runs["night"]),
        "baseline_driver_peak_rss_mib": max(r["driver_peak_rss_mib"] for r in runs["baseline"]),
        "pair_ratios": [
            ratio(a.get("seconds"), b.get("seconds"))
            for a, b in zip(runs["night"], runs["baseline"], strict=True)
        ],
        "phases": phases,
        "night_runs": runs["night"],
        "baseline_runs": runs["baseline"],
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def print_table(rows: list[dict]) -> None:
    print("\n| archive | night | night s | baseline s | ratio | driver peak RSS MiB | phases s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["phases"]
        phases = p.get("error") or ", ".join(
            f"{name[:-2]} {p[name]}"
            for name in (
                "listing_s",
                "selection_s",
                "listing_selection_s",
                "commit_check_s",
                "commit_s",
            )
            if name in p
        )
        print(
            f"| {r['archive']:,} | {r['night']:,} | {r['night_s']} | {r['baseline_s']} |"
            f" {r['ratio']} | {r['driver_peak_rss_mib']:,.0f}"
            f" (baseline {r['baseline_driver_peak_rss_mib']:,.0f}) | {phases} |"
        )


def main(args: argparse.Namespace) -> None:
    cache = Path(args.cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    model, sha = checkpoint(cache)
    load_before = os.getloadavg()
    rows = [
        measure(n, k, cache, model, sha, args.repeat, int(args.rss_cap_gib * 2**30))
        for n in (int(float(v)) for v in args.archive.split(","))
        for k in (int(float(v)) for v in args.night.split(","))
    ]
    print_table(rows)
    import meddx

    result = {
        "benchmark": "archive_scale",
        "date": dt.date.today().isoformat(),
        "model": MODEL,
        "film_px": FILM_PX,
        "history_nights": HISTORY_DAYS,
        "manifest": "parquet",
        "machine": machine(),
        "meddx": meddx.__version__,
        "meddx_path": str(Path(meddx.__file__).parent),
        "code": code_version(Path(meddx.__file__).parent),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "note": args.note,
        "runs": rows,
    }
    write_result(result, "archive-")


def code_version(package: Path) -> str:
    """The checkout's commit, '+dirty' when meddx/ has changes not committed, and where
    meddx was imported from when not this checkout (PYTHONPATH=a snapshot)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "meddx"], capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return f"meddx from {package}"
    if package != Path("meddx").resolve():
        return f"checkout at {head}; meddx from {package}"
    return head + ("+dirty" if dirty.stdout.strip() else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", default="1e5,1e6", help="archive sizes N, comma-separated")
    parser.add_argument("--night", default="2000", help="new films K per night, comma-separated")
    parser.add_argument("--cache", default="benchmarks/.cache", help="films, manifests, history")
    parser.add_argument("--repeat", type=int, default=1, help="(baseline, night) pairs each")
    parser.add_argument(
        "--rss-cap-gib",
        type=float,
        default=round(psutil.virtual_memory().total / 2**31, 1),
        help="stop a driver past this RSS and report it [default: half the memory]",
    )
    parser.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
