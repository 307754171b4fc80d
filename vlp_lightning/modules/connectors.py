"""Visual connectors: a frozen image tower's patch tokens [B, N, in_dim] -> M soft tokens [B, M, out_dim] in a causal
language model's embedding space. The tokens come in row-major grid order, N = g * g, without a CLS token;
`num_tokens(N)` gives M so the caller can insert exactly M placeholder tokens into the text before the forward.

* `Connector` — the base class: `num_tokens` and a `set_progress(fraction)` that is a no-op unless the connector's
  state follows training (only `TokenMergingConnector`'s does).
* `LinearConnector` — one linear map (LiMBeR, Merullo et al. 2023, sec. 3; github.com/jmerullo/limber
  `image_prefix.py`). Its CLIP RN50x16 and BEIT models project every grid token on its own (attention pooling
  removed: 12 x 12 x 3072 -> k = 144 prompts; BEIT-L's 14 x 14 patch tokens -> k = 196), which is also LLaVA-1's
  projection (Liu et al. 2023, sec. 4.1, "a simple linear layer to connect image features into the word embedding
  space"); its NF-ResNet50 model average-pools the grid and maps the 2048-d vector to k prompts at once
  (`configs/nfrn50_4096_linear.yml`: image_seq_len 1).
* `MLPConnector` — LLaVA-1.5's `mlp2x_gelu` (Liu et al. 2023b, sec. 3.1, "a two-layer MLP"): Linear -> GELU ->
  Linear per token.
* `PoolAdapter` — InfMLLM's pool-adapter (Zhou et al. 2023, sec. 3; github.com/mightyzau/InfMLLM
  `infmllm/models/pooler.py`): average pooling of the 2D grid to s x s, then Linear -> GELU -> Linear; cell (i, j)
  summarises the tokens at its grid position, so the LM still reads where things are (grounding).
* `TokenMergingConnector` — SimVLG (Jian et al. 2023): similar visual tokens merged gradually during training, by
  ToMe's bipartite soft matching (Bolya et al. 2023, sec. 3), then a projection.
* `QueryResampler` — BLIP-2's Q-Former (Li et al. 2023, sec. 3.1) as a resampler: learned queries cross-attend to
  the tokens (transformers' `Blip2QFormerModel`), then BLIP-2's linear projection into the LM.
* `ScaleInvariantConnector` — PA-LLaVA's scale-invariant connector (Dai et al. 2024; github.com/ddw2AIGROUP2CQUPT/
  PA-LLaVA `xtuner_add/pallava/projector.py` `QFormerConnector`): the tokens of the downscaled image are the
  queries of a Q-Former that cross-attends to the full-resolution tokens, so M is fixed while nothing is lost to the
  downscaling.
* `VisualAbstractor` — mPLUG-Owl's visual abstractor (Ye et al. 2023; X-PLUG/mPLUG-Owl `mplug_owl_video`), the
  connector of Youku-mPLUG's mPLUG-video: learned (and, for video, temporal) queries cross-attend to [queries ;
  all frames' tokens] through SwiGLU layers, then into the LM with a learned end-of-vision token.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def grid_side(num_tokens: int, who: str) -> int:
    """g with g * g = num_tokens, or a ValueError: the connectors that read the grid need a square one."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(
            f"{who} reads a square grid of patch tokens but got {num_tokens}, which is not a perfect square; "
            "pass the tower's patch tokens alone (no CLS token) from a square image"
        )
    return side


def tokens_to_grid(tokens: Tensor, who: str) -> Tensor:
    """[B, g * g, C] in row-major order -> [B, C, g, g] for the 2D pooling."""
    side = grid_side(tokens.shape[1], who)
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def mlp2x_gelu(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear(in, out) -> GELU -> Linear(out, out): LLaVA-1.5's `mlp2x_gelu` and InfMLLM's `Pooler.mlp`."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class Connector(nn.Module):
    """Base class: [B, N, in_dim] -> [B, num_tokens(N), out_dim]. `set_progress(fraction)` (0 at the start of
    training, 1 at the end) is a no-op here; connectors whose state follows training override it."""

    def num_tokens(self, num_input_tokens: int) -> int:
        """M for N input tokens; every connector defines it (the base class is abstract)."""
        raise NotImplementedError(f"{type(self).__name__} must define num_tokens(num_input_tokens)")

    def set_progress(self, fraction: float) -> None:
        """No state follows the training progress in this connector."""


class LinearConnector(Connector):
    """One linear map from image features to soft prompts (module doc).

    Args:
        in_dim, out_dim: the tower's token width, the LM's embedding width.
        mode: "tokens" maps every grid token on its own, M = N (LiMBeR's CLIP RN50x16: 144 prompts, and BEIT:
            196 prompts; LLaVA-1's projection); "pooled" averages the tokens and maps the vector to `num_prompts`
            prompts with one Linear(in, num_prompts * out) (LiMBeR's NF-ResNet50, whose released config uses 1).
        num_prompts: k in the "pooled" mode (unused in the "tokens" mode).
        dropout: on the prompts after the map (LiMBeR's `image_embed_dropout_prob`, 0.1 in all its configs; LLaVA
            has none: set 0).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        mode: Literal["tokens", "pooled"] = "tokens",
        num_prompts: int = 1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if mode not in ("tokens", "pooled"):
            raise ValueError(f"mode must be 'tokens' or 'pooled', got {mode!r}")
        if num_prompts < 1:
            raise ValueError(f"num_prompts={num_prompts} gives no soft prompt; use num_prompts >= 1")
        self.mode = mode
        self.num_prompts = num_prompts
        self.out_dim = out_dim
        self.proj = nn.Linear(in_dim, out_dim * (num_prompts if mode == "pooled" else 1))
        self.dropout = nn.Dropout(dropout)

    def num_tokens(self, num_input_tokens: int) -> int:
        return self.num_prompts if self.mode == "pooled" else num_input_tokens

    def forward(self, tokens: Tensor) -> Tensor:
        if self.mode == "pooled":
            # LiMBeR's NF-ResNet50: AdaptiveAvgPool2d((1, 1)) of the map, then "b (s d) -> b s d"
            prompts = self.proj(tokens.mean(dim=1)).view(tokens.shape[0], self.num_prompts, self.out_dim)
        else:
            prompts = self.proj(tokens)
        return self.dropout(prompts)


class MLPConnector(Connector):
    """LLaVA-1.5's `mlp2x_gelu`: Linear(in, out) -> GELU -> Linear(out, out) on every token, M = N."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = mlp2x_gelu(in_dim, out_dim)

    def num_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens

    def forward(self, tokens: Tensor) -> Tensor:
        return self.mlp(tokens)


class PoolAdapter(Connector):
    """InfMLLM's pool-adapter: average-pool the g x g grid to `pool_size` x `pool_size`, then Linear -> GELU ->
    Linear, M = pool_size ** 2 in row-major order.

    Pooling comes first, as in the official `Pooler.forward`, so the MLP runs on s * s tokens, not g * g. The
    official code averages non-overlapping (g / s) x (g / s) blocks and raises when s does not divide g (its
    `adaptive_avg_pool2d` branch is commented out); `F.adaptive_avg_pool2d` gives the same numbers when s divides g
    and PyTorch's overlapping cells otherwise. The paper's s depends on the stage and image size (the released code
    reads it from `args.pool_out_size`); the default 4 here is small, for tests and tiny towers.
    """

    def __init__(self, in_dim: int, out_dim: int, pool_size: int = 4) -> None:
        super().__init__()
        if pool_size < 1:
            raise ValueError(f"pool_size={pool_size} pools to no token; use pool_size >= 1")
        self.pool_size = pool_size
        self.mlp = mlp2x_gelu(in_dim, out_dim)

    def num_tokens(self, num_input_tokens: int) -> int:
        side = grid_side(num_input_tokens, type(self).__name__)
        if self.pool_size > side:
            raise ValueError(
                f"pool_size={self.pool_size} is larger than the {side} x {side} token grid; "
                f"use pool_size <= {side} (pooling compresses, it does not upsample)"
            )
        return self.pool_size**2

    def forward(self, tokens: Tensor) -> Tensor:
        self.num_tokens(tokens.shape[1])
        pooled = F.adaptive_avg_pool2d(tokens_to_grid(tokens, type(self).__name__), self.pool_size)
        return self.mlp(pooled.flatten(2).transpose(1, 2))


def bipartite_merge(tokens: Tensor, sizes: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """One round of ToMe's bipartite soft matching (Bolya et al. 2023, sec. 3, "Token Merging"): alternate tokens
    into A (even positions) and B (odd), draw from each A token an edge to its most cosine-similar B token, keep the
    r most similar edges and merge those A tokens into their B partners by the size-weighted average; the sizes add
    up. Returns ([unmerged A tokens, B tokens] [B, n - r, C], their sizes [B, n - r, 1]). sum(size * x) and the
    total size are unchanged, so the size-weighted mean of the tokens is kept exactly (ToMe's `merge_wavg`)."""
    metric = F.normalize(tokens, dim=-1)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
    best, best_index = scores.max(dim=-1)
    # stable: equal similarities merge the earlier A token first, so the result depends on nothing but the input
    edges = best.argsort(dim=-1, descending=True, stable=True)[..., None]
    kept, merged = edges[:, r:], edges[:, :r]
    into = best_index[..., None].gather(1, merged)

    def merge(values: Tensor) -> Tensor:
        channels = values.shape[-1]
        a, b = values[:, ::2], values[:, 1::2]
        sources = a.gather(1, merged.expand(-1, -1, channels))
        b = b.scatter_reduce(1, into.expand(-1, -1, channels), sources, reduce="sum")
        return torch.cat([a.gather(1, kept.expand(-1, -1, channels)), b], dim=1)

    weighted, sizes = merge(tokens * sizes), merge(sizes)
    return weighted / sizes, sizes


class TokenMergingConnector(Connector):
    """SimVLG's gradual token merging as a connector: merge the tower's N tokens down to a count that falls with
    the training progress, then project them (module doc).

    SimVLG's abstract says the one-stage model "gradually merg[es] similar visual tokens during training", with ToMe
    as the merging; the paper's full text (where the merging sits, the exact schedule) was not readable here, so the
    schedule is an assumption stated as such: the count falls linearly from N at progress 0 to `final_tokens` at
    progress 1, count = round(N - progress * (N - final_tokens)), and evaluation (`self.training` False) always uses
    `final_tokens`. One ToMe round merges at most half the tokens (|A| = ceil(n / 2)), so the merge repeats rounds
    of r = min(n - count, n // 2) until it reaches the count. The similarity is the cosine of the token features
    (ToMe uses attention keys; a frozen tower's output has none to offer here). The output order is ToMe's:
    unmerged A tokens, then B tokens.

    Args:
        in_dim, out_dim: the tower's token width, the LM's embedding width.
        final_tokens: the count at the end of training and at evaluation.
        projection: "mlp" (LLaVA-1.5's `mlp2x_gelu`) or "linear" after the merging.
    """

    def __init__(
        self, in_dim: int, out_dim: int, final_tokens: int = 4, projection: Literal["mlp", "linear"] = "mlp"
    ) -> None:
        super().__init__()
        if final_tokens < 1:
            raise ValueError(f"final_tokens={final_tokens} leaves no token; use final_tokens >= 1")
        if projection not in ("mlp", "linear"):
            raise ValueError(f"projection must be 'mlp' or 'linear', got {projection!r}")
        self.final_tokens = final_tokens
        self.progress = 0.0
        self.proj = mlp2x_gelu(in_dim, out_dim) if projection == "mlp" else nn.Linear(in_dim, out_dim)

    def set_progress(self, fraction: float) -> None:
        """fraction of training done: 0 keeps all N tokens, 1 merges down to `final_tokens`."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"training progress must lie in [0, 1], got {fraction}; pass step / total_steps")
        self.progress = float(fraction)

    def num_tokens(self, num_input_tokens: int) -> int:
        if self.final_tokens > num_input_tokens:
            raise ValueError(
                f"final_tokens={self.final_tokens} is more than the {num_input_tokens} input tokens; "
                f"use final_tokens <= {num_input_tokens}"
            )
        if not self.training:
            return self.final_tokens
        return round(num_input_tokens - self.progress * (num_input_tokens - self.final_tokens))

    def merge(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """[B, N, C] -> (merged tokens [B, num_tokens(N), C], how many input tokens each holds [B, M, 1])."""
        target = self.num_tokens(tokens.shape[1])
        sizes = tokens.new_ones(tokens.shape[0], tokens.shape[1], 1)
        while tokens.shape[1] > target:
            count = tokens.shape[1]
            tokens, sizes = bipartite_merge(tokens, sizes, min(count - target, count // 2))
        return tokens, sizes

    def forward(self, tokens: Tensor) -> Tensor:
        return self.proj(self.merge(tokens)[0])


def qformer(
    hidden_size: int, encoder_hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
    intermediate_size: int, cross_attention_frequency: int, dropout: float,
) -> nn.Module:
    """A randomly initialised BLIP-2 Q-Former (queries only, no text input) reading tokens of `encoder_hidden_size`."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel  # imported here: transformers is slow to import

    if hidden_size % num_attention_heads:
        raise ValueError(
            f"Q-Former width {hidden_size} is not divisible by its {num_attention_heads} heads; pick heads dividing it"
        )
    config = Blip2QFormerConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        cross_attention_frequency=cross_attention_frequency,
        encoder_hidden_size=encoder_hidden_size,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return Blip2QFormerModel(config)


class QueryResampler(Connector):
    """BLIP-2's Q-Former as a resampler: `num_queries` learned queries (normal, std 0.02, as BLIP-2's
    `query_tokens`) self-attend and cross-attend to the tokens, then a Linear into the LM (BLIP-2 sec. 3.3, "a
    fully-connected layer to linearly project the output query embeddings Z into the same dimension as the text
    embedding of the LLM"). M = num_queries whatever N is. Defaults are BLIP-2's: 32 queries, a BERT-base width and
    depth, cross-attention in every other block.

    Args:
        in_dim, out_dim: the tower's token width (the Q-Former's `encoder_hidden_size`), the LM's embedding width.
        num_queries, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
            cross_attention_frequency, dropout: the Q-Former (`Blip2QFormerConfig`).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_queries: int = 32,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        cross_attention_frequency: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"num_queries={num_queries} gives no output token; use num_queries >= 1")
        self.queries = nn.Parameter(torch.randn(1, num_queries, hidden_size) * 0.02)
        self.qformer = qformer(
            hidden_size, in_dim, num_hidden_layers, num_attention_heads, intermediate_size,
            cross_attention_frequency, dropout,
        )
        self.proj = nn.Linear(hidden_size, out_dim)

    def num_tokens(self, num_input_tokens: int) -> int:
        return self.queries.shape[1]

    def forward(self, tokens: Tensor) -> Tensor:
        queries = self.queries.expand(tokens.shape[0], -1, -1)
        return self.proj(self.qformer(query_embeds=queries, encoder_hidden_states=tokens).last_hidden_state)


class ScaleInvariantConnector(Connector):
    """PA-LLaVA's scale-invariant connector (module doc): queries from the downscaled image, keys and values from
    the full-resolution tokens, M = query_grid ** 2 whatever the resolution.

    In PA-LLaVA (`QFormerConnector.forward` and `LLaVAModel.forward` in `model.py`) an image is seen twice by the
    PLIP tower: resized to 224 (14 x 14 = 196 tokens, the queries) and cut into 224-pixel crops at native
    resolution (all crop tokens, padded crops masked out, are the keys). A BLIP-2-style Q-Former as wide as the
    tower (6 layers, cross-attention in every layer: `pallava_domain_alignment.py`) reads the crops; the output is
    LayerNorm(Q-Former(queries) + queries), then the projector (depth 1 there: one Linear). The downscaling costs
    nothing because the crops keep every native-resolution token, and the LM always gets 196 tokens.

    `forward(tokens)` alone stands in for the resized view by average-pooling the tokens' grid to `query_grid` x
    `query_grid` (the feature-space counterpart of resizing the image; identity when the grid already is that
    size) and cross-attends to all the tokens. `forward(tokens, crop_tokens, crop_mask)` is PA-LLaVA's form: `tokens`
    are the resized view's, `crop_tokens` [B, S, in_dim] the crops', `crop_mask` [B, S] True on real crop tokens.
    PA-LLaVA's Q-Former is its own BERT copy whose input LayerNorm has no affine weights; `Blip2QFormerModel`'s has
    them (initialised to the identity), otherwise the blocks are the same.

    Args:
        in_dim, out_dim: the tower's token width (also the Q-Former's), the LM's embedding width.
        query_grid: side of the query grid (PA-LLaVA: 14).
        num_hidden_layers, num_attention_heads, cross_attention_frequency, dropout: the Q-Former (PA-LLaVA: 6, 12
            (BERT-base), 1, 0.1).
        intermediate_size: the Q-Former's MLP width (default 4 * in_dim, BERT-base's ratio).
        projector_depth: Linear, then (GELU, Linear) * (depth - 1) into the LM (PA-LLaVA: 1).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        query_grid: int = 14,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 12,
        intermediate_size: int | None = None,
        cross_attention_frequency: int = 1,
        dropout: float = 0.1,
        projector_depth: int = 1,
    ) -> None:
        super().__init__()
        if query_grid < 1:
            raise ValueError(f"query_grid={query_grid} gives no query; use query_grid >= 1")
        if projector_depth < 1:
            raise ValueError(f"projector_depth={projector_depth} has no layer; use projector_depth >= 1")
        self.query_grid = query_grid
        self.qformer = qformer(
            in_dim, in_dim, num_hidden_layers, num_attention_heads, intermediate_size or 4 * in_dim,
            cross_attention_frequency, dropout,
        )
        self.norm = nn.LayerNorm(in_dim, eps=1e-12)
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(projector_depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.proj = nn.Sequential(*layers)

    def num_tokens(self, num_input_tokens: int) -> int:
        grid_side(num_input_tokens, type(self).__name__)
        return self.query_grid**2

    def forward(self, tokens: Tensor, crop_tokens: Tensor | None = None, crop_mask: Tensor | None = None) -> Tensor:
        grid = tokens_to_grid(tokens, type(self).__name__)
        queries = F.adaptive_avg_pool2d(grid, self.query_grid).flatten(2).transpose(1, 2)
        if crop_tokens is None:
            if crop_mask is not None:
                raise ValueError("crop_mask masks crop_tokens: pass crop_tokens=[B, S, in_dim] too, or no crop_mask")
            crop_tokens = tokens
        attended = self.qformer(
            query_embeds=queries,
            encoder_hidden_states=crop_tokens,
            encoder_attention_mask=None if crop_mask is None else crop_mask.long(),
        ).last_hidden_state
        return self.proj(self.norm(attended + queries))


class AbstractorLayer(nn.Module):
    """One layer of mPLUG-Owl's visual abstractor (X-PLUG/mPLUG-Owl `modeling_mplug_owl.py`,
    `MplugOwlVisualAbstractorLayer`): cross-attention only, pre-LN, the keys and values the concatenation
    [LN1(queries) ; LNk(visual tokens)]; the residual is taken from the normalised queries, then a SwiGLU MLP with
    a LayerNorm inside, w2(LN(SiLU(w1 x) * w3 x)), on its own pre-LN residual."""

    def __init__(self, width: int, heads: int, intermediate_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.normk, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.w1, self.w3 = nn.Linear(width, intermediate_size), nn.Linear(width, intermediate_size)
        self.ffn_ln = nn.LayerNorm(intermediate_size)
        self.w2 = nn.Linear(intermediate_size, width)

    def forward(self, queries: Tensor, tokens: Tensor) -> Tensor:
        queries = self.norm1(queries)
        context = torch.cat([queries, self.normk(tokens)], dim=1)
        queries = queries + self.attention(queries, context, context, need_weights=False)[0]
        hidden = self.norm2(queries)
        return queries + self.w2(self.ffn_ln(F.silu(self.w1(hidden)) * self.w3(hidden)))


class VisualAbstractor(Connector):
    """mPLUG-Owl's visual abstractor (Ye et al. 2023, sec. 3.1: "learnable tokens ... to summarize the visual
    information" of the ViT's patch tokens), as its video form (`mplug_owl_video`) builds it, the abstractor of
    Youku-mPLUG's mPLUG-video (Xu et al. 2023).

    `num_queries` learned queries and, for video, `num_temporal_queries` more go together through `depth`
    `AbstractorLayer`s over the visual tokens (a clip's frames flattened into one key set, T x N tokens; an image
    is one frame); the queries' outputs go through `visual_fc` into the LM width and, in the video form, the
    temporal queries' outputs through their own `temporal_fc`, summed into the first (official `MplugOwlModel`:
    `temporal_visual_fc`); a learned end-of-vision token (`vit_eos`) is appended: M = num_queries + 1 whatever N is.
    The release: 64 + 64 queries, 6 layers of width 1024 with 16 heads, SwiGLU width 2816 (2/3 of 4096 rounded up
    to 256), attention dropout 0.1, on a ViT-L/14 whose width (1024) is the abstractor's.

    Deliberate changes: a tower of another width than `width` is first mapped by one Linear (the release's
    concatenation needs equal widths); the queries are drawn normal with std 0.02 (BLIP-2's `query_tokens`), where
    the release creates them as zeros and a checkpoint sets them: equal queries would stay equal under training;
    the mplug_owl_video tower's temporal convolution adapters inside every ViT layer are not built here (the
    tower is the suite's frozen image tower).

    Args:
        in_dim, out_dim: the tower's token width, the LM's embedding width.
        num_queries: the learned queries (and M - 1).
        num_temporal_queries: the video form's extra queries (0: mPLUG-Owl's image abstractor).
        width, depth, heads, intermediate_size, dropout: the layers.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_queries: int = 8,
        num_temporal_queries: int = 8,
        width: int = 64,
        depth: int = 2,
        heads: int = 2,
        intermediate_size: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_queries < 1 or num_temporal_queries < 0 or depth < 1:
            raise ValueError(f"VisualAbstractor num_queries={num_queries}, num_temporal_queries="
                             f"{num_temporal_queries}, depth={depth}: need at least one query and one layer, and no "
                             "negative count; e.g. num_queries: 64, num_temporal_queries: 64, depth: 6")
        self.input_proj = nn.Identity() if in_dim == width else nn.Linear(in_dim, width)
        self.queries = nn.Parameter(torch.randn(1, num_queries, width) * 0.02)
        self.temporal_queries = nn.Parameter(torch.randn(1, num_temporal_queries, width) * 0.02) \
            if num_temporal_queries else None
        self.layers = nn.ModuleList(AbstractorLayer(width, heads, intermediate_size, dropout) for _ in range(depth))
        self.visual_fc = nn.Linear(width, out_dim)
        self.temporal_fc = nn.Linear(width, out_dim) if num_temporal_queries else None
        self.eos = nn.Parameter(torch.randn(1, 1, out_dim) * 0.02)

    def num_tokens(self, num_input_tokens: int) -> int:
        return self.queries.shape[1] + 1

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens [B, N, in_dim] (a clip's frames flattened: N = T x patches) -> [B, num_queries + 1, out_dim]."""
        batch, count = tokens.shape[0], self.queries.shape[1]
        queries = self.queries if self.temporal_queries is None else torch.cat([self.queries,
                                                                               self.temporal_queries], dim=1)
        queries = queries.to(tokens.dtype).expand(batch, -1, -1)
        context = self.input_proj(tokens)
        for layer in self.layers:
            queries = layer(queries, context)
        out = self.visual_fc(queries[:, :count])
        if self.temporal_fc is not None:
            out = out + self.temporal_fc(queries[:, count:])
        return torch.cat([out, self.eos.to(out.dtype).expand(batch, -1, -1)], dim=1)
