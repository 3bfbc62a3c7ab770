"""Hypothesis-built random sequence models mixing layers, tied weights and functional uses, against
torch.func vmap(grad) in float64 (every quantity), with the engine's self-check on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from capture_harness import check_all
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradstore.capture import capture

pytestmark = pytest.mark.filterwarnings("ignore::gradstore.capture.fallback.CaptureFallbackWarning")

VOCAB, D = 9, 6

STEPS = ("linear", "layernorm", "attention", "functional_linear", "bias_use", "conv", "shared", "gelu")


class RandomLM(nn.Module):
    """Embedding, then a random list of steps on (n, t, D), then a head (own, module-tied or functional)."""

    def __init__(self, steps, head, positions):
        super().__init__()
        self.steps, self.head_kind, self.positions = list(steps), head, positions
        self.emb = nn.Embedding(VOCAB, D)
        self.pos = nn.Embedding(8, D)
        self.layers = nn.ModuleList()
        for step in self.steps:
            if step in ("linear", "functional_linear", "bias_use", "shared"):
                self.layers.append(nn.Linear(D, D))
            elif step == "layernorm":
                self.layers.append(nn.LayerNorm(D))
            elif step == "attention":
                self.layers.append(nn.MultiheadAttention(D, 2, batch_first=True))
            elif step == "conv":
                self.layers.append(nn.Conv1d(D, D, 3, padding=1))
            else:
                self.layers.append(nn.Identity())
        self.head = nn.Linear(D, VOCAB)
        if head == "module":
            self.head.weight = self.emb.weight

    def forward(self, idx):
        h = self.emb(idx)
        if self.positions:
            h = h + self.pos(torch.arange(idx.shape[1]))
        for step, layer in zip(self.steps, self.layers):
            if step == "linear":
                h = torch.tanh(layer(h))
            elif step == "layernorm":
                h = layer(h)
            elif step == "attention":
                h = h + layer(h, h, h, need_weights=False)[0]
            elif step == "functional_linear":  # the layer's weight used by the parent, functionally
                h = torch.tanh(F.linear(h, layer.weight, layer.bias))
            elif step == "bias_use":  # the layer called, and its bias used again by the parent
                h = torch.tanh(layer(h)) + layer.bias
            elif step == "conv":
                h = layer(h.transpose(1, 2)).transpose(1, 2)
            elif step == "shared":  # one module called twice
                h = layer(torch.tanh(layer(h)))
            else:
                h = F.gelu(h)
        if self.head_kind == "functional":
            return h @ self.emb.weight.T
        return self.head(h)


def seq_loss(logits, targets):
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)


@pytest.mark.slow  # ~20-45 s: the vmap oracle over attention runs without a batching rule
@settings(max_examples=10, deadline=None)
@given(
    steps=st.lists(st.sampled_from(STEPS), min_size=1, max_size=3),
    head=st.sampled_from(["own", "module", "functional"]),
    positions=st.booleans(),
    m=st.integers(1, 4),
    t=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_random_models_are_exact(steps, head, positions, m, t, seed):
    torch.manual_seed(seed)
    model = RandomLM(steps, head, positions).double()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (m, t), generator=gen)
    targets = torch.randint(0, VOCAB, (m, t), generator=gen)
    check_all(model, seq_loss, idx, targets, rtol=1e-6)
    capture(model, seq_loss, idx, targets, verify=True)
