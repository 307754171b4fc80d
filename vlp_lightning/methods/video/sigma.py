"""SIGMA (Salehi et al. 2024, "SIGMA: Sinkhorn-Guided Masked Video Modeling"), and under the same architecture the
VideoMAE pixel-target baseline it replaces (Tong et al. 2022, "VideoMAE: Masked Autoencoders are Data-Efficient
Learners for Self-Supervised Video Pre-Training").

The masked video model is VideoMAE's (its sec. 3): a clip x is cut into N space-time tubes (t = 2 frames x p x p
pixels, `modules.video_vision`), a tube mask hides a high ratio (0.9) of them, the same spatial positions in every
tubelet; the encoder f (a ViT on tube tokens) sees only the visible tubes; a light decoder g gets f's tokens mapped to
its width, a shared learned mask token at each masked tube, fixed sine-cosine position embeddings on both, and
predicts one vector per masked tube, y_i = g(f(x))_i, i in M (the masked set).

`target: pixels`, VideoMAE (sec. 3.3, and the released `target_type=pixel`, `normlize_target=True`): the target of
tube i is its pixels, each channel normalised over the tube, x̂_i = (x_i - mean(x_i)) / (std(x_i) + 1e-6), and

    L_pixel = 1/|M| sum_{i in M} mean_d (y_i - x̂_i)_d^2                                  (MSE on masked tubes)

`target: mlp`, SIGMA (sec. 3, "SIGMA (MLP)"): a projection network h (an MLP on x̂_i) gives a target feature
h(x̂_i), learned jointly; an L2 loss between y_i and h(x̂_i) collapses (both sides can map everything to one point),
so both are scored against K learnable prototypes C (unit rows, renormalised before each step) and the loss
predicts cluster assignments instead:

    s_i = norm(y_i) sg(C)ᵀ,  t_i = norm(h(x̂_i)) Cᵀ     [K] scores (norm: L2 normalisation, sg: no gradient)
    Q_s = SK(S), Q_t = SK(T)   Sinkhorn-Knopp over all B x |M| masked tubes of the batch: the entropic optimal
                               transport of SwAV (`losses.swav.sinkhorn_knopp`, ε, iterations) that spreads the tubes
                               evenly over the K prototypes, so neither side can collapse
    L_SIGMA = ℓ(t, q_s) + ℓ(s, q_t),  ℓ(a, q) = -1/(B|M|) sum_i sum_k q_ik log softmax(a_i / τ)_k

a symmetric swapped prediction: the video model predicts the projection network's assignment and vice versa, each
term SwAV's cross-entropy at temperature τ (`losses.swav.swav_loss` of the two "views" decoder / projection, which
averages the two terms; L_SIGMA is their sum). Following the released code (engine_for_pretraining.py with
`loss_func=SWAV`, modeling_pretrain.py `extract_assignments`), q is the hard assignment, one-hot at argmax_k of the
Sinkhorn codes (`hard_assignments`; false keeps SwAV's soft codes), τ = 0.1, ε = 0.05 (0.03 for SSv2), 10 iterations,
K = 3000, the decoder side scores against detached prototypes (so C learns through the projection side only), the
prototypes are L2-normalised in every forward, and the MLP is 1024-1024-512-256 with GELUs on the normalised pixels
of a tube (2 x 16 x 16 x 3 = 1536 inputs), the decoder predicting 256-d features.

`target: dino`, "SIGMA (DINO)" (the released `target_type=dino_v1`, `--distillation_teacher dino_b`): the projection
is a frozen image tower φ (a DINO ViT; the release's DINO ViT-B/16, whose 14 x 14 patch grid at 224 px is the tube
grid of 16 px tubes) and h = identity. The target of tube i is φ's patch token at i's spatial position on the first
frame of i's tubelet (frames 0, t, 2t, ...: the release's `video[:, ::2]`), read from the tower's last block after
its final norm, class token dropped, the clip's frames in the tower's own pixel normalisation; with
`normalize_target` each of its D channels is standardised over all N tubes of the clip (mean and unbiased std over
the tube axis, + 1e-6: the release normalises `dim=-2` of [B, N, D], not per tube), and the masked tubes are kept.
The decoder predicts D-dim features, the prototypes are [K, D] (K = 3000 released), and L_SIGMA is the same swapped
prediction: s from the decoder against detached prototypes, t from the frozen features against learnable ones, so
the prototype term trains the prototypes only and the other the video model. The tower comes from a suite
checkpoint (`target_tower`: a DINO run's EMA teacher, the weights DINO releases) or a `VisionEncoder`
(`target_vision`, e.g. timm's ViT-B/16 with a local `pretrained_path` of converted DINO weights, the release's
route); its patch size must be the tube's and its input size the clip's (one error naming both otherwise).

The mask is drawn in the method (`tube_masking`, torch's global RNG: the base class checkpoints it, so a resumed
run draws the same masks), not taken from `ClipViews`' `tube_mask`: the mask's geometry (patch, tubelet, ratio) is
the model's, and one source cannot disagree with it; the views here never ask for a mask. Representation
(`probe_features`): the mean of the encoder's tokens on the whole, unmasked clip, a still image a clip of repeated
frames; SIGMA's linear evaluation reads the encoder, not the decoder.

Not confirmed / deliberate changes: the paper's section and equation numbers (the text here follows the released
code, QUVA-Lab/SIGMA `modeling_pretrain.py` / `engine_for_pretraining.py`, which this file was checked against, not
copied from); no released DINO weights are reachable here, so the tiny DINO-target recipe reads a suite DINO run's
teacher (`experiments/sigma/moving_dino_tiny.yaml`); the scores are computed in fp32
outside autocast (the released code scores in fp16 under `torch.cuda.amp`), as SwAV's here; the tiny defaults shrink
the MLP to 128-128-64-32 and K to 32; clips are sampled at a fixed stride with a random start (VideoMAE's loader)
and cropped by one random resized crop (`crop_scale`, ~ VideoMAE's multi-scale crop), never flipped.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from data_modules.clip_views import ClipViews
from vlp_lightning.catalog import Paper
from vlp_lightning.losses.swav import sinkhorn_knopp, swav_loss
from vlp_lightning.methods.base import VLPMethod, WarmupCosineLR
from vlp_lightning.modules.masking import PatchMask, gather_patches, num_masked_patches
from vlp_lightning.modules.vision import VisionEncoder, frozen_image_tower, takes_any_input_size
from vlp_lightning.modules.video_vision import (
    VideoVisionTransformer,
    sinusoid_table,
    transformer_blocks,
    tube_masking,
    tube_pixels,
    videomae_init,
)

Target = Literal["mlp", "pixels", "dino"]


class SIGMA(VLPMethod):
    """Masked video modelling with Sinkhorn-guided prototype targets, or VideoMAE's pixel targets (module doc).

    Args:
        vision: the video encoder (default: a 2-block ViT of width 64 on 4 frames of 32 px, 8 px patches, tubelet 2).
        target: "mlp" (SIGMA: prototype assignments of a learned MLP projection of each tube), "dino" (SIGMA
            (DINO): of a frozen image tower's patch features) or "pixels" (VideoMAE: normalised-pixel MSE), under
            the same encoder, decoder and masks.
        target_tower: for "dino", a suite checkpoint whose tower (its EMA teacher's where it has one: a DINO run)
            gives the target features, frozen.
        target_vision: for "dino", the frozen target tower as a `VisionEncoder` (ignored with `target_tower`).
        mask_ratio: fraction of the spatial positions masked in every tubelet (0.9 in both papers).
        decoder_width, decoder_depth, decoder_heads: the decoder (ViT-B: 384, 4, 6 in the released scripts).
        feature_dim: size of the decoder's prediction and the projection's output for "mlp" (256 released; "dino"
            predicts the tower's width).
        projection_hidden: hidden widths of the projection MLP (1024, 1024, 512 released).
        num_prototypes: K (3000 released).
        temperature: τ of the swapped prediction (0.1).
        sinkhorn_epsilon, sinkhorn_iterations: ε and iterations of Sinkhorn-Knopp (0.05 for Kinetics, 10).
        hard_assignments: predict the one-hot argmax of the codes (the released code) rather than the soft codes.
        normalize_target: per-tube normalised pixels as the pixel target and the MLP's input, per-clip standardised
            channels of the DINO features (True released).
        frame_stride: frames between sampled frames (VideoMAE's `sampling_rate`: 4 for Kinetics, 2 for SSv2).
        crop_scale: area range of the one random crop drawn per clip (VideoMAE's multi-scale crop takes 0.66-1 of
            the short side: 0.44-1 of the area).
        optimizer, lr_scheduler, compile: see `VLPMethod`.
    """

    paper = Paper("SIGMA: Sinkhorn-Guided Masked Video Modeling", "Salehi et al.", 2024,
                  note="Kinetics not reachable: moving-emoji clips; the DINO target reads a suite DINO run's "
                       "teacher (no released DINO weights here)")
    family = "masked video modelling"
    view_kind = "clip"
    required_keys = ("video",)
    no_weight_decay_names = ("mask_token",)  # the released `no_weight_decay`; pos embeddings are fixed buffers

    def __init__(
        self,
        vision: VideoVisionTransformer | None = None,
        target: Target = "mlp",
        target_tower: str | None = None,
        target_vision: VisionEncoder | None = None,
        mask_ratio: float = 0.9,
        decoder_width: int = 64,
        decoder_depth: int = 1,
        decoder_heads: int = 2,
        feature_dim: int = 32,
        projection_hidden: tuple[int, ...] = (128, 128, 64),
        num_prototypes: int = 32,
        temperature: float = 0.1,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_iterations: int = 10,
        hard_assignments: bool = True,
        normalize_target: bool = True,
        frame_stride: int = 2,
        crop_scale: tuple[float, float] = (0.44, 1.0),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        if target not in ("mlp", "pixels", "dino"):
            raise ValueError(f"SIGMA target={target!r} is not one of 'mlp' (SIGMA's prototype targets), 'dino' (of "
                             "a frozen DINO tower's features) or 'pixels' (the VideoMAE baseline)")
        if (target == "dino") != (target_tower is not None or target_vision is not None):
            raise ValueError(f"SIGMA target={target!r} with target_tower={target_tower!r} and target_vision="
                             f"{type(target_vision).__name__ if target_vision is not None else None}: the 'dino' "
                             "target needs its frozen tower and only it takes one; give target_tower (e.g. "
                             "runs/dino/emoji_tiny/checkpoints/last.ckpt) or target_vision with target: dino")
        self.save_hyperparameters(ignore=["vision", "target_vision", "optimizer", "lr_scheduler"])
        self.vision = vision or VideoVisionTransformer()
        num_masked_patches(self.vision.num_positions, mask_ratio)  # fail at construction, not at the first step
        self.target, self.mask_ratio, self.normalize_target = target, mask_ratio, normalize_target
        self.temperature, self.hard_assignments = temperature, hard_assignments
        self.sinkhorn_epsilon, self.sinkhorn_iterations = sinkhorn_epsilon, sinkhorn_iterations
        self.frame_stride, self.crop_scale = frame_stride, tuple(crop_scale)
        tube_dim = 3 * self.vision.tubelet_size * self.vision.patch_size ** 2
        positions = self.vision.grid_size[0] * self.vision.num_positions

        self.encoder_to_decoder = nn.Linear(self.vision.width, decoder_width, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        self.register_buffer("decoder_pos_embed", sinusoid_table(positions, decoder_width), persistent=False)
        self.decoder_blocks = transformer_blocks(decoder_width, decoder_depth, decoder_heads)
        self.decoder_norm = nn.LayerNorm(decoder_width, eps=1e-6)
        if target == "dino":
            self.target_vision = frozen_image_tower(target_vision, target_tower, "target_tower", teacher=True)
            self.check_target_grid()
            feature_dim = self.target_vision.num_features
            self.projection: nn.Module = nn.Identity()  # the release's identity head on the frozen features
            self.prototypes = nn.Parameter(torch.randn(num_prototypes, feature_dim))
        self.decoder_head = nn.Linear(decoder_width, tube_dim if target == "pixels" else feature_dim)
        if target == "mlp":
            widths = (tube_dim, *projection_hidden, feature_dim)
            layers: list[nn.Module] = []
            for fan_in, fan_out in zip(widths, widths[1:]):
                layers += [nn.Linear(fan_in, fan_out), nn.GELU()]
            self.projection = nn.Sequential(*layers[:-1])  # no GELU after the last layer
            self.prototypes = nn.Parameter(torch.randn(num_prototypes, feature_dim))
        videomae_init(self.decoder_blocks)  # the released decoder's `_init_weights`; encoder_to_decoder and the
        videomae_init(self.decoder_head)    # projection keep PyTorch's defaults there, as here
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)

    @property
    def num_frames(self) -> int:
        return self.vision.num_frames

    def check_target_grid(self) -> None:
        """The DINO tower's patch tokens must be the tubes' spatial grid: the same patch size and input size."""
        tower = self.target_vision
        same_size = tower.img_size == self.vision.img_size or takes_any_input_size(tower)
        if tower.patch_size != self.vision.patch_size or not same_size:
            raise ValueError(f"SIGMA target='dino': the target tower takes {tower.img_size} px in {tower.patch_size} "
                             f"px patches, the clips are {self.vision.img_size} px in {self.vision.patch_size} px "
                             "tubes; its patch grid must be the tube grid: give a tower of the same patch and input "
                             "size (or set the video encoder's img_size / patch_size to the tower's)")

    # ------------------------------------------------------------------ protocol
    def train_views(self) -> ClipViews:
        """`num_frames` frames `frame_stride` apart from a random start, one random crop per clip, no flip."""
        return ClipViews(num_frames=self.num_frames, sampling="stride", strides=(self.frame_stride,),
                         scale=self.crop_scale, hflip=False, mean=self.vision.mean, std=self.vision.std)

    def probe_features(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] (or images [B, 3, H, W]) -> the mean of the encoder's tokens on the unmasked clip."""
        return self.vision(video)

    # ------------------------------------------------------------------ model
    def draw_mask(self, batch_size: int, device: torch.device) -> PatchMask:
        """The tube mask of a batch (module doc): the same spatial positions masked in every tubelet of a clip."""
        return tube_masking(batch_size, self.vision.grid_size[0], self.vision.num_positions, self.mask_ratio, device)

    def forward_decoder(self, video: Tensor, mask: PatchMask) -> Tensor:
        """video [B, T, 3, H, W] -> the decoder's predictions of the masked tubes [B, M, out], in `ids_masked` order.

        As the released code, visible and mask tokens are not put back in grid order: each carries its position
        embedding, and attention does not care about order."""
        encoded = self.encoder_to_decoder(self.vision.forward_tokens(video, mask.ids_keep))  # [B, K, D]
        positions = self.decoder_pos_embed.to(encoded.dtype).expand(encoded.shape[0], -1, -1)
        visible = encoded + gather_patches(positions, mask.ids_keep)
        masked = self.mask_token.to(encoded.dtype) + gather_patches(positions, mask.ids_masked)  # [B, M, D]
        tokens = self.decoder_blocks(torch.cat([visible, masked], dim=1))
        return self.decoder_head(self.decoder_norm(tokens[:, -masked.shape[1]:]))

    def masked_tube_pixels(self, video: Tensor, mask: PatchMask) -> Tensor:
        """x̂ of the masked tubes [B, M, t*p*p*3]: the clip's pixels back in [0, 1] (the views' mean / std undone),
        per tube and channel normalised with `normalize_target`."""
        mean = video.new_tensor(self.vision.mean).view(1, 1, 3, 1, 1)
        std = video.new_tensor(self.vision.std).view(1, 1, 3, 1, 1)
        pixels = tube_pixels(self.vision.as_clip(video).float() * std + mean, self.vision.tubelet_size,
                             self.vision.patch_size, normalize=self.normalize_target)
        return gather_patches(pixels, mask.ids_masked)

    def masked_tube_features(self, video: Tensor, mask: PatchMask) -> Tensor:
        """The DINO targets of the masked tubes [B, M, D] (module doc): the frozen tower's patch tokens of each
        tubelet's first frame in the tower's pixel normalisation, each channel standardised over the clip's tubes
        with `normalize_target`."""
        clip = self.vision.as_clip(video).float()[:, ::self.vision.tubelet_size]  # [B, T/t, 3, H, W]
        tower = self.target_vision
        mean, std = (clip.new_tensor(values).view(1, 1, 3, 1, 1) for values in (self.vision.mean, self.vision.std))
        tower_mean, tower_std = (clip.new_tensor(values).view(1, 1, 3, 1, 1) for values in (tower.mean, tower.std))
        frames = ((clip * std + mean) - tower_mean) / tower_std
        tokens = tower.forward_tokens(frames.flatten(0, 1)).float()  # [B * T/t, L, D]
        tokens = tokens.reshape(clip.shape[0], -1, tokens.shape[-1])  # [B, N, D], (tubelet, row, column) order
        if self.normalize_target:
            tokens = (tokens - tokens.mean(dim=1, keepdim=True)) / (tokens.var(dim=1, keepdim=True).sqrt() + 1e-6)
        return gather_patches(tokens, mask.ids_masked)

    def prototype_scores(self, features: Tensor, detach_prototypes: bool) -> Tensor:
        """features [..., D] -> [..., K] cosine scores against the prototypes, in fp32 outside autocast (they feed
        exp(s / ε))."""
        prototypes = self.prototypes.detach() if detach_prototypes else self.prototypes
        with torch.autocast(device_type=features.device.type, enabled=False):
            return F.normalize(features.float(), dim=-1) @ prototypes.float().T

    def assignments(self, scores: Tensor) -> Tensor:
        """Sinkhorn-Knopp codes of flattened scores [B*M, K], one-hot at their argmax with `hard_assignments`."""
        codes = sinkhorn_knopp(scores, self.sinkhorn_epsilon, self.sinkhorn_iterations)
        if self.hard_assignments:
            codes = F.one_hot(codes.argmax(dim=1), codes.shape[1]).to(codes.dtype)
        return codes

    def sigma_loss(self, predicted: Tensor, projected: Tensor) -> dict[str, Tensor]:
        """L_SIGMA of the decoder's predictions and the projection's features of the masked tubes, [B, M, D] each."""
        decoder_scores = self.prototype_scores(predicted.flatten(0, 1), detach_prototypes=True)  # s  [B*M, K]
        projection_scores = self.prototype_scores(projected.flatten(0, 1), detach_prototypes=False)  # t
        decoder_codes, projection_codes = self.assignments(decoder_scores), self.assignments(projection_scores)
        # swav_loss: each view's codes predicted by the other view, the two cross-entropies averaged; L is their sum
        loss = 2 * swav_loss([decoder_scores, projection_scores], [decoder_codes, projection_codes], self.temperature)
        agreement = (decoder_codes.argmax(dim=1) == projection_codes.argmax(dim=1)).float().mean()
        used = projection_codes.argmax(dim=1).unique().numel() / projection_codes.shape[1]
        return {"loss": loss, "assignment_agreement": agreement, "prototypes_used": projection_codes.new_tensor(used)}

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        video = batch["video"]
        mask = self.draw_mask(video.shape[0], video.device)
        predicted = self.forward_decoder(video, mask)  # [B, M, out]
        with torch.no_grad():
            target = (self.masked_tube_features(video, mask) if self.target == "dino"  # [B, M, D]
                      else self.masked_tube_pixels(video, mask))  # [B, M, t*p*p*3]
        if self.target == "pixels":
            return {"loss": F.mse_loss(predicted.float(), target)}
        with torch.no_grad():  # the released `normalize_prototypes`, in every forward
            self.prototypes.copy_(F.normalize(self.prototypes, dim=1))
        return self.sigma_loss(predicted, self.projection(target.to(predicted.dtype)))
