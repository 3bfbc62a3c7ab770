"""How one step's capture is combined across processes: a reducer (local, or torch.distributed).

A reducer tells a :class:`~gradstore.record.step.StepCapture` which rows of each sample this
process captures (:meth:`shard`), sums float64 tensors over the processes (:meth:`sum`: exact
totals, since every moment is a sum) and brings the per-example arrays to rank 0 (:meth:`gather`).
:class:`LocalReducer` is one process; :class:`ProcessGroupReducer` is every rank of the default
``torch.distributed`` process group (``all_reduce`` in float64, per-example arrays gathered to
rank 0 through authenticated messages, :mod:`gradstore.record.messages`).

Shards are contiguous, in ``numpy.array_split`` order, so rank 0's concatenation of the gathered
pieces is the sample's own order.

Collective mismatches and dead ranks (``docs/ddp.md``)
-------------------------------------------------------
Before the collectives of a capture (and when a Recorder opens), every rank sends rank 0 a small
int64 *header* -- what it is doing (opening, capturing), the step, its count of capture
exchanges and of authenticated messages, its timeout, the sizes of its tracked and moments
samples, a fingerprint of the run's configuration and a checksum of the model's weights -- and
rank 0 sends every rank the table of all headers (:meth:`ProcessGroupReducer.check_in`). Every
rank reads the same table, so when the ranks disagree every rank raises the same one-line
:class:`~gradstore.errors.GradstoreError` (:func:`mismatch`) before any mismatched collective runs.

The capture's collectives run on a gloo group of their own (CPU tensors, whatever the default
backend: NCCL, gloo) created with the reducer's ``timeout`` (default
:data:`DEFAULT_TIMEOUT`, much shorter than torch's 30 minutes). A rank that does not answer
within it -- dead, hung, or not calling the capture at all -- stops every other rank with
``GradstoreError("rank R did not answer the capture of step S within T s ...")``; rank 0 then
writes nothing of that step (it was never complete), so the store keeps exactly the steps
committed before it and a restarted run resumes after them. A reducer whose collectives failed
refuses every later call: the group's state is undefined after a timeout.
"""

from __future__ import annotations

import hashlib
import math
import re
from contextlib import contextmanager

import numpy as np

from gradstore.errors import GradstoreError

#: seconds any rank waits for another inside a capture's collectives (``ProcessGroupReducer(timeout=)``)
DEFAULT_TIMEOUT = 300.0

#: what a header says the rank is doing
OPEN, CAPTURE = 1, 2
_DOING = {OPEN: "opening its Recorder", CAPTURE: "capturing"}

#: header fields, in order (int64 each; the weight sums are float64 bit patterns)
FIELDS = ("version", "doing", "step", "exchange", "messages", "timeout_ms", "n_train", "n_test", "n_moments",
          "fingerprint", "weight_sum", "weight_abs_sum")
_VERSION = 1
_H = len(FIELDS)
#: agreement asked of the ranks' weight sums, relative to Σ |w|: DDP keeps the replicas bit-identical,
#: and float64 sums of the same float32 weights on different devices agree to ~1e-15; replicas that
#: trained apart for one step differ by far more
WEIGHT_RTOL = 1e-7


def shard(n: int, rank: int, size: int) -> slice:
    """Rows of an n-example sample that ``rank`` of ``size`` captures (``numpy.array_split`` order)."""
    bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(n), size)])
    return slice(int(bounds[rank]), int(bounds[rank + 1]))


def fingerprint(*parts) -> int:
    """A signed 64-bit digest (BLAKE2b) of ``parts``: numpy arrays by dtype, shape and bytes, others by repr."""
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        if isinstance(part, np.ndarray):
            digest.update(f"{part.dtype.str}{part.shape}".encode())
            digest.update(np.ascontiguousarray(part).tobytes())
        else:
            digest.update(repr(part).encode())
        digest.update(b"\x00")
    return int.from_bytes(digest.digest(), "little", signed=True)


def header(doing: int, step, *, exchange: int, messages: int, timeout: float, sizes=(-1, -1, -1),
           config: int = 0, weights=(0.0, 0.0)) -> np.ndarray:
    """One rank's header (int64, ``FIELDS``); ``step`` None when opening; sizes -1 for an absent sample."""
    bits = np.array(weights, dtype=np.float64).view(np.int64)
    return np.array([_VERSION, doing, -1 if step is None else int(step), exchange, messages,
                     int(round(timeout * 1000)), *[int(s) for s in sizes], int(config), *bits.tolist()],
                    dtype=np.int64)


def _ranks(ranks) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(str(r) for r in ranks)


def _split_by(column) -> list[tuple[int, list[int]]]:
    """(value, ranks holding it), in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for rank, value in enumerate(column):
        groups.setdefault(int(value), []).append(rank)
    return list(groups.items())


def _say(column, word=lambda v: str(v)) -> str:
    return ", ".join(f"{_ranks(ranks)} {word(value)}" for value, ranks in _split_by(column))


def mismatch(table) -> str | None:
    """The one-line error when the ranks' headers (rows of ``table``, in rank order) disagree; else None.

    Pure: every rank computes it from the same table, so every rank raises the same line.
    """
    table = np.asarray(table, dtype=np.int64)
    col = {name: table[:, i] for i, name in enumerate(FIELDS)}
    if len(set(col["version"].tolist())) > 1:
        return ("the ranks run different gradstore versions (" + _say(col["version"], lambda v: f"speaks header {v}")
                + "); install the same gradstore on every rank")
    doing, steps = col["doing"], col["step"]
    what = (f"the capture of step {int(steps[0])}" if int(doing[0]) == CAPTURE else "opening the Recorder")
    head = f"the ranks disagree about {what}: "
    alike = "; create the Recorder with the same model and arguments on every rank"
    same = "; call record_now / maybe_record on every rank at the same steps (the capture is collective)"

    def describe(value, rank_steps):
        return _DOING.get(value, "doing something unknown") + (
            f" step {rank_steps}" if value == CAPTURE else "")
    if len(set(doing.tolist())) > 1 or len(set(steps.tolist())) > 1:
        parts = [f"{_ranks(ranks)} {describe(int(doing[ranks[0]]), int(steps[ranks[0]]))}"
                 for _, ranks in _split_by(doing * (1 << 40) + steps)]
        return head + ", ".join(parts) + same
    if len(set(col["exchange"].tolist())) > 1:
        return (head + "a rank skipped a capture or an opening (" + _say(col["exchange"] + 1, _nth)
                + " exchange)" + same)
    if len(set(col["timeout_ms"].tolist())) > 1:
        return (head + "the capture timeout differs (" + _say(col["timeout_ms"], lambda v: f"waits {v / 1000:g} s")
                + "); give every rank the same ProcessGroupReducer(timeout=...)")
    for field, sample in (("n_train", "tracked train"), ("n_test", "tracked test"), ("n_moments", "moments")):
        if len(set(col[field].tolist())) > 1:
            return (head + f"the {sample} sample differs (" + _say(col[field], _examples)
                    + "); give every rank the same samples: each captures its own shard of them")
    if len(set(col["fingerprint"].tolist())) > 1:
        return (head + "the run's configuration differs (" + _say(col["fingerprint"], lambda v: f"has {v & 0xffffffff:08x}")
                + ": model parameters, example ids or labels, coordinates, projections, Gram, task, mode or autocast)"
                + alike)
    mass = float(np.abs(col["weight_abs_sum"].copy().view(np.float64)).max())  # the scale of both sums
    for field, what_sum in (("weight_sum", "Σ w"), ("weight_abs_sum", "Σ |w|")):
        bits = col[field].copy()
        values = bits.view(np.float64)
        if np.isfinite(values).all() and np.isfinite(mass):
            differ = float(np.ptp(values)) > WEIGHT_RTOL * max(mass, 1e-300)
        else:  # NaN or inf somewhere: the same bits on every rank, or they differ
            differ = len(set(bits.tolist())) > 1
        if differ:
            said = ", ".join(f"rank {r} {what_sum} = {v:.17g}" for r, v in enumerate(values.tolist()))
            return (head + f"the model's weights differ ({said}); wrap the model in DistributedDataParallel (it "
                    "keeps the replicas identical) or load the same state on every rank before recording")
    if len(set(col["messages"].tolist())) > 1:
        return (head + "the ranks' counts of authenticated messages differ (" + _say(col["messages"], lambda v: f"{v}")
                + "); every rank must make the same gradstore calls in the same order")
    return None


def _nth(value: int) -> str:
    suffix = "th" if 10 <= value % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(value % 10, "th")
    return f"is at its {value}{suffix}"


def _examples(value: int) -> str:
    return "has none" if value < 0 else f"has {value} example{'s' if value != 1 else ''}"


class LocalReducer:
    """One process captures everything: sums are the local sums, the gather is the local part."""

    rank, size = 0, 1

    def shard(self, n: int) -> slice:
        return slice(0, n)

    def check_in(self, doing: int, step, **_header) -> None:
        """Check that every process is doing the same (here: nothing to check)."""

    def sum(self, tensor):
        """``tensor`` summed over the processes, in place (here: itself)."""
        return tensor

    def gather(self, part):
        """The parts of every process in rank order on rank 0, None elsewhere (here: ``[part]``)."""
        return [part]

    def share(self, values: list[int]) -> list[int]:
        """Rank 0's ``values`` (a few integers) on every process (here: ``values``)."""
        return values


#: the capture groups of this process: the default group they were made from, and one group per timeout
_groups: dict = {"world": None, "by_timeout": {}}


def capture_group(timeout: float):
    """The gloo group of the capture collectives with ``timeout`` seconds (made on first use, then reused).

    Making a group is collective: every rank makes its first capture call at the same point (the
    Recorder's opening, or the first capture), so every rank makes the same groups in the same order.
    """
    import datetime

    import torch.distributed as dist

    world = dist.group.WORLD  # the default group (a new one after destroy/init_process_group)
    if _groups["world"] is not world:
        _groups.update(world=world, by_timeout={})
    key = int(round(timeout * 1000))
    if key not in _groups["by_timeout"]:
        _groups["by_timeout"][key] = dist.new_group(backend="gloo", timeout=datetime.timedelta(milliseconds=key))
    return _groups["by_timeout"][key]


def forget_capture_group(timeout: float) -> None:
    """Drop the cached capture group of ``timeout`` (after a failure its state is undefined): the next
    reducer with this timeout makes a new one, collectively."""
    _groups["by_timeout"].pop(int(round(timeout * 1000)), None)


def _reason(err: BaseException) -> str:
    """torch's error in a few words: the first line, without gloo's source location."""
    text = re.sub(r"^\s*\[[^\]]*\]\s*", "", str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
    text = text.split(". This is typically")[0]
    return text[:160]


class RankTimeout(GradstoreError):
    """A rank did not answer a capture's collective within the reducer's timeout (or died)."""


class ProcessGroupReducer:
    """Every rank of the default torch.distributed process group captures its shard.

    Collective: every rank must make the same calls in the same order, which :meth:`check_in`
    verifies before each capture. The capture's tensors cross ranks on the CPU, over a gloo group
    of its own whose operations time out after ``timeout`` seconds.

    Parameters
    ----------
    timeout : float, default :data:`DEFAULT_TIMEOUT` (300 s)
        Longest wait for another rank inside the capture's collectives (and for rank 0 to open the
        store). It must cover the ranks' imbalance within a capture, not the capture itself; give
        every rank the same value.
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT):
        from gradstore.record.messages import world

        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
                or timeout <= 0:
            raise GradstoreError(f"ProcessGroupReducer(timeout=...) must be a positive number of seconds, got {timeout!r}")
        self.rank, self.size = world()
        self.timeout = float(timeout)
        self._exchanges = 0  # check_in calls so far (the header's "exchange")
        self._what = "opening the Recorder"  # what the collectives in progress belong to (for errors)
        self._failed: str | None = None  # the line of the first failure; every later call is refused

    @property
    def group(self):
        return capture_group(self.timeout)

    def shard(self, n: int) -> slice:
        return shard(n, self.rank, self.size)

    # ------------------------------------------------------------------ the header check
    def check_in(self, doing: int, step, *, sizes=(-1, -1, -1), config: int = 0, weights=(0.0, 0.0)) -> None:
        """Exchange headers with every rank; raise the same GradstoreError on every rank if they disagree.

        ``doing``: :data:`OPEN` or :data:`CAPTURE`; ``step``: the step captured (None when opening);
        ``sizes``: (tracked train, tracked test, moments) examples, -1 for none; ``config``: a
        :func:`fingerprint` of the run's configuration; ``weights``: (Σ w, Σ |w|) of the model.
        """
        from gradstore.record.messages import _auth

        self._what = "opening the Recorder" if doing == OPEN else f"the capture of step {int(step)}"
        mine = header(doing, step, exchange=self._exchanges, messages=_auth["seq"], timeout=self.timeout,
                      sizes=sizes, config=config, weights=weights)
        self._exchanges += 1
        with self._collective("exchanging headers"):
            table = self._headers(mine)
        problem = mismatch(table)
        if problem is not None:
            raise GradstoreError(problem)

    def _headers(self, mine: np.ndarray) -> np.ndarray:
        """Every rank's header on every rank: each sends its own to rank 0, rank 0 sends back the table.

        Point to point, so rank 0 knows which rank did not answer; the table it sends back says
        so ([status, missing rank, table...]), and the ranks that answered stop with the same line.
        """
        import torch
        import torch.distributed as dist

        group, wait = self.group, self._wait
        if self.rank != 0:
            reply = torch.zeros(2 + self.size * _H, dtype=torch.int64)
            sent, answer = (dist.isend(torch.from_numpy(mine), dst=0, group=group),
                            dist.irecv(reply, src=0, group=group))
            self._peer = 0
            wait(sent)
            wait(answer)
            status, missing = int(reply[0]), int(reply[1])
            if status:
                raise RankTimeout(self._late(missing, "exchanging headers", "as rank 0 reports"))
            return reply[2:].numpy().reshape(self.size, _H)
        rows = [torch.zeros(_H, dtype=torch.int64) for _ in range(self.size)]
        rows[0] = torch.from_numpy(mine)
        works = {r: dist.irecv(rows[r], src=r, group=group) for r in range(1, self.size)}
        missing = None
        for r, work in works.items():
            self._peer = r
            try:
                wait(work)
            except RuntimeError:
                missing = r
                break
        answered = [r for r in works if missing is None or r < missing]
        reply = torch.cat([torch.tensor([int(missing is not None), -1 if missing is None else missing]),
                           torch.stack(rows).reshape(-1)])
        self._stale = rows  # a late header may still land in these buffers
        for r in answered:  # best effort when a rank is missing: the others learn why at once
            self._peer = r
            try:
                wait(dist.isend(reply, dst=r, group=group))
            except RuntimeError:
                if missing is None:
                    raise
        if missing is not None:
            raise RankTimeout(self._late(missing, "exchanging headers"))
        return reply[2:].numpy().reshape(self.size, _H)

    def _wait(self, work) -> None:
        import datetime

        work.wait(timeout=datetime.timedelta(seconds=self.timeout))

    # ------------------------------------------------------------------ failures
    def _late(self, rank, doing: str, note: str = "") -> str:
        who = f"rank {rank}" if rank is not None else "a rank"
        outcome = ("nothing of this step was written (the store keeps the steps committed before it, and a "
                   "restarted run resumes after them)" if self._what.startswith("the capture") else
                   "every rank must create the Recorder at the same point")
        return (f"{who} did not answer {self._what} within {self.timeout:g} s while {doing}"
                + (f" ({note})" if note else "")
                + f": it died, hung, or is not calling the capture; {outcome}; if the rank is only slow, "
                "raise ProcessGroupReducer(timeout=...)")

    @contextmanager
    def _collective(self, doing: str):
        """Run torch.distributed calls; turn a timeout or a dead peer into one RankTimeout line."""
        if self._failed is not None:
            raise GradstoreError(f"this Recorder's capture collectives failed earlier ({self._failed}); they cannot be "
                                 "used again: restart the run, it resumes after the last committed step")
        self._peer = None if self.size > 2 else 1 - self.rank
        try:
            yield
        except RankTimeout:
            self._failed = f"at {self._what}"
            forget_capture_group(self.timeout)
            raise
        except RuntimeError as err:  # torch.distributed.DistBackendError and gloo's errors
            self._failed = f"at {self._what}"
            forget_capture_group(self.timeout)
            raise RankTimeout(self._late(self._peer, doing, _reason(err))) from None

    # ------------------------------------------------------------------ the collectives
    def sum(self, tensor):
        import torch
        import torch.distributed as dist

        if tensor.dtype != torch.float64:
            raise TypeError("the reducer sums float64 tensors only (exact totals)")
        with self._collective("summing float64 totals"):
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def gather(self, part):
        from gradstore.record.messages import gather_messages

        def at(rank):
            self._peer = rank
        with self._collective("gathering per-example arrays to rank 0"):
            return gather_messages(part, group=self.group, timeout=self.timeout, on_peer=at)

    def share(self, values: list[int]) -> list[int]:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.int64)
        with self._collective("waiting for rank 0 to open the store"):
            if self.rank:
                self._peer = 0
            dist.broadcast(tensor, src=0, group=self.group)
        return tensor.tolist()
