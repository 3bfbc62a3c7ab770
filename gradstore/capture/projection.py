"""Seeded random projections of per-example gradients, Kronecker-structured per row.

Each parameter is viewed as an (R, C) matrix (:func:`gradstore.capture.factors.param_matrix_shape`).
Row k of its projection is the Kronecker product ``u_k ⊗ v_k`` (u_k in R^R, v_k in R^C), so
``proj[n, k] = <g_n, u_k v_k^T>`` is computed from a layer's factors without forming g_n.

* ``kind="gaussian"``: u_k, v_k independent standard normal, scaled by 1/sqrt(k). Then
  E[P^T P] = E[u u^T] ⊗ E[v v^T] = I, so E[proj_n · proj_m] = g_n · g_m (inner products preserved in
  expectation), for any k.
* ``kind="orthogonal"``: u_k, v_k are rows a_k, b_k of two random orthogonal matrices, the pairs
  (a_k, b_k) a random subset of size k of all R·C pairs, scaled by sqrt(R·C / k). The R·C rows
  u_a ⊗ v_b form an orthonormal basis, so expectations are preserved and k = R·C is exact.

The matrices depend only on (seed, parameter name, shape, k, kind), are drawn on the CPU in float64
and are therefore identical on every device.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import torch

from gradstore.capture.factors import param_matrix_shape
from gradstore.errors import CaptureError

_KINDS = ("gaussian", "orthogonal")


def _orthogonal(size: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))


@dataclass
class Projection:
    """Random projection of every parameter's per-example gradients to ``k`` dimensions.

    Parameters
    ----------
    k : int
        Projected dimension per parameter.
    seed : int, default 0
        Base seed; each parameter's matrices are seeded with ``seed`` and a CRC32 of its name.
    kind : {"gaussian", "orthogonal"}
        See the module docstring.
    """

    k: int
    seed: int = 0
    kind: str = "gaussian"
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise CaptureError(f"projection dimension k must be a positive integer, got {self.k!r}")
        if self.kind not in _KINDS:
            raise CaptureError(f"projection kind must be one of {_KINDS}, got {self.kind!r}")

    def matrices(self, name: str, shape, *, device=None, dtype=torch.float32):
        """``(u, v)``: (k, R) and (k, C) with row k of the projection equal to ``u[k] ⊗ v[k]``."""
        rows, cols = param_matrix_shape(tuple(shape))
        key = (name, rows, cols, str(device), dtype)
        if key not in self._cache:
            u, v = self._draw(name, rows, cols)
            self._cache[key] = (u.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype))
        return self._cache[key]

    def _draw(self, name: str, rows: int, cols: int):
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        k = self.k
        if self.kind == "gaussian":
            u = torch.randn(k, rows, generator=generator, dtype=torch.float64) / math.sqrt(k)
            v = torch.randn(k, cols, generator=generator, dtype=torch.float64)
            return u, v
        if k > rows * cols:
            raise CaptureError(
                f"orthogonal projection of {name!r} ({rows * cols} values) to k={k} dimensions is "
                "impossible; use k <= the parameter size or kind='gaussian'"
            )
        u_full, v_full = _orthogonal(rows, generator), _orthogonal(cols, generator)
        pairs = torch.randperm(rows * cols, generator=generator)[:k]
        u = u_full[pairs // cols] * math.sqrt(rows * cols / k)
        return u, v_full[pairs % cols]
