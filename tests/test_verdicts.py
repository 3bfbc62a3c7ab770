"""The verdict functions of pipelines.experiments.verdicts on constructed data: each claim true,
false and undecidable."""

import math

import numpy as np
import pytest

from pipelines.experiments import verdicts as v

RNG = np.random.default_rng(0)


def test_helpers():
    assert v.permutation_p(5.0, [1, 2, 3]) == (0.25, 1.0)
    assert all(math.isnan(x) for x in v.permutation_p(1.0, []))
    assert v.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adj = v.holm([0.01, math.nan])
    assert adj[0] == pytest.approx(0.01) and math.isnan(adj[1])
    assert v.directional([0.01, 0.02], [0.99, 0.98]) is True
    assert v.directional([0.01, 0.2], [0.99, 0.5]) is None
    assert v.directional([0.01, 0.99], [0.99, 0.001]) is False
    assert v.directional([0.01, math.nan], [0.99, math.nan]) is None
    np.testing.assert_array_equal(v.window_weights([0, 1, 2, 3, 5, 7, 10, 15, 50], 10), [1, 1, 1, 2, 2, 3, 1, 0, 0])
    np.testing.assert_array_equal(v.window_weights(range(12), 10), [1] * 11 + [0])


# --- f_p against the sample's own pristine share ---------------------------------------------------
def _share_level(f_p, n_p=46, n=100, noise=0.5):
    null = RNG.normal(n_p / n, 0.01, 1000)  # a relabeling null centred on the sample's share
    return {"noise": noise, "f_p": f_p, "null": null, "n_p": n_p, "n": n}


def test_pristine_share_true_false_undecided():
    true = v.pristine_share_claim([_share_level(0.60), _share_level(0.70, noise=0.25)])
    assert true.supported is True and "46/100 = 0.460" in true.measured
    # significantly below its own share (the 0.523 vs 0.550) must not pass
    below = v.pristine_share_claim([_share_level(0.523, n_p=55)])
    assert below.supported is False and "55/100 = 0.550" in below.measured
    # above 1 − noise = 0.5 but not above the sample's share 0.55: never supported
    assert v.pristine_share_claim([_share_level(0.54, n_p=55)]).supported is not True
    assert v.pristine_share_claim([_share_level(0.462)]).supported is None
    none = v.pristine_share_claim([{"noise": 0.5, "f_p": 0.7, "null": [], "n_p": 46, "n": 100}])
    assert none.supported is None and "no permutation null" in none.measured
    assert v.pristine_share_claim([]).supported is None


# --- fitted first, on time -------------------------------------------------------------------------
def _times(p_mean, c_mean, end=1000, n=2000):
    corrupt = np.arange(n) % 2 == 1
    t = np.where(corrupt, RNG.normal(c_mean, 50, n), RNG.normal(p_mean, 50, n)).round().astype(int)
    t = np.where(t > end, -1, np.clip(t, 0, end))
    return {"noise": 0.5, "first_learned": t, "corrupt": corrupt, "end": end}


def test_fitted_first_on_time():
    assert v.fitted_first_claim([_times(100, 600)]).supported is True
    # both groups fully learned by the end: final accuracies would say nothing; times decide
    both = _times(100, 600, end=5000)
    assert (both["first_learned"] >= 0).all() and v.fitted_first_claim([both]).supported is True
    assert v.fitted_first_claim([_times(600, 100)]).supported is False
    same = {"noise": 0.5, "first_learned": np.repeat(np.arange(0, 1000, 10), 2),  # each time once per group
            "corrupt": np.tile([False, True], 100), "end": 1000}
    assert v.fitted_first_claim([same]).supported is None
    # a run that cannot learn: nothing is ever learned -> no fitting claim is supported
    never = {"noise": 0.5, "first_learned": np.full(100, -1), "corrupt": np.arange(100) < 50, "end": 300}
    c = v.fitted_first_claim([never])
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
    claim = v.cumulative_split_claim([lv])
    assert claim.supported is True and "every step captured" in claim.measured
    assert v.cumulative_split_claim([_split(c, p, steps)]).supported is False
    assert v.cumulative_split_claim([_split([0.5] * 14, [0.5] * 14, steps)]).supported is None
    no_null = dict(lv, r_p_null=None)
    assert v.cumulative_split_claim([no_null]).supported is None
    assert v.cumulative_split_claim([_split([1, 1], [0, 0], [20, 30])]).supported is None  # no step 0..10


def test_cumulative_split_weights_the_gaps_between_captures():
    steps = [0, 1, 2, 5, 50]
    # per captured step: pristine ahead at steps 0 and 1, behind at 5 (which stands for steps 5-10)
    lv = _split([1.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.6, 0.0], steps, null_scale=0.01)
    # unweighted over captured steps: R_p = 2 > R_c = 0.6; weighted: R_p = 2 < R_c = 0.6 * 6 = 3.6
    claim = v.cumulative_split_claim([lv])
    assert "R_p = 2, R_c = 3.6" in claim.measured and "gap-weighted" in claim.measured
    assert claim.supported is False


# --- Making Coherence: starts low and rises --------------------------------------------------------
def test_rises_claim():
    steps = [0, 10, 20, 30]
    up = [{"noise": 0.0, "steps": steps, "values": [6.0, 26.9, 20.0, 2.5]},
          {"noise": 1.0, "steps": steps, "values": [3.0, 4.0, 5.0, 6.0]}]
    assert v.rises_claim("cnn", up).supported is True
    down = [{"noise": 0.0, "steps": steps, "values": [30.0, 20.0, 10.0, 5.0]}]
    assert v.rises_claim("cnn", down).supported is False
    short = [{"noise": 0.0, "steps": [0], "values": [3.0]}]
    assert v.rises_claim("cnn", short).supported is None


def test_rises_faster_claim():
    steps = [0, 10, 20, 30]
    clean = {"steps": steps, "values": [1, 9, 5, 4]}
    rand = {"steps": steps, "values": [1, 2, 3, 4]}
    c = v.rises_faster_claim("cnn", clean, rand)
    assert c.supported is True and "still highest at the last capture" in c.measured
    assert v.rises_faster_claim("cnn", rand, clean).supported is False
    assert v.rises_faster_claim("cnn", rand, rand).supported is None
    assert v.rises_faster_claim("cnn", None, rand) is None


# --- equivalence and non-inferiority ----------------------------------------------------------------
def test_equivalence_needs_tost():
    assert v.equivalence_claim("s", "w", [("a", 0.500, 0.501, 0.002)], margin=0.02).supported is True
    # no significant difference, but far too noisy to show equivalence: not "supported"
    noisy = v.equivalence_claim("s", "w", [("a", 0.50, 0.51, 0.05)], margin=0.02)
    assert noisy.supported is None and "TOST" in noisy.measured
    assert v.equivalence_claim("s", "w", [("a", 0.40, 0.50, 0.01)], margin=0.02).supported is False
    assert v.equivalence_claim("s", "w", [("a", math.nan, 0.5, 0.01)], margin=0.02).supported is None


def test_noninferiority():
    assert v.noninferiority_claim("s", "w", [("a", 0.95, 0.95, 0.003)], margin=0.02).supported is True
    assert v.noninferiority_claim("s", "w", [("a", 0.90, 0.95, 0.003)], margin=0.02).supported is False
    assert v.noninferiority_claim("s", "w", [("a", 0.94, 0.95, 0.02)], margin=0.02).supported is None


# --- a claim at every captured step, one Holm-corrected test -----------------------------------------
def test_every_step_claim_is_not_a_majority_vote():
    steps = [0, 10, 20, 30, 40, 50, 60]
    assert v.every_step_claim("s", "w", steps, [0.001] * 7).supported is True
    # 4 of 7 steps significant: a majority vote would say "supported"; one Holm test does not
    four = v.every_step_claim("s", "w", steps, [0.001] * 4 + [0.5] * 3)
    assert four.supported is None and "Holm" in four.measured
    assert v.every_step_claim("s", "w", steps, [0.001] * 6 + [math.nan]).supported is None
