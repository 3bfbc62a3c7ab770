"""nn.Embedding rule vs the vmap(grad) oracle (repeated indices, padding_idx); nn.EmbeddingBag rule
(sum/mean/max, offsets, per_sample_weights) vs a per-example loop, and through capture."""

import pytest
import torch
from capture_harness import check_all, sq_loss
from hypothesis import given, settings
from hypothesis import strategies as st
from rules_harness import check_factors
from torch import nn

from gradstore.capture import capture
from gradstore.capture.registry import lookup_rule
from gradstore.errors import CaptureError


class Bag(nn.Module):
    def __init__(self, vocab, dim, padding_idx):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.out = nn.Linear(dim, 2)

    def forward(self, idx):
        return self.out(self.emb(idx)).sum(1)


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 4), t=st.integers(1, 6), vocab=st.integers(2, 5), dim=st.integers(1, 3),
       padding=st.booleans())
def test_embedding_shapes(m, t, vocab, dim, padding):
    torch.manual_seed(m * t + vocab)
    model = Bag(vocab, dim, 0 if padding else None).double()
    idx = torch.randint(0, vocab, (m, t))
    check_all(model, sq_loss, idx, torch.randn(m, 2, dtype=torch.float64), rtol=1e-6)


def test_scale_grad_by_freq_is_rejected():
    model = nn.Sequential(nn.Embedding(4, 2, scale_grad_by_freq=True))
    with pytest.raises(CaptureError, match="scale_grad_by_freq"):
        capture(model, sq_loss, torch.randint(0, 4, (3, 2)), torch.randn(3, 2, 2))


# ---- nn.EmbeddingBag: one bag an example ------------------------------------------------------


def _bag_case(mode, m, vocab, dim, padding, offsets, weighted, seed):
    """A bag module, its positional inputs and per-bag index lists (the oracle's single-bag inputs)."""
    gen = torch.Generator().manual_seed(seed)
    bag = nn.EmbeddingBag(vocab, dim, mode=mode, padding_idx=0 if padding else None).double()
    with torch.no_grad():
        bag.weight.copy_(torch.randn(vocab, dim, generator=gen, dtype=torch.float64))
    if offsets:
        lengths = torch.randint(0, 4, (m,), generator=gen)
        flat = torch.randint(0, vocab, (int(lengths.sum()),), generator=gen)
        starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
        bags = [flat[s:s + n] for s, n in zip(starts.tolist(), lengths.tolist())]
        inputs = [flat, starts]
    else:
        idx = torch.randint(0, vocab, (m, 3), generator=gen)
        bags = list(idx)
        inputs = [idx, None]
    psw = None
    if weighted:
        psw = torch.randn(inputs[0].shape, generator=gen, dtype=torch.float64)
        inputs.append(psw)
    return bag, tuple(inputs), bags, psw


def _bag_oracle(bag, bags, psw, targets):
    """Per-example loop: bag j alone (2-d input of one row), squared-error loss against its target."""
    position = 0
    rows = []
    for j, index in enumerate(bags):
        weights = None if psw is None else psw.reshape(-1)[position:position + len(index)]
        position += len(index)
        offsets = torch.tensor([0, len(index)]) if bag.include_last_offset else torch.tensor([0])
        out = bag(index, offsets, weights)  # one bag (possibly empty) as a 1-d input
        loss = ((out - targets[j:j + 1]) ** 2).sum()
        rows.append(torch.autograd.grad(loss, bag.weight)[0])
    return torch.stack(rows)


@settings(max_examples=30, deadline=None)
@given(mode=st.sampled_from(["sum", "mean", "max"]), m=st.integers(1, 4), vocab=st.integers(2, 6), dim=st.integers(1, 3),
       padding=st.booleans(), offsets=st.booleans(), weighted=st.booleans(), last=st.booleans(), seed=st.integers(0, 5))
def test_embedding_bag(mode, m, vocab, dim, padding, offsets, weighted, last, seed):
    weighted = weighted and mode == "sum"
    bag, inputs, bags, psw = _bag_case(mode, m, vocab, dim, padding, offsets, weighted, seed)
    if offsets and last:  # include_last_offset: offsets end with the total length
        bag.include_last_offset = True
        inputs = (inputs[0], torch.cat([inputs[1], torch.tensor([inputs[0].numel()])]), *inputs[2:])
    targets = torch.randn(m, dim, dtype=torch.float64)
    out = bag(*inputs)
    b = torch.autograd.grad(((out - targets) ** 2).sum(), out)[0]
    factors = lookup_rule(nn.EmbeddingBag)(bag, tuple(i for i in inputs), b)
    check_factors(factors, {"weight": _bag_oracle(bag, bags, psw, targets)}, rtol=1e-6, seed=seed)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # the vmap oracle's, not capture's
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_in_capture(mode):
    torch.manual_seed(1)
    model = nn.Sequential(nn.EmbeddingBag(6, 3, mode=mode, padding_idx=1), nn.Linear(3, 2)).double()
    idx = torch.randint(0, 6, (4, 5))
    check_all(model, sq_loss, idx, torch.randn(4, 2, dtype=torch.float64), rtol=1e-6)


def test_embedding_bag_refusals():
    bag = nn.EmbeddingBag(5, 2, max_norm=1.0)
    with pytest.raises(CaptureError, match="max_norm"):
        lookup_rule(nn.EmbeddingBag)(bag, (torch.zeros(2, 3, dtype=torch.long),), torch.zeros(2, 2))
    bag = nn.EmbeddingBag(5, 2)
    with pytest.raises(CaptureError, match="1-d input with offsets"):
        lookup_rule(nn.EmbeddingBag)(bag, (torch.zeros(6, dtype=torch.long),), torch.zeros(2, 2))


class WeightedBag(nn.Module):
    """A sum bag called with keyword arguments: bag(idx, per_sample_weights=w)."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(6, 3, mode="sum")
        self.out = nn.Linear(3, 2)

    def forward(self, idx, w):
        return self.out(self.bag(idx, per_sample_weights=w))


def test_embedding_bag_keyword_arguments_in_capture():
    from rules_harness import check_capture_by_loop

    torch.manual_seed(2)
    model = WeightedBag().double()
    idx, w = torch.randint(0, 6, (4, 3)), torch.randn(4, 3, dtype=torch.float64)
    y = torch.randn(4, 2, dtype=torch.float64)
    check_capture_by_loop(model, sq_loss, (idx, w), y, lambda j: ((idx[j:j + 1], w[j:j + 1]), y[j:j + 1]), rtol=1e-6)


class FlatBag(nn.Module):
    """Bags as a 1-d input with offsets passed by keyword, built inside the forward."""

    def __init__(self, mode):
        super().__init__()
        self.bag = nn.EmbeddingBag(6, 3, mode=mode)
        self.out = nn.Linear(3, 2)

    def forward(self, idx):
        n, length = idx.shape
        return self.out(self.bag(idx.reshape(-1), offsets=torch.arange(0, n * length, length)))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_offsets_by_keyword_in_capture(mode):
    from rules_harness import check_capture_by_loop

    torch.manual_seed(3)
    model = FlatBag(mode).double()
    idx, y = torch.randint(0, 6, (4, 3)), torch.randn(4, 2, dtype=torch.float64)
    check_capture_by_loop(model, sq_loss, idx, y, lambda j: (idx[j:j + 1], y[j:j + 1]), rtol=1e-6)


def test_embedding_bag_max_never_forms_the_vocabulary_matrix(monkeypatch):
    """max mode's quantities cost O(d) per example: its (n, V, d) gradient is never formed for them."""
    from gradstore.capture.rules.embedding import MaxRows

    bag, inputs, bags, _ = _bag_case("max", 4, 50, 3, False, True, False, 1)
    targets = torch.randn(4, 3, dtype=torch.float64)
    out = bag(*inputs)
    b = torch.autograd.grad(((out - targets) ** 2).sum(), out)[0]
    factor = lookup_rule(nn.EmbeddingBag)(bag, inputs, b)["weight"]
    ref = _bag_oracle(bag, bags, None, targets).reshape(4, -1)
    monkeypatch.setattr(MaxRows, "g", property(lambda self: pytest.fail("materialized")))
    torch.testing.assert_close(factor.sq_norms(), (ref * ref).sum(1))
    torch.testing.assert_close(factor.gram(), ref @ ref.T)
    torch.testing.assert_close(factor.sum(), ref.sum(0).reshape(50, 3))


class TwoBags(nn.Module):
    """One max bag over two index sets of each example: its two uses are merged."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(6, 3, mode="max")
        self.out = nn.Linear(6, 2)

    def forward(self, a, b):
        return self.out(torch.cat([self.bag(a), self.bag(b)], 1))


def test_embedding_bag_max_used_twice_in_capture():
    from rules_harness import check_capture_by_loop

    torch.manual_seed(4)
    model = TwoBags().double()
    a, b = torch.randint(0, 6, (3, 4)), torch.randint(0, 6, (3, 2))
    y = torch.randn(3, 2, dtype=torch.float64)
    check_capture_by_loop(model, sq_loss, (a, b), y, lambda j: ((a[j:j + 1], b[j:j + 1]), y[j:j + 1]), rtol=1e-6)
