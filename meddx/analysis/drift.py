"""Score drift: this night's score distribution against the recent nights'.

The reference is this model's ok scores of the ``window`` run dates before this one (a
re-run of the same night is not its own reference); the population stability index
(PSI) over the reference's deciles measures the difference. Only the partitions needed
are read: the reference window and the report's history.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc

from meddx.inputs.storage import StorageSettings
from meddx.store import commit

# PSI needs enough scores on both sides to mean anything.
MIN_DRIFT_SAMPLES = 30


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index over the reference's deciles (0: same distribution)."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)))
    edges[0], edges[-1] = -np.inf, np.inf
    ref = np.histogram(reference, edges)[0] / len(reference)
    cur = np.histogram(current, edges)[0] / len(current)
    # An empty bin would make the log infinite: a floor of 1e-4 keeps PSI finite.
    ref, cur = np.clip(ref, 1e-4, None), np.clip(cur, 1e-4, None)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


@dataclass(frozen=True)
class Drift:
    psi: float
    reference_dates: list[str]
    reference_n: int
    current_n: int


def scores_by_date(
    out: str, settings: StorageSettings, sha: str, dates: list[str]
) -> dict[str, np.ndarray]:
    """This model's ok scores for each of ``dates`` (only those partitions are read)."""
    rows = commit.read_results(
        out,
        settings,
        ["score", "dt"],
        where=(pc.field("status") == "ok") & (pc.field("model_sha256") == sha),
        dates=dates,
    )
    by_date = {}
    for d in dates:  # Arrow to numpy per night: no Python object per row
        scores = rows.filter(pc.equal(rows["dt"], d))["score"]
        if len(scores):
            by_date[d] = scores.to_numpy().astype(float)
    return by_date


def recent_scores(
    out: str, settings: StorageSettings, sha: str, run_date: str, window: int, history: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(reference: the ``window`` nights before ``run_date``, history: the last
    ``history`` nights up to and including it), each ``{date: scores}``."""
    dates = commit.partition_dates(out, settings)
    before = [d for d in dates if d < run_date][-window:]
    shown = [d for d in dates if d <= run_date][-history:]
    by_date = scores_by_date(out, settings, sha, sorted({*before, *shown}))
    reference = {d: by_date[d] for d in before if d in by_date}
    return reference, {d: by_date[d] for d in shown if d in by_date}


def measure(reference: dict[str, np.ndarray], current: np.ndarray) -> Drift | None:
    """PSI of ``current`` against the pooled reference, when both sides are large enough."""
    pooled = np.concatenate(list(reference.values()) or [np.array([])])
    if len(current) < MIN_DRIFT_SAMPLES or len(pooled) < MIN_DRIFT_SAMPLES:
        return None
    return Drift(
        psi=psi(pooled, current),
        reference_dates=list(reference),
        reference_n=len(pooled),
        current_n=len(current),
    )
