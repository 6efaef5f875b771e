"""Several models in one pass (``--model`` more than once) on a real local Ray and the
S3 endpoint: each film read and decoded once, one row per (input, model), each model
under its own threshold, rules and provenance, exactly once per (input, model)."""

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from pydicom.data import get_testdata_file

from meddx import MeddxError
from meddx.cli import cli
from meddx.config import ScoreConfig, ScreenConfig
from meddx.inputs import reading
from meddx.inputs.storage import StorageSettings, filesystem
from meddx.model import registry
from meddx.pipelines.run import ModelRows
from meddx.pipelines.scoring import score
from meddx.pipelines.screening import screen
from meddx.store import commit, index

from .images import dicom_cr, png

LOCAL = StorageSettings()
SEP = reading.KNOWN_SEPARATOR


def checkpoint(folder: Path, name: str, **kwargs) -> tuple[str, str]:
    ckpt = registry.untrained_checkpoint("seednet", **kwargs)
    path = folder / f"{name}.pt"
    return str(path), registry.save_checkpoint(ckpt, str(path), LOCAL)


def by_model(out: str, settings=LOCAL) -> dict[str, dict[str, dict]]:
    """OUT's rows as {model_sha256: {image_uri: row}}, of the last version of each input
    (its content), asserting each (input, content, model) scored once."""
    columns = ["image_uri", "content_sha256", "model_sha256", "status", "error", "score",
               "threshold", "qc", "scored_at", "dt"]  # fmt: skip
    rows = commit.read_results(out, settings, columns).sort_by("scored_at").to_pylist()
    assert len({(r["image_uri"], r["content_sha256"], r["model_sha256"]) for r in rows}) == len(
        rows
    ), "an (input, model) scored twice"
    found: dict[str, dict[str, dict]] = {}
    for r in rows:
        found.setdefault(r["model_sha256"], {})[r["image_uri"]] = r
    return found


def test_one_pass_gives_each_model_its_own_rows(ray_session, tmp_path):
    films = tmp_path / "in"
    films.mkdir()
    for i in range(6):
        (films / f"film-{i}.png").write_bytes(png("L", size=70 + i))
    (films / "lateral.dcm").write_bytes(dicom_cr(view="LL"))
    (films / "ct.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    # A: frontal radiographs at 64 px; B: any modality and view, threshold 0; C: like A
    # at 96 px (the films are decoded at 96 for A and C both).
    a, sha_a = checkpoint(tmp_path, "a", input_size=64)
    b, sha_b = checkpoint(tmp_path, "b", input_size=64, seed=1, threshold=0.0,
                          modalities=(), views=())  # fmt: skip
    c, sha_c = checkpoint(tmp_path, "c", input_size=96, seed=2)

    def run(out, *models):
        return score(ScoreConfig(input=str(films), model=models, out=str(tmp_path / out),
                                 run_date="2026-12-07"))  # fmt: skip

    alone = run("alone", a)
    together = run("together", a, b, c)
    assert (alone.inputs, alone.rows_written) == (8, 8)
    assert (together.inputs, together.rows_written) == (8, 24)
    rows, single = by_model(str(tmp_path / "together")), by_model(str(tmp_path / "alone"))
    assert set(rows) == {sha_a, sha_b, sha_c} and len(rows[sha_a]) == 8

    ct, lateral = str(films / "ct.dcm"), str(films / "lateral.dcm")
    # Each model under its own rules: A and C skip the CT and flag the lateral, B
    # scores both as any other film.
    for sha in (sha_a, sha_c):
        assert rows[sha][ct]["status"] == "skipped"
        assert rows[sha][ct]["error"] == (
            'rule "modality": Modality CT is not one this model accepts (CR, DX)'
        )
        assert rows[sha][lateral]["qc"] == "wrong_view"
    assert rows[sha_b][ct]["status"] == "ok" and rows[sha_b][lateral]["qc"] != "wrong_view"
    assert {r["threshold"] for r in rows[sha_b].values()} == {0.0}
    # A's rows are what A alone gives: beside B (the same size), the same decode and
    # model; beside C, the film decoded at 96 px and squashed to 64 in one more step.
    run("pair", a, b)
    pair = by_model(str(tmp_path / "pair"))
    for uri, row in single[sha_a].items():
        for beside, tolerance in ((pair, 1e-6), (rows, 0.01)):
            mine = beside[sha_a][uri]
            assert (mine["status"], mine["error"], mine["qc"]) == (
                row["status"],
                row["error"],
                row["qc"],
            )
            if row["status"] == "ok":
                assert mine["score"] == pytest.approx(row["score"], abs=tolerance)
    # Each model's provenance, in --model order; the first also at the top.
    file = next((tmp_path / "together" / "dt=2026-12-07").glob("*.parquet"))
    meta = {k.decode(): v.decode() for k, v in pq.read_schema(file).metadata.items()}
    models = json.loads(meta["meddx.models"])
    assert [m["meddx.model_sha256"] for m in models] == [sha_a, sha_b, sha_c]
    assert [m["meddx.input_size"] for m in models] == ["64", "64", "96"]
    assert json.loads(models[1]["meddx.views"]) == [] and meta["meddx.model_sha256"] == sha_a


def test_nights_of_several_models_score_each_input_once_per_model(
    ray_session, bucket, settings, tmp_path
):
    fs = filesystem(bucket, settings)
    incoming = f"{bucket.removeprefix('s3://')}/incoming"
    for i in range(5):
        fs.pipe_file(f"{incoming}/img-{i}.png", png("L", size=60 + i))
    a, sha_a = checkpoint(tmp_path, "a", input_size=64, threshold=0.0)
    b, sha_b = checkpoint(tmp_path, "b", input_size=64, seed=1, threshold=0.0)

    def night(day, *models):
        source, out = f"{bucket}/incoming", f"{bucket}/results"
        return screen(
            ScreenConfig(input=source, model=models, out=out, run_date=day, storage=settings)
        )

    first = night("2026-12-01", a)
    assert (first.new_inputs, first.rows) == (5, 5)
    # A second model joins, as two films arrive: A reads the two, B all seven.
    for i in (5, 6):
        fs.pipe_file(f"{incoming}/img-{i}.png", png("L", size=60 + i))
    second = night("2026-12-02", a, b)
    assert (second.new_inputs, second.rows) == (7, 9)
    assert [(m["model_sha256"], m["rows"]) for m in second.models] == [(sha_a, 2), (sha_b, 7)]
    assert (second.positives, [m["positives"] for m in second.models]) == (9, [2, 7])
    # The worklist: an entry per study (each PNG its own) and model, each study's
    # entries together; the summary names each model.
    runs = f"{bucket.removeprefix('s3://')}/results/_runs/dt=2026-12-02"
    worklist = pacsv.read_csv(fs.open(f"{runs}/worklist.csv")).to_pylist()
    assert len(worklist) == 9 and {w["model_sha256"] for w in worklist} == {sha_a, sha_b}
    assert second.positive_studies == 9 and {w["other_images"] for w in worklist} == {0}
    images = [w["image_uri"] for w in worklist]
    for uri in set(images):  # both rows of an image scored by both models are adjacent
        at = [i for i, u in enumerate(images) if u == uri]
        assert at == list(range(at[0], at[0] + len(at)))
    summary = json.loads(fs.cat_file(f"{runs}/summary.json"))
    assert [m["model_sha256"] for m in summary["models"]] == [sha_a, sha_b]
    page = fs.cat_file(f"{runs}/report.html").decode()
    assert "2 models, each film read once" in page and sha_b[:16] in page
    assert night("2026-12-02", a, b).rows == 0  # nothing new for either
    # Touched, same bytes: read, and dropped for both before the model; new bytes: both.
    time.sleep(1.1)
    fs.pipe_file(f"{incoming}/img-1.png", png("L", size=61))
    fs.pipe_file(f"{incoming}/img-2.png", png("RGB", size=90))
    third = night("2026-12-03", a, b)
    assert (third.new_inputs, third.rows) == (2, 2)
    # The touched film is in the index with its new mtime: not read again, nor after a
    # compaction folds the note into the index's base.
    assert night("2026-12-04", a, b).new_inputs == 0
    assert index.compact(f"{bucket}/results", settings, force=True)
    assert night("2026-12-04", a, b).new_inputs == 0
    # A night whose only news is a touched film: read, nothing staged, nothing committed.
    fs.pipe_file(f"{incoming}/img-3.png", png("L", size=63))
    touched = night("2026-12-05", a, b)
    assert (touched.new_inputs, touched.rows) == (1, 0)
    assert night("2026-12-05", a, b).new_inputs == 0
    rows = by_model(f"{bucket}/results", settings)  # asserts (input, model, version) once
    assert {len(r) for r in rows.values()} == {7}
    assert len(commit.read_results(f"{bucket}/results", settings, ["status"])) == 5 + 9 + 2


def test_drop_known_clears_only_the_models_that_scored_those_bytes():
    batch = {
        "image_uri": np.array(["x", "y", "z"], dtype=object),
        "content_sha256": np.array(["h1", "h2", ""], dtype=object),  # z: unreadable
        "models": np.array([0b11, 0b11, 0b01]),
        "known": np.array(
            [[f"0{SEP}x{SEP}h1"], [f"0{SEP}y{SEP}h2", f"1{SEP}y{SEP}h2"], [f"0{SEP}z{SEP}h"]],
            dtype=object,
        ),
    }
    out = reading.drop_known(batch)
    assert out["image_uri"].tolist() == ["x", "z"]  # y: both models have these bytes
    assert out["models"].tolist() == [0b10, 0b01] and "known" not in out


def test_commit_check_drops_one_models_rows(tmp_path):
    out = str(tmp_path / "out")
    staging = Path(commit.staging_path(out, "run-1"))
    staging.mkdir(parents=True)
    rows = pa.table({"image_uri": ["/a.png", "/a.png", "/b.png"],
                     "model_sha256": ["s1", "s2", "s1"]})  # fmt: skip
    pq.write_table(rows, staging / "part-0.parquet")
    assert commit.drop_staged(out, LOCAL, "run-1", {"/a.png"}, "s2") == 1
    left = pq.read_table(staging / "part-0.parquet").to_pylist()
    assert left == [{"image_uri": "/a.png", "model_sha256": "s1"},
                    {"image_uri": "/b.png", "model_sha256": "s1"}]  # fmt: skip


def test_model_options_are_checked_in_one_line(tmp_path):
    a, _ = checkpoint(tmp_path, "a", input_size=64)
    b, _ = checkpoint(tmp_path, "b", input_size=64, seed=1)
    (tmp_path / "in").mkdir()
    base = ["score", str(tmp_path / "in"), "--out", str(tmp_path / "out")]
    cases = {
        ("--model", a, "--model", a): f"--model {a} is given twice",
        ("--model", a, "--model", b, "--model-sha256", "ab" * 32): "--model-sha256 pins one",
        tuple(x for i in range(9) for x in ("--model", f"{a}.{i}")): "--model at most 8 times",
    }
    for args, message in cases.items():
        result = CliRunner().invoke(cli, [*base, *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
    copy = tmp_path / "copy.pt"
    copy.write_bytes(Path(a).read_bytes())
    cfg = ScoreConfig(input=str(tmp_path / "in"), model=(a, str(copy)), out=str(tmp_path / "o"))
    with pytest.raises(MeddxError, match=r"^two --model files are the same checkpoint \("):
        ModelRows(cfg)
