"""What every experiment setting may be: the type and range of each key of its TOML configuration.

:data:`SCHEMAS` maps an experiment name (``gradstore run NAME``; ``demo`` for ``gradstore demo``)
to a :class:`Schema`: a table of key -> :class:`Rule` (a nested dict for a TOML table such as
``[capture]``) and the :class:`Relation` s between keys. :func:`pipelines.experiments.config.load_config`
checks the merged configuration against it before any work starts, so a wrong value is refused
with one line naming the file, the key and what is allowed, not after hours of training.

Adding an experiment is adding its entry to :data:`SCHEMAS` (and its TOML defaults); every key of
the defaults needs a rule (``tests/test_config_schema.py`` checks this).
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: sizes of the full MNIST training and test sets (the largest data an experiment can sample from)
N_TRAIN_MAX = 60_000
N_TEST_MAX = 10_000
#: largest seed accepted (numpy's default_rng refuses negative seeds)
MAX_SEED = 2**31 - 1
#: most permutations per permutation test (p-values resolve to 1e-5; the papers use 1000)
MAX_NULLS = 100_000
#: metrics that need pairwise products (the Gram blocks, sampled coordinates or projections)
PAIRWISE_METRICS = ("stiffness", "confusion", "easy_hard", "minibatch")


@dataclass(frozen=True)
class Rule:
    """What one setting allows.

    Parameters
    ----------
    allowed : str or callable
        A noun phrase for the error message ("an integer >= 1"); a callable is evaluated only
        when needed (for lists of names that live in modules importing torch).
    accepts : callable
        ``accepts(value) -> bool``.
    must : str, optional
        The whole requirement as a verb phrase, when "be <allowed>" does not read well.
    """

    allowed: str | Callable[[], str]
    accepts: Callable[[Any], bool]
    must: str | Callable[[], str] | None = None

    def describe(self) -> str:
        """The allowed values, as a noun phrase."""
        return self.allowed() if callable(self.allowed) else self.allowed

    def requirement(self) -> str:
        """What the setting must do, as a verb phrase ("be an integer >= 1")."""
        if self.must is None:
            return f"be {self.describe()}"
        return self.must() if callable(self.must) else self.must


@dataclass(frozen=True)
class Relation:
    """A rule across several keys, checked once each key passed its own rule.

    ``keys`` are key paths (tuples, e.g. ``("split", "learned_by")``); ``holds(config)`` says whether
    the merged configuration satisfies it; ``must`` completes "<first key> must ...".
    """

    keys: tuple[tuple[str, ...], ...]
    must: str
    holds: Callable[[dict[str, Any]], bool]


@dataclass(frozen=True)
class Schema:
    """The rules of one experiment: ``keys`` (key -> Rule or nested table) and ``relations``."""

    keys: dict[str, Any]
    relations: tuple[Relation, ...] = field(default_factory=tuple)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _bounds(lo, hi, *, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return ""


def integer(lo: int | None = None, hi: int | None = None, *, note: str = "") -> Rule:
    """An integer (not a bool, not a float such as 2.0) in ``[lo, hi]``; ``note`` explains a bound."""
    text = " ".join(part for part in ("an integer", _bounds(lo, hi), note) if part)
    return Rule(text, lambda v: _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi))


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> Rule:
    """A finite number (integer or float, not a bool) between ``lo`` and ``hi``."""
    def accepts(v):
        if not _is_number(v):
            return False
        above = lo is None or (v > lo if lo_open else v >= lo)
        below = hi is None or (v < hi if hi_open else v <= hi)
        return above and below

    text = " ".join(part for part in ("a finite number", _bounds(lo, hi, lo_open=lo_open, hi_open=hi_open)) if part)
    return Rule(text, accepts)


def boolean(*, only: bool | None = None, note: str = "") -> Rule:
    """``true`` or ``false``; with ``only``, just that value (``note`` says why)."""
    if only is None:
        return Rule("true or false", lambda v: isinstance(v, bool))
    text = " ".join(part for part in (str(only).lower(), note) if part)
    return Rule(text, lambda v: v is only)


def choice(names: Callable[[], Sequence[str]]) -> Rule:
    """One of the strings ``names()`` (a callable, so that the names are looked up only when used)."""
    return Rule(lambda: "one of " + ", ".join(names()), lambda v: isinstance(v, str) and v in names())


def list_of(item: Rule, *, distinct: Callable[[Any], Any] | None = None, distinct_note: str = "",
            including: str | None = None, note: str = "") -> Rule:
    """A non-empty list whose every value satisfies ``item``.

    Parameters
    ----------
    item : Rule
        The rule of each value.
    distinct : callable, optional
        Values must differ by this key (e.g. ``str``, or a run folder's name).
    distinct_note : str
        How they must differ, when ``distinct`` is not plain equality.
    including : str, optional
        A value the list must contain.
    note : str
        Why ``including`` is needed.
    """
    def accepts(v):
        if not isinstance(v, list) or not v or not all(item.accepts(x) for x in v):
            return False
        if distinct is not None and len({distinct(x) for x in v}) != len(v):
            return False
        return including is None or including in v

    def allowed():
        values = f"values that {distinct_note}" if distinct_note else ("distinct values" if distinct else "values")
        return f"a non-empty list of {values}, each {item.describe()}"

    must = None
    if including is not None:
        must = lambda: f"include '{including}'{' ' + note if note else ''} and be {allowed()}"  # noqa: E731
    return Rule(allowed, accepts, must)


# --- the names some settings choose from (looked up when a message or a check needs them) -----------

def _models() -> list[str]:
    from pipelines.models import MODELS

    return sorted(MODELS)


def _metrics() -> tuple[str, ...]:
    from analysis.report import METRICS

    return METRICS


def _optimizers() -> list[str]:
    from pipelines.experiments.median_of_means import LABELS

    return list(LABELS)


def _split_rules() -> tuple[str, ...]:
    from pipelines.experiments.easy_hard import RULES

    return RULES


# --- rules shared by several experiments --------------------------------------------------------------

def _run_folder(noise: float) -> str:
    return f"{noise:.2f}"  # experiments name a noise level's folder noise-<p:.2f>


SEED = integer(0, MAX_SEED)
LR = number(0, lo_open=True)
BATCH_SIZE = integer(1, N_TRAIN_MAX, note="(the full MNIST training set)")
STEPS = integer(1)
EVAL_EVERY = integer(1)
MODEL = choice(_models)
NOISE = number(0, 1)
NOISE_LEVELS = list_of(NOISE, distinct=_run_folder,
                       distinct_note="differ when rounded to 2 decimals (they name the run folders noise-<p>)")
TRACKED_TRAIN = integer(2, N_TRAIN_MAX, note="(coherence compares examples; the full MNIST has 60000)")
TRACKED_TEST = integer(0, N_TEST_MAX, note="(the full MNIST test set)")

CAPTURE = {
    "tracked_train": TRACKED_TRAIN,
    "tracked_test": TRACKED_TEST,
    "coords_per_layer": integer(0),
    "moments_examples": integer(0, N_TRAIN_MAX, note="(the full MNIST training set)"),
    "projection_dim": integer(0),
    "gram": boolean(),
    "log_until": integer(1),
    "log_points": integer(1),
    "every": integer(1),
}
NULLS = integer(0, MAX_NULLS)
METRICS = list_of(choice(_metrics), distinct=str, including="coherence", note="(the report's tables use it)")
ANALYSIS = {"nulls": NULLS, "seed": SEED, "metrics": METRICS}


def _has_pairwise_source(config: dict[str, Any]) -> bool:
    cap = config["capture"]
    wanted = set(PAIRWISE_METRICS) & set(config["analysis"]["metrics"])
    return not wanted or cap["gram"] or cap["coords_per_layer"] > 0 or cap["projection_dim"] > 0


PAIRWISE = Relation(
    keys=(("analysis", "metrics"), ("capture", "gram"), ("capture", "coords_per_layer"), ("capture", "projection_dim")),
    must=f"leave out {', '.join(PAIRWISE_METRICS)} unless [capture] stores pairwise products "
         "(gram = true, coords_per_layer > 0 or projection_dim > 0)",
    holds=_has_pairwise_source,
)


def _sweep(**extra) -> Schema:
    """Label noise and the optimizer sweeps: one model, several noise levels, a run store each."""
    keys = {"model": MODEL, "noise_levels": NOISE_LEVELS, "seed": SEED, "lr": LR, "batch_size": BATCH_SIZE,
            "steps": STEPS, "eval_every": EVAL_EVERY, "capture": CAPTURE, "analysis": ANALYSIS}
    relations = extra.pop("relations", ())
    return Schema({**keys, **extra}, (PAIRWISE, *relations))


#: label-noise only: every step 0..N captured too (Fig. 3 of Coherent Gradients reads the first 10 steps)
LABEL_NOISE = _sweep(capture={**CAPTURE, "every_step_until": integer(0, note="(0: none)")})

WINSORIZE = _sweep(
    c_values=list_of(integer(0), distinct=int),
    relations=(Relation(
        keys=(("c_values",), ("batch_size",)),
        must="leave at least 2c + 1 examples in a minibatch for every c (2 * max(c_values) + 1 <= batch_size)",
        holds=lambda config: 2 * max(config["c_values"]) + 1 <= config["batch_size"],
    ),),
)

MEDIAN_OF_MEANS = _sweep(
    optimizers=list_of(choice(_optimizers), distinct=str, including="sgd", note="(the baseline)"),
)

EASY_HARD = Schema(
    keys={
        "model": MODEL, "noise": NOISE, "seed": SEED, "lr": LR, "batch_size": BATCH_SIZE, "steps": STEPS,
        "eval_every": EVAL_EVERY,
        "split": {
            "rules": list_of(choice(_split_rules), distinct=str),
            "learned_by": integer(0),
            "fit_fraction": number(0, 1, lo_open=True, hi_open=True),
        },
        "retrain": {"steps": STEPS, "seed_offset": SEED},
        "capture": {**CAPTURE, "gram": boolean(only=True, note="(the easy/hard coherence uses the exact Gram blocks)")},
        "analysis": {"nulls": NULLS, "seed": SEED},
    },
    relations=(Relation(
        keys=(("split", "learned_by"), ("steps",)),
        must="be at most steps (the snapshot: phase 1 ends there)",
        holds=lambda config: config["split"]["learned_by"] <= config["steps"],
    ),),
)

COHERENCE_EVOLUTION = Schema(keys={
    "models": list_of(choice(_models), distinct=str),
    "noise_levels": NOISE_LEVELS,
    "seed": SEED,
    "lr": LR,
    "batch_size": BATCH_SIZE,
    "epochs": integer(1),
    "eval_every": integer(0, note="(0: evaluate only where a capture runs)"),
    "evaluate_captures": boolean(),
    "train_examples": integer(0, N_TRAIN_MAX, note="(0: the whole training set)"),
    "test_examples": integer(0, N_TEST_MAX, note="(0: the whole test set)"),
    "capture": {
        "tracked_train": TRACKED_TRAIN,
        "tracked_test": TRACKED_TEST,
        "moments_examples": integer(0, N_TRAIN_MAX, note="(the full MNIST training set; 0: no second sample)"),
        "first_epoch_every": integer(1),
        "prime_batches": integer(1),
        "prime_batch_size": integer(2, N_TRAIN_MAX, note="(BatchNorm statistics need 2 examples or more)"),
    },
}, relations=(Relation(
    keys=(("eval_every",), ("evaluate_captures",)),
    must="be at least 1 when evaluate_captures = false (else the run is evaluated only at its end)",
    holds=lambda config: config["evaluate_captures"] or config["eval_every"] >= 1,
),))

#: experiment name -> its schema (``demo`` runs the label-noise experiment)
SCHEMAS: dict[str, Schema] = {
    "demo": LABEL_NOISE,
    "label-noise": LABEL_NOISE,
    "winsorize": WINSORIZE,
    "median-of-means": MEDIAN_OF_MEANS,
    "easy-hard": EASY_HARD,
    "coherence-evolution": COHERENCE_EVOLUTION,
}


# --- checking ------------------------------------------------------------------------------------------

def show(value: Any, limit: int = 60) -> str:
    """``value`` written as in a TOML file, on one line of at most about ``limit`` characters."""
    text = _toml(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # quoted, with every control and non-ASCII character escaped
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key_name(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return json.dumps(str(value))


def key_name(key: str) -> str:
    """A TOML key as written in a file: bare when it can be, else quoted and escaped."""
    bare = key and all(c.isascii() and (c.isalnum() or c in "-_") for c in key)
    return key if bare else json.dumps(key)


def shown_key(path: Sequence[str]) -> str:
    """``("capture", "every")`` -> ``[capture] every``; ``("seed",)`` -> ``seed``."""
    *tables, key = path
    return "".join(f"[{key_name(t)}] " for t in tables) + key_name(key)


def _get(config: dict[str, Any], path: Sequence[str]) -> Any:
    for key in path:
        config = config[key]
    return config


def _rules(table: dict[str, Any], prefix: tuple[str, ...] = ()):
    """Every (key path, Rule) of a schema table, depth first."""
    for key, rule in table.items():
        if isinstance(rule, dict):
            yield from _rules(rule, prefix + (key,))
        else:
            yield prefix + (key,), rule


def problems(schema: Schema, config: dict[str, Any]) -> list[tuple[tuple[tuple[str, ...], ...], str]]:
    """Every setting of ``config`` that ``schema`` refuses, as (key paths involved, message after the file).

    ``config`` must hold exactly the schema's keys (``load_config`` refuses unknown ones). A relation
    is checked only when every key it involves passed its own rule.
    """
    found, bad = [], set()
    for path, rule in _rules(schema.keys):
        value = _get(config, path)
        if not rule.accepts(value):
            bad.add(path)
            found.append(((path,), f"{shown_key(path)} = {show(value)} is not allowed: "
                                   f"{shown_key(path)} must {rule.requirement()}"))
    for relation in schema.relations:
        if bad.intersection(relation.keys) or relation.holds(config):
            continue
        settings = ", ".join(f"{shown_key(p)} = {show(_get(config, p))}" for p in relation.keys)
        found.append((relation.keys, f"{settings} do not fit together: {shown_key(relation.keys[0])} "
                                     f"must {relation.must}"))
    return found


def check_keys(schema: Schema, config: dict[str, Any], prefix: tuple[str, ...] = ()) -> None:
    """Fail loudly (a programming error, not bad input) if ``config`` and ``schema`` have other keys."""
    table = _get(schema.keys, prefix) if prefix else schema.keys
    if set(table) != set(config):
        raise KeyError(f"the schema of {shown_key(prefix) if prefix else 'the experiment'} covers "
                       f"{sorted(table)} but the defaults have {sorted(config)}; "
                       "update pipelines/experiments/schema.py")
    for key, value in config.items():
        if isinstance(table[key], dict):
            check_keys(schema, value, prefix + (key,))
