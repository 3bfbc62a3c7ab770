"""PNG figures of computed results (matplotlib, Agg backend; no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def one_plot(needs: str, filename: str, draw):
    """A metric's declared ``plot``: ``draw(results, folder / filename)`` when the results hold
    ``needs``, returning the path written (none without ``needs``)."""
    def plot(results: xr.Dataset, folder: Path) -> list[Path]:
        if needs not in results:
            return []
        path = folder / filename
        draw(results, path)
        return [path]

    return plot


def save(fig, path: Path, *, dpi: int = 100) -> None:
    """Lay out ``fig``, write it as a PNG to ``path`` and release it (every figure ends here)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)


def coherence_plot(results: xr.Dataset, path: Path, *, sample: str = "tracked_train", source: str = "exact") -> None:
    """m-coherence against step per layer, log scale, with lines at 1 (orthogonal) and m (identical)."""
    plt = _pyplot()
    ds = results.sel(source=source, sample=sample)
    fig, ax = plt.subplots(figsize=(6, 4))
    for layer in ds.layer.values:
        ax.plot(ds.step, ds.m_coherence.sel(layer=layer), label=str(layer), lw=2 if layer == "(model)" else 1)
    m = float(np.nanmax(ds.m.values))
    ax.axhline(1, color="k", ls="--", lw=0.8, label="1 (orthogonal)")
    ax.axhline(m, color="k", ls=":", lw=0.8, label=f"m = {m:g} (identical)")
    ax.set(yscale="log", xlabel="step", ylabel="m-coherence", title=f"m-coherence ({sample}, {source})")
    ax.legend(fontsize=7)
    save(fig, path)


def loss_split_plot(results: xr.Dataset, path: Path, *, layer: str = "(model)") -> None:
    """f_p and f_c against step with their permutation-null bands."""
    plt = _pyplot()
    ds = results.sel(layer=layer)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, color in (("f_p", "C0"), ("f_c", "C3")):
        ax.plot(ds.step, ds[name], color=color, label=name)
        if f"{name}_null_low" in ds:
            ax.fill_between(ds.step, ds[f"{name}_null_low"], ds[f"{name}_null_high"], color=color, alpha=0.2,
                            label=f"{name} null 95%")
    ax.set(xlabel="step", ylabel="share of loss reduction", title=f"loss-reduction split ({layer})")
    ax.legend(fontsize=7)
    save(fig, path)


def matrix_plot(matrix: xr.DataArray, path: Path, *, title: str) -> None:
    """Heat map of a (group, group_) matrix such as a class stiffness matrix at one step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    rows, cols = matrix.dims
    image = ax.imshow(matrix.values, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(matrix.sizes[cols]), [str(v) for v in matrix[cols].values])
    ax.set_yticks(range(matrix.sizes[rows]), [str(v) for v in matrix[rows].values])
    ax.set(title=title, xlabel=cols, ylabel=rows)
    fig.colorbar(image, ax=ax)
    save(fig, path)


def easy_hard_plot(results: xr.Dataset, path: Path, *, layer: str = "(model)") -> None:
    """m-coherence within easy and within hard examples, and the pairwise alpha across."""
    plt = _pyplot()
    ds = results.sel(layer=layer)
    fig, ax = plt.subplots(figsize=(6, 4))
    for group in ds.group.values:
        ax.plot(ds.step, ds.easy_hard_m_coherence.sel(group=group), label=f"m-coherence within {group}")
    across = ds.easy_hard_pairwise_alpha.sel(group="easy", group_="hard") if ds.sizes["group"] == 2 else None
    if across is not None:
        ax2 = ax.twinx()
        ax2.plot(ds.step, across, color="k", ls="--", label="pairwise alpha across")
        ax2.set_ylabel("pairwise alpha across")
        ax2.legend(fontsize=7, loc="upper right")
    ax.set(yscale="log", xlabel="step", ylabel="m-coherence", title=f"easy vs hard ({layer})")
    ax.legend(fontsize=7, loc="upper left")
    save(fig, path)
