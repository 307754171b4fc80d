"""Self-supervised pretraining on Fashion-MNIST for the same minutes per method, then kNN and linear probe.

Every self-supervised method of the methods index (those that need neither captions nor labels, read from
`vlp_lightning.methods`, so a new method appears here without edits) trains from its
`experiments/<method>/fashion_mnist_tiny.yaml` when it has one, else by `--model` swap into
`experiments/mae/fashion_mnist_tiny.yaml` with its own tiny constructor defaults, as `vlp fit` would run it, for the
same wall-clock budget (`--minutes`): a short calibration run measures the method's step
time, the step count is set so that the run fills the budget (the warm-up + cosine schedule then completes), and a
callback stops the run if it overshoots. The trained encoder is then scored on frozen features of the 10,000 test
images against the first `--train-samples` training images:

- kNN: weighted k = 20 neighbours, cosine, T = 0.07 (the suite's `KNNClassifier`);
- linear probe: multinomial logistic regression (L-BFGS, C = 1) on features standardised with the training
  mean and deviation, as MAE's linear probe does with a BatchNorm without affine (He et al. 2021, App. A.2).

Two references are measured in the same run with the same code: a linear classifier (and kNN) on the raw 28x28
pixels, and each method's encoder with the random weights it starts from (same config, same seed, no training).
A method has learned something when its probe beats its own random encoder by at least a point (the standard
error of an accuracy near 0.8 on 10k images is 0.4 points); that is the target per method.

Shards: `data/fashion-mnist`, built with `vlp-data fashion-mnist` when missing (Debian `dataset-fashion-mnist`).
Usage: python bench/ssl_fashion_mnist.py [--quick] [--minutes 7] [--methods swav mae selfie sit byol ...]
(writes bench/results/ssl_fashion_mnist.json; `python bench/run_all.py --readme-only` updates bench/README.md)
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import REPO_ROOT, Target, write_result

sys.path.insert(0, str(REPO_ROOT))

from lightning.pytorch import Callback  # noqa: E402

from data_modules.builder import main as vlp_data  # noqa: E402
from data_modules.pipeline import make_eval_loader  # noqa: E402
from vlp_lightning.callbacks import EvaluationCallback, extract_features  # noqa: E402
from vlp_lightning.callbacks.features import classification_metrics, evaluation_mode  # noqa: E402
from vlp_lightning.callbacks.knn import weighted_knn_scores  # noqa: E402
from vlp_lightning.callbacks.linear_probe import linear_probe_scores  # noqa: E402
from vlp_lightning import methods as method_index  # noqa: E402
from vlp_lightning.cli import VLPCLI  # noqa: E402
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


METHODS = self_supervised_methods()
#: the recipe a method without a Fashion-MNIST recipe of its own is swapped into (data, schedule, trainer).
SWAP_RECIPE = REPO_ROOT / "experiments" / "mae" / "fashion_mnist_tiny.yaml"
SHARDS = Path("data/fashion-mnist")
TRAIN = str(SHARDS / "train-{000000..000059}.tar")
TEST = str(SHARDS / "test-{000000..000009}.tar")
#: --quick: a smoke run of the whole script (a few steps, 500 images), its numbers say nothing about the methods.
QUICK = {"steps": 4, "train_samples": 500, "test_samples": 500}
NUM_CLASSES = 10
CALIBRATION_STEPS = 12
EXPERIMENT = "bench_ssl_fashion_mnist"
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


def make_cli(method: str, max_steps: int) -> VLPCLI:
    """The method's Fashion-MNIST experiment, as `vlp fit` builds it, without validation or in-run probes
    (logs and checkpoint in runs/<method>/bench_ssl_fashion_mnist)."""
    recipe = REPO_ROOT / "experiments" / method / "fashion_mnist_tiny.yaml"
    swap = [] if recipe.exists() else [f"--model=vlp_lightning.methods.{METHODS[method]}"]
    cli = VLPCLI(
        args=[
            "--config", str(recipe if recipe.exists() else SWAP_RECIPE),
            *swap,
            f"--data.init_args.train_shards={TRAIN}",
            "--data.init_args.val_shards=null",
            f"--trainer.max_steps={max_steps}",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--experiment={EXPERIMENT}",
            "--checkpoint.save_last=false",
        ],
        run=False,
    )
    cli.trainer.callbacks[:] = [c for c in cli.trainer.callbacks if not isinstance(c, EvaluationCallback)]
    return cli


def pretrain(method: str, budget_s: float, steps: int | None = None) -> tuple[VLPCLI, dict]:
    """Calibrate the step time, then train for as many steps as fit in `budget_s` (or exactly `steps`)."""
    step_s = None
    if steps is None:
        calibration = make_cli(method, CALIBRATION_STEPS)
        timer = StepTimer()
        calibration.trainer.callbacks.append(timer)
        calibration.trainer.fit(calibration.model, datamodule=calibration.datamodule)
        step_s = timer.step_seconds
        steps = max(CALIBRATION_STEPS, int(budget_s / step_s))
        print(f"[{method}] {step_s * 1000:.0f} ms/step -> {steps} steps in {budget_s:.0f} s", flush=True)

    cli = make_cli(method, steps)
    timer = StepTimer(limit_s=budget_s * 1.1)
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    losses = {name: float(value) for name, value in cli.trainer.callback_metrics.items() if "loss" in name}
    run = {
        "calibrated_step_s": step_s,
        "planned_steps": steps,
        "steps": cli.trainer.global_step,
        "train_seconds": timer.seconds,
        "batch_size": cli.datamodule.batch_size,
        "samples_seen": cli.trainer.global_step * cli.datamodule.batch_size,
        "final_losses": losses,
    }
    print(f"[{method}] trained {run['steps']} steps in {run['train_seconds']:.0f} s, losses {losses}", flush=True)
    return cli, run


def probe_scores(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor):
    """kNN and linear-probe top-1 on one feature set."""
    knn = weighted_knn_scores(train, train_labels, test, NUM_CLASSES, k=20, temperature=0.07)
    linear = linear_probe_scores(train, train_labels, test, NUM_CLASSES, standardize=True)
    return {
        "knn_top1": classification_metrics(knn, test_labels, NUM_CLASSES)["top1"],
        "linear_top1": classification_metrics(linear, test_labels, NUM_CLASSES)["top1"],
    }


def encoder_scores(cli: VLPCLI, train_samples: int, test_samples: int) -> dict[str, float]:
    started = time.perf_counter()
    with evaluation_mode(cli.trainer, cli.model):
        train = extract_features(cli.model, TRAIN, batch_size=256, max_samples=train_samples)
        test = extract_features(cli.model, TEST, batch_size=256, max_samples=test_samples)
    scores = probe_scores(train.image, train.labels, test.image, test.labels)
    return {**scores, "feature_dim": train.image.shape[1], "eval_seconds": time.perf_counter() - started}


def raw_pixels(shards: str, max_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 28x28 pixels (one channel of the normalised eval view) and labels of the first `max_samples` images."""
    images, labels, count = [], [], 0
    for batch in make_eval_loader(shards, image_size=28, batch_size=1000):
        images.append(batch["image"][:, 0].flatten(1))
        labels.append(batch["label"])
        count += len(labels[-1])
        if count >= max_samples:
            break
    return torch.cat(images)[:max_samples], torch.cat(labels)[:max_samples]


def ensure_shards() -> None:
    if not (SHARDS / "manifest.json").exists():
        print(f"building {SHARDS} with vlp-data fashion-mnist", flush=True)
        status = vlp_data(["fashion-mnist", str(SHARDS)])
        if status:
            sys.exit(status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 steps per method, 500 train / test images")
    parser.add_argument("--minutes", type=float, default=None, help="training budget per method (default 7)")
    parser.add_argument("--train-samples", type=int, default=None, help="probe training images (default 10000)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    args = parser.parse_args()
    sys.argv[1:] = []  # the experiments are configured by VLPCLI(args=...), not by this script's options
    minutes = args.minutes or 7.0
    train_samples = args.train_samples or (QUICK["train_samples"] if args.quick else 10000)
    test_samples = QUICK["test_samples"] if args.quick else 10000
    started = time.perf_counter()

    ensure_shards()
    train_pixels, train_labels = raw_pixels(TRAIN, train_samples)
    test_pixels, test_labels = raw_pixels(TEST, test_samples)
    rows: dict[str, dict] = {"raw_pixels": probe_scores(train_pixels, train_labels, test_pixels, test_labels)}
    print(f"[raw pixels] {rows['raw_pixels']}", flush=True)

    runs = {}
    for method in args.methods:
        random_cli = make_cli(method, 1)
        rows[f"{method}/random"] = encoder_scores(random_cli, train_samples, test_samples)
        print(f"[{method} random weights] {rows[f'{method}/random']}", flush=True)
        del random_cli
        cli, runs[method] = pretrain(method, minutes * 60, QUICK["steps"] if args.quick else None)
        rows[f"{method}/pretrained"] = encoder_scores(cli, train_samples, test_samples)
        print(f"[{method} pretrained] {rows[f'{method}/pretrained']}", flush=True)
        del cli

    budget = f"{QUICK['steps']} steps" if args.quick else f"{minutes:g} min"
    print(f"\n{'encoder':<20} {'kNN top-1':>9} {'linear top-1':>12}   ({len(test_labels)} test images, "
          f"{train_samples} train, {budget} per method)")
    for name, row in rows.items():
        print(f"{name:<20} {row['knn_top1']:>9.3f} {row['linear_top1']:>12.3f}")
    targets = [
        Target(
            f"{method}_linear_probe_minus_random",
            rows[f"{method}/pretrained"]["linear_top1"] - rows[f"{method}/random"]["linear_top1"],
            0.01,
        )
        for method in args.methods
    ]
    path = write_result(
        "ssl_fashion_mnist",
        {
            "quick": args.quick,
            "config": {"minutes_per_method": minutes, "train_samples": train_samples,
                       "test_samples": len(test_labels), "quick_steps": QUICK["steps"] if args.quick else None},
            "rows": rows,
            "runs": runs,
            "targets": [target.as_dict() for target in targets],
            "seconds": time.perf_counter() - started,
        },
    )
    print(f"\nwrote {path}")
    for target in targets:
        print(target.line())


if __name__ == "__main__":
    main()
