"""Phrase grounding on scene shards: for each object's phrase (its region description), the method's box against the
true one, as Flickr30k Entities' and RefCOCO's accuracy is scored (Plummer et al. 2015; FIBER, Dou et al. 2022,
sec. 4.2): a phrase is grounded when the predicted box's IoU with the true box is at least 0.5.

The images are the evaluation crops every evaluation reads (`method_eval_loader`), with the boxes of the objects
they keep (`boxes`, `objects`; `data_modules.instances`), each object's phrase from the sample's `.json`
(`object_phrases`). The boxes are compared in the crop's pixels. Batches are shared across ranks as the feature
passes are (`encode_across_ranks`, one IoU per phrase), so every rank computes the same metrics.
`constant_box_grounding` is the box-prior baseline (the whole image, or a centred box of the true boxes' mean size)
that a bench sets beside a method; `PatchTextGrounding` the zero-shot baseline of a joint-space method without a box
head (CLIP): the box of the patches whose embedding is most similar to the phrase's (`patch_similarity_boxes`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torchvision.ops import box_iou

from data_modules.instances import PHRASE_FIELDS, object_phrases
from data_modules.pipeline import make_eval_loader
from vlp_lightning.callbacks.features import EvaluationCallback, encode_across_ranks, method_eval_loader, module_device

#: the IoU from which a predicted box counts as grounding its phrase.
IOU_THRESHOLD = 0.5


def paired_iou(predicted: Tensor, true: Tensor) -> Tensor:
    """IoU of each predicted box [K, 4] with its own true box [K, 4] (x0, y0, x1, y1) -> [K]."""
    return box_iou(predicted.float(), true.float()).diagonal()


def grounding_metrics(ious: Tensor) -> dict[str, float]:
    """Per-phrase IoUs [P] -> `acc@0.5` (the share at or above 0.5) and `mean_iou`."""
    return {"acc@0.5": (ious >= IOU_THRESHOLD).float().mean().item(), "mean_iou": ious.mean().item()}


def _scene_batches(loader, max_phrases: int | None, field: str) -> Iterator[tuple[tuple, int]]:
    """((images, phrases per image, true boxes [P, 4]), P) per batch, stopping after `max_phrases` phrases."""
    seen = 0
    for batch in loader:
        if max_phrases is not None and seen >= max_phrases:
            return
        if "boxes" not in batch:
            raise ValueError("phrase grounding needs scene shards with boxes (.instances.png and .json objects); "
                             "build them with `vlp-data scenes data/scenes`")
        phrases = [object_phrases(meta, objects, field) for meta, objects in zip(batch["meta"], batch["objects"])]
        true = torch.cat([boxes.reshape(-1, 4) for boxes in batch["boxes"]])
        seen += true.shape[0]
        yield (batch["image"], phrases, true), true.shape[0]


def constant_box_grounding(
    shards: str, image_size: int, kind: Literal["whole", "centre"] = "centre", field: str = "regions"
) -> dict[str, float]:
    """`grounding_metrics` of one box for every phrase of the evaluation crops of `shards` at `image_size`: the whole
    image (`whole`), or the box of the true boxes' mean width and height centred in the image (`centre`)."""
    batches = list(_scene_batches(make_eval_loader(shards, image_size, batch_size=64), None, field))
    true = torch.cat([inputs[2] for inputs, _ in batches])
    if true.shape[0] == 0:
        raise ValueError(f"constant_box_grounding: the shards {shards} hold no objects")
    width, height = (true[:, 2:] - true[:, :2]).mean(0).tolist() if kind == "centre" else (image_size, image_size)
    centre = image_size / 2
    box = torch.tensor([[centre - width / 2, centre - height / 2, centre + width / 2, centre + height / 2]])
    return grounding_metrics(paired_iou(box.expand_as(true), true))


def patch_similarity_boxes(similarity: Tensor, height: int, width: int, threshold: float = 0.5) -> Tensor:
    """Cosines [K, h, w] of K phrases with one image's patch grid -> a box per phrase [K, 4] (x0, y0, x1, y1 in
    pixels of the `height` x `width` image): the box of the patches whose cosine lies at least `threshold` of the way
    from the map's lowest value to its highest (the best patch always counts)."""
    count, rows, columns = similarity.shape
    if count == 0:
        return similarity.new_zeros(0, 4).float()
    flat = similarity.reshape(count, -1).float()
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    kept = (flat >= low + threshold * (high - low)).reshape(count, rows, columns)
    spans = []
    for occupied in (kept.any(1), kept.any(2)):  # [K, columns] and [K, rows]: which columns / rows hold a kept patch
        length = occupied.shape[1]
        spans.append((occupied.int().argmax(1), length - occupied.flip(1).int().argmax(1)))  # first, one past last
    (x0, x1), (y0, y1) = spans
    scale = similarity.new_tensor([width / columns, height / rows, width / columns, height / rows]).float()
    cells = torch.stack([x0, y0, x1, y1], -1)
    return cells.float() * scale


class PatchTextGrounding(nn.Module):
    """The zero-shot grounding baseline of a joint-space method without a box head (module doc): its patch tokens
    (`patch_features`) mapped into the joint space by its image projection, as MaskCLIP reads CLIP's dense features
    (Zhou et al. 2022, sec. 3.2), against each phrase's text embedding; a phrase's box is `patch_similarity_boxes`'.
    It offers what `PhraseGrounding` asks of a method (`ground`, `image_size`, `train_views`).

    Args:
        method: a CLIP-family method whose `image_projection` maps the image tower's tokens into the joint space.
        threshold: where between a map's lowest and highest cosine a patch starts to count (0.5: half way).
    """

    def __init__(self, method: nn.Module, threshold: float = 0.5) -> None:
        super().__init__()
        if not hasattr(method, "image_projection"):
            raise ValueError(f"PatchTextGrounding needs a CLIP-family method with an image_projection, got "
                             f"{type(method).__name__}; pass a CLIP checkpoint's method")
        self.method, self.threshold = method, threshold

    @property
    def image_size(self) -> int:
        return self.method.image_size

    def train_views(self):
        return self.method.train_views()

    @torch.no_grad()
    def ground(self, images: Tensor, phrases: list[list[str]]) -> list[Tensor]:
        height, width = images.shape[-2:]
        patches = F.normalize(self.method.image_projection(self.method.patch_features(images)), dim=-1)  # [N, L, D]
        side = math.isqrt(patches.shape[1])
        flat = [phrase for sample in phrases for phrase in sample]
        tokens = {key: ids.to(images.device) for key, ids in self.method.tokenizer(flat).items()} if flat else None
        texts = self.method.encode_text(tokens) if flat else patches.new_zeros(0, patches.shape[-1])
        grounded, start = [], 0
        for image, sample in enumerate(phrases):
            similarity = texts[start : start + len(sample)] @ patches[image].T  # [K_i, L]
            grounded.append(patch_similarity_boxes(similarity.reshape(len(sample), side, side), height, width,
                                                   self.threshold))
            start += len(sample)
        return grounded


class PhraseGrounding(EvaluationCallback):
    """Phrase grounding accuracy on scene shards (module doc), logged as `grounding/<name>/acc@0.5` and
    `grounding/<name>/mean_iou`.

    Needs a method with `ground(images [N, 3, H, W], phrases: list[list[str]]) -> list[Tensor [K_i, 4]]` (per image,
    one x0, y0, x1, y1 box in the images' pixels per phrase); other methods skip it with one warning.

    Args:
        shards: scene shard pattern (`vlp-data scenes`: `.json` objects and `.instances.png`).
        name: metric prefix (e.g. `val`, `unseen`).
        field: each object's phrase: its region description (`regions`) or its name (`names`).
        max_phrases: score about this many phrases (whole batches; None: all).
        every_n_epochs, batch_size, num_workers: see `EvaluationCallback`.
    """

    def __init__(
        self,
        shards: str,
        name: str = "grounding",
        field: Literal["regions", "names"] = "regions",
        max_phrases: int | None = None,
        every_n_epochs: int = 1,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, batch_size=batch_size, num_workers=num_workers)
        if field not in PHRASE_FIELDS:
            raise ValueError(f"PhraseGrounding field={field!r} must be one of {PHRASE_FIELDS}")
        self.shards, self.name, self.field, self.max_phrases = shards, name, field, max_phrases

    def evaluate(self, trainer: Trainer, method: LightningModule) -> dict[str, float]:
        ground: Callable | None = getattr(method, "ground", None)
        if not callable(ground):
            self.warn_once(f"PhraseGrounding skipped: {type(method).__name__} has no ground(images, phrases)")
            return {}
        device = module_device(method)
        loader, _ = method_eval_loader(method, self.shards, self.batch_size, self.num_workers)

        def score(inputs: tuple[Tensor, list[list[str]], Tensor]) -> Tensor:
            images, phrases, true = inputs
            predicted = torch.cat([boxes.reshape(-1, 4).cpu() for boxes in ground(images.to(device), phrases)])
            return paired_iou(predicted, true)[:, None]

        ious = encode_across_ranks(score, _scene_batches(loader, self.max_phrases, self.field))
        if ious.numel() == 0:
            raise ValueError(f"PhraseGrounding {self.name!r}: the shards {self.shards} hold no objects")
        return {f"grounding/{self.name}/{metric}": value for metric, value in grounding_metrics(ious[:, 0]).items()}
