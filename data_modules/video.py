"""`ClipDecoder`: the clip counterpart of `pipeline.SampleDecoder`, plugged into the same `ShardStream`.

Per sample (in the loader worker): the clip member is opened (`data_modules.clips`), its fps and timeline read from
`.json`, the frames its views sample decoded and cropped (`data_modules.clip_views`); per batch: the clips packed as
uint8 with their flips and tube masks. Everything random comes from the `random.Random` and seed the stream passes,
so a clip batch is a pure function of (seed, epoch, rank, worker, batch index) and resumes exactly, as images do.

Batch: `video` (packed uint8 until `finish_views`, then float `[B, T, 3, S, S]`), `frame_times` float `[B, T]`
(seconds of the sampled frames), `segments` (per sample, the timeline segments that sampled frames fall in, as
(first, last sampled position, text)), `caption` and `text` tokens (with `with_caption`), `label` (with
`with_label`), `meta` (the `.json`), `tube_mask` (when the views ask for it) and `__key__`.

A clip that does not decode, is shorter than the sampler needs or has a timeline segment outside it, a missing
caption or label: the sample is dropped and counted with the reason (`SkipCounter`; `strict` raises). With
`silent_ok` (a method that declares `accepts_silent_clips`, OphCLIP) a clip without caption, or marked `"silent":
true` in its `.json`, is kept as a silent clip instead: caption `""` and `silent` True in the batch's bool `silent`
[B].
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from data_modules.captions import CaptionSampling
from data_modules.clip_views import ClipTransform
from data_modules.clips import ClipError, clip_fps, read_clip, sampled_segments, timeline
from data_modules.pipeline import ERROR_FIELD, _BadSample, read_caption, read_label
from data_modules.views import VIEWS_FIELD

if TYPE_CHECKING:  # the tokenizers module pulls in the model packages; workers need none of them
    from vlp_lightning.modules.tokenizers import Tokenizer


@dataclass
class ClipDecoder:
    """Raw clip sample -> decoded sample, decoded samples -> batch (module doc); `with_caption` / `with_label` make
    `.txt` / `.cls` required, a label must lie in `[0, num_classes)`."""

    transform: ClipTransform
    with_caption: bool = False
    with_label: bool = False
    tokenizer: Tokenizer | None = None
    num_classes: int | None = None
    caption_sampling: CaptionSampling = "all"
    silent_ok: bool = False
    packed_field: ClassVar[str] = "video"

    @property
    def image_bytes(self) -> int:
        """Bytes of one sample's packed uint8 clip (the `Handover` slots are sized by it)."""
        return self.transform.clip_bytes

    def decode(self, raw: dict, rng: random.Random, caption_seed: str = "") -> dict:
        if ERROR_FIELD in raw:
            raise _BadSample(raw[ERROR_FIELD])
        try:
            meta = json.loads(raw["json"]) if "json" in raw else {}
            if not isinstance(meta, dict):
                raise ClipError(".json is not an object")
            clip = read_clip(raw)
            fps = clip_fps(meta, clip)
            segments = timeline(meta, clip.count / fps)
            indices = self.transform.sample(clip.count, rng)
            video = self.transform.crop(clip.frames(indices), rng)
        except (ClipError, UnicodeDecodeError, ValueError) as error:
            raise _BadSample(f"unusable clip: {error}") from error
        times = [index / fps for index in indices]
        sample = {"__key__": raw["__key__"], "video": video, "frame_times": times,
                  "segments": sampled_segments(segments, times)}
        if "json" in raw:
            sample["meta"] = meta
        try:
            if self.with_caption:
                silent = self.silent_ok and (bool(meta.get("silent")) or not _has_caption(raw))
                sample["caption"] = "" if silent else read_caption(raw, self.caption_sampling, caption_seed)
                if self.silent_ok:
                    sample["silent"] = silent
            if self.with_label:
                sample["label"] = read_label(raw, self.num_classes)
        except (UnicodeDecodeError, ValueError) as error:
            raise _BadSample(f"undecodable member: {error!r}") from error
        return sample

    def collate(self, samples: list[dict], seed: int) -> dict:
        """Decoded samples -> batch; `video` holds the packed uint8 clips until `finish_views`."""
        video, recipe, masks = self.transform.pack([sample["video"] for sample in samples], seed)
        batch: dict = {
            "__key__": [sample["__key__"] for sample in samples],
            "video": video,
            VIEWS_FIELD: recipe,
            "frame_times": torch.from_numpy(np.array([sample["frame_times"] for sample in samples], np.float32)),
            "segments": [sample["segments"] for sample in samples],
        }
        if masks is not None:
            batch["tube_mask"] = masks
        if self.with_caption:
            batch["caption"] = [sample["caption"] for sample in samples]
            if self.tokenizer is not None:
                batch["text"] = self.tokenizer(batch["caption"])
            if self.silent_ok:
                batch["silent"] = torch.tensor([sample["silent"] for sample in samples], dtype=torch.bool)
        if self.with_label:
            batch["label"] = torch.tensor([sample["label"] for sample in samples], dtype=torch.long)
        if any("meta" in sample for sample in samples):
            batch["meta"] = [sample.get("meta", {}) for sample in samples]
        return batch


def _has_caption(raw: dict) -> bool:
    """Whether a raw sample has a non-empty `.txt`."""
    return bool(raw.get("txt", b"").strip())
