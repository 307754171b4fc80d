"""CLIP: contrastive language-image pretraining (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision").

An image tower and a text tower are projected linearly into one embedding space; the N x N cosine similarities of a
batch, scaled by a learnable temperature, are trained with a symmetric cross-entropy (paper Fig. 3). The temperature
is stored as log logit-scale, initialised to 1/0.07 and clipped at 100 (sec. 2.5): the parameter itself is clamped
in place after every optimizer step (as open_clip does), so its gradient never vanishes and AdamW's momentum cannot
carry it past the cap for good. Across ranks the loss gathers features with gradient; `local_loss=True` keeps memory
at local x global batch (open_clip's formulation).

Representations: `probe_features` is the image tower's pooled output before the projection (the layer CLIP's linear
probes use, App. A.3); `encode_image` / `encode_text` are the normalised joint-space embeddings (zero-shot,
retrieval). Weight decay: every weight but gains and biases (sec. 2.5), the base's default.

ALIGN (Jia et al. 2021) and BiomedCLIP (Zhang et al. 2023) are the same objective with other towers and a longer
text context: they are YAML presets in `experiments/align/` and `experiments/biomedclip/`, not code.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from data_modules.views import SingleCrop, Views
from vlp_lightning.catalog import Paper
from vlp_lightning.losses.contrastive import clip_contrastive_loss
from vlp_lightning.methods.base import VLPMethod, WarmupCosineLR
from vlp_lightning.modules.heads import GELUMLPProjection
from vlp_lightning.modules.text import TextTransformer
from vlp_lightning.modules.tokenizers import ByteTokenizer, Tokenizer
from vlp_lightning.modules.vision import VisionEncoder, tiny_vit


#: most token sequences whose locked-text-tower features are kept (about 200 MB at width 512).
TEXT_CACHE_SIZE = 100_000


class CLIP(VLPMethod):
    """Dual-encoder contrastive image-text pretraining.

    Args:
        vision: image tower (default: `tiny_vit()`, 2 blocks of width 64 on 32 px, patch 8).
        text: text tower (default: the built-in causal transformer, 2 layers of width 64).
        tokenizer: turns captions into tokens for `text` (default: byte-level, no vocabulary file).
        embed_dim: size of the shared embedding space.
        init_logit_scale: initial exp(logit_scale), 1/0.07 in the paper.
        max_logit_scale: clamp on exp(logit_scale), 100 in the paper.
        learn_logit_scale: learn the temperature (CLIP, ALIGN) or keep it fixed.
        label_smoothing: ε of both cross-entropies (ALIGN smooths with 0.1, Jia et al. 2021 sec. 5).
        project_image: a linear image projection into the joint space (CLIP); False takes the image tower's
            pooled features as they are (ALIGN, sec. 4: only the text side gets a projection), which needs
            `vision.num_features == embed_dim`.
        text_projection_type: "linear" is `projection_head` (CLIP's linear map); "mlp" is open_clip's
            `proj_type="mlp"` (Linear -> GELU -> Linear, no biases), the text projection of the released
            BiomedCLIP (Zhang et al. 2023; open_clip config `BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`).
        local_loss: rows of the local batch against the gathered batch (memory local x global).
        gather_with_grad: let gradients flow through the gathered features of other ranks.
    """

    paper = Paper("Learning Transferable Visual Models From Natural Language Supervision", "Radford et al.", 2021)
    family = "contrastive image-text"
    view_kind = "one crop"

    required_keys = ("image", "text")

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        text: nn.Module | None = None,
        tokenizer: Tokenizer | None = None,
        embed_dim: int = 256,
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        learn_logit_scale: bool = True,
        label_smoothing: float = 0.0,
        project_image: bool = True,
        text_projection_type: Literal["linear", "mlp"] = "linear",
        local_loss: bool = False,
        gather_with_grad: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.save_hyperparameters(ignore=["vision", "text", "tokenizer", "optimizer", "lr_scheduler"])
        self.tokenizer = tokenizer or ByteTokenizer(context_length=32)
        self.vision = vision or tiny_vit()
        self.text = text or TextTransformer(
            self.tokenizer.vocab_size, self.tokenizer.context_length, width=64, layers=2, heads=2
        )
        if project_image:
            self.image_projection = self.projection_head(self.vision.num_features, embed_dim)
        elif self.vision.num_features == embed_dim:
            self.image_projection = nn.Identity()
        else:
            raise ValueError(
                f"project_image=False needs embed_dim equal to the image tower's width {self.vision.num_features}, "
                f"got embed_dim={embed_dim}; set embed_dim: {self.vision.num_features} or project_image: true"
            )
        if text_projection_type not in ("linear", "mlp"):
            raise ValueError(f"text_projection_type must be 'linear' or 'mlp', got {text_projection_type!r}")
        self.text_projection = (
            GELUMLPProjection(self.text.num_features, embed_dim)
            if text_projection_type == "mlp"
            else self.projection_head(self.text.num_features, embed_dim)
        )
        self.max_logit_scale = max_logit_scale
        self.logit_scale = nn.Parameter(
            torch.tensor(math.log(min(init_logit_scale, max_logit_scale))), requires_grad=learn_logit_scale
        )
        self.label_smoothing = label_smoothing
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self._locked_text_cache: dict[bytes, Tensor] = {}

    def projection_head(self, in_features: int, embed_dim: int) -> nn.Module:
        """CLIP uses a linear projection without bias into the joint space (sec. 2.4)."""
        return nn.Linear(in_features, embed_dim, bias=False)

    def train_views(self) -> Views:
        """CLIP trains on one random square crop per image (sec. 2.5: random square crop is the only augmentation)."""
        return SingleCrop(scale=(0.9, 1.0), hflip=False, mean=self.vision.mean, std=self.vision.std)

    def encode_image(self, images: Tensor) -> Tensor:
        return F.normalize(self.image_projection(self.vision(images)), dim=-1)

    def encode_text(self, text: dict[str, Tensor]) -> Tensor:
        return F.normalize(self.text_projection(self.text_features(text)), dim=-1)

    def text_features(self, text: dict[str, Tensor]) -> Tensor:
        """Text tower output [N, width]. A locked tower (LiT-style) is a fixed function of the tokens, so its
        outputs are memoised per token sequence (up to `TEXT_CACHE_SIZE` sequences): a pretrained text tower then
        costs one forward per distinct caption instead of one per step."""
        if not getattr(self.text, "locked", False):
            return self.text(text)
        input_ids, mask = text["input_ids"], text["attention_mask"]
        keys = [row.tobytes() for row in input_ids.cpu().numpy()]
        first_index = {key: index for index, key in reversed(list(enumerate(keys)))}
        missing = sorted(index for key, index in first_index.items() if key not in self._locked_text_cache)
        if missing:
            rows = torch.tensor(missing, device=input_ids.device)
            with torch.no_grad():
                computed = self.text({"input_ids": input_ids[rows], "attention_mask": mask[rows]}).float()
            if len(self._locked_text_cache) + len(missing) > TEXT_CACHE_SIZE:
                self._locked_text_cache.clear()
            self._locked_text_cache.update({keys[index]: row for index, row in zip(missing, computed)})
        return torch.stack([self._locked_text_cache[key] for key in keys])

    def after_optimizer_step(self) -> None:
        """Clip the temperature at `max_logit_scale` in place (sec. 2.5; open_clip clamps after each step)."""
        with torch.no_grad():
            self.logit_scale.clamp_(max=math.log(self.max_logit_scale))

    def contrastive_loss(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        return clip_contrastive_loss(
            image_features,
            text_features,
            self.logit_scale.float().exp(),
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            label_smoothing=self.label_smoothing,
        )

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        image_features = self.encode_image(batch["image"])
        text_features = self.encode_text(batch["text"])
        loss = self.contrastive_loss(image_features, text_features)
        return {"loss": loss, "logit_scale": self.logit_scale.detach().exp()}
