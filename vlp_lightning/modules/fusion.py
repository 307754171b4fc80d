"""Fusion layers: text that attends to image tokens.

* `Attention` — multi-head attention on `F.scaled_dot_product_attention`, with a separate width for keys / values
  (cross-attention to an image tower of another width) and one boolean mask (True = may attend), so a causal mask,
  key padding and CoCa's class-token mask combine in one tensor.
* `FusionBlock` — a pre-LN transformer block: self-attention, then (optionally) cross-attention to image tokens, then
  the MLP. A *gated* block scales its cross-attention by tanh(g) with g initialised to 0 (Flamingo, Alayrac et al.
  2022, eq. 1 "tanh-gating"; FIBER's α multiplies as it is), so a model built from gated blocks starts as exactly
  the text-only model.
  Without gating the block is the fusion layer of ALBEF (Li et al. 2021, sec. 3.1: "the multimodal encoder fuses the
  image features with the text features through cross attention at each layer") and the multimodal decoder of CoCa
  (Yu et al. 2022, sec. 3.2).
* `FusionTextTransformer` — token and position embeddings, `text_layers` text-only blocks (the unimodal text encoder /
  decoder), then `fusion_layers` blocks with cross-attention (the multimodal part), a final LayerNorm and the
  token logits tied to the token embedding. Bidirectional (ALBEF: the 12 layers of BERT-base split 6 + 6) or causal
  (CoCa: the unimodal text decoder and the multimodal text decoder, each half of the layers), optionally with CoCa's
  learnable class token appended after the text, whose output is the text embedding (sec. 3.2).
* `AttentionalPooler` — learnable queries attending to the image tokens: CoCa's task-specific attentional pooling
  (sec. 3.2, "a single multi-head attention layer with n_query learnable queries"): 1 query for the contrastive
  embedding, 256 for the captioning decoder.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head attention: queries from x [N, L, width], keys and values from `context` [N, S, context_width]
    (x itself by default). `mask` is boolean, broadcastable to [N, heads, L, S], True where attention is allowed."""

    def __init__(self, width: int, heads: int, context_width: int | None = None) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by its {heads} heads; pick heads dividing it")
        self.heads = heads
        context_width = context_width or width
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(context_width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        batch, length, width = x.shape
        query = self.query(x).view(batch, length, self.heads, -1).transpose(1, 2)
        key, value = self.key_value(context).view(batch, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        return self.out(attended.transpose(1, 2).reshape(batch, length, width))


class FusionBlock(nn.Module):
    """x + attn(ln(x)); [x + gate * cross_attn(ln(x), image tokens)]; x + mlp(ln(x)) (module doc).

    Args:
        width, heads, mlp_ratio: the transformer block.
        cross_attention: add the cross-attention to image tokens (memory).
        memory_width: width of the image tokens (default: `width`).
        gated: scale the cross-attention by a learned gate g = 0 at init, so the block starts as the text-only block.
        gate_activation: "tanh" scales by tanh(g) (Flamingo), "none" by g itself (FIBER's α).
    """

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        cross_attention: bool = False,
        memory_width: int | None = None,
        gated: bool = False,
        gate_activation: Literal["tanh", "none"] = "tanh",
    ) -> None:
        super().__init__()
        if gate_activation not in ("tanh", "none"):
            raise ValueError(f"gate_activation must be 'tanh' or 'none', got {gate_activation!r}")
        self.gate_activation = gate_activation
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.cross_attention = cross_attention
        if cross_attention:
            self.ln_cross = nn.LayerNorm(width)
            self.ln_memory = nn.LayerNorm(memory_width or width)
            self.cross_attn = Attention(width, heads, context_width=memory_width or width)
            self.gate = nn.Parameter(torch.zeros(())) if gated else None
        elif gated:
            raise ValueError("gated=True gates a cross-attention: set cross_attention=True as well, or gated=False")
        hidden = int(width * mlp_ratio)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, hidden), act=nn.GELU(), c_proj=nn.Linear(hidden, width)))

    def forward(
        self, x: Tensor, mask: Tensor | None = None, memory: Tensor | None = None, memory_mask: Tensor | None = None
    ) -> Tensor:
        """x [N, L, width]; `mask` the self-attention mask (True = attend); `memory` [N, S, memory_width] image
        tokens and `memory_mask` [N, 1, 1, S] (True = a real token) for the cross-attention. A gated block given no
        memory skips its cross-attention (the gate's zero point: fusion switched off)."""
        return self.feed_forward(self.attend(x, mask, memory, memory_mask))

    def attend(
        self, x: Tensor, mask: Tensor | None = None, memory: Tensor | None = None, memory_mask: Tensor | None = None
    ) -> Tensor:
        """The block's self- and cross-attention, `forward` without the MLP (ARL adds its knowledge in between)."""
        x = x + self.attn(self.ln_1(x), mask=mask)
        # a gated block without image tokens is the text-only block: fusion switched off (FIBER's ITC)
        if self.cross_attention and (memory is not None or self.gate is None):
            if memory is None:
                raise ValueError(
                    "a FusionBlock with ungated cross-attention needs image tokens: pass memory=[N, S, width]"
                )
            attended = self.cross_attn(self.ln_cross(x), self.ln_memory(memory), mask=memory_mask)
            x = x + (attended if self.gate is None else self.gate_value() * attended)
        return x

    def feed_forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.ln_2(x))

    def gate_value(self) -> Tensor:
        return torch.tanh(self.gate) if self.gate_activation == "tanh" else self.gate


class FusionTextTransformer(nn.Module):
    """Text layers, then fusion layers that cross-attend to image tokens (module doc).

    Args:
        vocab_size: token ids the embedding holds (a tokenizer without a mask token gets one more row: see
            `special_tokens`).
        context_length: longest text (the class token, when used, takes one more position).
        width, heads, mlp_ratio: every block.
        text_layers: text-only blocks (ALBEF's text encoder, CoCa's unimodal decoder).
        fusion_layers: blocks with cross-attention (ALBEF's multimodal encoder, CoCa's multimodal decoder).
        memory_width: width of the image tokens the fusion layers read (default: `width`).
        causal: causal self-attention (a decoder) instead of bidirectional (an encoder).
        class_token: append a learnable token after the text whose text-layer output pools the text (CoCa).
        gated: gated cross-attention, starting as the text-only model (`FusionBlock`).
        gate_activation: the gate's form, tanh(g) or g (`FusionBlock`).
    """

    def __init__(
        self,
        vocab_size: int,
        context_length: int = 32,
        width: int = 128,
        text_layers: int = 2,
        fusion_layers: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        memory_width: int | None = None,
        causal: bool = False,
        class_token: bool = False,
        gated: bool = False,
        gate_activation: Literal["tanh", "none"] = "tanh",
    ) -> None:
        super().__init__()
        self.context_length = context_length
        self.num_features = width
        self.causal = causal
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length + int(class_token), width))
        self.class_embedding = nn.Parameter(torch.zeros(width)) if class_token else None
        self.text_blocks = nn.ModuleList(FusionBlock(width, heads, mlp_ratio) for _ in range(text_layers))
        self.fusion_blocks = nn.ModuleList(
            FusionBlock(width, heads, mlp_ratio, True, memory_width, gated, gate_activation)
            for _ in range(fusion_layers)
        )
        self.ln_text = nn.LayerNorm(width)  # the pooled unimodal text feature
        self.ln_final = nn.LayerNorm(width)  # the fused tokens, before the tied token logits
        self.logit_bias = nn.Parameter(torch.zeros(vocab_size))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.class_embedding is not None:
            nn.init.normal_(self.class_embedding, std=0.02)

    def self_attention_mask(self, attention_mask: Tensor, with_class_token: bool) -> Tensor:
        """[N, 1, L, L] boolean, True = may attend: causal or not; padding is never a key of a real token (with
        causal attention it never is anyway) and the class token reads only real tokens (open_clip's cls mask)."""
        keys = attention_mask.bool()
        if with_class_token:
            keys = torch.cat([keys, keys.new_ones(keys.shape[0], 1)], dim=1)
        length = keys.shape[1]
        mask = keys[:, None, None, :].expand(-1, 1, length, -1)
        if self.causal:
            mask = mask & torch.ones(length, length, dtype=torch.bool, device=keys.device).tril()
        # a padding query with every key hidden would be NaN: let padding rows see themselves (ignored downstream)
        return mask | torch.eye(length, dtype=torch.bool, device=keys.device)

    def encode(self, text: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Text only: tokens {"input_ids", "attention_mask"} -> (pooled feature [N, width], token states
        [N, L, width] for the fusion layers, the self-attention mask the fusion layers reuse). Pooled: the class
        token's output when the model has one (CoCa), else the first token's (ALBEF's [CLS]; our tokenizers'
        start token)."""
        input_ids, attention_mask = text["input_ids"], text["attention_mask"]
        length = input_ids.shape[1]
        if length > self.context_length:
            raise ValueError(f"text of {length} tokens is longer than the context length {self.context_length}")
        x = self.token_embedding(input_ids)
        with_class = self.class_embedding is not None
        if with_class:
            x = torch.cat([x, self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)], dim=1)
            positions = torch.cat([self.positional_embedding[:length], self.positional_embedding[-1:]])
        else:
            positions = self.positional_embedding[:length]
        x = x + positions
        mask = self.self_attention_mask(attention_mask, with_class)
        for block in self.text_blocks:
            x = block(x, mask)
        if with_class:
            return self.ln_text(x[:, -1]), x[:, :-1], mask[:, :, :-1, :-1]
        return self.ln_text(x[:, 0]), x, mask

    def fuse(self, tokens: Tensor, mask: Tensor, memory: Tensor, memory_padding: Tensor | None = None) -> Tensor:
        """Token states from `encode` [N, L, width] + image tokens [N, S, memory_width] -> fused states [N, L, width]
        (after the final LayerNorm). `memory_padding` [N, S] is True on real image tokens (all by default)."""
        memory_mask = None if memory_padding is None else memory_padding.bool()[:, None, None, :]
        for block in self.fusion_blocks:
            tokens = block(tokens, mask, memory, memory_mask)
        return self.ln_final(tokens)

    def token_logits(self, states: Tensor) -> Tensor:
        """[N, L, width] -> next-token / masked-token logits [N, L, vocab] with the output layer tied to the token
        embedding (BERT's MLM decoder and GPT's LM head both share it) plus a bias."""
        return F.linear(states, self.token_embedding.weight, self.logit_bias)

    def forward(self, text: dict[str, Tensor], memory: Tensor) -> Tensor:
        """Tokens + image tokens -> fused token states [N, L, width]."""
        _, tokens, mask = self.encode(text)
        return self.fuse(tokens, mask, memory)


class AttentionalPooler(nn.Module):
    """`n_queries` learnable queries attend once to image tokens [N, S, context_width] -> [N, n_queries, width]
    (CoCa sec. 3.2; open_clip's `AttentionalPooler`: LayerNorm on the tokens and on the queries)."""

    def __init__(self, width: int, context_width: int, n_queries: int = 1, heads: int = 4) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_queries, width) * width**-0.5)
        self.ln_queries = nn.LayerNorm(width)
        self.ln_context = nn.LayerNorm(context_width)
        self.attn = Attention(width, heads, context_width=context_width)

    def forward(self, tokens: Tensor) -> Tensor:
        queries = self.ln_queries(self.queries).to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        return self.attn(queries, self.ln_context(tokens))
