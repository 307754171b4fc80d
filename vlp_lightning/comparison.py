"""One method of a `vlp compare` run: train it for a budget, then score its frozen features; and the raw-pixel
reference. `vlp_lightning.commands.compare` runs `run_method` in a subprocess per method and collects the results.

Budget. `Budget(steps=N)` trains exactly N optimizer steps. `Budget(minutes=M)` first runs a short calibration
(`CALIBRATION_STEPS` steps of the same experiment, the first `WARMUP_STEPS` left out: worker start, first
allocations) to measure the median step time, then sets `max_steps` so that the run fills M minutes: the recipe's
warm-up + cosine schedule (and any EMA or temperature schedule over steps) then runs to its end, which a time limit
would cut short. A callback stops a run that overshoots the budget by more than 10 %.

Scores (the ones the suite's `KNNClassifier` and `LinearProbe` callbacks compute, with the same functions) on
`probe_features`, the layer each method hands to probes, extracted in eval mode under the trainer's precision:

- kNN: weighted k = 20 neighbours, cosine, T = 0.07 (Wu et al. 2018; DINO's defaults);
- linear probe: multinomial logistic regression (L-BFGS, C = 1) on features standardised with the training mean
  and deviation, as MAE's linear probe does with a BatchNorm without affine (He et al. 2021, App. A.2).

The random-init reference is the same model before its first step (its weights are kept in memory and put back
after the pretrained encoder is scored), so it is exactly the start the training had. Raw pixels: the eval view's
normalised pixels at a given size, flattened.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from torch import Tensor

from data_modules.manifest import class_count
from data_modules.pipeline import expand_shards, make_eval_loader, manifest_of
from vlp_lightning.callbacks.features import (
    EvaluationCallback,
    classification_metrics,
    evaluation_mode,
    extract_features,
)
from vlp_lightning.callbacks.knn import weighted_knn_scores
from vlp_lightning.callbacks.linear_probe import linear_probe_scores
from vlp_lightning.cli import VLPCLI

CALIBRATION_STEPS = 12
WARMUP_STEPS = 4  # calibration steps left out of the step time (worker start, first allocations)
#: a budgeted run is stopped once it has run this much longer than its budget.
OVERSHOOT = 1.1
KNN_NEIGHBOURS = 20
KNN_TEMPERATURE = 0.07


@dataclass(frozen=True)
class Budget:
    """Training budget per method: exactly `steps` optimizer steps, or as many as fit in `minutes`."""

    steps: int | None = None
    minutes: float | None = None

    def describe(self) -> str:
        return f"{self.steps} steps" if self.steps is not None else f"{self.minutes:g} min"


@dataclass(frozen=True)
class Probe:
    """Labelled shards (`.cls`) the probes fit on (`train_shards`) and score on (`test_shards`); the first
    `train_samples` / `test_samples` of each (None: all)."""

    train_shards: str
    test_shards: str
    train_samples: int | None = None
    test_samples: int | None = None
    batch_size: int = 256


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


def report(message: str) -> None:
    """A progress line `vlp compare` shows while the method runs (the rest of the output goes to its log)."""
    print(f"compare: {message}", flush=True)


def build_cli(vlp_args: list[str], max_steps: int, root: Path, calibration: bool = False) -> VLPCLI:
    """The experiment as `vlp fit` builds it, for `max_steps` steps, with its logs and checkpoint in `root` (a
    calibration run saves no checkpoint), and without the recipe's in-run evaluation callbacks (every method is
    scored afterwards, the same way)."""
    extra = ["--checkpoint.save_top_k=0", "--checkpoint.save_last=false"] if calibration else []
    cli = VLPCLI(
        args=[*vlp_args, f"--trainer.max_steps={max_steps}", f"--trainer.default_root_dir={root}", *extra],
        run=False,
    )
    cli.trainer.callbacks[:] = [c for c in cli.trainer.callbacks if not isinstance(c, EvaluationCallback)]
    return cli


def calibrated_steps(vlp_args: list[str], budget_s: float, root: Path) -> tuple[int, float]:
    """(steps that fill `budget_s`, measured seconds per step) from a `CALIBRATION_STEPS`-step run."""
    calibration = build_cli(vlp_args, CALIBRATION_STEPS, root / "calibration", calibration=True)
    timer = StepTimer()
    calibration.trainer.callbacks.append(timer)
    calibration.trainer.fit(calibration.model, datamodule=calibration.datamodule)
    step_s = timer.step_seconds
    steps = max(CALIBRATION_STEPS, int(budget_s / step_s))
    steps = calibration.trainer.strategy.broadcast(steps)  # every rank trains for rank 0's count
    return steps, step_s


def train_for_budget(
    vlp_args: list[str], budget: Budget, root: Path, keep_initial_weights: bool = False
) -> tuple[VLPCLI, dict, dict[str, Tensor] | None]:
    """Train for the budget; returns the trained experiment, what the run did, and (when asked) the weights it
    started from."""
    step_s = None
    steps = budget.steps
    budget_s = None if budget.minutes is None else budget.minutes * 60
    if steps is None:
        steps, step_s = calibrated_steps(vlp_args, budget_s, root)
        report(f"{step_s * 1000:.0f} ms/step -> {steps} steps in {budget_s:.0f} s")
    cli = build_cli(vlp_args, steps, root)
    initial = copy.deepcopy(cli.model.state_dict()) if keep_initial_weights else None
    timer = StepTimer(limit_s=None if budget_s is None else budget_s * OVERSHOOT)
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    losses = {name: float(value) for name, value in cli.trainer.callback_metrics.items() if "loss" in name}
    non_finite = [name for name, value in losses.items() if not torch.isfinite(torch.tensor(value))]
    if non_finite:
        raise FloatingPointError(f"the run ended with a non-finite {non_finite[0]}")
    run = {
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "calibrated_step_s": step_s,
        "planned_steps": steps,
        "steps": cli.trainer.global_step,
        "train_seconds": timer.seconds,
        "batch_size": cli.datamodule.batch_size,
        "samples_seen": cli.trainer.global_step * cli.datamodule.batch_size,
        "final_losses": losses,
    }
    report(f"trained {run['steps']} steps in {run['train_seconds']:.0f} s, losses {losses}")
    return cli, run, initial


def probe_classes(probe: Probe, train_labels: Tensor, test_labels: Tensor) -> int:
    """Classes of the probe data: the count its manifest names, else the largest label seen + 1."""
    named = class_count(manifest_of(expand_shards(probe.train_shards)))
    return named or int(max(train_labels.max(), test_labels.max())) + 1


def probe_scores(train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor,
                 num_classes: int) -> dict[str, float]:
    """kNN and linear-probe top-1 on one feature set."""
    knn = weighted_knn_scores(train, train_labels, test, num_classes, k=KNN_NEIGHBOURS, temperature=KNN_TEMPERATURE)
    linear = linear_probe_scores(train, train_labels, test, num_classes, standardize=True)
    return {
        "knn_top1": classification_metrics(knn, test_labels, num_classes)["top1"],
        "linear_top1": classification_metrics(linear, test_labels, num_classes)["top1"],
    }


def encoder_scores(cli: VLPCLI, probe: Probe) -> dict:
    """kNN and linear-probe top-1 of the experiment's `probe_features`, its width, the probe sizes and the time."""
    started = time.perf_counter()
    cli.model.to(cli.trainer.strategy.root_device)  # Lightning hands the model back on the CPU after fit
    with evaluation_mode(cli.trainer, cli.model):
        train = extract_features(cli.model, probe.train_shards, probe.batch_size, max_samples=probe.train_samples)
        test = extract_features(cli.model, probe.test_shards, probe.batch_size, max_samples=probe.test_samples)
    if train.labels is None or test.labels is None:
        raise ValueError("the probe shards have no .cls labels")
    if not (torch.isfinite(train.image).all() and torch.isfinite(test.image).all()):
        raise FloatingPointError("the encoder's probe features are not finite")
    num_classes = probe_classes(probe, train.labels, test.labels)
    scores = probe_scores(train.image, train.labels, test.image, test.labels, num_classes)
    return {**scores, "feature_dim": train.image.shape[1], "train_samples": len(train), "test_samples": len(test),
            "eval_seconds": time.perf_counter() - started}


def raw_pixels(shards: str, size: int, channels: int, max_samples: int | None) -> tuple[Tensor, Tensor]:
    """The pixels (the normalised eval view at `size`, first `channels` channels) and labels of the first
    `max_samples` images."""
    images, labels, count = [], [], 0
    for batch in make_eval_loader(shards, image_size=size, batch_size=1000):
        images.append(batch["image"][:, :channels].flatten(1))
        labels.append(batch["label"])
        count += len(labels[-1])
        if max_samples is not None and count >= max_samples:
            break
    return torch.cat(images)[:max_samples], torch.cat(labels)[:max_samples]


def raw_pixel_scores(probe: Probe, size: int, channels: int) -> dict:
    """kNN and linear-probe top-1 of the raw pixels, the reference a learned representation should beat."""
    train, train_labels = raw_pixels(probe.train_shards, size, channels, probe.train_samples)
    test, test_labels = raw_pixels(probe.test_shards, size, channels, probe.test_samples)
    scores = probe_scores(train, train_labels, test, test_labels, probe_classes(probe, train_labels, test_labels))
    return {**scores, "feature_dim": train.shape[1], "train_samples": len(train_labels),
            "test_samples": len(test_labels)}


def run_method(vlp_args: list[str], budget: Budget, probe: Probe, root: Path, random_init: bool) -> tuple[dict, bool]:
    """Train one method for the budget and score it: ({"run", "scores", "random_init"}, whether this process is
    global rank 0, the one that reports); "random_init" is None unless asked for."""
    cli, run, initial = train_for_budget(vlp_args, budget, root, keep_initial_weights=random_init)
    scores = encoder_scores(cli, probe)
    report(f"pretrained encoder: kNN {scores['knn_top1']:.3f}, linear {scores['linear_top1']:.3f}")
    random_scores = None
    if initial is not None:
        cli.model.load_state_dict(initial)
        random_scores = encoder_scores(cli, probe)
        report(f"random-init encoder: kNN {random_scores['knn_top1']:.3f}, "
               f"linear {random_scores['linear_top1']:.3f}")
    return {"run": run, "scores": scores, "random_init": random_scores}, cli.trainer.is_global_zero
