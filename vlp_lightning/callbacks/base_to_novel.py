"""Base-to-novel generalisation (CoCoOp, Zhou et al. 2022, sec. 5.1): the classes of a labelled set, sorted by label,
split into base (the first ceil(C / 2)) and novel (the rest); a method adapted on the base classes is scored on the
test images of each half, each classified among its own half's classes, and the two accuracies are summarised by
their harmonic mean, H = 2 * base * novel / (base + novel) (the number MaPLe and PRE report).

A prompt-learning method classifies through its learned prompts (`method.class_logits(image_features, classnames)`);
any other method with a text tower is scored zero-shot with the dataset's templates (CLIP's prompt ensemble), which is
the baseline row of the protocol. Metrics: `base2novel/<name>/base`, `.../novel`, `.../hm`.
"""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer

from vlp_lightning.callbacks.zero_shot import TextClassification, text_classifier_scores
from vlp_lightning.methods.adaptation.base import base_class_count
from vlp_lightning.modules.prompts import class_name_text


def harmonic_mean(base: float, novel: float) -> float:
    """2 a b / (a + b), 0 when both are 0."""
    return 2 * base * novel / (base + novel) if base + novel > 0 else 0.0


class BaseToNovel(TextClassification):
    """Base, novel and harmonic-mean accuracy on labelled shard sets (module doc).

    Args:
        datasets: the labelled shard sets (name, shards, classnames or the manifest's, label_field, templates of the
            zero-shot baseline).
        every_n_epochs, batch_size, num_workers: see `EvaluationCallback`.
    """

    def evaluate(self, trainer: Trainer, method: LightningModule) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for dataset, images, labels, classnames in self.labelled_sets(method):
            split = base_class_count(len(classnames))
            accuracies = {}
            for half, names, rows, offset in (
                ("base", classnames[:split], labels < split, 0),
                ("novel", classnames[split:], labels >= split, split),
            ):
                if not bool(rows.any()):
                    continue
                readable = names if hasattr(method, "class_logits") else [class_name_text(name) for name in names]
                scores = text_classifier_scores(method, images[rows], readable, dataset.templates, self.batch_size)
                accuracies[half] = (scores.argmax(dim=1) == labels[rows] - offset).float().mean().item()
                metrics[f"base2novel/{dataset.name}/{half}"] = accuracies[half]
            if len(accuracies) == 2:
                metrics[f"base2novel/{dataset.name}/hm"] = harmonic_mean(accuracies["base"], accuracies["novel"])
        return metrics
