"""Easy and hard examples from the stored ``correct`` (step, example) history.

An example is *learned* at the first captured step from which it stays correctly classified (with
respect to its training label) at every later captured step; an example never learned has NaN.
*Easy* examples are those learned by a chosen snapshot step; with ``rule="snapshot"`` they are the
examples correct at that step, as in the Weak and Strong Gradient Directions paper.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from analysis.pairwise import group_coherence, stiffness
from analysis import plots
from analysis.registry import metric
from gradstore.errors import AnalysisError

RULES = ("learned", "snapshot")


def learned_step(correct: xr.DataArray, *, permanently: bool = True) -> xr.DataArray:
    """Step at which each example is learned, (example) float, NaN if never (lazy).

    Parameters
    ----------
    correct : xarray.DataArray
        Bool (step, example) history.
    permanently : bool
        First step from which the example stays correct (default), or simply the first step at
        which it is correct.
    """
    correct = correct.astype(bool)
    if permanently:
        # stays[t] = correct at every captured step >= t: a reversed cumulative product
        stays = correct.isel(step=slice(None, None, -1)).astype(np.int8).cumprod("step")
        correct = stays.isel(step=slice(None, None, -1)).astype(bool)
    steps = xr.DataArray(correct.step.values.astype(np.float64), dims="step")
    return steps.where(correct).min("step")


def easy_mask(correct: xr.DataArray, *, at=None, rule: str = "learned") -> xr.DataArray:
    """Bool (example) mask of easy examples (lazy).

    Parameters
    ----------
    correct : xarray.DataArray
        Bool (step, example) history.
    at : int, optional
        Snapshot step number (default: the middle captured step).
    rule : {"learned", "snapshot"}
        Easy = learned (permanently) by ``at``, or correct at ``at``.
    """
    if rule not in RULES:
        raise AnalysisError(f"unknown hardness rule {rule!r}; use one of {', '.join(RULES)}")
    steps = correct.step.values
    if at is None:
        at = steps[len(steps) // 2]
    if at not in steps:
        raise AnalysisError(f"snapshot step {at} was not captured; choose one of the stored steps "
                             f"({steps[0]}..{steps[-1]})")
    if rule == "snapshot":
        return correct.sel(step=at, drop=True).astype(bool)
    return learned_step(correct) <= at


def easy_hard(gram: xr.DataArray, easy) -> xr.Dataset:
    """m-coherence and stiffness within easy, within hard and across.

    Parameters
    ----------
    gram : xarray.DataArray
        g_i·g_j (…, example, example_) over the examples of ``easy``.
    easy : array_like of bool
        Easy mask (computed, e.g. ``easy_mask(...).values``).

    Returns
    -------
    xarray.Dataset
        From :func:`analysis.pairwise.group_coherence` and :func:`analysis.pairwise.stiffness` with
        groups ``easy`` and ``hard`` on dims ``group``/``group_``.
    """
    labels = np.where(np.asarray(easy, bool), "easy", "hard")
    out = group_coherence(gram, labels)
    stiff = stiffness(gram, labels=labels).rename({"class": "group", "class_": "group_"})
    out["sign_stiffness"] = stiff["sign_stiffness_class"]
    out["cosine_stiffness"] = stiff["cosine_stiffness_class"]
    return out


@metric("easy_hard", inputs=("gram",), needs=("correct",),
        tables={"easy_hard": ("step", "layer", "group"), "easy_hard_pairs": ("step", "layer", "group", "group_"),
                "easy_hard_gap": ("step", "layer"), "easy_hard_sizes": ("group",), "examples": ("example",)},
        plot=plots.one_plot("easy_hard_m_coherence", "easy_hard.png", plots.easy_hard_plot))
def easy_hard_metric(ctx) -> xr.Dataset:
    """Coherence and stiffness within and across easy and hard examples, with the gap's permutation null."""
    from analysis import nulls

    index = ctx.pair_index
    gram = ctx.gram()
    correct = ctx.ds["correct"].isel(example=index)
    easy = easy_mask(correct, at=ctx.snapshot).values
    out = easy_hard(gram, easy)
    out = out.rename({name: "easy_hard_" + name for name in out.data_vars})
    out["learned_step"] = learned_step(correct)
    out["easy"] = ("example", easy)
    out.attrs["snapshot"] = int(ctx.snapshot if ctx.snapshot is not None
                                else correct.step.values[correct.sizes["step"] // 2])
    if ctx.n_permutations and 0 < easy.sum() < easy.size:
        test = nulls.permutation_test(nulls.coherence_gap(gram), easy, n_permutations=ctx.n_permutations,
                                      seed=ctx.seed)
        out["easy_hard_gap"] = test["observed"]
        out["easy_hard_gap_null"] = test["null"]
        out["easy_hard_gap_null_low"] = test["null_low"]
        out["easy_hard_gap_null_high"] = test["null_high"]
        out["easy_hard_gap_p_value"] = test["p_value"]
    return ctx.tag(out)
