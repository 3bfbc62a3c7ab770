"""The definition of coherence and its equal forms (§3), Theorem 1 (bounds) and Lemma 2 (scale invariance) (§4)."""

from __future__ import annotations

import math

import sympy as sp

import analysis
from theory.algebra import (
    FiniteDistribution,
    alpha_of,
    general_distribution,
    is_zero,
    sample_m_coherence,
    show,
    symbolic_vectors,
    uniform_distribution,
)
from theory.models import expected_cross_step_change, tiny_network
from theory.result import checker


def _paper_cross_expectation(mean: sp.Matrix, second_moment: sp.Expr) -> sp.Expr:
    """Eq. (1)/(3): E_{z,z'}[g_z·g_z'] = E[g]·E[g]."""
    return mean.dot(mean)


def _pairwise(dist: FiniteDistribution) -> sp.Expr:
    """E_{V,V'}[V·V'] over independent V, V' (a double sum over outcomes)."""
    return dist.expect(lambda v: dist.expect(lambda u: v.dot(u)))


@checker(
    "eq1_cross_expectation",
    statement="E_{z,z'}[g_z·g_z'] = E[g]·E[g] for independent z, z'",
    location="§3, eqs. (1) and (3)",
    method="identity: 3 symbolic vectors in R^2, general probabilities; tanh net: d/dη of E ℓ_z(w−ηg_z')",
)
def eq1_cross_expectation(*, claim=_paper_cross_expectation):
    """Check the cross expectation on symbolic vectors and on the gradients of a tiny network."""
    dist = general_distribution(3, 2)
    residual = _pairwise(dist) - claim(dist.mean, dist.second_moment)
    if not is_zero(residual):
        return False, f"vectors: E[g_z·g_z'] − claim = {show(residual)} ≠ 0"
    params, losses = tiny_network()
    grads = [sp.Matrix([sp.diff(loss, p) for p in params]) for loss in losses]
    net = uniform_distribution(grads)
    derivative = expected_cross_step_change(params, losses, grads)
    if not is_zero(derivative + claim(net.mean, net.second_moment)):
        return False, "network: d/dη E_{z,z'}[ℓ_z(w − η g_z')] at η=0 ≠ −claim"
    return True, "holds for general probabilities and on a 2-example tanh network's gradients"


def _form_means(dist: FiniteDistribution) -> sp.Expr:
    return alpha_of(dist)  # analysis.alpha(||E v||², E||v||², 1)


def _form_pairwise(dist: FiniteDistribution) -> sp.Expr:
    return _pairwise(dist) / dist.second_moment


def _form_variance(dist: FiniteDistribution) -> sp.Expr:
    mean = dist.mean
    return 1 - dist.expect(lambda v: (v - mean).dot(v - mean)) / dist.second_moment


def _form_m_coherence(dist: FiniteDistribution) -> sp.Expr:
    return sample_m_coherence(dist.vectors) / len(dist.vectors)  # analysis.m_coherence / m


#: name -> (form, scope); scope "any" = every distribution, "sample" = uniform over a sample
PAPER_FORMS = {
    "E[v]·E[v]/E[v·v] (analysis.alpha)": (_form_means, "any"),
    "E_{v,v'}[v·v']/E[v·v]": (_form_pairwise, "any"),
    "1 − E||v − E[v]||²/E[v·v]": (_form_variance, "any"),
    "m-coherence/m (analysis.m_coherence)": (_form_m_coherence, "sample"),
}


@checker(
    "alpha_forms",
    statement="the forms of alpha agree: E[v]·E[v]/E[v·v] = E[v·v']/E[v·v] = 1 − Var/E[v·v] = m-coherence/m",
    location="§3, eq. (3)",
    method="identity vs the definition: 3 symbolic vectors in R^2, general and uniform probabilities",
)
def alpha_forms(*, forms=None):
    """Every claimed form equals E[v]·E[v]/E[v·v] (written out here, independently)."""
    forms = PAPER_FORMS if forms is None else forms
    general = general_distribution(3, 2)
    sample = uniform_distribution(symbolic_vectors(3, 2))
    for dist, label in ((general, "general probabilities"), (sample, "uniform sample")):
        definition = dist.mean.dot(dist.mean) / dist.second_moment
        for name, (form, scope) in forms.items():
            if scope == "sample" and dist is general:
                continue
            if not is_zero(form(dist) - definition):
                return False, f"form {name!r} differs from E[v]·E[v]/E[v·v] ({label})"
    return True, f"{len(forms)} forms equal the definition"


def _paper_variance(dist: FiniteDistribution) -> sp.Expr:
    """E||v − E[v]||², the identity behind Theorem 1."""
    mean = dist.mean
    return dist.expect(lambda v: (v - mean).dot(v - mean))


@checker(
    "theorem1_bounds",
    statement="0 ≤ alpha ≤ 1; alpha = 0 iff E[v] = 0; alpha = 1 iff all v are equal",
    location="§4, Theorem 1; App. A",
    method="identity E[v·v] − E[v]·E[v] = E||v − E[v]||² + sign of sums of squares; extremes attained",
)
def theorem1_bounds(*, variance=_paper_variance, bounds=(0, 1)):
    """Theorem 1 from the variance identity, on 3 symbolic vectors with general probabilities."""
    dist = general_distribution(3, 2)
    mean_sq, second = dist.mean.dot(dist.mean), dist.second_moment
    var = variance(dist)
    if not is_zero(second - mean_sq - var):
        return False, f"E[v·v] − E[v]·E[v] − claimed variance = {show(second - mean_sq - var)} ≠ 0"
    mean = dist.mean
    termwise = sum(p * (v - mean).dot(v - mean) for p, v in zip(dist.probs, dist.vectors))
    if not is_zero(var - termwise) or termwise.is_nonnegative is not True:
        return False, "claimed variance is not Σ p_i ||v_i − E[v]||² (a sum of nonnegative terms)"
    if mean_sq.is_nonnegative is not True:
        return False, "||E[v]||² is not recognised as a sum of squares"
    a = alpha_of(dist)
    if not is_zero(a * second - mean_sq):  # alpha = 0 exactly when the squared norm ||E v||² is 0
        return False, "alpha·E[v·v] ≠ ||E[v]||²"
    if not is_zero(a - (1 - var / second)):  # alpha = 1 exactly when every v_i = E[v]
        return False, "alpha ≠ 1 − E||v − E[v]||²/E[v·v]"
    c = symbolic_vectors(1, 2, "c")[0]
    low = alpha_of(FiniteDistribution((c, -c), (sp.Rational(1, 2), sp.Rational(1, 2))))
    high = alpha_of(FiniteDistribution((c, c, c), dist.probs))
    lo, hi = bounds
    if not (is_zero(low - lo) and is_zero(high - hi)):
        return False, f"attained extremes are {low} (E[v]=0) and {high} (all equal), not {lo} and {hi}"
    return True, "alpha = 1 − Σp_i||v_i−E v||²/E[v·v] ∈ [0, 1]; 0 and 1 attained exactly as stated"


@checker(
    "lemma2_scale_invariance",
    statement="alpha(k·V) = alpha(V) for every nonzero k",
    location="§4, Lemma 2; App. A",
    method="identity in symbolic nonzero k, 3 symbolic vectors in R^2, general probabilities",
)
def lemma2_scale_invariance(*, claim=lambda a, k: a):
    """Scale invariance via analysis.alpha; k = 0 leaves alpha undefined (NaN)."""
    k = sp.Symbol("k", real=True, nonzero=True)
    dist = general_distribution(3, 2)
    residual = alpha_of(dist.scaled(k)) - claim(alpha_of(dist), k)
    if not is_zero(residual):
        return False, f"alpha(kV) − claim = {show(residual)} ≠ 0"
    if not math.isnan(float(analysis.alpha(0.0, 0.0, 3))):
        return False, "analysis.alpha of all-zero gradients (k = 0) is not NaN"
    return True, "holds for symbolic nonzero k; k = 0 gives NaN (undefined), as the lemma excludes"
