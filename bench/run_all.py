"""Run every benchmark in bench/, one after the other, then rebuild the results section of bench/README.md.

A benchmark is any `bench/*.py` but this file, `common.py` and `lockstep.py`; each runs as `python bench/<name>.py [--quick]` from
the repository root, writes bench/results/<name>.json and prints its `target` lines (see `common`). They run one at
a time because each measures the machine. The README section (machine, versions, date, the targets table and the
`target` lines) is rebuilt from every results JSON, so a benchmark that was not run keeps its last results, dated.

Usage: python bench/run_all.py [--quick] [--only NAME ...] [--readme-only]
Exit status 1 when a benchmark failed to run (a missed target is a result, not a failure).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from common import BENCH_DIR, README, REPO_ROOT, read_results, rewrite_readme, target_passed

HELPERS = {"common", "lockstep", "run_all"}


def benchmark_names() -> list[str]:
    return sorted(path.stem for path in BENCH_DIR.glob("*.py") if path.stem not in HELPERS)


def run_benchmark(name: str, quick: bool) -> tuple[int, float]:
    """Run bench/<name>.py with its output streaming through; returns (exit status, seconds)."""
    command = [sys.executable, str(BENCH_DIR / f"{name}.py"), *(["--quick"] if quick else [])]
    print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    status = subprocess.run(command, cwd=REPO_ROOT).returncode
    return status, time.perf_counter() - started


def main() -> None:
    names = benchmark_names()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("--only", nargs="+", choices=names, default=names, help="run only these benchmarks")
    parser.add_argument("--readme-only", action="store_true", help="rebuild bench/README.md from the results only")
    args = parser.parse_args()

    outcomes = {} if args.readme_only else {name: run_benchmark(name, args.quick) for name in args.only}
    rewrite_readme()
    print(f"\n=== summary (results table rebuilt in {README.relative_to(REPO_ROOT)})")
    for name, (status, seconds) in outcomes.items():
        print(f"{name:<24} {'ok' if status == 0 else f'FAILED (exit {status})':<16} {seconds:6.0f} s")
    for result in read_results():
        for target in result.get("targets", []):
            verdict = "PASS" if target_passed(target) else "MISS"
            print(f"{result.get('benchmark', result['_file'])}: target {target['name']} {verdict}")
    if any(status != 0 for status, _ in outcomes.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
