"""Symbolic building blocks: finite distributions of vectors, alpha through the implementation, zero tests.

Every statement about alpha is evaluated with :func:`analysis.alpha` / :func:`analysis.m_coherence`
themselves (their arithmetic is duck-typed, so sympy expressions flow through), so the checks hold the
implementation to the paper, not a second copy of the formula.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sympy as sp

import analysis


@dataclass(frozen=True)
class FiniteDistribution:
    """A random vector V taking value ``vectors[i]`` with probability ``probs[i]``.

    Attributes
    ----------
    vectors : tuple of sympy.Matrix
        Column vectors of one common dimension.
    probs : tuple of sympy.Expr
        Probabilities, summing to 1.
    """

    vectors: tuple[sp.Matrix, ...]
    probs: tuple[sp.Expr, ...]

    def expect(self, f: Callable[[sp.Matrix], sp.Expr]):
        """E[f(V)] (f may return a scalar or a vector)."""
        terms = [p * f(v) for p, v in zip(self.probs, self.vectors)]
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return total

    @property
    def mean(self) -> sp.Matrix:
        """E[V]."""
        return self.expect(lambda v: v)

    @property
    def second_moment(self) -> sp.Expr:
        """E[V·V]."""
        return self.expect(lambda v: v.dot(v))

    def scaled(self, k) -> FiniteDistribution:
        """The distribution of k·V."""
        return FiniteDistribution(tuple(k * v for v in self.vectors), self.probs)

    def mixed_with_zero(self, p) -> FiniteDistribution:
        """V with probability p, the zero vector with probability 1 − p (Lemma 4)."""
        zero = sp.zeros(*self.vectors[0].shape)
        return FiniteDistribution(
            (*self.vectors, zero), (*(p * q for q in self.probs), 1 - p)
        )

    def minibatch_mean(self, k: int) -> FiniteDistribution:
        """W = (V_1 + … + V_k)/k for iid V_j, by enumerating all k-tuples of outcomes (Theorem 3)."""
        vectors, probs = [], []
        for tup in itertools.product(range(len(self.vectors)), repeat=k):
            vectors.append(sum((self.vectors[i] for i in tup[1:]), self.vectors[tup[0]]) / k)
            probs.append(sp.Mul(*(self.probs[i] for i in tup)))
        return FiniteDistribution(tuple(vectors), tuple(probs))


def symbolic_vectors(m: int, d: int, prefix: str = "x") -> tuple[sp.Matrix, ...]:
    """m vectors in R^d with independent real symbolic components ``x_i_j``."""
    return tuple(
        sp.Matrix([sp.Symbol(f"{prefix}_{i}_{j}", real=True) for j in range(d)]) for i in range(m)
    )


def general_distribution(m: int, d: int, prefix: str = "x") -> FiniteDistribution:
    """m symbolic vectors in R^d with general probabilities p_i = w_i / Σ w (w_i > 0 symbols)."""
    weights = sp.symbols(f"w_0:{m}", positive=True)
    total = sp.Add(*weights)
    return FiniteDistribution(symbolic_vectors(m, d, prefix), tuple(w / total for w in weights))


def uniform_distribution(vectors: Sequence[sp.Matrix]) -> FiniteDistribution:
    """The uniform distribution over the given vectors (the empirical distribution of a sample)."""
    m = len(vectors)
    return FiniteDistribution(tuple(vectors), tuple(sp.Rational(1, m) for _ in range(m)))


def implementation_alpha(norm_sq_of_sum, sum_of_norm_sq, m=1) -> sp.Expr:
    """:func:`analysis.alpha` evaluated on sympy expressions.

    The implementation guards against an all-zero denominator with a ``> 0`` test, which sympy
    cannot decide for a general sum of squares; the denominator is therefore passed as a positive
    placeholder and substituted afterwards, so the branch under test is the implementation's
    ``sum_of_norm_sq > 0`` branch.
    """
    placeholder = sp.Dummy("sum_of_norm_sq", positive=True)
    value = sp.sympify(analysis.alpha(sp.sympify(norm_sq_of_sum), placeholder, m))
    return value.subs(placeholder, sum_of_norm_sq)


def implementation_m_coherence(norm_sq_of_sum, sum_of_norm_sq, m) -> sp.Expr:
    """:func:`analysis.m_coherence` evaluated on sympy expressions (see :func:`implementation_alpha`)."""
    placeholder = sp.Dummy("sum_of_norm_sq", positive=True)
    value = sp.sympify(analysis.m_coherence(sp.sympify(norm_sq_of_sum), placeholder, m))
    return value.subs(placeholder, sum_of_norm_sq)


def alpha_of(dist: FiniteDistribution) -> sp.Expr:
    """alpha(V) = E[V]·E[V] / E[V·V] through :func:`analysis.alpha` (m = 1: moments are expectations)."""
    return implementation_alpha(dist.mean.dot(dist.mean), dist.second_moment, 1)


def sample_alpha(vectors: Sequence[sp.Matrix]) -> sp.Expr:
    """alpha of a sample g_1..g_m through :func:`analysis.alpha` (sums, not expectations)."""
    total = sum(vectors[1:], vectors[0])
    return implementation_alpha(total.dot(total), sum(v.dot(v) for v in vectors), len(vectors))


def sample_m_coherence(vectors: Sequence[sp.Matrix]) -> sp.Expr:
    """m-coherence of a sample g_1..g_m through :func:`analysis.m_coherence`."""
    total = sum(vectors[1:], vectors[0])
    return implementation_m_coherence(total.dot(total), sum(v.dot(v) for v in vectors), len(vectors))


def is_zero(expr) -> bool:
    """Whether ``expr`` is identically zero, decided exactly and without ``simplify``.

    Applied functions (the network's ``tanh``) are replaced by fresh indeterminates, the expression
    is brought over one denominator and the numerator expanded: a zero polynomial proves the
    identity; anything else is reported as not zero (conservative for transcendental atoms).
    """
    expr = sp.sympify(expr)
    if isinstance(expr, sp.MatrixBase):
        return all(is_zero(e) for e in expr)
    atoms = sorted(expr.atoms(sp.Function), key=sp.default_sort_key)
    expr = expr.xreplace({f: sp.Dummy() for f in atoms})
    return sp.expand(sp.numer(sp.together(expr))) == 0


def show(expr, limit: int = 120) -> str:
    """A short printable form of an expression for result details."""
    expr = sp.sympify(expr)
    if isinstance(expr, sp.Expr) and sp.count_ops(expr) < 60:
        expr = sp.factor(expr)
    text = str(expr)
    return text if len(text) <= limit else text[: limit - 1] + "…"
