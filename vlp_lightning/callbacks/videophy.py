"""Physical plausibility of clips against their captions: VideoPhy's question, asked of a video-text model.

VideoPhy (Bansal et al. 2024, "VideoPhy: Evaluating Physical Commonsense for Video Generation", sec. 3) asks of a
generated video, given its caption, whether it follows physical commonsense (a binary physical-commonsense
judgement next to semantic adherence), judged by humans and by the auto-evaluator VideoCon-Physics. Here there are
no generated videos and no human labels, so each real clip gets implausible twins whose physics is broken by
construction, and a video-text model is asked which of the two fits the caption better:

* `reversed`: the frames in reverse order (time runs backwards: objects fall up, a door un-opens);
* `teleport`: with T frames, a = T // 3 and b = T - T // 3, the middle chunk [a, b) is cut out and put at the end,
  frame order 0 .. a-1, b .. T-1, a .. b-1 (T = 8: 0 1 6 7 2 3 4 5): the object jumps from where it is at frame
  a-1 to where it is at frame b, then jumps back. Needs T >= 3 (for T < 3 the twin is the clip itself).

Pair accuracy of a twin kind = the fraction of (clip, twin) pairs where the model's score of the real clip with its
caption, `video_text_logits(clip, text)` of any `VideoTextMethod`, is above the twin's; a tie counts half (so a
model blind to frame order, the frame-averaged baseline, scores exactly chance, 0.5, on every twin kind). Scores
closer than `tie_tolerance` (relative and absolute, `torch.isclose`) are ties: a sum over frames in another order
differs in its last bits. Samples without a caption (silent clips) are skipped.

`videophy_pair_accuracy(method, video, text)` is the function (for benches); `VideoPhy` is the callback: it scores
every validation batch's `video` against its `text` tokens (or its `caption`, tokenised by the method) and logs
`val/videophy_<kind>_pair_accuracy` per twin kind and `val/videophy_chance` (0.5) at the end of validation,
the outcome counts summed over ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from vlp_lightning.distributed import all_reduce_sum

TWIN_KINDS = ("reversed", "teleport")
CHANCE = 0.5


def teleport_order(frames: int) -> list[int]:
    """Frame order of the teleporting twin (module doc): the middle chunk [T//3, T - T//3) moved to the end."""
    first, last = frames // 3, frames - frames // 3
    return [*range(first), *range(last, frames), *range(first, last)]


def make_twin(video: Tensor, kind: str) -> Tensor:
    """The implausible twin [B, T, ...] of clips `video` [B, T, ...]: `reversed` or `teleport` (module doc)."""
    if kind == "reversed":
        return video.flip(1)
    if kind == "teleport":
        return video[:, teleport_order(video.shape[1])]
    raise ValueError(f"unknown twin kind {kind!r}; known kinds: {', '.join(TWIN_KINDS)}")


def pair_outcomes(
    method: LightningModule, video: Tensor, text: dict[str, Tensor], kinds: Sequence[str] = TWIN_KINDS,
    tie_tolerance: float = 1e-5,
) -> dict[str, Tensor]:
    """Per twin kind, the outcome of each (clip, twin) pair [B]: 1 where the real clip scores higher with its
    caption, 0 where the twin does, 0.5 for a tie. `video` [B, T, 3, H, W], `text` the B captions' tokens."""
    with torch.no_grad():
        real = method.video_text_logits(video, text).diagonal().float()  # [B]
        outcomes = {}
        for kind in kinds:
            twin = method.video_text_logits(make_twin(video, kind), text).diagonal().float()
            tie = torch.isclose(real, twin, rtol=tie_tolerance, atol=tie_tolerance)
            outcomes[kind] = torch.where(tie, CHANCE, (real > twin).float())
    return outcomes


def videophy_pair_accuracy(
    method: LightningModule, video: Tensor, text: dict[str, Tensor], kinds: Sequence[str] = TWIN_KINDS,
    tie_tolerance: float = 1e-5,
) -> dict[str, float]:
    """`{<kind>: pair accuracy, ..., "chance": 0.5}` of clips `video` [B, T, 3, H, W] against their captions'
    tokens `text` (module doc)."""
    outcomes = pair_outcomes(method, video, text, kinds, tie_tolerance)
    return {**{kind: value.mean().item() for kind, value in outcomes.items()}, "chance": CHANCE}


class VideoPhy(Callback):
    """Pair accuracy of real clips over their reversed / teleporting twins on the validation batches, logged as
    `val/videophy_<kind>_pair_accuracy` and `val/videophy_chance` (module doc).

    Needs a method with `video_text_logits(video, text)` (the video-language family) and clip batches (`video`
    [B, T, 3, H, W] with `text` or `caption`); otherwise it warns once and logs nothing.

    Args:
        kinds: the twin kinds to score (`reversed`, `teleport`).
        max_batches: score the first this many validation batches of each validation (None: all).
        tie_tolerance: scores this close count as a tie (module doc).
    """

    def __init__(self, kinds: list[str] | None = None, max_batches: int | None = None,
                 tie_tolerance: float = 1e-5) -> None:
        self.kinds = list(kinds or TWIN_KINDS)
        unknown = [kind for kind in self.kinds if kind not in TWIN_KINDS]
        if unknown:
            raise ValueError(f"VideoPhy kinds {unknown} unknown; known kinds: {', '.join(TWIN_KINDS)}")
        self.max_batches = max_batches
        self.tie_tolerance = tie_tolerance
        self._sums: dict[str, float] = {}
        self._pairs = 0
        self._warned = False

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            rank_zero_warn(message)
            self._warned = True

    def on_validation_epoch_start(self, trainer: Trainer, method: LightningModule) -> None:
        self._sums = {kind: 0.0 for kind in self.kinds}
        self._pairs = 0

    def on_validation_batch_end(self, trainer: Trainer, method: LightningModule, outputs, batch: dict,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.max_batches is not None and batch_idx >= self.max_batches:
            return
        video = batch.get("video") if isinstance(batch, dict) else None
        if not hasattr(method, "video_text_logits") or video is None or video.ndim != 5:
            self._warn_once(f"VideoPhy skipped: {type(method).__name__} needs video_text_logits and clip batches "
                            "(`video` [B, T, 3, H, W])")
            return
        captions = batch.get("caption")
        if captions is None and "text" not in batch:
            self._warn_once("VideoPhy skipped: the validation batches have neither `text` nor `caption`")
            return
        keep = (torch.ones(video.shape[0], dtype=torch.bool) if captions is None
                else torch.tensor([bool(caption.strip()) for caption in captions]))
        if not bool(keep.any()):
            return
        rows = keep.nonzero().squeeze(1).to(video.device)
        if "text" in batch:
            text = {name: value[rows.to(value.device)] for name, value in batch["text"].items()}
        else:
            text = method.tokenizer([caption for caption, kept in zip(captions, keep.tolist()) if kept])
        text = {name: value.to(video.device) for name, value in text.items()}
        for kind, outcome in pair_outcomes(method, video[rows], text, self.kinds, self.tie_tolerance).items():
            self._sums[kind] += float(outcome.sum())
        self._pairs += int(rows.shape[0])

    def on_validation_epoch_end(self, trainer: Trainer, method: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        device = method.device
        totals = all_reduce_sum(torch.tensor([self._pairs, *(self._sums[kind] for kind in self.kinds)],
                                             dtype=torch.float64, device=device))
        if totals[0] == 0:
            return
        for kind, total in zip(self.kinds, totals[1:].tolist()):
            method.log(f"val/videophy_{kind}_pair_accuracy", total / float(totals[0]))
        method.log("val/videophy_chance", CHANCE)
