"""Input quality control: the qc and ood_score columns, the worklist's "needs a human
read" section and the --max-qc-rate alarm, on a real local Ray and moto's S3 server."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from meddx.analysis.calibration import calibrate
from meddx.analysis.evaluation import evaluate
from meddx.cli import main
from meddx.config import CalibrateConfig, EvaluateConfig, ScoreConfig, ScreenConfig
from meddx.imaging.decode import DecodeSettings, decode_image, qc_of, quality_check
from meddx.inputs.storage import StorageSettings, filesystem
from meddx.model import ood, registry
from meddx.model.ood import features_of
from meddx.names import QC_LOW_QUALITY, QC_OK, QC_OOD, QC_VALUES, QC_WRONG_VIEW
from meddx.pipelines.scoring import score
from meddx.pipelines.screening import screen
from meddx.store.commit import read_results
from meddx.synthetic.chest import labels_for, render
from meddx.synthetic.quality_set import write_quality_set

SIZE = 64  # the checkpoints' input size


def png(pixels) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_cheap_checks_flag_blank_flat_saturated_and_other_views():
    films = [render(i, size=128, seed=5) for i in range(12)]
    settings = DecodeSettings(size=SIZE)
    for film in films:  # chest films pass
        image, info = decode_image(png(film), settings)
        assert quality_check(image) is None and qc_of(image, info, settings) == QC_OK
    gradient = np.outer(np.linspace(0, 1, 128), np.ones(128))
    assert quality_check(np.full((SIZE, SIZE), 117, np.uint8)) == "near-constant"
    flat = decode_image(png(np.where(gradient > 0.5, 118, 100)), settings)[0]
    assert quality_check(flat) == "low contrast"
    burned = np.where(gradient > 0.3, 255, 0).astype(np.uint8)  # 70% white, 30% black
    assert quality_check(decode_image(png(burned), settings)[0]) == "saturated"
    image = decode_image(png(films[0]), settings)[0]
    for view, expected in (("LL", QC_WRONG_VIEW), ("RL", QC_WRONG_VIEW), ("PA", QC_OK)):
        assert qc_of(image, {"view_position": view}, settings) == expected
        assert qc_of(image, {"view_position": view}, DecodeSettings(views=None)) == QC_OK
    assert qc_of(image, {"view_position": ""}, settings) == QC_OK  # PNGs have no view


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """An untrained seednet with a density fitted to synthetic chest films' features (as
    training fits it), and one without a density."""
    plain = registry.untrained_checkpoint("seednet", input_size=SIZE, seed=4, threshold=0.0)
    settings = DecodeSettings(size=SIZE)

    def films(seed, n):
        labels = labels_for(n, 0.5, seed)
        images = [
            decode_image(png(render(i, positive=lbl == "opacity", size=128, seed=seed)), settings)
            for i, lbl in enumerate(labels)
        ]
        return np.stack([image for image, _ in images]), np.array(
            [lbl == "opacity" for lbl in labels]
        )

    train, truth = films(11, 192)
    features = features_of(plain, [train])
    validation = features_of(plain, [films(12, 64)[0]])
    ckpt = ood.with_density(plain, features, ood.groups_of(plain, truth), validation)
    folder = tmp_path_factory.mktemp("qc-models")
    paths = {"density": str(folder / "density.pt"), "plain": str(folder / "plain.pt")}
    registry.save_checkpoint(ckpt, paths["density"], StorageSettings())
    registry.save_checkpoint(plain, paths["plain"], StorageSettings())
    return paths


@pytest.mark.slow
def test_rows_carry_qc_and_ood_score_and_evaluate_reports_them(ray_session, tmp_path, fitted):
    inputs, out = tmp_path / "set", str(tmp_path / "results")
    written = write_quality_set(str(inputs), 24, 128, 7, StorageSettings())
    category = {r["uri"]: r["category"] for r in written}
    summary = score(
        ScoreConfig(
            input=str(inputs),
            model=fitted["density"],
            out=out,
            run_date="2026-12-04",
            modalities="any",  # CT, MR, US... reach the model: quality control must catch them
            quiet=True,
        )
    )
    assert summary.rows_written == len(written)
    rows = read_results(out, StorageSettings(), ["image_uri", "status", "qc", "ood_score"])
    rows = {r["image_uri"]: r for r in rows.to_pylist()}
    assert set(rows) == set(category)
    ckpt, _ = registry.read_checkpoint(fitted["density"], StorageSettings())
    threshold = ood.density_of(ckpt).threshold
    for uri, r in rows.items():
        if r["status"] != "ok":
            assert r["qc"] is None and r["ood_score"] is None
            continue
        assert r["qc"] in QC_VALUES and np.isfinite(r["ood_score"])
        if r["qc"] == QC_OK:
            assert r["ood_score"] <= threshold
        if r["qc"] == QC_OOD:
            assert r["ood_score"] > threshold
        if category[uri] == "lateral":
            assert r["qc"] == QC_WRONG_VIEW
        if category[uri] == "blank":
            assert r["qc"] == QC_LOW_QUALITY
    chest = [r for u, r in rows.items() if category[u] == "chest"]
    noise = [r for u, r in rows.items() if category[u] == "noise"]
    assert sum(r["qc"] != QC_OK for r in chest) <= 2  # of 24 held-out films
    assert all(r["qc"] == QC_OOD for r in noise)
    files = sorted((tmp_path / "results").glob("dt=*/*.parquet"))  # not _index/
    meta = pq.read_schema(files[0]).metadata
    assert float(meta[b"meddx.ood_threshold"]) == pytest.approx(threshold)
    assert json.loads(meta[b"meddx.qc_values"]) == list(QC_VALUES)

    result = evaluate(EvaluateConfig(out, str(inputs / "_manifest.csv"))).as_dict()
    figures = result["ood"]
    assert figures["by_category"]["chest"]["n"] == 24
    assert figures["by_category"]["blank"]["caught_rate"] == 1.0
    assert figures["by_category"]["lateral"]["caught_rate"] == 1.0
    assert figures["auroc"] > 0.5

    # calibrate --ood-percentile: the threshold re-set on scored images' ood_score
    chest_scores = [r["ood_score"] for r in rows.values() if r["ood_score"] is not None]
    again = calibrate(
        CalibrateConfig(
            out, fitted["density"], str(tmp_path / "recalibrated.pt"), ood_percentile=90
        )
    )
    assert again.ood_threshold == pytest.approx(np.percentile(chest_scores, 90))
    moved, _ = registry.read_checkpoint(str(tmp_path / "recalibrated.pt"), StorageSettings())
    assert ood.density_of(moved).threshold == pytest.approx(again.ood_threshold)
    assert moved.extra["ood"]["threshold_source"] == out


@pytest.mark.slow
def test_flagged_rows_are_a_human_read_never_a_negative(
    ray_session, bucket, settings, fitted, capsys
):
    """A checkpoint without a density: qc from the checks before the model only."""
    fs = filesystem(bucket, settings)
    root = bucket.removeprefix("s3://")
    for i in range(12):
        fs.pipe_file(f"{root}/incoming/cxr-{i:02d}.png", png(render(i, size=96, seed=3)))
    for i, level in enumerate((0, 128, 255)):
        fs.pipe_file(f"{root}/incoming/blank-{i}.png", png(np.full((96, 96), level)))

    def cfg(day, **kw):
        return ScreenConfig(
            input=f"{bucket}/incoming",
            model=fitted["plain"],
            out=f"{bucket}/results",
            run_date=day,
            storage=settings,
            quiet=True,
            **kw,
        )

    night = screen(cfg("2026-12-01", max_qc_rate=0.5))
    assert (night.rows, night.qc_flagged, night.qc_by_reason) == (15, 3, {QC_LOW_QUALITY: 3})
    text = fs.cat_file(f"{root}/results/_runs/dt=2026-12-01/worklist.csv").decode()
    worklist = list(csv.DictReader(io.StringIO(text)))
    human = [r for r in worklist if r["section"] == "needs a human read"]
    positive = [r for r in worklist if r["section"] == "positive"]
    # Threshold 0: every film is above it, yet the blank ones are a human read, not positives.
    assert sorted(r["image_uri"].rsplit("/", 1)[1] for r in human) == [
        "blank-0.png",
        "blank-1.png",
        "blank-2.png",
    ]
    assert len(positive) == 12 and all("cxr-" in r["image_uri"] for r in positive)
    assert all(r["qc"] == QC_LOW_QUALITY and r["ood_score"] == "" for r in human)
    assert {(r["flagged_images"], r["other_images"]) for r in human} == {("1", "0")}
    report = fs.cat_file(f"{root}/results/_runs/dt=2026-12-01/report.html").decode()
    assert "Needs a human read (3)" in report and "low_quality" in report
    results = read_results(f"{bucket}/results", settings, ["ood_score"])
    assert results["ood_score"].null_count == results.num_rows  # no density, no score

    # A feed sending the wrong series: most of the night is flagged -> alarm, exit 3.
    for i in range(6):
        fs.pipe_file(f"{root}/incoming/z-blank-{i}.png", png(np.full((96, 96), 40 * i)))
    with pytest.raises(SystemExit) as stopped:
        main(
            [
                "screen",
                f"{bucket}/incoming",
                "--model",
                fitted["plain"],
                "--out",
                f"{bucket}/results",
                "--s3-endpoint",
                settings.s3_endpoint,
                "--run-date",
                "2026-12-02",
                "--quiet",
            ]
        )
    assert stopped.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0] == (
        "meddx: alarm: quality-control rate 100.0% is over --max-qc-rate 10.0% "
        "(6 low_quality of 6 scored rows); most likely the feed: blank, saturated or "
        "low-contrast images"
    )
