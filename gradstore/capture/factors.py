"""Per-example gradient factors: what a layer rule returns, and every quantity computed from it.

A rule describes the per-example gradients g_n of one parameter in one of two forms:

* :class:`Dense` -- g_n itself, a tensor ``(n, *param.shape)``. Used for small parameters (biases,
  norm scales) and by the torch.func fallback.
* :class:`Outer` -- a sum of outer products over positions t, never materialized::

      g_n[h, r, c] = sum_t L[n, t, h, r] * R[n, t, h, c]

  Index letters: n (and m) = example, t (and s) = position (sequence / spatial location / use),
  h = group (conv groups; 1 otherwise), r = row of the parameter, c = column. The parameter's flat
  layout is ``(h, r, c)``: for ``nn.Linear`` L = output gradients b (n,t,1,o), R = layer inputs
  a (n,t,1,i); for ``nn.Conv2d`` R is the unfolded input patch. ``L`` may be a :class:`OneHot`
  (``nn.Embedding``: the row is the looked-up index).

A parameter used several times (a module called twice, tied weights, functional uses) gets the
:func:`merge` of its uses' factors: one factor when the forms agree, else a :class:`Sum` whose
quantities include the exact cross terms between uses.

Quantities are methods of the factor classes (``sum``, ``sq_norms``, ``gram``, ``dots``,
``coords``, ``project``, ``materialize``); adding a quantity touches this file only, adding a layer only a rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Intermediate tensors are kept below this many elements by processing examples in blocks.
BLOCK_ELEMENTS = 1 << 24


#: Blocks of materialized gradients in :meth:`Outer.sum_and_sq_norms` stay this small (cache-sized:
#: the block is summed and reduced right after it is formed).
JOINT_BLOCK_ELEMENTS = 1 << 20

#: :meth:`Outer.sum_and_sq_norms` materializes when the Gram form's t²(r + c) per example exceeds
#: this many multiples of t·r·c (the per-example products' cost, over the one weight-gradient
#: product they replace); measured by ``python -m pipelines.bench.layers joint-form``.
JOINT_BREAK_EVEN = 0.6


def _blocks(n: int, per_example: int, limit: int | None = None):
    """Slices of ``range(n)`` whose blocks hold at most ``limit`` (default ``BLOCK_ELEMENTS``)
    intermediate elements."""
    size = max(1, (BLOCK_ELEMENTS if limit is None else limit) // max(1, per_example))
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def param_matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """The (R, C) matrix view of a parameter used by projections: (shape[0], rest) or (1, numel)."""
    if len(shape) >= 2:
        return int(shape[0]), int(math.prod(shape[1:]))
    return 1, int(math.prod(shape))


@dataclass(frozen=True)
class OneHot:
    """Rows selected by index: a side of an :class:`Outer` equal to ``one_hot(index, size)``.

    ``index`` is ``(n, t)`` int64; the side has one group (h = 1).
    """

    index: torch.Tensor
    size: int


def _sq_rows(x: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean norms over the last axis (one reduction pass, no temporary)."""
    return torch.linalg.vector_norm(x, dim=-1).square()


# ---- side primitives (dense sides are (n, t, h, d) tensors) -------------------------------------


def _side_dim(side) -> int:
    return side.size if isinstance(side, OneHot) else side.shape[-1]


def _inner_same(side, dtype) -> torch.Tensor:
    """(n, h, t, s): inner products of positions t, s of the same example."""
    if isinstance(side, OneHot):
        i = side.index
        return (i[:, :, None] == i[:, None, :]).unsqueeze(1).to(dtype)
    if side.shape[2] == 1:  # one group: a batched matrix product (faster than einsum on the CPU)
        x = side[:, :, 0]
        return torch.bmm(x, x.transpose(1, 2)).unsqueeze(1)
    return torch.einsum("ntgd,nsgd->ngts", side, side)


def _batched_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n,) sum over every other axis of a * b, without the product temporary."""
    n = a.shape[0]
    return torch.bmm(a.reshape(n, 1, -1), b.reshape(n, -1, 1)).reshape(n)


def _inner_cross(side_a, side_b, dtype) -> torch.Tensor:
    """(n, m, h, t, s): inner products of position t of example n with position s of example m."""
    if isinstance(side_a, OneHot):
        i, j = side_a.index, side_b.index
        return (i[:, None, :, None] == j[None, :, None, :]).unsqueeze(2).to(dtype)
    return torch.einsum("ntgd,msgd->nmgts", side_a, side_b)


def _apply(side, matrix: torch.Tensor) -> torch.Tensor:
    """(n, t, h, x) = sum_d side[n, t, h, d] * matrix[h, d, x]."""
    if isinstance(side, OneHot):
        return matrix[0][side.index].unsqueeze(2)
    return torch.einsum("ntgd,gdx->ntgx", side, matrix)


def _take(side, group: torch.Tensor, row: torch.Tensor, dtype) -> torch.Tensor:
    """(n, t, k) = side[n, t, group[k], row[k]]."""
    if isinstance(side, OneHot):
        return (side.index[..., None] == row).to(dtype)
    return side[:, :, group, row]


def _dense(side, dtype) -> torch.Tensor:
    if isinstance(side, OneHot):
        return F.one_hot(side.index, side.size).to(dtype).unsqueeze(2)
    return side


def _cat_sides(a, b):
    if isinstance(a, OneHot) != isinstance(b, OneHot):
        return None
    if isinstance(a, OneHot):
        return OneHot(torch.cat([a.index, b.index], 1), a.size) if a.size == b.size else None
    if a.shape[2:] != b.shape[2:]:
        return None
    return torch.cat([a, b], 1)


# ---- the two factor forms ----------------------------------------------------------------------


@dataclass(frozen=True)
class Dense:
    """Materialized per-example gradients ``g`` of shape (n, *param.shape)."""

    g: torch.Tensor

    @property
    def n(self) -> int:
        return self.g.shape[0]

    def _flat(self) -> torch.Tensor:
        return self.g.reshape(self.g.shape[0], -1)

    def merge(self, other):
        """The factor of g + g' (a parameter used twice): see :func:`merge`."""
        return merge(self, other)

    def materialize(self) -> torch.Tensor:
        """(n, *shape) per-example gradients."""
        return self.g

    def sum(self) -> torch.Tensor:
        """Σ_n g_n, shaped like the parameter."""
        return self.g.sum(0)

    def sq_norms(self) -> torch.Tensor:
        """(n,) ||g_n||²."""
        return _sq_rows(self._flat())

    def gram(self) -> torch.Tensor:
        """(n, m) g_n · g_m."""
        flat = self._flat()
        return flat @ flat.T

    def sum_and_sq_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ_n g_n, ||g_n||²) together (see :meth:`Outer.sum_and_sq_norms`)."""
        return self.sum(), self.sq_norms()

    def dots(self, v: torch.Tensor) -> torch.Tensor:
        """(n,) g_n · v for ``v`` of the parameter's shape."""
        return self._flat() @ v.reshape(-1).to(self.g.dtype)

    def coords(self, flat_index: torch.Tensor) -> torch.Tensor:
        """(n, k) g_n at the flat coordinates ``flat_index``."""
        return self._flat()[:, flat_index]

    def project(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(n, k) = sum_rc g_n[r, c] u[k, r] v[k, c] on the (R, C) view of the parameter."""
        rows, cols = u.shape[1], v.shape[1]
        g = self.g.reshape(self.g.shape[0], rows, cols)
        return torch.einsum("nrk,kr->nk", g @ v.T, u)


@dataclass(frozen=True)
class Outer:
    """Per-example gradients ``g_n[h,r,c] = sum_t L[n,t,h,r] R[n,t,h,c]`` of a parameter of ``shape``.

    ``left`` is an (n, t, h, r) tensor or a :class:`OneHot`; ``right`` an (n, t, h, c) tensor.
    """

    left: object
    right: torch.Tensor
    shape: tuple[int, ...]

    @property
    def n(self) -> int:
        return self.right.shape[0]

    @property
    def _dims(self) -> tuple[int, int, int, int]:
        _, t, h, c = self.right.shape
        return t, h, _side_dim(self.left), c

    def _gram_form_cheaper(self) -> bool:
        """Pairwise (t × s) inner products beat materializing the (r × c) gradient.

        Dense sides: t²(r + c) against t·r·c per example. A one-hot side: its t × t products are
        index equalities and materializing is a scatter of t rows, so t²·c against (t + r)·c.
        """
        t, _, r, c = self._dims
        if isinstance(self.left, OneHot):
            return t == 1 or t * t < t + r
        return t == 1 or t * (r + c) < r * c

    def _gram_block_form_cheaper(self) -> bool:
        """For the (n, n) Gram block: pairwise products cost t² per *pair* of examples, while
        materializing costs t·r·c per example plus r·c per pair (``flat @ flat.T``).

        Dense sides: t²(r + c) against r·c·(1 + t/n) per pair; a one-hot side: t²·c against
        (r + t/n)·c. (Measured by ``python -m pipelines.bench.layers gram-form``: the norm rule
        applied to Gram blocks was 12× slower than materializing at r = c = 128, t = 64.)
        """
        t, _, r, c = self._dims
        n = max(1, self.n)
        if t == 1:
            return True
        if isinstance(self.left, OneHot):
            return t * t < r + t / n
        return t * t * (r + c) < r * c * (1 + t / n)

    def merge(self, other):
        """The factor of g + g' (a parameter used twice): positions concatenated when the forms
        agree, else a :class:`Sum` with exact cross terms (see :func:`merge`)."""
        return merge(self, other)

    def materialize(self, rows: slice = slice(None)) -> torch.Tensor:
        """(n, *shape) per-example gradients (optionally of examples ``rows`` only)."""
        left = self.left
        if isinstance(left, OneHot):
            left = OneHot(left.index[rows], left.size)
        else:
            left = left[rows]
        right = self.right[rows]
        if isinstance(left, OneHot):  # rows of R added at the looked-up indices: a scatter, no one-hot
            n, t, _, c = right.shape
            offset = torch.arange(n, device=right.device)[:, None] * left.size
            g = right.new_zeros(n * left.size, c)
            g.index_add_(0, (left.index + offset).reshape(-1), right.reshape(n * t, c))
            return g.reshape(n, *self.shape)
        g = torch.einsum("ntgr,ntgc->ngrc", _dense(left, right.dtype), right)
        return g.reshape(right.shape[0], *self.shape)

    def sum(self) -> torch.Tensor:
        """Σ_n g_n = sum over (n, t) of L ⊗ R: the weight gradient autograd would form, one product."""
        right = self.right
        if isinstance(self.left, OneHot):  # rows of R added at the looked-up indices
            out = right.new_zeros(self.left.size, right.shape[-1])
            return out.index_add_(0, self.left.index.reshape(-1), right.reshape(-1, right.shape[-1])).reshape(self.shape)
        return torch.einsum("ntgr,ntgc->grc", self.left, right).reshape(self.shape)

    def _joint_materialize_cheaper(self) -> bool:
        """With Σ_n g_n wanted too, materializing g_n in blocks gives both from one product.

        Apart: Σ g is one weight-gradient product (t·r·c per example) and ||g_n||² costs the Gram
        form's t²(r + c), or a second t·r·c where materializing is cheaper anyway. Together: the
        per-example products, t·r·c, in place of the weight-gradient product (a batched product
        of small matrices runs slower than one large one, which ``JOINT_BREAK_EVEN`` prices), and
        Σ g from the blocks (r·c per example). Never for t = 1 (the norms are then products of
        the sides' norms) nor for a one-hot side (its Σ g is a scatter of n·t rows).
        """
        t, _, r, c = self._dims
        if t == 1 or isinstance(self.left, OneHot):
            return False
        return t * (r + c) > JOINT_BREAK_EVEN * r * c

    def sum_and_sq_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ_n g_n, (n,) ||g_n||²) from one pass where that is cheaper than :meth:`sum` and
        :meth:`sq_norms` apart (:meth:`_joint_materialize_cheaper`): g_n materialized in
        cache-sized blocks, each reduced to its norms and added to the sum at once."""
        if not self._joint_materialize_cheaper():
            return self.sum(), self.sq_norms()
        return self._sum_and_sq_norms_by_blocks()

    def _sum_and_sq_norms_by_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The joint form of :meth:`sum_and_sq_norms`, whatever the rule would pick."""
        _, h, r, c = self._dims
        if self.n == 0:
            return self.sum(), self.right.new_zeros(0)
        total, norms, buffer = None, [], None
        for rows in _blocks(self.n, h * r * c, JOINT_BLOCK_ELEMENTS):
            size = rows.stop - rows.start
            if h == 1:  # one buffer for every block: fresh large tensors cost page faults (2x here)
                if buffer is None:
                    buffer = self.right.new_empty(size, r, c)
                g = torch.bmm(self.left[rows, :, 0].transpose(1, 2), self.right[rows, :, 0], out=buffer[:size])
            else:
                g = self.materialize(rows)
            g = g.reshape(size, -1)
            norms.append(_sq_rows(g))
            total = g.sum(0) if total is None else total.add_(g.sum(0))
        return total.reshape(self.shape), torch.cat(norms)

    def sq_norms(self) -> torch.Tensor:
        """(n,) ||g_n||², by the Gram form sum_ts (L_t·L_s)(R_t·R_s) or by materializing."""
        t, h, r, c = self._dims
        dtype = self.right.dtype
        if t == 1 and not isinstance(self.left, OneHot):
            return (_sq_rows(self.left) * _sq_rows(self.right)).sum((1, 2))
        out = []
        if self._gram_form_cheaper():
            for rows in _blocks(self.n, h * t * t):
                left = OneHot(self.left.index[rows], r) if isinstance(self.left, OneHot) else self.left[rows]
                out.append(_batched_dot(_inner_same(left, dtype), _inner_same(self.right[rows], dtype)))
        else:
            for rows in _blocks(self.n, h * r * c):
                g = self.materialize(rows)
                g = g.reshape(g.shape[0], -1)
                out.append(_sq_rows(g))
        return torch.cat(out) if out else self.right.new_zeros(0)

    def gram(self) -> torch.Tensor:
        """(n, m) g_n · g_m over all examples of the factor."""
        t, h, r, c = self._dims
        dtype = self.right.dtype
        n = self.n
        if not self._gram_block_form_cheaper():
            flat = self.materialize().reshape(n, -1)
            return flat @ flat.T
        if t == 1 and not isinstance(self.left, OneHot):
            left, right = self.left[:, 0], self.right[:, 0]  # (n, h, d)
            ll = torch.einsum("ngr,mgr->nmg", left, left)
            rr = torch.einsum("ngc,mgc->nmg", right, right)
            return (ll * rr).sum(-1)
        out = []
        for rows in _blocks(n, n * h * t * t):
            left = OneHot(self.left.index[rows], r) if isinstance(self.left, OneHot) else self.left[rows]
            ll = _inner_cross(left, self.left, dtype)
            rr = _inner_cross(self.right[rows], self.right, dtype)
            out.append((ll * rr).sum((2, 3, 4)))
        return torch.cat(out)

    def dots(self, v: torch.Tensor) -> torch.Tensor:
        """(n,) g_n · v = sum_t L_t^T v R_t for ``v`` of the parameter's shape."""
        t, h, r, c = self._dims
        lv = _apply(self.left, v.to(self.right.dtype).reshape(h, r, c))  # (n, t, h, c)
        return (lv * self.right).sum((1, 2, 3))

    def coords(self, flat_index: torch.Tensor) -> torch.Tensor:
        """(n, k) g_n at the flat coordinates ``flat_index`` of the (h, r, c) layout."""
        _, _, r, c = self._dims
        group, rest = flat_index // (r * c), flat_index % (r * c)
        row, col = rest // c, rest % c
        left = _take(self.left, group, row, self.right.dtype)  # (n, t, k)
        return (left * self.right[:, :, group, col]).sum(1)

    def project(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(n, k) = sum_t sum_h (L_t,h · u_k,h)(R_t,h · v_k): the Kronecker row u_k ⊗ v_k, never g_n."""
        _, h, r, _ = self._dims
        k = u.shape[0]
        lu = _apply(self.left, u.reshape(k, h, r).permute(1, 2, 0))  # (n, t, h, k)
        rv = self.right @ v.T  # (n, t, h, k)
        return (lu * rv).sum((1, 2))


# ---- sums of factors of different kinds (a parameter with several uses) ------------------------


def _pair_inner_same(a, b, dtype) -> torch.Tensor:
    """(n, h, t, s): side ``a`` at position t · side ``b`` at position s, within each example.

    One-hot sides never form a one-hot vector: against a dense side the product is a gather of the
    dense side at the looked-up index (δ_s[x_t]), against another one-hot side an index equality.
    """
    if isinstance(a, OneHot) and isinstance(b, OneHot):
        return (a.index[:, :, None] == b.index[:, None, :]).unsqueeze(1).to(dtype)
    if isinstance(a, OneHot):  # out[n, t, s] = b[n, s, 0, x[n, t]]
        dense = b[:, :, 0, :].transpose(1, 2)  # (n, V, s)
        index = a.index[:, :, None].expand(-1, -1, dense.shape[2])
        return torch.gather(dense, 1, index).unsqueeze(1)
    if isinstance(b, OneHot):
        return _pair_inner_same(b, a, dtype).transpose(2, 3)
    if a.shape[2] == 1:  # one group: a batched matrix product (as in _inner_same)
        return torch.bmm(a[:, :, 0], b[:, :, 0].transpose(1, 2)).unsqueeze(1)
    return torch.einsum("ntgd,nsgd->ngts", a, b)


def _pair_inner_cross(a, b, dtype) -> torch.Tensor:
    """(n, m, h, t, s): side ``a`` of example n at t · side ``b`` of example m at s."""
    if isinstance(a, OneHot) and isinstance(b, OneHot):
        return (a.index[:, None, :, None] == b.index[None, :, None, :]).unsqueeze(2).to(dtype)
    if isinstance(a, OneHot):  # out[n, m, t, s] = b[m, s, 0, x[n, t]]
        dense = b[:, :, 0, :].permute(2, 0, 1)  # (V, m, s)
        return dense[a.index].permute(0, 2, 1, 3).unsqueeze(2)  # (n, t, m, s) -> (n, m, 1, t, s)
    if isinstance(b, OneHot):
        return _pair_inner_cross(b, a, dtype).permute(1, 0, 2, 4, 3)
    return torch.einsum("ntgd,msgd->nmgts", a, b)


def _apply_each(side, g: torch.Tensor) -> torch.Tensor:
    """(n, t, h, c) = sum_r side[n, t, h, r] * g[n, h, r, c] (a different matrix per example)."""
    if isinstance(side, OneHot):  # rows of g_n at the looked-up indices
        rows = g[:, 0]  # (n, V, c)
        index = side.index[:, :, None].expand(-1, -1, rows.shape[2])
        return torch.gather(rows, 1, index).unsqueeze(2)
    return torch.einsum("ntgr,ngrc->ntgc", side, g)


def _same_layout(a: Outer, b: Outer) -> bool:
    return a.right.shape[2:] == b.right.shape[2:] and _side_dim(a.left) == _side_dim(b.left)


def _rows_of(side, rows: slice):
    return OneHot(side.index[rows], side.size) if isinstance(side, OneHot) else side[rows]


def _outer_pair_dot(a: Outer, b: Outer) -> torch.Tensor:
    """(n,) g^a_n · g^b_n = sum_{t,s} (L^a_t · L^b_s)(R^a_t · R^b_s), or through materializing."""
    ta, h, r, c = a._dims
    tb = b.right.shape[1]
    dtype = a.right.dtype
    out = []
    if ta * tb * (r + c) < (ta + tb) * r * c:
        for rows in _blocks(a.n, h * ta * tb):
            ll = _pair_inner_same(_rows_of(a.left, rows), _rows_of(b.left, rows), dtype)
            rr = _pair_inner_same(a.right[rows], b.right[rows], dtype)
            out.append((ll * rr).sum((1, 2, 3)))
    else:
        for rows in _blocks(a.n, 2 * h * r * c):
            out.append((a.materialize(rows).flatten(1) * b.materialize(rows).flatten(1)).sum(1))
    return torch.cat(out) if out else a.right.new_zeros(0)


def _pair_dot(a, b) -> torch.Tensor:
    """(n,) g^a_n · g^b_n for two factors of the same parameter (the cross term of ||g^a + g^b||²)."""
    if isinstance(a, Outer) and isinstance(b, Outer) and _same_layout(a, b):
        return _outer_pair_dot(a, b)
    if isinstance(a, Dense) and isinstance(b, Outer):
        a, b = b, a
    if isinstance(a, Outer) and isinstance(b, Dense):
        _, h, r, c = a._dims
        g = b.g.reshape(b.n, h, r, c).to(a.right.dtype)
        return (_apply_each(a.left, g) * a.right).sum((1, 2, 3))
    return (a.materialize().flatten(1) * b.materialize().flatten(1)).sum(1)


def _pair_gram(a, b) -> torch.Tensor:
    """(n, m) g^a_n · g^b_m for two factors of the same parameter."""
    if isinstance(a, Outer) and isinstance(b, Outer) and _same_layout(a, b):
        ta, h, r, c = a._dims
        tb = b.right.shape[1]
        if ta * tb * (r + c) < (ta + tb) * r * c:
            dtype = a.right.dtype
            out = []
            for rows in _blocks(a.n, b.n * h * ta * tb):
                ll = _pair_inner_cross(_rows_of(a.left, rows), b.left, dtype)
                rr = _pair_inner_cross(a.right[rows], b.right, dtype)
                out.append((ll * rr).sum((2, 3, 4)))
            return torch.cat(out)
    return a.materialize().flatten(1) @ b.materialize().flatten(1).T


def merge(a, b):
    """The factor of g^a + g^b (two uses of one parameter), exact whatever the two forms.

    Same forms combine into one factor (Dense: added; Outer of one layout and side kind: positions
    concatenated); different forms become a :class:`Sum`, whose quantities include the cross terms.
    """
    if isinstance(a, Sum) or isinstance(b, Sum):
        items = list(a.items) if isinstance(a, Sum) else [a]
        for item in (b.items if isinstance(b, Sum) else (b,)):
            for i, existing in enumerate(items):
                combined = _combine(existing, item)
                if combined is not None:
                    items[i] = combined
                    break
            else:
                items.append(item)
        return items[0] if len(items) == 1 else Sum(tuple(items))
    combined = _combine(a, b)
    return combined if combined is not None else Sum((a, b))


def _combine(a, b):
    """One factor of the same form for g^a + g^b, or None when the forms differ."""
    if isinstance(a, Dense) and isinstance(b, Dense):
        return Dense(a.g + b.g)
    if isinstance(a, Outer) and isinstance(b, Outer) and a.right.shape[2:] == b.right.shape[2:]:
        left = _cat_sides(a.left, b.left)
        if left is not None:
            return Outer(left, torch.cat([a.right, b.right], 1), a.shape)
    return None


@dataclass(frozen=True)
class Sum:
    """Per-example gradients ``g_n = sum_i g^i_n`` of one parameter used in several ways.

    ``items`` are :class:`Dense` / :class:`Outer` factors of the same parameter (e.g. a tied LM's
    embedding lookup, an Outer with a :class:`OneHot` side, and its output projection, a dense
    Outer). Linear quantities add over the items; ||g_n||² and the Gram block add the cross terms
    g^i · g^j (i ≠ j), each in closed form where the forms allow: one-hot against dense sides is
    a gather, sum_{t,s} δ_s[x_t] (e_t · h_s), O(T²d) per example, no V × d matrix.
    """

    items: tuple

    @property
    def n(self) -> int:
        return self.items[0].n

    @property
    def shape(self):
        first = self.items[0]
        return tuple(first.shape) if isinstance(first, Outer) else tuple(first.g.shape[1:])

    def merge(self, other):
        return merge(self, other)

    def materialize(self) -> torch.Tensor:
        out = self.items[0].materialize()
        for item in self.items[1:]:
            out = out + item.materialize()
        return out

    def sum(self) -> torch.Tensor:
        out = self.items[0].sum()
        for item in self.items[1:]:
            out = out + item.sum()
        return out

    def sum_and_sq_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each item's (Σ g, ||g_n||²) from its own joint form where that is cheaper (a tied LM
        head's per-example products then replace its weight-gradient product), plus the cross terms."""
        total, norms = self.items[0].sum_and_sq_norms()
        for item in self.items[1:]:
            s, q = item.sum_and_sq_norms()
            total, norms = total + s, norms + q
        return total, norms + self._cross_sq_norms()

    def _cross_sq_norms(self) -> torch.Tensor | float:
        """Σ_{i<j} 2 g^i_n · g^j_n, the cross terms of ||Σ_i g^i_n||²."""
        out = 0.0
        for i, a in enumerate(self.items):
            for b in self.items[i + 1:]:
                out = out + 2 * _pair_dot(a, b)
        return out

    def sq_norms(self) -> torch.Tensor:
        out = self.items[0].sq_norms()
        for item in self.items[1:]:
            out = out + item.sq_norms()
        return out + self._cross_sq_norms()

    def gram(self) -> torch.Tensor:
        out = self.items[0].gram()
        for i, a in enumerate(self.items):
            if i:
                out = out + a.gram()
            for b in self.items[i + 1:]:
                cross = _pair_gram(a, b)
                out = out + cross + cross.T
        return out

    def dots(self, v: torch.Tensor) -> torch.Tensor:
        return torch.stack([item.dots(v) for item in self.items]).sum(0)

    def coords(self, flat_index: torch.Tensor) -> torch.Tensor:
        return torch.stack([item.coords(flat_index) for item in self.items]).sum(0)

    def project(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.stack([item.project(u, v) for item in self.items]).sum(0)
