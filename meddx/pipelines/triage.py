"""The screening worklist, one entry per study: ``OUT/_runs/dt=RUN_DATE/worklist.parquet``
and ``worklist.csv``, for a RIS or a viewer to pick up.

Radiologists read studies, not images: a PA and a lateral of one study are one entry,
not two. A study is the rows' ``study_pseudonym`` (a DICOM study, scored with
MEDDX_PSEUDONYM_KEY set); an image without one (a PNG, a DICOM scored without the key)
is its own study. OUT keeps one row per image; the worklist has one entry per (study,
model), in two sections, each ranked from 1:

- ``positive``: each study with an image at or above its model's threshold that passed
  quality control, highest study score first (with several models, each study's entries
  together, the study of the highest score first).
- ``needs a human read``: each study with an image whose ``qc`` is not ok, whatever the
  scores (a model's score of an image it should not judge is no negative), grouped by
  the study's reasons, highest score first.

A study with both is in both. The columns, in this order (``WORKLIST_SCHEMA``; a reader
may rely on them):

==================  ===========================================================================
section, rank       the section, and the entry's place in it from 1
study_pseudonym     the study's pseudonym; null: the image is its own study
image_uri           the top image: where the study's highest score of the section comes from
score               that score: the study's highest
label               the findings of the section's images (the top image's first); else normal
probs               per class (per finding), the highest probability of the section's images
qc                  the study's QC state: ``ok``, or its images' qc values that are not ok,
                    sorted, joined by ";"
flagged_images      how many of the study's images need a human read
other_images        how many other images the study has (of any status)
other_image_uris    their image_uris (Parquet: a list; CSV: a JSON array)
ood_score .. run_id the top image's: ood_score, instance_pseudonym, modality, view_position,
                    model_name, model_sha256, run_id
==================  ===========================================================================

Triage only orders the reading: every image stays in the results.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from meddx.inputs import storage
from meddx.names import HUMAN_READ, LABEL_SEPARATOR, NO_FINDING, QC_OK

POSITIVE = "positive"
# Between a study's qc reasons: the separator of a multi-label row's findings.
QC_SEPARATOR = LABEL_SEPARATOR
# The top image's columns, as the rows have them.
TOP_IMAGE = [
    "ood_score",
    "instance_pseudonym",
    "modality",
    "view_position",
    "model_name",
    "model_sha256",
    "run_id",
]
WORKLIST_SCHEMA = pa.schema(
    [
        ("section", pa.string()),
        ("rank", pa.int32()),
        ("study_pseudonym", pa.string()),
        ("image_uri", pa.string()),
        ("score", pa.float32()),
        ("label", pa.string()),
        ("probs", pa.list_(pa.float32())),
        ("qc", pa.string()),
        ("flagged_images", pa.int32()),
        ("other_images", pa.int32()),
        ("other_image_uris", pa.list_(pa.string())),
        ("ood_score", pa.float32()),
        ("instance_pseudonym", pa.string()),
        ("modality", pa.string()),
        ("view_position", pa.string()),
        ("model_name", pa.string()),
        ("model_sha256", pa.string()),
        ("run_id", pa.string()),
    ]
)
WORKLIST_COLUMNS = WORKLIST_SCHEMA.names
STUDY = "_study"  # the grouping key: the study's pseudonym, else the image's URI


def needs_qc(rows: pa.Table) -> pa.Expression:
    return pc.and_(pc.equal(rows["status"], "ok"), pc.not_equal(rows["qc"], QC_OK))


def positives(rows: pa.Table) -> pa.Table:
    """Scored rows at or above their model's threshold that passed quality control."""
    return rows.filter(
        pc.and_(
            pc.and_(pc.equal(rows["status"], "ok"), pc.equal(rows["qc"], QC_OK)),
            pc.greater_equal(rows["score"], rows["threshold"]),
        )
    )


def study_of(rows: pa.Table):
    """Each row's study: its study pseudonym, or its own URI when it has none."""
    pseudonym = rows["study_pseudonym"]
    named = pc.fill_null(pc.not_equal(pseudonym, ""), False)
    return pc.if_else(named, pseudonym, rows["image_uri"])


def studies(rows: pa.Table) -> int:
    """How many (study, model) entries ``rows`` make."""
    if rows.num_rows == 0:
        return 0
    keyed = pa.table({STUDY: study_of(rows), "model_sha256": rows["model_sha256"]})
    return keyed.group_by([STUDY, "model_sha256"]).aggregate([]).num_rows


def worklist(rows: pa.Table) -> pa.Table:
    """The night's rows (one per image and model) as the worklist's two sections."""
    rows = rows.append_column(STUDY, study_of(rows))
    members = study_members(rows)
    found = per_study(positives(rows), members)
    # Each study's entries by every model together: ranked by the study's best score.
    best = found.group_by(STUDY).aggregate([("score", "max")])
    at = pc.index_in(found[STUDY], value_set=best[STUDY].combine_chunks())
    found = found.append_column("_study_best", best["score_max"].take(at)).sort_by(
        [
            ("_study_best", "descending"),
            (STUDY, "ascending"),
            ("score", "descending"),
            ("model_name", "ascending"),
        ]
    )
    flagged = per_study(rows.filter(needs_qc(rows)), members).sort_by(
        [
            ("qc", "ascending"),
            ("score", "descending"),
            (STUDY, "ascending"),
            ("model_name", "ascending"),
        ]
    )
    sections = []
    for name, table in ((POSITIVE, found), (HUMAN_READ, flagged)):
        n = table.num_rows
        table = table.append_column("section", pa.array([name] * n, pa.string()))
        table = table.append_column("rank", pa.array(range(1, n + 1), pa.int32()))
        sections.append(table.select(WORKLIST_COLUMNS).cast(WORKLIST_SCHEMA))
    return pa.concat_tables(sections)


def study_members(rows: pa.Table) -> dict[tuple[str, str], tuple[list[str], list[str], int]]:
    """Each (study, model) of the rows: its images' URIs (any status, sorted), the qc
    values of its scored images that are not ok (sorted, each once) and how many such
    images it has."""
    keys = [STUDY, "model_sha256"]
    images = rows.select([*keys, "image_uri"]).sort_by("image_uri")
    images = images.group_by(keys, use_threads=False).aggregate([("image_uri", "list")])
    flagged = rows.filter(needs_qc(rows)).select([*keys, "qc"]).sort_by("qc")
    flagged = flagged.group_by(keys, use_threads=False).aggregate(
        [("qc", "distinct"), ("qc", "count")]
    )
    reasons = {(s, m): (q, n) for s, m, q, n in zip(*flagged.to_pydict().values(), strict=True)}
    return {
        (s, m): (uris, *reasons.get((s, m), ([], 0)))
        for s, m, uris in zip(*images.to_pydict().values(), strict=True)
    }


# The columns an entry computes from its study's images (the others are its top image's).
DERIVED = ("label", "probs", "qc", "flagged_images", "other_images", "other_image_uris")


def per_study(chosen: pa.Table, members: dict) -> pa.Table:
    """One entry per (study, model) of the ``chosen`` rows (a section's images): its top
    image's columns, the images' findings and highest probability per class, and from
    ``members`` the study's QC state and its other images."""
    keys = [STUDY, "model_sha256"]
    chosen = chosen.sort_by(
        [
            (STUDY, "ascending"),
            ("model_sha256", "ascending"),
            ("score", "descending"),
            ("image_uri", "ascending"),
        ]
    )
    chosen = chosen.append_column("_at", pa.array(np.arange(chosen.num_rows), pa.int64()))
    groups = chosen.group_by(keys, use_threads=False).aggregate([("_at", "list")])
    at = groups["_at_list"].to_pylist()
    top = chosen.take(pa.array([g[0] for g in at], pa.int64()))
    labels, probs = chosen["label"].to_pylist(), chosen["probs"].to_pylist()
    entries: dict[str, list] = {name: [] for name in DERIVED}
    for group, study, model, uri in zip(
        at,
        top[STUDY].to_pylist(),
        top["model_sha256"].to_pylist(),
        top["image_uri"].to_pylist(),
        strict=True,
    ):
        uris, reasons, flagged = members[(study, model)]
        others = [u for u in uris if u != uri]
        entries["label"].append(findings_of([labels[i] for i in group]))
        entries["probs"].append(highest([probs[i] for i in group]))
        entries["qc"].append(QC_SEPARATOR.join(reasons) or QC_OK)
        entries["flagged_images"].append(flagged)
        entries["other_images"].append(len(others))
        entries["other_image_uris"].append(others)
    out = top.select([STUDY, "study_pseudonym", "image_uri", "score", *TOP_IMAGE])
    for name, values in entries.items():
        out = out.append_column(name, pa.array(values, WORKLIST_SCHEMA.field(name).type))
    return out


def findings_of(labels: list[str | None]) -> str:
    """The findings the images' labels name, each once, in the order first named (the
    top image's first); ``normal`` when none does."""
    found: dict[str, None] = {}
    for label in labels:
        for name in (label or "").split(LABEL_SEPARATOR):
            if name and name != NO_FINDING:
                found[name] = None
    return LABEL_SEPARATOR.join(found) or NO_FINDING


def highest(probs: list[list[float] | None]) -> list[float] | None:
    """Each class's highest probability over the images (null if an image has none)."""
    if not probs or any(p is None for p in probs):
        return None
    return np.max(np.asarray(probs, dtype=np.float32), axis=0).tolist()


# ---- the files a RIS or a viewer picks up ------------------------------------------------

# A spreadsheet runs a cell that starts with one of these as a formula (=HYPERLINK(...)
# opens a URL, older ones ran commands): OWASP's CSV-injection list, tab and CR included.
FORMULA_START = r"^[=+\-@\t\r]"


def spreadsheet_safe(table: pa.Table) -> pa.Table:
    """Every string cell that a spreadsheet would run as a formula, prefixed with a
    quote (shown as text, OWASP's advice); numbers and other cells as they are."""
    for i, column in enumerate(table.columns):
        if pa.types.is_string(column.type):
            risky = pc.fill_null(pc.match_substring_regex(column, FORMULA_START), False)
            quoted = pc.binary_join_element_wise("'", column, "")
            table = table.set_column(i, table.field(i), pc.if_else(risky, quoted, column))
    return table


def as_csv_cells(table: pa.Table) -> pa.Table:
    """List columns as JSON arrays (a CSV cell holds text; a URI may hold any separator),
    each float as float32 prints it; then every cell spreadsheet-safe."""
    for i, field in enumerate(table.schema):
        if pa.types.is_list(field.type):
            floats = pa.types.is_floating(field.type.value_type)
            cells = [
                None
                if values is None
                else json.dumps([float(str(np.float32(v))) for v in values] if floats else values)
                for values in table.column(i).to_pylist()
            ]
            table = table.set_column(i, field.with_type(pa.string()), pa.array(cells, pa.string()))
    return spreadsheet_safe(table)


def write_worklist(folder: str, triage: pa.Table, settings) -> None:
    """``worklist.parquet`` and ``worklist.csv`` under ``folder``."""
    buf = pa.BufferOutputStream()
    pq.write_table(triage, buf)
    storage.write_bytes(
        storage.join(folder, "worklist.parquet"), buf.getvalue().to_pybytes(), settings
    )
    csv_buf = pa.BufferOutputStream()
    pacsv.write_csv(as_csv_cells(triage), csv_buf)
    storage.write_bytes(
        storage.join(folder, "worklist.csv"), csv_buf.getvalue().to_pybytes(), settings
    )
