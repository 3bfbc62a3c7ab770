"""Property-based tests (hypothesis) of the coherence theorems against analysis.alpha / m_coherence.

Integer gradients and rational probabilities keep every computation exact (fractions.Fraction), so
an equality of the paper is tested as an equality, not up to a tolerance.
"""

import itertools
from fractions import Fraction

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import analysis
from analysis.minibatch import predicted_alpha_k

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def integer_gradients(draw, max_m=6, max_d=4, min_m=1):
    """An (m, d) list of integer per-example gradients."""
    m = draw(st.integers(min_m, max_m))
    d = draw(st.integers(1, max_d))
    return [[draw(st.integers(-5, 5)) for _ in range(d)] for _ in range(m)]


def dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def moments(grads):
    """(||Σ g||², Σ ||g||²) as exact integers, computed here independently."""
    total = [sum(col) for col in zip(*grads)]
    return dot(total, total), sum(dot(g, g) for g in grads)


def sample_alpha(grads):
    nss, sns = moments(grads)
    return analysis.alpha(Fraction(nss), Fraction(sns), len(grads))


@st.composite
def distributions(draw, max_m=3, max_d=3):
    """A finite distribution: integer vectors with rational probabilities, not all vectors zero."""
    vectors = draw(integer_gradients(max_m=max_m, max_d=max_d))
    assume(any(any(x) for x in vectors))
    weights = [draw(st.integers(1, 6)) for _ in vectors]
    return vectors, [Fraction(w, sum(weights)) for w in weights]


def distribution_alpha(vectors, probs):
    """alpha = E[v]·E[v] / E[v·v] through analysis.alpha (m = 1: the moments are expectations)."""
    mean = [sum(p * v[j] for p, v in zip(probs, vectors)) for j in range(len(vectors[0]))]
    return analysis.alpha(dot(mean, mean), sum(p * dot(v, v) for p, v in zip(probs, vectors)), 1)


@SETTINGS
@given(integer_gradients())
def test_boundedness_exact(grads):
    """Theorem 1: 0 ≤ alpha ≤ 1; 0 iff Σ g = 0; 1 iff all g equal; undefined (NaN) if all are zero."""
    nss, sns = moments(grads)
    if sns == 0:  # exact 0/0 has no Fraction value; the float path answers NaN
        assert np.isnan(analysis.alpha(float(nss), float(sns), len(grads)))
        return
    a = sample_alpha(grads)
    assert isinstance(a, Fraction) and 0 <= a <= 1
    assert (a == 0) == (nss == 0)
    assert (a == 1) == all(g == grads[0] for g in grads)


@SETTINGS
@given(st.lists(st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3), min_size=1, max_size=40))
def test_boundedness_float(rows):
    g = np.array(rows, dtype=np.float64)
    sns = float((g * g).sum())
    a = analysis.alpha(float((g.sum(0) ** 2).sum()), sns, len(rows))
    if sns == 0:
        assert np.isnan(a)
    else:
        assert -1e-12 <= a <= 1 + 1e-12


@SETTINGS
@given(integer_gradients(), st.fractions().filter(lambda k: k != 0))
def test_scale_invariance_exact(grads, k):
    """Lemma 2: alpha(kV) = alpha(V) for every nonzero k."""
    assume(moments(grads)[1] > 0)
    assert sample_alpha([[k * x for x in g] for g in grads]) == sample_alpha(grads)


@SETTINGS
@given(integer_gradients(), st.randoms(use_true_random=False))
def test_invariance_to_example_order(grads, rnd):
    assume(moments(grads)[1] > 0)
    shuffled = list(grads)
    rnd.shuffle(shuffled)
    assert sample_alpha(shuffled) == sample_alpha(grads)


@SETTINGS
@given(distributions(), st.integers(1, 3))
def test_theorem3_exact_by_enumerating_tuples(dist, k):
    """Theorem 3: W = mean of k iid draws, its distribution built from every k-tuple of outcomes."""
    vectors, probs = dist
    d = len(vectors[0])
    mean_w = [Fraction(0)] * d
    second_w = Fraction(0)
    for tup in itertools.product(range(len(vectors)), repeat=k):
        p = np.prod([probs[i] for i in tup], dtype=object)
        w = [Fraction(sum(vectors[i][j] for i in tup), k) for j in range(d)]
        mean_w = [a + p * b for a, b in zip(mean_w, w)]
        second_w += p * dot(w, w)
    alpha_w = analysis.alpha(dot(mean_w, mean_w), second_w, 1)
    a = distribution_alpha(vectors, probs)
    assert alpha_w == k * a / (1 + (k - 1) * a)
    assert alpha_w == predicted_alpha_k(a, k)
    assert alpha_w >= a  # Corollary 3.1
    assert (alpha_w == a) == (k == 1 or a in (0, 1))


@SETTINGS
@given(integer_gradients(max_m=4, max_d=3), st.integers(2, 3))
def test_theorem3_minibatches_of_a_sample(grads, k):
    """Theorem 3 for the uniform distribution over a sample, alpha from the sample's sums (m-coherence)."""
    assume(moments(grads)[1] > 0)
    m = len(grads)
    batches = [[Fraction(sum(grads[i][j] for i in tup), k) for j in range(len(grads[0]))]
               for tup in itertools.product(range(m), repeat=k)]
    a_batch = sample_alpha(batches)  # uniform over all m^k equally likely minibatches
    a = sample_alpha(grads)
    assert a_batch == k * a / (1 + (k - 1) * a)


@SETTINGS
@given(distributions(), st.fractions(min_value=0, max_value=1).filter(lambda p: p > 0))
def test_lemma4_zero_gradients_exact(dist, p):
    vectors, probs = dist
    mixed_vectors = [*vectors, [0] * len(vectors[0])]
    mixed_probs = [p * q for q in probs] + [1 - p]
    assert distribution_alpha(mixed_vectors, mixed_probs) == p * distribution_alpha(vectors, probs)


@SETTINGS
@given(integer_gradients(min_m=1), st.integers(0, 5))
def test_zero_gradients_keep_m_coherence(grads, k):
    """Adding k zero gradients scales alpha by m/(m+k) and leaves m-coherence unchanged."""
    nss, sns = moments(grads)
    assume(sns > 0)
    m = len(grads)
    assert analysis.alpha(Fraction(nss), Fraction(sns), m + k) == sample_alpha(grads) * Fraction(m, m + k)
    assert analysis.m_coherence(Fraction(nss), Fraction(sns), m + k) == analysis.m_coherence(
        Fraction(nss), Fraction(sns), m
    )


@SETTINGS
@given(st.lists(st.integers(-5, 5).filter(bool), min_size=1, max_size=8), st.randoms(use_true_random=False))
def test_orthogonal_limit(norms, rnd):
    """Pairwise orthogonal gradients of any norms: m-coherence = 1, alpha = 1/m."""
    m = len(norms)
    axes = list(range(m))
    rnd.shuffle(axes)
    grads = [[norms[i] if j == axes[i] else 0 for j in range(m)] for i in range(m)]
    nss, sns = moments(grads)
    assert analysis.m_coherence(Fraction(nss), Fraction(sns), m) == 1
    assert sample_alpha(grads) == Fraction(1, m)


@SETTINGS
@given(integer_gradients(min_m=1, max_m=6))
def test_m_coherence_from_sums_equals_gram(grads):
    """m-coherence from (||Σg||², Σ||g||²) equals Σ_ij G_ij / Σ_i G_ii of the full Gram matrix."""
    g = np.array(grads, dtype=object)
    gram = g @ g.T
    assume(np.trace(gram) > 0)
    nss, sns = moments(grads)
    assert analysis.m_coherence(Fraction(nss), Fraction(sns), len(grads)) == Fraction(gram.sum(), np.trace(gram))
