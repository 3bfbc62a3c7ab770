"""A Hugging Face ``TrainerCallback`` that records on the schedule; the user's model is not changed.

Requires ``transformers`` (and ``accelerate``, which the ``Trainer`` needs: ``pip install
gradstore[hf]``); importing this module imports transformers, ``import gradstore`` does not.

The callback builds its :class:`~gradstore.record.Recorder` when training starts
(``on_train_begin``, which records step 0 or, on a resumed run, the step it resumes at) from the
model the ``Trainer`` trains, unwrapped (``DistributedDataParallel.module``, a ``torch.compile``-d
module's original), so no module is wrapped and ``state_dict`` keys are unchanged. Without a
``reducer`` the Recorder lives on global rank 0 only (the single writer); with one every rank
builds it (:mod:`gradstore.record.observe`). At every ``on_step_end`` it calls
:meth:`~gradstore.record.Recorder.maybe_record` with ``state.global_step``, the number of optimizer
steps taken: with ``gradient_accumulation_steps`` the Trainer calls ``on_step_end`` once per
optimizer step (``on_substep_end`` between micro-batches), so a step is captured once, on the
model that step produced. The stored ``lr`` is the learning rate that step used (read at
``on_optimizer_step``, before the scheduler moves it); the Trainer gives callbacks no per-step
loss, so ``train_loss`` is NaN.

Mixed precision (``bf16=True``/``fp16=True``): Accelerate replaces the model's ``forward`` by an
autocast wrapper; captures run the model's own forward (restored afterwards), so the run is
measured as the Recorder's ``autocast`` option says (default float32), not at the Trainer's
precision.

A causal language model of ``transformers`` shifts its ``labels`` itself; the Recorder's
``sequence`` task wants the token each position predicts: :func:`causal_lm_targets` converts.
``examples/hf_trainer.py`` runs it all.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import TrainerCallback

from gradstore.errors import StoreError
from gradstore.record.observe import TrainerObserver
from gradstore.record.recorder import trained_module


def causal_lm_targets(labels, ignore_index: int = -100) -> torch.Tensor:
    """The ``sequence`` task's targets of a causal LM's ``labels`` (examples, positions).

    ``transformers`` causal LMs predict ``labels[:, t + 1]`` at position t (the model shifts
    them); the Recorder's :class:`~gradstore.record.Sequence` task wants that token at position t.
    Returns ``labels`` shifted left by one, with ``ignore_index`` at the last position (it predicts
    nothing), so the stored loss of a sequence is the model's own mean token cross entropy over
    its counted positions (``ignore_index`` in ``labels``, e.g. padding, does not count).
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise StoreError(f"causal_lm_targets needs labels of shape (examples, positions), got {got}")
    out = torch.full_like(labels, ignore_index)
    out[:, :-1] = labels[:, 1:]
    return out


@contextmanager
def own_forward(model):
    """``model`` runs its own ``forward`` inside, not the autocast wrapper Accelerate's mixed
    precision puts in its place (``model._original_forward``); the wrapper is put back on exit."""
    patched = vars(model).get("forward")
    original = vars(model).get("_original_forward")
    if patched is None or original is None:
        yield model
        return
    model.forward = original
    try:
        yield model
    finally:
        model.forward = patched


class GradstoreTrainerCallback(TrainerCallback):
    """Record exact per-example gradient statistics during ``Trainer.train``.

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
        ``schedule``, ``task``, ``mode``, ``reducer``, ...); for a causal LM, ``task="sequence"``
        with targets from :func:`causal_lm_targets`.

    Attributes
    ----------
    recorder : Recorder or None
        The Recorder while training on a rank that records (None before, after, and on other ranks).

    Notes
    -----
    The Recorder is closed (its last write waited for) at ``on_train_end``. The Trainer has no
    event for an exception; steps already committed are safe in the store, and :meth:`close` (or
    ``with callback:`` around ``trainer.train()``), or the next ``trainer.train()``, closes it.
    """

    def __init__(self, target, *, log_dir=None, **recorder_options):
        self._observer = TrainerObserver(target, "GradstoreTrainerCallback", log_dir, recorder_options)
        self._lr = float("nan")

    @property
    def recorder(self):
        return self._observer.recorder

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        module = self._model(model)
        with own_forward(module):
            if self._observer.start(module, state.is_world_process_zero) is not None:
                self._observer.record(state.global_step, module)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None and optimizer.param_groups:
            self._lr = float(optimizer.param_groups[0].get("lr", float("nan")))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.recorder is None:
            return
        module = self._model(model)
        with own_forward(module):
            self._observer.record(state.global_step, module, lr=self._lr)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Wait for the last write and close the Recorder (and the TensorBoard file); idempotent."""
        self._observer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @staticmethod
    def _model(model):
        if model is None:
            raise StoreError("GradstoreTrainerCallback got no model from the Trainer; add it to a "
                             "transformers.Trainer(callbacks=[...]), which passes model=")
        return trained_module(model)
