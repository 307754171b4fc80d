"""Weighted k-nearest-neighbour classification on frozen, normalised image features.

Wu et al. 2018 ("Unsupervised Feature Learning via Non-Parametric Instance Discrimination", sec. 3.4) and DINO
(Caron et al. 2021, sec. 4.1 / appendix): each test image votes with its k most cosine-similar training images,
neighbour i weighing exp(s_i / T) for its class; T = 0.07 and k = 20 are the papers' defaults. No training, so it
measures the representation itself and is cheap enough to run every epoch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from vlp_lightning.callbacks.features import EvaluationCallback, classification_metrics


def weighted_knn_scores(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> Tensor:
    """Class votes [N_test, C]: sum over the k nearest training samples (cosine) of exp(similarity / temperature)."""
    train = F.normalize(train_features.float(), dim=-1)
    test = F.normalize(test_features.float(), dim=-1)
    k = min(k, train.shape[0])
    votes = []
    for start in range(0, test.shape[0], chunk_size):
        similarity, neighbours = (test[start : start + chunk_size] @ train.T).topk(k, dim=1)  # [b, k]
        weights = (similarity.float() / temperature).exp()  # float even under autocast: scatter needs one dtype
        chunk_votes = torch.zeros(similarity.shape[0], num_classes)
        votes.append(chunk_votes.scatter_add_(1, train_labels[neighbours], weights))
    return torch.cat(votes)


class KNNClassifier(EvaluationCallback):
    """Weighted kNN top-1 / top-5 accuracy of `test_shards` against `train_shards`, logged as `knn/<name>/top1`,
    with the feature width as `knn/<name>/dim`. The features are the method's `probe_features`.

    Args:
        train_shards: labelled shard pattern whose features are the neighbours.
        test_shards: labelled shard pattern to classify.
        k: neighbours per test image.
        temperature: T in the vote weight exp(similarity / T).
        name: metric prefix.
        label_field: `cls` for the `.cls` member, or an integer field of the `.json` member.
        max_train_samples: use the first this many training samples (None: all).
        every_n_epochs, batch_size, num_workers: see `EvaluationCallback`.
    """

    def __init__(
        self,
        train_shards: str,
        test_shards: str,
        k: int = 20,
        temperature: float = 0.07,
        name: str = "knn",
        label_field: str = "cls",
        max_train_samples: int | None = None,
        every_n_epochs: int = 1,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, batch_size=batch_size, num_workers=num_workers)
        self.train_shards = train_shards
        self.test_shards = test_shards
        self.k = k
        self.temperature = temperature
        self.name = name
        self.label_field = label_field
        self.max_train_samples = max_train_samples

    def evaluate(self, trainer: Trainer, method: LightningModule) -> dict[str, float]:
        train = self.features(method, self.train_shards, self.max_train_samples)
        test = self.features(method, self.test_shards)
        train_labels, test_labels = train.labels_of(self.label_field), test.labels_of(self.label_field)
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
        scores = weighted_knn_scores(train.image, train_labels, test.image, num_classes, self.k, self.temperature)
        metrics = classification_metrics(scores, test_labels, num_classes) | {"dim": train.image.shape[1]}
        return {f"knn/{self.name}/{metric}": value for metric, value in metrics.items()}
