"""The clip side of the frozen-LM family: what PLLaVA and mPLUG-video share on top of LLaVA.

A `VideoLLaVA` trains on clip batches (`VideoDataModule`: `video` [B, T, 3, H, W], `caption`) sampled by TSN
segments with one crop per clip and no flip (motion captions name directions); the captions become caption
instructions with video prompts, as LLaVA's stage 1 does for images. The frozen tower embeds every frame on its
own (`tower_tokens`); how the frames' tokens reach the LM is each method's `visual_tokens`. `probe_features` is
the tower's pooled features averaged over frames; `vlp predict` of clips writes the generated captions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from data_modules.clip_views import ClipViews
from vlp_lightning.methods.base import WarmupCosineLR
from vlp_lightning.methods.language.base import ConnectorFactory
from vlp_lightning.methods.language.llava import LLaVA
from vlp_lightning.modules.language_model import LanguageModel

#: video versions of LLaVA's brief-description prompts.
VIDEO_CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the video concisely.",
    "Provide a brief description of the given video.",
    "Summarize what happens in the video.",
    "Give a short and clear explanation of the video.",
)


class VideoLLaVA(LLaVA):
    """LLaVA on clips (module doc); subclasses define `visual_tokens(video)`.

    Args:
        num_frames: frames sampled per clip (TSN segments, one crop per clip).
        (the rest: see `FrozenLMMethod`; `caption_prompts` default to video descriptions)
    """

    view_kind = "clip"
    required_keys = ("video", "caption")

    def __init__(
        self,
        language_model: LanguageModel | None = None,
        vision: nn.Module | None = None,
        image_tower: str | None = None,
        connector: ConnectorFactory | None = None,
        num_frames: int = 4,
        train_vision: bool = False,
        caption_prompts: Sequence[str] = VIDEO_CAPTION_PROMPTS,
        max_length: int = 96,
        answer_length: int = 30,
        start_from: str | None = None,
        crop_scale: tuple[float, float] = (0.9, 1.0),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(language_model=language_model, vision=vision, image_tower=image_tower, connector=connector,
                         train_vision=train_vision, caption_prompts=caption_prompts, max_length=max_length,
                         answer_length=answer_length, start_from=start_from, crop_scale=crop_scale,
                         optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.num_frames = num_frames

    def train_views(self) -> ClipViews:
        """`num_frames` frames by TSN segment sampling, one crop per clip, no flip (motion texts name directions)."""
        return ClipViews(num_frames=self.num_frames, sampling="segments", scale=self.crop_scale, hflip=False,
                         mean=self.vision.mean, std=self.vision.std)

    def tower_tokens(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] -> the frozen tower's patch tokens of every frame [B, T, N, width]."""
        batch, frames = video.shape[:2]
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_vision):
            tokens = self.vision.forward_tokens(video.flatten(0, 1))
        return tokens.view(batch, frames, *tokens.shape[1:])

    def probe_features(self, video: Tensor) -> Tensor:
        """The tower's pooled features averaged over frames [B, width] (a still image is a one-frame clip)."""
        video = video if video.ndim == 5 else video.unsqueeze(1)
        return self.vision(video.flatten(0, 1)).view(*video.shape[:2], -1).mean(dim=1)

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        return super().forward_loss({**batch, "image": batch["video"]})

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """`vlp predict` of clips: the generated captions (or answers) per clip, as LLaVA's per image."""
        return super().predict_step({**batch, "image": batch["video"]} if "video" in batch else batch, batch_idx)
