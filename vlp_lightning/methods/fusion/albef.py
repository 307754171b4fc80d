"""ALBEF: Align before Fuse (Li et al. 2021, "Align before Fuse: Vision and Language Representation Learning with
Momentum Distillation").

An image encoder (ViT), a text encoder and a multimodal encoder whose layers cross-attend to the image tokens (the
12 layers of BERT-base split 6 text + 6 fusion, sec. 3.1; `FusionTextTransformer`, bidirectional) train with three
losses, summed with weight 1 each (official `Pretrain.py`):

* ITC, aligned *before* fusion (sec. 3.2, eq. 1-3): [CLS] features of both encoders, projected to 256-d and
  L2-normalised, s(I, T) = g_v(v_cls)ᵀ g'_w(w'_cls) / τ against the momentum encoders' features of the batch and of
  two queues of 65,536 past features (`MemoryBank`, gathered from every rank); τ learned, initialised 0.07 and
  clamped to [0.001, 0.5] (official code).
* Momentum distillation (sec. 3.3, eq. 6): the targets are not one-hot but
  (1 - α) y + α softmax(s'(I, T)) with s' the momentum model's similarities, α = 0.4, ramped from 0 over the first
  epoch (official: α · min(1, i / len(loader)) in epoch 0; `alpha_warmup`, a fraction of the run here). The momentum
  model is an EMA (m = 0.995, constant) of the image encoder, the text-fusion encoder, both projections and the MLM
  head (`MomentumMethod`).
* ITM with hard negatives (sec. 3.2, eq. 4): a 2-way head on the fused [CLS] for the B pairs, a negative text
  for every image and a negative image for every text drawn with probability softmax(s) (harder negatives likelier),
  never the same image (`match_with_hard_negatives`; negatives from the global batch).
* MLM conditioned on the image (sec. 3.2, eq. 5): 15 % of the tokens, 80 % [MASK] / 10 % random / 10 % kept
  (`losses.fusion.mask_tokens`), predicted by the fused encoder through a BERT MLM head tied to the token embedding;
  distilled as well: (1 - α) CE + α CE against the momentum model's predictions (eq. 7).

Paper recipe: ViT-B/16 (DeiT-initialised in the paper; no pretrained weights here), 256 px crops of scale 0.2-1 with
flips (RandAugment(2, 7) is not applied: the suite's views have none), AdamW lr 1e-4, wd 0.02, warmup from 1e-5 then
cosine to 1e-5 over 30 epochs, batch 512. Representations: `encode_image` / `encode_text` are the ITC space
(zero-shot, retrieval); `match_scores` the ITM logit that re-ranks the ITC top-k (ALBEF's retrieval, k = 128/256);
`probe_features` the image encoder's [CLS].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from data_modules.views import SingleCrop, Views
from vlp_lightning.catalog import Paper
from vlp_lightning.distributed import all_gather_no_grad
from vlp_lightning.losses.fusion import distilled_contrastive_loss, mask_tokens, mlm_loss, momentum_targets
from vlp_lightning.methods.base import WarmupCosineLR
from vlp_lightning.methods.fusion.common import PairQueues, match_with_hard_negatives, sample_ids, text_specials
from vlp_lightning.methods.momentum import MomentumMethod, momentum_copy
from vlp_lightning.modules.fusion import FusionTextTransformer
from vlp_lightning.modules.memory_bank import MemoryBank
from vlp_lightning.modules.tokenizers import ByteTokenizer, Tokenizer
from vlp_lightning.modules.vision import VisionEncoder, tiny_vit


def mlm_head(width: int) -> nn.Sequential:
    """BERT's MLM transform before the tied decoder: dense -> GELU -> LayerNorm (`BertPredictionHeadTransform`)."""
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))


class ALBEF(PairQueues, MomentumMethod):
    """ITC with momentum distillation + ITM with hard negatives + image-conditioned MLM (module doc).

    Args:
        vision: image encoder (default: a tiny 2-block ViT at 32 px; ViT-B/16 at 256 px in the paper).
        tokenizer: text tokenizer (default: bytes, 32 tokens; BERT WordPiece, 30 tokens in the paper).
        width, text_layers, fusion_layers, heads: the text / fusion encoder (BERT-base: 768, 6, 6, 12).
        embed_dim: the ITC space (256).
        queue_length: features in each queue (65,536; a multiple of the global batch).
        init_temperature: τ at the start (0.07), learned and clamped to [0.001, 0.5].
        alpha: weight of the momentum model's soft targets (0.4).
        alpha_warmup: fraction of the run over which α rises from 0 (the paper's first epoch of 30: 1/30).
        momentum: the EMA m of the momentum model (0.995, constant).
        mask_probability: MLM masking rate (0.15).
        itm_weight, mlm_weight: loss weights (1 and 1; ITC is 1).
    """

    paper = Paper("Align before Fuse: Vision and Language Representation Learning with Momentum Distillation",
                  "Li et al.", 2021)
    family = "fusion and captioning"
    view_kind = "one crop"

    required_keys = ("image", "text")

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        tokenizer: Tokenizer | None = None,
        width: int = 64,
        text_layers: int = 1,
        fusion_layers: int = 1,
        heads: int = 2,
        embed_dim: int = 32,
        queue_length: int = 64,
        init_temperature: float = 0.07,
        alpha: float = 0.4,
        alpha_warmup: float = 0.0,
        momentum: float = 0.995,
        mask_probability: float = 0.15,
        itm_weight: float = 1.0,
        mlm_weight: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(momentum, momentum, optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.save_hyperparameters(ignore=["vision", "tokenizer", "optimizer", "lr_scheduler"])
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha weighs the momentum targets and must lie in [0, 1], got {alpha}")
        self.tokenizer = tokenizer or ByteTokenizer(context_length=32)
        self.specials = text_specials(self.tokenizer)
        self.vision = vision or tiny_vit()
        self.text = FusionTextTransformer(
            self.specials.vocab_size, self.tokenizer.context_length, width, text_layers, fusion_layers, heads,
            memory_width=self.vision.num_features,
        )
        self.vision_projection = nn.Linear(self.vision.num_features, embed_dim)
        self.text_projection = nn.Linear(width, embed_dim)
        self.mlm_head = mlm_head(width)
        self.itm_head = nn.Linear(width, 2)
        self.temperature = nn.Parameter(torch.tensor(init_temperature))
        self.vision_m = momentum_copy(self.vision)
        self.vision_projection_m = momentum_copy(self.vision_projection)
        self.text_m = momentum_copy(self.text)
        self.text_projection_m = momentum_copy(self.text_projection)
        self.mlm_head_m = momentum_copy(self.mlm_head)
        self.image_queue = MemoryBank(queue_length, embed_dim)
        self.text_queue = MemoryBank(queue_length, embed_dim)
        self.alpha, self.alpha_warmup = alpha, alpha_warmup
        self.mask_probability = mask_probability
        self.itm_weight, self.mlm_weight = itm_weight, mlm_weight

    @property
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [
            (self.vision, self.vision_m),
            (self.vision_projection, self.vision_projection_m),
            (self.text, self.text_m),
            (self.text_projection, self.text_projection_m),
            (self.mlm_head, self.mlm_head_m),
        ]

    def train_views(self) -> Views:
        """Random resized crops of scale 0.2-1 with horizontal flips (official pre-training transform; module doc)."""
        return SingleCrop(scale=(0.2, 1.0), hflip=True, mean=self.vision.mean, std=self.vision.std)

    # ------------------------------------------------------------------ representations
    def encode_image(self, images: Tensor) -> Tensor:
        return F.normalize(self.vision_projection(self.vision.forward_sequence(images)[:, 0]), dim=-1)

    def encode_text(self, text: dict[str, Tensor]) -> Tensor:
        return F.normalize(self.text_projection(self.text.encode(text)[0]), dim=-1)

    def probe_features(self, images: Tensor) -> Tensor:
        """The image encoder's [CLS] token (what ALBEF's image features are)."""
        return self.vision.forward_sequence(images)[:, 0]

    @torch.no_grad()
    def match_scores(self, images: Tensor, text: dict[str, Tensor]) -> Tensor:
        """ITM log-odds of "match" for each pair (images[i], text[i]) [N]: ALBEF's retrieval re-ranking score (the
        official `Retrieval.py` takes the match logit `itm_head(...)[:, 1]` alone; the log-odds logit_1 - logit_0 is
        monotone in p(match), which the logit alone is not when the other logit moves too)."""
        _, states, mask = self.text.encode(text)
        memory = self.fusion_memory(self.fusion_tokens(images), states)
        logits = self.itm_head(self.text.fuse(states, mask, memory)[:, 0]).float()
        return logits[:, 1] - logits[:, 0]

    # ------------------------------------------------------------------ training
    def current_alpha(self) -> float:
        """α, ramped linearly from 0 over the first `alpha_warmup` of the run's optimizer steps (module doc)."""
        trainer = self._trainer
        if not self.alpha_warmup or trainer is None:
            return self.alpha
        warmup_steps = self.alpha_warmup * float(trainer.estimated_stepping_batches)
        return self.alpha * min(1.0, trainer.global_step / max(1.0, warmup_steps))

    def after_optimizer_step(self) -> None:
        """τ back into [0.001, 0.5] (official: clamped before each forward), then the EMA update."""
        with torch.no_grad():
            self.temperature.clamp_(0.001, 0.5)
        super().after_optimizer_step()

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        images, text = batch["image"], batch["text"]
        alpha, temperature = self.current_alpha(), self.temperature.float()
        image_tokens = self.vision.forward_sequence(images)  # [B, 1 + P, W_img]
        text_pooled, text_states, text_mask = self.text.encode(text)
        with torch.no_grad():
            image_tokens_m = self.vision_m.forward_sequence(images.to(next(self.vision_m.parameters()).dtype))
        loss_itc, image_features, text_features = self.contrastive_loss(
            image_tokens[:, 0], text_pooled, image_tokens_m[:, 0], text, alpha, temperature
        )
        loss_itm, itm_accuracy = self.matching_loss(
            image_tokens, text_states, text_mask, image_features, text_features, temperature, batch
        )
        loss_mlm = self.masked_language_loss(text, image_tokens, image_tokens_m, alpha)
        loss = loss_itc + self.itm_weight * loss_itm + self.mlm_weight * loss_mlm
        return {"loss": loss, "itc": loss_itc.detach(), "itm": loss_itm.detach(), "mlm": loss_mlm.detach(),
                "itm_accuracy": itm_accuracy, "temperature": temperature.detach()}

    # the three losses, one method each (BUS, `fusion.bus`, feeds them other image tokens)
    def fusion_tokens(self, images: Tensor) -> Tensor:
        """The image tokens `fusion_memory` reads for images [N, 3, H, W]: the ViT's output sequence."""
        return self.vision.forward_sequence(images)

    def fusion_memory(self, image_tokens: Tensor, text_states: Tensor, momentum: bool = False) -> Tensor:
        """The tokens the fusion layers cross-attend to for texts `text_states` [N, L, W]: ALBEF's image tokens as
        they are (BUS summarises them under each text). `momentum`: for the momentum model."""
        return image_tokens

    def contrastive_loss(
        self, image_cls: Tensor, text_pooled: Tensor, image_cls_m: Tensor, text: dict[str, Tensor], alpha: float,
        temperature: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """ITC with momentum distillation against the momentum features of the batch and the queues (module doc,
        eq. 1-3 and 6) from the image [CLS] tokens (the student's and the momentum model's) and the pooled text;
        stashes the momentum features to enqueue. Returns (the loss, the unit image and text features)."""
        image_features = F.normalize(self.vision_projection(image_cls).float(), dim=-1)
        text_features = F.normalize(self.text_projection(text_pooled).float(), dim=-1)
        with torch.no_grad():
            image_features_m = F.normalize(self.vision_projection_m(image_cls_m).float(), dim=-1)
            text_features_m = F.normalize(self.text_projection_m(self.text_m.encode(text)[0]).float(), dim=-1)
            image_all = torch.cat([image_features_m, self.image_queue.bank.float()])  # [B + K, D]
            text_all = torch.cat([text_features_m, self.text_queue.bank.float()])
            positive = torch.eye(image_features.shape[0], image_all.shape[0], dtype=torch.bool,
                                 device=image_cls.device)
            targets_i2t = momentum_targets(image_features_m @ text_all.T / temperature, positive, alpha)
            targets_t2i = momentum_targets(text_features_m @ image_all.T / temperature, positive, alpha)
        similarity_i2t = image_features @ text_all.T / temperature
        similarity_t2i = text_features @ image_all.T / temperature
        loss = distilled_contrastive_loss(similarity_i2t, similarity_t2i, targets_i2t, targets_t2i)
        if self.training:
            self._to_enqueue = (image_features_m, text_features_m)
        return loss, image_features, text_features

    def matching_loss(
        self, image_tokens: Tensor, text_states: Tensor, text_mask: Tensor, image_features: Tensor,
        text_features: Tensor, temperature: Tensor, batch: dict,
    ) -> tuple[Tensor, Tensor]:
        """ITM with hard negatives drawn by the ITC similarities to the global batch's current pairs (eq. 4)."""
        with torch.no_grad():
            sampling_i2t = image_features @ all_gather_no_grad(text_features).T
            sampling_t2i = text_features @ all_gather_no_grad(image_features).T
        return match_with_hard_negatives(
            self.text, self.itm_head, image_tokens, text_states, text_mask,
            sampling_i2t / temperature, sampling_t2i / temperature, sample_ids(batch), memory=self.fusion_memory,
        )

    def masked_language_loss(
        self, text: dict[str, Tensor], image_tokens: Tensor, image_tokens_m: Tensor, alpha: float
    ) -> Tensor:
        """Image-conditioned MLM distilled from the momentum model's predictions (eq. 5 and 7)."""
        masked_ids, labels = mask_tokens(
            text["input_ids"], text["attention_mask"], mask_token_id=self.specials.mask_token_id,
            vocab_size=self.specials.vocab_size, special_token_ids=self.specials.special_token_ids,
            probability=self.mask_probability,
        )
        masked = {"input_ids": masked_ids, "attention_mask": text["attention_mask"]}
        chosen = labels != -100  # vocabulary logits only where a token was masked: 15 % of [B, L, V]
        _, states, mask = self.text.encode(masked)
        fused = self.text.fuse(states, mask, self.fusion_memory(image_tokens, states))
        logits = self.text.token_logits(self.mlm_head(fused[chosen]))[None]
        with torch.no_grad():
            soft = None
            if alpha > 0:
                _, states_m, mask_m = self.text_m.encode(masked)
                fused_m = self.text_m.fuse(states_m, mask_m, self.fusion_memory(image_tokens_m, states_m, True))
                soft = self.text_m.token_logits(self.mlm_head_m(fused_m[chosen])).float().softmax(-1)[None]
        return mlm_loss(logits, labels[chosen][None], soft_targets=soft, alpha=alpha)
