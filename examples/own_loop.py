"""Record exact per-example gradient statistics from your own training loop.

A plain PyTorch loop: a DataLoader over a map-style Dataset, a small CNN with BatchNorm and
dropout, SGD. The Recorder observes it without changing it: the tracked examples come from the
same Dataset, gradients are measured in eval mode with BatchNorm primed on fixed training
batches, and each captured step is written in the background while training goes on.

    python examples/own_loop.py --out runs/own_loop --steps 200

The data are synthetic (class-dependent blobs on 1x12x12 images, fixed by a seed): nothing is
downloaded. Read the store with ``gradstore inspect OUT/store.zarr`` or ``gradstore.store.open_run``.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from gradstore.record import Recorder, Schedule


class Blobs(Dataset):
    """n fixed 1x12x12 images; class c has a bright blob at its own place, plus noise."""

    def __init__(self, n: int, seed: int, classes: int = 4):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, classes, (n,), generator=g)
        images = 0.5 * torch.randn(n, 1, 12, 12, generator=g)
        for c in range(classes):
            row, col = 2 + 6 * (c // 2), 2 + 6 * (c % 2)
            images[self.labels == c, :, row:row + 3, col:col + 3] += 2.0
        self.images = images

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def cnn(classes: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.25), nn.Linear(16 * 3 * 3, classes))


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the run store (created)")
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--every", type=int, default=10, help="capture every N steps (0: no Recorder, to time the "
                        "loop alone)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    train_set, test_set = Blobs(2000, seed=1), Blobs(500, seed=2)
    loader = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    rng = np.random.default_rng(0)
    tracked = np.sort(rng.choice(len(train_set), 128, replace=False))
    held_out = np.sort(rng.choice(len(test_set), 64, replace=False))
    prime = [next(iter(DataLoader(train_set, batch_size=128, shuffle=True,
                                  generator=torch.Generator().manual_seed(s))))[0] for s in range(4)]
    args.out.mkdir(parents=True, exist_ok=True)
    recorder = None if args.every == 0 else Recorder(
        args.out / "store.zarr", model,
        train_dataset=Subset(train_set, tracked), train_ids=tracked,          # ids: the Dataset's own indices
        test_dataset=Subset(test_set, held_out), test_ids=100_000 + held_out,  # distinct from the train ids
        moments_dataset=train_set, moments_chunk=500,                         # exact moments over all 2000
        prime_batches=prime,                                                  # eval mode, BatchNorm primed
        schedule=Schedule.every(args.every), coords_per_layer=50, overwrite=True,
        config={"example": "own_loop", "steps": args.steps}, seeds={"torch": 0, "tracked": 0})
    step, start = 0, time.perf_counter()
    with recorder or nullcontext():
        if recorder is not None:
            recorder.maybe_record(step, model)  # step 0: the initial model
        while step < args.steps:
            for x, y in loader:
                model.train()
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                if recorder is not None:
                    recorder.maybe_record(step, model, lr=0.05, train_loss=loss.item())
                if step == args.steps:
                    break
    seconds = time.perf_counter() - start  # the loop, the captures and the last write (close waits for it)
    print(f"{args.steps} training steps in {seconds:.2f} s; "
          + (f"recorded {recorder.committed} steps to {args.out / 'store.zarr'}" if recorder is not None else "no Recorder"))
    return args.out / "store.zarr"


if __name__ == "__main__":
    main()
