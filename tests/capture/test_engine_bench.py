"""`gradstore bench capture`'s language-model cases: they run, and what they time is exact."""

import pytest
import torch

from gradstore.capture import capture
from pipelines.bench.capture import _lm_model, _sequence_loss, _text_windows, case


@pytest.mark.parametrize("kind", ["untied", "tied", "encoder"])
def test_the_benchmarked_lms_are_captured_exactly(kind):
    """verify=True: the factors' Σ g and one sequence's g against autograd (float64)."""
    model = _lm_model(kind).double()
    x, y, source = _text_windows(3, 16, "cpu")
    assert "stdlib" in source and x.shape == (3, 16) and int(x.max()) < 256
    assert torch.equal(x[0, 1:], y[0, :-1])  # targets are the next bytes
    res = capture(model, _sequence_loss, x, y, grad_sum=True, verify=True)
    assert (kind == "tied") == ("head.weight" not in res.sq_norms)


@pytest.mark.parametrize("name", ["lm-tied", "lm-untied-vmap"])
def test_an_lm_case_runs(name):
    row = case(name, m=2, device="cpu", repeats=1, data_dir=None)
    assert row["case"] == name and row["ratio"] > 0 and row["parameters"] > 500_000


def test_the_gpt2_case_runs():
    pytest.importorskip("transformers")
    row = case("gpt2", m=2, device="cpu", repeats=1, data_dir=None)
    assert row["case"] == "gpt2" and row["seconds"] > 0
