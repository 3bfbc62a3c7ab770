"""The paper's worked examples and the first-order loss change (eq. 1)."""

from __future__ import annotations

import sympy as sp

from theory.algebra import is_zero, sample_alpha, sample_m_coherence, show, symbolic_vectors
from theory.models import linear_regression, step_derivative, tiny_network
from theory.result import checker

SAMPLE_SIZES = (2, 3, 4, 5)


def _basis(n: int, i: int) -> sp.Matrix:
    e = sp.zeros(n, 1)
    e[i] = 1
    return e


@checker(
    "example_orthogonal_limit",
    statement="pairwise orthogonal gradients: alpha = 1/m (m-coherence = 1), whatever their norms",
    location="§3, orthogonal limit",
    method="g_i = n_i·e_i with symbolic norms n_i, m = 2..5, through analysis.alpha/m_coherence",
)
def example_orthogonal_limit(*, claim=lambda m: sp.Rational(1, m)):
    """Only the Gram matrix matters, so orthogonal g_i may be taken along the coordinate axes."""
    for m in SAMPLE_SIZES:
        norms = sp.symbols(f"n_0:{m}", positive=True)
        grads = [norms[i] * _basis(m, i) for i in range(m)]
        a, mc = sample_alpha(grads), sample_m_coherence(grads)
        if not is_zero(a - claim(m)) or not is_zero(mc - m * claim(m)):
            return False, f"m={m}: alpha = {show(a)}, claimed {claim(m)}"
    return True, f"alpha = 1/m and m-coherence = 1 for m = {SAMPLE_SIZES[0]}..{SAMPLE_SIZES[-1]}"


def paper_commonality(m, f):
    """alpha = (1/m)·[1 + (m − 1)·f], f = ||c||² / (||c||² + ||u||²)."""
    return (1 + (m - 1) * f) / m


@checker(
    "example_commonality",
    statement="g_i = c + u_i (u_i ⟂ each other and c, equal norms): alpha = (1/m)[1 + (m−1)f]",
    location="§3, commonality example",
    method="c = γ·e_0, u_i = β·e_i with symbolic γ, β (rotation invariance), m = 2..5",
)
def example_commonality(*, claim=paper_commonality):
    """A common component c raises alpha from 1/m towards 1 in proportion to its share f."""
    gamma, beta = sp.symbols("gamma beta", positive=True)
    f = gamma**2 / (gamma**2 + beta**2)
    for m in SAMPLE_SIZES:
        grads = [gamma * _basis(m + 1, 0) + beta * _basis(m + 1, i + 1) for i in range(m)]
        a = sample_alpha(grads)
        if not is_zero(a - claim(m, f)):
            return False, f"m={m}: alpha = {show(a)}, claimed {show(claim(m, f))}"
    return True, "alpha = (1/m)[1 + (m−1)f] for every m tried"


@checker(
    "example_zero_gradients_added",
    statement="adding k zero gradients to m examples: alpha becomes alpha·m/(m+k), m-coherence unchanged",
    location="§4, coherence reduction (Lemma 4 with p = m/(m+k))",
    method="m ∈ {2, 3} symbolic vectors in R^2 plus k ∈ {1, 2, 3} zero vectors",
)
def example_zero_gradients_added(*, claim=lambda a, m, k: a * sp.Rational(m, m + k)):
    """Examples that contribute nothing dilute alpha but not m-coherence."""
    for m in (2, 3):
        grads = list(symbolic_vectors(m, 2))
        before_a, before_mc = sample_alpha(grads), sample_m_coherence(grads)
        for k in (1, 2, 3):
            padded = grads + [sp.zeros(2, 1)] * k
            after_a = sample_alpha(padded)
            if not is_zero(after_a - claim(before_a, m, k)):
                return False, f"m={m}, k={k}: alpha − claim = {show(after_a - claim(before_a, m, k))}"
            if not is_zero(sample_m_coherence(padded) - before_mc):
                return False, f"m={m}, k={k}: m-coherence changed"
    return True, "alpha scales by m/(m+k) and m-coherence is unchanged"


#: the paper's 4-example linear-regression data set: one-hot inputs, so per-example gradients
#: (w·x_i − y_i)·x_i are pairwise orthogonal whatever w and the targets are
REGRESSION_INPUTS = ((1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1))


@checker(
    "example_linear_regression",
    statement="4-example linear regression with orthogonal inputs: gradients pairwise orthogonal, alpha = 1/4",
    location="§3, linear-regression example",
    method="sympy gradients of ½(w·x_i − y_i)² at symbolic w, y; Gram matrix; analysis.alpha",
)
def example_linear_regression(*, claim=sp.Rational(1, 4), inputs=REGRESSION_INPUTS):
    """Gradients from symbolic differentiation; off-diagonal Gram entries vanish identically."""
    params, losses = linear_regression(inputs)
    grads = [sp.Matrix([sp.diff(loss, p) for p in params]) for loss in losses]
    m = len(grads)
    off_diagonal = [grads[i].dot(grads[j]) for i in range(m) for j in range(i + 1, m)]
    if not all(is_zero(x) for x in off_diagonal):
        return False, "some pair of per-example gradients is not orthogonal"
    a = sample_alpha(grads)
    if not is_zero(a - claim):
        return False, f"alpha = {show(a)}, claimed {claim}"
    return True, f"Gram matrix diagonal; alpha = {show(a)}, m-coherence = {show(sample_m_coherence(grads))}"


@checker(
    "eq1_first_order_loss_change",
    statement="ℓ(w − ηg) − ℓ(w) = −η||g||² + O(η²) for g = ∇ℓ(w)",
    location="§3, eq. (1)",
    method="Taylor coefficients in η of a 2-example, width-2 tanh network's loss at symbolic w",
)
def eq1_first_order_loss_change(*, claim=lambda g: -g.dot(g)):
    """The η coefficient equals the claim; the η² coefficient is finite (so the rest is O(η²))."""
    params, losses = tiny_network()
    loss = sum(losses) / len(losses)
    g = sp.Matrix([sp.diff(loss, p) for p in params])
    first = step_derivative(loss, params, g, order=1)
    if not is_zero(first - claim(g)):
        return False, "d/dη [ℓ(w − ηg)] at η = 0 differs from the claimed coefficient"
    second = step_derivative(loss, params, g, order=2)
    if second.has(sp.zoo, sp.oo, sp.nan):
        return False, "second-order coefficient is not finite"
    return True, "coefficient of η is −g·g; the η² coefficient is finite"
