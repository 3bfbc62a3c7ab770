"""The Lightning callback records on the schedule from the module the Trainer trains, unchanged,
once per optimizer step under gradient accumulation (needs ``lightning``; skipped without it)."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.utilities.warnings import PossibleUserWarning  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from gradstore.record import Schedule  # noqa: E402
from gradstore.record.lightning import GradstoreCallback  # noqa: E402
from gradstore.store import open_run  # noqa: E402


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _index):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def _fit(tmp_path, accumulate):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    module = Module()
    keys = list(module.state_dict())
    callback = GradstoreCallback(tmp_path / f"s{accumulate}.zarr", train_inputs=x[:6], train_targets=y[:6],
                                 train_ids=np.arange(6), schedule=Schedule.every(1), coords_per_layer=0)
    trainer = pl.Trainer(max_steps=3, accumulate_grad_batches=accumulate, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback])
    with warnings.catch_warnings():
        # Lightning's advice on dataloader workers and logging, and its use of a torch API torch
        # deprecates (LeafSpec), are not ours to test; any other warning fails
        warnings.simplefilter("ignore", PossibleUserWarning)
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    assert list(module.state_dict()) == keys  # nothing wrapped or renamed
    return module, open_run(tmp_path / f"s{accumulate}.zarr").load(), (x[:6], y[:6])


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_callback_records_every_optimizer_step_once(tmp_path, accumulate):
    module, ds, (x, y) = _fit(tmp_path, accumulate)
    assert ds.step.values.tolist() == [0, 1, 2, 3]
    with torch.no_grad():  # the last step is the fitted model
        want = F.cross_entropy(module(x), y, reduction="none").numpy()
    np.testing.assert_allclose(ds.loss.values[-1], want, rtol=1e-6)
    assert np.isfinite(ds.train_loss.values[1:]).all() and (ds.lr.values[1:] == 0.2).all()


def test_gradient_accumulation_changes_the_steps_not_their_meaning(tmp_path):
    """Step 0 is the initial model whatever the accumulation; later steps differ (bigger batches)."""
    _, one, _ = _fit(tmp_path, 1)
    _, two, _ = _fit(tmp_path, 2)
    np.testing.assert_allclose(one.loss.values[0], two.loss.values[0], rtol=1e-7)
    assert not np.allclose(one.loss.values[-1], two.loss.values[-1])
