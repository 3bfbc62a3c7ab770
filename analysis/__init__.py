"""Offline analysis of gradstore runs with xarray and Dask. Never imports torch."""

from analysis.coherence import alpha, gradient_diversity, m_coherence, self_removed_m_coherence

__all__ = ["alpha", "gradient_diversity", "m_coherence", "self_removed_m_coherence"]
