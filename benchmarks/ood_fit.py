"""How many films the out-of-distribution density needs before it can be trusted.

    python benchmarks/ood_fit.py [--models seednet,resnet18] [--sizes 16,32,...] [--fresh 400]

For each model and each training-set size N: the density (meddx/model/ood.py, as
``meddx train`` fits it) is fitted on the features of N synthetic chest films, its
threshold set at the 99th percentile of N/4 validation films, as training does; then
FRESH in-distribution films (the same generator, other seeds) are scored, and the share
above the threshold is what a night of ordinary films would flag as
out_of_distribution. About 1% is the design; the QC alarm fires at 10%. Three draws of
the films per N; the table gives their mean and maximum.

The model's weights are untrained (the seed's): what is measured is the density's
estimate in the model's feature space (its dimension: resnet18 512, seednet 64), not
what the features mean. Writes benchmarks/results/ood-fit-<cpu>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import machine, write_result  # noqa: E402

from meddx.model import ood, registry  # noqa: E402
from meddx.synthetic.chest import render  # noqa: E402

DRAWS = 3


def films(start: int, n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` films from index ``start``, half with an opacity, and their labels."""
    labels = (np.arange(start, start + n) % 2).astype(int)
    images = np.stack(
        [
            render(i, positive=bool(label), size=size, seed=seed)
            for i, label in zip(range(start, start + n), labels, strict=True)
        ]
    )
    return images, labels


def flagged_share(model: str, size: int, n: int, fresh: int, draw: int) -> float:
    ckpt = registry.untrained_checkpoint(model, input_size=size, seed=0)
    train, labels = films(0, n, size, seed=100 + draw)
    val, _ = films(n, max(2, n // 4), size, seed=100 + draw)
    new, _ = films(0, fresh, size, seed=900 + draw)
    fitted = ood.with_density(
        ckpt, ood.features_of(ckpt, [train]), labels, ood.features_of(ckpt, [val])
    )
    density = ood.density_of(fitted)
    import torch

    scores = density.score(torch.as_tensor(ood.features_of(ckpt, [new]))).numpy()
    return float((scores > density.threshold).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="seednet:64,resnet18:224")
    parser.add_argument("--sizes", default="16,32,64,128,256,512,1024")
    parser.add_argument("--fresh", type=int, default=400)
    args = parser.parse_args()
    table = []
    for spec in args.models.split(","):
        model, size = spec.split(":")
        for n in (int(s) for s in args.sizes.split(",")):
            shares = [flagged_share(model, int(size), n, args.fresh, d) for d in range(DRAWS)]
            row = {
                "model": model,
                "input_size": int(size),
                "fit_films": n,
                "flagged_mean": round(float(np.mean(shares)), 4),
                "flagged_max": round(float(np.max(shares)), 4),
            }
            table.append(row)
            print(
                f"{model:9s} N={n:5d}: flagged {row['flagged_mean']:.1%} of {args.fresh} "
                f"fresh films (max {row['flagged_max']:.1%})",
                flush=True,
            )
    write_result(
        {"date": dt.date.today().isoformat(), "machine": machine(), "fresh": args.fresh,
         "model": args.models.replace(":", "").replace(",", "+"), "draws": DRAWS,
         "table": table},
        "ood-fit-",
    )  # fmt: skip


if __name__ == "__main__":
    main()
