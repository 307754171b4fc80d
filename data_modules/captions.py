"""Captions: which text of a sample's `.txt` member (captions one per line) a training step sees.

* `"all"` — the whole member, every line (what the tokenizer cuts at its context length);
* `"line"` — one of its non-empty lines, uniformly (several captions per image: COCO-style alt texts, names and
  keywords);
* `"sentence"` — one sentence of all its lines, uniformly: ConVIRT's text transformation (Zhang et al. 2020,
  sec. 3, "Realization": "a simple uniform sampling of a sentence from the input document"), which keeps a short
  span whose meaning is intact instead of a report cut at 128 tokens.

Where that text comes from is the caption *source* (`caption_source`, the captions study of bench/scenes.py):

* `"short"` — the `.txt` member (the scenes' one-line caption, alt-text elsewhere);
* `"long"` — the `.json` member's `long_caption` (the scenes' one sentence per object, as DreamLIP's MLLM
  re-captions are, Zheng et al. 2024, "DreamLIP: Language-Image Pre-training with Long Captions", sec. 3.1);
* `"mixed"` — short or long, one of the two with probability 1/2 per sample and epoch.

`caption_sampling` then picks within the chosen text, so "long" + "sentence" is one sentence of the long caption.

Every choice is a pure function of (seed, epoch, sample key): the same on every rank and worker layout, different in
each epoch, and exactly the same when a run resumes mid-epoch (nothing about it is carried in a checkpoint).
"""

from __future__ import annotations

import random
import re
from typing import Literal

CaptionSampling = Literal["all", "line", "sentence"]
CAPTION_SAMPLINGS: tuple[str, ...] = ("all", "line", "sentence")
CaptionSource = Literal["short", "long", "mixed"]
CAPTION_SOURCES: tuple[str, ...] = ("short", "long", "mixed")
#: the `.json` field that holds a sample's long caption (`vlp-data scenes` writes it).
LONG_CAPTION_FIELD = "long_caption"

# a sentence ends at . ! or ? followed by white space ("1.5 cm" and "e.g.," stay whole)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def caption_choices(text: str, sampling: CaptionSampling) -> list[str]:
    """The candidates `sample_caption` picks from: [text], its non-empty lines, or the sentences of its lines."""
    if sampling == "all":
        return [text]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if sampling == "line":
        return lines
    if sampling == "sentence":
        return [sentence for line in lines for sentence in _SENTENCE_END.split(line) if sentence]
    raise ValueError(f"caption_sampling must be one of {CAPTION_SAMPLINGS}, got {sampling!r}")


def sample_caption(text: str, sampling: CaptionSampling, seed: str, key: str) -> str:
    """One caption of a non-empty `text` for the sample `key`, drawn with `seed` (seed and epoch of the stream)."""
    choices = caption_choices(text, sampling)
    if len(choices) == 1:
        return choices[0]
    return random.Random(f"{seed}:{key}").choice(choices)


def sentences(text: str) -> list[str]:
    """The sentences of `text` (all its lines), in order: what DreamLIP samples its sub-captions from (sec. 3.2)."""
    return caption_choices(text, "sentence")


def caption_from_source(short: str | None, long: str | None, source: CaptionSource, seed: str, key: str) -> str | None:
    """The text `source` names for the sample `key` (module doc): `short`, `long`, or, for "mixed", one of the two
    drawn with `seed` (seed and epoch of the stream; a draw independent of `sample_caption`'s). None when the named
    text is missing, so the caller can say which one."""
    if source == "short":
        return short
    if source == "long":
        return long
    if source == "mixed":
        return long if random.Random(f"source:{seed}:{key}").random() < 0.5 else short
    raise ValueError(f"caption_source must be one of {CAPTION_SOURCES}, got {source!r}")
