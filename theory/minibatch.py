"""§4: Theorem 3 (stylized mini-batching), Corollary 3.1 (amplification), Lemma 4 (zero gradients)."""

from __future__ import annotations

import sympy as sp

import analysis.minibatch
from theory.algebra import alpha_of, general_distribution, implementation_alpha, is_zero, show
from theory.result import checker

#: (m outcomes, k draws) expanded exhaustively; vectors in R^2 with general probabilities
EXHAUSTIVE_CASES = ((2, 2), (2, 3), (3, 2), (3, 3))


def paper_minibatch_map(a, k):
    """Theorem 3: alpha(W) = k·alpha / (1 + (k − 1)·alpha) for W the mean of k iid draws."""
    return k * a / (1 + (k - 1) * a)


@checker(
    "theorem3_moments",
    statement="alpha(W) = k·alpha/(1 + (k−1)·alpha), W = mean of k iid copies of V, general k",
    location="§4, Theorem 3; App. A",
    method="moment identities in symbolic k: E[W] = E[V], E[W·W] = (E[V·V] + (k−1)E[V]·E[V])/k",
)
def theorem3_moments(*, claim=paper_minibatch_map):
    """Theorem 3 for symbolic k from the first two moments of W, alpha through analysis.alpha."""
    k = sp.Symbol("k", integer=True, positive=True)
    i = sp.Symbol("i", integer=True, positive=True)
    second = sp.Symbol("S", positive=True)  # E[V·V]
    mean_sq = sp.Symbol("M", nonnegative=True)  # E[V]·E[V]
    # E[W] = (1/k) Σ_i E[V_i] = E[V], so ||E W||² = M.
    # E[W·W] = (1/k²) Σ_{i,j} E[V_i·V_j]: k diagonal pairs give S, the k² − k others give M (eq. 1).
    diagonal = sp.summation(1, (i, 1, k))
    w_second = (diagonal * second + (k**2 - diagonal) * mean_sq) / k**2
    residual = implementation_alpha(mean_sq, w_second) - claim(implementation_alpha(mean_sq, second), k)
    if not is_zero(residual):
        return False, f"alpha(W) − claim = {show(residual)} ≠ 0"
    predicted = analysis.minibatch.predicted_alpha_k(implementation_alpha(mean_sq, second), k)
    if not is_zero(implementation_alpha(mean_sq, w_second) - predicted):
        return False, "analysis.minibatch.predicted_alpha_k differs from alpha(W)"
    return True, "alpha(W) = M/((S + (k−1)M)/k) equals the claim and analysis.minibatch.predicted_alpha_k"


@checker(
    "theorem3_exhaustive",
    statement="alpha(W) = k·alpha/(1 + (k−1)·alpha) by expanding every k-tuple of draws",
    location="§4, Theorem 3",
    method="exhaustive expansion, (m, k) in " + ", ".join(f"({m},{k})" for m, k in EXHAUSTIVE_CASES)
    + "; symbolic R^2 vectors, general probabilities",
)
def theorem3_exhaustive(*, claim=paper_minibatch_map, cases=EXHAUSTIVE_CASES):
    """Theorem 3 without the moment argument: W's distribution is built from all m^k tuples."""
    for m, k in cases:
        dist = general_distribution(m, 2)
        residual = alpha_of(dist.minibatch_mean(k)) - claim(alpha_of(dist), k)
        if not is_zero(residual):
            return False, f"m={m}, k={k}: alpha(W) − claim ≠ 0"
    return True, f"holds in all {len(cases)} cases ({sum(m**k for m, k in cases)} tuples)"


@checker(
    "corollary3_1_amplification",
    statement="alpha(W) ≥ alpha with equality iff alpha ∈ {0, 1}; the only fixed points are 0 and 1",
    location="§4, Corollary 3.1",
    method="sign of f(a) − a on [0, 1] for symbolic k ≥ 2 (a = u/(1+u), u ≥ 0); roots of f(a) = a",
)
def corollary3_1_amplification(*, mapping=paper_minibatch_map, fixed_points=(0, 1)):
    """Amplification and fixed points of the mini-batch map f(a) = mapping(a, k)."""
    j = sp.Symbol("j", integer=True, nonnegative=True)
    k = 2 + j  # every mini-batch size k ≥ 2
    a, u = sp.Symbol("a", real=True), sp.Symbol("u", nonnegative=True)
    gain = sp.factor(sp.together(mapping(a, k) - a))
    # a = u/(1+u) covers [0, 1) as u covers [0, ∞); a = 1 is checked on its own.
    on_interval = sp.factor(sp.together(gain.subs(a, u / (1 + u))))
    at_one = sp.simplify(gain.subs(a, 1))
    if on_interval.is_nonnegative is not True or at_one.is_nonnegative is not True:
        return False, f"alpha(W) − alpha = {show(gain)} is not ≥ 0 on [0, 1] for every k ≥ 2"
    roots = set(sp.solve(sp.numer(gain), a))
    if roots != {sp.sympify(p) for p in fixed_points}:
        return False, f"f(a) = a has roots {sorted(map(str, roots))}, claimed {list(fixed_points)}"
    return True, f"alpha(W) − alpha = {show(gain)} ≥ 0, zero only at {sorted(map(str, roots))}"


@checker(
    "lemma4_zero_gradients",
    statement="V with probability p, the zero vector otherwise: alpha = p·alpha(V)",
    location="§4, Lemma 4; App. A",
    method="identity in symbolic p ∈ (0, 1], 2 symbolic vectors in R^2, general probabilities",
)
def lemma4_zero_gradients(*, claim=lambda a, p: p * a):
    """Mixing in zero gradients scales alpha by the probability of a nonzero draw."""
    p = sp.Symbol("p", positive=True)
    dist = general_distribution(2, 2)
    residual = alpha_of(dist.mixed_with_zero(p)) - claim(alpha_of(dist), p)
    if not is_zero(residual):
        return False, f"alpha(mixture) − claim = {show(residual)} ≠ 0"
    return True, "alpha(mixture) = p·alpha(V) identically in p"
