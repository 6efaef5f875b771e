"""The int8 gate's arithmetic (meddx/model/gate.py) on scores whose answers are known:
decision flips at each finding's threshold against the noise's, the AUROC band, the
calibration change, and the failing figures named."""

import math

import numpy as np
import pytest

from meddx.model import gate, registry


def single_label(threshold: float = 0.5):
    return registry.untrained_checkpoint("seednet", input_size=32, threshold=threshold)


def probs(positive: np.ndarray) -> np.ndarray:
    """(N, 2) normal/opacity probabilities from the opacity column."""
    return np.stack([1 - positive, positive], axis=1)


def films(n: int = 200, seed: int = 0):
    """Truth and well-separated, calibrated-ish scores, 10 of them just above 0.5."""
    rng = np.random.default_rng(seed)
    truth = np.r_[np.zeros(n // 2), np.ones(n // 2)]
    scores = np.clip(np.where(truth == 1, 0.8, 0.2) + rng.normal(0, 0.1, n), 0.01, 0.99)
    scores[n // 2 : n // 2 + 10] = 0.505  # positives near the threshold
    return truth, scores


def test_flips_within_the_noise_and_its_margin_hold():
    ckpt = single_label()
    truth, ref = films()
    noisy = ref.copy()
    noisy[100:103] = 0.495  # one grey level flips three films
    cand = ref.copy()
    cand[100:105] = 0.495  # int8 flips five: 3 + max(1, 1% of 200) = 5 allowed
    check = gate.int8_gate(ckpt, probs(ref), probs(cand), probs(noisy), truth)
    f = check["findings"]["opacity"]
    assert (f["decision_flips"], f["noise_flips"], f["flip_limit"]) == (5, 3, 5)
    assert check["holds"] and check["failed"] == []
    assert check["score_change"]["max"] == pytest.approx(0.01)
    assert check["score_change"]["p50"] == 0.0 and check["noise_score_change"]["max"] > 0


def test_one_flip_beyond_the_limit_is_refused_and_named():
    ckpt = single_label()
    truth, ref = films()
    cand = ref.copy()
    cand[100:103] = 0.495  # three flips where the noise flips none: the limit is 2
    check = gate.int8_gate(ckpt, probs(ref), probs(cand), probs(ref), truth)
    assert not check["holds"]
    assert check["failed"] == ["decision flips 3 (one grey level: 0, limit 2)"]


def test_flips_are_counted_at_the_models_own_threshold():
    truth, ref = films()
    cand = ref.copy()
    cand[100:110] = 0.495  # across 0.5, not across 0.3
    noisy = ref.copy()
    at_half = gate.int8_gate(single_label(0.5), probs(ref), probs(cand), probs(noisy), truth)
    at_03 = gate.int8_gate(single_label(0.3), probs(ref), probs(cand), probs(noisy), truth)
    assert at_half["decision_flips"] == 10 and not at_half["holds"]
    assert at_03["decision_flips"] == 0 and at_03["holds"]
    assert at_03["findings"]["opacity"]["threshold"] == 0.3


def test_ranking_outside_the_bootstrap_interval_is_refused():
    ckpt = single_label(0.999)  # decisions all "normal": only the ranking can fail
    truth, ref = films(seed=1)
    rng = np.random.default_rng(2)
    shuffled = ref.copy()
    shuffled[:40] = rng.uniform(0.01, 0.99, 40)  # 40 negatives scored at random
    check = gate.int8_gate(ckpt, probs(ref), probs(shuffled), probs(ref), truth)
    f = check["findings"]["opacity"]
    lo, hi = f["auroc_band"]
    assert f["auroc_candidate"] < lo < f["auroc_reference"] <= hi
    assert [x for x in check["failed"] if x.startswith("AUROC")] == [
        f"AUROC {f['auroc_reference']:.4f} -> {f['auroc_candidate']:.4f} "
        f"(interval {lo:.4f}-{hi:.4f})"
    ]


def test_a_perfect_ranking_keeps_a_band_of_its_least_half_width():
    ckpt = single_label()
    truth = np.r_[np.zeros(50), np.ones(50)]
    ref = np.r_[np.linspace(0.05, 0.45, 50), np.linspace(0.55, 0.95, 50)]
    check = gate.int8_gate(ckpt, probs(ref), probs(ref), probs(ref), truth)
    f = check["findings"]["opacity"]
    assert f["auroc_reference"] == 1.0 and f["auroc_ci95"] == pytest.approx([1.0, 1.0])
    assert f["auroc_band"] == [pytest.approx(1 - gate.AUROC_MIN_HALF_WIDTH), 1.0]
    assert check["holds"]


def test_calibration_moving_beyond_its_limit_is_refused():
    ckpt = single_label()
    truth, ref = films(seed=3)
    # Every score pulled toward 0.5 by a fifth of its distance keeps every decision and
    # the ranking, and moves the calibration.
    cand = 0.5 + 0.8 * (ref - 0.5)
    check = gate.int8_gate(ckpt, probs(ref), probs(cand), probs(ref), truth)
    f = check["findings"]["opacity"]
    assert f["decision_flips"] == 0 and f["auroc_candidate"] == f["auroc_reference"]
    assert f["ece_change"] > gate.MAX_ECE_CHANGE
    assert check["failed"] == [
        f"ECE {f['ece_reference']:.4f} -> {f['ece_candidate']:.4f} "
        f"(limit {gate.MAX_ECE_CHANGE} change)"
    ]


def test_multi_label_is_judged_per_finding_and_names_the_finding():
    ckpt = registry.untrained_checkpoint(
        "seednet", input_size=32, findings=["opacity", "effusion"], thresholds=[0.3, 0.5]
    )
    truth, ref = films()
    both = np.stack([ref, ref], axis=1)
    cand = both.copy()
    cand[100:104, 1] = 0.495  # effusion's: four films cross its 0.5 threshold
    check = gate.int8_gate(ckpt, both, cand, both, np.stack([truth, truth], axis=1))
    assert check["findings"]["opacity"]["decision_flips"] == 0
    assert check["findings"]["effusion"]["decision_flips"] == 4
    assert check["decision_flips"] == 4
    assert [f["threshold"] for f in check["findings"].values()] == [0.3, 0.5]
    assert check["failed"] == ["decision flips 4 (one grey level: 0, limit 2) (effusion)"]


def test_one_class_among_the_films_checked_cannot_be_judged():
    ckpt = single_label()
    ref = np.linspace(0.1, 0.9, 40)
    check = gate.int8_gate(ckpt, probs(ref), probs(ref), probs(ref), np.ones(40))
    assert math.isnan(check["findings"]["opacity"]["auroc_reference"])
    assert check["failed"] == ["AUROC undefined (one class among the films checked)"]


def test_optimize_help_states_the_gates_limits():
    """`meddx optimize --help` states the limits the gate applies (the CLI stays free of
    torch, so its text cannot read them): they change together."""
    from click.testing import CliRunner

    from meddx.cli import cli
    from meddx.model import optimize

    text = " ".join(CliRunner().invoke(cli, ["optimize", "--help"]).output.split())
    assert f"plus 1 in {round(1 / gate.FLIP_MARGIN)}" in text
    assert f"calibration error moves by at most {gate.MAX_ECE_CHANGE}" in text
    rates = " and ".join(f"{lr:.0e}".replace("e-0", "e-") for lr in optimize.FINETUNE_RANGE_LRS)
    assert f"range rates {rates}" in text
