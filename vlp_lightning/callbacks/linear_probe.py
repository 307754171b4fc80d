"""Linear probe: multinomial logistic regression on frozen image features.

CLIP (Radford et al. 2021) sec. 3.2 and appendix A.3 evaluate representations with scikit-learn's L-BFGS logistic
regression; this is the same model and objective, solved in torch so it runs where the features are:

    minimise  C * sum_i cross_entropy(W x_i + b, y_i) + ||W||^2 / 2      (the bias is not regularised)

with `C` = `inverse_regularization` as in scikit-learn's `LogisticRegression(C=...)`. It is solved full-batch by
L-BFGS with a strong-Wolfe line search from zero weights in float64, so the result is deterministic (no seed, no
sampling) and matches scikit-learn's on the same features. `standardize=True` first scales every feature to zero
mean and unit deviation over the training set, as MAE's linear probe does with a BatchNorm without affine
(He et al. 2021, App. A.2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from vlp_lightning.callbacks.features import EvaluationCallback, classification_metrics, module_device


def fit_logistic_regression(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    inverse_regularization: float = 1.0,
    max_iter: int = 1000,
    tolerance: float = 1e-9,
) -> tuple[Tensor, Tensor]:
    """Weight [C, D] and bias [C] minimising the objective of the module doc (float64, on `features.device`).

    Runs with gradients on even when called under `torch.no_grad` / `inference_mode` (an evaluation loop)."""
    with torch.inference_mode(False), torch.enable_grad():
        x, labels = features.double().clone(), labels.clone()  # normal tensors, even from an inference-mode pass
        return _fit_logistic_regression(x, labels, num_classes, inverse_regularization, max_iter, tolerance)


def _fit_logistic_regression(
    x: Tensor, labels: Tensor, num_classes: int, inverse_regularization: float, max_iter: int, tolerance: float
) -> tuple[Tensor, Tensor]:
    count = x.shape[0]
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tolerance,
        tolerance_change=tolerance * 1e-3,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        # The objective divided by C * count: same minimiser, gradients of order one for the tolerances.
        penalty = weight.square().sum() / (2 * inverse_regularization * count)
        loss = F.cross_entropy(x @ weight.T + bias, labels) + penalty
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def linear_probe_scores(
    train: Tensor,
    train_labels: Tensor,
    test: Tensor,
    num_classes: int,
    inverse_regularization: float = 1.0,
    max_iter: int = 1000,
    standardize: bool = False,
) -> Tensor:
    """Class scores [N_test, C] (float64, on `test.device`) of a logistic regression fitted on `train`."""
    if standardize:
        mean, std = train.double().mean(0), train.double().std(0).clamp_min(1e-6)
        train, test = (train.double() - mean) / std, (test.double() - mean) / std
    weight, bias = fit_logistic_regression(train, train_labels, num_classes, inverse_regularization, max_iter)
    return test.double().to(weight.device) @ weight.T + bias


class LinearProbe(EvaluationCallback):
    """Logistic regression trained on `train_shards` features, top-1 / top-5 accuracy on `test_shards`, logged as
    `linear_probe/<name>/top1`, `.../top5`, with the probed feature width as `.../dim`.

    The features are the method's `probe_features` (the layer its paper probes), not the joint-space embeddings.

    Args:
        train_shards: labelled shard pattern to fit on.
        test_shards: labelled shard pattern to score.
        name: metric prefix.
        label_field: `cls` for the `.cls` member, or an integer field of the `.json` member.
        inverse_regularization: C of the objective (scikit-learn's C; CLIP sweeps it on a validation split).
        max_iter: L-BFGS iterations at most.
        max_train_samples: fit on the first this many training samples (None: all).
        standardize: scale every feature to zero mean, unit deviation over the training set first (MAE's probe:
            a BatchNorm without affine, He et al. 2021, App. A.2).
        every_n_epochs, batch_size, num_workers: see `EvaluationCallback`.
    """

    def __init__(
        self,
        train_shards: str,
        test_shards: str,
        name: str = "linear_probe",
        label_field: str = "cls",
        inverse_regularization: float = 1.0,
        max_iter: int = 1000,
        max_train_samples: int | None = None,
        standardize: bool = False,
        every_n_epochs: int = 1,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, batch_size=batch_size, num_workers=num_workers)
        self.train_shards = train_shards
        self.test_shards = test_shards
        self.name = name
        self.label_field = label_field
        self.inverse_regularization = inverse_regularization
        self.max_iter = max_iter
        self.max_train_samples = max_train_samples
        self.standardize = standardize

    def evaluate(self, trainer: Trainer, method: LightningModule) -> dict[str, float]:
        train = self.features(method, self.train_shards, self.max_train_samples)
        test = self.features(method, self.test_shards)
        train_labels, test_labels = train.labels_of(self.label_field), test.labels_of(self.label_field)
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
        device = module_device(method)
        with torch.autocast(device.type, enabled=False):
            scores = linear_probe_scores(
                train.image.to(device),
                train_labels.to(device),
                test.image,
                num_classes,
                self.inverse_regularization,
                self.max_iter,
                self.standardize,
            ).cpu()
        metrics = classification_metrics(scores, test_labels, num_classes) | {"dim": train.image.shape[1]}
        return {f"linear_probe/{self.name}/{metric}": value for metric, value in metrics.items()}
