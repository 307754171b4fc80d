"""GFSLT-VLP (Zhou et al., ICCV 2023, "Gloss-Free Sign Language Translation: Improving from Visual-Language
Pretraining").

Two stages, one class (`stage: 1 | 2`; official code zhoubenjia/GFSLT-VLP, `models.py`, `train_vlp_v2.py`,
`train_slt.py`):

The visual encoder (sec. 3.1; official `ImageCLIP` / `FeatureExtracter`): a frame tower f (ResNet-18 per frame in the
paper), a temporal convolution over the frame features (official `TemporalConv`, conv_type 2: K5 - pool 2 - K5 -
pool 2, with BatchNorm and ReLU), then a transformer encoder E_v over the resulting tokens (a 3-layer mBART
encoder in the official `mytran` config).

**Stage 1, VLP pre-tasks (sec. 3.2):**

* CLIP between the visual encoder and a text encoder E_t (sec. 3.2): a learnable [CLS] token is prepended
  to the visual tokens and its E_v output, linearly projected (official `lm_head`, no bias), is the video embedding
  v; the text embedding u is E_t's pooled output (the official text head is the identity), both L2-normalised, and
      L_CLIP = ½ (CE(s V Uᵀ, P) + CE(s U Vᵀ, Pᵀ)),   s = exp(logit scale), initialised 1/0.07,
  with P the positives: the diagonal and every pair with the same sentence (BabyAI missions repeat in a batch;
  `VideoTextMethod`'s rule).
* Masked self-supervised learning (sec. 3.2; official `Text_Decoder.forward`): a sentence y is corrupted to
  ŷ (official `NoiseInjecting`, "omit_last": its last ceil(n U(0, 0.15)) words become <mask>), E_t encodes ŷ **without
  gradient** (`torch.no_grad()` in the official decoder step), and a text decoder D reconstructs the *whole*
  sentence from that encoding by teacher forcing:
      L_MLM = -Σ_t log p_D(y_t | y_<t, E_t(ŷ)).
  So E_t is trained by L_CLIP only and D by L_MLM only.
  L_stage1 = L_CLIP + λ L_MLM, λ = 1 (official `--loss-lambda 1`).

**Stage 2, gloss-free translation (sec. 3.3; official `gloss_free_model`, `train_slt.py --finetune`):** an
encoder-decoder that inherits E_v (with f and the temporal convolution) and D from stage 1 (`start_from`: every
weight of the stage-1 checkpoint is loaded; the official code maps `trans_encoder` -> `mbart.model.encoder` and
`text_decoder` -> `mbart.model.decoder`). A new sign embedding (official `V_encoder`: Linear, BatchNorm, ReLU) maps
the temporal-convolution tokens into E_v, which now outputs every token (no [CLS]); D cross-attends to them:
      L_SLT = -Σ_t log p_D(y_t | y_<t, E_v(video)).
Translations are decoded greedily or by beam search (`generate_captions`, the suite's caption protocol; official:
4 beams) and scored by BLEU with the suite's caption metrics (`callbacks.captioning.caption_metrics`).

What each stage trains: stage 1 everything but the sign embedding; stage 2 the frame tower, temporal convolution,
sign embedding, E_v and D (E_t, the [CLS] token, the video projection and the temperature stay as stage 1 left
them, frozen). Both stages build the same modules, so one checkpoint loads into the other exactly.

Deliberate changes / not confirmed: the paper's PDF was not reachable here: sections follow its abstract and the
official code, equations are written as the code computes them (no equation numbers); the official stage 1 steps the
decoder with its own AdamW (lr 1e-3) every 5th step; here one optimizer steps every loss each step (`decoder_lr`
gives the decoder its own learning rate; the two losses touch disjoint parameters, so this is two optimizers at the
same frequency); the official cross-entropies use label smoothing 0.2 and the stage-1 contrastive loss is a KL
divergence to softmax(10 I), here the suite's plain losses (`captioning_loss`, ALBEF's multi-positive InfoNCE);
words are masked at the token level of the suite's tokenizers; E_t pools its first token (the official code pools
the position of the largest id, mBART's language code at the end); D's vocabulary embeddings are not replaced by
mBART's in stage 2 and nothing is pretrained (the paper starts E_t and D from mBART-large-cc25, the frame tower from
ImageNet); the temporal convolution pads to keep the length before each pooling ("same" convolutions, ceil-mode
pooling) so short clips keep tokens (official: no padding); the decoder also attends to the masked sentence's
padding states (the shared `captioning_loss` takes no memory mask; padding attends only to itself in E_t, so it
carries no sentence).
`vlp predict --data.predict_shards CLIPS` of a stage-2 checkpoint writes each clip's translation (`generated`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from data_modules.clip_views import ClipViews
from vlp_lightning.catalog import Paper
from vlp_lightning.losses.fusion import distilled_contrastive_loss, mask_tokens, momentum_targets
from vlp_lightning.methods.base import VLPMethod, WarmupCosineLR, load_earlier_stage
from vlp_lightning.methods.fusion.common import CaptionGenerator, captioning_loss, next_token_logits, text_specials
from vlp_lightning.methods.video.base import same_text
from vlp_lightning.modules.fusion import FusionBlock, FusionTextTransformer
from vlp_lightning.modules.tokenizers import ByteTokenizer, Tokenizer
from vlp_lightning.modules.vision import VisionEncoder, tiny_vit


def temporal_convolution(in_width: int, width: int, kernel: int) -> nn.Sequential:
    """Official `TemporalConv` (conv_type 2): [conv K - BatchNorm - ReLU - max-pool 2] x 2 over [B, C, T] (module
    doc: "same" padding and ceil-mode pooling here, T -> ceil(ceil(T / 2) / 2))."""
    layers: list[nn.Module] = []
    for index in range(2):
        layers += [nn.Conv1d(in_width if index == 0 else width, width, kernel, padding=kernel // 2),
                   nn.BatchNorm1d(width), nn.ReLU(), nn.MaxPool1d(2, ceil_mode=True)]
    return nn.Sequential(*layers)


def omit_last(input_ids: Tensor, attention_mask: Tensor, mask_token_id: int, special_token_ids: tuple[int, ...],
              noise_rate: float) -> Tensor:
    """The official "omit_last" noise at the token level: per sentence of n real, non-special tokens, the last
    ceil(n u) of them, u ~ U(0, noise_rate), become `mask_token_id` (at least one when n > 0). ids [B, L] -> [B, L]."""
    eligible = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special_token_ids, device=input_ids.device))
    counts = eligible.sum(dim=1)
    omitted = torch.ceil(counts * torch.rand(counts.shape, device=input_ids.device) * noise_rate).long()
    omitted = torch.minimum(torch.maximum(omitted, (counts > 0).long()), counts)
    rank_from_end = eligible.flip(1).long().cumsum(dim=1).flip(1)  # 1 at the last eligible token, 2 before it...
    chosen = eligible & (rank_from_end <= omitted[:, None])
    return torch.where(chosen, mask_token_id, input_ids)


class GFSLTVLP(CaptionGenerator, VLPMethod):
    """Stage 1: CLIP + masked-sentence reconstruction; stage 2: video -> sentence translation (module doc).

    Args:
        stage: 1 (VLP pre-tasks) or 2 (translation, usually `start_from` a stage-1 checkpoint).
        vision: the frame tower (default: `tiny_vit()`; the paper: ResNet-18).
        tokenizer: sentence tokenizer (default: bytes, 32 tokens; the paper: mBART's sentencepiece).
        width, heads: every transformer here (E_v, E_t, D share one width: D reads E_t in stage 1, E_v in stage 2;
            official 1024 and 8 heads in E_v and D).
        visual_layers, text_layers, decoder_layers: depths of E_v, E_t and D (official 3, 12, 3).
        num_frames: frames per clip; also the length of E_v's position embeddings (+1 for the [CLS]).
        crop_scale: area range of the one random crop drawn per clip.
        temporal_kernel: the temporal convolutions' kernel (official 5).
        noise: "omit_last" (official default) masks the end of the sentence; "random" masks `noise_rate` of its
            tokens anywhere (BERT's 80 / 10 / 10, official "omit" masks whole words).
        noise_rate: the masking rate (official 0.15).
        reconstruction_weight: λ of L_MLM (official 1).
        decoder_lr: learning rate of D (None: the optimizer's; the official stage 1 steps D at 1e-3).
        start_from: a GFSLTVLP checkpoint (stage 1's `last.ckpt`) whose every weight this run starts from.
        init_logit_scale, max_logit_scale: exp(logit scale) at the start (1/0.07) and its clamp.
        default_caption_length: most tokens a translation gets when the caller does not say.
        optimizer, lr_scheduler, compile: see `VLPMethod`.
    """

    paper = Paper("Gloss-Free Sign Language Translation: Improving from Visual-Language Pretraining", "Zhou et al.",
                  2023, note="sign videos not reachable: BabyAI clips translated to their mission texts")
    family = "video-language"
    view_kind = "clip"
    required_keys = ("video", "text")
    no_weight_decay_names = ("visual_positions", "visual_class_token")

    def __init__(
        self,
        stage: Literal[1, 2] = 1,
        vision: VisionEncoder | None = None,
        tokenizer: Tokenizer | None = None,
        width: int = 64,
        heads: int = 2,
        visual_layers: int = 1,
        text_layers: int = 1,
        decoder_layers: int = 1,
        num_frames: int = 8,
        crop_scale: tuple[float, float] = (0.9, 1.0),
        temporal_kernel: int = 3,
        noise: Literal["omit_last", "random"] = "omit_last",
        noise_rate: float = 0.15,
        reconstruction_weight: float = 1.0,
        decoder_lr: float | None = None,
        start_from: str | None = None,
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        default_caption_length: int = 30,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.save_hyperparameters(ignore=["vision", "tokenizer", "optimizer", "lr_scheduler"])
        if stage not in (1, 2):
            raise ValueError(f"GFSLTVLP stage={stage!r} is not 1 (VLP pre-tasks) or 2 (translation)")
        if noise not in ("omit_last", "random"):
            raise ValueError(f"GFSLTVLP noise={noise!r} is not 'omit_last' (official) or 'random'")
        if not 0.0 < noise_rate < 1.0:
            raise ValueError(f"GFSLTVLP noise_rate={noise_rate} must lie in (0, 1); the paper uses 0.15")
        self.stage, self.noise, self.noise_rate = stage, noise, noise_rate
        self.tokenizer = tokenizer or ByteTokenizer(context_length=32)
        self.specials = text_specials(self.tokenizer)
        self.vision = vision or tiny_vit()
        self.num_frames = num_frames
        self.crop_scale = tuple(crop_scale)
        vocab, context = self.specials.vocab_size, self.tokenizer.context_length
        # the visual encoder: frame tower -> temporal convolution -> (sign embedding) -> E_v
        self.temporal_conv = temporal_convolution(self.vision.num_features, width, temporal_kernel)
        self.sign_projection = nn.Linear(width, width)
        self.sign_norm = nn.BatchNorm1d(width)
        self.visual_class_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.visual_positions = nn.Parameter(torch.randn(num_frames + 1, width) * 0.01)
        self.visual_blocks = nn.ModuleList(FusionBlock(width, heads) for _ in range(visual_layers))
        self.visual_norm = nn.LayerNorm(width)
        self.video_projection = nn.Linear(width, width, bias=False)
        # E_t (bidirectional) and D (causal, cross-attending)
        self.text = FusionTextTransformer(vocab, context, width, text_layers, 0, heads)
        self.decoder = FusionTextTransformer(vocab, context, width, 0, decoder_layers, heads, causal=True)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(min(init_logit_scale, max_logit_scale))))
        self.max_logit_scale = max_logit_scale
        self.reconstruction_weight, self.decoder_lr = reconstruction_weight, decoder_lr
        self.default_caption_length = min(default_caption_length, context - 1)
        if start_from is not None:
            load_earlier_stage(self, start_from, "runs/gfsltvlp/babyai_stage1_tiny/checkpoints/last.ckpt")
        for module in self.unused_modules():
            module.requires_grad_(False)
        for parameter in self.unused_parameters():
            parameter.requires_grad_(False)

    def unused_modules(self) -> list[nn.Module]:
        """What this stage never reads (frozen: no gradient, no DDP unused-parameter error)."""
        if self.stage == 1:
            return [self.sign_projection, self.sign_norm]
        return [self.text, self.video_projection]

    def unused_parameters(self) -> list[nn.Parameter]:
        # E_t has no fusion layers (its final norm and logits go unused); D's pooled text feature goes unused
        unused = [*self.text.ln_final.parameters(), self.text.logit_bias, *self.decoder.ln_text.parameters()]
        return unused + ([self.visual_class_token, self.logit_scale] if self.stage == 2 else [])

    def parameter_groups(self) -> list[dict]:
        return self.parameter_groups_at(self.decoder_lr, [self.decoder])

    def train_views(self) -> ClipViews:
        """`num_frames` frames by segment sampling, one crop per clip, no flip (a mirrored sign or episode is
        another one)."""
        return ClipViews(num_frames=self.num_frames, sampling="segments", scale=self.crop_scale, hflip=False,
                         mean=self.vision.mean, std=self.vision.std)

    # ------------------------------------------------------------------ the visual encoder
    def visual_tokens(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] -> temporal-convolution tokens [B, T', width], T' = ceil(ceil(T / 2) / 2)."""
        batch, frames = video.shape[:2]
        features = self.vision(video.flatten(0, 1)).view(batch, frames, -1)               # f(x_t)  [B, T, w_f]
        return self.temporal_conv(features.transpose(1, 2)).transpose(1, 2)

    def visual_encoder(self, tokens: Tensor) -> Tensor:
        """E_v: tokens [B, S, width] + position embeddings through the blocks -> [B, S, width] (final norm)."""
        if tokens.shape[1] > self.visual_positions.shape[0]:
            raise ValueError(f"GFSLTVLP has position embeddings for {self.visual_positions.shape[0]} visual tokens, "
                             f"the clip gives {tokens.shape[1]}; build it with a larger num_frames")
        x = tokens + self.visual_positions[:tokens.shape[1]]
        for block in self.visual_blocks:
            x = block(x)
        return self.visual_norm(x)

    def video_features(self, video: Tensor) -> Tensor:
        """Stage 1's [CLS] output of E_v [B, width] (before the projection): what kNN and linear probes read."""
        tokens = self.visual_tokens(video)
        cls = self.visual_class_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        return self.visual_encoder(torch.cat([cls, tokens], dim=1))[:, 0]

    def probe_features(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] (or images: one-frame clips) -> E_v's [CLS] output [B, width]."""
        return self.video_features(video if video.ndim == 5 else video.unsqueeze(1))

    def encode_video(self, video: Tensor) -> Tensor:
        """Unit video embeddings [B, width] in the stage-1 CLIP space."""
        return F.normalize(self.video_projection(self.video_features(video)), dim=-1)

    def encode_text(self, text: dict[str, Tensor]) -> Tensor:
        """Unit sentence embeddings [B, width] in the stage-1 CLIP space (E_t's pooled output, identity head)."""
        return F.normalize(self.text.encode(text)[0], dim=-1)

    # ------------------------------------------------------------------ translation (the caption protocol)
    def caption_memory(self, video: Tensor) -> Tensor:
        """Stage 2's encoder output for video [B, T, 3, H, W]: E_v(sign embedding(tokens)) [B, T', width]."""
        tokens = self.sign_projection(self.visual_tokens(video))
        tokens = F.relu(self.sign_norm(tokens.transpose(1, 2)).transpose(1, 2))
        return self.visual_encoder(tokens)

    def caption_logits(self, memory: Tensor, prefixes: Tensor) -> Tensor:
        return next_token_logits(self.decoder, memory, prefixes)

    def generate_captions(self, video: Tensor, max_length: int | None = None, beam_size: int = 1,
                          length_penalty: float = 1.0, min_length: int = 1) -> list[str]:
        """Translations of clips [B, T, 3, H, W] (greedy, or beam search with `beam_size` > 1; official 4)."""
        if self.stage != 2:
            raise ValueError("GFSLTVLP stage 1 trains no translator (its decoder reads sentences); translate with a "
                             "stage-2 model: stage: 2, start_from: <stage-1 last.ckpt>")
        return super().generate_captions(video, max_length, beam_size, length_penalty, min_length)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """`vlp predict` of clips: the base's features and, in stage 2, each clip's greedy translation
        (`generated`) next to its reference sentence."""
        outputs = super().predict_step(batch, batch_idx)
        if self.stage == 2:
            outputs["generated"] = self.generate_captions(batch["video"])
        return outputs

    # ------------------------------------------------------------------ objectives
    def mask_sentence(self, text: dict[str, Tensor]) -> dict[str, Tensor]:
        """ŷ: the sentence with its end ("omit_last") or random tokens ("random") masked (module doc)."""
        ids, attention = text["input_ids"], text["attention_mask"]
        specials = self.specials
        if self.noise == "omit_last":
            masked = omit_last(ids, attention, specials.mask_token_id, specials.special_token_ids, self.noise_rate)
        else:
            masked, _ = mask_tokens(ids, attention, mask_token_id=specials.mask_token_id,
                                    vocab_size=specials.vocab_size, special_token_ids=specials.special_token_ids,
                                    probability=self.noise_rate)
        return {"input_ids": masked, "attention_mask": attention}

    def decoder_loss(self, memory: Tensor, text: dict[str, Tensor]) -> Tensor:
        """-Σ log p_D(y_t | y_<t, memory): teacher-forced next-token cross-entropy of D reading `memory`."""
        _, states, mask = self.decoder.encode(text)
        return captioning_loss(self.decoder, states, mask, memory, text)

    def contrastive_loss(self, video_embeddings: Tensor, text_embeddings: Tensor, captions: list[str]) -> Tensor:
        logits = self.logit_scale.float().exp() * video_embeddings @ text_embeddings.T
        targets = momentum_targets(logits, same_text(captions, logits.device), alpha=0.0)
        return distilled_contrastive_loss(logits, logits.T, targets, targets)

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        text = batch["text"]
        if self.stage == 2:
            loss = self.decoder_loss(self.caption_memory(batch["video"]), text)
            return {"loss": loss, "translation": loss.detach()}
        text_embeddings = self.encode_text(text)
        loss_clip = self.contrastive_loss(self.encode_video(batch["video"]), text_embeddings, batch["caption"])
        with torch.no_grad():  # E_t is not trained by the reconstruction (official `Text_Decoder.forward`)
            masked_states = self.text.encode(self.mask_sentence(text))[1]
        loss_mlm = self.decoder_loss(masked_states, text)
        loss = loss_clip + self.reconstruction_weight * loss_mlm
        return {"loss": loss, "clip": loss_clip.detach(), "reconstruction": loss_mlm.detach(),
                "logit_scale": self.logit_scale.detach().exp()}

    def after_optimizer_step(self) -> None:
        """Clip the temperature at `max_logit_scale` (CLIP sec. 2.5)."""
        with torch.no_grad():
            self.logit_scale.clamp_(max=math.log(self.max_logit_scale))
