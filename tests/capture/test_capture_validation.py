"""capture and coherence_moments refuse bad input with one CaptureError line (issue 12, findings 22, 23).

Each case is input that torch used to reject with its own error (or that was silently accepted):
the error must be a CaptureError, one line, naming what is wrong, and the model must be left as it
was (modes, hooks).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradstore.capture import capture, coherence_moments
from gradstore.errors import CaptureError


def ce(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


X = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 2, 1, 2])

# (description, model factory, loss_fn, inputs, targets, words the message must contain)
BAD = [
    ("wrong feature shape", model, ce, torch.randn(4, 3, 3), Y, ["inputs", "shape (4, 3, 3)"]),
    ("integer inputs", model, ce, torch.randint(0, 3, (4, 2, 3)), Y, ["inputs", "torch.int64", "torch.float32"]),
    ("float64 model, float32 inputs", lambda: model().double(), ce, X, Y, ["inputs", "inputs.to(torch.float64)"]),
    ("2-d targets", model, ce, X, Y[:, None], ["targets", "shape (4, 1)"]),
    ("float targets", model, ce, X, Y.float(), ["targets", "torch.float32", "integer"]),
    ("list targets", model, ce, X, Y.tolist(), ["targets", "list"]),
    ("out-of-range targets", model, ce, X, torch.tensor([0, 3, 1, 2]), ["targets", "out of bounds"]),
    ("negative targets", model, ce, X, torch.tensor([0, -1, 1, 2]), ["targets", "out of bounds"]),
    ("detached loss", model, lambda o, t: ce(o, t).detach(), X, Y, ["loss_fn", "require grad", ".detach()"]),
    ("mean loss", model, lambda o, t: F.cross_entropy(o, t), X, Y, ["loss_fn", "(4,)", "reduction='none'"]),
]


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and text.strip() == text and text
    return text


@pytest.mark.parametrize(("what", "make", "loss_fn", "inputs", "targets", "words"), BAD, ids=[b[0] for b in BAD])
def test_capture_refuses_bad_input_with_one_line(what, make, loss_fn, inputs, targets, words):
    net = make().train()
    with pytest.raises(CaptureError) as err:
        capture(net, loss_fn, inputs, targets, sq_norms=True, grad_sum=True)
    text = _one_line(err)
    for word in words:
        assert word in text, (what, text)
    assert net.training and all(m.training for m in net.modules())  # the run is left as it was
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


@pytest.mark.parametrize(("what", "make", "loss_fn", "inputs", "targets", "words"), BAD, ids=[b[0] for b in BAD])
def test_coherence_moments_refuses_bad_input_with_one_line(what, make, loss_fn, inputs, targets, words):
    with pytest.raises(CaptureError) as err:
        coherence_moments(make(), loss_fn, inputs, targets)
    text = _one_line(err)
    for word in words:
        assert word in text, (what, text)


def _frozen():
    return model().requires_grad_(False)


@pytest.mark.parametrize("make", [_frozen, nn.Flatten, lambda: nn.Sequential(nn.Flatten(), nn.ReLU())],
                         ids=["frozen", "parameterless", "parameterless-sequential"])
def test_a_model_without_trainable_parameters_is_refused_not_an_empty_result(make):
    net = make()
    targets = torch.randn(4, 6) if not list(net.parameters()) else Y
    loss = ce if list(net.parameters()) else (lambda o, t: ((o - t) ** 2).sum(1))
    with pytest.raises(CaptureError, match=r"no trainable parameters \(requires_grad=True\); unfreeze"):
        capture(net, loss, X, targets)
    with pytest.raises(CaptureError, match=r"no trainable parameters \(requires_grad=True\); unfreeze"):
        coherence_moments(net, loss, X, targets)


def test_a_partly_frozen_model_is_still_captured():
    net = model()
    net[1].requires_grad_(False)
    res = capture(net, ce, X, Y)
    assert list(res.sq_norms) == ["3.weight", "3.bias"]
    assert all(bool((v > 0).all()) for v in res.sq_norms.values())


def test_coherence_moments_refuses_targets_or_inputs_of_another_length():
    """Chunks slice inputs and targets alike: extra targets used to be dropped without a word."""
    with pytest.raises(CaptureError, match=r"targets must have 4 rows like inputs.*\(6,\)"):
        coherence_moments(model(), ce, X, torch.zeros(6, dtype=torch.long), chunk_size=3)
    with pytest.raises(CaptureError, match=r"every tensor in inputs must have 4 rows.*\(5, 2, 3\)"):
        coherence_moments(model(), lambda o, t: ce(o, t), (X, torch.randn(5, 2, 3)), Y)
    with pytest.raises(CaptureError, match="tensor"):
        coherence_moments(model(), ce, X.tolist(), Y)


def test_errors_raised_inside_the_model_by_the_engine_are_not_rewrapped():
    """A CaptureError from the engine's own forward hooks keeps its own message."""

    class TwoOutputs(nn.Linear):
        def forward(self, x):
            return super().forward(x), x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = TwoOutputs(6, 3)

        def forward(self, x):
            return self.lin(x.flatten(1))[0]

    with pytest.raises(CaptureError, match="not one tensor"):
        capture(Net(), ce, X, Y)
