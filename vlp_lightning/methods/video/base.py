"""The shared base of the video-language family: an image tower applied to every frame, a text tower, one joint
space (X-CLIP and HecVL are thin files on it).

`VideoTextMethod` is also the "frame-averaged CLIP" baseline those papers compare against (the mean pooling that
X-CLIP's ablations, Ni et al. 2022, replace by MIT; CLIP4Clip's meanP): for a clip x = (x_1 .. x_T) and a caption y,

    e_t = W_v f(x_t)                     [B, T, D]   per-frame embeddings (f: the image tower's pooled features)
    v = normalise(pool(e_1 .. e_T))      [B, D]      pool = mean over frames here; a method overrides `pool_frames`
    u = normalise(W_u g(y))              [B, D]      g: the text tower
    L = ½ (CE(s V Uᵀ, P) + CE(s U Vᵀ, Pᵀ))           CLIP's symmetric InfoNCE (Radford et al. 2021, Fig. 3)

with the learned temperature s (init 1/0.07, clamped at 100, as `CLIP`). P holds the positives: the diagonal, and
every pair of samples with the same caption (short clip captions repeat within a batch: BabyAI's missions, a moving
emoji's motion), each row's positives weighted uniformly (ALBEF's multi-positive targets, `momentum_targets` with
α = 0); with distinct captions it is exactly CLIP's loss (`losses.fusion.distilled_contrastive_loss`). The logits
are those of the local batch: a method whose text embedding depends on the video (X-CLIP's prompts) cannot gather
one side alone, so no method of the family gathers across ranks.

Pretrained start: `pretrained_clip` names a checkpoint of a suite CLIP-family method (`vlp fit`'s `last.ckpt`,
rebuilt with `vlp_lightning.pretrained.load_method`, weights only): its image and text towers, tokenizer,
projections and temperature become this method's, as X-CLIP starts from CLIP (sec. 3.1). New layers (X-CLIP's
message tokens, MIT, prompts) start near the identity, so the start behaves as the frame-averaged image CLIP.

Representations: `encode_video` / `encode_text` (the joint space: zero-shot recognition scores a clip against
class texts, `video_text_logits` with a method's own conditioning), `probe_features` (the tower's pooled features
averaged over frames, before the projection: what kNN and linear probes read; a still image [N, 3, H, W] is a
one-frame clip).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from data_modules.clip_views import ClipViews
from vlp_lightning.losses.fusion import distilled_contrastive_loss, momentum_targets
from vlp_lightning.methods.base import VLPMethod, WarmupCosineLR
from vlp_lightning.modules.text import TextTransformer
from vlp_lightning.modules.tokenizers import ByteTokenizer, Tokenizer
from vlp_lightning.modules.vision import VisionEncoder, tiny_vit


class VideoTextMethod(VLPMethod):
    """Per-frame image tower + text tower, frames mean-pooled, CLIP's loss (module doc).

    Args:
        vision: the image tower applied to every frame (default: `tiny_vit()`); ignored with `pretrained_clip`.
        text: the text tower (default: the built-in transformer, 2 layers of width 64); ignored with
            `pretrained_clip`.
        tokenizer: caption tokenizer (default: byte-level); ignored with `pretrained_clip`.
        embed_dim: size of the joint space; with `pretrained_clip`, the checkpoint's.
        pretrained_clip: checkpoint of a suite CLIP-family method to start from (module doc).
        lock_text: freeze the text tower (X-CLIP's official `MODEL.FIX_TEXT: True`).
        num_frames: frames sampled per clip (the views' `num_frames`; TSN-style segment sampling).
        crop_scale: area range of the one random crop drawn per clip.
        init_logit_scale, max_logit_scale: exp(logit scale) at the start and its clamp (CLIP sec. 2.5).
        optimizer, lr_scheduler, compile: see `VLPMethod`.
    """

    family = "video-language"
    view_kind = "clip"
    required_keys: tuple[str, ...] = ("video", "text")

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
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.save_hyperparameters(ignore=["vision", "text", "tokenizer", "optimizer", "lr_scheduler"])
        self.num_frames = num_frames
        self.crop_scale = tuple(crop_scale)
        self.max_logit_scale = max_logit_scale
        if pretrained_clip is not None:
            self._start_from_clip(pretrained_clip)
        else:
            self.tokenizer = tokenizer or ByteTokenizer(context_length=32)
            self.vision = vision or tiny_vit()
            self.text = text or TextTransformer(
                self.tokenizer.vocab_size, self.tokenizer.context_length, width=64, layers=2, heads=2
            )
            self.image_projection = nn.Linear(self.vision.num_features, embed_dim, bias=False)
            self.text_projection = nn.Linear(self.text.num_features, embed_dim, bias=False)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(min(init_logit_scale, max_logit_scale))))
        if lock_text:
            self.text.lock()

    def _start_from_clip(self, path: str) -> None:
        from vlp_lightning.pretrained import load_method  # here: it imports the CLI, which imports this index

        clip, _ = load_method(path, name="pretrained_clip", config_option="pretrained_clip")
        clip.train()  # load_method returns it in eval mode; its parts train on here (a locked tower stays in eval)
        parts = ("vision", "text", "image_projection", "text_projection", "logit_scale")
        if not isinstance(getattr(clip, "vision", None), VisionEncoder) or not all(hasattr(clip, p) for p in parts):
            raise ValueError(f"pretrained_clip={path} holds a {type(clip).__name__}, not a CLIP-family method with an "
                             "image tower, a text tower and their projections; give a checkpoint of "
                             "vlp_lightning.methods.CLIP, e.g. runs/clip/emoji_tiny/checkpoints/last.ckpt")
        self.tokenizer = clip.tokenizer
        self.vision, self.text = clip.vision, clip.text
        self.image_projection, self.text_projection = clip.image_projection, clip.text_projection
        self.logit_scale = nn.Parameter(clip.logit_scale.detach().clone())

    @property
    def embed_dim(self) -> int:
        return self.text_projection.weight.shape[0]

    # ------------------------------------------------------------------ protocol
    def train_views(self) -> ClipViews:
        """`num_frames` frames by segment sampling with temporal jitter (TSN; X-CLIP's official sampler), one
        crop per clip. No flip: motion captions ("moving left") and sub-goals name directions a mirror inverts."""
        return ClipViews(num_frames=self.num_frames, sampling="segments", scale=self.crop_scale, hflip=False,
                         mean=self.vision.mean, std=self.vision.std)

    def frame_features(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] -> the tower's pooled features of every frame [B, T, width], frames independent."""
        batch, frames = video.shape[:2]
        return self.vision(video.flatten(0, 1)).view(batch, frames, -1)

    def pool_frames(self, frame_embeddings: Tensor) -> Tensor:
        """[B, T, D] per-frame embeddings -> [B, D]: the mean over frames (the frame-averaged baseline)."""
        return frame_embeddings.mean(dim=1)

    def encode_video(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] -> unit embeddings [B, D] in the joint space."""
        return F.normalize(self.pool_frames(self.image_projection(self.frame_features(video))), dim=-1)

    def encode_text(self, text: dict[str, Tensor]) -> Tensor:
        return F.normalize(self.text_projection(self.text(text)), dim=-1)

    def probe_features(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] (or images [B, 3, H, W]: one-frame clips) -> the tower's features averaged over
        frames [B, width], before the projection (module doc)."""
        return self.frame_features(video if video.ndim == 5 else video.unsqueeze(1)).mean(dim=1)

    def video_text_logits(self, video: Tensor, text: dict[str, Tensor]) -> Tensor:
        """[B_video, B_text] scaled similarities s <v_i, u_j>: what the loss and zero-shot recognition score (X-CLIP
        overrides it: its text embeddings depend on the video)."""
        return self.logit_scale.exp() * self.encode_video(video) @ self.encode_text(text).T

    # ------------------------------------------------------------------ objective
    def contrastive_loss(self, logits: Tensor, texts: Sequence[str]) -> Tensor:
        """CLIP's symmetric InfoNCE over [B, B] logits, samples with equal texts positives of each other (module
        doc)."""
        positive = same_text(texts, logits.device)
        targets = momentum_targets(logits, positive, alpha=0.0)
        return distilled_contrastive_loss(logits, logits.T, targets, targets)

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        loss = self.contrastive_loss(self.video_text_logits(batch["video"], batch["text"]), batch["caption"])
        return {"loss": loss, "logit_scale": self.logit_scale.detach().exp()}

    def after_optimizer_step(self) -> None:
        """Clip the temperature at `max_logit_scale` in place (CLIP sec. 2.5)."""
        with torch.no_grad():
            self.logit_scale.clamp_(max=math.log(self.max_logit_scale))


def same_text(texts: Sequence[str], device: torch.device) -> Tensor:
    """[N, N] bool: True where texts i and j are equal (the diagonal always)."""
    ids = {text: index for index, text in enumerate(texts)}
    codes = torch.tensor([ids[text] for text in texts], device=device)
    return codes[:, None] == codes[None, :]
