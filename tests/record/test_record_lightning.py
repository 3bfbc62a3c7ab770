"""The Lightning callback records on the schedule from the module the Trainer trains, unchanged,
once per optimizer step under gradient accumulation, at its own precision under bf16 mixed
precision, on the ranks that record, with TensorBoard scalars (needs ``lightning``; skipped
without it)."""

import importlib.util
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.utilities.warnings import PossibleUserWarning  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from gradstore.errors import StoreError  # noqa: E402
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


def _fit(tmp_path, accumulate, precision="32-true", **options):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    module = Module()
    keys = list(module.state_dict())
    callback = GradstoreCallback(tmp_path / f"s{accumulate}.zarr", train_inputs=x[:6], train_targets=y[:6],
                                 train_ids=np.arange(6), schedule=Schedule.every(1), coords_per_layer=0, **options)
    trainer = pl.Trainer(max_steps=3, accumulate_grad_batches=accumulate, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback], precision=precision)
    with warnings.catch_warnings():
        # Lightning's advice on dataloader workers and logging, and its use of a torch API torch
        # deprecates (LeafSpec), are not ours to test; any other warning fails
        warnings.simplefilter("ignore", PossibleUserWarning)
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    assert list(module.state_dict()) == keys  # nothing wrapped or renamed
    assert callback.recorder is None  # closed at the end of fit
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


def test_bf16_mixed_precision_is_captured_at_the_recorders_precision(tmp_path):
    """Lightning's autocast covers training_step only; the capture runs in float32 (autocast=None)."""
    module, ds, (x, y) = _fit(tmp_path, 2, precision="bf16-mixed")
    assert ds.step.values.tolist() == [0, 1, 2, 3]
    with torch.no_grad():
        want = F.cross_entropy(module(x), y, reduction="none").numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = F.cross_entropy(module(x).float(), y, reduction="none").numpy()
    assert not np.allclose(bf16, want, rtol=1e-6)  # what an autocast capture would have stored
    np.testing.assert_allclose(ds.loss.values[-1], want, rtol=1e-6)


def test_tensorboard_scalars_are_each_layers_m_coherence(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from analysis.coherence import m_coherence

    seen = []
    _, ds, _ = _fit(tmp_path, 1, log_dir=tmp_path / "tb", on_capture=lambda step, values: seen.append(step))
    assert seen == [0, 1, 2, 3]  # a hook of the user's own runs beside the scalars
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    layers = ds.layer.values.tolist()
    assert layers == ["net.0", "net.2"]
    assert set(events.Tags()["scalars"]) == {f"m_coherence/tracked_train/{la}" for la in [*layers, "model"]}
    sel = ds.sel(sample="tracked_train")
    want = m_coherence(sel.norm_sq_of_sum, sel.sum_of_norm_sq).values
    for j, layer in enumerate(layers):
        scalars = events.Scalars(f"m_coherence/tracked_train/{layer}")
        assert [s.step for s in scalars] == [0, 1, 2, 3]
        np.testing.assert_allclose([s.value for s in scalars], want[:, j], rtol=1e-6)
    assert (want > 0).all() and (want <= 6 + 1e-9).all()  # between 0 and m for 6 tracked examples


def test_only_global_rank_zero_records_unless_a_reducer_spans_the_ranks(tmp_path):
    """Without a reducer a rank other than 0 trains and records nothing; with one every rank records
    (here a one-process LocalReducer, whose rank is 0, stands for each rank's ProcessGroupReducer)."""
    from gradstore.record import LocalReducer

    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    other_rank = SimpleNamespace(is_global_zero=False, global_step=0)
    options = dict(train_inputs=x, train_targets=y, train_ids=np.arange(6), coords_per_layer=0, background=False)
    alone = GradstoreCallback(tmp_path / "a.zarr", **options)
    alone.on_fit_start(other_rank, Module())
    assert alone.recorder is None and not (tmp_path / "a.zarr").exists()
    shared = GradstoreCallback(tmp_path / "b.zarr", reducer=LocalReducer(), **options)
    shared.on_fit_start(other_rank, Module())
    assert shared.recorder is not None
    shared.on_fit_end(other_rank, None)
    assert open_run(tmp_path / "b.zarr").load().step.values.tolist() == [0]


def test_bad_arguments_are_refused_in_one_line(tmp_path, monkeypatch):
    with pytest.raises(StoreError, match="do not pass model="):
        GradstoreCallback(tmp_path / "s.zarr", model=Module())
    with pytest.raises(StoreError, match="on_capture must be a callable"):
        GradstoreCallback(tmp_path / "s.zarr", on_capture=3)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(StoreError, match="pip install tensorboard"):
        GradstoreCallback(tmp_path / "s.zarr", log_dir=tmp_path / "tb")
    assert not (tmp_path / "s.zarr").exists()
