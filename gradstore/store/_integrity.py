"""Integrity of a run store: digests of what was written, chunk presence, and verification.

Three layers (``docs/store-format.md``, "Integrity"):

- every chunk is stored with a CRC32C checksum (the Zarr v3 ``crc32c`` codec, after compression),
  so flipped bytes fail to decode instead of decoding to other numbers;
- every committed step carries, in ``step_crc32c`` (dims ``step``, ``stored``), the CRC32C of each
  per-step array's slot as written (:func:`crc32_of`); static arrays carry theirs in the root
  attribute ``static_crc32c``. A deleted chunk reads back as fill values and a swapped shard as
  another step's values; both disagree with the digest;
- every chunk (or shard) that the committed steps cover must exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import google_crc32c  # zarr's own crc32c codec uses it
import numpy as np

#: the per-step digest array and its static coordinate (names of the arrays digested, in order)
DIGEST, DIGESTED = "step_crc32c", "stored"


def crc32_of(value, dtype: str) -> int:
    """CRC32C (Castagnoli, RFC 3720; what the zarr ``crc32c`` codec uses) of ``value`` as stored:
    C order, little-endian ``dtype`` bytes.

    Strings (``dtype="str"``) are hashed as the UTF-8 bytes of each element followed by a NUL.
    """
    if dtype == "str":
        return google_crc32c.value(b"".join(str(s).encode("utf-8") + b"\0" for s in np.asarray(value, dtype=object).reshape(-1)))
    data = np.ascontiguousarray(np.asarray(value, dtype=np.dtype(dtype).newbyteorder("<")))
    return google_crc32c.value(data.reshape(-1).view(np.uint8))  # the buffer itself, no copy


def chunk_key(name: str, chunk_index: tuple[int, ...]) -> str:
    """The store key of one chunk (or shard) of array ``name`` (default ``/`` key encoding)."""
    return f"{name}/c/" + "/".join(str(int(i)) for i in chunk_index)


def expected_chunks(name: str, shape: tuple[int, ...], grid: tuple[int, ...]) -> list[str]:
    """Keys of every chunk (shard) of an array of ``shape`` cut by ``grid``; empty when shape has a 0."""
    counts = [-(-int(n) // int(c)) for n, c in zip(shape, grid)]
    if not counts:
        return [f"{name}/c"]
    if any(c == 0 for c in counts):
        return []
    return [chunk_key(name, idx) for idx in np.ndindex(*counts)]


@dataclass(frozen=True)
class Problem:
    """One damaged place of a store.

    Attributes
    ----------
    array : str
        Array name.
    chunk : str
        Store key of the chunk (or shard).
    index : int or None
        Position along ``step`` of the damaged step (None: a static array).
    step : int or None
        Training step number there, when the ``step`` coordinate itself could be read.
    what : str
        What is wrong.
    """

    array: str
    chunk: str
    index: int | None
    step: int | None
    what: str

    def describe(self) -> str:
        where = "" if self.index is None else (
            f", step {self.step} (index {self.index})" if self.step is not None else f", step index {self.index}")
        return f"array {self.array!r}, chunk {self.chunk!r}{where}: {self.what}"


def damage_message(name: str, problems: list[Problem], *, skip_hint: bool = True) -> str:
    """One line naming the first problems of ``problems`` and what to do."""
    groups: dict[tuple, list[Problem]] = {}
    for p in problems:
        groups.setdefault((p.array, p.chunk, p.what), []).append(p)
    parts = []
    for (array, chunk, what), group in list(groups.items())[:3]:
        at = [p for p in group if p.index is not None]
        where = ""
        if at:
            named = [str(p.step) if p.step is not None else f"index {p.index}" for p in at[:4]]
            where = f", step{'s' if len(at) > 1 else ''} " + ", ".join(named) + (" ..." if len(at) > 4 else "")
        parts.append(f"array {array!r}, chunk {chunk!r}{where}: {what}")
    shown = "; ".join(parts)
    more = f" (and {len(groups) - 3} more chunks)" if len(groups) > 3 else ""
    steps = sorted({p.index for p in problems if p.index is not None})
    static = any(p.index is None for p in problems)
    hint = "run `gradstore inspect --verify` on it for the full list"
    if skip_hint and steps and not static:
        hint += f"; `gradstore analyze --skip-damaged` leaves the {len(steps)} damaged step(s) out"
    return f"{name!r} is damaged: {shown}{more}; {hint}"
