"""nn.Embedding rule vs the vmap(grad) oracle (repeated indices, padding_idx)."""

import pytest
import torch
from capture_harness import check_all, sq_loss
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradstore.capture import capture
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
