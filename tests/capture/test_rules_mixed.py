"""A hypothesis-built random model mixing the layer rules of issue 13 part B (and the older ones),
captured end to end with verify=True, against a per-example loop of single-example backward passes."""

import importlib.util

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rules_harness import check_capture_by_loop
from torch import nn

C, L = 4, 6  # every block maps (n, C, L) -> (n, C, L)


class OverTime(nn.Module):
    """A batch-first recurrent layer over the L positions, features = channels."""

    def __init__(self, kind):
        super().__init__()
        self.rnn = getattr(nn, kind)(C, C // 2, batch_first=True, bidirectional=True)

    def forward(self, x):
        return self.rnn(x.transpose(1, 2))[0].transpose(1, 2)


def _hf_conv1d():
    from transformers.pytorch_utils import Conv1D

    return Conv1D(L, L)


BLOCKS = {
    "conv": lambda: nn.Conv1d(C, C, 3, padding=1),
    "conv_transpose": lambda: nn.ConvTranspose1d(C, C, 3, padding=1),
    "instance_norm": lambda: nn.InstanceNorm1d(C, affine=True),
    "prelu": lambda: nn.PReLU(C),
    "rms_norm": lambda: nn.RMSNorm(L),
    "linear": lambda: nn.Linear(L, L),
    "lstm": lambda: OverTime("LSTM"),
    "gru": lambda: OverTime("GRU"),
}
if importlib.util.find_spec("transformers") is not None:  # an optional dependency (in the test extra)
    BLOCKS["hf_conv1d"] = _hf_conv1d


class Mixed(nn.Module):
    def __init__(self, names, bag_mode):
        super().__init__()
        self.bag = nn.EmbeddingBag(7, L, mode=bag_mode)
        self.blocks = nn.ModuleList([BLOCKS[name]() for name in names])
        self.head = nn.Linear(C * L, 2)

    def forward(self, x, idx):
        h = x + self.bag(idx)[:, None, :]
        for block in self.blocks:
            h = torch.tanh(block(h))
        return self.head(h.flatten(1))


def _sq(outputs, targets):
    return ((outputs - targets) ** 2).sum(1)


@settings(max_examples=12, deadline=None)
@given(names=st.lists(st.sampled_from(sorted(BLOCKS)), min_size=1, max_size=4), m=st.integers(1, 3),
       bag_mode=st.sampled_from(["sum", "mean", "max"]), seed=st.integers(0, 9))
def test_random_mixed_model(names, m, bag_mode, seed):
    torch.manual_seed(seed)
    model = Mixed(names, bag_mode).double()
    for module in model.modules():  # non-trivial affine parameters
        if isinstance(module, (nn.InstanceNorm1d, nn.RMSNorm)):
            module.weight.data.normal_()
    x = torch.randn(m, C, L, dtype=torch.float64)
    idx = torch.randint(0, 7, (m, 3))
    y = torch.randn(m, 2, dtype=torch.float64)
    check_capture_by_loop(model, _sq, (x, idx), y, lambda j: ((x[j:j + 1], idx[j:j + 1]), y[j:j + 1]), rtol=1e-6)
