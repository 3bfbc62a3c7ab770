"""Symbolic (sympy) and property-based checks of the coherence theorems against `analysis`."""
