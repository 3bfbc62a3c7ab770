"""Evidence functions of the papers' claims: small pure functions from a run's numbers to
:class:`~pipelines.experiments.claims.Condition` s, one per condition a claim is made for.

Each function computes the claim's statistic per condition, signed so that the claim's direction
is positive, and, where the run allows one, its within-run one-sided test (a permutation test
against the right null, a rank test, or a standard error for a z-test). What the conditions mean
for the claim (one-sided, intersection-union over conditions, Holm for the opposite, TOST for
equivalence, across seeds) is decided in one place, :mod:`pipelines.experiments.claims`, from the
claim's declaration; windows are the papers', fixed before a run, never fitted to its results.

Every function takes ``margin`` (the declaration's) as a keyword, whether or not it uses it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from pipelines.experiments.claims import Condition, location_test  # noqa: F401 (re-exported)

#: Fig. 3 of Coherent Gradients looks at the first 10 steps; the early-window claims use steps 0–10
EARLY_WINDOW = 10
CHANCE = 0.1  # accuracy of a 10-class guess


def permutation_p(observed: float, null) -> tuple[float, float]:
    """One-sided permutation p-values (greater, less) of ``observed`` against the ``null`` draws:
    (1 + #{null ≥ observed}) / (N + 1) and (1 + #{null ≤ observed}) / (N + 1); NaN if undefined."""
    null = np.asarray(null, dtype=float).ravel()
    null = null[np.isfinite(null)]
    if not math.isfinite(observed) or null.size == 0:
        return math.nan, math.nan
    n = null.size
    return float((1 + (null >= observed).sum()) / (n + 1)), float((1 + (null <= observed).sum()) / (n + 1))


def _noise(lv) -> str:
    return f"{lv['noise']:.0%} noise"


# ----------------------------------------------------------------- Coherent Gradients §2 (label noise)
def pristine_share(levels: Sequence[dict], *, margin: float = 0.0) -> list[Condition]:
    """f_p at a stated step against the tracked sample's own pristine share n_p/n.

    ``levels``: per noise level ``noise``, ``f_p``, ``null`` (f_p of random pristine/corrupt
    relabelings of the same sample, group sizes kept, so its mean is n_p/n), ``n_p`` and ``n``.
    Estimate: f_p − n_p/n; test: one-sided permutation p-values.
    """
    out = []
    for lv in levels:
        share = lv["n_p"] / lv["n"] if lv["n"] else math.nan
        g, l_ = permutation_p(lv["f_p"], lv["null"])
        null = np.asarray(lv["null"], dtype=float)
        spread = f", null sd {np.nanstd(null):.3g}" if null.size else ""
        out.append(Condition(_noise(lv), lv["f_p"] - share,
                             f"f_p = {lv['f_p']:.3f} vs the sample's pristine share n_p/n = {lv['n_p']}/{lv['n']} = "
                             f"{share:.3f}{spread}", g, l_,
                             reason="" if math.isfinite(g) else "no permutation null (run the analysis with nulls > 0)"))
    return out


def fitted_first(levels: Sequence[dict], *, margin: float = 0.0) -> list[Condition]:
    """Pristine examples are fitted before corrupt ones, on first-learned times.

    ``levels``: per noise level ``noise``, ``first_learned`` (per training example, the first
    evaluated step at which it is classified as its training label, −1 never), ``corrupt`` and
    ``end`` (the last step). Never-learned examples count as learned after ``end``. Estimate:
    P(t_pristine < t_corrupt) + ½P(tie) − ½ (the Mann–Whitney effect); test: one-sided
    Mann–Whitney U (pristine earlier).
    """
    from scipy.stats import mannwhitneyu

    out = []
    for lv in levels:
        t = np.asarray(lv["first_learned"], dtype=float)
        corrupt = np.asarray(lv["corrupt"], dtype=bool)
        t = np.where(t < 0, lv["end"] + 1, t)
        tp, tc = t[~corrupt], t[corrupt]

        def med(x):
            return "never" if not x.size or np.median(x) > lv["end"] else f"{np.median(x):.0f}"

        learned = [float(np.mean(x <= lv["end"])) if x.size else math.nan for x in (tp, tc)]
        detail = (f"median first-learned step pristine {med(tp)} vs corrupt {med(tc)} (learned by the end "
                  f"{learned[0]:.3f} vs {learned[1]:.3f})")
        if tp.size == 0 or tc.size == 0 or np.all(t == t[0]):
            out.append(Condition(_noise(lv), math.nan, detail, reason="a group is empty or every example has the "
                                 "same first-learned time: no difference is possible"))
            continue
        res = mannwhitneyu(tc, tp, alternative="greater")  # U counts corrupt later than pristine
        effect = float(res.statistic) / (tp.size * tc.size) - 0.5
        out.append(Condition(_noise(lv), effect, detail + f", P(pristine earlier) − ½ = {effect:+.3f}",
                             float(res.pvalue), float(mannwhitneyu(tc, tp, alternative="less").pvalue)))
    return out


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


def cumulative_split(levels: Sequence[dict], *, margin: float = 0.0, window: int = EARLY_WINDOW) -> list[Condition]:
    """r_p > r_c over steps 0..``window`` (Fig. 3), gap-weighted.

    ``levels``: per noise level ``noise``, ``steps`` (captured), ``r_p``, ``r_c`` (cumulative over
    the captured steps, per example of the group, as the analysis stores them), ``r_p_null``
    (permutation, step) and ``n_p``, ``n``. The increments are re-summed with
    :func:`window_weights`. Estimate: R_p − R_c; R_p > R_c iff R_p exceeds the all-example mean,
    the mean of R_p's permutation null, so the test is the one-sided permutation test of R_p.
    """
    out = []
    for lv in levels:
        steps = np.asarray(lv["steps"])
        if not (steps <= window).any() or steps[0] != 0:
            out.append(Condition(_noise(lv), math.nan, reason="step 0 is not captured" if (steps <= window).any()
                                 else f"no captured step in 0–{window}"))
            continue
        w = window_weights(steps, window)
        rp = float(increments(lv["r_p"]) @ w)
        rc = float(increments(lv["r_c"]) @ w)
        null = lv.get("r_p_null")
        g, l_ = permutation_p(rp, increments(null) @ w) if null is not None else (math.nan, math.nan)
        captured = [int(s) for s in steps[steps <= window]]
        how = "every step captured" if len(captured) == window + 1 else f"captured steps {captured}, gap-weighted"
        out.append(Condition(_noise(lv), rp - rc, f"R_p = {rp:.3g}, R_c = {rc:.3g} over steps 0–{window} ({how})",
                             g, l_, reason="" if null is not None else "no permutation null"))
    return out


def differences(cases: Sequence[tuple[str, float, float, float]], *, margin: float = 0.0) -> list[Condition]:
    """``a − b`` per case with its standard error (z-tests in the engine).

    ``cases``: (label, a, b, se of a − b), ordered so that the claim says a − b > 0 (or, for an
    equivalence claim, |a − b| small).
    """
    out = []
    for label, a, b, se in cases:
        ok = all(math.isfinite(x) for x in (a, b, se)) and se > 0
        out.append(Condition(label, a - b if ok else math.nan, f"{a:.3f} vs {b:.3f}, difference {a - b:+.3f}", se=se,
                             reason="" if ok else "a value or its standard error is missing"))
    return out


def differences_from_a_moved_reference(cases: Sequence[tuple[str, float, float, float, float]], *,
                                       margin: float = 0.0) -> list[Condition]:
    """``a − b`` per case as :func:`differences`, for an equivalence claim whose reference ``b`` must
    have moved from its start: ``cases`` (label, a, b, se of a − b, b at step 0). A case where ``b``
    moved by no more than ``margin`` from its start cannot decide, since two runs that both stayed
    where they began are "equivalent within ±margin" whatever the claim (a run that cannot learn)."""
    out = []
    for cond, (_, _, b, _, start) in zip(differences([c[:4] for c in cases], margin=margin), cases):
        if not cond.reason:
            detail = f"{cond.detail}; reference {start:.3f} at step 0"
            if math.isfinite(start) and abs(b - start) > margin:
                cond = replace(cond, detail=detail)
            else:
                cond = replace(cond, detail=detail, estimate=math.nan,
                               reason=f"the reference moved {abs(b - start):.3f} from its start, not more than the "
                                      f"margin {margin}: the equivalence would say nothing")
        out.append(cond)
    return out


def learned_above_chance(levels: Sequence[dict], *, margin: float = 0.0) -> list[Condition]:
    """Test accuracy above chance by more than ``margin`` (``levels``: ``label``, ``test_acc``, ``n_test``)."""
    out = []
    for lv in levels:
        acc, n = lv["test_acc"], lv["n_test"]
        se = math.sqrt(max(acc * (1 - acc), 1e-12) / n) if n else math.nan
        out.append(Condition(lv["label"], acc - CHANCE, f"test accuracy {acc:.3f} vs chance {CHANCE}", se=se))
    return out


def chance_level(levels: Sequence[dict], *, margin: float = 0.0) -> list[Condition]:
    """Test accuracy − chance, for an equivalence claim "at chance" (``levels`` as above)."""
    return learned_above_chance(levels, margin=margin)


# --------------------------------------------------------- Making Coherence Out of Nothing At All
def _curve(c) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(c["steps"]), np.asarray(c["values"], dtype=float)


def rises(curves: Sequence[dict], *, margin: float = 0.0) -> list[Condition]:
    """Coherence rises from its start: log10(highest m-coherence after step 0 / m-coherence at step 0).

    ``curves``: per condition ``label``, ``steps``, ``values``. No within-run test (one seed has no
    uncertainty); across seeds a t-test of the per-seed estimates.
    """
    out = []
    for c in curves:
        steps, v = _curve(c)
        if steps.size < 2 or steps[0] != 0 or not (np.isfinite(v[0]) and v[0] > 0) or not np.isfinite(v[1:]).any():
            out.append(Condition(c["label"], math.nan, reason="fewer than two captures from step 0"))
            continue
        k = 1 + int(np.nanargmax(v[1:]))
        out.append(Condition(c["label"], float(np.log10(v[k] / v[0])),
                             f"step 0 {v[0]:.3g}, highest later {v[k]:.3g} at step {int(steps[k])}, last {v[-1]:.3g}; "
                             f"log10 ratio {np.log10(v[k] / v[0]):+.3f}"))
    return out


def first_epoch_rise(c: dict) -> float:
    """log10(m-coherence at the end of the first epoch / at step 0); NaN if either is missing."""
    steps, v = _curve(c)
    at = np.flatnonzero(steps == c["steps_per_epoch"])
    if steps.size == 0 or steps[0] != 0 or not at.size or not (v[0] > 0 and v[at[0]] > 0):
        return math.nan
    return float(np.log10(v[at[0]] / v[0]))


def slope_falls(curves: Sequence[dict], *, margin: float = 0.0) -> list[Condition]:
    """The rise over the first epoch falls as noise grows: for each pair of consecutive noise levels
    (within each ``group``, e.g. a model), rise(lower noise) − rise(higher noise), with rise =
    :func:`first_epoch_rise` (a log10 ratio).

    ``curves``: ``noise``, ``steps``, ``values``, ``steps_per_epoch`` and optional ``group``.
    """
    out = []
    groups: dict[str, list[dict]] = {}
    for c in curves:
        groups.setdefault(c.get("group", ""), []).append(c)
    for group, members in groups.items():
        members = sorted(members, key=lambda c: c["noise"])
        for lo, hi in zip(members, members[1:]):
            a, b = first_epoch_rise(lo), first_epoch_rise(hi)
            label = f"{group + ', ' if group else ''}{lo['noise']:.0%} vs {hi['noise']:.0%} noise"
            if not (math.isfinite(a) and math.isfinite(b)):
                out.append(Condition(label, math.nan, reason="no capture at step 0 and at the end of the first epoch"))
                continue
            out.append(Condition(label, a - b, f"first-epoch rise (log10) {a:+.3f} vs {b:+.3f}"))
    return out


def peak_real_vs_random(pairs: Sequence[dict], *, margin: float = 0.0) -> list[Condition]:
    """The peak is higher and earlier with real labels: log10(peak 0% / peak 100%) and
    log10((peak step 100% + 1) / (peak step 0% + 1)), both positive if the claim holds.

    ``pairs``: per model (optional ``model``) the ``clean`` and ``random`` curves (``steps``, ``values``).
    """
    out = []
    for pair in pairs:
        name = f"{pair['model']}: " if pair.get("model") else ""
        peaks = []
        for c in (pair["clean"], pair["random"]):
            steps, v = _curve(c)
            if not np.isfinite(v).any():
                peaks = None
                break
            k = int(np.nanargmax(v))
            peaks.append((float(v[k]), int(steps[k]), int(steps[-1])))
        if peaks is None:
            out.append(Condition(f"{name}peak", math.nan, reason="a curve has no finite value"))
            continue
        (pc, sc, end), (pr, sr, _) = peaks
        tail = " (the 100% curve is highest at the last capture: its peak may lie beyond this run)" if sr == end else ""
        out += [Condition(f"{name}peak height", float(np.log10(pc / pr)) if pc > 0 and pr > 0 else math.nan,
                          f"peak m-coherence {pc:.3g} (0%) vs {pr:.3g} (100%)"),
                Condition(f"{name}peak step", float(np.log10((sr + 1) / (sc + 1))),
                          f"peak at step {sc} (0%) vs {sr} (100%){tail}")]
    return out


def peak_higher(pairs: Sequence[dict], *, margin: float = 0.0) -> list[Condition]:
    """The peak is higher with real labels: the height conditions of :func:`peak_real_vs_random`."""
    return [c for c in peak_real_vs_random(pairs, margin=margin) if not c.label.endswith("peak step")]


def train_over_test(levels: Sequence[dict], *, margin: float = 0.0) -> list[Condition]:
    """Training-sample coherence against held-out test coherence: log10(peak train / peak test)
    after step 0 (``levels``: ``label``, ``steps``, ``train``, ``test``)."""
    out = []
    for lv in levels:
        steps = np.asarray(lv["steps"])
        later = steps > 0
        tr, te = np.asarray(lv["train"], float)[later], np.asarray(lv["test"], float)[later]
        if not (np.isfinite(tr).any() and np.isfinite(te).any()) or np.nanmax(te) <= 0:
            out.append(Condition(lv["label"], math.nan, reason="no test-sample coherence after step 0"))
            continue
        a, b = float(np.nanmax(tr)), float(np.nanmax(te))
        out.append(Condition(lv["label"], float(np.log10(a / b)), f"peak after step 0: train {a:.3g} vs test {b:.3g}"))
    return out


def layers_over(levels: Sequence[dict], *, margin: float = 0.0) -> list[Condition]:
    """Each convolutional layer more coherent than the fully connected one: per (noise, conv layer)
    the mean over captured steps after step 0 of log10(m-coherence conv / m-coherence fc).

    ``levels``: ``label``, ``steps``, ``conv`` (layer name -> values), ``fc`` (values).
    """
    out = []
    for lv in levels:
        later = np.asarray(lv["steps"]) > 0
        fc = np.asarray(lv["fc"], float)[later]
        for name, values in lv["conv"].items():
            v = np.asarray(values, float)[later]
            ok = np.isfinite(v) & np.isfinite(fc) & (v > 0) & (fc > 0)
            label = f"{lv['label']}, {name}"
            if not ok.any():
                out.append(Condition(label, math.nan, reason="no finite per-layer coherence after step 0"))
                continue
            r = float(np.mean(np.log10(v[ok] / fc[ok])))
            out.append(Condition(label, r, f"mean log10(conv / fc) over {int(ok.sum())} captures {r:+.3f}"))
    return out


# ------------------------------------------------------------------------- Weak and Strong §hardness
def per_step(rows: Sequence[dict], *, margin: float = 0.0) -> list[Condition]:
    """A claim at every captured step, from per-step one-sided p-values (``rows``: ``step``,
    ``estimate``, ``p`` (claim), optional ``p_opposite`` and ``detail``)."""
    out = []
    for r in rows:
        p = r["p"]
        out.append(Condition(r.get("label", f"step {int(r['step'])}"), r["estimate"], r.get("detail", ""), p,
                             r.get("p_opposite", math.nan),
                             reason=r.get("reason") or ("" if math.isfinite(p) else "no permutation null at this step")))
    return out


def heldout(cases: Sequence[dict], *, margin: float = 0.0) -> list[Condition]:
    """Held-out accuracy of the easy-trained model on easy against the hard-trained on hard, by
    one-sided Fisher exact tests (``cases``: ``label``, ``easy_correct``, ``easy_n``, ``hard_correct``,
    ``hard_n``, and optionally ``n_fit``, the examples each model was fitted on)."""
    from scipy.stats import fisher_exact

    out = []
    for c in cases:
        if c["easy_n"] < 1 or c["hard_n"] < 1:
            out.append(Condition(c["label"], math.nan, reason="a group is too small to fit or to hold out"))
            continue
        table = [[c["easy_correct"], c["easy_n"] - c["easy_correct"]],
                 [c["hard_correct"], c["hard_n"] - c["hard_correct"]]]
        a, b = c["easy_correct"] / c["easy_n"], c["hard_correct"] / c["hard_n"]
        fit = f"fit on {c['n_fit']} each: " if "n_fit" in c else ""
        out.append(Condition(c["label"], a - b, f"{fit}easy→held-out easy {a:.3f} (n = {c['easy_n']}) vs hard→held-out "
                             f"hard {b:.3f} (n = {c['hard_n']}), Fisher exact",
                             float(fisher_exact(table, alternative="greater").pvalue),
                             float(fisher_exact(table, alternative="less").pvalue)))
    return out


__all__ = ["EARLY_WINDOW", "permutation_p", "window_weights", "increments", "location_test", "pristine_share",
           "fitted_first", "cumulative_split", "differences", "rises", "slope_falls", "peak_real_vs_random", "peak_higher",
           "train_over_test", "layers_over", "per_step", "heldout", "learned_above_chance", "chance_level"]
