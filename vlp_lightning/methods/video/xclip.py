"""X-CLIP (Ni et al. 2022, "Expanding Language-Image Pretrained Models for General Video Recognition").

An image CLIP becomes a video-text model with three additions (sec. 3; official code microsoft/VideoX, X-CLIP/models):

1. Cross-frame communication (sec. 3.2, the "cross-frame communication transformer"). In every block l of the
   image tower, each frame's class token z_{t,cls} gives a message token, the T message tokens of a clip exchange
   information, and each frame attends to its own patches plus its message token:

       m_t = W_l z_{t,cls}^(l-1)                                   one message token per frame
       M̂ = M + CFA(LN(M)),  M = [m_1 .. m_T]                       cross-frame fusion attention, over time
       [ẑ_t, _] = [z_t, m̂_t] + IFA(LN([z_t, m̂_t]))                 intra-frame diffusion: the block's own attention
       z_t^(l) = ẑ_t + FFN(LN(ẑ_t))                                the block's own MLP; the message is dropped

   IFA and FFN are the pretrained block's attention and MLP (timm ViT `Block`: norm1/attn/ls1, norm2/mlp/ls2), so
   only W_l and CFA are new per block.
2. The multi-frame integration transformer (sec. 3.2, MIT): the projected class tokens e_t of the frames,
   V = mean_t( MIT(e + p) + e ), p a learned temporal position embedding (official `mit.py`: the residual to the
   input without p, then the mean over frames).
3. The video-specific prompt generator (sec. 3.3): each text embedding c attends to the clip's visual tokens z̄
   (the patch tokens, normalised and projected into the joint space, averaged over frames as the official
   `encode_video` / `forward` do), C̄ = C + CrossAttn(LN(C), z̄), C̃ = C̄ + FFN(LN(C̄)), and ĉ = c + α ⊙ C̃ with a
   learned per-channel α initialised to 0.1 (official `VideoSpecificPrompt`, `prompts_alpha=1e-1`, 2 layers).

The objective (sec. 3.4) scores a video against each text by cos(V, ĉ) times the learned temperature. The paper
trains it as a classifier over the label texts; pretraining on captions here, every caption of the batch is a
candidate and the base's symmetric InfoNCE applies to the [B, B] logits of `video_text_logits` (text j conditioned
on video i). The start is an image CLIP (`pretrained_clip`); the new layers start small (truncated normal, std
0.02, as the official init) and train at `new_layers_lr` (official: 10x the CLIP learning rate for "message_",
"mit" and "prompts").

Scale: DDP. FSDP (1 or 2) gathers a wrapped block's weights in the block's forward, which the message tokens
bypass (they call each block's attention and MLP); under FSDP2 `configure_model` stops with that sentence.

Not confirmed from the paper: the equation numbering (sections are cited instead); whether the prompt's visual
tokens are read before or after the tower's final norm (the official code takes them before `ln_post` and normalises
them with its own LayerNorm; here after the final norm, then that LayerNorm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from vlp_lightning.catalog import Paper
from vlp_lightning.methods.base import WarmupCosineLR
from vlp_lightning.methods.video.base import VideoTextMethod
from vlp_lightning.modules.tokenizers import Tokenizer
from vlp_lightning.modules.vision import VisionEncoder


def heads_of(width: int) -> int:
    """Attention heads of a new layer: one per 64 channels, as the official code sizes them (at least one)."""
    return max(1, width // 64)


def _init_small(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) weights and zero biases for new layers (official `_init_weights`)."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class CrossFrameCommunication(nn.Module):
    """The message-token layers of every block of a timm ViT: W_l, LN and CFA per block (module doc, item 1)."""

    def __init__(self, width: int, depth: int, heads: int) -> None:
        super().__init__()
        self.message_fc = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.message_norm = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.message_attention = nn.ModuleList(nn.MultiheadAttention(width, heads, batch_first=True)
                                               for _ in range(depth))
        self.apply(_init_small)

    def forward(self, vision: VisionEncoder, video: Tensor) -> tuple[Tensor, Tensor]:
        """video [B, T, 3, H, W] -> (pooled class features [B, T, width], patch tokens [B, T, L, width])."""
        model = vision.model
        batch, frames = video.shape[:2]
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(video.flatten(0, 1)))))
        layers = zip(model.blocks, self.message_fc, self.message_norm, self.message_attention)
        for block, message_fc, message_norm, message_attention in layers:
            messages = message_fc(x[:, 0]).view(batch, frames, -1)              # m_t = W z_{t,cls}   [B, T, w]
            normed = message_norm(messages)
            messages = messages + message_attention(normed, normed, normed, need_weights=False)[0]  # CFA
            joined = torch.cat([x, messages.flatten(0, 1).unsqueeze(1)], dim=1)  # [B*T, 1 + L + 1, w]
            x = x + block.drop_path1(block.ls1(block.attn(block.norm1(joined))[:, :-1]))  # IFA, message dropped
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        x = model.norm(x)
        pooled = model.forward_head(x).view(batch, frames, -1)
        return pooled, x[:, model.num_prefix_tokens:].reshape(batch, frames, -1, x.shape[-1])


class MultiFrameIntegration(nn.Module):
    """MIT: V = mean_t(Transformer(e + p) + e) over the frame embeddings e [B, T, D] (module doc, item 2)."""

    def __init__(self, num_frames: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.zeros(1, num_frames, width))
        trunc_normal_(self.positional_embedding, std=0.02)
        self.blocks = nn.Sequential(*(Block(width, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(layers)))
        self.blocks.apply(_init_small)

    def forward(self, frame_embeddings: Tensor) -> Tensor:
        frames = frame_embeddings.shape[1]
        if frames > self.positional_embedding.shape[1]:
            raise ValueError(f"MIT has position embeddings for {self.positional_embedding.shape[1]} frames, the clip "
                             f"has {frames}; build XCLIP with num_frames: {frames}")
        mixed = self.blocks(frame_embeddings + self.positional_embedding[:, :frames])
        return (mixed + frame_embeddings).mean(dim=1)


class PromptGeneratorLayer(nn.Module):
    """C̄ = C + CrossAttn(LN(C), z̄); C̃ = C̄ + FFN(LN(C̄)) (module doc, item 3)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.cross_attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, text: Tensor, visual: Tensor) -> Tensor:
        text = text + self.cross_attention(self.norm1(text), visual, visual, need_weights=False)[0]
        return text + self.mlp(self.norm2(text))


class VideoSpecificPrompt(nn.Module):
    """ĉ - c = α ⊙ C̃: text embeddings [V, K, D] attending to each video's visual tokens [V, L, D]."""

    def __init__(self, width: int, layers: int, heads: int, alpha: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.layers = nn.ModuleList(PromptGeneratorLayer(width, heads) for _ in range(layers))
        self.alpha = nn.Parameter(torch.full((width,), alpha))
        self.layers.apply(_init_small)

    def forward(self, text: Tensor, visual: Tensor) -> Tensor:
        visual = self.norm(visual)
        for layer in self.layers:
            text = layer(text, visual)
        return self.alpha * text


class XCLIP(VideoTextMethod):
    """Cross-frame message tokens, MIT and video-specific prompts on an image CLIP (module doc).

    Args:
        mit_layers: blocks of the multi-frame integration transformer (official default 1).
        prompt_layers: layers of the prompt generator (official 2).
        prompt_alpha: initial α of the prompt generator (official 0.1).
        new_layers_lr: learning rate of the message, MIT and prompt layers (official: 10x the base); None: the
            optimizer's.
        (the rest: see `VideoTextMethod`)
    """

    paper = Paper("Expanding Language-Image Pretrained Models for General Video Recognition", "Ni et al.", 2022,
                  note="the batch's captions are the candidate texts, where the paper classifies over label texts")
    no_weight_decay_names = ("positional_embedding",)

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        text: nn.Module | None = None,
        tokenizer: Tokenizer | None = None,
        embed_dim: int = 64,
        pretrained_clip: str | None = None,
        lock_text: bool = False,
        num_frames: int = 4,
        crop_scale: tuple[float, float] = (0.9, 1.0),
        mit_layers: int = 1,
        prompt_layers: int = 2,
        prompt_alpha: float = 0.1,
        new_layers_lr: float | None = None,
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(vision, text, tokenizer, embed_dim, pretrained_clip, lock_text, num_frames, crop_scale,
                         init_logit_scale, max_logit_scale, optimizer, lr_scheduler, compile)
        model = self.vision.model
        if not hasattr(model, "blocks") or getattr(model, "cls_token", None) is None:
            raise ValueError(f"XCLIP's message tokens need a timm ViT with a class token, not {type(model).__name__}; "
                             "use a vit_* model_name with the default class token")
        width, embed_dim = self.vision.num_features, self.embed_dim
        self.cross_frame = CrossFrameCommunication(width, len(model.blocks), heads_of(width))
        self.mit = MultiFrameIntegration(num_frames, embed_dim, mit_layers, heads_of(embed_dim))
        self.visual_token_norm = nn.LayerNorm(width)
        self.visual_token_projection = nn.Linear(width, embed_dim, bias=False)
        self.prompts = VideoSpecificPrompt(embed_dim, prompt_layers, heads_of(embed_dim), prompt_alpha)
        self.new_layers_lr = new_layers_lr

    def configure_model(self) -> None:
        """FSDP2 gathers a module's weights in its forward hooks; the message tokens call the tower's blocks piece
        by piece (`CrossFrameCommunication`), which those hooks never see: stop with the fix instead."""
        if self._device_mesh is not None:
            raise ValueError("XCLIP runs the image tower's blocks piecewise (message tokens), which FSDP2 sharding "
                             "does not support; train it with DDP (--config experiments/trainer/ddp.yaml)")
        super().configure_model()

    def new_layers(self) -> list[nn.Module]:
        return [self.cross_frame, self.mit, self.visual_token_norm, self.visual_token_projection, self.prompts]

    def parameter_groups(self) -> list[dict]:
        return self.parameter_groups_at(self.new_layers_lr, self.new_layers())

    def frame_features(self, video: Tensor) -> Tensor:
        return self.cross_frame(self.vision, video)[0]

    def pool_frames(self, frame_embeddings: Tensor) -> Tensor:
        return self.mit(frame_embeddings)

    def video_and_visual_tokens(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """video [B, T, 3, H, W] -> (unit video embeddings V [B, D], visual tokens z̄ [B, L, D] for the prompts)."""
        pooled, patches = self.cross_frame(self.vision, video)
        video_embedding = F.normalize(self.mit(self.image_projection(pooled)), dim=-1)
        visual = self.visual_token_projection(self.visual_token_norm(patches)).mean(dim=1)  # mean over frames
        return video_embedding, visual

    def video_text_logits(self, video: Tensor, text: dict[str, Tensor]) -> Tensor:
        """s cos(V_i, ĉ_{j|i}) [B_video, B_text]: each text j prompted with video i's tokens (sec. 3.3-3.4)."""
        video_embedding, visual = self.video_and_visual_tokens(video)
        texts = self.text_projection(self.text(text))                           # c   [K, D]
        texts = texts.unsqueeze(0).expand(video.shape[0], -1, -1)               # [V, K, D]
        prompted = F.normalize(texts + self.prompts(texts, visual), dim=-1)     # ĉ = c + α C̃
        return self.logit_scale.exp() * torch.einsum("vd,vkd->vk", video_embedding, prompted)
