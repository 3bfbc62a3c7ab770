"""Claims as data: each experiment declares its papers' claims once, and one engine judges them.

A :class:`ClaimSpec` is the whole declaration of one claim: the statement, the paper and where in
it, the statistic and its window, the direction (``greater``, ``noninferior`` or ``equivalent``,
with a ``margin`` stated beforehand), the within-run test, and the *evidence* function that turns
the run's numbers into one :class:`Condition` per condition the claim is made for (a noise level, a
case, a step). A condition's ``estimate`` is signed so that the claim's direction is positive (for
``equivalent``: the difference whose size must stay within the margin).

:func:`judge` decides one run, :func:`judge_seeds` several seeds of it, by the same rules:

- per condition a one-sided p-value for the claim and one for the opposite: from the evidence's own
  within-run test (a permutation or rank test), or a z-test from its standard error; across seeds a
  one-sided t-test of the per-seed estimates (``n - 1`` degrees of freedom), so the verdict rests on
  the variation between training runs;
- a claim made for several conditions is supported when every condition's one-sided test rejects
  at ``alpha`` (an intersection-union test, valid without correction), not supported when the
  opposite direction is significant at some condition after a Holm correction over the
  conditions, and **inconclusive** otherwise (including where no test is possible: one seed of a
  claim without a within-run test);
- an ``equivalent`` claim needs its equivalence test (TOST against ``±margin``); a difference that
  is merely not significant is never equivalence.

Adding a claim is one :func:`declare` call in the experiment's module (its :data:`CLAIMS`);
:data:`REGISTRY` lists every declared claim by experiment.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipelines.experiments.common import Claim

ALPHA = 0.05
DIRECTIONS = ("greater", "noninferior", "equivalent")
#: kinds of claim: ``fitting`` claims are about what training fits or learns (a run that cannot
#: learn must never support one); ``gradient`` claims are about gradients at stated steps
KINDS = ("fitting", "gradient", "generalization")


@dataclass(frozen=True)
class Condition:
    """One condition's evidence for a claim.

    ``estimate``: the statistic, signed so that the claim's direction is positive (minus its null
    value: f_p − n_p/n, R_p − R_c, ...). ``p_claim``/``p_opposite``: the within-run one-sided
    p-values, NaN where the evidence has its own test but it could not run, or where it has none
    (then ``se`` gives a z-test, if finite). ``reason``: why this condition cannot decide (empty if
    it can). ``detail``: what was measured, in words.
    """

    label: str
    estimate: float
    detail: str = ""
    p_claim: float = math.nan
    p_opposite: float = math.nan
    se: float = math.nan
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Condition:
        return cls(**{k: (math.nan if v is None and k in ("estimate", "p_claim", "p_opposite", "se") else v)
                      for k, v in d.items()})


@dataclass(frozen=True)
class ClaimSpec:
    """The declaration of one claim (see the module docstring)."""

    key: str
    statement: str
    paper: str
    where: str
    statistic: str
    window: str
    direction: str
    test: str
    evidence: Callable[..., list[Condition]] = field(compare=False, repr=False)
    margin: float = 0.0
    kind: str = "gradient"
    conditions: str = "every noise level"
    alpha: float = ALPHA

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"claim {self.key}: direction {self.direction!r} is not one of {DIRECTIONS}")
        if self.kind not in KINDS:
            raise ValueError(f"claim {self.key}: kind {self.kind!r} is not one of {KINDS}")
        if self.direction == "equivalent" and not self.margin > 0:
            raise ValueError(f"claim {self.key}: an equivalence claim needs a margin > 0")

    def measure(self, inputs) -> list[Condition]:
        """The evidence of one run: the declared evidence function on ``inputs`` (with the margin)."""
        return list(self.evidence(inputs, margin=self.margin))


#: experiment name -> claim key -> declaration
REGISTRY: dict[str, dict[str, ClaimSpec]] = {}


def declare(experiment: str, *specs: ClaimSpec) -> tuple[ClaimSpec, ...]:
    """Register ``specs`` as the claims of ``experiment`` (a key declared twice is a bug)."""
    table = REGISTRY.setdefault(experiment, {})
    for spec in specs:
        if spec.key in table and table[spec.key] is not spec:
            raise ValueError(f"claim {spec.key!r} of {experiment!r} is declared twice")
        table[spec.key] = spec
    return specs


# ------------------------------------------------------------------------------------------ tests
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


def directional(p_claim: Sequence[float], p_opposite: Sequence[float], *, alpha: float = ALPHA) -> bool | None:
    """The verdict from one-sided p-values per condition: True if every ``p_claim`` < ``alpha``
    (intersection-union test); False if a Holm-corrected ``p_opposite`` is < ``alpha`` somewhere;
    None otherwise, including where a p-value is missing."""
    if any(q < alpha for q in holm(p_opposite) if math.isfinite(q)):
        return False
    if p_claim and all(math.isfinite(q) and q < alpha for q in p_claim):
        return True
    return None


def _sf(z: float, df: float | None) -> float:
    """P(Z > z): standard normal (``df`` None) or Student t with ``df`` degrees of freedom."""
    if df is None:
        return 0.5 * math.erfc(z / math.sqrt(2))
    from scipy.stats import t

    return float(t.sf(z, df))


def location_test(direction: str, d: float, se: float, margin: float, df: float | None = None) -> tuple[float, float]:
    """One-sided (claim, opposite) p-values of an estimate ``d`` with standard error ``se``.

    ``greater``: d > margin vs d < margin; ``noninferior``: d > −margin vs d < −margin;
    ``equivalent``: TOST of |d| < margin (the larger of the two one-sided p-values) vs |d| > margin.
    z-tests, or t-tests with ``df`` degrees of freedom. NaN if ``d`` or ``se`` is unusable.
    """
    if not (math.isfinite(d) and math.isfinite(se) and se > 0):
        return math.nan, math.nan
    if direction == "equivalent":
        return max(_sf((d + margin) / se, df), _sf((margin - d) / se, df)), _sf((abs(d) - margin) / se, df)
    z = (d - margin) / se if direction == "greater" else (d + margin) / se
    return _sf(z, df), _sf(-z, df)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, int]:
    """Mean and half-width of the two-sided ``level`` t-interval of ``values`` (finite ones), and n.

    Half-width NaN below two values.
    """
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if x.size == 0:
        return math.nan, math.nan, 0
    if x.size < 2:
        return float(x[0]), math.nan, 1
    from scipy.stats import t

    se = float(x.std(ddof=1) / math.sqrt(x.size))
    return float(x.mean()), float(t.ppf(0.5 + level / 2, x.size - 1) * se), int(x.size)


# ----------------------------------------------------------------------------------------- verdicts
def _p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return "< 1e-16" if p < 1e-16 else f"{p:.3g}"


def _g(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else "n/a"


def _rule(spec: ClaimSpec) -> str:
    what = {"greater": f"estimate > {spec.margin:g}" if spec.margin else "estimate > 0",
            "noninferior": f"estimate > −{spec.margin:g}",
            "equivalent": f"|estimate| < {spec.margin:g} (TOST)"}[spec.direction]
    return (f"supported if {what} is significant (one-sided, α = {spec.alpha}) at {spec.conditions}; not supported "
            "if the opposite is significant somewhere after Holm over the conditions; otherwise inconclusive")


def _verdict(spec: ClaimSpec, conds: list[Condition], p_claim, p_opp, parts, test: str) -> Claim:
    reasons = [f"{c.label}: {c.reason}" for c in conds if c.reason]
    verdict = directional(p_claim, p_opp, alpha=spec.alpha) if conds else None
    measured = "; ".join(parts) if parts else "no condition to test"
    if verdict is None:
        why = reasons or ([] if conds else ["no condition the claim is made for was run"])
        if why:
            measured += " — inconclusive: " + "; ".join(why)
    finite = [q for q in p_claim if math.isfinite(q)]
    iut = max(p_claim) if p_claim and len(finite) == len(p_claim) else math.nan
    opp = [q for q in holm(p_opp) if math.isfinite(q)]
    return Claim(spec.statement, f"{spec.paper} {spec.where}", measured, verdict,
                 statistic=f"{spec.statistic} ({spec.window})", test=f"{test}; {_rule(spec)}",
                 p_claim=iut, p_opposite=min(opp) if opp else math.nan, key=spec.key, kind=spec.kind)


def judge(spec: ClaimSpec, conds: Sequence[Condition]) -> Claim:
    """The verdict of one run (one seed) on the within-run tests of its conditions."""
    used, p_claim, p_opp, parts = [], [], [], []
    for c in conds:
        g, l_ = c.p_claim, c.p_opposite
        if not (math.isfinite(g) or math.isfinite(l_)) and not c.reason:
            g, l_ = location_test(spec.direction, c.estimate, c.se, spec.margin)
            if not math.isfinite(g):
                c = Condition(c.label, c.estimate, c.detail, reason="no within-run test of this statistic (one "
                              "seed gives no uncertainty): run with --seeds >= 2")
        used.append(c)
        p_claim.append(g)
        p_opp.append(l_)
        se = f" ± {_g(c.se)} (SE)" if math.isfinite(c.se) else ""
        parts.append(f"{c.label}: {c.detail or 'estimate ' + _g(c.estimate)}{se}, p (claim) = {_p(g)}, "
                     f"p (opposite) = {_p(l_)}")
    return _verdict(spec, used, p_claim, p_opp, parts, f"one run: {spec.test}")


def judge_seeds(spec: ClaimSpec, per_seed: Sequence[Sequence[Condition]]) -> Claim:
    """The verdict across seeds: per condition a one-sided t-test of the per-seed estimates.

    Conditions are matched by label; a condition missing from a seed, or with a non-finite
    estimate there, is left out of that condition's test (the number of seeds used is shown).
    """
    if len(per_seed) == 1:
        return judge(spec, per_seed[0])
    labels: list[str] = []
    for conds in per_seed:
        labels += [c.label for c in conds if c.label not in labels]
    conds_out, p_claim, p_opp, parts = [], [], [], []
    for label in labels:
        values = [c.estimate for conds in per_seed for c in conds if c.label == label]
        mean, half, n = t_interval(values)
        reason = ""
        if n < 2:
            reason = f"{n} seed(s) with a finite estimate: no across-seed test"
            g = l_ = math.nan
        else:
            se = float(np.std([v for v in values if math.isfinite(v)], ddof=1) / math.sqrt(n))
            g, l_ = location_test(spec.direction, mean, se, spec.margin, df=n - 1)
            if not math.isfinite(g):
                reason = "the estimate does not vary across seeds: no across-seed test"
        conds_out.append(Condition(label, mean, reason=reason))
        p_claim.append(g)
        p_opp.append(l_)
        parts.append(f"{label}: estimate {_g(mean)} ± {_g(half)} (95% t-interval over {n} seeds), "
                     f"p (claim) = {_p(g)}, p (opposite) = {_p(l_)}")
    test = (f"across {len(per_seed)} seeds: one-sided t-test of the per-seed estimates (df = n − 1); each seed's "
            f"estimate as in one run ({spec.test})")
    return _verdict(spec, conds_out, p_claim, p_opp, parts, test)


def measure_all(specs: Sequence[ClaimSpec], inputs: dict[str, Any]) -> dict[str, list[Condition]]:
    """The evidence of every declared claim whose inputs the run produced (keyed by claim key)."""
    return {spec.key: spec.measure(inputs[spec.key]) for spec in specs if spec.key in inputs}


def judge_all(specs: Sequence[ClaimSpec], evidence: Sequence[dict[str, list[Condition]]]) -> list:
    """Every claim with evidence, judged on one run or across the seeds in ``evidence``."""
    out = []
    for spec in specs:
        per_seed = [ev[spec.key] for ev in evidence if spec.key in ev]
        if per_seed:
            out.append(judge_seeds(spec, per_seed))
    return out
