"""Mutation score per module from a finished (or partial) ``mutmut run``: ``python benchmarks/mutation_score.py [ROOT]``.

Reads ``ROOT/mutants/**/*.py.meta`` (ROOT defaults to the current folder)
and prints one Markdown row per mutated module: mutants tested, killed,
survived, timed out, not reached by any test, not yet tested, and the score
killed / (killed + survived). Timeouts count as neither (a mutant that makes
a loop run forever is caught, but by the clock rather than an assertion).
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

KILLED = {1, 3}
SURVIVED = {0}
TIMEOUT = {36, 24, -24, 152, 255}
NO_TESTS = {5, 33}


def score(meta: Path) -> Counter:
    codes = json.loads(meta.read_text())["exit_code_by_key"].values()
    c: Counter = Counter()
    for code in codes:
        c["killed" if code in KILLED else "survived" if code in SURVIVED else "timeout" if code in TIMEOUT
          else "no tests" if code in NO_TESTS else "not checked" if code is None else "other"] += 1
    return c


def main(root: str = ".") -> None:
    metas = sorted((Path(root) / "mutants").rglob("*.py.meta"))
    print("| module | mutants | killed | survived | timeout | no tests | not checked | score |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for meta in metas:
        c = score(meta)
        if not sum(c.values()):
            continue
        module = str(meta.relative_to(Path(root) / "mutants"))[:-len(".meta")]
        tested = c["killed"] + c["survived"]
        pct = f"{100 * c['killed'] / tested:.1f}%" if tested else "-"
        print(f"| {module} | {sum(c.values())} | {c['killed']} | {c['survived']} | {c['timeout']} "
              f"| {c['no tests']} | {c['not checked']} | {pct} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
