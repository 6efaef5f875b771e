"""The predict stage: the run's models in each Ray actor, loaded once, run under
inference mode.

Kept apart from the Ray pipeline so it can be tested and benchmarked on its own. The
actor receives decoded uint8 batches; error rows pass through untouched (the model
never sees them) and every row comes out in the output schema. With several models
(``Predictors``), each film decoded once goes through each model that needs it: one
row per (input, model).
"""

from __future__ import annotations

import datetime as dt
import hashlib

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from meddx.imaging.decode import INFO_DEFAULTS
from meddx.imaging.dicom import refused_modality
from meddx.inputs.storage import StorageSettings
from meddx.model import ood, registry
from meddx.model.forward import LoadedModel, default_device
from meddx.model.precision import checkpoint_precision, resolve_precision
from meddx.model.registry import Checkpoint
from meddx.names import (
    LABEL_SEPARATOR,
    NO_FINDING,
    OUTPUT_SCHEMA,
    QC_OK,
    QC_OOD,
    QC_WRONG_VIEW,
)


class Predictor(LoadedModel):
    """Loads the model once per actor and turns batches into output rows: scores,
    labels and the out-of-distribution score, under the run's id."""

    def __init__(
        self,
        checkpoint: str | Checkpoint,
        settings: StorageSettings,
        precision: str,
        run_id: str,
        expected_sha256: str | None = None,
        *,
        threads: int | None = None,
        compile_model: bool = False,
        runtime: str = "torch",
        modalities: tuple[str, ...] | None = None,
        views: tuple[str, ...] | None = None,
    ):
        if isinstance(checkpoint, Checkpoint):  # already in memory (training's own checks)
            ckpt = checkpoint
            self.model_sha256 = hashlib.sha256(registry.checkpoint_bytes(ckpt)).hexdigest()
        else:
            # The driver passes the hash it read: a file swapped mid-run is refused.
            ckpt, self.model_sha256 = registry.read_checkpoint(
                checkpoint, settings, expected_sha256
            )
        self.precision = checkpoint_precision(precision, ckpt)
        super().__init__(
            ckpt,
            resolve_precision(self.precision, default_device()),
            threads=threads,
            compile_model=compile_model,
            runtime=runtime,
        )
        self.run_id = run_id
        # This model's own modality and view rules, where the films were decoded for
        # several models' (None: decoding applied this model's).
        self.modalities, self.views = modalities, views
        # The out-of-distribution density (ood.py), scored from the same forward pass.
        density = ood.density_of(ckpt)
        self.density = density.to(self.device) if density is not None else None

    @torch.inference_mode()
    def ood_scores(self, features: np.ndarray | None) -> np.ndarray | None:
        if self.density is None or features is None:
            return None
        return self.density.score(torch.from_numpy(features).to(self.device)).cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        batch = self.fitted(batch)
        ok = batch["status"] == "ok"
        n = len(ok)
        probs, scores, labels, ood_scores = [None] * n, [None] * n, [None] * n, [None] * n
        # The checks before the model (decode.qc_of) stand; a film that passed them is
        # out of distribution when its features are far from the training data.
        qc = [q or None for q in batch["qc"].tolist()]
        if ok.any():
            p, features = self.infer(batch["image"][ok])
            distances = self.ood_scores(features)
            for j, (i, row) in enumerate(zip(np.flatnonzero(ok), p, strict=True)):
                probs[i] = row.tolist()
                scores[i] = self.score_for(row)
                labels[i] = self.label_for(row)
                if distances is not None:
                    ood_scores[i] = float(distances[j])
                    if qc[i] == QC_OK and distances[j] > self.density.threshold:
                        qc[i] = QC_OOD
        columns = {
            "image_uri": batch["image_uri"].tolist(),
            "status": batch["status"].tolist(),
            "error": [e or None for e in batch["error"].tolist()],
            "label": labels,
            "score": scores,
            "probs": probs,
            "threshold": [self.ckpt.threshold] * n,
            "model_name": [self.ckpt.model_name] * n,
            "model_sha256": [self.model_sha256] * n,
            "content_sha256": [h or None for h in batch["content_sha256"].tolist()],
            # "" and 0 mean unknown between stages; null in the output.
            **{name: [v or None for v in batch[name].tolist()] for name in INFO_DEFAULTS},
            "qc": qc,
            "ood_score": ood_scores,
            "run_id": [self.run_id] * n,
            "scored_at": [dt.datetime.now(dt.UTC)] * n,
        }
        return pa.Table.from_pydict(columns, schema=OUTPUT_SCHEMA)

    def fitted(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch as this model takes it, where the films were decoded for several:
        squashed to its input size (one antialiased bilinear step from the largest
        model's), a DICOM film of a modality it does not accept an error row, and a view
        it does not read ``wrong_view``, with decoding's one-line reasons."""
        size = self.ckpt.input_size
        images = batch["image"]
        if images.ndim == 3 and images.shape[1:] != (size, size):
            images = (
                np.stack(
                    [
                        np.asarray(Image.fromarray(i).resize((size, size), Image.BILINEAR))
                        for i in images
                    ]
                )
                if len(images)
                else np.zeros((0, size, size), np.uint8)
            )
            batch = {**batch, "image": images}
        if not self.modalities and not self.views:
            return batch
        status, error, qc = batch["status"].copy(), batch["error"].copy(), batch["qc"].copy()
        for i, (st, modality, view) in enumerate(
            zip(status, batch["modality"], batch["view_position"], strict=True)
        ):
            if st != "ok":
                continue
            dicom = bool(modality or batch["photometric"][i] or batch["transfer_syntax"][i])
            refused = refused_modality(modality, self.modalities) if dicom else None
            if refused:  # selected out by this model's modality rule, as decoding does
                status[i], error[i], qc[i] = "skipped", f'rule "modality": {refused}', ""
            elif self.views and view and view.upper() not in self.views:
                qc[i] = QC_WRONG_VIEW
        return {**batch, "status": status, "error": error, "qc": qc}

    def score_for(self, probs: np.ndarray) -> float:
        """The worklist score: the positive class's probability, or for multi-label the
        highest finding probability."""
        if self.ckpt.multi_label:
            return float(probs.max())
        return float(probs[self.ckpt.positive_index])

    def label_for(self, probs: np.ndarray) -> str:
        names = self.ckpt.class_names
        if self.ckpt.multi_label:
            found = [
                n for n, p, t in zip(names, probs, self.ckpt.thresholds, strict=True) if p >= t
            ]
            return LABEL_SEPARATOR.join(found) or NO_FINDING
        if len(names) == 2:
            positive = self.ckpt.positive_index
            return names[positive if probs[positive] >= self.ckpt.threshold else 1 - positive]
        return names[int(np.argmax(probs))]


class Predictors:
    """The run's models in one actor (``--model`` more than once): each batch, read and
    decoded once, goes through every model its rows' ``models`` bit masks name (all of
    them without the column): one row per (input, model), in the run's model order."""

    def __init__(
        self, models: list[dict], settings: StorageSettings, precision: str, run_id: str, **kwargs
    ):
        self.models = [
            Predictor(
                m["checkpoint"],
                settings,
                precision,
                run_id,
                m["sha256"],
                runtime=m["runtime"],
                modalities=m.get("modalities"),
                views=m.get("views"),
                **kwargs,
            )
            for m in models
        ]

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        masks = batch.get("models")
        tables = []
        for m, predictor in enumerate(self.models):
            rows = None if masks is None else (np.asarray(masks) >> m) & 1 == 1
            if rows is not None and not rows.all():
                if not rows.any():
                    continue
                part = {k: v[rows] for k, v in batch.items()}
            else:
                part = batch
            tables.append(predictor(part))
        return pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table()


class WarmPredictors:
    """``Predictors`` kept up across runs, as a Ray actor: each call names its run.
    A Ray Data pipeline starts its actor pool with each dataset and ends it with it;
    ``meddx listen`` scores a study or two at a time, and the actors' start and the
    models' load would be most of every batch. (``meddx.pipelines.dataset.keep_warm``.)"""

    def __init__(self, models: list[dict], settings: StorageSettings, precision: str, **kwargs):
        self.inner = Predictors(models, settings, precision, run_id="", **kwargs)

    def ready(self) -> bool:
        return True

    def predict(self, batch: dict[str, np.ndarray], run_id: str) -> pa.Table:
        for predictor in self.inner.models:
            predictor.run_id = run_id
        return self.inner(batch)
