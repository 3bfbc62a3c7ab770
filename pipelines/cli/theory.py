"""``gradstore theory``: verify the coherence theorems symbolically, through the implementation.

Prints one row per statement of "Making Coherence Out of Nothing At All" (statement, where it is in
the paper, method, result, time) and exits with status 1 if any check fails; ``--json`` prints the
same as a JSON object ``{"passed": bool, "seconds": float, "checks": [...]}``.
"""

from __future__ import annotations

import json
import time

import click


def _table(results) -> str:
    rows = [("statement", "where", "method", "result", "time")]
    for r in results:
        rows.append((r.statement, r.location, r.method, "PASS" if r.passed else "FAIL", f"{r.seconds:.2f}s"))
    limits = (70, 28, 60, 6, 8)
    rows = [tuple(c if len(c) <= w else c[: w - 1] + "…" for c, w in zip(row, limits)) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--check", "names", multiple=True, metavar="NAME",
              help="Run only this check (repeatable); default: all. See --list.")
@click.option("--list", "list_only", is_flag=True, help="List the check names and exit.")
def theory(as_json, names, list_only):
    """Verify the coherence theorems (sympy) against analysis.alpha; exit 1 if any fails."""
    from theory import REGISTRY, run_checks

    if list_only:
        click.echo("\n".join(REGISTRY))
        return
    started = time.perf_counter()
    results = run_checks(list(names) or None)
    elapsed = time.perf_counter() - started
    passed = all(r.passed for r in results)
    if as_json:
        payload = {"passed": passed, "seconds": elapsed, "checks": [r.to_dict() for r in results]}
        click.echo(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        click.echo(_table(results))
        for r in results:
            if not r.passed:
                click.echo(f"FAILED {r.name}: {r.detail}")
        n_ok = sum(r.passed for r in results)
        click.echo(f"{n_ok}/{len(results)} statements verified in {elapsed:.1f} s")
    if not passed:
        raise click.exceptions.Exit(1)
