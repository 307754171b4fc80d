"""Self-supervised pretraining on two real datasets for the same minutes per method, then kNN and linear probe.

A thin caller of `vlp compare` (`vlp_lightning.commands.compare`, which trains, scores and isolates the methods):
this script holds the two datasets, the per-method targets and the Markdown table of bench/README.md.

Every self-supervised method of the methods index (those that need neither captions nor labels, read from
`vlp_lightning.methods`, so a new method appears here without edits) trains from its
`experiments/<method>/fashion_mnist_tiny.yaml` when it has one, else by `--model` swap into
`experiments/mae/fashion_mnist_tiny.yaml` with its own tiny constructor defaults (`vlp compare --own-recipes`), as
`vlp fit` would run it, for the same wall-clock budget (`--minutes`): a short calibration run measures the method's
step time, the step count is set so that the run fills the budget (the warm-up + cosine schedule then completes),
and a callback stops the run if it overshoots. The same recipe trains on each dataset (only the training shards
change):

- `fashion-mnist`: the 60,000 official training images; probes fit on the first `--train-samples` (10,000) and
  are scored on the 10,000 official test images (10 classes);
- `emoji`: the Google and the Twitter drawings of the 80 % "seen" emoji concepts (3,058 images); probes fit on
  them and are scored on both drawings of the 20 % unseen concepts (764 images; the concepts are split by a hash,
  so no test emoji is seen in pretraining), labelled by the 10 Unicode categories (Smileys & Emotion, Flags, ...).

Scores on frozen features (`probe_features`, the layer each method hands to probes):

- kNN: weighted k = 20 neighbours, cosine, T = 0.07 (the suite's `KNNClassifier`);
- linear probe: multinomial logistic regression (L-BFGS, C = 1) on features standardised with the training
  mean and deviation, as MAE's linear probe does with a BatchNorm without affine (He et al. 2021, App. A.2).

Two references are measured in the same run with the same code: the raw pixels, and each method's encoder with the
random weights it starts from (same config, same seed, no training). A method has learned something when its
linear probe beats its own random encoder by at least a point; that is the target per method and dataset.

Shards: `data/fashion-mnist` (built with `vlp-data fashion-mnist` from Debian's `dataset-fashion-mnist` when
missing), `data/emoji-google` and `data/emoji-twitter` (`vlp-data emoji`, as `make demo` builds them).
Each dataset is one comparison in `runs/compare/bench_ssl_<dataset>/` (per-method logs, checkpoints, results.json):
an interrupted run, run again, skips the methods already finished with the same settings (`--force` re-runs them).
Usage: python bench/ssl_probe.py [--quick] [--datasets fashion-mnist emoji] [--methods byol dino ...] [--minutes M]
       [--merge] [--force] [--results PATH] [--table]
(writes bench/results/ssl_probe.json, or `--results PATH`, after every method, `--merge` keeps the rows of
methods not rerun; prints the Markdown table of every row; `python bench/run_all.py --readme-only` updates
bench/README.md's targets)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import REPO_ROOT, RESULTS_DIR, Target, write_result

sys.path.insert(0, str(REPO_ROOT))

from data_modules.builder import main as vlp_data  # noqa: E402
from vlp_lightning.commands import compare  # noqa: E402
from vlp_lightning.comparison import Budget, Probe  # noqa: E402
from vlp_lightning.demo import build_shards  # noqa: E402

EXPERIMENTS = REPO_ROOT / "experiments"


def self_supervised_methods() -> dict[str, str]:
    """{recipe folder name: class name} of every index method that learns from images alone."""
    return {compare.recipe_folder(EXPERIMENTS, f"vlp_lightning.methods.{name}") or name.lower(): name
            for name in compare.image_only_methods()}


def build_fashion_mnist() -> int:
    return vlp_data(["fashion-mnist", "data/fashion-mnist"])


def build_emoji() -> int:
    """The demo's shards: both drawings, the same concepts held out in each (`vlp_lightning.demo.build_shards`)."""
    build_shards(Path("data"))
    return 0


@dataclass(frozen=True)
class Dataset:
    """Where a dataset's shards are, what its probes fit and score on, and its defaults."""

    pretrain: str  # the shards the methods train on
    probe_train: str  # the probes' training images (labelled)
    test: str  # the probes' test images
    manifests: tuple[str, ...]  # built when one is missing
    build: Callable[[], int]
    minutes: float  # default budget per method
    train_samples: int | None  # default probe training images (None: all)
    raw_size: int  # side of the raw-pixel reference
    raw_channels: int


FASHION_TRAIN = "data/fashion-mnist/train-{000000..000059}.tar"
EMOJI_SEEN = "data/emoji-google/seen-*.tar::data/emoji-twitter/seen-*.tar"
DATASETS = {
    "fashion-mnist": Dataset(
        pretrain=FASHION_TRAIN, probe_train=FASHION_TRAIN, test="data/fashion-mnist/test-{000000..000009}.tar",
        manifests=("data/fashion-mnist/manifest.json",), build=build_fashion_mnist, minutes=7.0,
        train_samples=10000, raw_size=28, raw_channels=1,  # the 28x28 grey pixels
    ),
    "emoji": Dataset(
        pretrain=EMOJI_SEEN, probe_train=EMOJI_SEEN,
        test="data/emoji-google/unseen-*.tar::data/emoji-twitter/unseen-*.tar",
        manifests=("data/emoji-google/manifest.json", "data/emoji-twitter/manifest.json"), build=build_emoji,
        minutes=2.5, train_samples=None, raw_size=32, raw_channels=3,  # the methods' 32 px RGB input
    ),
}
METHODS = self_supervised_methods()
#: the recipe a method without a Fashion-MNIST recipe of its own is swapped into (schedule, tower, trainer).
SWAP_RECIPE = EXPERIMENTS / "mae" / "fashion_mnist_tiny.yaml"
RESULT = "ssl_probe"
#: --quick: a smoke run of the whole script (a few steps, 500 images), its numbers say nothing about the methods.
QUICK = {"steps": 4, "train_samples": 500, "test_samples": 500}


def ensure_shards(data: Dataset) -> None:
    if not all(Path(manifest).exists() for manifest in data.manifests):  # relative, as the shard patterns
        print(f"building the shards of {', '.join(data.manifests)} with vlp-data", flush=True)
        status = data.build()
        if status:
            sys.exit(status)


def comparison_of(name: str, methods: list[str], minutes: float | None, train_samples: int | None, quick: bool,
                  force: bool) -> compare.Comparison:
    """The `vlp compare` run of one dataset: every method from its own Fashion-MNIST recipe (else swapped into
    MAE's), on the dataset's pretraining shards, with both references."""
    data = DATASETS[name]
    budget = Budget(steps=QUICK["steps"]) if quick else Budget(minutes=minutes or data.minutes)
    train_samples = train_samples or (QUICK["train_samples"] if quick else data.train_samples)
    probe = Probe(data.probe_train, data.test, train_samples, QUICK["test_samples"] if quick else None)
    return compare.Comparison(
        configs=[SWAP_RECIPE],
        methods=[compare.Method(METHODS[method], f"vlp_lightning.methods.{METHODS[method]}") for method in methods],
        budget=budget, probe=probe, out=Path("runs/compare") / f"bench_ssl_{name.replace('-', '_')}",
        train_shards=data.pretrain, own_recipes=True, random_init=True, raw_pixels=(data.raw_size, data.raw_channels),
        force=force, command=f"python bench/ssl_probe.py --datasets {name}",
    )


def bench_result(comparison: compare.Comparison, results: dict) -> dict:
    """`vlp compare`'s results of one dataset as this benchmark's {config, rows, runs, failed}: rows `raw_pixels`,
    `<method>/random`, `<method>/pretrained`, runs per method (keyed by recipe folder, as the targets)."""
    raw = results["references"]["raw_pixels"]["scores"]
    rows, runs, failed = {"raw_pixels": {"knn_top1": raw["knn_top1"], "linear_top1": raw["linear_top1"]}}, {}, {}
    for folder, name in METHODS.items():
        entry = results["methods"].get(name)
        if entry is None or name not in [method.name for method in comparison.methods]:
            continue
        if entry["status"] != "ok":
            failed[folder] = entry["status"]
            continue
        rows[f"{folder}/random"] = entry["random_init"]
        rows[f"{folder}/pretrained"] = entry["scores"]
        runs[folder] = entry["run"]
    config = {"minutes_per_method": comparison.budget.minutes, "train_samples": raw["train_samples"],
              "test_samples": raw["test_samples"], "quick_steps": comparison.budget.steps}
    return {"config": config, "rows": rows, "runs": runs, "failed": failed}


def merged(previous: dict, fresh: dict) -> dict:
    """`previous`'s datasets with `fresh`'s rows and runs laid over them (the raw-pixel row and config too)."""
    datasets = {name: dict(result) for name, result in previous.get("datasets", {}).items()}
    for name, result in fresh.items():
        old = datasets.get(name, {"rows": {}, "runs": {}})
        datasets[name] = {
            "config": result["config"],
            "rows": {**old["rows"], **result["rows"]},
            "runs": {**old["runs"], **result["runs"]},
            "failed": result["failed"],
        }
    return datasets


def targets_of(datasets: dict) -> list[Target]:
    return [
        Target(
            f"{name}/{method}_linear_probe_minus_random",
            rows[f"{method}/pretrained"]["linear_top1"] - rows[f"{method}/random"]["linear_top1"],
            0.01,
        )
        for name, result in datasets.items()
        for rows in [result["rows"]]
        for method in METHODS
        if f"{method}/pretrained" in rows
    ]


def markdown_table(datasets: dict) -> str:
    """One row per method and dataset columns: kNN and linear top-1 of its random -> pretrained encoder, the linear
    gain in points, and the steps x batch it trained for."""
    names = list(datasets)
    columns = [f"{name} {column}" for name in names for column in ("kNN", "linear", "gain", "steps x batch")]
    lines = ["| encoder | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    raw = [f"{datasets[name]['rows']['raw_pixels']['knn_top1']:.3f} | "
           f"{datasets[name]['rows']['raw_pixels']['linear_top1']:.3f} | - | -" for name in names]
    lines.append("| raw pixels | " + " | ".join(raw) + " |")
    for method, label in METHODS.items():
        cells = []
        for name in names:
            rows, run = datasets[name]["rows"], datasets[name]["runs"].get(method)
            random, trained = rows.get(f"{method}/random"), rows.get(f"{method}/pretrained")
            if random is None or trained is None:
                cells.append("- | - | - | -")
                continue
            gain = 100 * (trained["linear_top1"] - random["linear_top1"])
            steps = f"{run['steps']} x {run['batch_size']}" if run else "-"
            cells.append(f"{random['knn_top1']:.3f} -> {trained['knn_top1']:.3f} | "
                         f"{random['linear_top1']:.3f} -> {trained['linear_top1']:.3f} | {gain:+.1f} | {steps}")
        if any(cell != "- | - | - | -" for cell in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 steps per method, 500 train / test images")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--minutes", type=float, default=None,
                        help="training budget per method (default: 7 on fashion-mnist, 2.5 on emoji)")
    parser.add_argument("--train-samples", type=int, default=None,
                        help="probe training images (default: 10000 on fashion-mnist, all on emoji)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of the results JSON that this run does not remeasure")
    parser.add_argument("--force", action="store_true",
                        help="re-run the methods runs/compare/bench_ssl_<dataset> holds as finished with these "
                             "settings")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / f"{RESULT}.json", metavar="PATH",
                        help="the results JSON to write (and to read with --merge / --table); default "
                             "bench/results/ssl_probe.json")
    parser.add_argument("--table", action="store_true",
                        help="print the Markdown table of the results JSON and stop (nothing is run)")
    args = parser.parse_args()
    path = args.results
    if args.table:
        print(markdown_table(json.loads(path.read_text())["datasets"]))
        return
    started = time.perf_counter()

    previous = json.loads(path.read_text()) if args.merge and path.exists() else {}
    if args.merge and previous and previous.get("quick") != args.quick:
        sys.exit(f"--merge: {path} holds a {'--quick' if previous.get('quick') else 'full'} run; merge runs of one "
                 f"kind (or drop --merge to replace it)")
    fresh: dict[str, dict] = {}

    datasets = merged(previous, fresh)
    targets: list[Target] = []

    def save(name: str, result: dict) -> None:
        nonlocal datasets, targets
        fresh[name] = result
        datasets = merged(previous, fresh)
        targets = targets_of(datasets)
        write_result(RESULT, {"quick": args.quick, "datasets": datasets,
                              "targets": [target.as_dict() for target in targets],
                              "seconds": time.perf_counter() - started}, path)

    statuses = []
    for name in args.datasets:
        ensure_shards(DATASETS[name])
        comparison = comparison_of(name, args.methods, args.minutes, args.train_samples, args.quick, args.force)
        _, status = compare.run_comparison(
            comparison, on_update=lambda results, name=name, comparison=comparison: save(
                name, bench_result(comparison, results)))
        statuses.append(status)
    print(f"\n{markdown_table(datasets)}\n\nwrote {path}")
    for target in targets:
        print(target.line())
    if any(statuses):
        sys.exit("some methods failed or the run was interrupted (their rows say why; run again to continue)")


if __name__ == "__main__":
    main()
