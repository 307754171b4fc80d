"""`vlp scaling`: the data-scaling study: a recipe trained on 1/8, 1/4, 1/2 and all of a data pool, its score
against log data size, with a fitted line (Sun et al. 2017, "Revisiting Unreasonable Effectiveness of Data in Deep
Learning Era", sec. 5: performance grows logarithmically with the volume of training data).

    vlp scaling --config experiments/mae/fashion_mnist_tiny.yaml --pool 'data/fashion-mnist/train-*.tar' \\
        --fractions 0.125 0.25 0.5 1 --seeds 1 2 --steps 300 --metric linear_probe/fashion_mnist/top1 \\
        --data.test_shards 'data/fashion-mnist/test-{000000..000009}.tar'

Each fraction F is a class-balanced subset of the pool (`vlp-data shots --fraction F`: round(F x n_c) samples of
every class, seeded, nested across F), trained for the same `--steps` (the paper's point is data, not compute:
every run gets the same schedule) and scored by `--metric` at `vlp test` (for a pretraining recipe, an evaluation
callback's metric such as a linear probe's top-1). The line is the least-squares fit of the per-fraction means
against log10(samples): score = a + b log10(n); the table prints b (points per tenfold data) and the fit's R^2.
Results, resuming and the remaining options are `vlp fewshot`'s (`<out>` default `runs/scaling/<stem>`).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from vlp_lightning.commands.fewshot import add_protocol_arguments, run_subsets, table


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(
        prog="vlp scaling", description=__doc__.split("\n\n")[0].removeprefix("`vlp scaling`: "),
        epilog="example:\n  vlp scaling --config experiments/mae/fashion_mnist_tiny.yaml "
               "--pool 'data/fashion-mnist/train-*.tar' --fractions 0.125 0.25 0.5 1 --seeds 1 2 --steps 300 "
               "--metric linear_probe/fashion_mnist/top1 \\\n    --data.test_shards "
               "'data/fashion-mnist/test-{000000..000009}.tar'\nother options go to every `vlp fit`",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_protocol_arguments(result, "runs/scaling")
    result.add_argument("--fractions", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0], metavar="F",
                        help="fractions of the pool (default: 0.125 0.25 0.5 1)")
    return result


def log_fit(samples: list[int], scores: list[float]) -> dict[str, float]:
    """Least squares score = a + b log10(samples); its R^2 (1 for a perfect line; 0 when one point or flat)."""
    xs = [math.log10(n) for n in samples]
    mean_x, mean_y = sum(xs) / len(xs), sum(scores) / len(scores)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, scores)) / sxx if sxx else 0.0
    intercept = mean_y - slope * mean_x
    total = sum((y - mean_y) ** 2 for y in scores)
    residual = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, scores))
    return {"intercept": intercept, "slope_per_decade": slope, "r2": 1 - residual / total if total else 0.0}


def main(argv: list[str]) -> int:
    args, extra = parser().parse_known_args(argv)
    if any(not 0 < fraction <= 1 for fraction in args.fractions):
        print(f"vlp scaling: error: --fractions must lie in (0, 1], got {args.fractions}", file=sys.stderr)
        return 2
    points = [(f"f{fraction:g}", ["--fraction", str(fraction)]) for fraction in args.fractions]
    results = run_subsets("scaling", args, extra, points, Path("runs/scaling"))
    if results is None:
        return 2
    rows = [{"fraction": fraction, **row} for fraction, row in zip(args.fractions, results["summary"])]
    fit = log_fit([row["samples"] for row in rows], [row["mean"] for row in rows])
    print(table(rows, "fraction", args.metric))
    print(f"fit: {args.metric} = {fit['intercept']:.4f} + {fit['slope_per_decade']:.4f} log10(samples) "
          f"(R^2 {fit['r2']:.3f})")
    print(f"results: {results['path']}")
    return 0
