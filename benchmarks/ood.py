"""Quality control measured: how many chest films are flagged, how many others are caught.

    make bench-qc        # or: .venv/bin/python benchmarks/ood.py --models seednet,densenet121

For each model: ``meddx train`` on synthetic chest films (which fits the density), then
``meddx score --modalities any`` over ``meddx synth --quality-set`` (held-out chest films
and images that are not: lateral, inverted, rotated, blank, noise, text, photographs,
pydicom's CT/MR/US/SC...), then ``meddx evaluate --labels`` for the per-category rates.
``--modalities any`` lets the non-radiograph DICOMs reach the model, so the table shows
what quality control catches, not what the Modality check refuses.

Also, side by side on the same decoded images, the AUROC (chest films against the rest)
of three out-of-distribution scores the model could give: the Mahalanobis distance
meddx uses, the energy score (-logsumexp of the logits) and 1 - the highest softmax
probability. Writes benchmarks/results/qc-<cpu>-<date>.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
MEDDX = [sys.executable, "-m", "meddx"]
sys.path.insert(0, str(REPO / "benchmarks"))

from record import machine  # noqa: E402


def run(args: list[str], env: dict) -> str:
    done = subprocess.run([*MEDDX, *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"meddx {' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def score_alternatives(checkpoint: str, manifest: Path) -> dict:
    """AUROC of Mahalanobis, energy and max-softmax scores on the decoded quality set."""
    import csv

    from sklearn.metrics import roc_auc_score

    from meddx.imaging.decode import DecodeError, DecodeSettings, decode_image
    from meddx.imaging.transforms import to_model_input
    from meddx.inputs.storage import StorageSettings
    from meddx.model import ood, registry

    ckpt, _ = registry.read_checkpoint(checkpoint, StorageSettings())
    settings = DecodeSettings(size=ckpt.input_size, modalities=None, views=None)
    images, truth = [], []
    with open(manifest) as fh:
        for row in csv.DictReader(fh):
            try:
                image, _ = decode_image(Path(row["uri"]).read_bytes(), settings)
            except DecodeError:
                continue
            images.append(image)
            truth.append(0 if int(row["in_distribution"]) else 1)
    model = registry.features_model(ckpt)
    x = to_model_input(
        torch.from_numpy(np.stack(images)), torch.tensor(ckpt.mean), torch.tensor(ckpt.std)
    )
    with torch.inference_mode():
        logits, features = zip(*(model(x[i : i + 64]) for i in range(0, len(x), 64)), strict=True)
        logits, features = torch.cat(logits).float(), torch.cat(features).float()
        mahalanobis = ood.density_of(ckpt).score(features).numpy()
        energy = (-torch.logsumexp(logits, dim=1)).numpy()
        probs = torch.sigmoid(logits) if ckpt.multi_label else torch.softmax(logits, dim=1)
        max_softmax = (1 - probs.max(dim=1).values).numpy()
    return {
        name: round(float(roc_auc_score(truth, scores)), 4)
        for name, scores in (
            ("mahalanobis", mahalanobis),
            ("energy", energy),
            ("max_softmax", max_softmax),
        )
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="seednet,densenet121")
    parser.add_argument("--train-n", type=int, default=480)
    parser.add_argument("--chest-n", type=int, default=200, help="held-out chest films")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks/.cache/qc")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    work = args.work
    train_data, qc_data = work / f"train-{args.train_n}", work / f"quality-{args.chest_n}"
    if not (train_data / "_manifest.csv").exists():
        run(
            ["synth", str(train_data), "--n", str(args.train_n), "--size", "256", "--seed", "1"],
            env,
        )
    if not (qc_data / "_manifest.csv").exists():
        qc_args = ["synth", str(qc_data), "--quality-set", "--n", str(args.chest_n)]
        run([*qc_args, "--size", "256", "--seed", "99"], env)
    manifest = qc_data / "_manifest.csv"
    result = {"date": dt.date.today().isoformat(), "machine": machine(), "models": {}}
    for name in args.models.split(","):
        ckpt = work / f"{name}.pt"
        print(f"training {name} ...", file=sys.stderr, flush=True)
        train = [
            "train",
            str(train_data),
            "--out",
            str(ckpt),
            "--model",
            name,
            "--epochs",
            str(args.epochs),
            "--image-size",
            str(args.image_size),
            "--workers",
            "2",
            "--progress-seconds",
            "600",
        ]
        run(train, env)
        out = work / f"scored-{name}"
        print(f"scoring the quality set with {name} ...", file=sys.stderr, flush=True)
        run(
            [
                "score",
                str(qc_data),
                "--model",
                str(ckpt),
                "--out",
                str(out),
                "--modalities",
                "any",
                "--quiet",
                "--run-date",
                "2026-12-04",
            ],
            env,
        )
        report = work / f"evaluate-{name}.json"
        run(["evaluate", str(out), "--labels", str(manifest), "--json", str(report)], env)
        figures = json.loads(report.read_text())
        result["models"][name] = {
            "val_auroc": figures.get("auroc"),
            "ood": figures["ood"],
            "auroc_by_score": score_alternatives(str(ckpt), manifest),
        }
        print(json.dumps(result["models"][name], indent=1), file=sys.stderr, flush=True)
    cpu = result["machine"]["cpu"].replace(" ", "-").lower()
    path = REPO / "benchmarks/results" / f"qc-{cpu}-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {path}")


def print_table(result: dict) -> None:
    names = list(result["models"])
    categories = list(next(iter(result["models"].values()))["ood"]["by_category"])
    print("| category | " + " | ".join(f"{n}: caught / n" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for c in categories:
        cells = []
        for n in names:
            g = result["models"][n]["ood"]["by_category"][c]
            cells.append(f"{g['flagged'] + g['errors']} / {g['n']} ({g['caught_rate']:.0%})")
        print(f"| {c} | " + " | ".join(cells) + " |")
    for n in names:
        o = result["models"][n]["ood"]
        print(
            f"{n}: chest films flagged {o['in_distribution_flag_rate']:.1%}, others caught "
            f"{o['out_of_distribution_caught_rate']:.1%}, ood_score AUROC {o['auroc']:.4f}; "
            f"AUROC by score {result['models'][n]['auroc_by_score']}"
        )


if __name__ == "__main__":
    main()
