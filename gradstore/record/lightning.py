"""A PyTorch Lightning ``Callback`` that records on the schedule; the user's module is not changed.

Requires ``lightning`` (``pip install lightning``); importing this module imports it.

The callback builds its :class:`~gradstore.record.Recorder` when fitting starts from the module the
trainer trains: the ``LightningModule`` itself (never the strategy's DDP wrapper; a
``torch.compile``-d module is read through its original module), so no module is wrapped and
``state_dict`` keys are unchanged. Without a ``reducer`` the Recorder lives on global rank 0 only
(the single writer; the other ranks train as usual and record nothing); with one
(``reducer=ProcessGroupReducer()``) every rank builds it and captures its shard
(:mod:`gradstore.record.observe`). After every training batch it calls
:meth:`~gradstore.record.Recorder.maybe_record` with ``trainer.global_step``, the number of
optimizer steps taken: with gradient accumulation the micro-batches of one step share it and the
step is captured once, on the model that step produced. Captures run outside the trainer's
autocast context, with the Recorder's own ``autocast`` option. ``log_dir=`` adds TensorBoard
scalars of each layer's m-coherence at each capture. ``examples/lightning_callback.py`` runs it.
"""

from __future__ import annotations

import math

from lightning.pytorch.callbacks import Callback

from gradstore.record.observe import TrainerObserver
from gradstore.record.recorder import trained_module


class GradstoreCallback(Callback):
    """Record exact per-example gradient statistics during ``Trainer.fit``.

    Parameters
    ----------
    target : str or path
        The run store.
    log_dir : str or path, optional
        Write the m-coherence of every layer (and of the whole model) of every sample at each
        capture as TensorBoard scalars ``m_coherence/<sample>/<layer>`` there (needs
        ``tensorboard``).
    **recorder_options
        Every argument of :class:`gradstore.record.Recorder` after ``model`` (tracked samples,
        ``schedule``, ``task``, ``mode``, ``prime_batches``, ``reducer``, ...).

    Attributes
    ----------
    recorder : Recorder or None
        The Recorder while fitting on a rank that records (None before, and on other ranks).
    """

    def __init__(self, target, *, log_dir=None, **recorder_options):
        self._observer = TrainerObserver(target, "GradstoreCallback", log_dir, recorder_options)

    @property
    def recorder(self):
        return self._observer.recorder

    def on_fit_start(self, trainer, pl_module):
        module = trained_module(pl_module)
        if self._observer.start(module, trainer.is_global_zero) is not None:
            self._observer.record(trainer.global_step, module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.recorder is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        metrics = {"train_loss": float(loss.detach()) if loss is not None else math.nan}
        optimizers = trainer.optimizers
        if optimizers and optimizers[0].param_groups:
            metrics["lr"] = float(optimizers[0].param_groups[0].get("lr", math.nan))
        self._observer.record(trainer.global_step, trained_module(pl_module), **metrics)

    def on_fit_end(self, trainer, pl_module):
        self._observer.close()

    def on_exception(self, trainer, pl_module, exception):
        self._observer.close()

    def state_dict(self):
        """What the store holds durably (saved in Lightning checkpoints)."""
        if self.recorder is None:
            return {}
        self.recorder.flush()
        return self.recorder.checkpoint_state()
