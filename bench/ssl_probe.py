"""Self-supervised pretraining on two real datasets for the same minutes per method, then kNN and linear probe.

Every self-supervised method of the methods index (those that need neither captions nor labels, read from
`vlp_lightning.methods`, so a new method appears here without edits) trains from its
`experiments/<method>/fashion_mnist_tiny.yaml` when it has one, else by `--model` swap into
`experiments/mae/fashion_mnist_tiny.yaml` with its own tiny constructor defaults, as `vlp fit` would run it, for the
same wall-clock budget (`--minutes`): a short calibration run measures the method's step time, the step count is
set so that the run fills the budget (the warm-up + cosine schedule then completes), and a callback stops the run
if it overshoots. The same recipe trains on each dataset (only the training shards change):

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
Usage: python bench/ssl_probe.py [--quick] [--datasets fashion-mnist emoji] [--methods byol dino ...] [--minutes M]
       [--merge] [--table]
(writes bench/results/ssl_probe.json after every method, `--merge` keeps the rows of methods not rerun; prints the Markdown table of
every row; `python bench/run_all.py --readme-only` updates bench/README.md's targets)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from common import REPO_ROOT, RESULTS_DIR, Target, write_result

sys.path.insert(0, str(REPO_ROOT))

from lightning.pytorch import Callback  # noqa: E402

from data_modules.builder import main as vlp_data  # noqa: E402
from data_modules.pipeline import make_eval_loader  # noqa: E402
from vlp_lightning import methods as method_index  # noqa: E402
from vlp_lightning.callbacks import EvaluationCallback, extract_features  # noqa: E402
from vlp_lightning.callbacks.features import classification_metrics, evaluation_mode  # noqa: E402
from vlp_lightning.callbacks.knn import weighted_knn_scores  # noqa: E402
from vlp_lightning.callbacks.linear_probe import linear_probe_scores  # noqa: E402
from vlp_lightning.cli import VLPCLI  # noqa: E402
from vlp_lightning.demo import build_shards  # noqa: E402
from vlp_lightning.methods.base import VLPMethod  # noqa: E402


def self_supervised_methods() -> dict[str, str]:
    """{recipe folder name: class name} of every index method that learns from images alone."""
    found = {}
    for name in method_index.__all__:
        method = getattr(method_index, name)
        if isinstance(method, type) and issubclass(method, VLPMethod) and method is not VLPMethod:
            if set(method.required_keys) <= {"image"}:
                found[recipe_folder(name)] = name
    return found


def recipe_folder(name: str) -> str:
    """The `experiments/` folder whose recipes train `vlp_lightning.methods.<name>` (its lower-case name if none)."""
    pattern = re.compile(rf"class_path: vlp_lightning\.methods\.{name}\s")
    for folder in sorted((REPO_ROOT / "experiments").iterdir()):
        if any(pattern.search(recipe.read_text()) for recipe in folder.glob("*.yaml")):
            return folder.name
    return name.lower()


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
    num_classes: int = 10


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
SWAP_RECIPE = REPO_ROOT / "experiments" / "mae" / "fashion_mnist_tiny.yaml"
RESULT = "ssl_probe"
#: --quick: a smoke run of the whole script (a few steps, 500 images), its numbers say nothing about the methods.
QUICK = {"steps": 4, "train_samples": 500, "test_samples": 500}
CALIBRATION_STEPS = 12
WARMUP_STEPS = 4  # calibration steps left out of the step time (worker start, first allocations)


class StepTimer(Callback):
    """Wall time at the end of every training batch; stops the run once `limit_s` has passed since the first."""

    def __init__(self, limit_s: float | None = None) -> None:
        self.limit_s = limit_s
        self.ends: list[float] = []
        self.started = 0.0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.ends.append(time.perf_counter())
        if self.limit_s is not None and self.ends[-1] - self.started > self.limit_s:
            trainer.should_stop = True

    @property
    def step_seconds(self) -> float:
        gaps = [b - a for a, b in zip(self.ends[WARMUP_STEPS:], self.ends[WARMUP_STEPS + 1 :])]
        return statistics.median(gaps)

    @property
    def seconds(self) -> float:
        return self.ends[-1] - self.started if self.ends else 0.0


def recipe_of(method: str) -> tuple[Path, list[str]]:
    """The method's own Fashion-MNIST recipe, or MAE's with a `--model` swap to the method."""
    recipe = REPO_ROOT / "experiments" / method / "fashion_mnist_tiny.yaml"
    if recipe.exists():
        return recipe, []
    return SWAP_RECIPE, [f"--model=vlp_lightning.methods.{METHODS[method]}"]


def make_cli(method: str, dataset: str, max_steps: int) -> VLPCLI:
    """The method's experiment, as `vlp fit` builds it, on `dataset`'s pretraining shards, without validation or
    in-run probes (logs and checkpoint in runs/<method>/bench_ssl_<dataset>)."""
    recipe, swap = recipe_of(method)
    cli = VLPCLI(
        args=[
            "--config", str(recipe),
            *swap,
            f"--data.init_args.train_shards={DATASETS[dataset].pretrain}",
            "--data.init_args.val_shards=null",
            f"--trainer.max_steps={max_steps}",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--experiment=bench_ssl_{dataset.replace('-', '_')}",
            "--checkpoint.save_last=false",
        ],
        run=False,
    )
    cli.trainer.callbacks[:] = [c for c in cli.trainer.callbacks if not isinstance(c, EvaluationCallback)]
    return cli


def pretrain(method: str, dataset: str, budget_s: float, steps: int | None = None) -> tuple[VLPCLI, dict]:
    """Calibrate the step time, then train for as many steps as fit in `budget_s` (or exactly `steps`)."""
    step_s = None
    if steps is None:
        calibration = make_cli(method, dataset, CALIBRATION_STEPS)
        timer = StepTimer()
        calibration.trainer.callbacks.append(timer)
        calibration.trainer.fit(calibration.model, datamodule=calibration.datamodule)
        step_s = timer.step_seconds
        steps = max(CALIBRATION_STEPS, int(budget_s / step_s))
        print(f"[{dataset} {method}] {step_s * 1000:.0f} ms/step -> {steps} steps in {budget_s:.0f} s", flush=True)

    cli = make_cli(method, dataset, steps)
    timer = StepTimer(limit_s=budget_s * 1.1)
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    losses = {name: float(value) for name, value in cli.trainer.callback_metrics.items() if "loss" in name}
    recipe, swap = recipe_of(method)
    run = {
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": str(recipe.relative_to(REPO_ROOT)) + (f" {swap[0]}" if swap else ""),
        "calibrated_step_s": step_s,
        "planned_steps": steps,
        "steps": cli.trainer.global_step,
        "train_seconds": timer.seconds,
        "batch_size": cli.datamodule.batch_size,
        "samples_seen": cli.trainer.global_step * cli.datamodule.batch_size,
        "final_losses": losses,
    }
    print(f"[{dataset} {method}] trained {run['steps']} steps in {run['train_seconds']:.0f} s, losses {losses}",
          flush=True)
    return cli, run


def probe_scores(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                 num_classes: int) -> dict[str, float]:
    """kNN and linear-probe top-1 on one feature set."""
    knn = weighted_knn_scores(train, train_labels, test, num_classes, k=20, temperature=0.07)
    linear = linear_probe_scores(train, train_labels, test, num_classes, standardize=True)
    return {
        "knn_top1": classification_metrics(knn, test_labels, num_classes)["top1"],
        "linear_top1": classification_metrics(linear, test_labels, num_classes)["top1"],
    }


def encoder_scores(cli: VLPCLI, data: Dataset, train_samples: int | None, test_samples: int | None) -> dict:
    started = time.perf_counter()
    with evaluation_mode(cli.trainer, cli.model):
        train = extract_features(cli.model, data.probe_train, batch_size=256, max_samples=train_samples)
        test = extract_features(cli.model, data.test, batch_size=256, max_samples=test_samples)
    scores = probe_scores(train.image, train.labels, test.image, test.labels, data.num_classes)
    return {**scores, "feature_dim": train.image.shape[1], "eval_seconds": time.perf_counter() - started}


def raw_pixels(data: Dataset, shards: str, max_samples: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixels (the normalised eval view at the reference size) and labels of the first `max_samples` images."""
    images, labels, count = [], [], 0
    for batch in make_eval_loader(shards, image_size=data.raw_size, batch_size=1000):
        images.append(batch["image"][:, : data.raw_channels].flatten(1))
        labels.append(batch["label"])
        count += len(labels[-1])
        if max_samples is not None and count >= max_samples:
            break
    return torch.cat(images)[:max_samples], torch.cat(labels)[:max_samples]


def ensure_shards(data: Dataset) -> None:
    if not all(Path(manifest).exists() for manifest in data.manifests):  # relative, as the shard patterns
        print(f"building the shards of {', '.join(data.manifests)} with vlp-data", flush=True)
        status = data.build()
        if status:
            sys.exit(status)


def run_dataset(name: str, methods: list[str], minutes: float | None, train_samples: int | None,
                quick: bool, save: Callable[[dict], None]) -> dict:
    """Raw pixels, then every method's random and pretrained encoder on one dataset: {config, rows, runs}, handed
    to `save` after every method (a crash or an interrupt keeps the methods already measured)."""
    data = DATASETS[name]
    ensure_shards(data)
    minutes = minutes or data.minutes
    train_samples = train_samples or (QUICK["train_samples"] if quick else data.train_samples)
    test_samples = QUICK["test_samples"] if quick else None
    train_pixels, train_labels = raw_pixels(data, data.probe_train, train_samples)
    test_pixels, test_labels = raw_pixels(data, data.test, test_samples)
    rows = {"raw_pixels": probe_scores(train_pixels, train_labels, test_pixels, test_labels, data.num_classes)}
    print(f"[{name} raw pixels] {rows['raw_pixels']}", flush=True)
    runs: dict[str, dict] = {}
    config = {"minutes_per_method": minutes, "train_samples": len(train_labels), "test_samples": len(test_labels),
              "quick_steps": QUICK["steps"] if quick else None}
    result = {"config": config, "rows": rows, "runs": runs}
    for method in methods:
        random_cli = make_cli(method, name, 1)
        rows[f"{method}/random"] = encoder_scores(random_cli, data, train_samples, test_samples)
        print(f"[{name} {method} random weights] {rows[f'{method}/random']}", flush=True)
        del random_cli
        cli, runs[method] = pretrain(method, name, minutes * 60, QUICK["steps"] if quick else None)
        rows[f"{method}/pretrained"] = encoder_scores(cli, data, train_samples, test_samples)
        print(f"[{name} {method} pretrained] {rows[f'{method}/pretrained']}", flush=True)
        del cli
        save(result)
    return result


def merged(previous: dict, fresh: dict) -> dict:
    """`previous`'s datasets with `fresh`'s rows and runs laid over them (the raw-pixel row and config too)."""
    datasets = {name: dict(result) for name, result in previous.get("datasets", {}).items()}
    for name, result in fresh.items():
        old = datasets.get(name, {"rows": {}, "runs": {}})
        datasets[name] = {
            "config": result["config"],
            "rows": {**old["rows"], **result["rows"]},
            "runs": {**old["runs"], **result["runs"]},
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
                        help="keep the rows of bench/results/ssl_probe.json that this run does not remeasure")
    parser.add_argument("--table", action="store_true",
                        help="print the Markdown table of bench/results/ssl_probe.json and stop (nothing is run)")
    args = parser.parse_args()
    path = RESULTS_DIR / f"{RESULT}.json"
    if args.table:
        print(markdown_table(json.loads(path.read_text())["datasets"]))
        return
    sys.argv[1:] = []  # the experiments are configured by VLPCLI(args=...), not by this script's options
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
                              "seconds": time.perf_counter() - started})

    for name in args.datasets:
        save(name, run_dataset(name, args.methods, args.minutes, args.train_samples, args.quick,
                               lambda result, name=name: save(name, result)))
    print(f"\n{markdown_table(datasets)}\n\nwrote {path}")
    for target in targets:
        print(target.line())


if __name__ == "__main__":
    main()
