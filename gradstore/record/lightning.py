"""A PyTorch Lightning ``Callback`` that records on the schedule; the user's module is not changed.

Requires ``lightning`` (``pip install lightning``); importing this module imports it.

The callback builds its :class:`~gradstore.record.Recorder` when fitting starts, on global rank 0
only (the single writer; the other ranks train as usual and record nothing), from the module the
trainer trains: the ``LightningModule`` itself (never the strategy's DDP wrapper; a
``torch.compile``-d module is read through its original module), so no module is wrapped and
``state_dict`` keys are unchanged. After every training batch it calls
:meth:`~gradstore.record.Recorder.maybe_record` with ``trainer.global_step``, the number of
optimizer steps taken: with gradient accumulation the micro-batches of one step share it and the
step is captured once, on the model that step produced. Captures run outside the trainer's
autocast context, with the Recorder's own ``autocast`` option.
"""

from __future__ import annotations

import math

from lightning.pytorch.callbacks import Callback

from gradstore.errors import StoreError
from gradstore.record.recorder import trained_module


class GradstoreCallback(Callback):
    """Record exact per-example gradient statistics during ``Trainer.fit``.

    Parameters
    ----------
    target : str or path
        The run store.
    **recorder_options
        Every argument of :class:`gradstore.record.Recorder` after ``model`` (tracked samples,
        ``schedule``, ``task``, ``mode``, ``prime_batches``, ...).

    Attributes
    ----------
    recorder : Recorder or None
        The Recorder while fitting on rank 0 (None before, and on other ranks).
    """

    def __init__(self, target, **recorder_options):
        if "model" in recorder_options:
            raise StoreError("GradstoreCallback records the module the Trainer trains; do not pass model=")
        self.target, self.options = target, recorder_options
        self.recorder = None

    def on_fit_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            from gradstore.record import Recorder

            self.recorder = Recorder(self.target, trained_module(pl_module), **self.options)
            self.recorder.maybe_record(trainer.global_step, trained_module(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.recorder is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        metrics = {"train_loss": float(loss.detach()) if loss is not None else math.nan}
        optimizers = trainer.optimizers
        if optimizers and optimizers[0].param_groups:
            metrics["lr"] = float(optimizers[0].param_groups[0].get("lr", math.nan))
        self.recorder.maybe_record(trainer.global_step, trained_module(pl_module), **metrics)

    def on_fit_end(self, trainer, pl_module):
        self._close()

    def on_exception(self, trainer, pl_module, exception):
        self._close()

    def _close(self):
        if self.recorder is not None:
            recorder, self.recorder = self.recorder, None
            recorder.close()

    def state_dict(self):
        """What the store holds durably (saved in Lightning checkpoints)."""
        if self.recorder is None:
            return {}
        self.recorder.flush()
        return self.recorder.checkpoint_state()
