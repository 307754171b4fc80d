"""Zero-shot classification: classify images by their similarity to embedded class-name prompts.

CLIP (Radford et al. 2021) sec. 3.1.2: the text encoder turns each class name, put into a prompt such as
"a photo of a {}.", into the weights of a linear classifier over normalised image features. Sec. 3.1.4 prompt
ensembling: embed the class name with several templates, average the normalised embeddings and renormalise (one
classifier row per class, so inference costs the same as with one template).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from PIL import Image, ImageDraw
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_confusion_matrix

from data_modules.pipeline import expand_shards, manifest_of
from vlp_lightning.callbacks.features import (
    EvaluationCallback,
    classification_metrics,
    encode_texts,
    font,
    has_text_tower,
    log_picture,
    text_width,
)
from vlp_lightning.modules.tokenizers import Tokenizer

# The 80 ImageNet prompts of CLIP and the 7 its prompt-engineering notebook selected (openai/CLIP,
# notebooks/Prompt_Engineering_for_ImageNet.ipynb; also in open_clip's zero_shot_metadata.py).
OPENAI_IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)

SIMPLE_IMAGENET_TEMPLATES = (
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.", "a {} in a video game.",
    "art of the {}.", "a photo of the small {}.",
)

#: template sets selectable by name; `{}` is replaced by the class name.
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "photo": ("a photo of a {}.",),
    "simple": SIMPLE_IMAGENET_TEMPLATES,
    "openai_imagenet": OPENAI_IMAGENET_TEMPLATES,
}


@dataclass
class ZeroShotDataset:
    """One labelled shard set to classify zero-shot.

    Args:
        name: metric prefix, `zeroshot/<name>/top1`.
        shards: shard pattern, e.g. `data/emoji-noto/val-{000000..000001}.tar`.
        classnames: one name per label; None reads `classnames[label_field]` from the shards' `manifest.json`.
        label_field: `cls` for the `.cls` member, or the name of an integer field of the `.json` member.
        templates: prompt templates with `{}` for the class name, or the name of a set in `TEMPLATE_SETS`.
    """

    name: str
    shards: str
    classnames: list[str] | None = None
    label_field: str = "cls"
    templates: list[str] | str = "simple"


def resolve_templates(templates: list[str] | str) -> list[str]:
    """A template list as given, or the named set; every template must hold one `{}`."""
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise ValueError(f"unknown template set {templates!r}; known sets: {', '.join(TEMPLATE_SETS)}")
        templates = list(TEMPLATE_SETS[templates])
    if not templates or any(template.count("{}") != 1 for template in templates):
        raise ValueError(f"zero-shot templates must be a non-empty list of strings with one '{{}}': {templates!r}")
    return list(templates)


def read_classnames(shards: str, label_field: str) -> list[str]:
    """`classnames[label_field]` of the shards' manifest.json (written by `vlp-data`)."""
    manifest = manifest_of(expand_shards(shards)) or {}
    classnames = manifest.get("classnames", {}).get(label_field)
    if classnames is None:
        raise ValueError(
            f"no classnames for label field {label_field!r} in the manifest.json next to {shards}; "
            "give them as `classnames:` in the callback's dataset"
        )
    return list(classnames)


def build_zero_shot_classifier(
    method: nn.Module, tokenizer: Tokenizer, classnames: list[str], templates: list[str], batch_size: int = 256
) -> Tensor:
    """Class weights [C, D]: per class, the mean of the normalised text embeddings of every template, renormalised
    (CLIP sec. 3.1.4). `method` is anything with `encode_text(tokens) -> [N, D]`."""
    texts = [template.format(name) for name in classnames for template in templates]
    with torch.no_grad():
        embeddings = F.normalize(encode_texts(method, tokenizer, texts, batch_size), dim=-1)  # [C*T, D]
    return F.normalize(embeddings.view(len(classnames), len(templates), -1).mean(1), dim=-1)


def text_classifier_scores(
    method: nn.Module, image_embeddings: Tensor, classnames: list[str], templates: list[str] | str, batch_size: int
) -> Tensor:
    """Class scores [N, C] of image embeddings: a prompt-learning method's own prompts
    (`method.class_logits(embeddings, classnames)`, CoOp & co.), else the zero-shot classifier of the templates."""
    if hasattr(method, "class_logits"):
        return torch.cat([method.class_logits(chunk, classnames) for chunk in image_embeddings.split(batch_size)])
    classifier = build_zero_shot_classifier(method, method.tokenizer, classnames, resolve_templates(templates),
                                            batch_size)
    return F.normalize(image_embeddings, dim=-1) @ classifier.T


#: colour of a confusion-matrix cell holding 1.0 (cells fade linearly to white at 0).
_FULL_CELL = np.array([8, 48, 107])


def confusion_matrix_picture(confusion: Tensor, classnames: list[str] | None = None) -> np.ndarray:
    """Row-normalised confusion matrix [C, C] (rows: true class, columns: predicted) as an RGB picture [H, W, 3];
    class names on both axes when given and C <= 30, cell values written when the cells are large enough."""
    num_classes = confusion.shape[0]
    values = confusion.float().clamp(0, 1).cpu().numpy()
    cell = max(1, min(28, 560 // num_classes))
    heat = (255 - values[..., None] * (255 - _FULL_CELL)).astype(np.uint8)  # [C, C, 3]
    grid = Image.fromarray(heat).resize((num_classes * cell, num_classes * cell), Image.NEAREST)
    names = classnames if classnames is not None and num_classes <= 30 else None
    typeface = font(11)
    margin = max(text_width(name, typeface) for name in names) + 10 if names else 4
    side = num_classes * cell
    canvas = Image.new("RGB", (margin + side + 4, margin + side + 4), "white")
    canvas.paste(grid, (margin, margin))
    draw = ImageDraw.Draw(canvas)
    if names:
        column_labels = Image.new("RGB", (margin, side), "white")  # drawn sideways, then turned upright
        column_draw = ImageDraw.Draw(column_labels)
        for index, name in enumerate(names):
            middle = index * cell + cell / 2
            draw.text((margin - 5, margin + middle), name, fill="black", font=typeface, anchor="rm")
            column_draw.text((5, middle), name, fill="black", font=typeface, anchor="lm")
        canvas.paste(column_labels.rotate(90, expand=True), (margin, 0))
        draw.text((4, 4), "rows: true\ncolumns:\npredicted", fill=(110, 110, 110), font=typeface)
    if cell >= 24:
        value_face = font(9)
        for row in range(num_classes):
            for column in range(num_classes):
                centre = (margin + column * cell + cell / 2, margin + row * cell + cell / 2)
                colour = "white" if values[row, column] > 0.5 else "black"
                draw.text(centre, f"{values[row, column]:.2f}", fill=colour, font=value_face, anchor="mm")
    return np.asarray(canvas)


class TextClassification(EvaluationCallback):
    """What the callbacks that classify labelled shard sets by class-name text share: their datasets (templates
    checked when the callback is built) and, per dataset, the method's joint image embeddings, labels and class
    names (`labelled_sets`). Methods without a text tower are skipped with one warning."""

    def __init__(
        self, datasets: list[ZeroShotDataset], every_n_epochs: int = 1, batch_size: int = 64, num_workers: int = 0
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, batch_size=batch_size, num_workers=num_workers)
        for dataset in datasets:
            resolve_templates(dataset.templates)  # a bad template fails when the callback is built, not at the eval
        self.datasets = datasets

    def labelled_sets(self, method: LightningModule) -> Iterator[tuple[ZeroShotDataset, Tensor, Tensor, list[str]]]:
        """(dataset, image embeddings [N, D], labels [N], class names) of every dataset; nothing (and one warning)
        for a method without a text tower."""
        if not has_text_tower(method):
            self.warn_once(f"{type(self).__name__} skipped: {type(method).__name__} has no text tower (encode_text)")
            return
        for dataset in self.datasets:
            features = self.features(method, dataset.shards, representation="joint")
            labels = features.labels_of(dataset.label_field)
            classnames = dataset.classnames or read_classnames(dataset.shards, dataset.label_field)
            if int(labels.max()) >= len(classnames):
                raise ValueError(
                    f"{type(self).__name__} {dataset.name!r}: label {int(labels.max())} but only {len(classnames)} "
                    "class names"
                )
            yield dataset, features.image, labels, classnames


class ZeroShotClassification(TextClassification):
    """Zero-shot top-1 / top-5 accuracy on labelled shard sets, logged as `zeroshot/<name>/top1`, `.../top5`, and
    each set's confusion matrix as a TensorBoard image `zeroshot/<name>/confusion`.

    Needs a method with a text tower (`encode_text`) and a tokenizer; other methods skip it with one warning. A
    prompt-learning method (CoOp, CoCoOp, MaPLe, PRE) classifies with its learned prompts instead of the templates.

    Args:
        datasets: the shard sets to classify.
        every_n_epochs, batch_size, num_workers: see `EvaluationCallback`.
    """

    def evaluate(self, trainer: Trainer, method: LightningModule) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for dataset, images, labels, classnames in self.labelled_sets(method):
            scores = text_classifier_scores(method, images, classnames, dataset.templates, self.batch_size)
            for metric, value in classification_metrics(scores, labels, len(classnames)).items():
                metrics[f"zeroshot/{dataset.name}/{metric}"] = value
            counts = multiclass_confusion_matrix(scores.argmax(1), labels, len(classnames)).float()  # [true, predicted]
            confusion = counts / counts.sum(1, keepdim=True).clamp(min=1)  # rows of absent classes stay 0
            log_picture(
                trainer, f"zeroshot/{dataset.name}/confusion",
                lambda confusion=confusion, classnames=classnames: confusion_matrix_picture(confusion, classnames),
            )
        return metrics
