"""What the benchmarks in bench/ share: the machine they ran on, step timing on two clocks, the matmul ceiling,
`target` lines, the results JSON and the results section of bench/README.md.

A benchmark is `bench/<name>.py`, runs as `python bench/<name>.py [--quick]`, writes bench/results/<name>.json
(`write_result`) with at least `{"benchmark", "quick", "machine", "targets"}`, and ends by printing one line per
target, `target <name>: <measured> (goal <goal>) PASS|MISS` (`Target.line`). A target's JSON is
`{"name", "measured", "goal", "passed"}`; `goal` is a string with its comparison (">= 1.0") or a bare number, which
means "at least" (older scripts write `"pass"` for `"passed"`; both are read). `bench/run_all.py` runs them all and
rebuilds the README section from the JSON files with `rewrite_readme`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from vlp_lightning.hardware import cpu_has_native_bf16, cpu_model

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"
README_BEGIN = "<!-- results: rebuilt by `python bench/run_all.py` from bench/results/*.json; edits here are lost -->"
README_END = "<!-- end of results -->"
#: packages whose versions a result records.
PACKAGES = ("torch", "lightning", "timm", "transformers", "open_clip_torch", "webdataset")


# ---------------------------------------------------------------------------------------------------- machine
def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """What a result depends on: CPU, cores, the load other jobs put on them, versions, date."""
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "native_bf16": cpu_has_native_bf16(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_1min": os.getloadavg()[0],
        "python": platform.python_version(),
        **{name: package_version(name) for name in PACKAGES},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Instant:
    """A moment on both clocks: wall time, and the CPU time this process (all its threads) has used so far.

    On a shared machine the CPU clock leaves out the time other jobs hold the cores, so it is the steadier measure
    of how fast a training loop is; the wall clock is what a user waits, and the only one that sees waiting.
    """

    wall: float
    cpu: float

    @classmethod
    def now(cls) -> Instant:
        return cls(time.perf_counter(), time.process_time())


@dataclass(frozen=True)
class StepTime:
    """One training step, from the end of the previous step to the end of this one (so getting its batch counts).

    `data_wait` is the wall time from the end of the previous step until this step's batch was in hand.
    """

    wall: float
    cpu: float
    data_wait: float

    @classmethod
    def between(cls, previous_end: Instant, batch_ready: Instant, end: Instant) -> StepTime:
        return cls(end.wall - previous_end.wall, end.cpu - previous_end.cpu, batch_ready.wall - previous_end.wall)


CLOCKS = ("cpu", "wall")


def step_summary(steps: list[StepTime], batch_size: int) -> dict:
    """Median step time and samples/s on both clocks, and the share of wall time spent waiting for data."""
    if not steps:
        raise ValueError("no timed steps to summarise")
    summary: dict = {"timed_steps": len(steps), "batch_size": batch_size}
    for clock in CLOCKS:
        median = statistics.median(getattr(step, clock) for step in steps)
        summary[f"median_step_{clock}_s"] = median
        summary[f"samples_per_s_{clock}"] = batch_size / median
    summary["data_wait_fraction"] = sum(step.data_wait for step in steps) / sum(step.wall for step in steps)
    return summary


def matmul_ceiling(dtype: torch.dtype, size: int = 1024, min_seconds: float = 1.0) -> dict[str, float]:
    """Best FLOP/s of a [size, size] @ [size, size] matmul in `dtype` with the current thread count, on each clock.

    The suite's `measure_matmul_ceiling` (what `ThroughputMonitor` divides by) times the wall clock only; a
    benchmark that reports CPU-clock step times needs the ceiling on the same clock, so that MFU compares like with
    like. Best of repeats over `min_seconds`, so short interruptions by other jobs drop out.
    """
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    torch.matmul(a, b)
    best = dict.fromkeys(CLOCKS, 0.0)
    deadline = time.perf_counter() + min_seconds
    while time.perf_counter() < deadline:
        start = Instant.now()
        torch.matmul(a, b)
        end = Instant.now()
        for clock in CLOCKS:
            elapsed = getattr(end, clock) - getattr(start, clock)
            if elapsed > 0:
                best[clock] = max(best[clock], 2 * size**3 / elapsed)
    return best

# ---------------------------------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    """A goal a benchmark checks: `measured` compared with `goal` (`>=` or `<=`); no measurement is a miss."""

    name: str
    measured: float | None
    goal: float
    comparison: str = ">="

    @property
    def passed(self) -> bool:
        if self.measured is None:
            return False
        return self.measured >= self.goal if self.comparison == ">=" else self.measured <= self.goal

    def line(self) -> str:
        shown = "n/a" if self.measured is None else f"{self.measured:.3g}"
        return f"target {self.name}: {shown} (goal {self.comparison} {self.goal:g}) {'PASS' if self.passed else 'MISS'}"

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "measured": self.measured,
            "goal": f"{self.comparison} {self.goal:g}",
            "passed": self.passed,
        }


def write_result(name: str, report: dict, path: Path | None = None) -> Path:
    """Write bench/results/<name>.json, or `path` (with `benchmark` and `machine` filled in when the report has
    none)."""
    path = path or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    full = {"benchmark": name, "machine": machine(), **report}
    path.write_text(json.dumps(full, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------- README
def publish(name: str, report: dict, targets: list[Target]) -> Path:
    """Write `report` (with its `seconds`) and its targets as bench/results/<name>.json, say where, then print every
    target line (the README's results table reads the targets from the JSON)."""
    report = {**report, "targets": [target.as_dict() for target in targets]}
    path = write_result(name, report)
    print(f"\nwrote {path} ({report['seconds']:.0f} s)")
    for target in targets:
        print(target.line())
    return path


def read_results(results_dir: Path = RESULTS_DIR) -> list[dict]:
    """Every results JSON (a `benchmark` report; data a bench keeps beside them, such as mined pairs, is left out),
    each with `_file` and `_modified` (the file's UTC mtime, for results without a date)."""
    results = []
    for path in sorted(results_dir.glob("*.json")):
        result = json.loads(path.read_text())
        if "benchmark" not in result:
            continue
        result["_file"] = path.name
        result["_modified"] = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
        results.append(result)
    return results


def _goal_text(goal: object) -> str:
    if isinstance(goal, (int, float)):
        return f">= {goal:g}"
    return str(goal)


def _number(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def target_passed(target: dict) -> bool:
    return bool(target.get("passed", target.get("pass", False)))


def results_markdown(results: list[dict]) -> str:
    """The README section: one row per benchmark run (mode, date, machine, versions), one row per target, and the
    `target` lines as the scripts print them."""
    lines = [
        "| benchmark | mode | date (UTC) | CPU | cores | load | torch | lightning |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        machine_info = result.get("machine", {})
        date = machine_info.get("date") or result["_modified"]
        load = machine_info.get("load_average_1min")
        lines.append(
            f"| {result.get('benchmark', result['_file'])} | {'quick' if result.get('quick') else 'full'} "
            f"| {date.replace('T', ' ')[:16]} | {machine_info.get('cpu') or machine_info.get('processor') or '?'} "
            f"| {machine_info.get('logical_cpus') or machine_info.get('cpus') or '?'} "
            f"| {'?' if load is None else f'{load:.1f}'} | {machine_info.get('torch', '?')} "
            f"| {machine_info.get('lightning') or '?'} |"
        )
    lines += ["", "| benchmark | target | measured | goal | result |", "|---|---|---|---|---|"]
    target_lines = []
    for result in results:
        name = result.get("benchmark", result["_file"])
        for target in result.get("targets", []):
            verdict = "PASS" if target_passed(target) else "MISS"
            measured = "n/a" if target.get("measured") is None else _number(target["measured"])
            goal = _goal_text(target.get("goal"))
            lines.append(f"| {name} | {target['name']} | {measured} | {goal} | {verdict} |")
            target_lines.append(f"target {target['name']}: {measured} (goal {goal}) {verdict}")
    lines += ["", "```", *target_lines, "```"]
    return "\n".join(lines)


def rewrite_readme(readme: Path = README, results_dir: Path = RESULTS_DIR) -> None:
    """Replace the results section of bench/README.md (between the markers; appended when they are missing)."""
    section = f"{README_BEGIN}\n{results_markdown(read_results(results_dir))}\n{README_END}"
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    if README_BEGIN in text and README_END in text:
        before, rest = text.split(README_BEGIN, 1)
        after = rest.split(README_END, 1)[1]
        text = f"{before}{section}{after}"
    else:
        text = f"{text.rstrip()}\n\n## Results\n\n{section}\n"
    readme.write_text(text)


# ---------------------------------------------------------------------------------------------------- data
def ensure_shards(recipes: dict[str, Path]) -> None:
    """Build the shards each recipe names in its header (`# Shards: ...`) when they are missing."""
    import shlex

    from data_modules.builder import main as vlp_data
    from vlp_lightning import catalog

    for command in (command for recipe in recipes.values() for command in catalog.shard_commands(recipe)):
        folder = Path(shlex.split(command)[2])
        if not (REPO_ROOT / folder / "manifest.json").is_file():
            print(f"building {folder}: {command}", flush=True)
            if vlp_data(shlex.split(command)[1:]) != 0:
                raise SystemExit(f"`{command}` failed; build the shards by hand and rerun")
