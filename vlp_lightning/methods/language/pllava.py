"""PLLaVA (Xu et al. 2024, "PLLaVA: Parameter-free LLaVA Extension from Images to Videos for Video Dense
Captioning"): an image LLaVA run on T frames, its visual tokens pooled over time and space before the LM.

For a clip x = (x_1 .. x_T), each frame through the frozen image tower and the (LLaVA-1.5 MLP) projector,

    Z_t = projector(tower_tokens(x_t))                     [h w, D]     per frame, as LLaVA does for one image
    Z = AdaptiveAvgPool3d_(T', h', w')(Z_1 .. Z_T)         [T' h' w', D] (sec. 3.2, "adaptive structure pooling")
    loss = - mean over answer tokens of log p_LM(y_t | y_<t, Z, prompt)      (LLaVA's objective, eq. 3 there)

The pooling is the paper's point: fine-tuning an image MLLM on n concatenated frames saturates because a few
high-norm visual tokens dominate (sec. 3.1, Fig. 3); averaging over (time, height, width) windows, parameter-free,
smooths them and fixes the token count whatever T. The official projector applies linear_1, GELU, linear_2 to
every frame's tokens and then pools (`PllavaMultiModalProjector.forward`), which is the order here; their runs pool
16 frames of 24 x 24 tokens to (16, 12, 12): spatial pooling only, since temporal pooling hurt (sec. 4.2). A still
image is repeated to T frames (as the official projector does), so image data still trains the same tokens.

What trains (official `config_pllava_nframe.py`): the projector and LoRA on the LM's q / v projections (r 128,
alpha 32), tower and LM frozen, from an image LLaVA (LLaVA-NeXT there; a suite LLaVA checkpoint here, `start_from`:
PLLaVA adds no parameters, so a LLaVA stage-1 or stage-2 run's weights fit; LoRA the earlier stage lacks starts
fresh). **Post-training weight fusion** (sec. 3.3, "post optimization"): at evaluation the LoRA update is scaled
by `eval_lora_alpha` / r instead of alpha / r (official evaluation: alpha 4 of the trained 32), W = W_0 + (α_eval /
r) B A, which blends the image model's LM back in and keeps its language ability; `eval_lora_alpha: null` keeps the
trained scaling.

Data: clip batches (`VideoDataModule`: `video` [B, T, 3, H, W]); captions become caption instructions with
`caption_prompts` (video descriptions here), as LLaVA's stage 1 does for images (`VideoLLaVA`, shared with
mPLUG-video). Not here: the paper's instruction
data (VideoChat2's mixture) and dense captions; on this suite's clips the instructions are the clips' captions
(BabyAI missions, moving-emoji motions).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from vlp_lightning.catalog import Paper
from vlp_lightning.methods.base import WarmupCosineLR
from vlp_lightning.methods.language.base import ConnectorFactory
from vlp_lightning.methods.language.video import VIDEO_CAPTION_PROMPTS, VideoLLaVA
from vlp_lightning.modules.language_model import LanguageModel
from vlp_lightning.modules.peft import LowRankUpdate


class PLLaVA(VideoLLaVA):
    """LLaVA on T frames, visual tokens average-pooled to `pooling_shape`, LoRA fused at evaluation (module doc).

    Args:
        num_frames: frames sampled per clip (TSN segments, one crop per clip; `VideoLLaVA`).
        pooling_shape: (T', h', w') of the adaptive average pooling (paper: 16, 12, 12 from 16 x 24 x 24).
        eval_lora_alpha: LoRA's alpha at evaluation (post-training fusion; paper 4 of 32), None: the trained one.
        (the rest: see `FrozenLMMethod`; `caption_prompts` default to video descriptions)
    """

    paper = Paper("PLLaVA: Parameter-free LLaVA Extension from Images to Videos for Video Dense Captioning",
                  "Xu et al.", 2024, note="VideoChat2 instructions not reachable: caption instructions of clips")

    def __init__(
        self,
        language_model: LanguageModel | None = None,
        vision: nn.Module | None = None,
        image_tower: str | None = None,
        connector: ConnectorFactory | None = None,
        num_frames: int = 4,
        pooling_shape: tuple[int, int, int] = (4, 2, 2),
        eval_lora_alpha: float | None = None,
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
        if len(pooling_shape) != 3 or min(pooling_shape) < 1:
            raise ValueError(f"pooling_shape={tuple(pooling_shape)} is not three positive sizes (frames, height, "
                             "width); give e.g. [16, 12, 12] (the paper's)")
        super().__init__(language_model=language_model, vision=vision, image_tower=image_tower, connector=connector,
                         num_frames=num_frames, train_vision=train_vision, caption_prompts=caption_prompts,
                         max_length=max_length, answer_length=answer_length, start_from=start_from,
                         crop_scale=crop_scale, optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.pooling_shape = tuple(pooling_shape)
        self.eval_lora_alpha = eval_lora_alpha
        self._lora = [module for module in self.language_model.modules() if isinstance(module, LowRankUpdate)]
        if eval_lora_alpha is not None and not self._lora:
            raise ValueError(f"eval_lora_alpha={eval_lora_alpha} fuses LoRA weights, but the language model has no "
                             "LoRA; set language_model.init_args.train: lora or eval_lora_alpha: null")
        self._trained_scaling = [module.scaling for module in self._lora]

    # ------------------------------------------------------------------ model
    def train(self, mode: bool = True) -> PLLaVA:
        """Training uses LoRA's trained scaling alpha / r, evaluation `eval_lora_alpha` / r (module doc)."""
        super().train(mode)
        if self.eval_lora_alpha is not None:
            for module, scaling in zip(self._lora, self._trained_scaling):
                rank = module.a.shape[0]
                module.scaling = scaling if mode else self.eval_lora_alpha / rank
        return self

    def frame_tokens(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] (or images [B, 3, H, W], repeated to `num_frames`) -> projected tokens
        [B, T, h, w, D]."""
        if video.ndim == 4:  # a still image: T copies (the official projector's `repeat(num_frames)`)
            video = video.unsqueeze(1).expand(-1, self.num_frames, -1, -1, -1)
        batch, frames = video.shape[:2]
        tokens = self.tower_tokens(video).flatten(0, 1)  # [B T, N, width]
        projected = self.connector(tokens)
        side = int(round(projected.shape[1] ** 0.5))
        if side * side != projected.shape[1] or projected.shape[1] != tokens.shape[1]:
            raise ValueError(f"PLLaVA pools a square grid of per-patch tokens, but the connector gave "
                             f"{projected.shape[1]} tokens for {tokens.shape[1]} patches; use a per-token connector "
                             "(MLPConnector, LinearConnector mode tokens)")
        return projected.view(batch, frames, side, side, -1)

    def visual_tokens(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] (or images) -> [B, T' h' w', D]: per-frame LLaVA tokens pooled (module doc)."""
        tokens = self.frame_tokens(video).permute(0, 4, 1, 2, 3)  # [B, D, T, h, w]: AdaptiveAvgPool3d's layout
        pooled = F.adaptive_avg_pool3d(tokens, self.pooling_shape)
        return pooled.flatten(2).transpose(1, 2)
