"""Offline analysis of gradstore runs with xarray and Dask. Never imports torch.

Modules (all functions take named-dimension xarray objects and stay lazy on dask arrays):

- :mod:`analysis.coherence`: alpha, m-coherence, gradient diversity, self-removed m-coherence.
- :mod:`analysis.sources`: per-layer moments, norms, dot-with-sum and grams, exact or estimated
  from ``grad_coords``/``grad_proj``, with the whole model appended as layer ``(model)``.
- :mod:`analysis.pairwise`: stiffness (Fort et al.), gradient confusion (Sankararaman et al.),
  group coherence; :mod:`analysis.groups`: one-hot groups and block sums.
- :mod:`analysis.losssplit`: f_p, f_c, r_p, r_c (Coherent Gradients §2.4).
- :mod:`analysis.hardness`: learned steps, easy/hard groups; :mod:`analysis.minibatch`:
  Corollary 3.1 amplification.
- :mod:`analysis.nulls`: permutation nulls vectorized across null worlds.
- :mod:`analysis.registry`: the metric registry (``@metric`` declares a metric's inputs, needs,
  tables and plot in its own module); :mod:`analysis.report`: the driver,
  :func:`~analysis.report.analyze` (everything, lazily), :func:`~analysis.report.prepare` (the
  same, computed a batch of steps at a time) and :func:`~analysis.report.open_store`;
  :mod:`analysis.output` and :mod:`analysis.plots` write results; :mod:`analysis.synthetic`:
  synthetic runs in the store layout.
- :mod:`analysis.accessor`: ``ds.gs``, registered on :class:`xarray.Dataset` by ``import analysis``:
  ``ds.gs.m_coherence(by="layer")``, ``ds.gs.loss_split()``, ``ds.gs.stiffness()``... on a run from
  ``open_run`` or a plain ``xarray.open_zarr(path)``.

``from analysis import analyze, open_store`` is the short way in.
"""

from analysis.coherence import alpha, gradient_diversity, m_coherence, self_removed_m_coherence
from analysis.registry import metric
from analysis.report import METRICS, analyze, open_store, prepare
from analysis import accessor  # registers the ``ds.gs`` accessor on xarray.Dataset  # noqa: E402

__all__ = ["METRICS", "accessor", "alpha", "analyze", "gradient_diversity", "m_coherence", "metric", "open_store",
           "prepare", "self_removed_m_coherence"]
