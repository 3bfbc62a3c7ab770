"""Oracles for testing layer rules directly (without the engine): every quantity of a factor.

:func:`check_factors` compares each factor a rule returned with reference per-example gradients
(m, *shape) from an independent computation (a per-example loop of single-example backward passes,
or torch.func vmap(grad)): the materialized gradients and every quantity the factor computes.
"""

from __future__ import annotations

import torch
from capture_harness import rel_err

from gradstore.capture import Projection


def check_factors(factors, ref: dict, *, rtol: float, seed: int = 0, k: int = 3) -> None:
    """Every quantity of ``factors`` (local name -> factor) against ``ref`` (local name -> (m, *shape))."""
    assert set(factors) == set(ref), (sorted(factors), sorted(ref))
    gen = torch.Generator().manual_seed(seed)
    proj = Projection(k, seed=seed)
    for name, g in ref.items():
        factor = factors[name]
        m = g.shape[0]
        flat = g.reshape(m, -1)
        coords = torch.randint(0, flat.shape[1], (4,), generator=gen)
        v = torch.randn(g.shape[1:], generator=gen, dtype=g.dtype)
        u_mat, v_mat = proj.matrices(name, g.shape[1:], device=g.device, dtype=g.dtype)
        p = (u_mat[:, :, None] * v_mat[:, None, :]).reshape(k, -1)
        expected = {
            "materialize": (factor.materialize(), flat),
            "sum": (factor.sum(), g.sum(0)),
            "sq_norms": (factor.sq_norms(), (flat * flat).sum(1)),
            "sum_and_sq_norms": (torch.cat([t.reshape(-1) for t in factor.sum_and_sq_norms()]),
                                 torch.cat([g.sum(0).reshape(-1), (flat * flat).sum(1)])),
            "gram": (factor.gram(), flat @ flat.T),
            "dots": (factor.dots(v), flat @ v.reshape(-1)),
            "coords": (factor.coords(coords), flat[:, coords]),
            "project": (factor.project(u_mat, v_mat), flat @ p.T),
        }
        for quantity, (got, value) in expected.items():
            err = rel_err(got.reshape(value.shape), value)
            assert err <= rtol, f"{name} {quantity}: relative error {err:.2e} > {rtol}"


def loop_grads(params: dict, losses_of_example, m: int) -> dict:
    """Reference per-example gradients by a loop of single-example backward passes.

    ``losses_of_example(j)`` returns example j's scalar loss computed from a forward pass on that
    example alone; ``params`` maps local names to the module's parameters.
    """
    names = list(params)
    rows = {name: [] for name in names}
    for j in range(m):
        grads = torch.autograd.grad(losses_of_example(j), [params[nm] for nm in names], allow_unused=True)
        for name, g in zip(names, grads):
            rows[name].append(torch.zeros_like(params[name]) if g is None else g)
    return {name: torch.stack(rows[name]) for name in names}


def check_capture_by_loop(model, loss_fn, inputs, targets, example, *, rtol: float, k: int = 3, seed: int = 0):
    """Every quantity of one ``capture`` against a per-example loop of single-example backward passes.

    ``example(j)`` returns ``(inputs_j, targets_j)``: example j alone, as ``model`` takes it (for
    modules vmap cannot run, such as the fused recurrent kernels). Returns the capture result.
    """
    import copy

    from gradstore.capture import capture

    reference = copy.deepcopy(model).eval()
    params = {n: p for n, p in reference.named_parameters() if p.requires_grad}

    def loss_of(j):
        xs, ys = example(j)
        out = reference(*xs) if isinstance(xs, tuple) else reference(xs)
        return loss_fn(out, ys).sum()

    m = targets.shape[0]
    ref = loop_grads(params, loss_of, m)
    gen = torch.Generator().manual_seed(seed)
    coords = {n: torch.randint(0, g[0].numel(), (3,), generator=gen) for n, g in ref.items()}
    proj = Projection(k, seed=seed)
    res = capture(model, loss_fn, inputs, targets, coords=coords, projection=proj, gram=True,
                  dot_with="sum", grad_sum=True, grads=True, verify=True)
    assert set(res.sq_norms) == set(ref)
    for name, g in ref.items():
        flat = g.reshape(m, -1)
        u, v = proj.matrices(name, g.shape[1:], device=g.device, dtype=g.dtype)
        p = (u[:, :, None] * v[:, None, :]).reshape(k, -1)
        total = flat.sum(0)
        expected = {"sq_norms": (flat * flat).sum(1), "coords": flat[:, coords[name]], "proj": flat @ p.T,
                    "gram": flat @ flat.T, "dots": flat @ total, "grad_sum": total, "grads": flat}
        for quantity, value in expected.items():
            got = getattr(res, quantity)[name].reshape(value.shape)
            err = rel_err(got, value)
            assert err <= rtol, f"{name} {quantity}: relative error {err:.2e} > {rtol}"
    return res
