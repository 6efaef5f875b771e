"""The predict stage's stand-in when warm predictor actors are up (``meddx listen``;
``dataset.keep_warm`` starts them): a light task that hands each decoded batch to one of
them and waits for its rows.

A module of its own, importing neither torch nor the model: the task runs in Ray's
worker processes, and a worker that imported torch for it would pay a second or two on
the first batch of the day.
"""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import ray


def forward(batch: dict[str, np.ndarray], actors: list, run_id: str) -> pa.Table:
    """``batch``'s rows from one of ``actors`` (``WarmPredictors``), drawn at random."""
    return ray.get(random.choice(actors).predict.remote(batch, run_id))


def prime(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Import what the read stage runs, in a worker: ``keep_warm`` runs it once on each
    CPU so that the first batch finds the workers ready (measured on 2 cores: 2.6 s for
    the first batch of two films with it, 5.3 s without)."""
    import meddx.imaging.decode  # noqa: F401
    import meddx.inputs.reading  # noqa: F401
    import meddx.store.films  # noqa: F401

    return batch
