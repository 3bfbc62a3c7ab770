"""Verify a run store: every committed value read back and checked against what was written.

:func:`verify_run` is what ``gradstore inspect --verify`` and ``gradstore analyze`` run. It checks
the commit record (array lengths, ``last_step``, increasing steps), that every chunk the committed
steps need exists, that every chunk decodes (its CRC32C checksum matches), and that every step's
values have the CRC32C digest recorded when the step was committed (``step_crc32c``), and every
static array the one recorded at creation (``static_crc32c``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import zarr

from gradstore.errors import StoreError
from gradstore.store._integrity import DIGEST, Problem, chunk_key, crc32_of, damage_message
from gradstore.store._root import _short, check_steps, located_problems, open_committed
from gradstore.store.schema import RunLayout, array_specs, digested_arrays


@dataclass
class Verification:
    """What :func:`verify_run` found.

    Attributes
    ----------
    name : str
        The store.
    committed : int
        Committed steps checked.
    problems : list of Problem
        Every damaged place (empty: the store is intact).
    checksums : bool
        Whether the store carries checksums and digests (a store written without them can only be
        checked for missing chunks and its commit record).
    """

    name: str
    committed: int
    problems: list[Problem] = field(default_factory=list)
    checksums: bool = True

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def damaged_indices(self) -> list[int]:
        """Positions along ``step`` of the damaged steps."""
        return sorted({p.index for p in self.problems if p.index is not None})

    @property
    def static_damage(self) -> bool:
        """Whether a static array (ids, labels, names) is damaged: no step can be trusted then."""
        return any(p.index is None for p in self.problems)

    def message(self) -> str:
        """One line: the first problems and what to do."""
        return damage_message(self.name, self.problems, skip_hint=not self.static_damage)


def _step_chunk(key: str, spec, index: int) -> str:
    grid = spec.shards or spec.chunks
    return chunk_key(key, (index // grid[0],) + (0,) * (len(grid) - 1))


def _read_digests(arrays, spec, start: int, stop: int, steps) -> tuple[np.ndarray | None, list[Problem]]:
    """Rows ``start:stop`` of ``step_crc32c``, or None and a problem for each step when unreadable."""
    try:
        return np.asarray(arrays[DIGEST][start:stop]), []
    except Exception as exc:  # codec/IO errors of zarr have no common base class
        return None, [Problem(DIGEST, _step_chunk(DIGEST, spec, i), i, _step_at(steps, i), f"unreadable ({_short(exc)})")
                      for i in range(start, stop)]


def _step_at(steps, index):
    return int(steps[index]) if steps is not None and index < len(steps) else None


def check_step(arrays: dict[str, zarr.Array], layout: RunLayout, index: int, steps=None) -> list[Problem]:
    """Problems of the committed step at position ``index`` (read back and digested)."""
    specs = array_specs(layout)
    digests, problems = _read_digests(arrays, specs[DIGEST], index, index + 1, steps)
    if digests is None:
        return problems
    for j, key in enumerate(digested_arrays(layout)):
        problems += _check_rows(key, specs[key], arrays[key], index, index + 1, digests[:, j], steps)
    return problems


def _check_rows(key, spec, arr, start, stop, digests, steps) -> list[Problem]:
    try:
        block = np.asarray(arr[start:stop])
    except Exception as exc:
        return [Problem(key, _step_chunk(key, spec, i), i, _step_at(steps, i), f"unreadable ({_short(exc)})")
                for i in range(start, stop)]
    return [Problem(key, _step_chunk(key, spec, i), i, _step_at(steps, i),
                    "values differ from those committed (CRC32C digest mismatch)")
            for i, row, want in zip(range(start, stop), block, digests)
            if crc32_of(row, spec.dtype) != int(want)]


def verify_run(target, *, storage_options: dict | None = None, progress=None) -> Verification:
    """Read every committed value of a run store back and check it.

    Parameters
    ----------
    target : str, path or zarr store
        Local path or fsspec URL.
    storage_options : dict, optional
        Passed to fsspec for URLs.
    progress : callable, optional
        Wraps the iterable of arrays checked (e.g. ``tqdm``).

    Returns
    -------
    Verification
        Every problem found (``.ok`` when none).

    Raises
    ------
    StoreError
        If the store is not a gradstore run or its commit record is inconsistent (array lengths,
        ``last_step``, step order), so that its steps cannot even be located.
    """
    run = open_committed(target, storage_options)
    name, attrs, layout, committed, arrays = run.name, run.attrs, run.layout, run.committed, run.arrays
    found, steps = located_problems(run.store, layout, arrays, committed)
    result = Verification(name, committed, list(found), checksums=layout.checksums)
    _check_values(result, arrays, layout, attrs, steps, progress)
    if result.ok:  # values intact: then the commit record must be consistent too
        check_steps(arrays, attrs, committed, name, steps)
    return result


def _check_values(result: Verification, arrays, layout: RunLayout, attrs: dict, steps, progress) -> None:
    """Append to ``result`` every static array and committed step whose values fail their digest."""
    name, committed, found = result.name, result.committed, list(result.problems)
    specs = array_specs(layout)
    if not layout.checksums:
        return
    missing = {(p.array, p.index) for p in found}
    recorded = attrs.get("static_crc32c")
    if not isinstance(recorded, dict):
        raise StoreError(f"{name!r} is damaged: root attribute 'static_crc32c' is missing")
    for key, spec in specs.items():
        if spec.per_step or (key, None) in missing:
            continue
        chunk = chunk_key(key, (0,) * len(spec.dims))  # static arrays are one chunk
        try:
            value = arrays[key][...]
        except Exception as exc:
            result.problems.append(Problem(key, chunk, None, None, f"unreadable ({_short(exc)})"))
            continue
        if crc32_of(value, spec.dtype) != recorded.get(key):
            result.problems.append(Problem(key, chunk, None, None,
                                           "values differ from those written (CRC32C digest mismatch)"))
    if (DIGEST, 0) in missing or committed == 0:
        return
    digests, unreadable = _read_digests(arrays, specs[DIGEST], 0, committed, steps)
    result.problems += unreadable
    if digests is None:
        return
    keys = digested_arrays(layout)
    for j, key in (progress or (lambda it: it))(list(enumerate(keys))):
        spec = specs[key]
        rows = (spec.shards or spec.chunks)[0]
        for start in range(0, committed, rows):
            stop = min(start + rows, committed)
            if any((key, i) in missing for i in range(start, stop)):
                continue
            result.problems += _check_rows(key, spec, arrays[key], start, stop, digests[start:stop, j], steps)
    result.problems.sort(key=lambda p: (p.index if p.index is not None else -1, p.array))
