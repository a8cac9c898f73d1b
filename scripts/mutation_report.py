"""Per-module mutation scores from mutmut's work folder (``make mutate`` prints them last).

mutmut 3 prints one total; the issue asks for a score per module. Each mutated file has a
``mutants/<path>.meta`` (JSON) with the exit code of every mutant's test run; mutmut's own
table turns exit codes into statuses, so this script counts exactly what ``mutmut results``
would show. ``--survivors`` lists the mutants that were not killed, by module.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

# Statuses that mean a test noticed the mutant: a failing test, or a run that never ended.
CAUGHT = ("killed", "timeout")


def module_results(mutants: Path) -> dict[str, dict[str, str]]:
    """{module path: {mutant name: status}} for every mutated file mutmut recorded."""
    out: dict[str, dict[str, str]] = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        if codes:
            module = meta.relative_to(mutants).as_posix().removesuffix(".meta")
            out[module] = {name: status_by_exit_code[code] for name, code in codes.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mutants", type=Path, default=Path("mutants"), help="mutmut's work folder")
    p.add_argument("--survivors", action="store_true", help="list mutants that were not caught")
    p.add_argument(
        "--fail-under", type=float, default=None, help="exit 1 if a module scores below this %%"
    )
    args = p.parse_args(argv)
    results = module_results(args.mutants)
    if not results:
        print(f"no mutmut results under {args.mutants}/ (run `make mutate`)", file=sys.stderr)
        return 2
    width = max(len(m) for m in results)
    print(f"{'module':<{width}}  caught / total   score  (killed, timeout, survived, other)")
    low = []
    for module, statuses in results.items():
        n = Counter(statuses.values())
        caught = sum(n[s] for s in CAUGHT)
        total = len(statuses)
        other = total - caught - n["survived"]
        score = 100.0 * caught / total
        print(
            f"{module:<{width}}  {caught:>6} / {total:<5} {score:6.1f}%  "
            f"({n['killed']}, {n['timeout']}, {n['survived']}, {other})"
        )
        if args.fail_under is not None and score < args.fail_under:
            low.append(module)
    if args.survivors:
        for module, statuses in results.items():
            left = sorted(name for name, s in statuses.items() if s not in CAUGHT)
            if left:
                print(f"\n{module}: {len(left)} not caught")
                for name in left:
                    print(f"  {name}: {statuses[name]}")
    if low:
        print(f"below {args.fail_under:g}%: {', '.join(low)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
