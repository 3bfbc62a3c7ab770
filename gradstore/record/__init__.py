"""Recording in any training loop (torch side): tasks, samples, a step capture, reducers, the Recorder.

- :class:`Recorder`: a schedule, a run writer and a background executor around a step capture;
  :meth:`Recorder.maybe_record` on the schedule, :meth:`Recorder.record_now` whatever it says.
- Tasks (:mod:`.tasks`): :class:`Classification`, :class:`Sequence`, :class:`Regression`,
  :class:`Custom`; add one with :func:`register_task`.
- :class:`Sample` (:mod:`.samples`): tracked and moments examples from tensors or a Dataset.
- :class:`StepCapture` (:mod:`.step`): the typed arrays of one step, keyed by the schema's names.
- Reducers (:mod:`.reduce`): :class:`LocalReducer`, :class:`ProcessGroupReducer` (DDP: every rank
  captures its shard, rank 0 writes; docs/ddp.md).
- :mod:`.distributed`: :class:`~gradstore.record.distributed.DistributedRecorder`, for loops where
  rank 0 alone trains and the other ranks only capture (capture workers).
- :mod:`.lightning`, :mod:`.hf`: the Lightning and Hugging Face Trainer callbacks.

The store (:mod:`gradstore.store`) stays torch-free; this package is where torch comes in.
"""

from gradstore.record.precision import autocast_forward
from gradstore.record.recorder import Recorder
from gradstore.record.reduce import LocalReducer, ProcessGroupReducer
from gradstore.record.samples import Sample
from gradstore.record.step import StepCapture, dropout_mask, sample_coords
from gradstore.record.tasks import TASKS, Classification, Custom, Regression, Sequence, Task, register_task
from gradstore.store.schedule import Schedule

__all__ = ["TASKS", "Classification", "Custom", "LocalReducer", "ProcessGroupReducer", "Recorder", "Regression",
           "Sample", "Schedule", "Sequence", "StepCapture", "Task", "autocast_forward", "dropout_mask",
           "register_task", "sample_coords"]
