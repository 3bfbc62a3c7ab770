"""What the training-framework callbacks share: which ranks record, and the TensorBoard scalars.

:class:`TrainerObserver` is the framework-free part of :class:`gradstore.record.lightning.GradstoreCallback`
and :class:`gradstore.record.hf.GradstoreTrainerCallback`: it checks the Recorder options once,
builds a :class:`~gradstore.record.Recorder` when training starts on the ranks that record, records
on the schedule and closes it. The rule for ranks: without a ``reducer`` only global rank 0 builds
a Recorder (the single writer; the other ranks train and record nothing); with one (e.g.
``ProcessGroupReducer()``) every rank builds it and records at the same steps, as the reducer's
collectives need.

:class:`MCoherenceScalars` writes the m-coherence of every layer at each capture to TensorBoard
(``torch.utils.tensorboard.SummaryWriter``, which needs ``pip install tensorboard``).
"""

from __future__ import annotations

from gradstore.errors import StoreError
from gradstore.record.recorder import check_on_capture
from gradstore.store.schema import SAMPLES


def m_coherence_scalars(values, layers) -> dict[str, float]:
    """TensorBoard tag -> m-coherence ||Σ g||² / Σ ||g||² of one captured step's moments.

    ``values`` are the step's arrays (:class:`gradstore.record.Recorder`'s ``on_capture``):
    ``m``, ``norm_sq_of_sum`` and ``sum_of_norm_sq``, each (sample, layer). Tags are
    ``m_coherence/<sample>/<layer>`` for each layer and ``m_coherence/<sample>/model`` for the
    whole model (parameter blocks are disjoint, so both sums add over layers), for the samples the
    run has (m > 0). m-coherence is the quantity of ``analysis.coherence.m_coherence``; a layer whose
    gradients are all zero has none, and gets no scalar.
    """
    out = {}
    m, nsos, sonsq = values["m"], values["norm_sq_of_sum"], values["sum_of_norm_sq"]
    for row, sample in enumerate(SAMPLES):
        if not m[row].any():
            continue
        pairs = [*zip(layers, nsos[row], sonsq[row]), ("model", float(nsos[row].sum()), float(sonsq[row].sum()))]
        for layer, of_sum, sum_of in pairs:
            if sum_of > 0:
                out[f"m_coherence/{sample}/{layer}"] = float(of_sum) / float(sum_of)
    return out


class MCoherenceScalars:
    """An ``on_capture`` hook that writes :func:`m_coherence_scalars` to TensorBoard at each capture.

    The event file is opened on the first capture (so only a rank that captures writes one) and
    flushed after every capture; :meth:`close` closes it.

    Parameters
    ----------
    log_dir : str or path
        The TensorBoard log folder (``tensorboard --logdir LOG_DIR``).
    layers : sequence of str
        The run's layers, in the store's order (``recorder.layout.layers``).
    """

    def __init__(self, log_dir, layers):
        require_tensorboard()
        self.log_dir, self.layers, self.writer = str(log_dir), tuple(layers), None

    def __call__(self, step: int, values) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.log_dir)
        for tag, value in m_coherence_scalars(values, self.layers).items():
            self.writer.add_scalar(tag, value, global_step=int(step))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()


def require_tensorboard() -> None:
    """Refuse, in one line, TensorBoard scalars where the ``tensorboard`` package is missing."""
    from importlib.util import find_spec

    if find_spec("tensorboard") is None:
        raise StoreError("log_dir= writes TensorBoard scalars, which needs the tensorboard package: "
                         "pip install tensorboard (or leave log_dir out)")


class TrainerObserver:
    """A Recorder per training run on the ranks that record; see the module docstring.

    Parameters
    ----------
    target : str or path
        The run store.
    who : str
        The callback's name, for messages.
    log_dir : str or path, optional
        Write per-layer m-coherence to TensorBoard at each capture (:class:`MCoherenceScalars`).
    options : dict
        Every argument of :class:`gradstore.record.Recorder` after ``model``.
    """

    def __init__(self, target, who: str, log_dir, options: dict):
        if "model" in options:
            raise StoreError(f"{who} records the model the trainer trains; do not pass model=")
        check_on_capture(options.get("on_capture"))  # at the callback's construction, before any training
        if log_dir is not None:
            require_tensorboard()
        self.target, self.who, self.log_dir, self.options = target, who, log_dir, dict(options)
        self.recorder, self.scalars = None, None

    def start(self, model, is_global_zero: bool):
        """Build the Recorder for ``model`` (already unwrapped) if this rank records; return it or None."""
        self.close()  # a run that ended in an exception left its Recorder open
        if not is_global_zero and self.options.get("reducer") is None:
            return None
        from gradstore.record import Recorder

        options = dict(self.options)
        user_hook = options.pop("on_capture", None)
        hooks = [user_hook] if user_hook is not None else []
        recorder = Recorder(self.target, model, **options, on_capture=_chain(hooks))
        if self.log_dir is not None:
            self.scalars = MCoherenceScalars(self.log_dir, recorder.layout.layers)
            hooks.append(self.scalars)
        self.recorder = recorder
        return recorder

    def record(self, step: int, model, **metrics) -> bool:
        """:meth:`Recorder.maybe_record` on this rank (False where it records nothing)."""
        if self.recorder is None:
            return False
        return self.recorder.maybe_record(step, model, **metrics)

    def close(self) -> None:
        """Wait for the last write, close the Recorder and the TensorBoard file (idempotent)."""
        recorder, scalars = self.recorder, self.scalars
        self.recorder = self.scalars = None
        try:
            if recorder is not None:
                recorder.close()
        finally:
            if scalars is not None:
                scalars.close()


def _chain(hooks: list):
    """One on_capture calling each of ``hooks`` (a list filled in after the Recorder is built)."""
    def on_capture(step, values):
        for hook in hooks:
            hook(step, values)
    return on_capture
