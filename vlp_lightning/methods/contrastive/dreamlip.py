"""DreamLIP (Zheng et al. 2024, "DreamLIP: Language-Image Pre-training with Long Captions", ECCV 2024): CLIP trained
on long captions through K of their sentences at a time.

Each image comes with a short caption (`text`, the data's caption) and a long one (`long_caption`, the `.json` long
caption: MLLM re-captions in the paper, sec. 3.1; one sentence per object in `vlp-data scenes`). Every step draws K
sub-captions (sentences) of each long caption (sec. 3.2, "dynamically sample sub-captions") and trains

    L = w_clip * L_clip + w_mpc * L_mpc + w_sgl * L_sgl

* L_clip — CLIP's global loss on the short caption (`clip_contrastive_loss`, gathered across ranks);
* L_mpc — the multi-positive contrastive loss (sec. 3.2; `losses.subcaption.multi_positive_contrastive_loss`):
  the short caption and the K sub-captions are all positives of the image;
* L_sgl — the subcaption-specific grouping loss (sec. 3.3; `losses.subcaption.subcaption_grouping_loss`): each
  sub-caption pools the patch embeddings of its own image with sparse, thresholded weights that sum to 1, and the
  pooled embedding is contrasted with the sub-caption.

Settings taken from the released code (github.com/zyf0619sjtu/DreamLIP, `training/params.py`, `training/data.py`,
`open_clip/loss.py`), since only the paper's abstract was reachable here: the short (raw) caption is always the
first text and the global CLIP loss uses it alone; sub-captions are the sentences of the long caption (split at
. ! ?), K drawn without replacement (with replacement when the caption has fewer than K), `--num_text 6` by default
(the paper recipe; tiny default 2); the grouping similarities min-max normalised before the threshold
(`--sgl_norm minmax`); loss weights 1 (`--clip_lossweight 1`, `--sgl_lossweight 1`). Deviations, all stated:
L_mpc is the soft-target InfoNCE of `losses.subcaption` with weight 1 (the release also has a circle-loss variant
scaled by 1/10), the release divides L_clip by 1+K (not done: w_clip is a knob), the grouping threshold defaults to
SPARC's σ = 1/P (the release's `sgl_delta < 0` branch), and the grouping logits share CLIP's learned temperature
(the release's separate local scale is left unset there). Patch embeddings are the backbone's patch tokens through
the image projection (the release returns them unprojected, which cannot match the text width).

Why the sub-captions are drawn in the method, not by the data: the data module only has to provide the long caption
(`required_keys` has `long_caption`, which `ImageTextDataModule` adds from the `.json` when a method asks), so the
same data config trains CLIP or DreamLIP by swapping `--model`, and K and the draw stay a method setting. The draw
is a pure function of (epoch, sample key), so a resumed run draws the same sub-captions.

Representations are CLIP's: `encode_image` / `encode_text` the joint space, `probe_features` the pooled tower.
"""

from __future__ import annotations

import random
from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from data_modules.captions import sentences
from vlp_lightning.catalog import Paper
from vlp_lightning.losses.subcaption import multi_positive_contrastive_loss, subcaption_grouping_loss
from vlp_lightning.methods.base import WarmupCosineLR
from vlp_lightning.methods.clip import CLIP
from vlp_lightning.modules.tokenizers import Tokenizer
from vlp_lightning.modules.vision import VisionEncoder


def draw_subcaptions(long_caption: str, count: int, seed: str) -> list[str]:
    """`count` sentences of `long_caption` drawn with `seed`: without replacement when it has that many, else with
    replacement (the released `draw_numbers`), so every image gets exactly `count`."""
    choices = sentences(long_caption) or [long_caption]
    rng = random.Random(seed)
    if len(choices) >= count:
        return rng.sample(choices, count)
    return rng.choices(choices, k=count)


class DreamLIP(CLIP):
    """CLIP with sub-captions of long captions as extra positives and a sub-caption grouping loss (module doc).

    Args:
        num_subcaptions: K, sub-captions drawn per image per step (6 in the released code).
        clip_weight: weight of CLIP's loss on the short caption.
        multi_positive_weight: weight of the multi-positive contrastive loss.
        grouping_weight: weight of the subcaption-specific grouping loss.
        grouping_threshold: σ, min-max-normalised patch similarities under it get weight 0 (None: 1/P).
        (the rest: see `CLIP`)
    """

    paper = Paper(
        "DreamLIP: Language-Image Pre-training with Long Captions", "Zheng et al.", 2024,
        note="paper text unreachable here (abstract only): objective and settings from the released code",
    )
    family = "contrastive image-text"
    view_kind = "one crop"

    required_keys = ("image", "text", "long_caption")

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        text: nn.Module | None = None,
        tokenizer: Tokenizer | None = None,
        embed_dim: int = 256,
        num_subcaptions: int = 2,
        clip_weight: float = 1.0,
        multi_positive_weight: float = 1.0,
        grouping_weight: float = 1.0,
        grouping_threshold: float | None = None,
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        learn_logit_scale: bool = True,
        label_smoothing: float = 0.0,
        text_projection_type: Literal["linear", "mlp"] = "linear",
        local_loss: bool = False,
        gather_with_grad: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        if num_subcaptions < 1:
            raise ValueError(f"num_subcaptions (K sub-captions per image) must be at least 1, got {num_subcaptions}")
        weights = {"clip_weight": clip_weight, "multi_positive_weight": multi_positive_weight,
                   "grouping_weight": grouping_weight}
        if any(weight < 0 for weight in weights.values()) or not any(weights.values()):
            raise ValueError(f"the loss weights must be >= 0 and not all 0, got {weights}; DreamLIP uses 1, 1, 1")
        if grouping_threshold is not None and not 0.0 <= grouping_threshold < 1.0:
            raise ValueError(
                f"grouping_threshold σ compares min-max-normalised similarities in [0, 1], got {grouping_threshold}; "
                "pick a value in [0, 1) or null for 1 / number of patches"
            )
        super().__init__(
            vision=vision,
            text=text,
            tokenizer=tokenizer,
            embed_dim=embed_dim,
            init_logit_scale=init_logit_scale,
            max_logit_scale=max_logit_scale,
            learn_logit_scale=learn_logit_scale,
            label_smoothing=label_smoothing,
            project_image=True,
            text_projection_type=text_projection_type,
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            compile=compile,
        )
        self.num_subcaptions = num_subcaptions
        self.clip_weight = clip_weight
        self.multi_positive_weight = multi_positive_weight
        self.grouping_weight = grouping_weight
        self.grouping_threshold = grouping_threshold

    def subcaption_tokens(self, batch: dict) -> dict[str, Tensor]:
        """Tokens of K sub-captions per image, [N*K, L] image-major, drawn from (epoch, key) (module doc)."""
        keys = batch.get("__key__") or [str(index) for index in range(len(batch["long_caption"]))]
        texts = [
            subcaption
            for key, long_caption in zip(keys, batch["long_caption"])
            for subcaption in draw_subcaptions(long_caption, self.num_subcaptions, f"{self.current_epoch}:{key}")
        ]
        device = batch["text"]["input_ids"].device
        return {name: value.to(device) for name, value in self.tokenizer(texts).items()}

    def image_and_patch_embeddings(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """One tower pass -> normalised global embeddings [N, D] and projected patch embeddings [N, P, D]."""
        sequence = self.vision.forward_sequence(images)  # [N, prefix + P, width]
        pooled = self.vision.pool(sequence)
        patches = sequence[:, getattr(self.vision.model, "num_prefix_tokens", 0) :]
        return nn.functional.normalize(self.image_projection(pooled), dim=-1), self.image_projection(patches)

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        image_features, patch_features = self.image_and_patch_embeddings(batch["image"])  # [N, D], [N, P, D]
        subcaptions = self.subcaption_tokens(batch)
        count = image_features.shape[0]
        tokens = {name: torch.cat([batch["text"][name], subcaptions[name]]) for name in subcaptions}
        all_texts = self.encode_text(tokens)  # [N + N*K, D]: the short captions, then the sub-captions
        short_features = all_texts[:count]
        subcaption_features = all_texts[count:].reshape(count, self.num_subcaptions, -1)  # [N, K, D]
        scale = self.logit_scale.float().exp()
        clip_loss = self.contrastive_loss(image_features, short_features)
        positives = torch.cat([short_features[:, None], subcaption_features], dim=1)  # [N, 1 + K, D]
        multi_positive_loss = multi_positive_contrastive_loss(
            image_features, positives, scale, local_loss=self.local_loss, gather_with_grad=self.gather_with_grad
        )
        grouping_loss = subcaption_grouping_loss(patch_features, subcaption_features, scale, self.grouping_threshold)
        loss = (self.clip_weight * clip_loss + self.multi_positive_weight * multi_positive_loss
                + self.grouping_weight * grouping_loss)
        return {
            "loss": loss,
            "clip_loss": clip_loss.detach(),
            "multi_positive_loss": multi_positive_loss.detach(),
            "grouping_loss": grouping_loss.detach(),
            "logit_scale": self.logit_scale.detach().exp(),
        }
