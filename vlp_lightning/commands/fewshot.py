"""`vlp fewshot`: the few-shot protocol: a recipe trained on K shots per class, for several K and seeds, one table.

    vlp fewshot --config experiments/pvp/fashion_mnist_tiny.yaml --pool 'data/fashion-mnist/train-*.tar' \\
        --shots 1 2 4 8 16 --seeds 1 2 3 --steps 200

For every K and seed, `vlp-data shots` draws K samples per class of `--pool` with that seed (`--label-field`:
`.cls` or an integer `.json` field; the draws are nested across K and written once under `<out>/subsets/`), the recipe
trains on them with `--seed_everything <seed>` for `--steps` steps (default: the recipe's), and `vlp test` scores the
recipe's test split; the score is `--metric` (default `test/accuracy`, the adapted classifier's own top-1; any metric
the recipe's evaluation callbacks log works, e.g. `linear_probe/<name>/top1`).

Seeds vary the draw, the global seed and the data's seed (sample order and augmentations; CoOp's protocol, 3 seeds):
a known trap is "seed collapse", runs that differ in name only (a global seed alone leaves a method with a
deterministic start, such as CoOp from "a photo of a", identical across seeds); the command checks that the draws of
different seeds are different sets and says so when two are identical (a pool with K or fewer samples per class),
and the table shows each K's mean, standard deviation and the per-seed values. Further `vlp fit` options apply to
every run. Results: `<out>/results.json` (default `runs/fewshot/<first --config's stem>`), written after every run;
a re-run skips the runs already done with the same settings (`--force` re-runs them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from pathlib import Path

from data_modules import builder
from data_modules.pipeline import expand_shards


def add_protocol_arguments(result: argparse.ArgumentParser, default_out: str) -> None:
    """The options `vlp fewshot` and `vlp scaling` share."""
    result.add_argument("--config", action="append", required=True, metavar="YAML", help="the recipe (repeatable)")
    result.add_argument("--pool", required=True, metavar="SHARDS", help="labelled shards the subsets are drawn from")
    result.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], metavar="S", help="default: 1 2 3")
    result.add_argument("--label-field", default="cls", help="cls or an integer .json field (default: cls)")
    result.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the recipe's)")
    result.add_argument("--metric", default="test/accuracy", help="the score (default: test/accuracy)")
    result.add_argument("--out", type=Path, default=None, help=f"output folder (default: {default_out}/<stem>)")
    result.add_argument("--force", action="store_true", help="re-run the runs already in results.json")


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(
        prog="vlp fewshot", description=__doc__.split("\n\n")[0].removeprefix("`vlp fewshot`: "),
        epilog="example:\n  vlp fewshot --config experiments/pvp/fashion_mnist_tiny.yaml "
               "--pool 'data/fashion-mnist/train-*.tar' --shots 1 2 4 8 16 --seeds 1 2 3 --steps 200\n"
               "other options (e.g. --model.init_args.pretrained CKPT) go to every `vlp fit`",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_protocol_arguments(result, "runs/fewshot")
    result.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16], metavar="K",
                        help="samples per class (default: 1 2 4 8 16)")
    return result


def main(argv: list[str]) -> int:
    args, extra = parser().parse_known_args(argv)
    if any(k < 1 for k in args.shots):
        print(f"vlp fewshot: error: --shots must be positive, got {args.shots}", file=sys.stderr)
        return 2
    points = [(f"k{shots}", ["--shots", str(shots)]) for shots in args.shots]
    results = run_subsets("fewshot", args, extra, points, Path("runs/fewshot"))
    if results is None:
        return 2
    for shots, (name, _) in zip(args.shots, points):
        same = [(a, b) for a in args.seeds for b in args.seeds
                if a < b and results["draws"][name][str(a)] == results["draws"][name][str(b)]]
        if same:
            print(f"fewshot: warning: K={shots}: seeds {same[0][0]} and {same[0][1]} drew the same samples (the pool "
                  f"has at most {shots} per class), so their runs differ only in the training seed", file=sys.stderr)
    rows = [{"shots": shots, **row} for shots, row in zip(args.shots, results["summary"])]
    print(table(rows, "shots", args.metric))
    print(f"results: {results['path']}")
    return 0


def run_subsets(command: str, args: argparse.Namespace, extra: list[str], points: list[tuple[str, list[str]]],
                default_out: Path) -> dict | None:
    """For every point (name, `vlp-data shots` arguments) and seed: draw the subset of `--pool`, train the recipe on
    it, test; results.json written after every run, runs done before with the same settings skipped. Returns the
    results with `summary` (per point: mean, std, per-seed scores, samples), `draws` (point -> seed -> drawn keys)
    and `path`; None (after one error line) for a bad pool."""
    if not shards_exist(args.pool):
        print(f"vlp {command}: error: --pool {args.pool!r} matches no shard file; build one with vlp-data",
              file=sys.stderr)
        return None
    out = args.out or default_out / Path(args.config[0]).stem
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": {}}
    draws: dict[str, dict[str, list[str]]] = {}
    summary = []
    for name, draw in points:
        scores, samples = [], 0
        for seed in args.seeds:
            folder = out / "subsets" / f"{name}-seed{seed}"
            if builder.main(["shots", args.pool, str(folder), *draw, "--seed", str(seed),
                             "--label-field", args.label_field]) != 0:
                return None
            keys = drawn_keys(folder)
            draws.setdefault(name, {})[str(seed)] = sorted(keys)
            samples = len(keys)
            wanted = settings(args, extra, name, seed)
            key = run_key(wanted)
            if not args.force and results["runs"].get(key, {}).get("settings") == wanted:
                print(f"{command}: {name} seed {seed}: done before ({results['runs'][key]['score']:.4f})")
            else:
                score, steps = train_and_test(args, extra, folder, name, seed, out)
                results["runs"][key] = {"settings": wanted, "score": score, "steps": steps, "samples": samples}
                results_path.write_text(json.dumps(results, indent=2) + "\n")
                print(f"{command}: {name} seed {seed}: {args.metric} = {score:.4f} ({steps} steps, {samples} "
                      "samples)", flush=True)
            scores.append(results["runs"][key]["score"])
        summary.append({"point": name, "mean": statistics.fmean(scores),
                        "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                        "scores": scores, "samples": samples})
    results["summary"] = summary
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    return {**results, "draws": draws, "path": results_path}


def shards_exist(pattern: str) -> bool:
    """Whether the shard pattern names at least one file and every file it names exists."""
    urls = expand_shards(pattern)
    return bool(urls) and all(Path(url).is_file() for url in urls)


def drawn_keys(folder: Path) -> set[str]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return {key for shard in manifest["shards"].values() for key in shard["keys"]}


def settings(args: argparse.Namespace, extra: list[str], point: str, seed: int) -> dict:
    return {"config": args.config, "pool": args.pool, "label_field": args.label_field, "steps": args.steps,
            "metric": args.metric, "extra": extra, "point": point, "seed": seed}


def run_key(wanted: dict) -> str:
    digest = hashlib.sha1(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:8]
    return f"{wanted['point']}-seed{wanted['seed']}-{digest}"


def train_and_test(args: argparse.Namespace, extra: list[str], folder: Path, point: str, seed: int,
                   out: Path) -> tuple[float, int]:
    """(test score, optimizer steps) of the recipe trained on `folder`'s shards (`fit_and_test`)."""
    cli, score = fit_and_test(args, extra, folder, f"{out}/runs/{point}-seed{seed}", seed)
    return score, int(cli.trainer.global_step)


def fit_and_test(args: argparse.Namespace, extra: list[str], folder: Path, root: str, seed: int, command: str = "vlp",
                 val_shards: str | None = None):
    """The recipe (`args.config`, `args.steps`, `args.metric`) trained from scratch on `folder`'s training shards
    with `seed`, then tested: (the CLI, its `args.metric`); what `vlp fewshot`, `vlp scaling`, `vlp active` and
    `vlp benchx` run at every point. With `val_shards` the trained model is also validated on them once, after
    training (never during it), before the test: `vlp benchx` selects on that score (`validation_metric`)."""
    from vlp_lightning.cli import VLPCLI  # heavy: imported once a run is due

    vlp_args = [arg for config in args.config for arg in ("--config", config)]
    vlp_args += [f"--data.train_shards={folder}/train-*.tar", f"--data.val_shards={val_shards or 'null'}",
                 "--trainer.val_check_interval=1.0", f"--seed_everything={seed}", f"--data.seed={seed}",
                 f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
                 "--trainer.enable_model_summary=false", "--checkpoint.save_top_k=0", "--checkpoint.save_last=false"]
    vlp_args += ["--trainer.limit_val_batches=0"] if val_shards else []
    vlp_args += [f"--trainer.max_steps={args.steps}"] if args.steps else []
    cli = VLPCLI(args=[*vlp_args, *extra], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if val_shards:
        cli.trainer.limit_val_batches = 1.0
        cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
        cli.validation_score = logged(cli, validation_metric(args.metric), command)
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    return cli, logged(cli, args.metric, command)


def validation_metric(metric: str) -> str:
    """The validation counterpart of a test metric: test/accuracy -> val/accuracy (others are kept)."""
    return "val/" + metric.removeprefix("test/") if metric.startswith("test/") else metric


def logged(cli, metric: str, command: str) -> float:
    """`metric` as the last evaluation logged it, or one error line naming the metrics it did log."""
    if metric not in cli.trainer.callback_metrics:
        raise SystemExit(f"{command}: error: the evaluation logged no {metric!r}; it logged "
                         f"{', '.join(sorted(cli.trainer.callback_metrics))}; pass one of them as --metric")
    return float(cli.trainer.callback_metrics[metric])


def table(rows: list[dict], point: str, metric: str) -> str:
    lines = [f"| {point} | samples | {metric} mean | std | per seed |", "|---|---|---|---|---|"]
    lines += [f"| {row[point]} | {row['samples']} | {row['mean']:.4f} | {row['std']:.4f} | "
              f"{' '.join(f'{score:.4f}' for score in row['scores'])} |" for row in rows]
    return "\n".join(lines)
