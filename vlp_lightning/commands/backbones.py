"""`vlp backbones`: Battle of the Backbones (Goldblum et al. 2023): every checkpoint given, scored on the same tasks
the same way, one table.

    vlp backbones runs/clip/emoji_tiny/checkpoints/last.ckpt runs/dino/emoji_tiny/checkpoints/last.ckpt \\
        --train 'data/emoji/train-{000000..000001}.tar' --test data/emoji/test-000000.tar --shots 1 4 16

Each checkpoint is rebuilt as the method it was trained as (`vlp_lightning.pretrained.load_method`, weights only) and
frozen. On its `probe_features` (the layer each method hands to probes), fitted on `--train` and scored on `--test`
(`--label-field`: `.cls` or an integer `.json` field):

- kNN: weighted k = 20 neighbours, cosine, T = 0.07 (the `KNNClassifier` code);
- linear probe: logistic regression on standardised features (the `LinearProbe` code);
- few-shot linear probe: the same probe fitted on K samples per class of `--train`, drawn per seed (mean and std
  over `--seeds`), for every K of `--shots`;
- zero-shot (methods with a joint image-text space): `ZeroShotClassification` with the `simple` template set;
- retrieval (joint space and captioned `--test`): image -> text and text -> image R@1 (`Retrieval`).

A task a method cannot do is `-` in its row. Results: `<out>/results.json` (default `runs/backbones/results.json`)
and the markdown table printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(
        prog="vlp backbones", description=__doc__.split("\n\n")[0].removeprefix("`vlp backbones`: "),
        epilog="example:\n  vlp backbones runs/clip/emoji_tiny/checkpoints/last.ckpt "
               "--train 'data/emoji/train-{000000..000001}.tar' --test data/emoji/test-000000.tar --shots 1 4 16",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    result.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoints written by vlp fit")
    result.add_argument("--train", required=True, metavar="SHARDS", help="labelled shards the probes fit on")
    result.add_argument("--test", required=True, metavar="SHARDS", help="labelled shards the probes are scored on")
    result.add_argument("--label-field", default="cls", help="cls or an integer .json field (default: cls)")
    result.add_argument("--shots", type=int, nargs="*", default=[1, 4, 16], metavar="K",
                        help="few-shot probes' samples per class (default: 1 4 16; none: no few-shot task)")
    result.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], metavar="S", help="default: 1 2 3")
    result.add_argument("--out", type=Path, default=Path("runs/backbones"), help="output folder")
    return result


def few_shot_indices(labels: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """Indices of `shots` samples of every class (all of a smaller class), drawn with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in labels.unique():
        rows = (labels == label).nonzero().flatten()
        chosen.append(rows[torch.randperm(len(rows), generator=generator)[:shots]])
    return torch.cat(chosen)


def score(checkpoint: str, args: argparse.Namespace) -> dict:
    from lightning.pytorch import Trainer

    from vlp_lightning.callbacks import Retrieval, ZeroShotClassification, ZeroShotDataset
    from vlp_lightning.callbacks.features import evaluation_mode, extract_features, has_joint_space
    from vlp_lightning.callbacks.linear_probe import linear_probe_scores
    from vlp_lightning.comparison import probe_scores
    from vlp_lightning.pretrained import load_method

    method, _ = load_method(checkpoint, name="CKPT")
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    row: dict = {"checkpoint": checkpoint, "method": type(method).__name__}
    with evaluation_mode(trainer, method):
        train = extract_features(method, args.train)
        test = extract_features(method, args.test)
        train_labels, test_labels = train.labels_of(args.label_field), test.labels_of(args.label_field)
        classes = int(max(train_labels.max(), test_labels.max())) + 1
        row.update(probe_scores(train.image, train_labels, test.image, test_labels, classes))
        for shots in args.shots:
            accuracies = []
            for seed in args.seeds:
                rows = few_shot_indices(train_labels, shots, seed)
                scores = linear_probe_scores(train.image[rows], train_labels[rows], test.image, classes,
                                             standardize=True)
                accuracies.append((scores.argmax(1) == test_labels).float().mean().item())
            row[f"fewshot_{shots}"] = statistics.fmean(accuracies)
            row[f"fewshot_{shots}_std"] = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        if has_joint_space(method):
            dataset = ZeroShotDataset(name="test", shards=args.test, label_field=args.label_field)
            row["zeroshot_top1"] = ZeroShotClassification([dataset]).evaluate(trainer, method)["zeroshot/test/top1"]
            if test.captions is not None:
                metrics = Retrieval(args.test, name="test").evaluate(trainer, method)
                row["i2t_R@1"], row["t2i_R@1"] = metrics["retrieval/test/i2t_R@1"], metrics["retrieval/test/t2i_R@1"]
    return row


def table(rows: list[dict], shots: list[int]) -> str:
    columns = ["knn_top1", "linear_top1", *(f"fewshot_{k}" for k in shots), "zeroshot_top1", "i2t_R@1", "t2i_R@1"]
    names = ["kNN", "linear", *(f"{k}-shot" for k in shots), "zero-shot", "i2t R@1", "t2i R@1"]
    lines = ["| checkpoint | method | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            spread = row.get(f"{column}_std")
            cells.append("-" if value is None else f"{100 * value:.1f}" + (f" ± {100 * spread:.1f}" if spread else ""))
        lines.append(f"| {row['checkpoint']} | {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if any(k < 1 for k in args.shots):
        print(f"vlp backbones: error: --shots must be positive, got {args.shots}", file=sys.stderr)
        return 2
    from vlp_lightning.cli import CheckpointError
    from vlp_lightning.pretrained import PretrainedError

    rows = []
    for checkpoint in args.checkpoints:
        try:
            rows.append(score(checkpoint, args))
        except (PretrainedError, CheckpointError, ValueError) as error:
            print(f"vlp backbones: error: {error}", file=sys.stderr)
            return 2
        print(f"backbones: {checkpoint} scored", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(table(rows, args.shots))
    print(f"results: {args.out / 'results.json'}")
    return 0
