"""VEDIT (Lin et al. 2025, "VEDIT: Latent Prediction Architecture For Procedural Video Representation Learning",
ICLR; the paper's Fig. 1 and sec. 3).

No pixel is predicted and no encoder is trained: a FROZEN image tower embeds every step of a procedure (here every
sampled frame; the paper embeds each clip of a video with a frozen clip encoder), and a prediction model, the
"Vector Embedding DiT" (VEDiT), learns to produce the embeddings of unseen steps from the observed ones by iterative
denoising. With z_1 .. z_T the frozen step embeddings (LayerNorm without affine, so they are on the noise's scale)
and M the masked (unseen) steps:

* masked clip-level latent prediction (Fig. 1, sec. 3): `future` masks the last `num_future` steps (step
  forecasting / action anticipation: the next steps from the observed ones), `intermediate` every step but the first
  and the last (procedure planning: the steps between a start and a goal); `both` draws one of the two per sample.
* flow matching (Fig. 1: "a flow matching noise scheduler"; rectified flow, Liu et al. 2022, Lipman et al. 2023,
  in the form of SD3, Esser et al. 2024, sec. 3.1): for a time t ~ U(0, 1) and noise ε ~ N(0, I), the masked steps
  become

      x_t = (1 - t) z + t ε,         the target velocity  v = dx_t/dt = ε - z,

  the observed steps stay clean (z), and VEDiT v_θ(x, t) is trained with

      L_FM = E_{t, ε} [ 1/|M| Σ_{i ∈ M} || v_θ(x_t, t)_i - (ε_i - z_i) ||² / D ].

  Sampling (`forecast`) integrates dx/dt = v_θ from pure noise at t = 1 to t = 0 with `sampling_steps` Euler steps,
  x_{t - Δ} = x_t - Δ v_θ(x_t, t), the observed steps held clean.
* VEDiT: DiT blocks (Peebles & Xie 2023, sec. 3.2, adaLN-Zero) over one token per step: the step's input embedding
  (clean or noisy) projected to the model width, plus a sine-cosine encoding of its position and a learned "unseen"
  embedding on the masked steps; the time t conditions every block through adaptive LayerNorm (shift, scale and a
  gate, all zero at the start so each block starts as the identity) and the final layer.
* attentive probes (sec. 3, Fig. 1 right; V-JEPA's attentive classifier, Bardes et al. 2024): a learned query
  cross-attends to tokens (`modules.fusion.AttentionalPooler`) and a linear layer classifies. Task recognition
  (`num_classes` > 0) pools VEDiT's hidden states of the fully observed sequence and predicts the batch's `label`;
  step forecasting (`step_classes`) pools the predicted embeddings of the unseen future steps (in training the
  one-step estimate ẑ = x_t - t v_θ, in `forecast_logits` the sampled ones) and predicts the class of the next step
  (the `segments` text that covers the first unseen step: "moving left" on `vlp-data moving` clips). Their
  cross-entropy, weighted `probe_weight`, trains with the flow-matching loss.

`probe_features` (kNN, linear probe) is the mean of VEDiT's last hidden states over the fully observed sequence at
t = 0, the tokens the task probe pools.

Not confirmed from the paper (neither its text beyond the abstract and Fig. 1 nor its code were in reach here, so no
equation numbers are cited): the distribution of t (uniform here; SD3 samples it logit-normal), whether the velocity
or the noise is predicted, VEDiT's exact conditioning of the observed steps (here clean tokens in the same sequence,
as masked prediction), whether the attentive classifier reads the denoised embeddings or VEDiT's hidden states, and
the loss weights. Deliberate changes: one token per sampled frame (the paper's clip-level embeddings may keep
several tokens per clip), the LayerNorm on the frozen embeddings, and the probes trained together with the predictor
in one run (the paper also trains VEDiT without pretraining, jointly with the downstream classifier, which is what
this does when labels are given).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from timm.layers import Mlp
from torch import Tensor, nn

from data_modules.clip_views import ClipViews
from vlp_lightning.catalog import Paper
from vlp_lightning.methods.base import VLPMethod, WarmupCosineLR
from vlp_lightning.methods.video.temadapter import sinusoidal_encoding
from vlp_lightning.modules.fusion import AttentionalPooler
from vlp_lightning.modules.vision import VisionEncoder, frozen_image_tower

Masking = Literal["future", "intermediate", "both"]


def flow_matching_pair(clean: Tensor, noise: Tensor, time: Tensor) -> tuple[Tensor, Tensor]:
    """Rectified flow's noisy input and velocity target (module doc): x_t = (1 - t) z + t ε and v = ε - z;
    `time` [B] broadcasts over the remaining dimensions of `clean` [B, ...]."""
    t = time.view(-1, *([1] * (clean.ndim - 1)))
    return (1 - t) * clean + t * noise, noise - clean


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x [B, L, W] shifted and scaled per sample ([B, W] each)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning (Peebles & Xie 2023, sec. 3.2): attention and MLP on adaptively
    normalised tokens, each branch gated, shift / scale / gate regressed from the time embedding and zero at the
    start."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: Tensor, condition: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(condition).chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift1, scale1)
        x = x + gate1[:, None] * self.attention(h, h, h, need_weights=False)[0]
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class VEDiT(nn.Module):
    """The Vector Embedding DiT: one token per step, v_θ(x, t) [B, T, D] and the last hidden states (module doc)."""

    def __init__(self, embed_dim: int, width: int, depth: int, heads: int) -> None:
        super().__init__()
        self.width = width
        self.input_projection = nn.Linear(embed_dim, width)
        self.unseen_embedding = nn.Parameter(torch.zeros(width))
        nn.init.normal_(self.unseen_embedding, std=0.02)
        self.time_embedding = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(DiTBlock(width, heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.output_projection = nn.Linear(width, embed_dim)
        for layer in (self.final_modulation[1], self.output_projection):  # DiT: the output layer starts at zero
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, unseen: Tensor, time: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, T, D] (clean observed steps, noisy unseen ones), unseen bool [B, T], time [B] in [0, 1] ->
        (velocity [B, T, D], hidden states [B, T, width])."""
        positions = sinusoidal_encoding(torch.arange(x.shape[1], device=x.device), self.width)
        tokens = self.input_projection(x) + positions + unseen[..., None] * self.unseen_embedding
        condition = self.time_embedding(sinusoidal_encoding(1000 * time, self.width))  # DiT's 1000-step scale
        for block in self.blocks:
            tokens = block(tokens, condition)
        shift, scale = self.final_modulation(condition).chunk(2, dim=-1)
        return self.output_projection(modulate(self.final_norm(tokens), shift, scale)), tokens


class AttentiveProbe(nn.Module):
    """A learned query cross-attending to tokens [B, L, input_width], then a linear classifier (V-JEPA's attentive
    probe) -> logits [B, num_classes]."""

    def __init__(self, input_width: int, num_classes: int, heads: int) -> None:
        super().__init__()
        self.pool = AttentionalPooler(input_width, input_width, n_queries=1, heads=heads)
        self.head = nn.Linear(input_width, num_classes)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        pooled = self.pool(tokens) if mask is None else torch.cat([self.pool(t[m][None]) for t, m in zip(tokens, mask)])
        return self.head(pooled[:, 0])


class VEDIT(VLPMethod):
    """A frozen image tower, a flow-matching latent predictor (VEDiT) and attentive probes (module doc).

    Args:
        vision: the frozen image tower (default: `tiny_vit()`); ignored with `pretrained_clip`.
        pretrained_clip: checkpoint of a suite method with an image tower (`vision`, e.g. CLIP): its tower, frozen.
        num_frames: steps sampled per clip (TSN segment sampling, as the video family).
        crop_scale: area range of the one random crop drawn per clip.
        width, depth, heads: VEDiT's width, blocks and attention heads.
        masking: which steps are unseen (module doc); num_future: how many steps `future` masks.
        sampling_steps: Euler steps of `forecast`.
        num_classes: classes of the task-recognition probe (the batch's `label`); 0: no task probe.
        step_classes: the step texts the forecasting probe tells apart (`segments` texts); empty: no forecasting
            probe.
        probe_heads: attention heads of the probes' pooling.
        probe_weight: weight of the probes' cross-entropy next to L_FM.
        optimizer, lr_scheduler, compile: see `VLPMethod`.
    """

    paper = Paper("VEDIT: Latent Prediction Architecture For Procedural Video Representation Learning",
                  "Lin et al.", 2025, note="no procedural videos here: sampled frames of moving / BabyAI clips are the "
                                           "steps")
    family = "video prediction"
    view_kind = "clip"
    required_keys: tuple[str, ...] = ("video",)

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        pretrained_clip: str | None = None,
        num_frames: int = 4,
        crop_scale: tuple[float, float] = (0.9, 1.0),
        width: int = 64,
        depth: int = 2,
        heads: int = 2,
        masking: Masking = "both",
        num_future: int = 1,
        sampling_steps: int = 10,
        num_classes: int = 0,
        step_classes: Sequence[str] = (),
        probe_heads: int = 2,
        probe_weight: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.save_hyperparameters(ignore=["vision", "optimizer", "lr_scheduler"])
        if masking not in ("future", "intermediate", "both"):
            raise ValueError(f"VEDIT masking={masking!r} is not one of 'future', 'intermediate', 'both'")
        if not 1 <= num_future < num_frames:
            raise ValueError(f"VEDIT num_future={num_future} must leave an observed step: pick 1 .. {num_frames - 1}")
        if masking != "future" and num_frames < 3:
            raise ValueError(f"VEDIT masking={masking!r} hides the steps between the first and the last, which "
                             f"needs num_frames >= 3, got {num_frames}")
        self.num_frames, self.crop_scale = num_frames, tuple(crop_scale)
        self.masking, self.num_future, self.sampling_steps = masking, num_future, sampling_steps
        self.vision = frozen_image_tower(vision, pretrained_clip)
        self.predictor = VEDiT(self.vision.num_features, width, depth, heads)
        self.step_classes = list(step_classes)
        self.probe_weight = probe_weight
        self.task_probe = AttentiveProbe(width, num_classes, probe_heads) if num_classes else None
        self.forecast_probe = (AttentiveProbe(self.vision.num_features, len(self.step_classes), probe_heads)
                               if self.step_classes else None)
        self.required_keys = ("video", *(("label",) if num_classes else ()),
                              *(("segments",) if self.step_classes else ()))

    # ------------------------------------------------------------------ protocol
    def train_views(self) -> ClipViews:
        """`num_frames` steps by segment sampling, one crop per clip, no flip (directions are what the steps name)."""
        return ClipViews(num_frames=self.num_frames, sampling="segments", scale=self.crop_scale, hflip=False,
                         mean=self.vision.mean, std=self.vision.std)

    def step_embeddings(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] -> the frozen tower's step embeddings z [B, T, D], LayerNormed (module doc)."""
        with torch.no_grad():
            features = self.vision(video.flatten(0, 1)).view(*video.shape[:2], -1)
            return F.layer_norm(features, features.shape[-1:])

    def unseen_steps(self, batch_size: int, frames: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(unseen bool [B, T], future bool [B]: whether the sample forecasts) drawn as `masking` says."""
        if self.masking == "both":
            future = torch.rand(batch_size, device=device) < 0.5
        else:
            future = torch.full((batch_size,), self.masking == "future", device=device)
        position = torch.arange(frames, device=device)
        forecast = position >= frames - self.num_future
        plan = (position > 0) & (position < frames - 1)
        return torch.where(future[:, None], forecast, plan), future

    def hidden_states(self, video: Tensor) -> Tensor:
        """VEDiT's last hidden states [B, T, width] of the fully observed sequence at t = 0."""
        steps = self.step_embeddings(video)
        unseen = torch.zeros(steps.shape[:2], dtype=torch.bool, device=steps.device)
        return self.predictor(steps, unseen, torch.zeros(steps.shape[0], device=steps.device))[1]

    def probe_features(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] (or images: one-step sequences) -> mean hidden state [B, width] (module doc)."""
        return self.hidden_states(video if video.ndim == 5 else video.unsqueeze(1)).mean(dim=1)

    @torch.no_grad()
    def forecast(self, video: Tensor, unseen: Tensor) -> Tensor:
        """Sampled step embeddings [B, T, D]: the unseen steps integrated from noise (t = 1) to t = 0 with
        `sampling_steps` Euler steps of dx/dt = v_θ, the observed ones the tower's."""
        steps = self.step_embeddings(video)
        x = torch.where(unseen[..., None], torch.randn_like(steps), steps)
        times = torch.linspace(1.0, 0.0, self.sampling_steps + 1, device=steps.device)
        for time, next_time in zip(times[:-1], times[1:]):
            velocity = self.predictor(x, unseen, time.expand(steps.shape[0]))[0]
            x = torch.where(unseen[..., None], x - (time - next_time) * velocity, steps)
        return x

    def forecast_logits(self, video: Tensor) -> Tensor:
        """The forecasting probe's logits [B, len(step_classes)] of the step after the observed ones, read from the
        sampled future embeddings."""
        if self.forecast_probe is None:
            raise ValueError("VEDIT has no forecasting probe: build it with step_classes (the segment texts)")
        frames = video.shape[1]
        unseen = (torch.arange(frames, device=video.device) >= frames - self.num_future).expand(video.shape[0], -1)
        return self.forecast_probe(self.forecast(video, unseen), unseen)

    def task_logits(self, video: Tensor) -> Tensor:
        """The task-recognition probe's logits [B, num_classes]."""
        if self.task_probe is None:
            raise ValueError("VEDIT has no task-recognition probe: build it with num_classes > 0")
        return self.task_probe(self.hidden_states(video))

    # ------------------------------------------------------------------ objective
    def next_step_labels(self, segments: list, unseen: Tensor, future: Tensor) -> Tensor:
        """Per forecasting sample the index in `step_classes` of the segment text covering its first unseen step
        (-100: not a forecasting sample, or a text outside `step_classes`)."""
        first_unseen = unseen.float().argmax(dim=1).tolist()
        labels = []
        for sample_segments, position, forecasts in zip(segments, first_unseen, future.tolist()):
            texts = [text for first, last, text in sample_segments if first <= position <= last]
            known = forecasts and texts and texts[0] in self.step_classes
            labels.append(self.step_classes.index(texts[0]) if known else -100)
        return torch.tensor(labels, device=unseen.device)

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        steps = self.step_embeddings(batch["video"])                               # z [B, T, D]
        batch_size, frames = steps.shape[:2]
        unseen, future = self.unseen_steps(batch_size, frames, steps.device)
        time = torch.rand(batch_size, device=steps.device)
        noisy, velocity = flow_matching_pair(steps, torch.randn_like(steps), time)
        x = torch.where(unseen[..., None], noisy, steps)
        predicted, _ = self.predictor(x, unseen, time)
        error = (predicted - velocity).pow(2).mean(dim=-1)                          # [B, T]
        flow_loss = (error * unseen).sum() / unseen.sum()
        outputs = {"flow_matching_loss": flow_loss.detach()}
        loss = flow_loss
        if self.task_probe is not None:
            if "label" not in batch:
                raise ValueError("VEDIT's task probe (num_classes > 0) reads `label`, which the batch lacks; set "
                                 "num_classes: 0 or use shards with .cls labels")
            task_loss = F.cross_entropy(self.task_probe(self.hidden_states(batch["video"])), batch["label"])
            outputs["task_loss"] = task_loss.detach()
            loss = loss + self.probe_weight * task_loss
        if self.forecast_probe is not None:
            labels = self.next_step_labels(batch["segments"], unseen, future)
            if (labels >= 0).any():
                estimate = x - time[:, None, None] * predicted                     # ẑ = x_t - t v_θ
                keep = labels >= 0
                logits = self.forecast_probe(estimate[keep], unseen[keep])
                forecast_loss = F.cross_entropy(logits, labels[keep])
                outputs["forecast_loss"] = forecast_loss.detach()
                loss = loss + self.probe_weight * forecast_loss
        return {"loss": loss, **outputs}
