"""The evidence functions not covered by test_verdicts.py, judged through their declared claims on
constructed data: each claim clearly true ("supported"), clearly false (the opposite significant:
"not supported") and undecidable (noise, or one seed: "inconclusive"). Statistics are checked
against independent numpy/scipy computations, not against values read off the code."""

import math

import numpy as np
import pytest
from scipy import stats

from pipelines.experiments import claims as engine
from pipelines.experiments import coherence_evolution, easy_hard, label_noise
from pipelines.experiments import verdicts as v

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = True, False, None


def spec(module, key):
    """The declared claim ``key`` of an experiment module (as the runner judges it)."""
    (s,) = [c for c in module.CLAIMS if c.key == key]
    assert engine.REGISTRY[module.NAME][key] is s
    return s


def one_run(s, inputs):
    return engine.judge(s, s.measure(inputs))


def across(s, per_seed_inputs):
    return engine.judge_seeds(s, [s.measure(x) for x in per_seed_inputs])


def estimates(conds):
    return {c.label: c.estimate for c in conds}


# ------------------------------------------------------------------------------------------ rises
RISES = spec(coherence_evolution, "rises")  # greater, margin 0.04 (a rise of at least 10%)


def _rising(label, log_peak, steps=(0, 10, 20, 40), start=3.0):
    """A curve from ``start`` at step 0 whose highest later value is 10**log_peak × start (at step 20)."""
    lp = np.array([0.0, log_peak / 2, log_peak, log_peak * 0.8]) if log_peak > 0 else \
        np.array([0.0, log_peak * 0.8, log_peak, log_peak * 1.5])
    return {"label": label, "steps": np.asarray(steps), "values": start * 10.0 ** lp}


def test_rises_statistic_is_the_log_ratio_of_the_later_peak_to_step_0():
    curves = [{"label": "a", "steps": [0, 5, 10, 20], "values": [2.0, 8.0, 30.0, 12.0]},
              {"label": "b", "steps": [0, 5, 10], "values": [10.0, 5.0, 2.0]},  # falls: peak is step 0 itself
              {"label": "c", "steps": [5, 10], "values": [1.0, 2.0]},  # no step 0
              {"label": "d", "steps": [0], "values": [1.0]}]  # one capture
    got = {c.label: c for c in v.rises(curves)}
    assert got["a"].estimate == pytest.approx(math.log10(30 / 2))
    # the highest value *after* step 0, not the overall maximum (which would give 0)
    assert got["b"].estimate == pytest.approx(math.log10(5 / 10)) and got["b"].estimate < 0
    for k in "cd":
        assert math.isnan(got[k].estimate) and got[k].reason


def test_rises_true_false_undecided_across_seeds():
    rng = np.random.default_rng(1)
    true_r = 1.0 + 0.1 * rng.standard_normal(4)
    seeds = [[_rising("cnn, 0% noise", r), _rising("cnn, 100% noise", r / 2)] for r in true_r]
    claim = across(RISES, seeds)
    assert claim.supported is SUPPORTED
    # the IUT p-value: the larger of the two per-condition t-tests against the margin
    per_cond = [np.log10([max(c["values"][1:]) / c["values"][0] for c in (s[i] for s in seeds)]) for i in (0, 1)]
    expected = max(stats.ttest_1samp(x, 0.04, alternative="greater").pvalue for x in per_cond)
    assert claim.p_claim == pytest.approx(expected)

    falls = [[_rising("cnn, 0% noise", r)] for r in -true_r]
    assert across(RISES, falls).supported is NOT_SUPPORTED
    # a consistent 5% rise is a rise, but below the declared 10% margin: significantly short of it
    small = [[_rising("cnn, 0% noise", r)] for r in math.log10(1.05) + 0.001 * rng.standard_normal(4)]
    assert across(RISES, small).supported is NOT_SUPPORTED
    noisy = [[_rising("cnn, 0% noise", r)] for r in (0.5, 0.01, 0.3, 0.02)]  # estimate > margin, far too noisy
    assert across(RISES, noisy).supported is INCONCLUSIVE
    # one seed: no uncertainty, so no test, however large the rise
    assert across(RISES, seeds[:1]).supported is INCONCLUSIVE
    # one condition clearly true, the other clearly false: not supported
    mixed = [[_rising("a", r), _rising("b", -r)] for r in true_r]
    assert across(RISES, mixed).supported is NOT_SUPPORTED


# ---------------------------------------------------------------------------- slope_falls
SLOPE = spec(coherence_evolution, "slope_falls")  # greater, no margin


def _epoch_curve(noise, ratio, group="cnn", spe=20):
    """Coherence from 1.0 at step 0 to ``ratio`` at the end of epoch 1 (step ``spe``), then higher still."""
    return {"noise": noise, "group": group, "steps_per_epoch": spe, "steps": np.array([0, 10, spe, 2 * spe]),
            "values": np.array([1.0, ratio ** 0.5, ratio, ratio * 50])}


def test_first_epoch_rise_reads_the_end_of_epoch_1():
    c = {"steps": [0, 10, 20, 30], "values": [2.0, 3.0, 9.0, 500.0], "steps_per_epoch": 20}
    assert v.first_epoch_rise(c) == pytest.approx(math.log10(9 / 2))  # not the later 500
    assert math.isnan(v.first_epoch_rise(dict(c, steps_per_epoch=25)))  # no capture at the epoch's end
    assert math.isnan(v.first_epoch_rise(dict(c, steps=[1, 10, 20, 30])))  # no step 0


def test_slope_falls_statistic_per_consecutive_pair_within_each_group():
    curves = [_epoch_curve(1.0, 2.0), _epoch_curve(0.0, 100.0), _epoch_curve(0.5, 10.0),  # given out of order
              _epoch_curve(0.0, 4.0, group="resnet"), _epoch_curve(1.0, 8.0, group="resnet")]
    got = estimates(v.slope_falls(curves))
    assert got == {"cnn, 0% vs 50% noise": pytest.approx(2.0 - 1.0),
                   "cnn, 50% vs 100% noise": pytest.approx(1.0 - math.log10(2.0)),
                   "resnet, 0% vs 100% noise": pytest.approx(math.log10(4.0) - math.log10(8.0))}


def test_slope_falls_true_false_undecided_across_seeds():
    rng = np.random.default_rng(2)

    def seed(ratios):
        return [_epoch_curve(p, r) for p, r in zip((0.0, 0.5, 1.0), ratios)]

    jitter = 10 ** (0.05 * rng.standard_normal((4, 3)))
    slower = [seed(np.array([100.0, 10.0, 1.5]) * j) for j in jitter]
    claim = across(SLOPE, slower)
    assert claim.supported is SUPPORTED
    rise = np.log10([[c["values"][2] / c["values"][0] for c in r] for r in slower])  # (seed, noise level)
    expected = max(stats.ttest_1samp(rise[:, k] - rise[:, k + 1], 0.0, alternative="greater").pvalue for k in (0, 1))
    assert "0% vs 50% noise" in claim.measured and claim.p_claim == pytest.approx(expected)  # IUT: the larger p
    faster = [seed(np.array([1.5, 10.0, 100.0]) * j) for j in jitter]
    assert across(SLOPE, faster).supported is NOT_SUPPORTED
    # the first pair falls clearly, the second is noise around zero: inconclusive
    half = [seed([100.0 * j[0], 10.0, 10.0 * f]) for j, f in zip(jitter, (1.5, 0.6, 1.3, 0.8))]
    assert across(SLOPE, half).supported is INCONCLUSIVE
    assert across(SLOPE, slower[:1]).supported is INCONCLUSIVE  # one seed
    # one noise level per model: no pair, nothing to judge
    assert across(SLOPE, [[_epoch_curve(0.0, 100.0)], [_epoch_curve(0.0, 90.0)]]).supported is INCONCLUSIVE


# --------------------------------------------------------------- peak_real_vs_random / peak_higher
PEAK = spec(coherence_evolution, "peak_real")  # height and step
PEAK_HIGHER = spec(label_noise, "coherence_real_vs_random")  # height only


def _pair(clean_peak, clean_at, random_peak, random_at, model="cnn"):
    steps = np.array([0, 10, 20, 40, 80, 160])

    def curve(peak, at):
        values = np.linspace(1.0, 1.5, steps.size)
        values[list(steps).index(at)] = peak
        return {"steps": steps, "values": values}

    return {"model": model, "clean": curve(clean_peak, clean_at), "random": curve(random_peak, random_at)}


def test_peak_statistics():
    got = estimates(v.peak_real_vs_random([_pair(50.0, 20, 5.0, 80)]))
    assert got == {"cnn: peak height": pytest.approx(1.0), "cnn: peak step": pytest.approx(math.log10(81 / 21))}
    tail = v.peak_real_vs_random([_pair(50.0, 20, 5.0, 160)])
    assert "may lie beyond this run" in tail[1].detail  # the random curve still rising at the last capture
    assert [c.label for c in v.peak_higher([_pair(50.0, 20, 5.0, 80)])] == ["cnn: peak height"]
    nan = {"model": "", "clean": {"steps": [0, 1], "values": [math.nan, math.nan]}, "random": _pair(1, 0, 1, 0)["random"]}
    (c,) = v.peak_real_vs_random([nan])
    assert math.isnan(c.estimate) and c.reason


def _peak_seeds(clean_peak, clean_at, random_peak, random_at, spread=(1.0, 1.1, 0.95, 1.05)):
    return [[_pair(clean_peak * s, clean_at, random_peak, random_at)] for s in spread]


def test_peak_claims_true_false_undecided():
    higher_earlier = _peak_seeds(50.0, 20, 5.0, 80)
    claim = across(PEAK, higher_earlier)
    # the step estimate is the same in every seed (peak at 20 vs 80): no across-seed variation, so no test
    assert claim.supported is INCONCLUSIVE and "does not vary across seeds" in claim.measured
    steps_vary = [[_pair(50.0 * s, 20 if k % 2 else 10, 5.0, 80 if k % 2 else 160)]
                  for k, s in enumerate((1.0, 1.1, 0.95, 1.05))]
    claim = across(PEAK, steps_vary)
    assert claim.supported is SUPPORTED
    heights = [math.log10(50.0 * s / 5.0) for s in (1.0, 1.1, 0.95, 1.05)]
    step_est = [math.log10(81 / 21), math.log10(161 / 11)] * 2
    expected = max(stats.ttest_1samp(x, 0.0, alternative="greater").pvalue for x in (heights, step_est))
    assert claim.p_claim == pytest.approx(expected)
    assert across(PEAK_HIGHER, steps_vary).supported is SUPPORTED
    # higher with random labels (still earlier with real ones): the height condition fails
    lower = [[_pair(5.0 * s, 20 if k % 2 else 10, 50.0, 80 if k % 2 else 160)]
             for k, s in enumerate((1.0, 1.1, 0.95, 1.05))]
    assert across(PEAK, lower).supported is NOT_SUPPORTED
    assert across(PEAK_HIGHER, lower).supported is NOT_SUPPORTED
    # higher with real labels but *later*: peak_real fails on the step, peak_higher ignores the step
    later = [[_pair(50.0 * s, 80 if k % 2 else 160, 5.0, 20 if k % 2 else 10)]
             for k, s in enumerate((1.0, 1.1, 0.95, 1.05))]
    assert across(PEAK, later).supported is NOT_SUPPORTED
    assert across(PEAK_HIGHER, later).supported is SUPPORTED
    # heights that go either way across seeds; and one seed
    either = [[_pair(p, 20, 5.0, 80)] for p in (6.0, 4.5, 5.8, 4.4)]
    assert across(PEAK_HIGHER, either).supported is INCONCLUSIVE
    assert across(PEAK_HIGHER, steps_vary[:1]).supported is INCONCLUSIVE
    assert one_run(PEAK, [_pair(50.0, 20, 5.0, 80)]).supported is INCONCLUSIVE


# ---------------------------------------------------------------------------- train_over_test
TRAIN_TEST = spec(coherence_evolution, "train_over_test")


def _train_test(train_peak, test_peak, label="cnn, 100% noise"):
    # step 0 has test coherence far above everything: it must not count (the window is after step 0)
    return {"label": label, "steps": np.array([0, 10, 20, 30]),
            "train": np.array([1.0, 2.0, train_peak, train_peak * 0.9]),
            "test": np.array([1000.0, test_peak, test_peak * 0.8, test_peak * 0.5])}


def test_train_over_test_statistic_excludes_step_0():
    (c,) = v.train_over_test([_train_test(20.0, 3.0)])
    assert c.estimate == pytest.approx(math.log10(20 / 3))
    gone = dict(_train_test(20.0, 3.0), test=np.array([5.0, math.nan, math.nan, math.nan]))
    (c,) = v.train_over_test([gone])
    assert math.isnan(c.estimate) and "after step 0" in c.reason


def test_train_over_test_true_false_undecided_across_seeds():
    rng = np.random.default_rng(4)
    tr = 20 * 10 ** (0.05 * rng.standard_normal(4))
    claim = across(TRAIN_TEST, [[_train_test(x, 3.0)] for x in tr])
    assert claim.supported is SUPPORTED
    est = np.log10(tr / 3.0)
    assert claim.p_claim == pytest.approx(stats.ttest_1samp(est, 0.0, alternative="greater").pvalue)
    assert across(TRAIN_TEST, [[_train_test(3.0, x)] for x in tr]).supported is NOT_SUPPORTED
    assert across(TRAIN_TEST, [[_train_test(x, 3.0)] for x in (3.5, 2.6, 3.3, 2.8)]).supported is INCONCLUSIVE
    assert across(TRAIN_TEST, [[_train_test(20.0, 3.0)]]).supported is INCONCLUSIVE


# ------------------------------------------------------------------------------- layers_over
CONV_FC = spec(coherence_evolution, "conv_over_fc")


def _layers(conv_over_fc: dict, label="cnn, 0% noise"):
    """Per conv layer values = fc × 10**ratio at each capture after step 0 (step 0 reversed)."""
    steps = np.array([0, 10, 20, 30])
    fc = np.array([5.0, 2.0, 4.0, 8.0])
    conv = {name: np.concatenate([[fc[0] / 1000], fc[1:] * 10.0 ** np.asarray(r, float)])
            for name, r in conv_over_fc.items()}
    return {"label": label, "steps": steps, "fc": fc, "conv": conv}


def test_layers_over_statistic_per_layer_after_step_0():
    lv = _layers({"conv1": [0.2, 0.4, 0.6], "conv2": [-0.3, -0.1, -0.2]})
    lv["conv"]["conv1"][2] = math.nan  # a missing capture is left out of that layer's mean
    got = estimates(v.layers_over([lv]))
    assert got == {"cnn, 0% noise, conv1": pytest.approx(np.mean([0.2, 0.6])),
                   "cnn, 0% noise, conv2": pytest.approx(-0.2)}
    (c,) = v.layers_over([_layers({"conv1": [math.nan] * 3})])
    assert math.isnan(c.estimate) and c.reason


def test_layers_over_true_false_undecided_across_seeds():
    rng = np.random.default_rng(5)
    up = [[_layers({"conv1": 0.5 + 0.05 * rng.standard_normal(3), "conv2": 0.3 + 0.05 * rng.standard_normal(3)})]
          for _ in range(4)]
    claim = across(CONV_FC, up)
    assert claim.supported is SUPPORTED
    est = {name: [np.mean(np.log10(s[0]["conv"][name][1:] / s[0]["fc"][1:])) for s in up] for name in ("conv1", "conv2")}
    expected = max(stats.ttest_1samp(x, 0.0, alternative="greater").pvalue for x in est.values())
    assert claim.p_claim == pytest.approx(expected)
    # conv1 above, conv2 clearly below the FC layer: "each conv layer" fails
    one_below = [[_layers({"conv1": [0.5] * 3, "conv2": -0.3 + 0.05 * rng.standard_normal(3)})] for _ in range(4)]
    one_below[0][0]["conv"]["conv1"][1] *= 1.2  # conv1 varies across seeds too
    assert across(CONV_FC, one_below).supported is NOT_SUPPORTED
    noise = [[_layers({"conv1": [m - 0.05, m, m + 0.05]})] for m in (0.1, -0.08, 0.05, -0.04)]
    assert across(CONV_FC, noise).supported is INCONCLUSIVE
    assert across(CONV_FC, up[:1]).supported is INCONCLUSIVE


# ---------------------------------------------------------------------------------- per_step
COHERENT = spec(easy_hard, "coherent")  # within-run permutation p-values per captured step


def _rows(p, p_opp, est=None):
    est = est if est is not None else [0.1] * len(p)
    return [{"step": s, "estimate": e, "p": a, "p_opposite": b, "detail": f"gap {e}"}
            for s, e, a, b in zip(range(0, 10 * len(p), 10), est, p, p_opp)]


def test_per_step_true_false_undecided_in_one_run():
    conds = v.per_step(_rows([0.01, 0.002], [0.99, 0.998]))
    assert [c.label for c in conds] == ["step 0", "step 10"] and conds[0].p_claim == 0.01
    claim = one_run(COHERENT, _rows([0.01, 0.002, 0.04], [0.99, 0.998, 0.96]))
    assert claim.supported is SUPPORTED and claim.p_claim == pytest.approx(0.04)  # IUT: the largest
    # one step clearly the other way
    assert one_run(COHERENT, _rows([0.01, 0.999], [0.99, 0.001])).supported is NOT_SUPPORTED
    # one step not significant either way
    assert one_run(COHERENT, _rows([0.01, 0.3], [0.99, 0.7])).supported is INCONCLUSIVE
    # the opposite at p = 0.03 at two steps is not significant after Holm (0.06): inconclusive, not False
    holm_case = one_run(COHERENT, _rows([0.97, 0.97, 0.5], [0.03, 0.03, 0.5]))
    assert holm_case.supported is INCONCLUSIVE and holm_case.p_opposite == pytest.approx(min(1.0, 3 * 0.03))
    # no permutation null at a step: that step cannot decide, and says so
    missing = one_run(COHERENT, _rows([0.01, math.nan], [0.99, math.nan]))
    assert missing.supported is INCONCLUSIVE and "no permutation null" in missing.measured


def test_per_step_across_seeds_uses_the_estimates():
    ups = [_rows([0.5, 0.5], [0.5, 0.5], est=[0.10 + d, 0.20 - d]) for d in (0.0, 0.01, -0.01, 0.02)]
    assert across(COHERENT, ups).supported is SUPPORTED  # within-run p-values are not what decides
    downs = [_rows([0.01, 0.01], [0.99, 0.99], est=[-0.10 - d, 0.2]) for d in (0.0, 0.01, -0.01, 0.02)]
    assert across(COHERENT, downs).supported is NOT_SUPPORTED


# ---------------------------------------------------------------------------------- heldout
HELDOUT = spec(easy_hard, "heldout")  # one-sided Fisher exact


def _case(ec, en, hc, hn, label="snapshot"):
    return {"label": label, "easy_correct": ec, "easy_n": en, "hard_correct": hc, "hard_n": hn}


def _fisher_greater(ec, en, hc, hn):
    """P(easy correct >= ec) given the margins: the hypergeometric tail, computed directly."""
    total, correct = en + hn, ec + hc
    return float(stats.hypergeom(total, correct, en).sf(ec - 1))


def test_heldout_statistic_and_fisher_p():
    (c,) = v.heldout([_case(90, 100, 70, 120)])
    assert c.estimate == pytest.approx(0.9 - 70 / 120)
    assert c.p_claim == pytest.approx(_fisher_greater(90, 100, 70, 120))
    # the opposite tail: P(easy correct <= ec)
    assert c.p_opposite == pytest.approx(float(stats.hypergeom(220, 160, 100).cdf(90)))
    (empty,) = v.heldout([_case(0, 0, 5, 10)])
    assert math.isnan(empty.estimate) and empty.reason


def test_heldout_true_false_undecided():
    assert one_run(HELDOUT, [_case(95, 100, 60, 100), _case(90, 100, 55, 100, "first_learned")]).supported is SUPPORTED
    assert one_run(HELDOUT, [_case(60, 100, 95, 100)]).supported is NOT_SUPPORTED
    # one rule clearly true, the other clearly reversed
    assert one_run(HELDOUT, [_case(95, 100, 60, 100), _case(50, 100, 90, 100, "b")]).supported is NOT_SUPPORTED
    assert one_run(HELDOUT, [_case(80, 100, 78, 100)]).supported is INCONCLUSIVE
    assert one_run(HELDOUT, [_case(3, 3, 2, 3)]).supported is INCONCLUSIVE  # too few held out to tell
    assert one_run(HELDOUT, [_case(95, 100, 60, 100), _case(0, 0, 3, 4, "b")]).supported is INCONCLUSIVE


# ------------------------------------------------------------------- learned_above_chance / chance_level
AT_CHANCE = spec(label_noise, "random_at_chance")  # equivalent within ±0.05 (TOST)
ABOVE = engine.ClaimSpec("learned", "learned", "p", "§", "test accuracy − 0.1", "end", "greater", "z-test",
                         v.learned_above_chance, kind="generalization")


def _acc(acc, n, label="100% noise"):
    return {"label": label, "test_acc": acc, "n_test": n}


def test_chance_statistic_and_binomial_se():
    (c,) = v.learned_above_chance([_acc(0.37, 2000)])
    assert c.estimate == pytest.approx(0.27) and c.se == pytest.approx(math.sqrt(0.37 * 0.63 / 2000))
    lv = [_acc(0.12, 500), _acc(0.8, 100, "0% noise")]
    assert v.chance_level(lv) == v.learned_above_chance(lv)


def test_learned_above_chance_true_false_undecided():
    claim = one_run(ABOVE, [_acc(0.9, 2000)])
    assert claim.supported is SUPPORTED
    assert claim.p_claim == pytest.approx(stats.norm.sf(0.8 / math.sqrt(0.9 * 0.1 / 2000)))
    assert one_run(ABOVE, [_acc(0.05, 10000)]).supported is NOT_SUPPORTED  # significantly below chance
    assert one_run(ABOVE, [_acc(0.11, 100)]).supported is INCONCLUSIVE


def test_at_chance_needs_equivalence_true_false_undecided():
    claim = one_run(AT_CHANCE, [_acc(0.101, 10000)])
    assert claim.supported is SUPPORTED
    se = math.sqrt(0.101 * 0.899 / 10000)
    tost = max(stats.norm.sf((0.001 + 0.05) / se), stats.norm.sf((0.05 - 0.001) / se))
    assert claim.p_claim == pytest.approx(tost)
    assert one_run(AT_CHANCE, [_acc(0.45, 2000)]).supported is NOT_SUPPORTED  # it generalized
    # at chance on average, but 40 test examples cannot show it is within ±0.05
    assert one_run(AT_CHANCE, [_acc(0.1, 40)]).supported is INCONCLUSIVE
    assert one_run(AT_CHANCE, [_acc(0.1, 0)]).supported is INCONCLUSIVE  # no test set: no standard error
    # across seeds: the t-test of per-seed estimates decides, not each seed's binomial error
    seeds = [[engine.Condition("100% noise", a - 0.1)] for a in (0.101, 0.099, 0.1005, 0.0998)]
    assert engine.judge_seeds(AT_CHANCE, seeds).supported is SUPPORTED
