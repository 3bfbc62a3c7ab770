"""Small models for the engine tests: every supported layer, a module used twice, a fallback module."""

import torch
from torch import nn


class Scale(nn.Module):
    """No rule is registered for this: captured by the torch.func fallback. y = x * s + s²."""

    def __init__(self, dim):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x):
        return x * self.s + self.s**2


class Mixed(nn.Module):
    """Conv2d, BatchNorm2d, GroupNorm, Embedding, Conv1d, LayerNorm, Linear (reused), a fallback module."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv_g = nn.Conv2d(4, 4, 3, stride=2, groups=2)
        self.gn = nn.GroupNorm(2, 4)
        self.emb = nn.Embedding(7, 5, padding_idx=0)
        self.conv1d = nn.Conv1d(5, 3, 2, padding=1, padding_mode="circular")
        self.tok = nn.Linear(5, 5)  # applied per position: t > 1
        self.fc = nn.Linear(4 * 3 * 3 + 3 * 7 + 5, 8)
        self.shared = nn.Linear(8, 8)  # used twice in one forward
        self.ln = nn.LayerNorm(8)
        self.scale = Scale(8)
        self.head = nn.Linear(8, 3)
        self.head.weight.requires_grad_(False)  # frozen weight, trainable bias
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)
            for norm in (self.bn, self.gn, self.ln):
                norm.weight.normal_()
                norm.bias.normal_()

    def forward(self, image, tokens):
        x = torch.relu(self.bn(self.conv(image)))
        x = self.gn(self.conv_g(x)).flatten(1)
        e = self.emb(tokens)  # (n, t, 5)
        s = self.conv1d(e.transpose(1, 2)).flatten(1)
        w = torch.tanh(self.tok(e)).mean(1)
        h = torch.tanh(self.fc(torch.cat([x, s, w], 1)))
        h = self.shared(torch.tanh(self.shared(h)))
        return self.head(self.scale(self.ln(h)))


def mixed_batch(m, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(m, 1, 7, 7, generator=gen, dtype=dtype)
    tokens = torch.randint(0, 7, (m, 6), generator=gen)
    targets = torch.randint(0, 3, (m,), generator=gen)
    return (image, tokens), targets
