"""The report of a screening night: one self-contained HTML page (plots embedded as PNG).

It names studies only by pseudonym (the DICOM study pseudonym when a key is set, else a
short hash of the input URI): a report gets forwarded and printed, file names can hold
patient names.
"""

from __future__ import annotations

import base64
import html
import io
import platform
from importlib import metadata

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from meddx import __version__  # noqa: E402
from meddx.imaging.dicom import pseudonymous_id  # noqa: E402
from meddx.names import HUMAN_READ  # noqa: E402

HISTORY_RUNS = 7
TOP_WORKLIST = 20


def versions() -> dict[str, str]:
    """The versions the page states: meddx, Python and the libraries scores depend on."""
    found = {"meddx": __version__, "python": platform.python_version()}
    for name in ("torch", "torchvision", "ray", "pyarrow", "pydicom", "numpy"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _png_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def score_history_plot(history: dict[str, np.ndarray], run_date: str, threshold: float) -> str:
    """This night's score histogram over the recent nights' (``history``: date -> scores)."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    bins = np.linspace(0, 1, 26)
    for date, scores in history.items():
        if len(scores) == 0:
            continue
        current = date == run_date
        ax.hist(
            scores,
            bins=bins,
            density=True,
            histtype="stepfilled" if current else "step",
            alpha=0.45 if current else 0.8,
            linewidth=2 if current else 1,
            label=f"{date} (n={len(scores)})" + (" this run" if current else ""),
        )
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label="threshold")
    ax.set_xlabel("score (probability of the positive class)")
    ax.set_ylabel("density")
    ax.set_title("Scores of this run against the recent runs")
    ax.legend(fontsize=7)
    return _png_base64(fig)


def throughput_plot(rows: pa.Table) -> str:
    """Images scored per second over the run, from the rows' ``scored_at``."""
    fig, ax = plt.subplots(figsize=(7, 2.6))
    times = (
        np.array([t.timestamp() for t in rows["scored_at"].to_pylist()])
        if rows.num_rows
        else np.array([])
    )
    if len(times):
        rel = times - times.min()
        width = max(1.0, float(np.ceil((rel.max() + 1e-9) / 30)))  # about 30 bars
        edges = np.arange(0, rel.max() + width + 1e-9, width)
        counts, _ = np.histogram(rel, edges)
        ax.bar(edges[:-1], counts / width, width=width, align="edge", color="#4477aa")
    ax.set_xlabel("seconds since the first scored batch")
    ax.set_ylabel("images/s")
    ax.set_title("Throughput over the run")
    return _png_base64(fig)


def model_label(model: dict) -> str:
    """A model as the night's page and lines name it: its architecture and hash."""
    return f"{model['model_name']} {model['model_sha256'][:12]}"


def render(summary, rows: pa.Table, triage: pa.Table, histories: list[dict], heatmaps=()) -> str:
    """The page of one night: ``summary`` its NightSummary, ``rows`` its rows, ``triage``
    its worklist, ``histories`` each model's date -> ok scores (in --model order),
    ``heatmaps`` (row, PNG) for the top of the worklist."""
    esc = html.escape
    models = summary.models or [
        {
            "model_name": summary.model_name,
            "model_sha256": summary.model_sha256,
            "threshold": summary.threshold,
        }
    ]
    several = len(models) > 1
    plots = [
        (
            f"Score distribution, {esc(model_label(m))}" if several else "Score distribution",
            score_history_plot(history, summary.run_date, m["threshold"]),
        )
        for m, history in zip(models, histories, strict=True)
    ]
    plots.append(("Throughput", throughput_plot(rows)))
    plots += [
        (f"Grad-CAM, worklist #{rank}", base64.b64encode(png).decode())
        for rank, (_, png) in enumerate(heatmaps, start=1)
    ]
    counts = [
        ("inputs seen", summary.inputs_seen),
        ("new or changed", summary.new_inputs),
        ("rows written", summary.rows),
        ("scored ok", summary.ok),
        ("errors", summary.errors),
        ("error rate", f"{summary.error_rate:.1%}"),
        ("positive images", summary.positives),
        ("positive studies (worklist)", summary.positive_studies),
        ("images needing a human read (qc not ok)", summary.qc_flagged),
        ("studies needing a human read", summary.qc_flagged_studies),
        ("quality-control rate", f"{summary.qc_rate:.1%}"),
        ("seconds", summary.seconds),
        ("images/s", summary.images_per_s),
    ]
    if summary.drift:
        counts.append(("drift (PSI)", round(summary.drift.psi, 4)))
    reasons = (
        "".join(
            f"<tr><td>{esc(r)}</td><td>{n}</td></tr>" for r, n in summary.errors_by_reason.items()
        )
        or "<tr><td colspan=2>none</td></tr>"
    )

    def section(name: str) -> list[dict]:
        return [r for r in triage.to_pylist() if r["section"] == name][:TOP_WORKLIST]

    def model_cell(r: dict) -> str:  # which model found it, where several looked
        return f"<td>{esc(r['model_name'])} <code>{esc(r['model_sha256'][:12])}</code></td>"

    work = (
        "".join(
            f"<tr><td>{r['rank']}</td><td><code>{esc(pseudonymous_id(r))}</code></td>"
            f"{model_cell(r) if several else ''}"
            f"<td>{r['score']:.3f}</td><td>{esc(r['label'] or '')}</td>"
            f"<td>{r['other_images'] + 1}</td><td>{esc(r['qc'])}</td>"
            f"<td>{esc(r['modality'] or '')}</td></tr>"
            for r in section("positive")
        )
        or f"<tr><td colspan={8 if several else 7}>no positives above the threshold</td></tr>"
    )
    per_model = "".join(
        f"<tr><td>{esc(m['model_name'])} <code>{esc(m['model_sha256'][:16])}</code></td>"
        f"<td>{m['threshold']:.3f}</td><td>{m['ok']}</td><td>{m['errors']}</td>"
        f"<td>{m['positives']}</td><td>{m['qc_flagged']}</td>"
        f"<td>{'' if m.get('psi') is None else m['psi']}</td></tr>"
        for m in summary.models
    )
    human = (
        "".join(
            f"<tr><td>{r['rank']}</td><td><code>{esc(pseudonymous_id(r))}</code></td>"
            f"<td>{esc(r['qc'])}</td><td>{r['flagged_images']} of {r['other_images'] + 1}</td>"
            f"<td>{r['score']:.3f}</td>"
            f"<td>{'' if r['ood_score'] is None else format(r['ood_score'], '.2f')}</td>"
            f"<td>{esc(r['view_position'] or '')}</td></tr>"
            for r in section(HUMAN_READ)
        )
        or "<tr><td colspan=7>none: every scored image passed quality control</td></tr>"
    )
    qc_reasons = "".join(
        f"<tr><td>{esc(r)}</td><td>{n}</td></tr>" for r, n in summary.qc_by_reason.items()
    )
    alarms = "".join(f"<li>{esc(a)}</li>" for a in summary.alarms)
    version_rows = "".join(
        f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in summary.versions.items()
    )
    images = "".join(
        f'<figure><img alt="{esc(title)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{esc(title)}</figcaption></figure>"
        for title, data in plots
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>meddx screening {esc(summary.run_date)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 60em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; }}
.alarm {{ background: #fde2e1; border: 1px solid #d33; padding: 0.5em 1em; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; }}
</style></head>
<body data-images="pending">
<h1>meddx screening, {esc(summary.run_date)}</h1>
<p>Run <code>{esc(summary.run_id)}</code> &middot; {
        f"{len(models)} models, each film read once"
        if several
        else f"model {esc(summary.model_name)} <code>{esc(summary.model_sha256[:16])}</code>"
        f" &middot; threshold {summary.threshold:.3f}"
    }</p>
{f'<div class="alarm"><strong>Alarms</strong><ul>{alarms}</ul></div>' if alarms else ""}
<h2>Counts</h2>
<table>{"".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in counts)}</table>
{
        f'''<h2>Models</h2>
<table><tr><th>model</th><th>threshold</th><th>ok</th><th>errors</th><th>positives</th>
<th>needs a human read</th><th>drift (PSI)</th></tr>{per_model}</table>'''
        if several
        else ""
    }
<h2>Errors by reason</h2>
<table><tr><th>reason</th><th>rows</th></tr>{reasons}</table>
<h2>Worklist (top {TOP_WORKLIST})</h2>
<p>Studies with an image above the threshold, by the study's highest score{
        " (each study's findings by every model together)" if several else ""
    }; its label names the findings of all its images, qc its images' quality-control
state. Pseudonymised ids only. Triage orders the reading: every study stays in the
results.</p>
<table><tr><th>rank</th><th>study</th>{"<th>model</th>" if several else ""}<th>score</th>
<th>label</th><th>images</th><th>qc</th><th>modality</th></tr>
{work}</table>
<h2>Needs a human read ({summary.qc_flagged_studies})</h2>
<p>Studies with an image the model should not judge alone: out of its training
distribution, of low quality, or a view it was not trained on. They are never silent
negatives, whatever their score; read them first-hand.</p>
{f"<table><tr><th>reason</th><th>images</th></tr>{qc_reasons}</table>" if qc_reasons else ""}
<table><tr><th>rank</th><th>study</th><th>qc</th><th>images flagged</th><th>score</th>
<th>ood score</th><th>view</th></tr>
{human}</table>
<h2>Plots</h2>
{images}
<h2>Versions</h2>
<table>{version_rows}
{
        "".join(
            f"<tr><td>model sha256</td><td><code>{esc(m['model_sha256'])}</code></td></tr>"
            for m in models
        )
    }</table>
<script>
window.addEventListener("load", function () {{
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }}).length;
  document.body.setAttribute("data-images", ok + "/" + imgs.length);
}});
</script>
</body></html>
"""
