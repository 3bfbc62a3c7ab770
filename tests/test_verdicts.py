"""The declared claims, judged by the one engine (pipelines.experiments.claims) on evidence from
pipelines.experiments.verdicts, on constructed data: each claim true, false and undecidable."""

import math

import numpy as np
import pytest

from pipelines.experiments import claims as engine
from pipelines.experiments import verdicts as v
from pipelines.experiments import label_noise

DECLARED = label_noise.CLAIMS  # importing the module registers its claims

RNG = np.random.default_rng(0)


class _Verdict:
    """``claim_name(inputs)`` -> the judged Claim of that declared label-noise claim."""

    def __init__(self, key, experiment="label-noise"):
        self.spec = engine.REGISTRY[experiment][key]

    def __call__(self, inputs, **_):
        return engine.judge(self.spec, self.spec.measure(inputs))


pristine_share_claim = _Verdict("pristine_share")
fitted_first_claim = _Verdict("fitted_first")
cumulative_split_claim = _Verdict("cumulative_split")


def test_helpers():
    assert v.permutation_p(5.0, [1, 2, 3]) == (0.25, 1.0)
    assert all(math.isnan(x) for x in v.permutation_p(1.0, []))
    assert engine.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adj = engine.holm([0.01, math.nan])
    assert adj[0] == pytest.approx(0.01) and math.isnan(adj[1])
    assert engine.directional([0.01, 0.02], [0.99, 0.98]) is True
    assert engine.directional([0.01, 0.2], [0.99, 0.5]) is None
    assert engine.directional([0.01, 0.99], [0.99, 0.001]) is False
    assert engine.directional([0.01, math.nan], [0.99, math.nan]) is None
    np.testing.assert_array_equal(v.window_weights([0, 1, 2, 3, 5, 7, 10, 15, 50], 10), [1, 1, 1, 2, 2, 3, 1, 0, 0])
    np.testing.assert_array_equal(v.window_weights(range(12), 10), [1] * 11 + [0])


# --- f_p against the sample's own pristine share ---------------------------------------------------
def _share_level(f_p, n_p=46, n=100, noise=0.5):
    null = RNG.normal(n_p / n, 0.01, 1000)  # a relabeling null centred on the sample's share
    return {"noise": noise, "f_p": f_p, "null": null, "n_p": n_p, "n": n}


def test_pristine_share_true_false_undecided():
    true = pristine_share_claim([_share_level(0.60), _share_level(0.70, noise=0.25)])
    assert true.supported is True and "46/100 = 0.460" in true.measured
    # significantly below its own share (the 0.523 vs 0.550) must not pass
    below = pristine_share_claim([_share_level(0.523, n_p=55)])
    assert below.supported is False and "55/100 = 0.550" in below.measured
    # above 1 − noise = 0.5 but not above the sample's share 0.55: never supported
    assert pristine_share_claim([_share_level(0.54, n_p=55)]).supported is not True
    assert pristine_share_claim([_share_level(0.462)]).supported is None
    none = pristine_share_claim([{"noise": 0.5, "f_p": 0.7, "null": [], "n_p": 46, "n": 100}])
    assert none.supported is None and "no permutation null" in none.measured
    assert pristine_share_claim([]).supported is None


# --- fitted first, on time -------------------------------------------------------------------------
def _times(p_mean, c_mean, end=1000, n=2000):
    corrupt = np.arange(n) % 2 == 1
    t = np.where(corrupt, RNG.normal(c_mean, 50, n), RNG.normal(p_mean, 50, n)).round().astype(int)
    t = np.where(t > end, -1, np.clip(t, 0, end))
    return {"noise": 0.5, "first_learned": t, "corrupt": corrupt, "end": end}


def test_fitted_first_on_time():
    assert fitted_first_claim([_times(100, 600)]).supported is True
    # both groups fully learned by the end: final accuracies would say nothing; times decide
    both = _times(100, 600, end=5000)
    assert (both["first_learned"] >= 0).all() and fitted_first_claim([both]).supported is True
    assert fitted_first_claim([_times(600, 100)]).supported is False
    same = {"noise": 0.5, "first_learned": np.repeat(np.arange(0, 1000, 10), 2),  # each time once per group
            "corrupt": np.tile([False, True], 100), "end": 1000}
    assert fitted_first_claim([same]).supported is None
    # a run that cannot learn: nothing is ever learned -> no fitting claim is supported
    never = {"noise": 0.5, "first_learned": np.full(100, -1), "corrupt": np.arange(100) < 50, "end": 300}
    c = fitted_first_claim([never])
    assert c.supported is None and "inconclusive" in c.measured


# --- r_p > r_c over the first 10 steps ------------------------------------------------------------
def _split(per_step_p, per_step_c, steps, null_scale=0.05, n_p=50, n=100):
    """Cumulative r_p, r_c over captured steps from per-step group means; a null of random groups."""
    steps = np.asarray(steps)
    per_step_p, per_step_c = np.asarray(per_step_p, float), np.asarray(per_step_c, float)
    mean_all = (n_p * per_step_p + (n - n_p) * per_step_c) / n
    null = np.cumsum(mean_all + RNG.normal(0, null_scale, (500, len(steps))), axis=1)
    return {"noise": 0.5, "steps": steps, "r_p": np.cumsum(per_step_p), "r_c": np.cumsum(per_step_c),
            "r_p_null": null, "n_p": n_p, "n": n}


def test_cumulative_split_reads_the_first_10_steps_not_the_last():
    steps = list(range(11)) + [50, 100, 150]
    # r_p > r_c over steps 0-10, and r_c overtakes later (at the last step r_p < r_c)
    p = [1.0] * 11 + [-20, -20, -20]
    c = [0.2] * 11 + [5, 5, 5]
    lv = _split(p, c, steps)
    assert lv["r_p"][-1] < lv["r_c"][-1]
    claim = cumulative_split_claim([lv])
    assert claim.supported is True and "every step captured" in claim.measured
    assert cumulative_split_claim([_split(c, p, steps)]).supported is False
    assert cumulative_split_claim([_split([0.5] * 14, [0.5] * 14, steps)]).supported is None
    no_null = dict(lv, r_p_null=None)
    assert cumulative_split_claim([no_null]).supported is None
    assert cumulative_split_claim([_split([1, 1], [0, 0], [20, 30])]).supported is None  # no step 0..10


def test_cumulative_split_weights_the_gaps_between_captures():
    steps = [0, 1, 2, 5, 50]
    # per captured step: pristine ahead at steps 0 and 1, behind at 5 (which stands for steps 5-10)
    lv = _split([1.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.6, 0.0], steps, null_scale=0.01)
    # unweighted over captured steps: R_p = 2 > R_c = 0.6; weighted: R_p = 2 < R_c = 0.6 * 6 = 3.6
    claim = cumulative_split_claim([lv])
    assert "R_p = 2, R_c = 3.6" in claim.measured and "gap-weighted" in claim.measured
    assert claim.supported is False


# --- the engine: z-tests, equivalence (TOST), non-inferiority, seeds ---------------------------------
def _spec(direction, margin=0.0, evidence=v.differences):
    return engine.ClaimSpec("k", "statement", "paper", "§1", "a − b", "end", direction, "z-test", evidence,
                            margin=margin)


def _judge(direction, cases, margin=0.0):
    spec = _spec(direction, margin)
    return engine.judge(spec, spec.measure(cases))


def test_equivalence_needs_tost():
    assert _judge("equivalent", [("a", 0.500, 0.501, 0.002)], 0.02).supported is True
    # no significant difference, but far too noisy to show equivalence: not "supported"
    noisy = _judge("equivalent", [("a", 0.50, 0.51, 0.05)], 0.02)
    assert noisy.supported is None and "TOST" in noisy.test
    assert _judge("equivalent", [("a", 0.40, 0.50, 0.01)], 0.02).supported is False
    assert _judge("equivalent", [("a", math.nan, 0.5, 0.01)], 0.02).supported is None
    with pytest.raises(ValueError, match="margin"):
        _spec("equivalent", 0.0)


def test_noninferiority_and_directional_z():
    assert _judge("noninferior", [("a", 0.95, 0.95, 0.003)], 0.02).supported is True
    assert _judge("noninferior", [("a", 0.90, 0.95, 0.003)], 0.02).supported is False
    assert _judge("noninferior", [("a", 0.94, 0.95, 0.02)], 0.02).supported is None
    assert _judge("greater", [("a", 0.6, 0.5, 0.01), ("b", 0.7, 0.5, 0.01)]).supported is True
    # one case clearly the other way: not supported (Holm over cases); one case unclear: inconclusive
    assert _judge("greater", [("a", 0.6, 0.5, 0.01), ("b", 0.4, 0.5, 0.01)]).supported is False
    claim = _judge("greater", [("a", 0.6, 0.5, 0.01), ("b", 0.505, 0.5, 0.01)])
    assert claim.supported is None and claim.p_claim == pytest.approx(0.5 * math.erfc(0.5 / math.sqrt(2)))


def test_a_claim_without_a_within_run_test_is_inconclusive_on_one_seed():
    curves = [{"label": "0% noise", "steps": [0, 10, 20], "values": [1.0, 30.0, 5.0]}]
    spec = engine.ClaimSpec("r", "rises", "p", "§5", "log10 ratio", "run", "greater", "none", v.rises)
    claim = engine.judge(spec, spec.measure(curves))
    assert claim.supported is None and "--seeds" in claim.measured


def test_across_seeds_t_test():
    from scipy.stats import ttest_1samp

    spec = _spec("greater")
    seeds = [[engine.Condition("a", x)] for x in (0.30, 0.25, 0.35, 0.28)]
    claim = engine.judge_seeds(spec, seeds)
    expected = ttest_1samp([0.30, 0.25, 0.35, 0.28], 0.0, alternative="greater").pvalue
    assert claim.supported is True and claim.p_claim == pytest.approx(expected)
    assert "95% t-interval over 4 seeds" in claim.measured
    mean, half, n = engine.t_interval([0.30, 0.25, 0.35, 0.28])
    from scipy.stats import t

    assert (mean, n) == (pytest.approx(0.295), 4)
    assert half == pytest.approx(t.ppf(0.975, 3) * np.std([0.30, 0.25, 0.35, 0.28], ddof=1) / 2)
    down = engine.judge_seeds(spec, [[engine.Condition("a", x)] for x in (-0.30, -0.25, -0.35)])
    assert down.supported is False
    mixed = engine.judge_seeds(spec, [[engine.Condition("a", x)] for x in (0.3, -0.2)])
    assert mixed.supported is None
    # a condition present in one seed only cannot be tested across seeds
    partial = engine.judge_seeds(spec, [[engine.Condition("a", 0.3)], [engine.Condition("b", 0.3)]])
    assert partial.supported is None and "no across-seed test" in partial.measured
    # equivalence across seeds: TOST with t
    eq = engine.judge_seeds(_spec("equivalent", 0.05), [[engine.Condition("a", x)] for x in (0.01, -0.01, 0.0, 0.005)])
    assert eq.supported is True


def test_condition_round_trips_through_json():
    import json

    c = engine.Condition("a", 0.5, "d", 0.01, math.nan, reason="")
    back = engine.Condition.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back.label == "a" and back.p_claim == 0.01 and math.isnan(back.p_opposite)


def test_registry_declarations_are_complete():
    import importlib

    from pipelines.experiments import EXPERIMENTS

    for name, (module, _, _) in EXPERIMENTS.items():
        exp = importlib.import_module(module)
        assert exp.NAME == name and exp.CLAIMS and set(engine.REGISTRY[name]) == {c.key for c in exp.CLAIMS}
        for spec in exp.CLAIMS:
            assert spec.statement and spec.paper and spec.where and spec.statistic and spec.window and spec.test


def test_an_equivalence_to_a_reference_that_never_moved_cannot_decide():
    """RA3 "behaves like SGD" is vacuous where SGD stayed at its start (a run that cannot learn)."""
    moved, still = v.differences_from_a_moved_reference(
        [("moved", 0.40, 0.41, 0.01, 0.10), ("still", 0.10, 0.10, 0.01, 0.105)], margin=0.02)
    assert moved.estimate == pytest.approx(-0.01) and moved.reason == "" and "0.100 at step 0" in moved.detail
    assert math.isnan(still.estimate) and "moved 0.005" in still.reason
    spec = _spec("equivalent", 0.02, v.differences_from_a_moved_reference)
    assert engine.judge(spec, spec.measure([("moved", 0.40, 0.41, 0.005, 0.10)])).supported is True
    assert engine.judge(spec, spec.measure([("still", 0.10, 0.10, 0.005, 0.10)])).supported is None
