"""Regression probe: an MLP on frozen image features predicting a numeric `.json` field (UrbanCLIP's indicator probe).

UrbanCLIP (Yan et al. 2024) scores region representations by regressing urban indicators (carbon emission,
population, GDP) from the frozen model's image embeddings. The official probe (StupidBuluchacha/UrbanCLIP,
`mlp.py`), reproduced here:

* the normalised `encode_image` embedding -> Linear(D, 256) -> ReLU -> Dropout(0.01) -> Linear(256, 1);
* MSE on the target z-scored with the mean and (population) standard deviation of the rows it is fitted on;
* AdamW lr 3e-4, weight decay 0.01, batch 2 (shuffled, the last partial batch dropped), 100 epochs;
* the training samples shuffled and split 80 / 20 into fit / validation rows, the epoch of lowest validation MSE
  kept;
* R², RMSE, MAE and MAPE of the predictions, back in the target's units, on the held-out samples.

The features are computed once per evaluation pass (`EvaluationCallback.features`); the MLP is trained in float32
on the CPU from a fixed seed (initialisation, shuffling and dropout draw from a forked RNG, the global one is left
as it was), so every rank computes the same numbers and a rerun repeats them. As a reference, the R² of a
closed-form ridge regression on the same training features (scikit-learn's `Ridge(alpha)` with an intercept) is
logged as `ridge_R2`.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torchmetrics.functional import (
    mean_absolute_error,
    mean_absolute_percentage_error,
    mean_squared_error,
    r2_score,
)

from vlp_lightning.callbacks.features import EvalFeatures, EvaluationCallback, Representation, has_joint_space


def numeric_targets(features: EvalFeatures, field: str, shards: str) -> Tensor:
    """The `.json` field `field` of every sample as float64 [N]; one sentence naming the first sample without it or
    with a value that is not a finite number (a number, or a string of one as CSV-built shards hold)."""
    if features.meta is None:
        raise ValueError(
            f"target_field={field!r}: the samples of {shards} have no .json member; build the shards with a numeric "
            f"field {field!r} in each sample's metadata"
        )
    values = []
    for key, entry in zip(features.keys, features.meta):
        if field not in entry:
            raise ValueError(
                f"target_field={field!r}: sample {key!r} of {shards} has no such .json field; choose a numeric field "
                f"every sample has (this one has {', '.join(sorted(entry)) or 'none'})"
            )
        number = _as_number(entry[field])
        if number is None:
            raise ValueError(
                f"target_field={field!r}: sample {key!r} of {shards} has the value {entry[field]!r}, which is not a "
                "finite number; choose a numeric .json field"
            )
        values.append(number)
    return torch.tensor(values, dtype=torch.float64)


def _as_number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


class RegressionMLP(nn.Sequential):
    """UrbanCLIP's probe head: Linear(D, hidden) -> ReLU -> Dropout -> Linear(hidden, 1)."""

    def __init__(self, in_features: int, hidden_dim: int = 256, dropout: float = 0.01) -> None:
        super().__init__(
            nn.Linear(in_features, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, 1)
        )

    def forward(self, features: Tensor) -> Tensor:
        return super().forward(features).squeeze(-1)


def regression_probe_predictions(
    train: Tensor,
    train_targets: Tensor,
    test: Tensor,
    hidden_dim: int = 256,
    dropout: float = 0.01,
    epochs: int = 100,
    lr: float = 3e-4,
    weight_decay: float = 0.01,
    batch_size: int = 2,
    validation_fraction: float = 0.2,
    seed: int = 0,
) -> Tensor:
    """Predictions [N_test] (float64, in the targets' units) of the MLP probe of the module doc fitted on `train`
    [N, D] / `train_targets` [N]; `validation_fraction` of the training rows choose the epoch (0: the last one).

    A constant target is predicted as its value (z-scoring divides by 1). Runs on the CPU with gradients on, even
    when called under `torch.no_grad` / `inference_mode` / autocast."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            x, y = train.detach().float().cpu().clone(), train_targets.detach().double().cpu().clone()
            order = torch.randperm(len(x))
            held_out = min(len(x) - 1, round(len(x) * validation_fraction)) if validation_fraction > 0 else 0
            fit_rows, val_rows = order[held_out:], order[:held_out]
            mean = y[fit_rows].mean()
            std = y[fit_rows].std(unbiased=False) if len(fit_rows) > 1 else torch.zeros((), dtype=torch.float64)
            std = std if std > 0 else torch.ones_like(std)  # a constant target: predict its mean
            z = ((y - mean) / std).float()
            model = RegressionMLP(x.shape[1], hidden_dim, dropout)
            # fused: one kernel per step instead of a loop over the tensors (batch-2 steps are all overhead)
            optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
            step = max(1, min(batch_size, len(fit_rows)))
            best_loss, best_state = math.inf, None
            for _ in range(epochs):
                model.train()
                batches = len(fit_rows) // step  # drop_last=True, as the official loader
                rows = fit_rows[torch.randperm(len(fit_rows))][: batches * step]
                inputs, outputs = x[rows].view(batches, step, -1), z[rows].view(batches, step)
                for batch_inputs, batch_outputs in zip(inputs, outputs):
                    loss = F.mse_loss(model(batch_inputs), batch_outputs)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                if held_out:
                    model.eval()
                    with torch.no_grad():
                        val_loss = F.mse_loss(model(x[val_rows]), z[val_rows]).item()
                    if val_loss < best_loss:
                        best_loss, best_state = val_loss, copy.deepcopy(model.state_dict())
            if best_state is not None:
                model.load_state_dict(best_state)
            model.eval()
            with torch.no_grad():
                return model(test.detach().float().cpu()).double() * std + mean


def ridge_predictions(train: Tensor, train_targets: Tensor, test: Tensor, alpha: float = 1.0) -> Tensor:
    """Predictions [N_test] (float64) of the ridge regression minimising ||y - X w - b||² + alpha ||w||² on `train`
    (closed form, the intercept unpenalised: scikit-learn's `Ridge(alpha)`)."""
    x, y = train.detach().double().cpu(), train_targets.detach().double().cpu()
    x_mean, y_mean = x.mean(0), y.mean()
    centred = x - x_mean
    gram = centred.T @ centred + alpha * torch.eye(x.shape[1], dtype=torch.float64)
    weight = torch.linalg.solve(gram, centred.T @ (y - y_mean))
    return (test.detach().double().cpu() - x_mean) @ weight + y_mean


def regression_metrics(predictions: Tensor, targets: Tensor) -> dict[str, float]:
    """R² (torchmetrics: 0 for a target without variance unless predicted exactly), RMSE, MAE and MAPE."""
    predictions, targets = predictions.double(), targets.double()
    return {
        "R2": r2_score(predictions, targets).item(),
        "RMSE": mean_squared_error(predictions, targets, squared=False).item(),
        "MAE": mean_absolute_error(predictions, targets).item(),
        "MAPE": mean_absolute_percentage_error(predictions, targets).item(),
    }


class RegressionProbe(EvaluationCallback):
    """An MLP regressing a numeric `.json` field from frozen image features (UrbanCLIP's indicator probe, module
    doc): fitted on `train_shards`, scored on `test_shards`, logged as `regression/<name>/R2`, `.../RMSE`,
    `.../MAE`, `.../MAPE` (the target's units) with the closed-form ridge regression's `.../ridge_R2`.

    Args:
        train_shards: shard pattern to fit on (each sample's `.json` has `target_field`).
        test_shards: shard pattern to score.
        target_field: the numeric `.json` field to predict (a number, or a string of one).
        name: metric prefix.
        representation: "joint" — the normalised `encode_image` embedding, as UrbanCLIP; "probe" — `probe_features`.
        hidden_dim, dropout: the MLP's hidden width and dropout (256, 0.01).
        epochs, lr, weight_decay, fit_batch_size: its AdamW training (100, 3e-4, 0.01, batch 2).
        validation_fraction: training samples held out to choose the epoch of lowest MSE (0.2; 0: the last epoch).
        ridge_alpha: the reference ridge regression's penalty.
        seed: seed of the MLP's initialisation, shuffling, split and dropout.
        max_samples: use the first this many samples of each split (None: all).
        every_n_epochs, batch_size, num_workers: see `EvaluationCallback` (`batch_size` is images per encoder call).
    """

    def __init__(
        self,
        train_shards: str,
        test_shards: str,
        target_field: str,
        name: str = "regression",
        representation: Representation = "joint",
        hidden_dim: int = 256,
        dropout: float = 0.01,
        epochs: int = 100,
        lr: float = 3e-4,
        weight_decay: float = 0.01,
        fit_batch_size: int = 2,
        validation_fraction: float = 0.2,
        ridge_alpha: float = 1.0,
        seed: int = 0,
        max_samples: int | None = None,
        every_n_epochs: int = 1,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, batch_size=batch_size, num_workers=num_workers)
        if representation not in ("joint", "probe"):
            raise ValueError(f"representation={representation!r} is not one of 'joint' (encode_image) and 'probe'")
        if not 0 <= validation_fraction < 1:
            raise ValueError(f"validation_fraction={validation_fraction} must be in [0, 1); 0.2 is the official split")
        if fit_batch_size < 1 or epochs < 1:
            raise ValueError(f"fit_batch_size={fit_batch_size} and epochs={epochs} must be at least 1")
        self.train_shards = train_shards
        self.test_shards = test_shards
        self.target_field = target_field
        self.name = name
        self.representation = representation
        self.hidden_dim = hidden_dim
        self.dropout = dropout
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.fit_batch_size = fit_batch_size
        self.validation_fraction = validation_fraction
        self.ridge_alpha = ridge_alpha
        self.seed = seed
        self.max_samples = max_samples

    def evaluate(self, trainer: Trainer, method: LightningModule) -> dict[str, float]:
        if self.representation == "joint" and not has_joint_space(method):
            raise ValueError(
                f"representation='joint' needs a method with a joint image-text space (encode_image), which "
                f"{type(method).__name__} has not; use representation='probe'"
            )
        train = self.features(method, self.train_shards, self.max_samples, self.representation)
        test = self.features(method, self.test_shards, self.max_samples, self.representation)
        train_targets = numeric_targets(train, self.target_field, self.train_shards)
        test_targets = numeric_targets(test, self.target_field, self.test_shards)
        if len(train_targets) and bool((train_targets == train_targets[0]).all()):
            raise ValueError(
                f"target_field={self.target_field!r} is {train_targets[0].item():g} in every sample of "
                f"{self.train_shards}; a regression probe needs a target that varies"
            )
        predictions = regression_probe_predictions(
            train.image, train_targets, test.image, self.hidden_dim, self.dropout, self.epochs, self.lr,
            self.weight_decay, self.fit_batch_size, self.validation_fraction, self.seed,
        )
        metrics = regression_metrics(predictions, test_targets)
        ridge = ridge_predictions(train.image, train_targets, test.image, self.ridge_alpha)
        metrics["ridge_R2"] = regression_metrics(ridge, test_targets)["R2"]
        return {f"regression/{self.name}/{metric}": value for metric, value in metrics.items()}
