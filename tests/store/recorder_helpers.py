"""Helpers of the Recorder tests: a tiny model and deterministic data (torch)."""

import torch
from torch import nn


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 3, generator=g), torch.randint(0, 3, (n,), generator=g)
