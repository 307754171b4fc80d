"""HecVL (Yuan et al. 2024, "HecVL: Hierarchical Video-Language Pretraining for Zero-shot Surgical Phase
Recognition").

One video tower and one text tower, three video-text hierarchies, each in its own embedding space (the abstract's
"separate embedding spaces for the three video-text hierarchies using a single model"): level k has its own video
projection W_v^k and text projection W_u^k on the shared towers, so short-term (atomic action) and long-term
(procedure) concepts do not compete for one space. The paper's levels pair a surgical lecture with

* clip level: a few-second clip <-> its narration (the transcribed speech, atomic actions);
* phase level: the frames of a phase <-> its conceptual summary text;
* video level: the whole video <-> the abstract of the procedure.

A span's video embedding is the mean of its frame features, projected into its level's space, and each level is a
contrastive (InfoNCE) loss over the pairs of the batch; the fine-to-coarse objective sums them,

    L = w_n L_narration + w_s L_summary + w_a L_abstract,
    L_k = ½ (CE(s V_k U_kᵀ, P_k) + CE(s U_k V_kᵀ, P_kᵀ)),  V_k = normalise(W_v^k mean_{t in span} f(x_t)),
                                                           U_k = normalise(W_u^k g(text)),

with P_k the same-text positives of the base (`VideoTextMethod.contrastive_loss`: sub-goal and motion texts repeat
across a batch). Zero-shot phase recognition embeds the frames with `encode_video` and the candidate phase texts
with `encode_text`, both in the space of `zero_shot_level`, and picks the most similar text.

What each level reads on this suite's clips (one sampled clip per sample, `VideoDataModule` batches):

* narration <- `segments`: each timeline segment mapped onto the sampled frames, (first, last, text), gives the
  frames of the segment and its text (a BabyAI sub-goal, "pick up the red key"; a moving emoji's leg, "moving left"):
  the finest text the data has, atomic actions as the paper's narrations;
* summary <- `summaries`, the same (first, last, text) form for texts that summarise several segments; no shard
  builder here writes them yet, so the level is off by default (`summary_weight: 0`, its heads not built);
* abstract <- `caption`: the whole clip and its text (a BabyAI mission, a moving clip's full motion caption), the
  base's own pairs, in the base's projections.

Not confirmed from the paper or its code: the exact form of each level's loss (the official HecVL / PeskaVLP
configs name `SSL_VL_Loss_new` and `hier_infonce` with `alpha_weight=0.75`, whose code is not released; here the
base's symmetric InfoNCE), whether phase and video embeddings average clip embeddings or frame features (here the
frame features of the span), the level weights (1 each here), and the schedule: the official trainer alternates
one data loader per level, here the levels share each batch.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from vlp_lightning.catalog import Paper
from vlp_lightning.methods.base import WarmupCosineLR
from vlp_lightning.methods.video.base import VideoTextMethod
from vlp_lightning.modules.tokenizers import Tokenizer
from vlp_lightning.modules.vision import VisionEncoder

Level = Literal["narration", "summary", "abstract"]
#: the batch key holding each level's (first sampled frame, last sampled frame, text) spans.
SPAN_KEYS = {"narration": "segments", "summary": "summaries"}


class HecVL(VideoTextMethod):
    """Three video-text levels, each with its own projections, one weighted contrastive loss each (module doc).

    Args:
        narration_weight, summary_weight, abstract_weight: w_n, w_s, w_a; a level of weight 0 is not built.
        zero_shot_level: the space `encode_video` / `encode_text` embed in (zero-shot recognition of segments:
            "narration", the sub-goal texts' level).
        (the rest: see `VideoTextMethod`)
    """

    paper = Paper("HecVL: Hierarchical Video-Language Pretraining for Zero-shot Surgical Phase Recognition",
                  "Yuan et al.", 2024, note="surgical lectures not reachable: BabyAI sub-goals and missions")
    required_keys = ("video", "text", "segments")

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        text: nn.Module | None = None,
        tokenizer: Tokenizer | None = None,
        embed_dim: int = 64,
        pretrained_clip: str | None = None,
        lock_text: bool = False,
        num_frames: int = 4,
        crop_scale: tuple[float, float] = (0.9, 1.0),
        narration_weight: float = 1.0,
        summary_weight: float = 0.0,
        abstract_weight: float = 1.0,
        zero_shot_level: Level = "narration",
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(vision, text, tokenizer, embed_dim, pretrained_clip, lock_text, num_frames, crop_scale,
                         init_logit_scale, max_logit_scale, optimizer, lr_scheduler, compile)
        self.weights = {"narration": narration_weight, "summary": summary_weight, "abstract": abstract_weight}
        if any(weight < 0 for weight in self.weights.values()) or not any(self.weights.values()):
            raise ValueError(f"HecVL level weights must be >= 0 and not all 0, got {self.weights}")
        if not self.weights[zero_shot_level]:
            raise ValueError(f"zero_shot_level {zero_shot_level!r} has weight 0, so its space is not trained; pick "
                             f"one of {[level for level, weight in self.weights.items() if weight]}")
        self.zero_shot_level = zero_shot_level
        # the abstract level is the base's pairs in the base's projections; the finer levels get their own, each
        # starting as a copy of the base's (a pretrained CLIP's projections with `pretrained_clip`)
        fine = [level for level in SPAN_KEYS if self.weights[level]]
        self.video_projections = nn.ModuleDict({level: copy.deepcopy(self.image_projection) for level in fine})
        self.text_projections = nn.ModuleDict({level: copy.deepcopy(self.text_projection) for level in fine})

    def projections(self, level: Level) -> tuple[nn.Module, nn.Module]:
        """(video, text) projection of a level's embedding space."""
        if level == "abstract":
            return self.image_projection, self.text_projection
        return self.video_projections[level], self.text_projections[level]

    def encode_video(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] -> unit embeddings [B, D] in the `zero_shot_level` space."""
        return F.normalize(self.projections(self.zero_shot_level)[0](self.frame_features(video).mean(dim=1)), dim=-1)

    def encode_text(self, text: dict[str, Tensor]) -> Tensor:
        return F.normalize(self.projections(self.zero_shot_level)[1](self.text(text)), dim=-1)

    def level_loss(self, level: Level, span_features: Tensor, tokens: dict[str, Tensor], texts: list[str]) -> Tensor:
        """L_k over N pairs: span features [N, width] (mean frame features), their texts' tokens and the texts."""
        video_projection, text_projection = self.projections(level)
        videos = F.normalize(video_projection(span_features), dim=-1)
        text_embeddings = F.normalize(text_projection(self.text(tokens)), dim=-1)
        return self.contrastive_loss(self.logit_scale.exp() * videos @ text_embeddings.T, texts)

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        frames = self.frame_features(batch["video"])                              # [B, T, width]
        losses = {}
        for level, key in SPAN_KEYS.items():
            if not self.weights[level]:
                continue
            if key not in batch:
                raise ValueError(f"HecVL's {level} level (weight {self.weights[level]}) reads `{key}`, which the "
                                 f"batch lacks; set {level}_weight: 0 or use clips whose .json has them")
            spans = [(sample, first, last, text) for sample, sample_spans in enumerate(batch[key])
                     for first, last, text in sample_spans]
            if not spans:
                raise ValueError(f"no {key} in this batch: HecVL's {level} level needs clips with timelines")
            features = torch.stack([frames[sample, first:last + 1].mean(dim=0) for sample, first, last, _ in spans])
            texts = [text for *_, text in spans]
            tokens = {name: value.to(frames.device) for name, value in self.tokenizer(texts).items()}
            losses[level] = self.level_loss(level, features, tokens, texts)
        if self.weights["abstract"]:
            losses["abstract"] = self.level_loss("abstract", frames.mean(dim=1), batch["text"], batch["caption"])
        total = sum(self.weights[level] * loss for level, loss in losses.items())
        return {"loss": total, **{f"{level}_loss": loss.detach() for level, loss in losses.items()},
                "logit_scale": self.logit_scale.detach().exp()}

