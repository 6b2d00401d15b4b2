"""Mutation score from a random sample of the untested mutants, for machines where a whole run takes too long.

``make mutate`` tests every mutant: hours on two cores, because each mutant of
the training loop runs small training runs. This script measures the score in
three strata instead, and says how sure the figure is::

    python benchmarks/mutation_sample.py pick --frac 0.1 > plan.json   # after a (partial) mutmut run
    .venv/bin/mutmut run $(python benchmarks/mutation_sample.py names plan.json 0)
    python benchmarks/mutation_sample.py score plan.json               # Markdown table

``pick`` reads ``mutants/**/*.py.meta`` of the current ``mutmut`` folder:

* **known**: mutants already killed keep that result (mutmut keeps a result
  only while the function's source is unchanged, so the mutant is the same);
* **rerun**: every survivor and "no tests" mutant is set back to untested and
  runs again, whole (these are what new tests aim at);
* **sampled**: of the mutants never tested, batch ``k`` of a seeded random
  order, ``ceil(frac * n)`` per module; ``names plan.json K`` prints batch K
  (run batches one after another; ``score`` counts only finished ones).

``score`` estimates each module's killed count as known + rerun killed +
``n_untested * p`` with ``p`` the sample's kill rate, and gives a 95% Wilson
interval for ``p`` carried through. Timeouts count as killed (the tests
caught the mutant, by the clock); "no tests" count as survivors.
"""
from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

KILLED = {1, 3, 36, 24, -24, 152, 255}   # a failing test, or a timeout (see mutation_score.py)
UNTESTED = None


def _metas(root: Path) -> list[Path]:
    return sorted((root / "mutants").rglob("*.py.meta"))


def pick(frac: float, seed: int = 61206, root: Path = Path(".")) -> dict:
    rng = random.Random(seed)
    plan: dict = {"frac": frac, "seed": seed, "modules": {}}
    for meta in _metas(root):
        data = json.loads(meta.read_text())
        codes = data["exit_code_by_key"]
        rerun = sorted(k for k, v in codes.items() if v is not UNTESTED and v not in KILLED)
        for k in rerun:
            codes[k] = UNTESTED          # mutmut tests it again on the next run that names it
        meta.write_text(json.dumps(data))
        rerun_set = set(rerun)
        untested = sorted(k for k, v in codes.items() if v is UNTESTED and k not in rerun_set)
        rng.shuffle(untested)
        module = str(meta.relative_to(root / "mutants"))[:-len(".meta")]
        plan["modules"][module] = {"total": len(codes), "rerun": rerun, "untested": untested}
    return plan


def names(plan: dict, batch: int) -> list[str]:
    """Batch 0 also carries the rerun stratum."""
    out = []
    for m in plan["modules"].values():
        step = math.ceil(len(m["untested"]) * plan["frac"])
        out += (m["rerun"] if batch == 0 else []) + m["untested"][batch * step:(batch + 1) * step]
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def score(plan: dict, root: Path = Path(".")) -> None:
    codes: dict = {}
    for meta in _metas(root):
        codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    print("| module | mutants | known killed | rerun: killed / run | untested | sample: killed / run | "
          "estimated score (95% interval) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for module, m in plan["modules"].items():
        rerun, untested = set(m["rerun"]), m["untested"]
        untested_set = set(untested)
        step = math.ceil(len(untested) * plan["frac"])
        # only whole batches: a batch stopped half-way would favour the mutants mutmut runs first (the fast ones)
        batches = [untested[i:i + step] for i in range(0, len(untested), step)] if step else []
        sample = [n for b in batches if all(codes.get(x) is not UNTESTED for x in b) for n in b]
        own = [k for k in codes if k.startswith(module[:-3].replace("/", ".") + ".")]
        known = sum(1 for k in own if k not in rerun and k not in untested_set and codes[k] in KILLED)
        r_run = [k for k in rerun if codes.get(k) is not UNTESTED]
        r_killed = sum(codes[k] in KILLED for k in r_run)
        s_killed = sum(codes[k] in KILLED for k in sample)
        total = m["total"]
        if len(r_run) < len(rerun) or (untested and not sample):
            print(f"| {module} | {total} | {known} | {r_killed} / {len(r_run)} of {len(rerun)} | {len(untested)} "
                  f"| {s_killed} / {len(sample)} | not finished |")
            continue
        p = s_killed / len(sample) if sample else 0.0
        lo, hi = wilson(s_killed, len(sample)) if sample else (0.0, 0.0)
        base = known + r_killed
        est = (base + len(untested) * p) / total
        est_lo, est_hi = (base + len(untested) * lo) / total, (base + len(untested) * hi) / total
        print(f"| {module} | {total} | {known} | {r_killed} / {len(r_run)} | {len(untested)} | {s_killed} / "
              f"{len(sample)} | {100 * est:.1f}% ({100 * est_lo:.1f}-{100 * est_hi:.1f}%) |")


def main(argv: list[str]) -> None:
    if argv[:1] == ["pick"]:
        frac = float(argv[argv.index("--frac") + 1]) if "--frac" in argv else 0.1
        print(json.dumps(pick(frac), indent=1))
    elif argv[:1] == ["names"]:
        print("\n".join(names(json.loads(Path(argv[1]).read_text()), int(argv[2]))))
    elif argv[:1] == ["score"]:
        score(json.loads(Path(argv[1]).read_text()))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
