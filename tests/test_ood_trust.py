"""A density meddx can stand behind: train says when its threshold rests on too few
films (ood.untrusted, recorded in the checkpoint), and a night's QC alarm names the
most likely cause: the view, the model's density, or the feed."""

from __future__ import annotations

import numpy as np

from meddx.config import ScreenConfig
from meddx.model import ood, registry
from meddx.pipelines.screening import NightSummary, check_alarms


def fitted(validation: int):
    ckpt = registry.untrained_checkpoint("seednet", input_size=32)
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 8)).astype(np.float32)
    groups = np.arange(200) % 2
    held = rng.normal(size=(validation, 8)).astype(np.float32)
    return ood.with_density(ckpt, features, groups, held)


def test_a_threshold_on_few_films_is_said_untrusted_and_recorded():
    few, enough = fitted(12), fitted(ood.TRUSTED_THRESHOLD_FILMS)
    doubt = ood.untrusted(few)
    assert doubt == (
        "the out-of-distribution density's threshold was set on 12 films (trusted from "
        f"{ood.TRUSTED_THRESHOLD_FILMS} validation films): it flags about one ordinary "
        "film in 13"
    )
    assert few.extra[ood.KEY]["trusted"] is False
    assert ood.untrusted(enough) is None and enough.extra[ood.KEY]["trusted"] is True
    # Calibrating on enough scored films makes it trusted.
    calibrated, _ = ood.with_threshold(few, np.linspace(0, 3, 500), 99.0, "val.parquet")
    assert ood.untrusted(calibrated) is None
    assert ood.untrusted(registry.untrained_checkpoint("seednet", input_size=32)) is None


def night(qc: dict[str, int], doubt: str = "") -> NightSummary:
    return NightSummary(
        run_id="r", run_date="2026-12-07", source="s", inputs_seen=40, new_inputs=40,
        rows=40, ok=40, errors=0, error_rate=0.0, errors_by_reason={}, positives=0,
        threshold=0.5, model_name="seednet", model_sha256="ab" * 32, seconds=1.0,
        images_per_s=40.0, recovered=[], versions={}, qc_flagged=sum(qc.values()),
        qc_by_reason=qc, models=[{"density_doubt": doubt}],
    )  # fmt: skip


def test_the_qc_alarm_names_the_most_likely_cause():
    cfg = ScreenConfig(input="x", model="m.pt", out="o")

    def alarm(summary):
        (line,) = check_alarms(cfg, summary, [None])
        return line

    doubt = ood.untrusted(fitted(12))
    line = alarm(night({"out_of_distribution": 40}, doubt))
    assert line.startswith("quality-control rate 100.0% is over --max-qc-rate 10.0%")
    assert line.endswith(f"most likely the model's density: {doubt}")
    assert "most likely the feed: films unlike" in alarm(night({"out_of_distribution": 30}))
    assert "most likely the view" in alarm(night({"wrong_view": 20, "out_of_distribution": 5}))
    assert "most likely the feed: blank" in alarm(night({"low_quality": 9}))
