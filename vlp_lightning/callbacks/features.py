"""What the evaluation callbacks share: one feature pass over a shard set, its schedule, and where results go.

Two representations (DESIGN, "Representations"): kNN and the linear probe read `method.probe_features` (the layer
each paper probes, e.g. CLIP's image features before the projection, App. A.3); zero-shot and retrieval read the
joint-space `method.encode_image` / `encode_text`; the projector shows the joint space where the method has one and
the probe features otherwise. Feature extraction runs them in eval mode, without gradient, under the trainer's
precision context (the autocast of `bf16-mixed` / `16-mixed`), on batches from `make_eval_loader`.

Distributed runs: `make_eval_loader` is not split by rank, so every rank reads every sample (decoding is cheap next
to the encoders) and knows every label, caption and key. The *encoding* is shared: batch `i` is encoded by rank
`i % world_size`, written into its rows of a zero [N, D] buffer, and one all-reduce sum gives every rank all the
features, in loader order. Every rank then computes the same metrics, so nothing depends on rank 0 and a
`ModelCheckpoint` may monitor them. Ranks with one batch fewer run one throw-away forward so every rank calls the
encoder equally often (FSDP's parameter all-gathers are collective).

One evaluation pass (a validate / test run, or one fit epoch) extracts the features of a shard set once, however
many callbacks read it (zero-shot and kNN on the same test shards, say); the cache is emptied when the next train /
validation / test epoch starts. At the end of `validate` / `test` a compact table of every evaluation metric of
the pass is printed.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_accuracy

from data_modules.pipeline import make_eval_loader
from data_modules.views import IMAGENET_MEAN, IMAGENET_STD, EvalView
from vlp_lightning import distributed
from vlp_lightning.methods.base import VLPMethod

InputT = TypeVar("InputT")

#: side of the image thumbnails kept for TensorBoard pictures and the projector sprite.
THUMBNAIL_SIZE = 64
#: thumbnails kept per feature pass (those of the first samples; 12 KiB each).
MAX_THUMBNAILS = 1024

#: which representation of the images a feature pass computes: `probe_features` or the joint-space `encode_image`.
Representation = Literal["probe", "joint"]


@dataclass
class EvalFeatures:
    """One pass over an evaluation shard set, in loader order.

    `captions` is None when the shards have no `.txt`, `labels` None without `.cls`, `meta` None without `.json`;
    `thumbnails` [T, 3, S, S] uint8 are those of the first T = min(N, MAX_THUMBNAILS) samples.
    """

    image: Tensor  # [N, D] float32 on CPU
    keys: list[str]
    captions: list[str] | None
    labels: Tensor | None  # [N] int64
    meta: list[dict] | None
    thumbnails: Tensor  # [T, 3, S, S] uint8

    def __len__(self) -> int:
        return len(self.keys)

    def head(self, count: int | None) -> EvalFeatures:
        """The first `count` samples (all with None)."""
        rows = slice(None, count)
        return EvalFeatures(
            image=self.image[rows],
            keys=self.keys[rows],
            captions=None if self.captions is None else self.captions[rows],
            labels=None if self.labels is None else self.labels[rows],
            meta=None if self.meta is None else self.meta[rows],
            thumbnails=self.thumbnails[rows],
        )

    def has_labels(self, field: str) -> bool:
        """Whether `labels_of(field)` has a label for every sample."""
        if field == "cls":
            return self.labels is not None
        return self.meta is not None and all(field in entry for entry in self.meta)

    def labels_of(self, field: str) -> Tensor:
        """Integer labels [N]: `cls` is the `.cls` member, any other name the integer field of that name in `.json`."""
        if not self.has_labels(field):
            member = "no .cls member" if field == "cls" else f"no integer .json field {field!r} in every sample"
            raise ValueError(f"label_field={field!r}: the evaluation shards have {member}")
        if field == "cls":
            return self.labels
        return torch.tensor([int(entry[field]) for entry in self.meta], dtype=torch.long)


def module_device(module: nn.Module) -> torch.device:
    """Where the module's parameters live (CPU for a module without any)."""
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def encode_across_ranks(encode: Callable[[InputT], Tensor], batches: Iterable[tuple[InputT, int]]) -> Tensor:
    """Encode `(inputs, rows)` batches, batch `i` on rank `i % world_size`; all features [sum rows, D] on every rank.

    Every rank must iterate the same batches (module doc). In one process this is a plain loop.
    """
    rank, world = distributed.rank(), distributed.world_size()
    pieces: list[tuple[int, Tensor]] = []
    spare: InputT | None = None
    offset = num_batches = 0
    for index, (inputs, rows) in enumerate(batches):
        if index % world == rank:
            pieces.append((offset, encode(inputs).float()))
        elif spare is None:
            spare = inputs
        offset += rows
        num_batches = index + 1
    if num_batches == 0:
        return torch.zeros(0, 0)
    if len(pieces) < math.ceil(num_batches / world):
        extra = encode(spare).float()  # the throw-away forward that keeps the encoder calls equal across ranks
        dim, device = extra.shape[1], extra.device
    else:
        dim, device = pieces[0][1].shape[1], pieces[0][1].device
    gathered = torch.zeros(offset, dim, device=device)
    for start, features in pieces:
        gathered[start : start + features.shape[0]] = features
    return distributed.all_reduce_sum(gathered).cpu()


def to_thumbnails(
    images: Tensor,
    size: int = THUMBNAIL_SIZE,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> Tensor:
    """Normalised eval crops [N, 3, H, W] -> uint8 thumbnails [N, 3, size, size] (undoes the `EvalView`
    normalisation `mean` / `std`)."""
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    pixels = (images.float().cpu() * std + mean).clamp(0, 1)
    if pixels.shape[-1] != size:
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (pixels * 255).round().to(torch.uint8)


def method_eval_loader(
    method: VLPMethod, shards: str, batch_size: int = 64, num_workers: int = 0, with_conversation: bool = False
) -> tuple[Iterable[dict], EvalView]:
    """The evaluation batches of `shards` for `method` (`make_eval_loader`) and their view: the deterministic
    `EvalView` at `method.image_size`, normalised as the method's training views are (so the encoders see the
    statistics they were trained on), the images on the method's device. `view.normalization` undoes it for
    thumbnails (`to_thumbnails`). `with_conversation` adds each sample's parsed `.json` conversation
    (`conversation`; samples without a valid one are skipped), for `vqa`."""
    mean, std = method.train_views().normalization
    view = EvalView(mean=mean, std=std)
    loader = make_eval_loader(
        shards, method.image_size, batch_size, num_workers=num_workers, view=view, device=module_device(method),
        with_conversation=with_conversation,
    )
    return loader, view


def extract_features(
    method: VLPMethod,
    shards: str,
    batch_size: int = 64,
    num_workers: int = 0,
    max_samples: int | None = None,
    representation: Representation = "probe",
) -> EvalFeatures:
    """Image features of the first `max_samples` samples (all with None) of `shards`, with their labels, captions,
    meta and thumbnails: `method.probe_features` for "probe", `method.encode_image` for "joint". Call it inside
    `evaluation_mode`."""
    encode_images = {"probe": method.probe_features, "joint": method.encode_image}[representation]
    device = module_device(method)
    loader, view = method_eval_loader(method, shards, batch_size, num_workers)
    mean, std = view.normalization
    keys: list[str] = []
    captions: list[str] = []
    labels: list[Tensor] = []
    meta: list[dict] = []
    thumbnails: list[Tensor] = []

    def batches() -> Iterator[tuple[Tensor, int]]:
        kept_thumbnails = 0
        for batch in loader:
            rows = len(batch["__key__"]) if max_samples is None else min(len(batch["__key__"]), max_samples - len(keys))
            if rows <= 0:
                return
            images = batch["image"][:rows]
            keys.extend(batch["__key__"][:rows])
            captions.extend(batch.get("caption", [])[:rows])
            if "label" in batch:
                labels.append(batch["label"][:rows])
            meta.extend(batch.get("meta", [{}] * rows)[:rows])
            if kept_thumbnails < MAX_THUMBNAILS:
                thumbnails.append(to_thumbnails(images[: MAX_THUMBNAILS - kept_thumbnails], mean=mean, std=std))
                kept_thumbnails += thumbnails[-1].shape[0]
            yield images, rows

    image_features = encode_across_ranks(lambda images: encode_images(images.to(device)), batches())
    return EvalFeatures(
        image=image_features,
        keys=keys,
        captions=captions if len(captions) == len(keys) else None,
        labels=torch.cat(labels) if labels else None,
        meta=meta if any(meta) else None,
        thumbnails=torch.cat(thumbnails) if thumbnails else torch.zeros(0, 3, THUMBNAIL_SIZE, THUMBNAIL_SIZE).byte(),
    )


def patch_grid(num_patches: int, size: int, patch_size: int | None) -> tuple[int, int]:
    """The (rows, columns) of `num_patches` tokens of a square `size` image (a ViT's patches, a CNN's map)."""
    side = size // patch_size if patch_size else round(num_patches**0.5)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patch features do not form a square grid for {size} px images")
    return side, side


def encode_patches(method: nn.Module, batches: Iterable[tuple[Tensor, int]]) -> tuple[Tensor, tuple[int, int]]:
    """`method.patch_features` [N, L, D] of the images of every `(images, rows)` batch, shared across ranks as
    `encode_across_ranks` shares them, and their patch grid (rows, columns), row-major; (0, 0) without batches."""
    device = module_device(method)
    grid: list[tuple[int, int]] = []

    def encode(images: Tensor) -> Tensor:
        features = method.patch_features(images.to(device))  # [n, L, D]
        if not grid:
            patch_size = getattr(getattr(method, "vision", None), "patch_size", None)
            grid.append(patch_grid(features.shape[1], images.shape[-1], patch_size))
        return features.flatten(1)

    flat = encode_across_ranks(encode, batches)
    if not grid:
        return torch.zeros(0, 0, 0), (0, 0)
    return flat.view(flat.shape[0], grid[0][0] * grid[0][1], -1), grid[0]


def encode_texts(
    method: nn.Module, tokenizer: Callable[[list[str]], dict[str, Tensor]], texts: list[str], batch_size: int = 256
) -> Tensor:
    """`method.encode_text` of every text [len(texts), D] on every rank, the batches shared across ranks."""
    device = module_device(method)

    def encode(chunk: list[str]) -> Tensor:
        return method.encode_text({name: tokens.to(device) for name, tokens in tokenizer(chunk).items()})

    chunks = (texts[start : start + batch_size] for start in range(0, len(texts), batch_size))
    return encode_across_ranks(encode, ((chunk, len(chunk)) for chunk in chunks))


@contextmanager
def evaluation_mode(trainer: Trainer, method: LightningModule) -> Iterator[None]:
    """Eval mode, no gradient, the trainer's precision context; each submodule's train/eval mode restored after."""
    modes = [(module, module.training) for module in method.modules()]
    method.eval()
    try:
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            yield
    finally:
        for module, training in modes:
            module.training = training


def classification_metrics(scores: Tensor, labels: Tensor, num_classes: int) -> dict[str, float]:
    """top-1 and (with at least 5 classes) top-5 accuracy of class scores [N, C] against labels [N]."""
    metrics = {"top1": multiclass_accuracy(scores, labels, num_classes, average="micro", top_k=1).item()}
    if num_classes >= 5:
        metrics["top5"] = multiclass_accuracy(scores, labels, num_classes, average="micro", top_k=5).item()
    return metrics


def has_joint_space(method: LightningModule) -> bool:
    """True when the method embeds images into a joint image-text space (`encode_image` defined)."""
    return isinstance(method, VLPMethod) and method.has_joint_space()


def has_text_tower(method: LightningModule) -> bool:
    """True when the method embeds text into the image space (CLIP family) and has a tokenizer for it."""
    return is_overridden("encode_text", method, parent=VLPMethod) and getattr(method, "tokenizer", None) is not None


def has_patch_features(method: LightningModule) -> bool:
    """True when the method gives one feature per patch (`patch_features` defined, or a backbone with patch tokens)."""
    if not isinstance(method, VLPMethod):
        return False
    vision = getattr(method, "vision", None)
    return is_overridden("patch_features", method, parent=VLPMethod) or hasattr(vision, "forward_tokens")


def tensorboard_writers(trainer: Trainer) -> list:
    """The SummaryWriters of the trainer's TensorBoard loggers, on global rank 0 only (pictures are written once)."""
    if not trainer.is_global_zero:
        return []
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def log_picture(trainer: Trainer, tag: str, draw: Callable[[], np.ndarray]) -> None:
    """Write the RGB uint8 [H, W, 3] picture `draw()` makes to every TensorBoard logger at the current global step;
    `draw` runs only where a writer will receive it (rank 0 with a TensorBoard logger)."""
    writers = tensorboard_writers(trainer)
    picture = draw() if writers else None
    for writer in writers:
        writer.add_image(tag, picture, global_step=trainer.global_step, dataformats="HWC")


def font(size: int = 11) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font (no font file needed)."""
    return ImageFont.load_default(size=size)


def text_width(text: str, typeface: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    left, _, right, _ = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=typeface)
    return int(right - left)


def examples_picture(thumbnails: Tensor, lines_per_query: list[list[tuple[str, bool]]]) -> np.ndarray:
    """One row per query: its thumbnail, then its text lines, ground-truth ones green with a `*`. [H, W, 3] uint8."""
    line_height, text_width, gap = 14, 520, 8
    row_height = max(THUMBNAIL_SIZE, line_height * max(len(lines) for lines in lines_per_query)) + gap
    canvas = Image.new("RGB", (THUMBNAIL_SIZE + 2 * gap + text_width, row_height * len(lines_per_query)), "white")
    draw = ImageDraw.Draw(canvas)
    typeface = font(11)
    for row, (thumbnail, lines) in enumerate(zip(thumbnails, lines_per_query)):
        top = row * row_height + gap // 2
        canvas.paste(Image.fromarray(thumbnail.permute(1, 2, 0).numpy()), (gap // 2, top))
        for place, (line, is_ground_truth) in enumerate(lines):
            shown = line if len(line) <= 80 else line[:77] + "..."
            marker = "*" if is_ground_truth else " "
            colour = (0, 140, 40) if is_ground_truth else (60, 60, 60)
            draw.text((THUMBNAIL_SIZE + gap, top + place * line_height), f"{marker}{shown}", fill=colour, font=typeface)
    return np.asarray(canvas)


def format_results_table(metrics: dict[str, float]) -> str:
    """`kind/name/metric -> value` as one line per evaluation: `zeroshot/emoji   top1 0.412  top5 0.733`."""
    rows: dict[str, list[str]] = {}
    for full_name, value in metrics.items():
        evaluation, _, metric = full_name.rpartition("/")
        rows.setdefault(evaluation, []).append(f"{metric} {value:.4g}")
    width = max(len(evaluation) for evaluation in rows)
    return "\n".join(f"  {evaluation:<{width}}  {'  '.join(cells)}" for evaluation, cells in rows.items())


@dataclass
class _CachedFeatures:
    features: EvalFeatures
    max_samples: int | None  # what was asked for; fewer rows than asked means the whole shard set
    owner: weakref.ref  # the method they are of: an id() outlives its object and may name a new one

    def covers(self, max_samples: int | None) -> bool:
        complete = self.max_samples is None or len(self.features) < self.max_samples
        return complete or (max_samples is not None and max_samples <= len(self.features))


class _EvaluationPass:
    """What the callbacks of one evaluation pass share: features per (shards, image size, representation), and the
    metrics."""

    def __init__(self) -> None:
        self.features: dict[tuple[str, int, str], _CachedFeatures] = {}
        self.metrics: dict[str, float] = {}

    def clear(self) -> None:
        self.features.clear()
        self.metrics.clear()


_PASS = _EvaluationPass()


def new_evaluation_pass() -> None:
    """Forget the features and metrics of the current pass: for code that calls `evaluate` itself between weight
    updates (a bench scoring a model before and after training); Lightning's hooks start a pass at every epoch."""
    _PASS.clear()


class EvaluationCallback(Callback):
    """Base of the evaluation callbacks: when they run, shared features, logging.

    An evaluation runs at the end of every `validate` (validation epoch end) and `test` (test epoch end), and
    during `fit` once every `every_n_epochs` epochs (0: never): after that epoch's first validation, or at the
    epoch's end when it had none. Subclasses implement `evaluate`, returning `{"<kind>/<name>/<metric>": value}`;
    the values are the same on every rank (module doc) and are logged with `sync_dist=True`.

    Args:
        every_n_epochs: evaluate during fit every this many epochs (0: only in validate / test).
        batch_size: images per encoder call.
        num_workers: DataLoader workers of the evaluation loader.
    """

    def __init__(self, every_n_epochs: int = 1, batch_size: int = 64, num_workers: int = 0) -> None:
        self.every_n_epochs = every_n_epochs
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._fit_epoch_done: int | None = None
        self._warned = False

    def evaluate(self, trainer: Trainer, method: LightningModule) -> dict[str, float]:
        raise NotImplementedError(f"{type(self).__name__} must define evaluate(trainer, method)")

    def features(
        self,
        method: LightningModule,
        shards: str,
        max_samples: int | None = None,
        representation: Representation = "probe",
    ) -> EvalFeatures:
        """`extract_features` of the first `max_samples` samples of `shards`, computed once per evaluation pass,
        method and representation (a callback called on several methods in one pass never mixes their features)."""
        key = (id(method), shards, method.image_size, representation)
        cached = _PASS.features.get(key)
        if cached is not None and cached.owner() is not method:
            cached = None
        if cached is None or not cached.covers(max_samples):
            if cached is not None and max_samples is not None:  # a second, larger request: serve both from now on
                max_samples = None if cached.max_samples is None else max(max_samples, cached.max_samples)
            features = extract_features(method, shards, self.batch_size, self.num_workers, max_samples, representation)
            cached = _PASS.features[key] = _CachedFeatures(features, max_samples, weakref.ref(method))
        return cached.features.head(max_samples)

    def warn_once(self, message: str) -> None:
        if not self._warned:
            rank_zero_warn(message)
            self._warned = True

    def run(self, trainer: Trainer, method: LightningModule) -> None:
        with evaluation_mode(trainer, method):
            metrics = self.evaluate(trainer, method)
        for name, value in metrics.items():
            method.log(name, float(value), sync_dist=True)
        _PASS.metrics.update(metrics)

    # ------------------------------------------------------------------ schedule
    def _due_in_fit(self, trainer: Trainer) -> bool:
        epoch = trainer.current_epoch
        due = self.every_n_epochs > 0 and (epoch + 1) % self.every_n_epochs == 0 and self._fit_epoch_done != epoch
        if due:
            self._fit_epoch_done = epoch
        return due

    def on_train_epoch_start(self, trainer: Trainer, method: LightningModule) -> None:
        _PASS.clear()

    def on_validation_epoch_start(self, trainer: Trainer, method: LightningModule) -> None:
        _PASS.clear()

    def on_test_epoch_start(self, trainer: Trainer, method: LightningModule) -> None:
        _PASS.clear()

    def on_validation_epoch_end(self, trainer: Trainer, method: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "validate" or (trainer.state.fn == "fit" and self._due_in_fit(trainer)):
            self.run(trainer, method)

    def on_train_epoch_end(self, trainer: Trainer, method: LightningModule) -> None:
        if self._due_in_fit(trainer):
            self.run(trainer, method)

    def on_test_epoch_end(self, trainer: Trainer, method: LightningModule) -> None:
        self.run(trainer, method)

    def _print_table(self, trainer: Trainer) -> None:
        if _PASS.metrics:
            table = format_results_table(_PASS.metrics)
            rank_zero_info(f"evaluation ({trainer.state.fn.value}, step {trainer.global_step}):\n{table}")
            _PASS.metrics.clear()  # the first callback prints the table of the whole pass, the others nothing

    def on_validation_end(self, trainer: Trainer, method: LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._print_table(trainer)

    def on_test_end(self, trainer: Trainer, method: LightningModule) -> None:
        self._print_table(trainer)
