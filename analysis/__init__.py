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
- :mod:`analysis.report`: :func:`~analysis.report.analyze` (everything, lazily) and
  :func:`~analysis.report.open_store`; :mod:`analysis.output` and :mod:`analysis.plots` write
  results; :mod:`analysis.synthetic`: synthetic runs in the store layout.
"""

from analysis.coherence import alpha, gradient_diversity, m_coherence, self_removed_m_coherence

__all__ = ["alpha", "gradient_diversity", "m_coherence", "self_removed_m_coherence"]
