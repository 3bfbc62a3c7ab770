"""Record a PyTorch Lightning run with ``GradstoreCallback``: the LightningModule is not changed.

A small CNN ``LightningModule`` on synthetic images (four classes of oriented bars in noise, fixed
by a seed: nothing is downloaded), trained by ``lightning.Trainer`` with gradient accumulation 2.
The callback records on the schedule at the Trainer's optimizer steps (``trainer.global_step``),
with exact moments over the whole training set, and writes every layer's m-coherence to
TensorBoard at each capture (``OUT/tensorboard``).

    python examples/lightning_callback.py --out runs/lightning --steps 100
    tensorboard --logdir runs/lightning/tensorboard
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from gradstore.record import Schedule
from gradstore.record.lightning import GradstoreCallback


class Bars(Dataset):
    """n fixed 1x8x8 images; class c is a bar at its own orientation (row, column, two diagonals)."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 4, (n,), generator=g)
        eye = torch.eye(8)
        row, col = torch.zeros(8, 8), torch.zeros(8, 8)
        row[3:5], col[:, 3:5] = 1.0, 1.0
        patterns = torch.stack([row, col, eye, eye.flip(1)])
        self.images = (patterns[self.labels] + 0.7 * torch.randn(n, 8, 8, generator=g))[:, None]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


class BarsCNN(pl.LightningModule):
    """The user's module, as it would be without gradstore."""

    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                 nn.Dropout(0.2), nn.Linear(8 * 4 * 4, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _index):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the run store (created)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--every", type=int, default=10, help="capture every N optimizer steps")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    train_set, test_set = Bars(1024, seed=1), Bars(256, seed=2)
    rng = np.random.default_rng(0)
    tracked = np.sort(rng.choice(len(train_set), 64, replace=False))
    held_out = np.sort(rng.choice(len(test_set), 32, replace=False))
    args.out.mkdir(parents=True, exist_ok=True)
    callback = GradstoreCallback(
        args.out / "store.zarr", log_dir=args.out / "tensorboard",
        train_dataset=Subset(train_set, tracked), train_ids=tracked,           # ids: the Dataset's own indices
        test_dataset=Subset(test_set, held_out), test_ids=100_000 + held_out,  # distinct from the train ids
        moments_dataset=train_set,                                             # exact moments over all 1024
        schedule=Schedule.every(args.every), coords_per_layer=20, overwrite=True,
        config={"example": "lightning_callback", "steps": args.steps}, seeds={"lightning": 0, "tracked": 0})
    module = BarsCNN()
    trainer = pl.Trainer(max_steps=args.steps, accumulate_grad_batches=2, accelerator="cpu", devices=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback])
    loader = DataLoader(train_set, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer.fit(module, loader)
    print(f"{trainer.global_step} optimizer steps; store {args.out / 'store.zarr'}, "
          f"TensorBoard scalars in {args.out / 'tensorboard'}")
    return args.out / "store.zarr"


if __name__ == "__main__":
    main()
