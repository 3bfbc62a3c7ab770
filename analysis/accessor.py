"""The ``ds.gs`` accessor: the analysis as methods of a run's Dataset.

Registered on :class:`xarray.Dataset` when :mod:`analysis` is imported (``import analysis``). It
works on a run opened by :func:`gradstore.open_run` / :func:`analysis.open_store`, on a synthetic
run, and on a plain ``xarray.open_zarr(path)`` of a store (whose integrity arrays and attributes,
``step_crc32c`` on the ``stored`` dimension, are dropped, and whose steps are cut to the committed
ones). Every method is lazy: nothing is read or computed before ``.compute()``::

    import analysis, xarray as xr

    ds = xr.open_zarr("runs/mlp")
    ds.gs.m_coherence(by="layer").sel(sample="tracked_train").compute()
    ds.gs.loss_split().f_p.sel(layer="(model)").compute()

Each method calls the one definition of its quantity (:mod:`analysis.coherence`,
:mod:`analysis.losssplit`, :mod:`analysis.pairwise`, ...), so it agrees with the functions.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from gradstore.errors import AnalysisError

#: integrity bookkeeping of the store layout: not data (docs/store-format.md, "Integrity")
INTEGRITY_VARIABLES = ("step_crc32c",)
INTEGRITY_DIMS = ("stored",)
INTEGRITY_ATTRS = ("static_crc32c", "writer")
#: static per-example / per-coordinate metadata, made coordinates if a plain open left them variables
STATIC = ("true_label", "train_label", "corrupt", "split", "coord_layer", "coord_param", "coord_index",
          "param_layer")


def as_run(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` in the layout the analysis reads: integrity arrays dropped, committed steps only,
    small static metadata loaded, strings as plain NumPy strings."""
    ds = ds.drop_vars([v for v in INTEGRITY_VARIABLES if v in ds.variables])
    ds = ds.drop_dims([d for d in INTEGRITY_DIMS if d in ds.dims])
    committed = ds.attrs.get("committed_steps")
    if committed is not None and "step" in ds.dims and ds.sizes["step"] > int(committed):
        ds = ds.isel(step=slice(0, int(committed)))
    coords, data = {}, {}
    for name in ds.variables:
        var = ds[name]
        if "step" in var.dims or var.ndim > 1:
            continue  # per-step arrays stay lazy
        values = np.asarray(var.values)
        if values.dtype.kind == "T":  # numpy StringDType from a plain Zarr open
            values = np.array(values.tolist(), dtype=str)
        (coords if name in ds.coords or name in STATIC else data)[name] = (var.dims, values, var.attrs)
    ds = ds.assign(data).assign_coords(coords)
    ds.attrs = {k: v for k, v in ds.attrs.items() if k not in INTEGRITY_ATTRS}
    return ds


@xr.register_dataset_accessor("gs")
class GradstoreAccessor:
    """``ds.gs``: the metrics of a run as lazy methods (see :mod:`analysis.accessor`)."""

    def __init__(self, ds: xr.Dataset):
        self._raw = ds
        self._run = None

    @property
    def run(self) -> xr.Dataset:
        """The run in the analysis layout (:func:`as_run`)."""
        if self._run is None:
            self._run = as_run(self._raw)
        return self._run

    # --- coherence ---------------------------------------------------------------------------
    def moments(self, source: str | None = None) -> xr.Dataset:
        """``m``, ``norm_sq_of_sum``, ``sum_of_norm_sq`` per (step, sample, layer), whole model appended."""
        from analysis import sources

        return sources.layer_moments(self.run, source or self._source("norm_sq_of_sum"))

    def coherence(self, source: str | None = None, *, by: str = "layer") -> xr.Dataset:
        """alpha, m-coherence, gradient diversity, self-removed m-coherence and m (:func:`analysis.coherence.coherence`)."""
        from analysis.coherence import coherence

        return self._by(coherence(self.moments(source), source=source or self._source("norm_sq_of_sum")), by)

    def m_coherence(self, *, by: str = "layer", source: str | None = None) -> xr.DataArray:
        """m-coherence ||Σ g||² / Σ ||g||² (Chatterjee & Zielinski) per (step, sample, ``by``)."""
        from analysis.coherence import m_coherence

        mo = self._by(self.moments(source), by)
        return m_coherence(mo["norm_sq_of_sum"], mo["sum_of_norm_sq"], mo["m"])

    def weights_m_coherence(self, *, by: str = "layer") -> xr.DataArray:
        """m-coherence of each layer's weights alone, no biases (:func:`analysis.coherence.weights_m_coherence`),
        per (step, sample, ``by``); exact, from the per-parameter moments (stores written before them lack them)."""
        from analysis.coherence import has_param_moments, weights_m_coherence

        if not has_param_moments(self.run):
            raise AnalysisError("this run has no per-parameter moments (param_norm_sq_of_sum), so no weights-only "
                                "m-coherence; record the run again with this version of gradstore")
        return self._by(weights_m_coherence(self.run), by)

    def alpha(self, *, by: str = "layer", source: str | None = None) -> xr.DataArray:
        """alpha = ||Σ g||² / (m Σ ||g||²) per (step, sample, ``by``)."""
        from analysis.coherence import alpha

        mo = self._by(self.moments(source), by)
        return alpha(mo["norm_sq_of_sum"], mo["sum_of_norm_sq"], mo["m"])

    def gradient_diversity(self, *, by: str = "layer", source: str | None = None) -> xr.DataArray:
        """Gradient diversity 1/alpha (Yin et al.) per (step, sample, ``by``)."""
        from analysis.coherence import gradient_diversity

        mo = self._by(self.moments(source), by)
        return gradient_diversity(mo["norm_sq_of_sum"], mo["sum_of_norm_sq"], mo["m"])

    # --- per-example ---------------------------------------------------------------------------
    def loss_split(self, *, by: str = "layer") -> xr.Dataset:
        """f_p, f_c, r_p, r_c of the tracked training examples (:func:`analysis.losssplit.loss_split`)."""
        from analysis import losssplit, sources

        run, index = self.run, self._train()
        d = sources.layer_dot_with_sum(run, self._source("dot_with_sum")).isel(example=index)
        corrupt = sources.static(run, "corrupt")[index].astype(bool) if "corrupt" in run.variables \
            else np.zeros(index.size, bool)
        return self._by(losssplit.loss_split(d, corrupt), by)

    # --- pairwise ------------------------------------------------------------------------------
    def gram(self, source: str | None = None, *, examples=None) -> xr.DataArray:
        """g_i·g_j over the tracked training examples (or ``examples`` positions), model appended."""
        from analysis import sources

        return sources.layer_gram(self.run, source or self._pair_source(),
                                  examples=self._train() if examples is None else examples)

    def stiffness(self, source: str | None = None, *, by: str = "layer", classes: bool = True) -> xr.Dataset:
        """Sign and cosine stiffness (:func:`analysis.pairwise.stiffness`); class matrices on a store with classes."""
        from analysis import pairwise, sources
        from analysis.registry import has_classes

        labels = sources.static(self.run, "true_label")[self._train()] if classes and has_classes(self.run) else None
        return self._by(pairwise.stiffness(self.gram(source), labels=labels), by)

    def confusion(self, source: str | None = None, *, by: str = "layer") -> xr.Dataset:
        """Gradient confusion statistics of the pairwise cosines (:func:`analysis.pairwise.confusion`)."""
        from analysis import pairwise

        return self._by(pairwise.confusion(self.gram(source)), by)

    def analyze(self, **kwargs) -> xr.Dataset:
        """Every registered metric as one lazy Dataset (:func:`analysis.report.analyze`)."""
        from analysis.report import analyze

        return analyze(self.run, **kwargs)

    # --- helpers -------------------------------------------------------------------------------
    def _train(self) -> np.ndarray:
        from analysis import sources

        return np.flatnonzero(sources.split_mask(self.run, "train").values)

    def _source(self, exact: str) -> str:
        from analysis import sources

        found = sources.best_source(self.run, exact)
        if found is None:
            raise AnalysisError(f"this run has neither {exact} nor grad_coords/grad_proj to compute it from; "
                                "record one of them")
        return found

    def _pair_source(self) -> str:
        return self._source("gram")

    @staticmethod
    def _by(obj, by: str):
        from analysis.sources import MODEL

        if by == "layer":
            return obj
        if by == "model":
            return obj.sel(layer=MODEL, drop=True)
        raise AnalysisError(f"by={by!r}: use 'layer' (every layer and the whole model) or 'model' (the whole model)")
