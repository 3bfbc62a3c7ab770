"""Record a small GPT-style language model trained on real text: bytes of Python's own sources.

The text is the standard library's source files on this machine (nothing is downloaded); the
model is a 2-block causal transformer over bytes (vocabulary 256), written with ``nn.Linear``,
``nn.Embedding`` and ``nn.LayerNorm`` so that every parameter is captured exactly. The task is
``sequence``: an example's loss is the mean next-byte cross entropy over its counted positions
and ``correct`` is its token accuracy. Tracked windows have different lengths; the collate
function pads them and marks the padding with ``ignore_index`` so it does not count.

    python examples/lm_sequence.py --out runs/lm --steps 200
"""

from __future__ import annotations

import argparse
import math
import sysconfig
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from gradstore.record import Recorder, Schedule, Sequence

IGNORE = -100


def stdlib_bytes(limit: int = 400_000) -> torch.Tensor:
    """The first ``limit`` bytes of the standard library's ``.py`` files, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.tensor(list(b"".join(chunks)[:limit]), dtype=torch.long)


class Windows(Dataset):
    """Item i: (inputs, targets) of the byte window at ``starts[i]`` of length ``lengths[i]``."""

    def __init__(self, text: torch.Tensor, starts, lengths):
        self.text, self.starts, self.lengths = text, list(starts), list(lengths)

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        s, n = self.starts[i], self.lengths[i]
        return self.text[s:s + n], self.text[s + 1:s + n + 1]


def pad_collate(items):
    """Pad windows to the longest: inputs with byte 0, targets with ``IGNORE`` (not counted)."""
    width = max(len(x) for x, _ in items)
    inputs = torch.zeros(len(items), width, dtype=torch.long)
    targets = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for row, (x, y) in enumerate(items):
        inputs[row, :len(x)], targets[row, :len(y)] = x, y
    return inputs, targets


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, h):
        n, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=h.device).triu(1)
        att = scores.masked_fill(causal, float("-inf")).softmax(-1) @ v
        h = h + self.proj(att.transpose(1, 2).reshape(n, t, d))
        return h + self.down(torch.relu(self.up(self.ln2(h))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 32, heads: int = 4, blocks: int = 2, context: int = 64):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(blocks)))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, tokens):
        # one row of positions per example: every layer with parameters sees the example axis first
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        return self.head(self.ln(self.blocks(self.tok(tokens) + self.pos(positions))))


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the run store (created)")
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--every", type=int, default=20, help="capture every N steps")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    text = stdlib_bytes()
    context = 64
    split = int(0.9 * len(text))
    rng = np.random.default_rng(0)
    train_starts = rng.choice(split - context - 1, 64, replace=False)
    test_starts = split + rng.choice(len(text) - split - context - 1, 32, replace=False)
    lengths = rng.integers(16, context + 1, 64)  # windows of different lengths: padded by pad_collate
    model = TinyGPT(context=context)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    args.out.mkdir(parents=True, exist_ok=True)
    recorder = Recorder(
        args.out / "store.zarr", model, task=Sequence(ignore_index=IGNORE),
        train_dataset=Windows(text, train_starts, lengths), train_ids=train_starts,   # ids: window starts
        test_dataset=Windows(text, test_starts, lengths[:32]), test_ids=test_starts,
        collate_fn=pad_collate, schedule=Schedule.every(args.every), coords_per_layer=20, overwrite=True,
        config={"example": "lm_sequence", "steps": args.steps, "context": context}, seeds={"torch": 0, "windows": 0})
    batch = np.random.default_rng(1)
    with recorder:
        for step in range(args.steps + 1):
            recorder.maybe_record(step, model, lr=3e-3)
            if step == args.steps:
                break
            starts = torch.as_tensor(batch.choice(split - context - 1, 32))
            rows = starts[:, None] + torch.arange(context + 1)
            x, y = text[rows[:, :-1]], text[rows[:, 1:]]
            model.train()
            loss = nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    print(f"recorded {recorder.committed} steps to {args.out / 'store.zarr'}")
    return args.out / "store.zarr"


if __name__ == "__main__":
    main()
