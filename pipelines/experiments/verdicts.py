"""Verdicts of the papers' claims: small pure functions from numbers and arrays to a :class:`Claim`.

Each function tests one claim, on a stated quantity and window, with a stated test, and says
``supported`` (True), ``not supported`` (False) or ``inconclusive`` (None, with the reason in
``measured``). Rules shared by all of them:

- A directional claim gets a one-sided test in its direction; it is *not supported* only when the
  opposite direction is significant (so a value significantly on the wrong side never passes, and a
  value that is merely not significant is inconclusive, not a failure).
- A claim made for several conditions (every noise level, every case) is an intersection: it is
  supported when each condition's one-sided test rejects at ``alpha`` (an intersection-union test,
  valid at ``alpha`` without correction); it is not supported when the opposite direction is
  significant at some condition after a Holm correction over the conditions.
- An equivalence claim gets an equivalence test (TOST) with a margin stated beforehand; a
  difference that is merely not significant is never read as equivalence.
- Windows (the first ``window`` steps) are fixed before a run, never fitted to its results.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from pipelines.experiments.common import Claim

ALPHA = 0.05
#: Fig. 3 of Coherent Gradients looks at the first 10 steps; the early-window claims use steps 0–10
EARLY_WINDOW = 10


# ------------------------------------------------------------------------------------------- helpers
def permutation_p(observed: float, null) -> tuple[float, float]:
    """One-sided permutation p-values (greater, less) of ``observed`` against the ``null`` draws:
    (1 + #{null ≥ observed}) / (N + 1) and (1 + #{null ≤ observed}) / (N + 1); NaN if undefined."""
    null = np.asarray(null, dtype=float).ravel()
    null = null[np.isfinite(null)]
    if not math.isfinite(observed) or null.size == 0:
        return math.nan, math.nan
    n = null.size
    return float((1 + (null >= observed).sum()) / (n + 1)), float((1 + (null <= observed).sum()) / (n + 1))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (step-down, monotone, capped at 1); NaN stays NaN (and is not counted)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, math.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m, running = len(order), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[i]))
        out[i] = running
    return out.tolist()


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def directional(p_claim: Sequence[float], p_opposite: Sequence[float], *, alpha: float = ALPHA) -> bool | None:
    """Verdict of a claim made at every condition, from one-sided p-values per condition.

    True if every ``p_claim`` < ``alpha`` (intersection-union test); False if a Holm-corrected
    ``p_opposite`` is < ``alpha`` somewhere (the opposite holds clearly); None otherwise, including
    where a p-value is missing.
    """
    if any(q < alpha for q in holm(p_opposite) if math.isfinite(q)):
        return False
    if p_claim and all(math.isfinite(q) and q < alpha for q in p_claim):
        return True
    return None


def _p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return "< 1e-16" if p < 1e-16 else f"{p:.3g}"


def _verdict_word(v: bool | None) -> str:
    return {True: "holds", False: "opposite significant", None: "undecided"}[v]


# ----------------------------------------------------------------- Coherent Gradients §2 (label noise)
def pristine_share_claim(levels: Sequence[dict], *, step: int = 0, alpha: float = ALPHA) -> Claim:
    """"Early on, pristine examples give more of the loss reduction than their share of the sample".

    ``levels``: one dict per noise level with ``noise``, ``f_p`` (observed at ``step``), ``null``
    (the f_p of the permutation null at that step: random pristine/corrupt relabelings of the same
    sample, group sizes kept, so its mean is the sample's pristine share n_p/n), ``n_p`` and ``n``.
    Test: one-sided permutation test, f_p greater than under relabeling, i.e. than the tracked
    sample's own share n_p/n. Pre-declared step: ``step`` (0: the gradient of the first update).
    """
    statement = "Early on, pristine examples give more of the loss reduction than their share of the sample"
    where = "Coherent Gradients §2.4, Fig. 2"
    if not levels:
        return Claim(statement, where, "no noise level with both pristine and corrupt examples: cannot decide", None)
    parts, greater, less = [], [], []
    for lv in levels:
        g, l_ = permutation_p(lv["f_p"], lv["null"])
        greater.append(g)
        less.append(l_)
        share = lv["n_p"] / lv["n"] if lv["n"] else math.nan
        parts.append(f"{lv['noise']:.0%}: f_p = {lv['f_p']:.3f} vs the sample's pristine share "
                     f"{lv['n_p']}/{lv['n']} = {share:.3f}, one-sided p (greater) = {_p(g)}, (less) = {_p(l_)}")
    verdict = directional(greater, less, alpha=alpha)
    test = (f"at step {step} (the gradient of the first update), one-sided permutation test against random "
            f"relabelings of the tracked sample (null mean = its pristine share); supported if p (greater) < {alpha} "
            f"at every level, not supported if p (less) < {alpha} after Holm over levels")
    if verdict is None and any(not math.isfinite(g) for g in greater):
        test += "; inconclusive: no permutation null (run the analysis with nulls > 0)"
    return Claim(statement, where, "; ".join(parts) + f" [{test}]", verdict)


def fitted_first_claim(levels: Sequence[dict], *, alpha: float = ALPHA) -> Claim:
    """"Pristine examples are fitted before corrupt ones" (§2.2, Fig. 1(d)), judged on time.

    ``levels``: one dict per noise level with ``noise``, ``first_learned`` (per training example:
    the first evaluated step at which it was classified as its training label, −1 never),
    ``corrupt`` (bool per example) and ``end`` (the last step). Never-learned examples count as
    learned after ``end`` (ties at the end). Test: one-sided Mann–Whitney U, pristine first-learned
    times stochastically earlier than corrupt ones.
    """
    from scipy.stats import mannwhitneyu

    statement = "Pristine examples are fitted before corrupt ones (first-learned times)"
    where = "Coherent Gradients §2.2, Fig. 1(d)"
    if not levels:
        return Claim(statement, where, "no noise level with both pristine and corrupt examples: cannot decide", None)
    parts, earlier, later, reasons = [], [], [], []
    for lv in levels:
        t = np.asarray(lv["first_learned"], dtype=float)
        corrupt = np.asarray(lv["corrupt"], dtype=bool)
        t = np.where(t < 0, lv["end"] + 1, t)
        tp, tc = t[~corrupt], t[corrupt]
        learned_p = float(np.mean(tp <= lv["end"])) if tp.size else math.nan
        learned_c = float(np.mean(tc <= lv["end"])) if tc.size else math.nan
        if tp.size == 0 or tc.size == 0 or np.all(t == t[0]):
            g = l_ = math.nan
            reasons.append(f"{lv['noise']:.0%}: no difference in first-learned times is possible (a group is empty "
                           "or every example has the same time)")
        else:
            g = float(mannwhitneyu(tp, tc, alternative="less").pvalue)
            l_ = float(mannwhitneyu(tp, tc, alternative="greater").pvalue)
        earlier.append(g)
        later.append(l_)
        med = lambda x: "never" if not x.size or np.median(x) > lv["end"] else f"{np.median(x):.0f}"  # noqa: E731
        parts.append(f"{lv['noise']:.0%}: median first-learned step pristine {med(tp)} vs corrupt {med(tc)} "
                     f"(learned by the end: {learned_p:.3f} vs {learned_c:.3f}), one-sided Mann–Whitney p "
                     f"(pristine earlier) = {_p(g)}, (later) = {_p(l_)}")
    note = (f"supported if p (earlier) < {alpha} at every level, not supported if p (later) < {alpha} after Holm; "
            "times are the evaluated steps at which each training example is first classified as its label")
    return _per_level_claim(statement, where, parts, directional(earlier, later, alpha=alpha), note, reasons)



def _per_level_claim(statement: str, where: str, parts: list[str], verdict, note: str, reasons: list[str]) -> Claim:
    """A claim tested at every noise level: what was measured per level, then the rule and what left it open."""
    if reasons:
        note += "; inconclusive: " + "; ".join(reasons)
    return Claim(statement, where, "; ".join(parts) + f" [{note}]", verdict)

def window_weights(steps, window: int = EARLY_WINDOW) -> np.ndarray:
    """Weight of each captured step in the sum over every step 0..``window``: the number of training
    steps it stands for (up to the next capture, at most to ``window`` + 1); 0 outside the window.

    A captured step's gradient is taken to stand for the uncaptured steps after it (left rectangle
    rule); where every step is captured each weight is 1 and the sum is exact.
    """
    steps = np.asarray(steps, dtype=np.int64)
    nxt = np.append(steps[1:], window + 1)
    w = np.minimum(nxt, window + 1) - steps
    return np.where(steps <= window, np.maximum(w, 0), 0).astype(float)


def increments(cumulative) -> np.ndarray:
    """Per-captured-step values from a cumulative sum over captured steps (last axis)."""
    c = np.asarray(cumulative, dtype=float)
    return np.diff(c, axis=-1, prepend=0.0)


def cumulative_split_claim(levels: Sequence[dict], *, window: int = EARLY_WINDOW, alpha: float = ALPHA) -> Claim:
    """"Per example, pristine examples contribute more to the cumulative loss reduction (r_p > r_c)"
    over the first ``window`` steps (Fig. 3).

    ``levels``: one dict per noise level with ``noise``, ``steps`` (captured), ``r_p``, ``r_c`` (as
    the analysis stores them: cumulative over the captured steps, per example of the group),
    ``r_p_null`` (permutation, step: the same for random groups of n_p examples) and ``n_p``, ``n``.
    The per-captured-step increments are re-summed with :func:`window_weights`, so R_p and R_c are
    sums over every step 0..window. R_p > R_c iff R_p exceeds the all-example mean, which is the mean
    of R_p's permutation null, so the test is the one-sided permutation test of R_p.
    """
    statement = (f"Per example, pristine examples contribute more to the cumulative loss reduction over the "
                 f"first {window} steps (r_p > r_c)")
    where = "Coherent Gradients §2.4, Fig. 3"
    if not levels:
        return Claim(statement, where, "no noise level with both pristine and corrupt examples: cannot decide", None)
    parts, greater, less, reasons = [], [], [], []
    for lv in levels:
        steps = np.asarray(lv["steps"])
        w = window_weights(steps, window)
        if not (steps <= window).any() or steps[0] != 0:
            reasons.append(f"{lv['noise']:.0%}: step 0 is not captured" if (steps <= window).any()
                           else f"{lv['noise']:.0%}: no captured step in 0–{window}")
            greater.append(math.nan)
            less.append(math.nan)
            continue
        rp = float(increments(lv["r_p"]) @ w)
        rc = float(increments(lv["r_c"]) @ w)
        null = lv.get("r_p_null")
        g, l_ = permutation_p(rp, increments(null) @ w) if null is not None else (math.nan, math.nan)
        if null is None:
            reasons.append(f"{lv['noise']:.0%}: no permutation null")
        greater.append(g)
        less.append(l_)
        captured = [int(s) for s in steps[steps <= window]]
        exact = len(captured) == window + 1
        parts.append(f"{lv['noise']:.0%}: R_p = {rp:.3g}, R_c = {rc:.3g} over steps 0–{window} "
                     f"({'every step captured' if exact else f'captured steps {captured}, gap-weighted'}), "
                     f"one-sided permutation p (greater) = {_p(g)}, (less) = {_p(l_)}")
    note = (f"supported if p (greater) < {alpha} at every level, not supported if p (less) < {alpha} after Holm; "
            "the window is the paper's, fixed before the run")
    return _per_level_claim(statement, where, parts, directional(greater, less, alpha=alpha), note, reasons)


# --------------------------------------------------------- Making Coherence Out of Nothing At All §5
def rises_claim(model: str, curves: Sequence[dict]) -> Claim:
    """"Coherence starts low and rises" (Making Coherence §5), at every noise level.

    ``curves``: one dict per noise level with ``noise``, ``steps``, ``values`` (whole-model
    m-coherence of the tracked training sample). Per level it rises if some value after step 0
    exceeds the step-0 value; it does not if none does. One seed, no uncertainty: a descriptive
    comparison, stated as such.
    """
    statement = f"{model}: coherence starts low and rises as training proceeds (at every noise level)"
    where = "Making Coherence… §5"
    parts, per = [], []
    for c in curves:
        steps, v = np.asarray(c["steps"]), np.asarray(c["values"], dtype=float)
        if steps.size < 2 or steps[0] != 0 or not np.isfinite(v[0]) or not np.isfinite(v[1:]).any():
            parts.append(f"{c['noise']:.0%}: fewer than two captures from step 0: cannot decide")
            per.append(None)
            continue
        k = 1 + int(np.nanargmax(v[1:]))
        per.append(bool(v[k] > v[0]))
        parts.append(f"{c['noise']:.0%}: step 0 {v[0]:.3g}, highest later value {v[k]:.3g} at step {int(steps[k])}, "
                     f"last {v[-1]:.3g}")
    if not per or None in per:
        verdict = False if False in per else None
    else:
        verdict = all(per)
    return Claim(statement, where, "; ".join(parts) + " [supported if at every level a later capture exceeds step 0; "
                 "one seed, a descriptive comparison without uncertainty]", verdict)


def rises_faster_claim(model: str, clean: dict | None, random: dict | None) -> Claim | None:
    """"Coherence rises quickly with real labels and slowly with random labels, which peak late".

    ``clean`` and ``random``: ``steps`` and ``values`` of the 0% and 100% noise curves. Supported if
    the 0% curve peaks at an earlier captured step than the 100% curve; not supported if later;
    inconclusive if at the same step (e.g. both still rising at the last capture).
    """
    if clean is None or random is None:
        return None
    statement = (f"{model}: coherence rises quickly with real labels and slowly with random labels "
                 "(random labels peak later)")
    where = "Making Coherence… §5"
    out = []
    for c in (clean, random):
        steps, v = np.asarray(c["steps"]), np.asarray(c["values"], dtype=float)
        out.append(None if not np.isfinite(v).any() else (int(steps[int(np.nanargmax(v))]), int(steps[-1])))
    if None in out:
        return Claim(statement, where, "a curve has no finite value: cannot decide", None)
    (pc, end), (pr, _) = out
    tail = "; the 100% curve is still highest at the last capture (its peak may lie beyond this run; the paper's " \
           "random-label peak is at epochs 40–60)" if pr == end else ""
    measured = f"peak of 0% noise at step {pc}, of 100% noise at step {pr} (run ends at step {end}){tail}"
    verdict = None if pc == pr else pc < pr
    if verdict is None:
        measured += "; both peak at the same capture: cannot decide"
    return Claim(statement, where, measured + " [one seed, a descriptive comparison]", verdict)


# ---------------------------------------------------------------------- Weak and Strong (median of means)
def equivalence_claim(statement: str, where: str, cases: Sequence[tuple[str, float, float, float]], *,
                      margin: float, alpha: float = ALPHA) -> Claim:
    """An equivalence claim ("behaves like"), by TOST with the stated ``margin``, in every case.

    ``cases``: (label, a, b, se of a − b). Per case the two one-sided z-tests of |a − b| < margin;
    TOST p = the larger one. Supported if TOST p < ``alpha`` in every case; not supported if in some
    case |a − b| exceeds the margin significantly (one-sided, Holm over cases); else inconclusive
    (no difference detected is not equivalence).
    """
    parts, p_eq, p_out = [], [], []
    for label, a, b, se in cases:
        d = a - b
        if not all(math.isfinite(x) for x in (a, b, se)) or se <= 0:
            p_eq.append(math.nan)
            p_out.append(math.nan)
            parts.append(f"{label}: a value or its standard error is missing")
            continue
        p = max(normal_sf((d + margin) / se), normal_sf((margin - d) / se))
        q = normal_sf((abs(d) - margin) / se)
        p_eq.append(p)
        p_out.append(q)
        parts.append(f"{label}: difference {d:+.3f} (SE {se:.3f}), TOST p = {_p(p)}")
    verdict = directional(p_eq, p_out, alpha=alpha)
    note = (f"equivalence margin ±{margin} fixed before running; TOST (two one-sided z-tests) per case, supported "
            f"if p < {alpha} in every case, not supported if the difference lies beyond the margin (one-sided, Holm); "
            "otherwise no difference detected, which is not equivalence")
    return Claim(statement, where, "; ".join(parts) + f" [{note}]", verdict)


def noninferiority_claim(statement: str, where: str, cases: Sequence[tuple[str, float, float, float]], *,
                         margin: float, alpha: float = ALPHA) -> Claim:
    """"a keeps b's level (within ``margin`` or better)", by a one-sided non-inferiority z-test per case.

    ``cases``: (label, a, b, se of a − b). Supported if a − b > −margin significantly in every case;
    not supported if a − b < −margin significantly in some case (Holm); else inconclusive.
    """
    parts, p_ok, p_bad = [], [], []
    for label, a, b, se in cases:
        if not all(math.isfinite(x) for x in (a, b, se)) or se <= 0:
            p_ok.append(math.nan)
            p_bad.append(math.nan)
            parts.append(f"{label}: a value or its standard error is missing")
            continue
        z = (a - b + margin) / se
        p_ok.append(normal_sf(z))
        p_bad.append(normal_sf(-z))
        parts.append(f"{label}: {a:.3f} vs {b:.3f} (SE of the difference {se:.3f}), non-inferiority p = {_p(p_ok[-1])}")
    verdict = directional(p_ok, p_bad, alpha=alpha)
    note = (f"margin {margin} fixed before running; one-sided z-test of a − b > −{margin} per case, supported if "
            f"p < {alpha} in every case, not supported if a − b < −{margin} significantly somewhere (Holm)")
    return Claim(statement, where, "; ".join(parts) + f" [{note}]", verdict)


# ------------------------------------------------------------------------------- Weak and Strong §hardness
def every_step_claim(statement: str, where: str, steps: Sequence[int], pvalues: Sequence[float], *,
                     alpha: float = ALPHA, what: str = "") -> Claim:
    """A claim declared for every captured step, from one-sided per-step p-values: supported if the
    Holm-adjusted p-value is below ``alpha`` at every step (Holm's last step: every step rejects),
    else inconclusive; no count of significant steps decides. Missing p-values: inconclusive."""
    p = [float(x) for x in pvalues]
    adj = holm(p)
    if not p or any(not math.isfinite(x) for x in p):
        return Claim(statement, where, f"{what}a per-step p-value is missing (no permutation null): cannot decide",
                     None)
    worst = max(adj)
    k = int(np.argmax(adj))
    ok = worst < alpha
    measured = (f"{what}largest Holm-adjusted one-sided p over the {len(p)} captured steps {list(map(int, steps))} "
                f"is {_p(worst)} (step {int(steps[k])}) [pre-declared: the claim at every captured step, Holm over "
                f"steps at {alpha}; supported if every step rejects, else inconclusive]")
    return Claim(statement, where, measured, True if ok else None)
