"""Join scored rows with ground truth and compute screening metrics.

Single-label: the metrics of ``score`` (the positive class's probability) at the stored
threshold. Multi-label: the top-level figures are the screening task, any finding
(``abnormal``) against none, scored by ``score`` (the highest finding probability) at
the stored threshold (the lowest finding threshold); ``per_class`` has the same metrics
for each finding (its probability in ``probs`` against its 0/1 manifest column, at its
own threshold) and ``macro`` their means over the findings.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.dataset as pads

from meddx import MeddxError
from meddx.inputs import sources, storage
from meddx.inputs.storage import StorageSettings
from meddx.model import metrics
from meddx.names import QC_OK


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


def labelled_scores(table, truth, positive):
    """(rows with a label, their 0/1 truth) from ok rows; labels from a manifest or folder."""
    kept, y_true, unlabelled = [], [], 0
    for r in table.to_pylist():
        if r["status"] != "ok":
            continue
        if truth is not None:
            label = truth.get(r["image_uri"])
        else:
            label = sources.label_from_path(r["image_uri"])
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
    truth = sources.manifest_findings(labels, settings, findings)
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


# The per-finding figures that ``macro`` averages (over findings where they are defined).
MACRO_KEYS = (
    "auroc",
    "average_precision",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "ece",
)


def per_finding(rows, truth, findings, thresholds) -> tuple[dict, dict]:
    """clinical_metrics of each finding's probability at its own threshold, and means."""
    probs = np.array([r["probs"] for r in rows], dtype=float).reshape(-1, len(findings))
    per_class = {
        name: metrics.clinical_metrics(truth[:, k], probs[:, k], thresholds[k])
        for k, name in enumerate(findings)
    }
    macro = {}
    for key in MACRO_KEYS:
        values = [m[key] for m in per_class.values() if not math.isnan(m[key])]
        macro[key] = float(np.mean(values)) if values else math.nan
    return per_class, macro


def evaluate_predictions(
    predictions: str,
    labels: str | None,
    settings: StorageSettings,
    by: str | None = None,
    plots: str | None = None,
) -> dict:
    table, meta = read_predictions(predictions, settings)
    positive = meta.get("meddx.positive_class")
    if positive is None:
        raise MeddxError(f"{predictions} has no meddx metadata (meddx.positive_class)")
    multi_label = json.loads(meta.get("meddx.multi_label", "false"))
    if multi_label:
        findings = json.loads(meta["meddx.class_names"])
        shas = set(table["model_sha256"].to_pylist())
        if len(shas) > 1:  # per-finding thresholds come from one model's metadata
            raise MeddxError(f"predictions mix {len(shas)} checkpoints: evaluate one model")
        rows, truth, unlabelled = finding_truth(table, labels, findings, settings)
        y_true = truth.max(axis=1, initial=0)  # abnormal: any finding present
    else:
        truth = sources.manifest_labels(labels, settings) if labels else None
        rows, y_true, unlabelled = labelled_scores(table, truth, positive)
    if not rows:
        raise MeddxError("no scored row has a label: pass --labels MANIFEST")
    thresholds = set(table["threshold"].to_pylist())
    if len(thresholds) > 1:
        raise MeddxError(f"predictions mix thresholds {sorted(thresholds)}: evaluate one model")
    threshold = thresholds.pop()
    scores = np.array([r["score"] for r in rows], dtype=float)
    result = metrics.clinical_metrics(y_true, scores, threshold)
    if multi_label:
        finding_thresholds = json.loads(meta["meddx.thresholds"])
        result["per_class"], result["macro"] = per_finding(
            rows, truth, findings, finding_thresholds
        )
    else:
        result["per_class"] = {
            positive: {k: result[k] for k in ("auroc", "auroc_ci95", "sensitivity", "specificity")}
        }
    statuses = table["status"].to_pylist()
    result.update(
        rows=len(statuses),
        errors=sum(s != "ok" for s in statuses),
        unlabelled=unlabelled,
        positive_class=positive,
        multi_label=bool(multi_label),
        model_name=meta.get("meddx.model_name"),
        model_sha256=meta.get("meddx.model_sha256"),
    )
    if labels:
        figures = ood_figures(table, sources.read_manifest(labels, settings))
        if figures:
            result["ood"] = figures
    if by:
        result["by"] = {by: subgroups(rows, y_true, scores, threshold, by, labels, settings)}
    if plots:
        from meddx.analysis import plots as plotting

        result["plots"] = plotting.write_evaluation_plots(
            y_true, scores, threshold, plots, settings
        )
        if multi_label:  # the same four plots for each finding, in plots/FINDING/
            for k, name in enumerate(findings):
                result["plots"] += plotting.write_evaluation_plots(
                    truth[:, k],
                    np.array([r["probs"][k] for r in rows], dtype=float),
                    finding_thresholds[k],
                    storage.join(plots, name),
                    settings,
                )
    return result


# The manifest column that says which inputs are chest films like the training data (1)
# and which are not (0), and an optional column naming what each input is.
IN_DISTRIBUTION = "in_distribution"
CATEGORY = "category"


def ood_figures(table, manifest) -> dict | None:
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
    for g in groups.values():
        g["caught_rate"] = (g["flagged"] + g["errors"]) / g["n"]

    def rate(inside: bool) -> float:
        chosen = [g for g in groups.values() if g["in_distribution"] == inside]
        n = sum(g["n"] for g in chosen)
        return sum(g["flagged"] + g["errors"] for g in chosen) / n if n else math.nan

    auroc = math.nan
    if len(set(y)) == 2:
        from sklearn.metrics import roc_auc_score

        auroc = float(roc_auc_score(y, ood_scores))
    return {
        "auroc": auroc,
        "in_distribution_flag_rate": rate(True),
        "out_of_distribution_caught_rate": rate(False),
        "by_category": groups,
    }


def subgroups(rows, y_true, scores, threshold, column, labels, settings) -> dict:
    """The same metrics per value of a predictions column or a manifest column."""
    if column in rows[0]:
        values = [r[column] for r in rows]
    elif labels:
        table = sources.read_manifest(labels, settings)
        if column not in table.column_names:
            raise MeddxError(f"--by {column}: neither the predictions nor {labels} have it")
        lookup = dict(zip(table["uri"].to_pylist(), table[column].to_pylist(), strict=True))
        values = [lookup.get(r["image_uri"]) for r in rows]
    else:
        raise MeddxError(f"--by {column}: no such column in the predictions")
    out = {}
    for value in sorted({str(v) for v in values}):
        mask = np.array([str(v) == value for v in values])
        out[value] = metrics.clinical_metrics(y_true[mask], scores[mask], threshold)
    return out


def write_json(result: dict, uri: str, settings: StorageSettings) -> None:
    text = json.dumps(result, indent=2, allow_nan=True) + "\n"
    storage.write_bytes(uri, text.encode(), settings)
