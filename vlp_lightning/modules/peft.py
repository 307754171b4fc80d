"""Parameter-efficient tuning blocks for the timm ViT inside a frozen `VisionEncoder`: visual prompts (VPT), low-rank
updates (LoRA) and bottleneck adapters (AdaptFormer). Each adds a few trainable tensors to a backbone whose own
weights stay frozen and bit-identical; after `apply_peft` the encoder's `forward` / `forward_tokens` (and every
method reading `vision.model.blocks(x)`) compute the adapted features, the prompt tokens already dropped.

* VPT (Jia et al. 2022, "Visual Prompt Tuning", sec. 3.2), with x_0 the class token and E_0 the patch embeddings:
  shallow: [x_1, Z_1, E_1] = L_1([x_0, P, E_0]) and [x_i, Z_i, E_i] = L_i([x_{i-1}, Z_{i-1}, E_{i-1}]) for i > 1:
  P learned tokens inserted after the class (and register) tokens at the input of the first block, without a position
  embedding; deep: [x_i, _, E_i] = L_i([x_{i-1}, P_{i-1}, E_{i-1}]): new tokens before every block, the previous
  block's outputs at those positions discarded. The prompts are dropped after the last block (the final LayerNorm
  acts per token, so before or after it is the same), so the class token or the patch mean pools as without prompts.
  Init as the official code (`src/models/vit_prompt/vit.py`): uniform in +-sqrt(6 / (3 * patch_h * patch_w + width))
  ("xavier_uniform" on the patch projection's fan-in); its default prompt dropout 0 and no prompt projection.
* LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3 and sec. 4.1):
  h = W_0 x + (alpha / r) B A x on chosen Linear layers (default the fused attention `qkv` of every block: W_q, W_k and
  W_v at once, where sec. 7.1 finds W_q and W_v enough), A [r, in] Kaiming-uniform (a = sqrt(5), as nn.Linear and
  the official `loralib`), B [out, r] zero, so training starts from the frozen model; dropout on x before A (Hugging
  Face `peft`'s `lora_dropout`). `merge_lora` folds W_0 + (alpha / r) B A into plain Linear layers for inference.
* Adapter (Chen et al. 2022, "AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition", eq. 1-2):
  a bottleneck x~ = ReLU(LN(x') W_down) W_up in parallel to each block's MLP, x = MLP(LN(x')) + s x~ + x', s = 0.1,
  bottleneck 64, dropout 0.1 after the ReLU, W_down Kaiming-uniform, W_up and both biases zero (official
  `models/adapter.py`, init "lora"); it reads the MLP's (normalised) input as the paper's equation, where the official
  code reads the block's residual stream before the norm. `adapter_position="sequential"` puts it after the MLP,
  y = MLP(LN(x')) + s x~(y) (AdaptFormer's sequential variant, the placement of Houlsby et al. 2019's adapter after the
  feed-forward layer; Houlsby's second adapter, after attention, is not added).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal, get_args

import torch
from torch import Tensor, nn

PEFTKind = Literal["linear", "vpt_shallow", "vpt_deep", "lora", "adapter"]
AdapterPosition = Literal["parallel", "sequential"]
#: the kinds `apply_peft` knows; "linear" adds nothing (a linear probe: only a head on top trains).
PEFT_KINDS: tuple[str, ...] = get_args(PEFTKind)


# ---------------------------------------------------------------------------------------------------------- VPT
class PromptedBlocks(nn.Sequential):
    """A ViT's blocks (the same modules, under the same state-dict keys) with VPT prompts `prompts`
    [layers, P, width]: one layer of prompts for VPT-shallow, one per block for VPT-deep (module doc)."""

    def __init__(self, blocks: nn.Sequential, num_prefix_tokens: int, prompts: Tensor) -> None:
        super().__init__(*blocks)
        self.num_prefix_tokens = num_prefix_tokens
        self.prompts = nn.Parameter(prompts)

    def forward(self, x: Tensor) -> Tensor:
        """[N, prefix + L, width] -> [N, prefix + L, width], the prompts inside the blocks only."""
        prefix, count = self.num_prefix_tokens, self.prompts.shape[1]
        for index, block in enumerate(self):
            if index < len(self.prompts):  # shallow: insert once; deep: replace before every block
                prompt = self.prompts[index].to(x.dtype).expand(x.shape[0], -1, -1)
                rest = x[:, prefix + count:] if index else x[:, prefix:]
                x = torch.cat([x[:, :prefix], prompt, rest], dim=1)
            x = block(x)
        return torch.cat([x[:, :prefix], x[:, prefix + count:]], dim=1)


def add_visual_prompts(vision: nn.Module, num_prompts: int, deep: bool) -> list[nn.Parameter]:
    """VPT-shallow (`deep=False`) or VPT-deep prompts in `vision.model.blocks`; -> the new parameters."""
    model = _vit(vision, "VPT prompts")
    if num_prompts < 1:
        raise ValueError(f"VPT needs at least one prompt token, got num_prompts={num_prompts}")
    if model.grad_checkpointing:
        raise ValueError("VPT prompts live in the ViT's blocks, which grad checkpointing bypasses; build the "
                         "pretrained VisionEncoder with grad_checkpointing=false")
    patch_h, patch_w = model.patch_embed.patch_size
    width = model.embed_dim
    bound = math.sqrt(6.0 / (3 * patch_h * patch_w + width))
    layers = len(model.blocks) if deep else 1
    prompts = torch.empty(layers, num_prompts, width, device=model.patch_embed.proj.weight.device)
    prompts.uniform_(-bound, bound)
    model.blocks = PromptedBlocks(model.blocks, model.num_prefix_tokens, prompts)
    return [model.blocks.prompts]


# --------------------------------------------------------------------------------------------------------- LoRA
class LowRankUpdate(nn.Module):
    """(alpha / r) B A dropout(x): the trainable part of a LoRA layer (module doc)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA needs a rank of at least 1, got lora_rank={rank}")
        self.a = nn.Parameter(torch.empty(rank, in_features))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.b = nn.Parameter(torch.zeros(out_features, rank))
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(x) @ self.a.T @ self.b.T * self.scaling

    def delta_weight(self) -> Tensor:
        """(alpha / r) B A, [out, in]: what merging adds to W_0."""
        return self.b @ self.a * self.scaling


class LoRALinear(nn.Module):
    """A frozen `base` Linear plus its low-rank update: h = W_0 x + b + (alpha / r) B A x (eq. 3)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.lora = LowRankUpdate(base.in_features, base.out_features, rank, alpha, dropout).to(base.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora(x)

    def merged(self) -> nn.Linear:
        """A plain Linear computing the same function (W_0 + (alpha / r) B A, the same bias), for inference."""
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        linear = linear.to(device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.base.weight + self.lora.delta_weight().to(self.base.weight.dtype))
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        return linear.requires_grad_(self.base.weight.requires_grad)


def add_lora(vision: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]) -> list[nn.Parameter]:
    """Wrap every Linear of `vision.model` whose name ends with one of `targets` (e.g. "attn.qkv", matched by whole
    name parts as Hugging Face `peft`'s `target_modules`) in a `LoRALinear`; -> the new parameters."""
    return add_lora_to(vision.model, rank, alpha, dropout, targets,
                       "a timm ViT's attention is attn.qkv, its MLP mlp.fc1 / mlp.fc2")


def add_lora_to(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str], hint: str
                ) -> list[nn.Parameter]:
    """`add_lora` on any module (a language model's `q_proj` / `v_proj`); `hint` names the model's layers for the
    error when `targets` matches none."""
    chosen = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)
              and any(name == target or name.endswith(f".{target}") for target in targets)]
    if not chosen:
        raise ValueError(f"lora_targets={list(targets)} names no Linear layer of the {type(model).__name__} ({hint})")
    params = []
    for name in chosen:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        layer = LoRALinear(getattr(owner, child), rank, alpha, dropout)
        setattr(owner, child, layer)
        params += list(layer.lora.parameters())
    return params


def merge_lora(module: nn.Module) -> int:
    """Replace every `LoRALinear` under `module` by its merged Linear, in place; -> how many were merged."""
    merged = [(name, layer) for name, layer in module.named_modules() if isinstance(layer, LoRALinear)]
    for name, layer in merged:
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent), child, layer.merged())
    return len(merged)


# ------------------------------------------------------------------------------------------------------ adapter
class Bottleneck(nn.Module):
    """s * W_up dropout(ReLU(W_down x)), W_up zero at the start (AdaptFormer's adapter without its residual)."""

    def __init__(self, width: int, bottleneck: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, width)
        self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        for tensor in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(tensor)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.dropout(self.act(self.down(x)))) * self.scale


class AdaptedMLP(nn.Module):
    """A frozen block MLP `base` with a bottleneck adapter in parallel (MLP(h) + adapter(h)) or after it
    (y + adapter(y), y = MLP(h))."""

    def __init__(self, base: nn.Module, adapter: Bottleneck, position: AdapterPosition) -> None:
        super().__init__()
        if position not in get_args(AdapterPosition):
            raise ValueError(f"adapter_position must be 'parallel' or 'sequential', got {position!r}")
        self.base = base
        self.adapter = adapter
        self.position = position

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        return y + self.adapter(x if self.position == "parallel" else y)


def add_adapters(vision: nn.Module, bottleneck: int, scale: float, dropout: float,
                 position: AdapterPosition) -> list[nn.Parameter]:
    """An adapter at the MLP of every block of `vision.model`; -> the new parameters."""
    model = _vit(vision, "adapters")
    params = []
    for block in model.blocks:
        adapter = Bottleneck(model.embed_dim, bottleneck, scale, dropout).to(model.patch_embed.proj.weight.device)
        block.mlp = AdaptedMLP(block.mlp, adapter, position)
        params += list(adapter.parameters())
    return params


# ------------------------------------------------------------------------------------------------------- shared
def apply_peft(
    vision: nn.Module,
    kind: PEFTKind,
    *,
    num_prompts: int,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float,
    lora_targets: list[str],
    adapter_bottleneck: int,
    adapter_scale: float,
    adapter_dropout: float,
    adapter_position: AdapterPosition,
) -> list[nn.Parameter]:
    """Freeze `vision` (a `VisionEncoder`) and add the PEFT modules of `kind`; -> the new, trainable parameters
    (none for "linear")."""
    if kind not in PEFT_KINDS:
        raise ValueError(f"peft={kind!r} is not a PEFT kind; choose one of {', '.join(PEFT_KINDS)}")
    vision.requires_grad_(False)
    if kind in ("vpt_shallow", "vpt_deep"):
        return add_visual_prompts(vision, num_prompts, deep=kind == "vpt_deep")
    if kind == "lora":
        return add_lora(vision, lora_rank, lora_alpha, lora_dropout, lora_targets)
    if kind == "adapter":
        return add_adapters(vision, adapter_bottleneck, adapter_scale, adapter_dropout, adapter_position)
    return []


def peft_modules(module: nn.Module) -> Iterator[nn.Module]:
    """The PEFT blocks under `module` whose mode matters (their dropout), for training them in a frozen, eval-mode
    backbone."""
    return (child for child in module.modules() if isinstance(child, (LowRankUpdate, Bottleneck)))


def _vit(vision: nn.Module, what: str) -> nn.Module:
    model = getattr(vision, "model", None)
    if not all(hasattr(model, name) for name in ("blocks", "patch_embed", "num_prefix_tokens", "embed_dim")):
        raise ValueError(f"{what} need a timm ViT image tower (model_name vit_*), not {type(model).__name__}")
    return model
