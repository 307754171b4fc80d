"""CoCa: Contrastive Captioners (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text Foundation Models").

One image encoder and one text decoder trained with a contrastive and a captioning loss at once (sec. 3.2):

* the text decoder's first half is unimodal: causal self-attention only, with a learnable [CLS] token appended
  after the text whose output is the text embedding (`FusionTextTransformer(causal=True, class_token=True)`; the
  [CLS] reads only real tokens, never padding — open_clip's corrected cls mask);
* its second half is multimodal: each layer cross-attends to the image (`fusion_layers`);
* the image side has two task-specific attentional poolers (sec. 3.2, "attentional poolers"): one query for the
  contrastive embedding, `n_queries` (256) for the decoder's image tokens (the paper's separate poolers:
  open_clip's `attentional_pool="parallel"`);
* L_CoCa = λ_Con L_Con + λ_Cap L_Cap (eq. 4), λ_Cap = 2, λ_Con = 1: L_Con is CLIP's symmetric InfoNCE with a
  learned temperature (eq. 2; initialised to 0.07 and capped at 100 as open_clip does), L_Cap the next-token
  cross-entropy of the multimodal decoder (eq. 3), padding ignored (`losses.fusion.caption_loss`).

`generate_captions` decodes greedily or with beam search (`modules.generation`). Paper recipe: ViT-B (12 layers)
and a 12 + 12 layer text decoder, batch 65,536, Adafactor lr 8e-4 with warmup then linear decay, wd 0.01; here the
paper-size recipe uses AdamW (no Adafactor in torch) with the same schedule shape.
Representations: `encode_image` / `encode_text` are the contrastive space (zero-shot, retrieval); `probe_features`
the image encoder's pooled output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from data_modules.views import SingleCrop, Views
from vlp_lightning.catalog import Paper
from vlp_lightning.losses.contrastive import clip_contrastive_loss
from vlp_lightning.methods.base import VLPMethod, WarmupCosineLR
from vlp_lightning.methods.fusion.common import CaptionGenerator, captioning_loss, next_token_logits, text_specials
from vlp_lightning.modules.fusion import AttentionalPooler, FusionTextTransformer
from vlp_lightning.modules.tokenizers import ByteTokenizer, Tokenizer
from vlp_lightning.modules.vision import VisionEncoder, tiny_vit


class CoCa(CaptionGenerator, VLPMethod):
    """Contrastive + captioning image-text pretraining with one text decoder (module doc).

    Args:
        vision: image encoder (default: a tiny 2-block ViT at 32 px).
        tokenizer: text tokenizer (default: bytes, 32 tokens; CLIP BPE, 76 tokens in open_clip's CoCa).
        width, unimodal_layers, multimodal_layers, heads: the text decoder (CoCa-Base: 768, 12, 12, 12).
        n_queries: image tokens the captioning pooler gives the decoder (256).
        embed_dim: the contrastive space (512 for CoCa-Base in open_clip).
        caption_weight: λ_Cap (2.0).
        contrastive_weight: λ_Con (1.0).
        init_logit_scale, max_logit_scale: exp of the learned inverse temperature at the start and its cap.
    """

    paper = Paper("CoCa: Contrastive Captioners are Image-Text Foundation Models", "Yu et al.", 2022)
    family = "fusion and captioning"
    view_kind = "one crop"

    required_keys = ("image", "text")

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        tokenizer: Tokenizer | None = None,
        width: int = 64,
        unimodal_layers: int = 1,
        multimodal_layers: int = 1,
        heads: int = 2,
        n_queries: int = 8,
        embed_dim: int = 32,
        caption_weight: float = 2.0,
        contrastive_weight: float = 1.0,
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.save_hyperparameters(ignore=["vision", "tokenizer", "optimizer", "lr_scheduler"])
        self.tokenizer = tokenizer or ByteTokenizer(context_length=32)
        self.specials = text_specials(self.tokenizer)
        self.vision = vision or tiny_vit()
        image_width = self.vision.num_features
        self.contrastive_pooler = AttentionalPooler(image_width, image_width, n_queries=1, heads=heads)
        self.caption_pooler = AttentionalPooler(width, image_width, n_queries=n_queries, heads=heads)
        self.image_norm = nn.LayerNorm(image_width)
        self.text = FusionTextTransformer(
            self.tokenizer.vocab_size, self.tokenizer.context_length, width, unimodal_layers, multimodal_layers,
            heads, causal=True, class_token=True,
        )
        self.image_projection = nn.Linear(image_width, embed_dim, bias=False)
        self.text_projection = nn.Linear(width, embed_dim, bias=False)
        self.max_logit_scale = max_logit_scale
        self.logit_scale = nn.Parameter(torch.tensor(math.log(min(init_logit_scale, max_logit_scale))))
        self.caption_weight, self.contrastive_weight = caption_weight, contrastive_weight
        self.default_caption_length = self.tokenizer.context_length - 1

    def train_views(self) -> Views:
        """Random resized crops (CoCa trains on JFT-3B / ALIGN images with basic crops; open_clip's default)."""
        return SingleCrop(scale=(0.9, 1.0), hflip=False, mean=self.vision.mean, std=self.vision.std)

    # ------------------------------------------------------------------ representations
    def image_embedding(self, image_tokens: Tensor) -> Tensor:
        return F.normalize(self.image_projection(self.image_norm(self.contrastive_pooler(image_tokens)[:, 0])), dim=-1)

    def encode_image(self, images: Tensor) -> Tensor:
        return self.image_embedding(self.vision.forward_sequence(images))

    def encode_text(self, text: dict[str, Tensor]) -> Tensor:
        return F.normalize(self.text_projection(self.text.encode(text)[0]), dim=-1)

    def caption_memory(self, images: Tensor) -> Tensor:
        """The captioning pooler's `n_queries` image tokens [N, n_queries, width] the decoder attends to."""
        return self.caption_pooler(self.vision.forward_sequence(images))

    def caption_logits(self, memory: Tensor, prefixes: Tensor) -> Tensor:
        """Next-token logits [N, t, vocab] of the multimodal decoder for token prefixes [N, t] (no padding)."""
        return next_token_logits(self.text, memory, prefixes)

    # ------------------------------------------------------------------ training
    def after_optimizer_step(self) -> None:
        """Cap exp(logit_scale) at `max_logit_scale` (as CLIP and open_clip do)."""
        with torch.no_grad():
            self.logit_scale.clamp_(max=math.log(self.max_logit_scale))

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        text = batch["text"]
        image_tokens = self.vision.forward_sequence(batch["image"])
        image_features = self.image_embedding(image_tokens)
        text_pooled, text_states, text_mask = self.text.encode(text)
        text_features = F.normalize(self.text_projection(text_pooled), dim=-1)
        loss_con = clip_contrastive_loss(image_features, text_features, self.logit_scale.float().exp())
        loss_cap = captioning_loss(self.text, text_states, text_mask, self.caption_pooler(image_tokens), text)
        loss = self.contrastive_weight * loss_con + self.caption_weight * loss_cap
        return {"loss": loss, "contrastive": loss_con.detach(), "caption": loss_cap.detach(),
                "logit_scale": self.logit_scale.detach().exp()}
