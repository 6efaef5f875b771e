"""bf16 against fp32 on a trained model's validation images, and the checkpoint's pin."""

import numpy as np
import pytest
import torch

from meddx import MeddxError
from meddx.config import ScoreConfig
from meddx.inputs.storage import StorageSettings
from meddx.model import registry
from meddx.model.forward import inference_model
from meddx.model.precision import checkpoint_precision, precision_check
from meddx.model.predictor import Predictor

from .helpers import synthetic_films, trained_seednet

SIZE = 64


def images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return synthetic_films(n, seed, SIZE)


@pytest.fixture(scope="module")
def trained():
    """A seednet trained in this process (seconds) and its own validation images."""
    return trained_seednet(SIZE), *images(200, seed=6)


def test_bf16_check_on_the_validation_set(trained):
    """Whether bf16 holds up depends on the CPU's kernels (native avx512_bf16 rounds
    otherwise than emulation: 0.016 against 0.005 for this model): the check must run
    bf16 for real and give the verdict its own figures call for."""
    ckpt, x, y = trained
    check = precision_check(ckpt, x, y, "bf16")
    assert check["auroc_fp32"] > 0.9  # a model worth comparing, not a coin
    assert 0 < check["max_score_diff"] < 0.1  # bf16 ran (scores moved), and stayed near
    within = (
        check["max_score_diff"] <= 0.01 and abs(check["auroc_fp32"] - check["auroc_bf16"]) <= 0.002
    )
    assert check["holds"] == within and check["images"] == 200


def test_a_model_that_does_not_hold_up_is_flagged(trained):
    ckpt, x, y = trained
    # The same logits shifted by +1000: softmax does not change in fp32, but bf16 keeps
    # 8 mantissa bits (steps of 4 near 1000) and loses the difference between them.
    state = dict(ckpt.state_dict)
    state["classifier.4.bias"] = state["classifier.4.bias"] + 1000.0
    check = precision_check(ckpt.replace(state_dict=state), x, y, "bf16")
    assert check["auroc_fp32"] > 0.9 and not check["holds"]
    assert check["max_score_diff"] > 0.01


def test_the_checkpoint_pins_a_precision_that_auto_respects(trained):
    ckpt = trained[0]
    assert checkpoint_precision("auto", ckpt.replace(precision="fp32")) == "fp32"
    assert checkpoint_precision("bf16", ckpt.replace(precision="fp32")) == "bf16"
    assert checkpoint_precision("auto", ckpt) == "auto"
    pinned = Predictor(ckpt.replace(precision="bf16"), StorageSettings(), "auto", "r")
    assert pinned.autocast_dtype is torch.bfloat16
    with pytest.raises(MeddxError, match="precision must be one of"):
        ScoreConfig(input="in", model="m.pt", out="out", precision="int8")


@pytest.mark.parametrize("name", ["seednet", "resnet18", "densenet121"])
def test_folded_inference_model_gives_the_same_scores(name):
    ckpt = registry.untrained_checkpoint(name, input_size=64, seed=3)
    plain = registry.model_from_checkpoint(ckpt).eval()
    # Non-trivial running statistics, so folding them in changes the weights.
    gen = torch.Generator().manual_seed(0)
    for module in plain.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2, generator=gen)
            module.running_var.uniform_(0.5, 1.5, generator=gen)
    folded = inference_model(ckpt.replace(state_dict=plain.state_dict()), torch.device("cpu"))

    def norms(model):
        return sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())

    # DenseNet's pre-activation norms follow a concatenation, not a convolution: kept.
    assert norms(folded) < norms(plain) and (norms(folded) == 0 or name == "densenet121")
    x = torch.randn(4, 3, 64, 64, generator=gen)
    with torch.inference_mode():
        logits, features = folded(x)
        torch.testing.assert_close(logits.softmax(1), plain(x).softmax(1), atol=1e-5, rtol=0)
    assert features.shape[0] == 4  # the penultimate features come from the same pass


@pytest.mark.slow
def test_compiled_predictor_scores_as_the_eager_one():
    """--compile: torch.compile (inductor, here on CPU) gives the same probabilities,
    also for a batch of another size (dynamic shapes: no recompile per last batch)."""
    ckpt = registry.untrained_checkpoint("seednet", input_size=64, seed=2)
    compiled = Predictor(ckpt, StorageSettings(), "fp32", "r", compile_model=True)
    eager = Predictor(ckpt, StorageSettings(), "fp32", "r")
    x = np.random.default_rng(0).integers(0, 255, (8, 64, 64), dtype=np.uint8)
    for batch in (x, x[:5]):
        np.testing.assert_allclose(
            compiled.predict_probs(batch), eager.predict_probs(batch), atol=1e-5
        )
