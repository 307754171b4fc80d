"""LightningDataModules streaming WebDataset shards: `ImageTextDataModule` (image-caption pairs, CLIP family),
`ImageDataModule` (images, with labels when the shards have them), `InstructionDataModule` (images with
conversations, for visual instruction tuning) and `VideoDataModule` (clips with captions, labels and timelines).
The image ones return object `boxes`, instance `masks` and `objects` (`data_modules.instances`) in the views' pixels
when the shards have `.instances.png` members.

All build every split with the one pipeline of `data_modules.pipeline`. At `setup` they ask the attached method
for what was left unset (`image_size`, `train_views()`, `tokenizer`), check that the shards exist and hold what the
method's `required_keys` need, and stop with one `DataConfigError` sentence naming the argument and the fix when
they do not. Rank and world size come from the trainer.

Validation and test loaders use the training views with a fixed epoch, so their augmentations (and the method's
validation loss) are the same at every evaluation, and they pad to equal batches on every rank like training.

Exact resume: `state_dict()` (saved by Lightning in every checkpoint) records, per rank, how far each loader worker
had read when the trainer took its last batch; `load_state_dict()` makes the next pass of that epoch continue from
there, so a run stopped mid-epoch and resumed sees exactly the samples it had not seen yet (same world size and
`num_workers`; otherwise it resumes approximately, after the same number of batches, and says so).

Bad samples are skipped and counted: `skipped_count()` (this rank's count), logged as `data/skipped` to the
trainer's loggers whenever it changes and summarised in one line at teardown.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch import LightningDataModule

from data_modules.captions import CAPTION_SAMPLINGS, CAPTION_SOURCES, CaptionSampling, CaptionSource
from data_modules.clip_views import ClipViews
from data_modules.clips import CLIP_MEMBERS, VIDEO_MEMBERS
from data_modules.instances import INSTANCES_MEMBER
from data_modules.manifest import class_count, local_path
from data_modules.pipeline import (
    IMAGE_MEMBERS,
    STREAM_FIELD,
    DataConfigError,
    ResumePoint,
    SampleDecoder,
    StreamingLoader,
    expand_shards,
    make_eval_loader,
    make_loader,
    manifest_of,
    resolve_counts,
    shard_members,
)
from data_modules.video import ClipDecoder
from data_modules.views import EvalView, Views, finish_views
from vlp_lightning.modules.tokenizers import Tokenizer

log = logging.getLogger(__name__)

_BUILD_HINT = "build shards with `vlp-data` (e.g. `vlp-data emoji data/emoji`; `vlp-data --help` lists the sources)"
_IMAGE_ONLY_HINT = "choose an image-only method such as vlp_lightning.methods.SwAV"
#: batch fields the collates fill with what text and `.json` members decode to (strings, numbers, lists and dicts of
#: them), never a tensor: `transfer_batch_to_device` hands them on as they are instead of walking every element.
PLAIN_FIELDS = frozenset({"__key__", "caption", "long_caption", "meta", "conversation", "segments"})


class _Split:
    """One resolved split: shard URLs, per-shard counts and the members the shards hold (at least one of `media`)."""

    def __init__(self, argument: str, shards: str, media: tuple[str, ...] = IMAGE_MEMBERS) -> None:
        self.argument = argument
        self.shards = shards
        self.urls = expand_shards(shards)
        if not self.urls:
            raise DataConfigError(f"{argument}={shards!r} matches no shard file; {_BUILD_HINT}")
        for url in self.urls:
            path = local_path(url)
            if path is not None and not path.is_file():
                raise DataConfigError(f"{argument}={shards!r}: shard {path} does not exist; {_BUILD_HINT}")
        self.manifest = manifest_of(self.urls)
        self.counts = resolve_counts(self.urls)
        self.members = shard_members(self.urls, self.manifest)
        if not self.members & set(media):
            kind = "image" if media == IMAGE_MEMBERS else "clip"
            raise DataConfigError(
                f"{argument}={shards!r} has no {kind} members ({'/'.join('.' + name for name in media)}), only "
                f"{sorted(self.members)}"
            )

    def describe(self) -> str:
        return f"{self.argument}={self.shards!r}"


class StreamingDataModule(LightningDataModule):
    """What both DataModules share; subclasses say whether captions are part of a sample.

    Args:
        train_shards / val_shards / test_shards: shard patterns (paths, globs, `{000000..000009}` braces, URLs).
        predict_shards: the shard set `vlp predict` embeds (default: test_shards, else val_shards), every sample
            once, in shard order, with the deterministic evaluation crop.
        batch_size: per-rank batch size.
        num_workers: DataLoader worker processes per rank.
        image_size: crop size; None asks the method (`method.image_size`).
        views: training views; None asks the method (`method.train_views()`).
        samples_per_epoch: training samples per epoch over all ranks; None = the training shards' total.
        shuffle_buffer: samples in the shuffle buffer of each worker.
        resampled: draw training shards with replacement (open_clip `--dataset-resampled`) instead of epoch passes.
        seed: seed of shard order, sample shuffle and augmentations (independent of the global seed).
        strict: stop at the first bad sample instead of skipping it.
    """

    #: a sample's caption (`.txt`) is part of the batch (`caption`, and `text` tokens).
    with_caption = False
    #: which text of a `.txt` member a sample's caption is (`data_modules.captions`).
    caption_sampling: CaptionSampling = "all"
    #: which text a sample's caption is drawn from: `.txt` "short", `.json` "long" or "mixed" (`data_modules.captions`).
    caption_source: CaptionSource = "short"
    #: PTP's position prompts follow the training captions (`SampleDecoder.with_position_prompts`).
    position_prompts = False
    #: a sample's `.json` conversation is part of the batch (`conversation`; `data_modules.conversations`).
    with_conversation = False
    #: the member kinds a sample is built from; a split must hold one of them.
    media: tuple[str, ...] = IMAGE_MEMBERS

    def __init__(
        self,
        train_shards: str | None = None,
        val_shards: str | None = None,
        test_shards: str | None = None,
        batch_size: PositiveInt = 64,
        num_workers: NonNegativeInt = 2,
        image_size: int | None = None,
        views: Views | None = None,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        seed: int = 0,
        strict: bool = False,
        predict_shards: str | None = None,
    ) -> None:
        super().__init__()
        self.predict_shards = predict_shards
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.test_shards = test_shards
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.views = views
        self.samples_per_epoch = samples_per_epoch
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.seed = seed
        self.strict = strict
        self.splits: dict[str, _Split] = {}
        self.decoders: dict[str, SampleDecoder] = {}
        self._train_loader: StreamingLoader | None = None
        self._resume: ResumePoint | None = None
        # Training progress of this rank in the current epoch: epoch, batches used, worker -> (read, skipped).
        self._epoch = -1
        self._batches = 0
        self._workers: dict[int, tuple[int, int]] = {}
        # Bad-sample counts: (stage, pass or epoch, worker) -> cumulative count, plus what a checkpoint carried.
        self._skipped: dict[tuple[str, int, int], int] = {}
        self._skipped_before_resume = 0
        self._skipped_logged = -1

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        stage = str(getattr(stage, "value", stage))  # Lightning passes its TrainerFn enum
        if stage == "predict":
            self._setup_predict()
            return
        wanted = {
            "fit": [("train", "train_shards"), ("val", "val_shards")],
            "validate": [("val", "val_shards")],
            "test": [("test", "test_shards")],
        }.get(stage, [])
        if not wanted:
            return
        method = self.trainer.lightning_module if self.trainer is not None else None
        for split, argument in wanted:
            shards = getattr(self, argument)
            if shards is None:
                if split == "val" and stage == "fit":
                    continue
                raise DataConfigError(
                    f"`vlp {stage}` needs --data.{argument}, which the config does not set; give a shard pattern "
                    f"(e.g. --data.{argument} 'data/emoji/{split}-000000.tar'), or build a {split} split with "
                    f"`vlp-data` (e.g. `vlp-data emoji data/emoji --split train=0.8,val=0.1,test=0.1`)"
                )
            self.splits[split] = _Split(argument, shards, self.media)
            self._check_keys(self.splits[split], method)
        self._build_decoders(method)

    def _build_decoders(self, method: object | None) -> None:
        """One decoder per resolved split, with the method's views at its image size."""
        transform = self._views(method).build(self._image_size(method))
        tokenizer = self._tokenizer(method)
        # instances follow no affine warp: views with one leave them out, unless the method needs them (an error)
        warps = any(crop.affine is not None for crop in transform.crops)
        needs_instances = bool({"boxes", "masks"} & set(getattr(method, "required_keys", ())))
        prompts = self.position_prompts and "train" in self.splits
        for split, data in self.splits.items():
            self.decoders[split] = SampleDecoder(
                transform,
                with_caption=self.with_caption,
                with_label="cls" in data.members,
                tokenizer=tokenizer,
                num_classes=class_count(data.manifest),
                caption_sampling=self.caption_sampling,
                caption_source=self.caption_source,
                with_long_caption=self.with_caption and "long_caption" in getattr(method, "required_keys", ()),
                with_instances=INSTANCES_MEMBER in data.members and (needs_instances or not warps or prompts),
                position_prompts=self.position_prompts and split == "train",
                with_conversation=self.with_conversation,
            )

    def _check_keys(self, split: _Split, method: object | None) -> None:
        """Stop when the method needs a batch key this data cannot provide; one sentence with the fix."""
        required = getattr(method, "required_keys", ("image",))
        name = type(method).__name__
        if self.with_caption and "txt" not in split.members:
            if "text" in required:
                raise DataConfigError(
                    f"{name} needs captions (`text`) but {split.describe()} has no .txt members; point it at "
                    f"captioned shards or use ImageDataModule and {_IMAGE_ONLY_HINT}"
                )
            raise DataConfigError(
                f"{type(self).__name__} needs captions but {split.describe()} has no .txt members; use "
                "ImageDataModule for image-only data"
            )
        wants_long = "long_caption" in required or (self.with_caption and self.caption_source != "short")
        if wants_long and "json" not in split.members:
            asked_by = f"{name} needs `long_caption`" if "long_caption" in required else (
                f"caption_source={self.caption_source!r} reads long captions")
            raise DataConfigError(
                f"{asked_by} (the .json field 'long_caption') but {split.describe()} has no .json members; use "
                "shards with long captions (e.g. `vlp-data scenes data/scenes`) or caption_source: short"
            )
        if "long_caption" in required and not self.with_caption:
            raise DataConfigError(
                f"{name} needs long captions (`long_caption`) but {type(self).__name__} provides no captions; use "
                "ImageTextDataModule with long-captioned shards (e.g. `vlp-data scenes data/scenes`)"
            )
        if "text" in required and not self.with_caption:
            raise DataConfigError(
                f"{name} needs captions (`text`) but {type(self).__name__} does not provide them; use "
                f"ImageTextDataModule with captioned shards or {_IMAGE_ONLY_HINT}"
            )
        if self.with_conversation and "json" not in split.members:
            raise DataConfigError(
                f"{type(self).__name__} needs conversations (.json \"conversations\") but {split.describe()} has no "
                ".json members; build instruction shards with `vlp-data instructions SHARDS OUT` (e.g. `vlp-data "
                "instructions 'data/emoji/*.tar' data/emoji-instructions`)"
            )
        if "conversation" in required and not (self.with_conversation or self.with_caption):
            raise DataConfigError(
                f"{name} needs conversations or captions (`conversation`) but {type(self).__name__} provides "
                "neither; use InstructionDataModule with `vlp-data instructions` shards or ImageTextDataModule with "
                "captioned shards"
            )
        if "label" in required and "cls" not in split.members:
            raise DataConfigError(
                f"{name} needs class labels (`label`) but {split.describe()} has no .cls members; use labelled "
                "shards (e.g. `vlp-data fashion-mnist`) or a method that does not need labels"
            )
        if {"boxes", "masks"} & set(required) and INSTANCES_MEMBER not in split.members:
            raise DataConfigError(
                f"{name} needs object boxes and masks (`boxes`, `masks`) but {split.describe()} has no "
                f".{INSTANCES_MEMBER} members; use scene shards (e.g. `vlp-data scenes data/scenes`)"
            )

    def _image_size(self, method: object | None) -> int:
        if self.image_size is not None:
            return self.image_size
        if method is None:
            raise DataConfigError(f"{type(self).__name__}: image_size is not set and no method is attached to ask")
        return method.image_size

    def _views(self, method: object | None) -> Views:
        if self.views is not None:
            # evaluation normalises as the method's own training views do: the two must agree
            expected = method.train_views().normalization if method is not None else self.views.normalization
            if self.views.normalization != expected:
                raise DataConfigError(
                    f"views normalise with (mean, std) = {self.views.normalization} but {type(method).__name__} "
                    f"(its train_views(), which evaluation follows) with {expected}; give data.views the same mean "
                    "and std (for the CLIP family, the image tower's `mean` / `std`)"
                )
            return self.views
        if method is None:
            raise DataConfigError(f"{type(self).__name__}: views is not set and no method is attached to ask")
        return method.train_views()

    def _tokenizer(self, method: object | None) -> Tokenizer | None:
        return None

    # ------------------------------------------------------------------ loaders
    @property
    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    @property
    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _setup_predict(self) -> None:
        """`vlp predict`: the shard set to embed (predict, else test, else validation shards), checked."""
        for argument in ("predict_shards", "test_shards", "val_shards"):
            if getattr(self, argument) is not None:
                self.splits["predict"] = _Split(argument, getattr(self, argument), self.media)
                log.info("vlp predict: embedding %s", self.splits["predict"].describe())
                return
        raise DataConfigError(
            "`vlp predict` needs the shards to embed: set --data.predict_shards (e.g. "
            "--data.predict_shards 'data/emoji/test-000000.tar'); test_shards or val_shards are used when set"
        )

    def predict_dataloader(self) -> Iterable[dict]:
        """Every sample of the predict shards once, in shard order, with the evaluation crop and the method's
        normalisation; captions tokenized with the method's tokenizer when the shards have them."""
        if "predict" not in self.splits:
            raise DataConfigError("no predict shards: setup('predict') resolves them")
        method = self.trainer.lightning_module if self.trainer is not None else None
        mean, std = self._views(method).normalization
        return make_eval_loader(
            self.splits["predict"].shards, self._image_size(method), self.batch_size,
            tokenizer=self._tokenizer(method) if self.with_caption else None, num_workers=self.num_workers,
            view=EvalView(mean=mean, std=std),
        )

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch

    def _loader(
        self,
        split: str,
        epoch_source: Callable[[], int] | None,
        shuffle: bool = False,
        samples_per_epoch: int | None = None,
        resampled: bool = False,
    ) -> StreamingLoader:
        if split not in self.splits:
            raise DataConfigError(f"no {split} shards: set {split}_shards (setup() resolves them)")
        data = self.splits[split]
        return make_loader(
            data.urls,
            self.decoders[split],
            self.batch_size,
            counts=data.counts,
            rank=self._rank,
            world_size=self._world_size,
            num_workers=self.num_workers,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            strict=self.strict,
            shuffle=shuffle,
            samples_per_epoch=samples_per_epoch,
            resampled=resampled,
            epoch_source=epoch_source,
            # with a trainer the views are finished on its device, in on_after_batch_transfer
            finish=self.trainer is None,
        )

    def train_dataloader(self) -> StreamingLoader:
        # Without a trainer (scripts, tests) the loader counts its own passes as epochs.
        epoch_source = self._current_epoch if self.trainer is not None else None
        self._train_loader = self._loader(
            "train", epoch_source, shuffle=True, samples_per_epoch=self.samples_per_epoch, resampled=self.resampled
        )
        if self._resume is not None:
            self._train_loader.resume_from(self._resume)
        return self._train_loader

    def val_dataloader(self) -> StreamingLoader | list:
        if "val" not in self.splits:
            return []
        return self._loader("val", _first_epoch)

    def test_dataloader(self) -> StreamingLoader:
        return self._loader("test", _first_epoch)

    # ------------------------------------------------------------------ progress, skipped samples
    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Runs once per batch the trainer actually uses (after Lightning's one-batch prefetch): record progress."""
        info = batch.pop(STREAM_FIELD, None)
        if info is None:
            return batch
        training = self.trainer is None or self.trainer.training
        self._record(info, "train" if training else self.trainer.state.stage.value)
        return batch

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Lightning's transfer for the fields that may hold tensors; the `PLAIN_FIELDS` are passed on untouched
        (Lightning walks every element of a collection: a batch of 32 clips' `meta` cost more than its tensors)."""
        if not isinstance(batch, dict) or not PLAIN_FIELDS & batch.keys():
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        moved = super().transfer_batch_to_device(
            {name: value for name, value in batch.items() if name not in PLAIN_FIELDS}, device, dataloader_idx)
        return {name: batch[name] if name in PLAIN_FIELDS else moved[name] for name in batch}

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """The photometric half of the views (colour, blur, normalisation), batched on the trainer's device."""
        return finish_views(batch)

    def _record(self, info: dict, stage: str) -> None:
        """Account for one used batch from its `__stream__` field (what `on_before_batch_transfer` does)."""
        worker = info["worker"]
        if stage == "train":
            if info["epoch"] != self._epoch:
                self._epoch, self._batches, self._workers = info["epoch"], 0, {}
            self._batches += 1
            self._workers[worker] = (info["position"], info["skipped"])
            self._skipped[("train", info["epoch"], worker)] = info["skipped"]
        else:
            self._skipped[(stage, info["pass"], worker)] = info["skipped"]
        skipped = self.skipped_count()
        if self.trainer is not None and skipped != self._skipped_logged:
            for logger in self.trainer.loggers:
                logger.log_metrics({"data/skipped": skipped}, step=self.trainer.global_step)
            self._skipped_logged = skipped

    def skipped_count(self) -> int:
        """Bad samples this rank has dropped (each training epoch and evaluation pass counts its own)."""
        return self._skipped_before_resume + sum(self._skipped.values())

    def teardown(self, stage: str) -> None:
        skipped = self.skipped_count()
        (log.warning if skipped else log.info)(
            "%s (rank %d): %d bad samples skipped", type(self).__name__, self._rank, skipped
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        in_this_epoch = sum(skipped for _, skipped in self._workers.values())
        local = {"workers": dict(self._workers), "skipped_before": self.skipped_count() - in_this_epoch}
        ranks = [local]
        if dist.is_available() and dist.is_initialized() and self._world_size > 1:
            ranks = [None] * self._world_size
            dist.all_gather_object(ranks, local)  # Lightning calls state_dict on every rank when checkpointing
        return {
            "epoch": self._epoch,
            "batches": self._batches,
            "world_size": self._world_size,
            "streams_per_rank": max(1, self.num_workers),
            "ranks": ranks,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        layout = (self._world_size, max(1, self.num_workers))
        saved_layout = (state_dict["world_size"], state_dict["streams_per_rank"])
        local = state_dict["ranks"][self._rank] if layout == saved_layout else {"workers": {}, "skipped_before": 0}
        if layout != saved_layout:
            log.warning(
                "resuming with (world_size, loader streams per rank) = %s instead of %s: the epoch continues after "
                "the same number of batches, but which samples remain is approximate", layout, saved_layout,
            )
        self._epoch, self._batches = state_dict["epoch"], state_dict["batches"]
        self._workers = {int(worker): tuple(value) for worker, value in local["workers"].items()}
        self._skipped = {("train", self._epoch, worker): skipped for worker, (_, skipped) in self._workers.items()}
        self._skipped_before_resume = local["skipped_before"]
        self._resume = ResumePoint(self._epoch, self._batches, dict(self._workers))
        # Lightning warns that a loader without its own state_dict cannot resume mid-epoch; this one resumes
        # exactly through the DataModule, so the warning would only mislead.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        if self._train_loader is not None:
            self._train_loader.resume_from(self._resume)


class ImageTextDataModule(StreamingDataModule):
    """Image-caption pairs: batches carry `image`, `caption`, `text` tokens (and `label` when the shards have it).

    A method needing `conversation` (the frozen-language-model family) may train on these batches too: it makes
    one-exchange conversations from `caption` itself (`data_modules.conversations.caption_conversation`).

    Args:
        tokenizer: caption tokenizer; None uses the attached method's (`method.tokenizer`). Image-only methods
            (e.g. SwAV) need none and get captions as strings only.
        caption_sampling: the caption of a sample, from its `.txt` lines: "all" of them (joined, as stored), one
            random "line", or one random "sentence" (ConVIRT, Zhang et al. 2020, sec. 3); the draw depends on
            (seed, epoch, sample key) only, so it is deterministic and resumes exactly (`data_modules.captions`).
        caption_source: where a caption comes from: "short" (the `.txt`), "long" (the `.json` `long_caption`,
            e.g. the scenes' one sentence per object) or "mixed" (short or long, drawn per sample from (seed, epoch,
            key), so resume is exact); `caption_sampling` then picks within it. Shards without long captions stop at
            setup (no `.json`) or at the first such sample, never silently.
        position_prompts: PTP (Wang et al. 2023, "Position-guided Text Prompt for Vision-Language Pre-training"):
            each training caption is followed by "The block [P] has a [O]." for one of the 3 x 3 blocks of the
            image as the model sees it (after its crop and flip) and the object covering most of that block, read
            from the scene shards' instance masks (`vlp-data scenes`); validation and test captions are left as
            they are (PTP prompts in pretraining only). Works with any image-text method.
        (the rest: see `StreamingDataModule`)
    """

    with_caption = True

    def __init__(
        self,
        train_shards: str | None = None,
        val_shards: str | None = None,
        test_shards: str | None = None,
        batch_size: PositiveInt = 64,
        num_workers: NonNegativeInt = 2,
        image_size: int | None = None,
        views: Views | None = None,
        tokenizer: Tokenizer | None = None,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        seed: int = 0,
        strict: bool = False,
        caption_sampling: CaptionSampling = "all",
        predict_shards: str | None = None,
        position_prompts: bool = False,
        caption_source: CaptionSource = "short",
    ) -> None:
        super().__init__(
            train_shards, val_shards, test_shards, batch_size, num_workers, image_size, views,
            samples_per_epoch, shuffle_buffer, resampled, seed, strict, predict_shards,
        )
        if caption_sampling not in CAPTION_SAMPLINGS:
            raise DataConfigError(f"caption_sampling must be one of {CAPTION_SAMPLINGS}, got {caption_sampling!r}")
        if caption_source not in CAPTION_SOURCES:
            raise DataConfigError(f"caption_source must be one of {CAPTION_SOURCES}, got {caption_source!r}")
        self.caption_source = caption_source
        self.tokenizer = tokenizer
        self.caption_sampling = caption_sampling
        self.position_prompts = position_prompts

    def _tokenizer(self, method: object | None) -> Tokenizer | None:
        tokenizer = self.tokenizer or getattr(method, "tokenizer", None)
        if tokenizer is None and "text" in getattr(method, "required_keys", ()):
            raise DataConfigError(
                f"{type(method).__name__} needs caption tokens (`text`) but neither ImageTextDataModule.tokenizer "
                "nor the method's tokenizer is set; pass data.init_args.tokenizer"
            )
        return tokenizer


class ImageDataModule(StreamingDataModule):
    """Images (and `label` when the shards have `.cls` members), for image-only methods (SwAV, MAE, ...).

    Args: see `StreamingDataModule`.
    """


class InstructionDataModule(StreamingDataModule):
    """Images with conversations, for visual instruction tuning (the frozen-language-model family: LLaVA, LiMBeR,
    Vision-Flan's two-stage tuning): batches carry `image`, `conversation`, `meta` (the decoded `.json`), `__key__`,
    and `label` when the shards have `.cls` members.

    `conversation` is a list with one conversation per sample, each a list of `{"role", "content"}` turns (roles
    system / user / assistant) read from the `.json` `"conversations"` and checked by
    `data_modules.conversations.parse_conversation` (both its role / content and LLaVA's from / value turns are
    accepted); a sample whose conversation is missing or invalid is skipped and counted like any bad sample. A user
    turn without the `<image>` placeholder gets the image in front of the first user turn (the method's job).
    Build such shards from labelled or captioned ones with `vlp-data instructions SHARDS OUT` (Vision-Flan-style
    tasks: caption, classify, multiple choice, yes / no). A method that only needs conversations made from captions
    can use `ImageTextDataModule` instead.

    Args: see `StreamingDataModule`.
    """

    with_conversation = True


class VideoDataModule(StreamingDataModule):
    """Clips (`.mp4` / `.webm` / `.frames.npy`, `data_modules.clips`) through the same streaming pipeline, with the
    same exact mid-epoch resume and bad-sample counting as images.

    Batches (`data_modules.video`): `video` float [B, T, 3, S, S] normalised as the views say, `frame_times` float
    [B, T] (seconds), `segments` (per sample a list of (first, last sampled position, text) of the `.json`
    timeline), `caption` (and `text` tokens with a tokenizer) when the shards have `.txt`, `label` when they have
    `.cls`, `meta`, `tube_mask` bool [B, T / tubelet, patches] when the views mask, `__key__`. A clip that does not
    decode, is shorter than the sampler needs or has a timeline segment outside it is skipped and counted.

    Args:
        views: the clip views (`data_modules.clip_views.ClipViews`: frames, crop, flip, tube mask); None asks the
            method (`method.train_views()`).
        tokenizer: caption tokenizer; None uses the method's when it has one (`text` tokens then come with
            `caption`).
        (the rest: see `StreamingDataModule`)
    """

    media = CLIP_MEMBERS

    def __init__(
        self,
        train_shards: str | None = None,
        val_shards: str | None = None,
        test_shards: str | None = None,
        batch_size: PositiveInt = 8,
        num_workers: NonNegativeInt = 2,
        image_size: int | None = None,
        views: ClipViews | None = None,
        tokenizer: Tokenizer | None = None,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 100,
        resampled: bool = False,
        seed: int = 0,
        strict: bool = False,
        predict_shards: str | None = None,
    ) -> None:
        super().__init__(
            train_shards, val_shards, test_shards, batch_size, num_workers, image_size, views,
            samples_per_epoch, shuffle_buffer, resampled, seed, strict, predict_shards,
        )
        self.tokenizer = tokenizer

    def _check_keys(self, split: _Split, method: object | None) -> None:
        """Stop when the method needs a batch key these clips cannot provide; one sentence with the fix."""
        required = set(getattr(method, "required_keys", ("video",)))
        name = type(method).__name__
        needs = {"text": "txt", "caption": "txt", "label": "cls", "segments": "json"}
        for key, member in needs.items():
            if key in required and member not in split.members:
                raise DataConfigError(
                    f"{name} needs `{key}` but {split.describe()} has no .{member} members; build clip shards that "
                    "have them (e.g. `vlp-data moving data/moving --images 'data/emoji/train-*.tar'`)"
                )
        if split.members & set(VIDEO_MEMBERS) and importlib.util.find_spec("av") is None:
            raise DataConfigError(
                f"{split.describe()} holds .mp4 / .webm clips, which need PyAV: install the video extra "
                "(pip install -e '.[video]')"
            )

    def _build_decoders(self, method: object | None) -> None:
        transform = self._views(method).build(self._image_size(method))
        tokenizer = self.tokenizer or getattr(method, "tokenizer", None)
        if tokenizer is None and "text" in getattr(method, "required_keys", ()):
            raise DataConfigError(f"{type(method).__name__} needs caption tokens (`text`) but neither "
                                  "VideoDataModule.tokenizer nor the method's tokenizer is set; pass "
                                  "data.init_args.tokenizer")
        for split, data in self.splits.items():
            self.decoders[split] = self._clip_decoder(data, transform, tokenizer, method)

    @staticmethod
    def _clip_decoder(data: _Split, transform, tokenizer: Tokenizer | None, method: object | None) -> ClipDecoder:
        """The decoder of one split: captions and labels where its shards have them; clips without a caption kept
        as silent ones for a method that `accepts_silent_clips` (else they are counted skips)."""
        return ClipDecoder(transform, with_caption="txt" in data.members, with_label="cls" in data.members,
                           tokenizer=tokenizer, num_classes=class_count(data.manifest),
                           silent_ok=bool(getattr(method, "accepts_silent_clips", False)))

    def predict_dataloader(self) -> Iterable[dict]:
        """`vlp predict` of clips: every clip of the predict shards once, in shard order, with the method's frames
        and normalisation but no randomness (`ClipViews.for_evaluation`); captions (and their tokens) and labels
        when the shards have them."""
        if "predict" not in self.splits:
            raise DataConfigError("no predict shards: setup('predict') resolves them")
        method = self.trainer.lightning_module if self.trainer is not None else None
        data = self.splits["predict"]
        self._check_keys(data, None)
        decoder = self._clip_decoder(data, self._views(method).for_evaluation().build(self._image_size(method)),
                                     self.tokenizer or getattr(method, "tokenizer", None), method)
        return make_loader(data.urls, decoder, self.batch_size, num_workers=self.num_workers, shuffle=False,
                           pad=False, finish=False)


def _first_epoch() -> int:
    """Evaluation passes always use epoch 0: the same order and augmentations every time."""
    return 0

