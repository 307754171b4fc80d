"""`vlp active`: active prompt learning (PCB, Bang et al. 2024): rounds of train, score the pool, label a budget.

    vlp active --config experiments/pcb/emoji_tiny.yaml --pool 'data/emoji/train-{000000..000001}.tar' \\
        --rounds 8 --acquisition entropy

Round 0 labels `--budget` random samples of `--pool` (default: one per class of the pool's `--label-field`, the
paper's per-round budget); every round then writes the labelled set as shards (`<out>/rounds/round<r>/`, the
samples copied as they are), trains the recipe (a `vlp_lightning.methods.PCB`) on it from scratch as the official
trainer does, scores the recipe's test split (`--metric`), and, before the next round, scores the whole pool with
the frozen CLIP and the round's prompts, asks `PCB.query` for the next `--budget` samples (the acquisition's
candidates, then PCB's pseudo-class balancing) and "labels" them: the oracle is the pool's own labels.
`--acquisition random|entropy|coreset|badge`, `--no-balance` and `--candidate-fraction` override the recipe's.

The table shows, per round, the labelled count, how many classes it covers, its smallest and largest class count
(the imbalance PCB removes) and the score; `<out>/results.json` holds it with the labelled keys, and TensorBoard
scalars `active/<metric>`, `active/classes_covered` and `active/imbalance` (largest / smallest count), against the
labelled count, go to `<out>/curve` (default out: `runs/active/<config stem>-<acquisition>[-nobalance]`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from data_modules.builder import build_shards, iterate_shard
from data_modules.pipeline import expand_shards
from data_modules.sources import SourceData, SourceError
from data_modules.sources.shots import _label, shard_record
from vlp_lightning.commands.fewshot import fit_and_test


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(
        prog="vlp active", description=__doc__.split("\n\n")[0].removeprefix("`vlp active`: "),
        epilog="example:\n  vlp active --config experiments/pcb/emoji_tiny.yaml "
               "--pool 'data/emoji/train-{000000..000001}.tar' --rounds 8 --acquisition entropy\n"
               "other options (e.g. --model.init_args.pretrained CKPT) go to every round's `vlp fit`",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    result.add_argument("--config", action="append", required=True, metavar="YAML", help="a PCB recipe (repeatable)")
    result.add_argument("--pool", required=True, metavar="SHARDS", help="the unlabelled pool (its labels: the oracle)")
    result.add_argument("--rounds", type=int, default=8, help="rounds of training and labelling (default: 8)")
    result.add_argument("--budget", type=int, default=None, help="labels per round (default: the pool's classes)")
    result.add_argument("--acquisition", default=None, help="random, entropy, coreset or badge (default: recipe's)")
    result.add_argument("--no-balance", action="store_true", help="no PCB balancing: the acquisition's top picks")
    result.add_argument("--candidate-fraction", type=float, default=None,
                        help="candidates as a fraction of the pool (default: the recipe's; the paper's 0.1)")
    result.add_argument("--label-field", default="cls", help="cls or an integer .json field (default: cls)")
    result.add_argument("--seed", type=int, default=1, help="draws, global and data seed (default: 1)")
    result.add_argument("--steps", type=int, default=None, help="optimizer steps per round (default: the recipe's)")
    result.add_argument("--metric", default="test/accuracy", help="the score (default: test/accuracy)")
    result.add_argument("--out", type=Path, default=None, help="output folder (default: runs/active/<name>)")
    return result


def error(message: str) -> int:
    print(f"vlp active: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    from vlp_lightning.methods.adaptation.pcb import ACQUISITIONS, PCB

    args, extra = parser().parse_known_args(argv)
    if args.rounds < 1:
        return error(f"--rounds {args.rounds} must be at least 1")
    if args.budget is not None and args.budget < 1:
        return error(f"--budget {args.budget} must be at least 1 (the paper labels one sample per class per round)")
    if args.acquisition is not None and args.acquisition not in ACQUISITIONS:
        return error(f"--acquisition {args.acquisition!r} is unknown; use one of {', '.join(ACQUISITIONS)}")
    urls = expand_shards(args.pool)
    if not urls or not all(Path(url).is_file() for url in urls):
        return error(f"--pool {args.pool!r} matches no shard file; build one with vlp-data")
    try:
        pool = read_pool([Path(url) for url in urls], args.label_field)
    except SourceError as problem:
        return error(str(problem))
    keys, labels = pool
    budget = args.budget or len(set(labels.tolist()))
    if budget * args.rounds > len(keys):
        return error(f"--budget {budget} x --rounds {args.rounds} asks for more labels than the pool's {len(keys)} "
                     "samples; lower one of them")
    overrides = [f"--model.init_args.acquisition={args.acquisition}"] if args.acquisition else []
    overrides += ["--model.init_args.balance=false"] if args.no_balance else []
    overrides += ([f"--model.init_args.candidate_fraction={args.candidate_fraction}"]
                  if args.candidate_fraction is not None else [])
    name = f"{Path(args.config[0]).stem}-{args.acquisition or 'recipe'}{'-nobalance' if args.no_balance else ''}"
    out = args.out or Path("runs/active") / name
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)
    labelled = torch.zeros(len(keys), dtype=torch.bool)
    labelled[torch.randperm(len(keys), generator=generator)[:budget]] = True  # round 0: nothing to score with yet
    rows: list[dict] = []
    picks = torch.zeros(0, dtype=torch.long)
    for round_index in range(args.rounds):
        if round_index:
            labelled[picks] = True
        folder = out / "rounds" / f"round{round_index}"
        write_subset([Path(url) for url in urls], {keys[i] for i in labelled.nonzero().squeeze(1).tolist()},
                     folder, args)
        model, score = fit_round(args, [*overrides, *extra], folder, round_index, out)
        if not isinstance(model, PCB):
            return error(f"the recipe's model is a {type(model).__name__}; vlp active needs "
                         "vlp_lightning.methods.PCB (e.g. experiments/pcb/emoji_tiny.yaml)")
        if model.classes.label_field != args.label_field:
            return error(f"the recipe classifies label_field={model.classes.label_field!r} but --label-field is "
                         f"{args.label_field!r}; pass --label-field {model.classes.label_field}")
        counts = torch.bincount(labels[labelled], minlength=len(model.classes.trained))
        rows.append({"round": round_index, "labelled": int(labelled.sum()), "classes": int((counts > 0).sum()),
                     "smallest": int(counts.min()), "largest": int(counts.max()), "score": score,
                     "acquisition": model.acquisition if round_index else "random", "balance": model.balance})
        print(f"active: round {round_index}: {rows[-1]['labelled']} labelled, {args.metric} = {score:.4f}", flush=True)
        results = {"settings": vars(args) | {"out": str(out), "budget": budget, "extra": extra}, "rounds": rows,
                   "labelled": sorted(keys[i] for i in labelled.nonzero().squeeze(1).tolist())}
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        if round_index + 1 < args.rounds:
            features, probabilities = score_pool(model, args.pool, keys)
            picks = model.query(features, probabilities, labelled, labels, budget, generator)
    write_curve(out / "curve", rows, args.metric)
    print(table(rows, args.metric))
    print(f"results: {out / 'results.json'}")
    return 0


def read_pool(paths: list[Path], label_field: str) -> tuple[list[str], torch.Tensor]:
    """Keys and labels [N] of every sample of the pool, in shard order; a repeated key is a SourceError."""
    keys, labels = [], []
    for path in paths:
        for key, sample in iterate_shard(path):
            keys.append(key)
            labels.append(_label(sample, label_field, key))
    if len(set(keys)) != len(keys):
        raise SourceError("the pool repeats sample keys, so a labelled key would name two samples; give each shard "
                          "set once")
    return keys, torch.tensor(labels, dtype=torch.long)


def write_subset(paths: list[Path], chosen: set[str], folder: Path, args: argparse.Namespace) -> None:
    """The labelled samples of the pool as shards of their own (members copied, as `vlp-data shots` does)."""
    from data_modules.manifest import read_manifest

    records = [shard_record(key, sample, path) for path in paths for key, sample in iterate_shard(path)
               if key in chosen]
    manifest = read_manifest(paths[0].parent) or {}
    source = SourceData(name=f"{len(records)} actively labelled samples of {args.pool}",
                        licence=manifest.get("licence", "as the source shards"), records=records, inputs=paths,
                        classnames=manifest.get("classnames", {}))
    build_shards(source, folder, maxcount=10_000, split_fractions={"train": 1.0}, seed=0, resize=None, force=True)


def fit_round(args: argparse.Namespace, extra: list[str], folder: Path, round_index: int, out: Path):
    """Train the recipe from scratch on the round's labelled shards and test it: (model, score)."""
    cli, score = fit_and_test(args, extra, folder, f"{out}/runs/round{round_index}", args.seed, "vlp active")
    return cli.model, score


def score_pool(model, pool: str, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image embeddings [N, D] and prompted class probabilities [N, C] of the pool, rows in `keys`
    order: the frozen CLIP and the round's prompts, eval crops, no gradient."""
    from vlp_lightning.callbacks.features import extract_features

    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            extracted = extract_features(model, pool, representation="joint")
            order = {key: row for row, key in enumerate(extracted.keys)}
            rows = torch.tensor([order[key] for key in keys])
            features = extracted.image[rows].to(model.device)
            logits = torch.cat([model.class_logits(chunk, model.classes.trained) for chunk in features.split(256)])
    finally:
        model.train(training)
    return features.float().cpu(), logits.float().softmax(dim=1).cpu()


def write_curve(folder: Path, rows: list[dict], metric: str) -> None:
    """TensorBoard scalars of the rounds against the labelled count (module doc)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(save_dir=str(folder), name="", version="")
    for row in rows:
        logger.log_metrics({f"active/{metric}": row["score"], "active/classes_covered": row["classes"],
                            "active/imbalance": row["largest"] / max(row["smallest"], 1)}, step=row["labelled"])
    logger.finalize("success")


def table(rows: list[dict], metric: str) -> str:
    lines = [f"| round | acquisition | labelled | classes | smallest | largest | {metric} |", "|---" * 7 + "|"]
    lines += [f"| {row['round']} | {row['acquisition']}{'' if row['balance'] or not row['round'] else ' (no PCB)'} | "
              f"{row['labelled']} | {row['classes']} | {row['smallest']} | {row['largest']} | {row['score']:.4f} |"
              for row in rows]
    return "\n".join(lines)
