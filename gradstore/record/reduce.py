"""How one step's capture is combined across processes: a reducer (local, or torch.distributed).

A reducer tells a :class:`~gradstore.record.step.StepCapture` which rows of each sample this
process captures (:meth:`shard`), sums float64 tensors over the processes (:meth:`sum`: exact
totals, since every moment is a sum) and brings the per-example arrays to rank 0 (:meth:`gather`).
:class:`LocalReducer` is one process; :class:`ProcessGroupReducer` is every rank of the default
``torch.distributed`` process group (``all_reduce`` in float64, per-example arrays gathered to
rank 0 through authenticated messages, :mod:`gradstore.record.messages`).

Shards are contiguous, in ``numpy.array_split`` order, so rank 0's concatenation of the gathered
pieces is the sample's own order.
"""

from __future__ import annotations

import numpy as np


def shard(n: int, rank: int, size: int) -> slice:
    """Rows of an n-example sample that ``rank`` of ``size`` captures (``numpy.array_split`` order)."""
    bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(n), size)])
    return slice(int(bounds[rank]), int(bounds[rank + 1]))


class LocalReducer:
    """One process captures everything: sums are the local sums, the gather is the local part."""

    rank, size = 0, 1

    def shard(self, n: int) -> slice:
        return slice(0, n)

    def sum(self, tensor):
        """``tensor`` summed over the processes, in place (here: itself)."""
        return tensor

    def gather(self, part):
        """The parts of every process in rank order on rank 0, None elsewhere (here: ``[part]``)."""
        return [part]

    def share(self, values: list[int]) -> list[int]:
        """Rank 0's ``values`` (a few integers) on every process (here: ``values``)."""
        return values


class ProcessGroupReducer:
    """Every rank of the default torch.distributed process group captures its shard.

    Collective: every rank must make the same calls in the same order. With gloo, tensors are
    moved to the CPU before they cross ranks.
    """

    def __init__(self):
        from gradstore.record.messages import world

        self.rank, self.size = world()

    def shard(self, n: int) -> slice:
        return shard(n, self.rank, self.size)

    def sum(self, tensor):
        import torch
        import torch.distributed as dist

        if tensor.dtype != torch.float64:
            raise TypeError("the reducer sums float64 tensors only (exact totals)")
        dist.all_reduce(tensor)
        return tensor

    def gather(self, part):
        from gradstore.record.messages import gather_messages

        return gather_messages(part)

    def share(self, values: list[int]) -> list[int]:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.int64)
        dist.broadcast(tensor, src=0)
        return tensor.tolist()
