"""BUS: Bottom-Up Patch Summarization (Jiang et al. 2023, "BUS: Efficient and Effective Vision-language Pre-training
with Bottom-Up Patch Summarization", ICCV).

An ALBEF / mPLUG-style model (`ALBEF`: ITC with momentum distillation and queues, ITM with hard negatives, MLM)
whose image side is summarised bottom-up before the fusion layers read it:

* Bottom-level extraction, the Text-Semantics-Aware Patch Selector (TSPS) inside the ViT: before block
  `select_layer` the patches are scored by how much a text attends to them, with that block's own query / key
  projections: a = softmax(q(g)ᵀ k(x_p) / √d) over the patches p (the image [CLS] excluded), averaged over heads,
  g the text [CLS] state mapped into the ViT's width. This is the text-[CLS] attention of TRIPS (Jiang et al. 2022,
  the same authors' selector; its query is the visual layer's own query projection of the text [CLS]). The top
  ⌈ρ P⌉ patches are kept (ρ = `keep_ratio`), the others fused into one token weighted by their scores (as EViT
  does; it is how the scores get a gradient), and the remaining blocks run on the short sequence. Without a text
  (ITC, captioning, probing) the image's own [CLS] is the guide (EViT's attentive-token rule).
* Top-level abstraction, the Patch Abstraction Decoder (PAD) upon the ViT: `n_queries` learnable queries, a few
  transformer decoder layers (self-attention, cross-attention to the ViT's remaining tokens, MLP: `FusionBlock`)
  -> the summary [N, n_queries, W_img] that the fusion encoder and the caption decoder cross-attend to.
* Losses, weight 1 each (the paper names ITC, ITM, MLM and PrefixLM): ALBEF's three terms (`ALBEF.contrastive_loss`,
  `matching_loss`, `masked_language_loss`) and a captioning loss (`common.captioning_loss`) of a causal
  `FusionTextTransformer` reading the text-free summary. ITC uses the text-free ViT [CLS]; ITM selects every
  pair's patches by that pair's text, negatives included (as `match_scores` does at retrieval); MLM by the masked
  text (the unmasked text would leak the masked words into the image summary).

What was read and what is inferred: read were the paper's abstract and summaries of it (TSPS inside the ViT, PAD
upon it, ITC / ITM / MLM / PrefixLM plus a Patch-Text Matching objective, ~50 % faster training) and a summary of
TRIPS (text-[CLS] attention, attentive patches kept, the rest fused, selection layers at i·L/(t + 1) + 1: 4 / 7 / 10
of ViT-B). No official code was found. Inferred: the selection layer and keep ratio, the key projection (TRIPS's
summary writes the image features), the score weighting of the fused token, the number of queries and PAD layers,
a captioning loss on the whole caption in place of PrefixLM, the text-free guide, and no PTM (it needs patch-level
text labels the image-text shards do not carry). Paper-size recipe: ViT-B/16 at 256 px, 6 + 6 text / fusion layers
and a 12-layer decoder of width 768 with AdamW lr 1e-4, wd 0.02, 30 epochs: mPLUG-base's settings (the authors'
earlier model), not read in the BUS paper. Representations: `encode_image` / `encode_text` the ITC space,
`match_scores` the ITM log-odds (ALBEF's re-ranking), `probe_features` the text-free ViT [CLS].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from vlp_lightning.catalog import Paper
from vlp_lightning.methods.base import WarmupCosineLR
from vlp_lightning.methods.fusion.albef import ALBEF
from vlp_lightning.methods.fusion.common import CaptionGenerator, captioning_loss, next_token_logits
from vlp_lightning.methods.momentum import momentum_copy
from vlp_lightning.modules.fusion import FusionBlock, FusionTextTransformer
from vlp_lightning.modules.tokenizers import Tokenizer
from vlp_lightning.modules.vision import VisionEncoder, tiny_vit


class TextSemanticsPatchSelector(nn.Module):
    """TSPS: keep the ⌈ρ P⌉ patches a guide attends to most, fuse the rest into one token (module doc).

    Args:
        text_width: width of the text [CLS] state that guides the selection.
        vision_width: the ViT's width (the guide is mapped into it: LayerNorm + Linear).
        keep_ratio: ρ, the fraction of patches kept, in (0, 1].
    """

    def __init__(self, text_width: int, vision_width: int, keep_ratio: float = 0.5) -> None:
        super().__init__()
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio is the fraction of patches the TSPS keeps and must lie in (0, 1], got "
                             f"{keep_ratio}; e.g. 0.5")
        self.keep_ratio = keep_ratio
        self.guide = nn.Sequential(nn.LayerNorm(text_width), nn.Linear(text_width, vision_width))

    def kept(self, patches: int) -> int:
        """How many of `patches` patches are kept: ⌈ρ P⌉, at least one."""
        return max(1, math.ceil(self.keep_ratio * patches - 1e-6))

    @staticmethod
    def scores(block: nn.Module, tokens: Tensor, guide: Tensor, prefix: int) -> Tensor:
        """softmax(q(g)ᵀ k(x_p) / √d) over the patches, averaged over heads [N, P], with the query / key projections
        (and norms) of the timm ViT `block` the kept tokens enter; `guide` [N, W_img] is read as a token of the
        residual stream, `tokens` [N, prefix + P, W_img]."""
        attention = block.attn
        heads, head_dim = attention.num_heads, attention.head_dim
        inner = heads * head_dim
        weight, bias = attention.qkv.weight, attention.qkv.bias
        query = F.linear(block.norm1(guide), weight[:inner], None if bias is None else bias[:inner])
        key = F.linear(block.norm1(tokens[:, prefix:]), weight[inner : 2 * inner],
                       None if bias is None else bias[inner : 2 * inner])
        batch, patches = key.shape[:2]
        query = attention.q_norm(query.view(batch, heads, 1, head_dim))
        key = attention.k_norm(key.view(batch, patches, heads, head_dim).transpose(1, 2))
        return (query @ key.transpose(-2, -1) * attention.scale).softmax(-1).mean(1)[:, 0]

    def forward(
        self, block: nn.Module, tokens: Tensor, text_cls: Tensor | None = None, prefix: int = 1
    ) -> tuple[Tensor, Tensor]:
        """tokens [N, prefix + P, W_img] before `block` and the text [CLS] states [N, W_text] (None: the image's own
        [CLS] guides) -> (prefix, kept patches in image order, the fused rest: [N, prefix + k (+ 1), W_img], the kept
        patch indices [N, k])."""
        guide = tokens[:, 0] if text_cls is None else self.guide(text_cls).to(tokens.dtype)
        scores = self.scores(block, tokens, guide, prefix)
        patches, keep = scores.shape[1], self.kept(scores.shape[1])
        kept = scores.topk(keep, dim=1).indices.sort(dim=1).values
        patch_tokens = tokens[:, prefix:]
        selected = patch_tokens.gather(1, kept[..., None].expand(-1, -1, tokens.shape[-1]))
        if keep == patches:
            return torch.cat([tokens[:, :prefix], selected], dim=1), kept
        dropped = torch.ones_like(scores, dtype=torch.bool).scatter(1, kept, False)
        weights = scores * dropped
        weights = weights / weights.sum(1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        fused = (weights[..., None].to(tokens.dtype) * patch_tokens).sum(1, keepdim=True)
        return torch.cat([tokens[:, :prefix], selected, fused], dim=1), kept


class PatchAbstractionDecoder(nn.Module):
    """PAD: `n_queries` learnable queries through `layers` decoder blocks cross-attending to the ViT's remaining
    tokens -> the summary [N, n_queries, width] (module doc)."""

    def __init__(self, width: int, heads: int, n_queries: int, layers: int) -> None:
        super().__init__()
        if n_queries < 1 or layers < 1:
            raise ValueError(f"the PAD needs at least one query and one layer, got n_queries={n_queries}, "
                             f"pad_layers={layers}; e.g. 4 and 1")
        self.queries = nn.Parameter(torch.randn(n_queries, width) * width**-0.5)
        self.blocks = nn.ModuleList(FusionBlock(width, heads, cross_attention=True) for _ in range(layers))
        self.ln = nn.LayerNorm(width)

    def forward(self, tokens: Tensor) -> Tensor:
        summary = self.queries.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        for block in self.blocks:
            summary = block(summary, memory=tokens)
        return self.ln(summary)


class BUS(CaptionGenerator, ALBEF):
    """ALBEF's losses on a bottom-up patch summary (TSPS in the ViT, PAD upon it) + captioning (module doc).

    Args:
        vision: a timm ViT with a class token (default: a tiny 2-block ViT at 32 px; ViT-B/16 in the paper).
        tokenizer: text tokenizer (default: bytes, 32 tokens; BERT WordPiece in the paper).
        width, text_layers, fusion_layers, heads: the text / fusion encoder (768, 6, 6, 12).
        decoder_layers: the causal caption decoder's layers, each cross-attending to the summary (12).
        embed_dim: the ITC space (256).
        select_layer: the TSPS runs before this block (0-based; blocks before it see every patch).
        keep_ratio: fraction of the patches the TSPS keeps.
        n_queries, pad_layers: the PAD's learnable queries (the summary's length) and decoder layers.
        queue_length, init_temperature, alpha, alpha_warmup, momentum, mask_probability: as `ALBEF`.
        itm_weight, mlm_weight, caption_weight: loss weights (1 each; ITC is 1).
    """

    paper = Paper("BUS: Efficient and Effective Vision-language Pre-training with Bottom-Up Patch Summarization",
                  "Jiang et al.", 2023, note="from the abstract and TRIPS; no paper body or code read: see its docstring")

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        tokenizer: Tokenizer | None = None,
        width: int = 64,
        text_layers: int = 1,
        fusion_layers: int = 1,
        decoder_layers: int = 1,
        heads: int = 2,
        embed_dim: int = 32,
        select_layer: int = 1,
        keep_ratio: float = 0.5,
        n_queries: int = 4,
        pad_layers: int = 1,
        queue_length: int = 64,
        init_temperature: float = 0.07,
        alpha: float = 0.4,
        alpha_warmup: float = 0.0,
        momentum: float = 0.995,
        mask_probability: float = 0.15,
        itm_weight: float = 1.0,
        mlm_weight: float = 1.0,
        caption_weight: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(
            vision or tiny_vit(), tokenizer, width, text_layers, fusion_layers, heads, embed_dim, queue_length,
            init_temperature, alpha, alpha_warmup, momentum, mask_probability, itm_weight, mlm_weight,
            optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile,
        )
        model = self.vision.model
        if not hasattr(model, "blocks") or getattr(model, "cls_token", None) is None:
            raise ValueError(f"BUS selects patches inside a timm ViT with a class token, got {type(model).__name__}; "
                             "pass a VisionEncoder with model_name vit_*")
        if not 0 <= select_layer < len(model.blocks):
            raise ValueError(f"select_layer {select_layer} is not a block of this {len(model.blocks)}-block ViT; "
                             f"pick one in [0, {len(model.blocks) - 1}]")
        image_width = self.vision.num_features
        self.select_layer = select_layer
        self.selector = TextSemanticsPatchSelector(width, image_width, keep_ratio)
        self.pad = PatchAbstractionDecoder(image_width, heads, n_queries, pad_layers)
        self.decoder = FusionTextTransformer(
            self.tokenizer.vocab_size, self.tokenizer.context_length, width, 0, decoder_layers, heads,
            memory_width=image_width, causal=True,
        )
        self.decoder.ln_text.requires_grad_(False)  # it pools no text feature: an unused LayerNorm (DDP)
        self.selector_m = momentum_copy(self.selector)
        self.pad_m = momentum_copy(self.pad)
        self.caption_weight = caption_weight
        self.default_caption_length = self.tokenizer.context_length - 1

    @property
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [*super().momentum_pairs, (self.selector, self.selector_m), (self.pad, self.pad_m)]

    # ------------------------------------------------------------------ the bottom-up summary
    def patch_tokens(self, images: Tensor, momentum: bool = False) -> Tensor:
        """The ViT up to the TSPS (patch embedding, positions, blocks before `select_layer`): [N, 1 + P, W_img],
        text-independent, so computed once per image whatever text selects from it."""
        model = (self.vision_m if momentum else self.vision).model
        tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        for block in model.blocks[: self.select_layer]:
            tokens = block(tokens)
        return tokens

    def summarise(
        self, tokens: Tensor, text_cls: Tensor | None = None, momentum: bool = False
    ) -> tuple[Tensor, Tensor]:
        """`patch_tokens` output -> TSPS (guided by the text [CLS] states [N, W_text], None: the image [CLS]), the
        remaining blocks and the final norm, then PAD: (the ViT's output tokens, the summary [N, n_queries, W_img])."""
        model = (self.vision_m if momentum else self.vision).model
        selector, pad = (self.selector_m, self.pad_m) if momentum else (self.selector, self.pad)
        tokens, _ = selector(model.blocks[self.select_layer], tokens, text_cls, model.num_prefix_tokens)
        for block in model.blocks[self.select_layer :]:
            tokens = block(tokens)
        tokens = model.norm(tokens)
        return tokens, pad(tokens)

    def fusion_tokens(self, images: Tensor) -> Tensor:
        return self.patch_tokens(images)

    def fusion_memory(self, image_tokens: Tensor, text_states: Tensor, momentum: bool = False) -> Tensor:
        """The summary of `patch_tokens` under each text: its [CLS] state (`text_states[:, 0]`) guides the TSPS."""
        return self.summarise(image_tokens, text_states[:, 0], momentum)[1]

    # ------------------------------------------------------------------ representations
    def probe_features(self, images: Tensor) -> Tensor:
        """The ViT's [CLS] after the text-free selection (what ITC projects)."""
        return self.summarise(self.patch_tokens(images))[0][:, 0]

    def encode_image(self, images: Tensor) -> Tensor:
        return F.normalize(self.vision_projection(self.probe_features(images)), dim=-1)

    def caption_memory(self, images: Tensor) -> Tensor:
        """The text-free summary [N, n_queries, W_img] the caption decoder attends to."""
        return self.summarise(self.patch_tokens(images))[1]

    def caption_logits(self, memory: Tensor, prefixes: Tensor) -> Tensor:
        return next_token_logits(self.decoder, memory, prefixes)

    # ------------------------------------------------------------------ training
    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        images, text = batch["image"], batch["text"]
        alpha, temperature = self.current_alpha(), self.temperature.float()
        patches = self.patch_tokens(images)  # shared by the text-free pass and every text's selection
        image_tokens, summary = self.summarise(patches)
        text_pooled, text_states, text_mask = self.text.encode(text)
        with torch.no_grad():
            patches_m = self.patch_tokens(images.to(next(self.vision_m.parameters()).dtype), momentum=True)
            image_cls_m = self.summarise(patches_m, momentum=True)[0][:, 0]
        loss_itc, image_features, text_features = self.contrastive_loss(
            image_tokens[:, 0], text_pooled, image_cls_m, text, alpha, temperature
        )
        loss_itm, itm_accuracy = self.matching_loss(
            patches, text_states, text_mask, image_features, text_features, temperature, batch
        )
        loss_mlm = self.masked_language_loss(text, patches, patches_m, alpha)
        _, decoder_states, decoder_mask = self.decoder.encode(text)
        loss_cap = captioning_loss(self.decoder, decoder_states, decoder_mask, summary, text)
        loss = (loss_itc + self.itm_weight * loss_itm + self.mlm_weight * loss_mlm
                + self.caption_weight * loss_cap)
        return {"loss": loss, "itc": loss_itc.detach(), "itm": loss_itm.detach(), "mlm": loss_mlm.detach(),
                "caption": loss_cap.detach(), "itm_accuracy": itm_accuracy, "temperature": temperature.detach()}
