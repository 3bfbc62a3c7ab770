"""Every symbolic check passes with the paper's statement and rejects a deliberately wrong one."""

import sympy as sp
import pytest

import theory
from theory import REGISTRY, definitions, examples, minibatch
from theory.result import CheckResult, checker


def _wrong_variance(dist):
    """Forgets the probabilities: Σ ||v_i − E v||² instead of Σ p_i ||v_i − E v||²."""
    mean = dist.mean
    return sum((v - mean).dot(v - mean) for v in dist.vectors)


def _forms_with(name, form, scope="any"):
    forms = dict(definitions.PAPER_FORMS)
    forms[name] = (form, scope)
    return forms


# check name -> (check, keyword arguments of a wrong statement); one wrong variant for every check
WRONG = {
    "eq1_cross_expectation": {"claim": lambda mean, second: second},  # E[g·g] instead of E[g]·E[g]
    "alpha_forms": {  # variance form divided by ||E v||² instead of E[v·v]
        "forms": _forms_with(
            "1 − Var/||E v||²",
            lambda d: 1 - definitions._paper_variance(d) / d.mean.dot(d.mean),
        )
    },
    "theorem1_bounds": {"variance": _wrong_variance},
    "lemma2_scale_invariance": {"claim": lambda a, k: k**2 * a},
    "theorem3_moments": {"claim": lambda a, k: k * a / (1 + k * a)},
    "theorem3_exhaustive": {"claim": lambda a, k: k * a / (1 + k * a)},
    "corollary3_1_amplification": {"mapping": lambda a, k: k * a / (1 + k * a)},
    "lemma4_zero_gradients": {"claim": lambda a, p: p**2 * a},
    "example_orthogonal_limit": {"claim": lambda m: sp.Rational(1, m**2)},
    "example_commonality": {"claim": lambda m, f: (1 + m * f) / m},
    "example_zero_gradients_added": {"claim": lambda a, m, k: a * sp.Rational(m, m + k) ** 2},
    "example_linear_regression": {"claim": sp.Rational(1, 2)},
    "eq1_first_order_loss_change": {"claim": lambda g: -g.dot(g) / 2},
}


def test_every_check_has_a_wrong_variant():
    assert set(WRONG) == set(REGISTRY)


@pytest.fixture(scope="module")
def paper_results():
    """Every check run once with the paper's statements (through run_checks)."""
    return {r.name: r for r in theory.run_checks()}


@pytest.mark.parametrize("name", list(REGISTRY))
def test_paper_statement_passes(name, paper_results):
    result = paper_results[name]
    assert isinstance(result, CheckResult)
    assert result.passed, result.detail
    assert result.name == name and result.statement and result.location and result.method
    assert result.seconds >= 0


@pytest.mark.parametrize("name", list(REGISTRY))
def test_wrong_statement_is_rejected(name):
    result = REGISTRY[name](**WRONG[name])
    assert not result.passed
    assert result.detail and "raised" not in result.detail  # rejected by the check, not by a crash


@pytest.mark.parametrize(
    ("check", "claims"),
    [
        (definitions.theorem1_bounds, {"bounds": (0, sp.Rational(1, 2))}),  # alpha = 1 is attained
        (definitions.theorem1_bounds, {"bounds": (sp.Rational(-1, 2), 1)}),  # alpha = 0 is attained
        (minibatch.corollary3_1_amplification, {"fixed_points": (0,)}),
        (minibatch.corollary3_1_amplification, {"mapping": lambda a, k: a}),  # no amplification
        (definitions.alpha_forms, {"forms": _forms_with("m-coherence alone",
                                                        lambda d: definitions._form_m_coherence(d) * 3,
                                                        "sample")}),
        # the sample form holds for the uniform distribution only, not for general probabilities
        (definitions.alpha_forms, {"forms": _forms_with("m-coherence/m",
                                                        definitions._form_m_coherence)}),
        (minibatch.theorem3_exhaustive, {"claim": lambda a, k: a}),
        (examples.example_linear_regression, {"inputs": ((1, 0), (1, 1), (0, 1), (-1, 1))}),
    ],
)
def test_more_wrong_statements_are_rejected(check, claims):
    result = check(**claims)
    assert not result.passed, result.detail


def test_checks_go_through_the_implementation(monkeypatch):
    """A broken analysis.alpha or analysis.m_coherence makes the checks that use it fail."""
    import analysis
    import analysis.minibatch

    with monkeypatch.context() as patch:
        patch.setattr(analysis, "alpha", lambda nss, sns, m: nss / (m * sns**2))
        checks = (
            definitions.alpha_forms,
            definitions.theorem1_bounds,
            minibatch.lemma4_zero_gradients,
            examples.example_orthogonal_limit,
        )
        for check in checks:
            assert not check().passed, check.__name__
    with monkeypatch.context() as patch:
        patch.setattr(analysis.minibatch, "predicted_alpha_k", lambda a, k: k * a / (1 + k * a))
        assert not minibatch.theorem3_moments().passed
    with monkeypatch.context() as patch:
        patch.setattr(analysis, "m_coherence", lambda nss, sns, m: nss / sns / m)
        assert not definitions.alpha_forms().passed
        assert not examples.example_orthogonal_limit().passed


def test_a_crashing_claim_is_a_failed_check():
    result = minibatch.lemma4_zero_gradients(claim=lambda a: a)  # wrong arity
    assert not result.passed and result.detail.startswith("raised TypeError")


def test_run_checks_all_and_named(paper_results):
    assert list(paper_results) == list(REGISTRY)
    assert [r.name for r in theory.run_checks(["lemma4_zero_gradients"])] == ["lemma4_zero_gradients"]


def test_run_checks_rejects_unknown_names():
    from gradstore.errors import GradstoreError

    with pytest.raises(GradstoreError, match="unknown theory check"):
        theory.run_checks(["no_such_check"])


def test_registering_a_name_twice_fails():
    with pytest.raises(ValueError, match="already registered"):
        checker("lemma4_zero_gradients", statement="", location="", method="")


def test_theory_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, theory; theory.run_checks(['lemma4_zero_gradients']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
