"""`vlp benchx`: BenchX's fixed fine-tuning protocol (Zhou et al. 2024): every checkpoint given, fine-tuned the same
way on the same splits with its learning rate searched on a validation split, one table.

    vlp benchx runs/mocov3/fashion_mnist_tiny/checkpoints/last.ckpt \\
        runs/dino/fashion_mnist_tiny/checkpoints/last.ckpt \\
        --pool 'data/fashion-mnist/train-*.tar' --test 'data/fashion-mnist/test-*.tar' \\
        --fractions 0.01 0.1 --lrs 1e-4 5e-4 1e-3 --seeds 42 0 1 --steps 300

BenchX (sec. 3.2-3.3; official yangzhou12/BenchX) fixes, for every pretrained model, (1) the preprocessing, (2) the
train / validation / test splits and the training fractions (its `train_1` / `train_10` lists: 1 % and 10 % of the
training split), (3) a small search of the learning rate per model and dataset, selected on the validation split,
and (4) the fine-tuning itself, then reports the test metric averaged over seeds (42, 0, 1). Here:

1. preprocessing and fine-tuning are `--config` (default `experiments/finetune/fashion_mnist_tiny.yaml`:
   `methods.FineTune`, the whole tower at 0.1 x the head's learning rate, LayerNorm + linear head, Adam, warm-up
   cosine, gradient clipping 1; random resized crops + flips to train, the method's resize + centre crop to
   evaluate), the same for every checkpoint (`--model.init_args.pretrained` is set per checkpoint);
2. the validation split is `--val-fraction` of `--pool`, cut once by a hash of each sample's key with seed 0
   (`vlp-data shots --fraction 1 --split train=...,val=...`); each training fraction F is a class-balanced subset of
   the rest, drawn once with seed 0 and nested (`vlp-data shots --fraction F`), as BenchX's lists are fixed files;
   `--test` is the official test split;
3. for every checkpoint and fraction, the recipe trains at each of `--lrs` with the first seed; the learning rate
   with the best validation score (`--metric` with `val/` for `test/`: `val/accuracy`) wins;
4. that learning rate trains with every seed of `--seeds` (the search's run counts for the first); the table shows
   the test score's mean ± standard deviation over seeds, and the chosen learning rate.

Departures from BenchX, by necessity: a fixed number of `--steps` instead of its early stopping on the validation
metric (evaluated every 5 epochs from epoch 10, patience 10), and the validation score taken once, after training.
Test scores of the runs at losing learning rates are stored in the results but never used to choose. Results:
`<out>/results.json` (default `runs/benchx`), written after every run; a re-run skips runs already done with the same
settings (`--force` re-runs them). Each run's TensorBoard logs are in `<out>/runs/`, and the table's scores also go to
`<out>/tensorboard` (`benchx/<checkpoint>/f<F>/test`, the step being the percentage of training data).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from data_modules import builder
from vlp_lightning.commands.fewshot import fit_and_test, run_key, shards_exist

DEFAULT_CONFIG = "experiments/finetune/fashion_mnist_tiny.yaml"


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(
        prog="vlp benchx", description=__doc__.split("\n\n")[0].removeprefix("`vlp benchx`: "),
        epilog="example:\n  vlp benchx runs/mocov3/fashion_mnist_tiny/checkpoints/last.ckpt --pool "
               "'data/fashion-mnist/train-*.tar' --test 'data/fashion-mnist/test-*.tar' \\\n    --fractions 0.01 0.1 "
               "--lrs 1e-4 5e-4 1e-3 --seeds 42 0 1 --steps 300\nother options (e.g. --data.batch_size 32) go to "
               "every `vlp fit`",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    result.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoints written by vlp fit")
    result.add_argument("--config", action="append", default=None, metavar="YAML",
                        help=f"the fine-tuning recipe (repeatable; default: {DEFAULT_CONFIG})")
    result.add_argument("--pool", required=True, metavar="SHARDS", help="labelled training shards (train + val)")
    result.add_argument("--test", required=True, metavar="SHARDS", help="labelled test shards")
    result.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0], metavar="F",
                        help="training fractions (default: 0.01 0.1 1, BenchX's 1 %%, 10 %%, 100 %%)")
    result.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 5e-4, 1e-3], metavar="LR",
                        help="learning rates searched (default: 1e-4 5e-4 1e-3)")
    result.add_argument("--seeds", type=int, nargs="+", default=[42, 0, 1], metavar="S",
                        help="training seeds; the first one searches (default: BenchX's 42 0 1)")
    result.add_argument("--val-fraction", type=float, default=0.1, metavar="V",
                        help="share of --pool held out for validation (default: 0.1)")
    result.add_argument("--label-field", default="cls", help="cls or an integer .json field (default: cls)")
    result.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the recipe's)")
    result.add_argument("--metric", default="test/accuracy", help="the score (default: test/accuracy)")
    result.add_argument("--out", type=Path, default=Path("runs/benchx"), help="output folder (default: runs/benchx)")
    result.add_argument("--force", action="store_true", help="re-run the runs already in results.json")
    return result


def check(args: argparse.Namespace) -> str | None:
    """The first bad option, in one sentence, or None."""
    if any(not 0 < fraction <= 1 for fraction in args.fractions):
        return f"--fractions must lie in (0, 1], got {args.fractions}"
    if not 0 < args.val_fraction < 1:
        return f"--val-fraction must lie in (0, 1), got {args.val_fraction}"
    if any(lr <= 0 for lr in args.lrs):
        return f"--lrs must be positive, got {args.lrs}"
    for option, pattern in (("--pool", args.pool), ("--test", args.test)):
        if not shards_exist(pattern):
            return f"{option} {pattern!r} matches no shard file; build one with vlp-data"
    missing = [path for path in args.checkpoints if not Path(path).is_file()]
    if missing:
        return f"checkpoint {missing[0]} does not exist; give the last.ckpt of a vlp fit run"
    return None


def prepare_splits(args: argparse.Namespace) -> tuple[str, dict[float, tuple[Path, int]]] | None:
    """The validation shards and, per training fraction, the folder of its training shards and their number
    (module doc, 2)."""
    split = args.out / "splits" / "pool"
    train_share = round(1 - args.val_fraction, 6)
    if builder.main(["shots", args.pool, str(split), "--fraction", "1", "--seed", "0", "--label-field",
                     args.label_field, "--split", f"train={train_share},val={args.val_fraction}"]) != 0:
        return None
    folders = {}
    for fraction in args.fractions:
        folder = split if fraction == 1 else args.out / "splits" / f"f{fraction:g}"
        if fraction != 1 and builder.main(["shots", f"{split}/train-*.tar", str(folder), "--fraction", str(fraction),
                                           "--seed", "0", "--label-field", args.label_field]) != 0:
            return None
        manifest = json.loads((folder / "manifest.json").read_text())
        folders[fraction] = folder, sum(len(shard["keys"]) for file, shard in manifest["shards"].items()
                                        if file.startswith("train-"))
    return f"{split}/val-*.tar", folders


def main(argv: list[str]) -> int:
    args, extra = parser().parse_known_args(argv)
    args.config = args.config or [DEFAULT_CONFIG]
    problem = check(args)
    if problem:
        print(f"vlp benchx: error: {problem}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    prepared = prepare_splits(args)
    if prepared is None:
        return 2
    val_shards, folders = prepared
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": {}}
    rows = []
    for checkpoint in args.checkpoints:
        for fraction, (folder, samples) in folders.items():
            runs = {}
            for lr in args.lrs:  # the search, with the first seed
                runs[(lr, args.seeds[0])] = run(args, extra, results, results_path, checkpoint, fraction, folder,
                                                samples, val_shards, lr, args.seeds[0])
            best = max(args.lrs, key=lambda lr: runs[(lr, args.seeds[0])]["validation"])
            for seed in args.seeds[1:]:
                runs[(best, seed)] = run(args, extra, results, results_path, checkpoint, fraction, folder,
                                         samples, val_shards, best, seed)
            tests = [runs[(best, seed)]["score"] for seed in args.seeds]
            rows.append({
                "checkpoint": checkpoint, "fraction": fraction, "samples": samples,
                "lr": best, "validation": {f"{lr:g}": runs[(lr, args.seeds[0])]["validation"] for lr in args.lrs},
                "mean": statistics.fmean(tests), "std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
                "scores": tests,
            })
    results["summary"] = rows
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    write_tensorboard(args.out / "tensorboard", rows)
    print(table(rows, args.fractions, args.metric))
    print(f"results: {results_path}")
    return 0


def run(args: argparse.Namespace, extra: list[str], results: dict, results_path: Path, checkpoint: str,
        fraction: float, folder: Path, samples: int, val_shards: str, lr: float, seed: int) -> dict:
    """One fine-tuning run (or the stored one with the same settings): its validation and test scores."""
    name = f"{label(checkpoint)}-f{fraction:g}-lr{lr:g}"
    wanted = {"config": args.config, "checkpoint": checkpoint, "pool": args.pool, "test": args.test,
              "val_fraction": args.val_fraction, "label_field": args.label_field, "steps": args.steps,
              "metric": args.metric, "extra": extra, "point": name, "seed": seed}
    key = run_key(wanted)
    stored = results["runs"].get(key)
    if not args.force and stored and stored.get("settings") == wanted:
        print(f"benchx: {name} seed {seed}: done before ({stored['score']:.4f})")
        return stored
    overrides = [f"--model.init_args.pretrained={checkpoint}", f"--model.init_args.optimizer.init_args.lr={lr}",
                 f"--data.test_shards={args.test}", *extra]
    cli, score = fit_and_test(args, overrides, folder, f"{args.out}/runs/{name}-seed{seed}", seed, "vlp benchx",
                              val_shards=val_shards)
    entry = {"settings": wanted, "score": score, "validation": cli.validation_score, "lr": lr,
             "steps": int(cli.trainer.global_step), "samples": samples}
    results["runs"][key] = entry
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"benchx: {name} seed {seed}: validation {cli.validation_score:.4f}, {args.metric} = {score:.4f} "
          f"({entry['steps']} steps, {samples} samples)", flush=True)
    return entry


def label(checkpoint: str) -> str:
    """A short name of a checkpoint: runs/<method>/<recipe>/checkpoints/last.ckpt -> <method>_<recipe>; elsewhere
    <folder>_<stem> (runs/x/last.ckpt -> x_last)."""
    path = Path(checkpoint)
    parts = path.parent.parent.parts[-2:] if path.parent.name == "checkpoints" else (path.parent.name, path.stem)
    return "_".join(part for part in parts if part)


def write_tensorboard(directory: Path, rows: list[dict]) -> None:
    from torch.utils.tensorboard import SummaryWriter  # here: loads tensorboard, which nothing else needs

    with SummaryWriter(str(directory)) as writer:
        for row in rows:
            step = round(100 * row["fraction"])
            writer.add_scalar(f"benchx/{label(row['checkpoint'])}/test", row["mean"], step)
            writer.add_scalar(f"benchx/{label(row['checkpoint'])}/lr", row["lr"], step)


def table(rows: list[dict], fractions: list[float], metric: str) -> str:
    names = [f"{100 * fraction:g} % ({metric} mean ± std, lr)" for fraction in fractions]
    lines = ["| checkpoint | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for checkpoint in dict.fromkeys(row["checkpoint"] for row in rows):
        cells = [f"{row['mean']:.4f} ± {row['std']:.4f} ({row['lr']:g})"
                 for fraction in fractions for row in rows
                 if row["checkpoint"] == checkpoint and row["fraction"] == fraction]
        lines.append(f"| {label(checkpoint)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
