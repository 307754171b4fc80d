"""FIBER: Fusion In-the-Backbone transformER (Dou et al. 2022, "Coarse-to-Fine Vision-Language Pre-training with
Fusion in the Backbone"): its coarse-grained stage (`stage="coarse"`, image-text pairs) and its fine-grained stage
(`stage="fine"`, phrase grounding on image-text-box data), one class sharing the fused backbones.

No fusion module on top: the top K = 6 layers of *both* backbones get cross-attention to the other modality (sec.
3.1), image-to-text in the image backbone and text-to-image in the text backbone, each multiplied by a learnable
gate α initialised to 0 (official `coarse_grained` code: `alpha_i2t`, `alpha_t2i`, used as they are, no tanh), so
the two backbones start, and can always run, as two separate encoders:

* fusion **off** (every gate skipped): a dual encoder; ITC (sec. 3.2) contrasts the image backbone's pooled feature
  and the text backbone's [CLS], projected and L2-normalised, against the batch and a queue of 4,096 past features
  (the official code's ALBEF-style queue of detached features, without a momentum encoder), temperature learned
  from 0.07 and clamped to [0.001, 1];
* fusion **on**: the same layers with their cross-attention, layer by layer in lock-step: layer k of each backbone
  reads the other backbone's states *entering* layer k (official `infer`); in the image block the cross-attention's
  query is the block's normed input, added next to its self-attention; ITM with hard negatives drawn from the ITC
  similarities (`hard_negative_batch`: from the gathered batch; the official code also draws from the queue, whose
  raw images and texts it stores) scores the concatenated text [CLS] and image average-pooled features with one
  linear 2-way layer, and MLM predicts 15 % masked tokens from the fused text states (BERT 80/10/10, tied output).

L_coarse = L_ITC + L_ITM + L_MLM (equal weights). Optimiser (official pre-training config): AdamW β (0.9, 0.98), wd
0.01, lr 1e-5 for the backbones and 5x (`new_module_lr` 5e-5) for the cross-modal layers, gates, projections and
heads, 10 % warmup then linear decay to 0, 100k steps, batch 4,096, 384 px.

Fine-grained stage (sec. 3.3; official `fine_grained`, built on GLIP, Li et al. 2022), on scene shards with boxes:
an image's object phrases (region descriptions, or names) joined into one prompt "p_1. ... p_K." are fused with the
image through the same backbones (fusion on); a head on the fused image patch tokens (`fiber_grounding`) gives per
token q a box b̂_q (cx, cy, w, h, sigmoid, from the patch centre) and alignment logits S_ground = O Pᵀ (GLIP eq. 3:
region features O against fused token features P, a phrase's score the mean of its tokens'). Predictions are
matched one-to-one to the true boxes by the Hungarian algorithm on the cost λ_align·focal + λ_L1·‖b̂ − b‖₁ +
λ_GIoU·(1 − GIoU) and trained with L_fine = λ_align·L_focal + λ_L1·L_L1 + λ_GIoU·L_GIoU (DETR eqs. 1-2; weights 2, 5,
2; `losses.grounding`); `ground(images, phrases)` gives each phrase the box of its best-scoring query, in pixels.
The coarse heads are kept (their weights load) but frozen; `start_from` loads a coarse checkpoint. Simplified
against the official head: one box MLP per ViT patch token instead of GLIP's VLDyHead (6 DyHead blocks on a 5-level
FPN, anchors, centerness), DETR's Hungarian matching instead of ATSS assignment, focal loss per phrase instead of
per token, no multi-scale inputs. The paper's backbones are Swin-B and
RoBERTa-base with fusion in the top 6 layers; here the image backbone is a timm ViT (cross-attention added next to
a block's self-attention, before its MLP) and the text backbone the suite's pre-LN bidirectional transformer
(RoBERTa is post-LN: its cross-attention output joins the self-attention's inside one LayerNorm).
Representations: `encode_image` / `encode_text` are the fusion-off ITC space; `match_scores` the ITM log-odds
(re-ranking, as FIBER reports "ITM" retrieval); `probe_features` the image backbone's pooled output, fusion off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from data_modules.instances import object_phrases
from data_modules.views import SingleCrop, Views
from vlp_lightning.catalog import Paper
from vlp_lightning.distributed import all_gather_no_grad
from vlp_lightning.losses.fusion import itm_loss, mask_tokens, mlm_loss, queue_contrastive_loss
from vlp_lightning.losses.grounding import boxes_to_normalised, grounding_loss, normalised_to_boxes
from vlp_lightning.methods.base import VLPMethod, WarmupCosineLR, load_earlier_stage
from vlp_lightning.methods.fusion.albef import mlm_head
from vlp_lightning.methods.fusion.common import PairQueues, hard_negative_batch, sample_ids, text_specials
from vlp_lightning.methods.fusion.fiber_grounding import GroundingHead, phrase_prompts
from vlp_lightning.modules.fusion import Attention, FusionTextTransformer
from vlp_lightning.modules.memory_bank import MemoryBank
from vlp_lightning.modules.tokenizers import ByteTokenizer, Tokenizer
from vlp_lightning.modules.vision import VisionEncoder, tiny_vit


class GatedCrossAttention(nn.Module):
    """α · attn(ln(x), ln(context)), α = 0 at init: the image backbone's image-to-text attention (the residual
    branch only; the caller adds it)."""

    def __init__(self, width: int, context_width: int, heads: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.ln_context = nn.LayerNorm(context_width)
        self.attn = Attention(width, heads, context_width=context_width)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, context: Tensor, context_padding: Tensor) -> Tensor:
        mask = context_padding.bool()[:, None, None, :]  # [N, 1, 1, L]: attend to real text tokens only
        return self.gate * self.attn(self.ln(x), self.ln_context(context), mask=mask)


class FIBER(PairQueues, VLPMethod):
    """FIBER: fusion in the top layers of both backbones; coarse stage ITC (fusion off) + ITM + MLM, fine stage phrase
    grounding (module doc).

    Args:
        vision: image backbone, a timm ViT (default: a tiny 2-block ViT at 32 px; Swin-B at 384 px in the paper).
        tokenizer: text tokenizer (default: bytes, 32 tokens; RoBERTa BPE in the paper).
        width, layers, heads: the text backbone (RoBERTa-base: 768, 12, 12).
        fusion_layers: K, the top layers of each backbone with cross-attention (6).
        embed_dim: the ITC space (256 in the METER-style code FIBER builds on).
        queue_length: ITC features kept from past batches (4,096; a multiple of the global batch).
        init_temperature: τ at the start (0.07), learned and clamped to [0.001, 1].
        mask_probability: MLM masking rate (0.15).
        new_module_lr: learning rate of the cross-modal layers, gates, projections and heads (official: 5x the
            backbones'); None: the optimizer's for everything.
        itm_weight, mlm_weight: loss weights (1 and 1; ITC is 1).
        stage: `coarse` (ITC + ITM + MLM on image-text pairs) or `fine` (phrase grounding on scene shards with
            boxes, module doc).
        start_from: a checkpoint of a FIBER with the same backbone arguments whose weights this run starts from
            (the coarse stage's, for the fine stage; the grounding head, new in the fine stage, starts fresh).
        phrases: the fine stage's text per object: its region description (`regions`) or its name (`names`).
        align_weight, l1_weight, giou_weight: the fine stage's loss and matching weights (2, 5, 2: Deformable DETR).
    """

    paper = Paper("Coarse-to-Fine Vision-Language Pre-training with Fusion in the Backbone", "Dou et al.", 2022,
                  note="coarse stage ITC/ITM/MLM; fine stage phrase grounding, a DETR-style head per patch token and "
                  "Hungarian matching in place of GLIP's DyHead and ATSS")
    family = "fusion and captioning"
    view_kind = "one crop"

    required_keys = ("image", "text")

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        tokenizer: Tokenizer | None = None,
        width: int = 64,
        layers: int = 2,
        heads: int = 2,
        fusion_layers: int = 1,
        embed_dim: int = 32,
        queue_length: int = 64,
        init_temperature: float = 0.07,
        mask_probability: float = 0.15,
        new_module_lr: float | None = None,
        itm_weight: float = 1.0,
        mlm_weight: float = 1.0,
        stage: Literal["coarse", "fine"] = "coarse",
        start_from: str | None = None,
        phrases: Literal["regions", "names"] = "regions",
        align_weight: float = 2.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.save_hyperparameters(ignore=["vision", "tokenizer", "optimizer", "lr_scheduler"])
        self.tokenizer = tokenizer or ByteTokenizer(context_length=32)
        self.specials = text_specials(self.tokenizer)
        self.vision = vision or tiny_vit()
        blocks = getattr(self.vision.model, "blocks", None)
        if blocks is None or not hasattr(self.vision.model, "_pos_embed"):
            raise ValueError(f"FIBER inserts cross-attention into a timm ViT's blocks; {type(self.vision.model).__name__}"
                             " has none: pick a vit_* model_name")
        if not 0 < fusion_layers <= min(len(blocks), layers):
            raise ValueError(f"fusion_layers={fusion_layers} must be between 1 and the depth of both backbones "
                             f"(image {len(blocks)}, text {layers}); lower it or deepen the backbones")
        image_width = self.vision.num_features
        self.fusion_layers = fusion_layers
        self.text = FusionTextTransformer(
            self.specials.vocab_size, self.tokenizer.context_length, width, layers - fusion_layers, fusion_layers,
            heads, memory_width=image_width, gated=True, gate_activation="none",
        )
        self.image_cross = nn.ModuleList(GatedCrossAttention(image_width, width, heads) for _ in range(fusion_layers))
        self.image_projection = nn.Linear(image_width, embed_dim)
        self.text_projection = nn.Linear(width, embed_dim)
        self.mlm_head = mlm_head(width)
        self.itm_head = nn.Linear(width + image_width, 2)
        self.temperature = nn.Parameter(torch.tensor(init_temperature))
        self.image_queue = MemoryBank(queue_length, embed_dim)
        self.text_queue = MemoryBank(queue_length, embed_dim)
        self.new_module_lr = new_module_lr
        self.mask_probability = mask_probability
        self.itm_weight, self.mlm_weight = itm_weight, mlm_weight
        self.stage, self.phrases = stage, phrases
        self.grounding_weights = {"align_weight": align_weight, "l1_weight": l1_weight, "giou_weight": giou_weight}
        if stage == "fine":
            self.required_keys = ("image", "boxes")
            self.grounding_head = GroundingHead(image_width, width, embed_dim)
            for unused in (self.itm_head, self.mlm_head, self.image_projection, self.text_projection):
                unused.requires_grad_(False)  # the coarse heads: kept (their weights load), not trained (DDP)
            self.temperature.requires_grad_(False)
        if start_from is not None:
            load_earlier_stage(self, start_from, "runs/fiber/emoji_tiny/checkpoints/last.ckpt", "grounding_head.")

    def train_views(self) -> Views:
        """Random resized crops with flips (the METER / FIBER pre-training augmentation, without RandAugment); the
        fine stage crops less and never flips, as the region descriptions name positions ("in the top left")."""
        if self.stage == "fine":
            return SingleCrop(scale=(0.8, 1.0), ratio=(0.9, 1.1), hflip=False, mean=self.vision.mean,
                              std=self.vision.std)
        return SingleCrop(scale=(0.5, 1.0), hflip=True, mean=self.vision.mean, std=self.vision.std)

    # ------------------------------------------------------------------ backbones
    def image_bottom(self, images: Tensor) -> Tensor:
        """The image backbone's tokens entering its first fused layer [N, S, W_img]."""
        model = self.vision.model
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        for block in model.blocks[: len(model.blocks) - self.fusion_layers]:
            x = block(x)
        return x

    def top_layers(
        self, image: Tensor, text: Tensor, text_mask: Tensor, text_padding: Tensor, fuse: bool
    ) -> tuple[Tensor, Tensor]:
        """The top K layers of both backbones, in lock-step, with (fuse) or without their cross-attention: (image
        tokens after the final norm [N, S, W_img], text states after the final LayerNorm [N, L, W])."""
        model = self.vision.model
        for k, block in enumerate(model.blocks[len(model.blocks) - self.fusion_layers :]):
            image_in, text_in = image, text
            normed = block.norm1(image_in)
            attended = block.attn(normed)
            if fuse:
                attended = attended + self.image_cross[k](normed, text_in, text_padding)
            image = image_in + block.drop_path1(block.ls1(attended))
            image = image + block.drop_path2(block.ls2(block.mlp(block.norm2(image))))
            text = self.text.fusion_blocks[k](text_in, text_mask, image_in if fuse else None)
        return model.norm(image), self.text.ln_final(text)

    def forward_backbones(self, images: Tensor, text: dict[str, Tensor], fuse: bool) -> tuple[Tensor, Tensor]:
        _, states, mask = self.text.encode(text)
        return self.top_layers(self.image_bottom(images), states, mask, text["attention_mask"], fuse)

    def pooled_image(self, image_tokens: Tensor) -> Tensor:
        return self.vision.model.forward_head(image_tokens)

    # ------------------------------------------------------------------ representations
    def probe_features(self, images: Tensor) -> Tensor:
        return self.vision(images)

    def encode_image(self, images: Tensor) -> Tensor:
        return F.normalize(self.image_projection(self.vision(images)), dim=-1)

    def encode_text(self, text: dict[str, Tensor]) -> Tensor:
        _, states, mask = self.text.encode(text)
        return F.normalize(self.text_projection(self.text.fuse(states, mask, None)[:, 0]), dim=-1)

    def itm_logits(self, image_tokens: Tensor, text_states: Tensor) -> Tensor:
        return self.itm_head(torch.cat([text_states[:, 0], self.pooled_image(image_tokens)], dim=-1)).float()

    @torch.no_grad()
    def match_scores(self, images: Tensor, text: dict[str, Tensor]) -> Tensor:
        """ITM log-odds of "match" for each pair (images[i], text[i]) [N], fusion on (as `ALBEF.match_scores`)."""
        logits = self.itm_logits(*self.forward_backbones(images, text, fuse=True))
        return logits[:, 1] - logits[:, 0]

    # ------------------------------------------------------------------ training
    def parameter_groups(self) -> list[dict]:
        """The cross-modal layers, gates, projections and heads at `new_module_lr` (module doc)."""
        cross = [nn.ModuleList([block.cross_attn, block.ln_cross, block.ln_memory]) for block in self.text.fusion_blocks]
        gates = nn.ParameterList([block.gate for block in self.text.fusion_blocks])
        new = [self.image_cross, *cross, gates, self.image_projection, self.text_projection, self.mlm_head,
               self.itm_head, *([self.grounding_head] if self.stage == "fine" else [])]
        return self.parameter_groups_at(self.new_module_lr, new)

    def after_optimizer_step(self) -> None:
        """τ back into [0.001, 1] (official: clamped at each forward)."""
        with torch.no_grad():
            self.temperature.clamp_(0.001, 1.0)

    # ------------------------------------------------------------------ fine stage: phrase grounding
    def grounding_outputs(self, images: Tensor, phrases: list[list[str]]) -> tuple[Tensor, Tensor, list[int]]:
        """Each image fused with its phrase prompt -> boxes [N, Q, 4] (normalised cxcywh), alignment logits
        [N, Q, K_max] and how many of each image's phrases fit the prompt (`fiber_grounding`)."""
        text, spans, counts = phrase_prompts(self.tokenizer, phrases)
        text = {name: tokens.to(images.device) for name, tokens in text.items()}
        image_tokens, text_states = self.forward_backbones(images, text, fuse=True)
        patches = image_tokens[:, self.vision.model.num_prefix_tokens :]
        return (*self.grounding_head(patches, text_states, spans.to(images.device)), counts)

    @property
    def ground(self) -> Callable[[Tensor, list[list[str]]], list[Tensor]] | None:
        """`ground_phrases` in the fine stage; None in the coarse one, which has no grounding head (so
        `PhraseGrounding` skips it)."""
        return self.ground_phrases if self.stage == "fine" else None

    @torch.no_grad()
    def ground_phrases(self, images: Tensor, phrases: list[list[str]]) -> list[Tensor]:
        """For each image the box of each of its phrases: that of the query scoring highest for the phrase, [K_i, 4]
        x0, y0, x1, y1 in pixels of `images`. A phrase past the prompt's context length scores the bias alone
        everywhere, so it gets the first query's box."""
        boxes, logits, _ = self.grounding_outputs(images, phrases)
        height, width = images.shape[-2:]
        return [normalised_to_boxes(boxes[image, logits[image, :, : len(sample)].argmax(0)], height, width)
                for image, sample in enumerate(phrases)]

    def grounding_forward_loss(self, batch: dict) -> dict[str, Tensor]:
        """Phrase grounding on a scene batch: each image's kept objects' phrases as the prompt, their boxes as the
        targets; `grounding_loss` (Hungarian matching, focal alignment + L1 + GIoU)."""
        images = batch["image"]
        height, width = images.shape[-2:]
        phrases = [object_phrases(meta, objects, self.phrases)
                   for meta, objects in zip(batch["meta"], batch["objects"])]
        boxes, logits, counts = self.grounding_outputs(images, phrases)
        targets = [boxes_to_normalised(true[:count].to(boxes), height, width)
                   for true, count in zip(batch["boxes"], counts)]
        return grounding_loss(logits, boxes, targets, **self.grounding_weights)

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        if self.stage == "fine":
            return self.grounding_forward_loss(batch)
        images, text = batch["image"], batch["text"]
        padding = text["attention_mask"]
        image_bottom = self.image_bottom(images)
        _, text_bottom, text_mask = self.text.encode(text)
        # fusion off: the dual encoder and its ITC
        image_unfused, text_unfused = self.top_layers(image_bottom, text_bottom, text_mask, padding, fuse=False)
        image_features = F.normalize(self.image_projection(self.pooled_image(image_unfused)).float(), dim=-1)
        text_features = F.normalize(self.text_projection(text_unfused[:, 0]).float(), dim=-1)
        temperature = self.temperature.float()
        all_images, all_texts = all_gather_no_grad(image_features), all_gather_no_grad(text_features)
        loss_itc = queue_contrastive_loss(image_features, text_features, self.image_queue.bank.float(),
                                          self.text_queue.bank.float(), temperature)
        if self.training:
            self._to_enqueue = (image_features.detach(), text_features.detach())

        with torch.no_grad():  # hard negatives from the ITC similarities to the global batch
            similarity_i2t = image_features @ all_texts.T / temperature
            similarity_t2i = text_features @ all_images.T / temperature
        (images_3b,), (text_3b, mask_3b, padding_3b), labels = hard_negative_batch(
            [image_bottom], [text_bottom, text_mask, padding], similarity_i2t, similarity_t2i, sample_ids(batch)
        )
        image_fused, text_fused = self.top_layers(images_3b, text_3b, mask_3b, padding_3b, fuse=True)
        logits_itm = self.itm_logits(image_fused, text_fused)
        loss_itm = itm_loss(logits_itm, labels)

        masked_ids, mlm_labels = mask_tokens(
            text["input_ids"], padding, mask_token_id=self.specials.mask_token_id,
            vocab_size=self.specials.vocab_size, special_token_ids=self.specials.special_token_ids,
            probability=self.mask_probability,
        )
        _, masked_bottom, masked_mask = self.text.encode({"input_ids": masked_ids, "attention_mask": padding})
        _, masked_fused = self.top_layers(image_bottom, masked_bottom, masked_mask, padding, fuse=True)
        chosen = mlm_labels != -100
        logits_mlm = self.text.token_logits(self.mlm_head(masked_fused[chosen]))[None]
        loss_mlm = mlm_loss(logits_mlm, mlm_labels[chosen][None])
        loss = loss_itc + self.itm_weight * loss_itm + self.mlm_weight * loss_mlm
        return {"loss": loss, "itc": loss_itc.detach(), "itm": loss_itm.detach(), "mlm": loss_mlm.detach(),
                "itm_accuracy": (logits_itm.argmax(-1) == labels).float().mean(),
                "temperature": temperature.detach()}
