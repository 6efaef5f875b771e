"""`meddx evaluate`: join scored rows with ground truth and compute screening figures.

Single-label: the figures of ``score`` (the positive class's probability) at the stored
threshold. Multi-label: ``overall`` is the screening task, any finding (``abnormal``)
against none, scored by ``score`` (the highest finding probability) at the stored
threshold (the lowest finding threshold); ``per_class`` has the same figures for each
finding (its probability in ``probs`` against its 0/1 manifest column, at its own
threshold) and ``macro`` their means over the findings.

Results of several models (``meddx score --model A --model B``) are evaluated one model
at a time: its rows and its metadata (``one_model``). ``--by-study``: a study is one
case, positive if any of its images is, its score the highest of its images'.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads

from meddx import MeddxError
from meddx.config import EvaluateConfig
from meddx.inputs import listing, storage
from meddx.inputs.storage import StorageSettings
from meddx.model import metrics
from meddx.names import QC_OK


@dataclass(frozen=True)
class Figures:
    """The screening figures of one score against one 0/1 truth at one threshold
    (``metrics.clinical_metrics``). AUROC and the figures built on it are NaN when only
    one class is present."""

    n: int
    positives: int
    threshold: float
    accuracy: float
    precision: float
    recall: float
    f1: float
    sensitivity: float
    specificity: float
    ppv: float
    npv: float
    auroc: float
    confusion_matrix: dict[str, int]  # tn, fp, fn, tp
    auroc_ci95: list[float]  # stratified bootstrap
    average_precision: float
    ece: float  # expected calibration error
    calibration_slope: float
    calibration_intercept: float
    # {"0.90": sensitivity at specificity >= 0.90, ...}; empty with one class only.
    sensitivity_at_specificity: dict[str, float] = field(default_factory=dict)
    specificity_at_sensitivity: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, y_true: np.ndarray, scores: np.ndarray, threshold: float) -> Figures:
        return cls(**metrics.clinical_metrics(y_true, scores, threshold))

    def describe(self) -> str:
        """The figures as a person reads them: a few lines and the confusion matrix."""
        cm = self.confusion_matrix
        lo, hi = self.auroc_ci95
        lines = [
            f"n={self.n}  positives={self.positives}  threshold={self.threshold:.3f}",
            f"accuracy={self.accuracy:.4f}  precision={self.precision:.4f}  "
            f"recall={self.recall:.4f}  f1={self.f1:.4f}",
            f"sensitivity={self.sensitivity:.4f}  specificity={self.specificity:.4f}"
            f"  ppv={self.ppv:.4f}  npv={self.npv:.4f}  auroc={self.auroc:.4f}",
            f"auroc 95% CI [{lo:.4f}, {hi:.4f}]  average_precision={self.average_precision:.4f}"
            f"  ece={self.ece:.4f}  calibration slope={self.calibration_slope:.3f}"
            f" intercept={self.calibration_intercept:.3f}",
        ]
        for point, value in self.sensitivity_at_specificity.items():
            lines.append(f"sensitivity at specificity {point}: {value:.4f}")
        for point, value in self.specificity_at_sensitivity.items():
            lines.append(f"specificity at sensitivity {point}: {value:.4f}")
        lines += [
            "confusion matrix (rows: truth, columns: predicted)",
            "              pred_neg  pred_pos",
            f"  truth_neg   {cm['tn']:8d}  {cm['fp']:8d}",
            f"  truth_pos   {cm['fn']:8d}  {cm['tp']:8d}",
        ]
        return "\n".join(lines)


@dataclass(frozen=True)
class MacroMeans:
    """Multi-label: each figure's mean over the findings where it is defined."""

    auroc: float
    average_precision: float
    sensitivity: float
    specificity: float
    ppv: float
    npv: float
    f1: float
    ece: float


@dataclass(frozen=True)
class CategoryFigures:
    """Quality control on one group of inputs (chest films, laterals, noise, ...)."""

    in_distribution: bool  # chest films like the training data
    n: int
    flagged: int  # ok rows whose qc is not ok
    errors: int  # error rows: refused, also never a silent negative
    caught_rate: float  # (flagged + errors) / n


@dataclass(frozen=True)
class QualityControlFigures:
    """How well quality control tells chest films from the rest, when the manifest says
    which is which."""

    auroc: float  # of ood_score; NaN unless both kinds were scored
    in_distribution_flag_rate: float
    out_of_distribution_caught_rate: float
    by_category: dict[str, CategoryFigures]


@dataclass(frozen=True)
class Evaluation:
    """What ``meddx evaluate`` found; ``as_dict`` is the JSON it writes."""

    overall: Figures  # the screening score at the stored threshold
    per_class: dict[str, Figures]  # per finding; single-label: the positive class
    rows: int
    errors: int
    unlabelled: int  # ok rows without a label
    positive_class: str
    multi_label: bool
    model_name: str | None = None
    model_sha256: str | None = None
    macro: MacroMeans | None = None  # multi-label only
    ood: QualityControlFigures | None = None  # when the manifest marks in_distribution
    by_column: str | None = None
    by: dict[str, Figures] = field(default_factory=dict)  # per value of by_column
    plots: tuple[str, ...] = ()  # the PNGs written
    studies: int | None = None  # --by-study: the figures are of this many studies

    def as_dict(self) -> dict:
        """The overall figures at the top level, then the rest by name."""
        out = {**dataclasses.asdict(self.overall)}
        out["per_class"] = {k: dataclasses.asdict(v) for k, v in self.per_class.items()}
        if self.macro is not None:
            out["macro"] = dataclasses.asdict(self.macro)
        out.update(
            rows=self.rows,
            errors=self.errors,
            unlabelled=self.unlabelled,
            positive_class=self.positive_class,
            multi_label=self.multi_label,
            model_name=self.model_name,
            model_sha256=self.model_sha256,
        )
        if self.studies is not None:
            out["studies"] = self.studies
        if self.ood is not None:
            out["ood"] = dataclasses.asdict(self.ood)
        if self.by_column is not None:
            by = {k: dataclasses.asdict(v) for k, v in self.by.items()}
            out["by"] = {self.by_column: by}
        if self.plots:
            out["plots"] = list(self.plots)
        return out


def read_predictions(uri: str, settings: StorageSettings):
    """All rows under a results tree, a ``dt=`` partition or one Parquet file."""
    fs = storage.arrow_filesystem(uri, settings)
    try:
        ds = pads.dataset(
            storage.strip_scheme(uri),
            filesystem=fs,
            format="parquet",
            partitioning="hive",
            exclude_invalid_files=False,
        )
        table = ds.to_table()
    except (FileNotFoundError, OSError) as exc:
        raise MeddxError(f"cannot read predictions at {uri}: {exc}") from None
    if table.num_rows == 0:
        raise MeddxError(f"no prediction rows under {uri}")
    meta = ds.schema.metadata or {}
    return table, {k.decode(): v.decode() for k, v in meta.items()}


# The file metadata that describes one model; the other keys describe the run. The
# top-level ones describe the run's first model, and MODELS lists each model's, in
# --model order (files scored one model at a time have no MODELS).
MODEL_KEYS = (
    "meddx.model_name",
    "meddx.model_sha256",
    "meddx.class_names",
    "meddx.positive_class",
    "meddx.threshold",
    "meddx.multi_label",
    "meddx.thresholds",
    "meddx.input_size",
    "meddx.precision",
    "meddx.runtime",
    "meddx.views",
    "meddx.ood_threshold",
    "meddx.ood_method",
)
MODELS = "meddx.models"
# The shortest sha256 prefix --model-sha256 takes: 8 hex digits, as git's short hashes.
MIN_SHA_PREFIX = 8


def model_metadata(meta: dict[str, str], sha: str) -> dict[str, str]:
    """The metadata as if the results held model ``sha`` alone: the run's keys and that
    model's (from MODELS, or the top-level ones where their sha256 is ``sha`` or
    absent)."""
    run = {k: v for k, v in meta.items() if k not in MODEL_KEYS and k != MODELS}
    if MODELS in meta:
        for described in json.loads(meta[MODELS]):
            if described.get("meddx.model_sha256") == sha:
                return {**run, **described}
    elif meta.get("meddx.model_sha256", sha) == sha:
        return dict(meta)
    raise MeddxError(f"the predictions' metadata does not describe model {sha[:12]}")


def one_model(table, meta: dict[str, str], sha_or_prefix: str | None, what: str):
    """(rows, metadata, sha256) of one model of the results ``what``: the one whose
    sha256 starts with ``sha_or_prefix``, or, when none is given, the only one there."""
    shas = pc.unique(table["model_sha256"].drop_null()).to_pylist()
    if not shas:
        raise MeddxError(f"{what} has no model_sha256 in its rows")
    chosen = shas
    if sha_or_prefix is not None:
        prefix = sha_or_prefix.lower()
        if not re.fullmatch(f"[0-9a-f]{{{MIN_SHA_PREFIX},64}}", prefix):
            raise MeddxError(
                f"--model-sha256 takes at least {MIN_SHA_PREFIX} hex digits of a sha256"
            )
        chosen = [s for s in shas if s.startswith(prefix)]
    if len(chosen) != 1:
        held = ", ".join(f"{_model_name(table, s)} {s[:12]}" for s in _in_run_order(shas, meta))
        if sha_or_prefix is None:
            raise MeddxError(f"{what} holds {len(shas)} models ({held}): --model-sha256 picks one")
        found = f"{len(chosen)} models" if chosen else "no model"
        raise MeddxError(f"--model-sha256 {prefix} matches {found} of {what} ({held})")
    sha = chosen[0]
    return table.filter(pc.equal(table["model_sha256"], sha)), model_metadata(meta, sha), sha


def _model_name(table, sha: str) -> str:
    return table.filter(pc.equal(table["model_sha256"], sha))["model_name"][0].as_py()


def _in_run_order(shas: list[str], meta: dict[str, str]) -> list[str]:
    """The sha256s in --model order where the metadata lists the run's models."""
    listed = [m.get("meddx.model_sha256") for m in json.loads(meta.get(MODELS, "[]"))]
    return sorted(shas, key=lambda s: (listed.index(s) if s in listed else len(listed), s))


def labelled_scores(table, truth, positive):
    """(rows with a label, their 0/1 truth) from ok rows; labels from a manifest or folder."""
    kept, y_true, unlabelled = [], [], 0
    for r in table.to_pylist():
        if r["status"] != "ok":
            continue
        if truth is not None:
            label = truth.get(r["image_uri"])
        else:
            label = listing.label_from_path(r["image_uri"])
        if not label:
            unlabelled += 1
            continue
        kept.append(r)
        y_true.append(label == positive)
    return kept, np.array(y_true, dtype=int), unlabelled


def finding_truth(table, labels: str | None, findings: list[str], settings: StorageSettings):
    """(ok rows with a value for every finding, their 0/1 matrix, unlabelled count)."""
    if not labels:
        raise MeddxError(
            "multi-label predictions need --labels MANIFEST with a 0/1 column per finding "
            f"({', '.join(findings)})"
        )
    truth = listing.manifest_findings(labels, settings, findings)
    kept, y_true, unlabelled = [], [], 0
    for r in table.to_pylist():
        if r["status"] != "ok":
            continue
        flags = truth.get(r["image_uri"])
        if flags is None:
            unlabelled += 1
            continue
        kept.append(r)
        y_true.append(flags)
    return kept, np.array(y_true, dtype=int).reshape(-1, len(findings)), unlabelled


def per_finding(rows, truth, findings, thresholds) -> tuple[dict[str, Figures], MacroMeans]:
    """The figures of each finding's probability at its own threshold, and their means."""
    probs = np.array([r["probs"] for r in rows], dtype=float).reshape(-1, len(findings))
    per_class = {
        name: Figures.of(truth[:, k], probs[:, k], thresholds[k]) for k, name in enumerate(findings)
    }
    means = {}
    for f in dataclasses.fields(MacroMeans):
        values = [v for v in (getattr(m, f.name) for m in per_class.values()) if not math.isnan(v)]
        means[f.name] = float(np.mean(values)) if values else math.nan
    return per_class, MacroMeans(**means)


def by_study(rows: list[dict], truth: np.ndarray, manifest) -> tuple[list[dict], np.ndarray]:
    """Each study of the labelled ``rows`` as one: its top-scoring image's row with each
    class's highest probability, and its 0/1 ``truth`` (a column per finding) the highest
    of its images'. A study: the row's study_pseudonym, else the manifest's study_id,
    else the image alone."""
    ids = {}
    if manifest is not None and "study_id" in manifest.column_names:
        ids = dict(zip(manifest["uri"].to_pylist(), manifest["study_id"].to_pylist(), strict=True))
    studies: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        pseudonym, study_id = r.get("study_pseudonym"), ids.get(r["image_uri"])
        key = ("s", pseudonym) if pseudonym else ("m", study_id) if study_id else ("i", i)
        studies.setdefault(key, []).append(i)
    tops, flags = [], []
    for images in studies.values():
        top = max(images, key=lambda i: rows[i]["score"])
        probs = [rows[i]["probs"] for i in images]
        highest = None if None in probs else np.max(probs, axis=0).tolist()
        tops.append({**rows[top], "probs": highest})
        flags.append(truth[images].max(axis=0))
    return tops, np.array(flags, dtype=int).reshape(len(tops), truth.shape[1])


def evaluate(cfg: EvaluateConfig) -> Evaluation:
    """The figures of cfg.predictions against their labels (plots and JSON when asked)."""
    settings = cfg.storage
    table, meta = read_predictions(cfg.predictions, settings)
    table, meta, sha = one_model(table, meta, cfg.model_sha256, cfg.predictions)
    positive = meta.get("meddx.positive_class")
    if positive is None:
        raise MeddxError(f"{cfg.predictions} has no meddx metadata (meddx.positive_class)")
    multi_label = bool(json.loads(meta.get("meddx.multi_label", "false")))
    if multi_label:
        findings = json.loads(meta["meddx.class_names"])
        rows, truth, unlabelled = finding_truth(table, cfg.labels, findings, settings)
        y_true = truth.max(axis=1, initial=0)  # abnormal: any finding present
    else:
        truth = listing.manifest_labels(cfg.labels, settings) if cfg.labels else None
        rows, y_true, unlabelled = labelled_scores(table, truth, positive)
    if not rows:
        raise MeddxError("no scored row has a label: pass --labels MANIFEST")
    if cfg.by_study:
        manifest = listing.read_manifest(cfg.labels, settings) if cfg.labels else None
        rows, flags = by_study(rows, truth if multi_label else y_true[:, None], manifest)
        y_true, truth = flags.max(axis=1), flags if multi_label else truth
    threshold = rows[0]["threshold"]  # the checkpoint's: one model's rows share it
    scores = np.array([r["score"] for r in rows], dtype=float)
    overall = Figures.of(y_true, scores, threshold)
    per_class, macro = {positive: overall}, None
    if multi_label:
        finding_thresholds = json.loads(meta["meddx.thresholds"])
        per_class, macro = per_finding(rows, truth, findings, finding_thresholds)
    by = {}
    if cfg.by:
        by = subgroups(rows, y_true, scores, threshold, cfg.by, cfg.labels, settings)
    plots = []
    if cfg.plots:
        from meddx.analysis import plots as plotting

        plots = plotting.write_evaluation_plots(y_true, scores, threshold, cfg.plots, settings)
        if multi_label:  # the same four plots for each finding, in plots/FINDING/
            for k, name in enumerate(findings):
                plots += plotting.write_evaluation_plots(
                    truth[:, k],
                    np.array([r["probs"][k] for r in rows], dtype=float),
                    finding_thresholds[k],
                    storage.join(cfg.plots, name),
                    settings,
                )
    statuses = table["status"].to_pylist()
    result = Evaluation(
        overall=overall,
        per_class=per_class,
        rows=len(statuses),
        errors=sum(s == "error" for s in statuses),  # a skipped row is no error
        unlabelled=unlabelled,
        positive_class=positive,
        multi_label=multi_label,
        model_name=meta.get("meddx.model_name"),
        model_sha256=sha,
        macro=macro,
        ood=ood_figures(table, listing.read_manifest(cfg.labels, settings)) if cfg.labels else None,
        by_column=cfg.by or None,
        by=by,
        plots=tuple(plots),
        studies=len(rows) if cfg.by_study else None,
    )
    if cfg.json_path:
        text = json.dumps(result.as_dict(), indent=2, allow_nan=True) + "\n"
        storage.write_bytes(cfg.json_path, text.encode(), settings)
    return result


# The manifest column that says which inputs are chest films like the training data (1)
# and which are not (0), and an optional column naming what each input is.
IN_DISTRIBUTION = "in_distribution"
CATEGORY = "category"


def ood_figures(table, manifest) -> QualityControlFigures | None:
    """How well quality control tells chest films from the rest, when the manifest says
    which is which: the AUROC of ood_score, and per group the share of rows flagged
    (qc not ok) or refused (an error row: also never a silent negative)."""
    if IN_DISTRIBUTION not in manifest.column_names or "qc" not in table.column_names:
        return None
    columns = manifest.column_names
    truth = dict(
        zip(manifest["uri"].to_pylist(), manifest[IN_DISTRIBUTION].to_pylist(), strict=True)
    )
    category = (
        dict(zip(manifest["uri"].to_pylist(), manifest[CATEGORY].to_pylist(), strict=True))
        if CATEGORY in columns
        else {}
    )
    groups: dict[str, dict] = {}
    y, ood_scores = [], []
    for r in table.select(["image_uri", "status", "qc", "ood_score"]).to_pylist():
        value = truth.get(r["image_uri"])
        if value in (None, ""):
            continue
        inside = bool(int(float(value)))
        name = str(category.get(r["image_uri"]) or ("chest" if inside else "not chest"))
        g = groups.setdefault(name, {"in_distribution": inside, "n": 0, "flagged": 0, "errors": 0})
        g["n"] += 1
        if r["status"] != "ok":
            g["errors"] += 1
            continue
        g["flagged"] += r["qc"] != QC_OK
        if r["ood_score"] is not None:
            y.append(0 if inside else 1)
            ood_scores.append(r["ood_score"])
    if not groups:
        return None
    by_category = {
        name: CategoryFigures(**g, caught_rate=(g["flagged"] + g["errors"]) / g["n"])
        for name, g in groups.items()
    }

    def rate(inside: bool) -> float:
        chosen = [g for g in by_category.values() if g.in_distribution == inside]
        n = sum(g.n for g in chosen)
        return sum(g.flagged + g.errors for g in chosen) / n if n else math.nan

    auroc = math.nan
    if len(set(y)) == 2:
        from sklearn.metrics import roc_auc_score

        auroc = float(roc_auc_score(y, ood_scores))
    return QualityControlFigures(
        auroc=auroc,
        in_distribution_flag_rate=rate(True),
        out_of_distribution_caught_rate=rate(False),
        by_category=by_category,
    )


def subgroups(rows, y_true, scores, threshold, column, labels, settings) -> dict[str, Figures]:
    """The same figures per value of a predictions column or a manifest column."""
    if column in rows[0]:
        values = [r[column] for r in rows]
    elif labels:
        table = listing.read_manifest(labels, settings)
        if column not in table.column_names:
            raise MeddxError(f"--by {column}: neither the predictions nor {labels} have it")
        lookup = dict(zip(table["uri"].to_pylist(), table[column].to_pylist(), strict=True))
        values = [lookup.get(r["image_uri"]) for r in rows]
    else:
        raise MeddxError(f"--by {column}: no such column in the predictions")
    out = {}
    for value in sorted({str(v) for v in values}):
        mask = np.array([str(v) == value for v in values])
        out[value] = Figures.of(y_true[mask], scores[mask], threshold)
    return out
