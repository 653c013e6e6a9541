#!/usr/bin/env python
"""Record, or replay, the solver regression runs of tests/regression/cases.py.

    python tests/regression/record_solver_runs.py            # record: writes tests/regression/solver_runs.json
    python tests/regression/record_solver_runs.py --replay   # replay against the record; exit 1 on a difference

Record once from the code before a restructuring of the solvers; tests/test_solver_regression.py
replays. Both re-execute themselves in the pinned floating-point environment (cases.PINNED_ENV).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))
import cases as C  # noqa: E402

RECORD = HERE / "solver_runs.json"


def run(case: dict, legacy: dict):
    import diffrender.solvers as S

    problem, x0 = C.build_problem(case)
    solver = getattr(S, case["solver"])(**case["options"], **legacy.get(case["solver"], {}))
    return solver.solve(problem, x0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replay", action="store_true")
    ap.add_argument("--legacy", default="{}", help="JSON: per solver class, options that restore the recorded "
                                                   "behaviour where a default changed since")
    args = ap.parse_args()
    if not C.pinned():
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **C.PINNED_ENV})
    import torch

    legacy = json.loads(args.legacy)
    if args.replay:
        record = json.loads(RECORD.read_text())
        failures = 0
        for case_id, case in record["runs"].items():
            problems = C.compare(case, C.trace(run(case, legacy)))
            failures += bool(problems)
            for p in problems:
                print(f"FAIL {case_id}: {p}")
        print(f"replayed {len(record['runs'])} runs recorded at {record['commit'][:10]}: {failures} differ")
        sys.exit(1 if failures else 0)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    runs = {}
    for case in C.cases():
        result = run(case, legacy)
        runs[case["id"]] = {**case, **C.trace(result)}
        print(f"{case['id']:24s} {result.termination:22s} its {result.iterations:4d} cost {result.cost:.6e}")
    out = {"commit": commit, "torch": torch.__version__, "env": C.PINNED_ENV,
           "note": "recorded from the solver code of this commit (solvers/, linalg/, problem.py as of 86f1698)",
           "runs": runs}
    RECORD.write_text(json.dumps(out, indent=0))


if __name__ == "__main__":
    main()
