"""VIOLET (Fu et al. 2021, "VIOLET: End-to-End Video-Language Transformers with Masked Visual-token Modeling").

One single-stream model over raw frames and text (sec. 3, Fig. 2; official code tsujuifu/pytorch_violet, `model.py`,
`main_pretrain.py`):

* Video transformer (sec. 3.1, "Video Swin Transformer"): the frames' patches x_{t,h,w} become tokens that attend
  across space *and time*, so the video features carry temporal dynamics rather than a mean of frame features. Here
  a timm ViT's patch embedding (with its class and spatial position embeddings) per frame, plus a learned temporal
  embedding per frame (official `emb_len`), then the ViT's blocks over all T (1 + L) tokens of the clip at once
  (joint space-time attention), then a linear map to the cross-modal width and a LayerNorm (official `EncImg`:
  cls + position + temporal embeddings, `norm`).
* Text embedding (sec. 3.1): token + position embeddings and a LayerNorm (BERT's embeddings, official `EncTxt`).
* Cross-modal transformer (sec. 3.1): plain self-attention blocks over the concatenation [v; w] of the video and
  text tokens (official: BERT-base's encoder on `cat([feat_img, feat_txt])`), padding hidden as keys.

Three pre-training losses, summed with weight 1 each (official `Agent_Pretrain.step`: ls_mtm + ls_mvm + ls_vtm):

* VTM, video-text matching (sec. 3.2): each video i is scored against its own text and O - 1 = 3 texts of
  other samples of the batch (official `_O = min(B, 4)`), s = FC(h_[CLS]) / 0.05 on the cross-modal output at the
  text's first token, and L_VTM = -log softmax(s)_positive, a cross-entropy over the O candidates with the positive
  in column 0 (official `ans_vtm = 0`; the paper writes it as a binary matching score). Negatives are drawn
  uniformly among samples whose caption differs (`draw_matching_candidates`).
* MLM (sec. 3.2): 15 % of the text tokens masked, predicted from the cross-modal output through BERT's MLM
  head tied to the token embedding, L_MLM = -E log P(w_i | w_\\i, v) (`losses.fusion.mask_tokens`, `mlm_loss`).
* MVM, masked visual-token modelling (sec. 3.2): patches of the frames are masked (their pixels set to 0,
  official `img *= 1 - cov`) and the model predicts the *discrete visual token* q_{t,h,w} of each masked patch from
  the cross-modal output at that patch, L_MVM = -E log P(q_{t,h,w} | v_\\masked, w), a cross-entropy over the
  codebook (official `fc_mvm`: MLP width -> 2 width -> 8192). Masks are blockwise (sec. 3.2, "Blockwise Masking";
  official: per clip T random 3-D blocks of t x h x w patches, t < T, h < 2/3 of the grid height, w < 2/3 of its
  width, `blockwise_mask`).

Discrete visual tokens: the paper's q are DALL-E dVAE codes (8,192 entries, one per 32 px patch region), which are
not reachable offline. Here they are **k-means codes of the patch pixels** (`codebook_size` centroids of the
normalised pixel rows `patchify` gives, Lloyd's algorithm), **fitted once, on the patches of the first
`codebook_batches` training batches** (1 by default: the first batch; gathered from every rank under DDP, fitted on
rank 0 and broadcast), then frozen like a pretrained tokenizer and stored in the checkpoint (`codebook`). A patch's
token is its nearest centroid, computed on the unmasked clip. Until the codebook is fitted (the first
`codebook_batches` - 1 steps) the MVM term is 0.

Representations: `probe_features` (the video transformer's class tokens averaged over frames, before the cross-modal
transformer: what kNN and linear probes read), `match_scores` (the VTM logit of video-text pairs: VIOLET's
retrieval score), `video_text_logits` (the same logit for every video-text pair [B, N]: zero-shot recognition
and VideoPhy; it has no two-tower joint space, so no `encode_video` / `encode_text`).

Deliberate changes / not confirmed: the paper's PDF was not reachable here, so sections are cited from its structure
and the losses as the official code computes them, not by equation number; Video Swin (local 3-D windows, shifted)
is replaced by a ViT with joint space-time attention (the same role, temporal attention over frame patches; no
pretrained Video Swin here); the official code masks half of the clips by *attended* masking (patches and words the
model attends to most, sampled from a first forward's attention), only blockwise masking here; official MLM replaces
every chosen token by [MASK], here BERT's 80 / 10 / 10 of the suite's `mask_tokens`; as in the official code, the
VTM pairs are scored on the masked video and text of the same step; negatives with the same caption as the positive
are avoided (the official code draws any other sample; repeated captions are common in short clip data); dropout of
the official heads is omitted; the tokens come from k-means rather than DALL-E (above).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from timm.layers import trunc_normal_
from torch import Tensor, nn

from data_modules.clip_views import ClipViews
from vlp_lightning.catalog import Paper
from vlp_lightning.distributed import all_gather_no_grad, is_distributed
from vlp_lightning.losses.fusion import mask_tokens, mlm_loss
from vlp_lightning.methods.adaptation.pcb import badge_select
from vlp_lightning.methods.base import VLPMethod, WarmupCosineLR
from vlp_lightning.methods.fusion.albef import mlm_head
from vlp_lightning.methods.fusion.common import text_specials
from vlp_lightning.methods.video.base import same_text
from vlp_lightning.modules.fusion import FusionBlock
from vlp_lightning.modules.masking import patchify, unpatchify, vit_transformer
from vlp_lightning.modules.tokenizers import ByteTokenizer, Tokenizer
from vlp_lightning.modules.vision import VisionEncoder, tiny_vit


def blockwise_mask(batch: int, frames: int, grid_h: int, grid_w: int, device: torch.device | None = None) -> Tensor:
    """VIOLET's blockwise masking (sec. 3.2; official `Agent_Pretrain.masking`): per clip, the union of `frames`
    random 3-D blocks of t x h x w patches (t in [1, T - 1], h in [1, 2/3 grid_h), w in [1, 2/3 grid_w), each at
    least 1), placed uniformly. bool [B, T, grid_h, grid_w], True where masked; draws from torch's global RNG."""

    def size(limit: int) -> int:
        return int(torch.randint(1, max(2, limit), ()))

    mask = torch.zeros(batch, frames, grid_h, grid_w, dtype=torch.bool)
    for sample in range(batch):
        for _ in range(frames):
            t, h, w = size(frames), size(grid_h * 2 // 3), size(grid_w * 2 // 3)
            t, h, w = min(t, frames), min(h, grid_h), min(w, grid_w)
            t0, h0, w0 = (int(torch.randint(0, limit - extent + 1, ())) for limit, extent in
                          ((frames, t), (grid_h, h), (grid_w, w)))
            mask[sample, t0:t0 + t, h0:h0 + h, w0:w0 + w] = True
    return mask.to(device)


def kmeans(points: Tensor, clusters: int, iterations: int, generator: torch.Generator | None = None) -> Tensor:
    """Lloyd's k-means of points [N, D] -> centroids [clusters, D] (fp32), seeded by k-means++ (Arthur &
    Vassilvitskii 2007; the suite's `badge_select`); an empty cluster keeps its centroid."""
    points = points.float()
    if points.shape[0] < clusters:
        raise ValueError(f"k-means of {clusters} codes needs at least as many patches, got {points.shape[0]}; "
                         "lower codebook_size or raise codebook_batches")
    seeding = generator if points.device.type == "cpu" else None  # a CPU generator cannot draw on a GPU
    centroids = points[badge_select(points, clusters, seeding).to(points.device)].clone()
    for _ in range(iterations):
        assignment = torch.cdist(points, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=clusters).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids


def draw_matching_candidates(captions: list[str], candidates: int, device: torch.device | None = None) -> Tensor:
    """[B, O] text indices each video is scored against in VTM: column 0 its own text (the label), then O - 1
    distinct other samples drawn uniformly, those with a different caption first (module doc)."""
    batch = len(captions)
    other = ~torch.eye(batch, dtype=torch.bool)
    different = ~same_text(captions, torch.device("cpu"))
    keys = torch.rand(batch, batch) + other.float() + different.float()  # different text > same text > itself
    keys[~other] = -1.0
    negatives = keys.argsort(dim=1, descending=True)[:, :candidates - 1]
    return torch.cat([torch.arange(batch)[:, None], negatives], dim=1).to(device)


class VIOLET(VLPMethod):
    """Video transformer + cross-modal transformer, trained by VTM + MLM + MVM on k-means visual tokens (module doc).

    Args:
        vision: the timm ViT whose patch embedding and blocks form the video transformer (default: `tiny_vit()`;
            the paper: Video Swin-Base).
        tokenizer: caption tokenizer (default: bytes, 32 tokens; the paper: BERT's, 32 tokens).
        width, layers, heads: the cross-modal transformer (BERT-base: 768, 12, 12).
        num_frames: frames per clip (the paper: 4 in pre-training); also the temporal embeddings' length.
        crop_scale: area range of the one random crop drawn per clip.
        codebook_size: visual-token vocabulary (DALL-E's 8,192 in the paper; k-means centroids here).
        kmeans_iterations: Lloyd iterations of the one-time codebook fit.
        codebook_batches: training batches whose patches the codebook is fitted on (at least `codebook_size`
            patches in all; at most 65,536 are kept).
        mask_probability: share of text tokens MLM masks (0.15).
        matching_candidates: O, texts each video is ranked against in VTM (official 4).
        matching_temperature: the VTM logits' divisor (official 0.05).
        matching_weight, mlm_weight, mvm_weight: weights of the three losses (1 each, official).
        optimizer, lr_scheduler, compile: see `VLPMethod`.
    """

    paper = Paper("VIOLET: End-to-End Video-Language Transformers with Masked Visual-token Modeling", "Fu et al.",
                  2021, note="k-means codes of patch pixels, fitted once on the first batches, replace DALL-E's "
                  "dVAE tokens")
    family = "video-language"
    view_kind = "clip"
    required_keys = ("video", "text")
    no_weight_decay_names = ("temporal_embedding", "text_positions")

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        tokenizer: Tokenizer | None = None,
        width: int = 64,
        layers: int = 2,
        heads: int = 2,
        num_frames: int = 4,
        crop_scale: tuple[float, float] = (0.9, 1.0),
        codebook_size: int = 32,
        kmeans_iterations: int = 20,
        codebook_batches: int = 1,
        mask_probability: float = 0.15,
        matching_candidates: int = 4,
        matching_temperature: float = 0.05,
        matching_weight: float = 1.0,
        mlm_weight: float = 1.0,
        mvm_weight: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.save_hyperparameters(ignore=["vision", "tokenizer", "optimizer", "lr_scheduler"])
        self.tokenizer = tokenizer or ByteTokenizer(context_length=32)
        self.specials = text_specials(self.tokenizer)
        self.vision = vision or tiny_vit()
        model = self.vision.model
        if not hasattr(model, "blocks") or not hasattr(model, "_pos_embed") or self.vision.patch_size is None:
            raise ValueError(f"VIOLET's video transformer runs a timm ViT's blocks over the clip's patches, not a "
                             f"{type(model).__name__}; use a vit_* model_name")
        if matching_candidates < 2:
            raise ValueError(f"matching_candidates={matching_candidates}: VTM ranks the positive text among at least "
                             "one negative; use 2 or more (official 4)")
        vision_width = self.vision.num_features
        self.num_frames = num_frames
        self.crop_scale = tuple(crop_scale)
        self.temporal_embedding = nn.Parameter(torch.zeros(1, num_frames, 1, vision_width))
        self.video_projection = nn.Linear(vision_width, width)
        self.video_norm = nn.LayerNorm(width)
        self.token_embedding = nn.Embedding(self.specials.vocab_size, width)
        self.text_positions = nn.Parameter(torch.zeros(self.tokenizer.context_length, width))
        self.text_norm = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(FusionBlock(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.mlm_head = mlm_head(width)
        self.mlm_bias = nn.Parameter(torch.zeros(self.specials.vocab_size))
        self.mvm_head = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, codebook_size))
        self.matching_head = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, 1))
        patch_dim = 3 * self.vision.patch_size ** 2
        self.register_buffer("codebook", torch.zeros(codebook_size, patch_dim))
        self.register_buffer("codebook_fitted", torch.tensor(False))
        for parameter in (self.temporal_embedding, self.text_positions):
            trunc_normal_(parameter, std=0.02)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.codebook_size, self.kmeans_iterations = codebook_size, kmeans_iterations
        if codebook_batches < 1:
            raise ValueError(f"codebook_batches={codebook_batches}: the codebook is fitted on at least one batch")
        self.codebook_batches = codebook_batches
        self._codebook_patches: list[Tensor] = []  # patches seen before the fit (not in the checkpoint)
        self.mask_probability = mask_probability
        self.matching_count, self.matching_temperature = matching_candidates, matching_temperature
        self.matching_weight, self.mlm_weight, self.mvm_weight = matching_weight, mlm_weight, mvm_weight

    def train_views(self) -> ClipViews:
        """`num_frames` frames by segment sampling, one crop per clip, no flip (motion captions name directions)."""
        return ClipViews(num_frames=self.num_frames, sampling="segments", scale=self.crop_scale, hflip=False,
                         mean=self.vision.mean, std=self.vision.std)

    # ------------------------------------------------------------------ encoders
    @property
    def patch_grid(self) -> tuple[int, int]:
        side = self.vision.img_size // self.vision.patch_size
        return side, side

    def video_features(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] -> the video transformer's tokens [B, T, P + L, width_vision] (P prefix tokens per
        frame): per-frame patch + spatial position embeddings, a temporal embedding, joint space-time blocks."""
        model = self.vision.model
        batch, frames = video.shape[:2]
        if frames > self.temporal_embedding.shape[1]:
            raise ValueError(f"VIOLET has temporal embeddings for {self.temporal_embedding.shape[1]} frames, the clip "
                             f"has {frames}; build it with num_frames: {frames}")
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(video.flatten(0, 1))))   # [B*T, P + L, w]
        tokens = tokens.view(batch, frames, tokens.shape[1], -1) + self.temporal_embedding[:, :frames]
        tokens = vit_transformer(model, tokens.flatten(1, 2))                                # [B, T (P + L), w]
        return tokens.view(batch, frames, -1, tokens.shape[-1])

    def video_tokens(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] -> the cross-modal transformer's video tokens [B, T (P + L), width]."""
        return self.video_norm(self.video_projection(self.video_features(video).flatten(1, 2)))

    def text_tokens(self, input_ids: Tensor) -> Tensor:
        """token ids [B, L] -> text tokens [B, L, width] (token + position embeddings, LayerNorm)."""
        return self.text_norm(self.token_embedding(input_ids) + self.text_positions[:input_ids.shape[1]])

    def cross_modal(self, video_tokens: Tensor, text_tokens: Tensor, attention_mask: Tensor) -> Tensor:
        """[v; w] through the cross-modal blocks -> [B, V + L, width]; text padding is never a key."""
        keys = torch.cat([attention_mask.new_ones(video_tokens.shape[:2]), attention_mask], dim=1).bool()
        x = torch.cat([video_tokens, text_tokens], dim=1)
        for block in self.blocks:
            x = block(x, keys[:, None, None, :])
        return self.norm(x)

    def probe_features(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] (or images: one-frame clips) -> class tokens averaged over frames [B, width]."""
        video = video if video.ndim == 5 else video.unsqueeze(1)
        return self.video_features(video)[:, :, 0].mean(dim=1)

    def match_scores(self, video: Tensor, text: dict[str, Tensor]) -> Tensor:
        """VTM logits [B] of the pairs (video i, text i), unmasked: VIOLET's retrieval score."""
        video_tokens = self.video_tokens(video)
        out = self.cross_modal(video_tokens, self.text_tokens(text["input_ids"]), text["attention_mask"])
        return self.matching_head(out[:, video_tokens.shape[1]]).squeeze(-1)

    def video_text_logits(self, video: Tensor, text: dict[str, Tensor], chunk: int = 256) -> Tensor:
        """VTM logits [B, N] of every (video i, text j), unmasked: zero-shot recognition and VideoPhy by the matching
        head. The video transformer runs once per clip; the cross-modal transformer once per pair, `chunk` pairs at
        a time (B x N passes: VIOLET has no two-tower space to shortcut them)."""
        video_tokens = self.video_tokens(video)                                           # [B, V, width]
        text_tokens = self.text_tokens(text["input_ids"])                                 # [N, L, width]
        batch, count = video_tokens.shape[0], text_tokens.shape[0]
        pairs = torch.cartesian_prod(torch.arange(batch), torch.arange(count)).to(video_tokens.device)
        scores = []
        for part in pairs.split(chunk):
            out = self.cross_modal(video_tokens[part[:, 0]], text_tokens[part[:, 1]],
                                   text["attention_mask"][part[:, 1]])
            scores.append(self.matching_head(out[:, video_tokens.shape[1]]).squeeze(-1))
        return torch.cat(scores).view(batch, count)

    # ------------------------------------------------------------------ visual tokens
    def frame_patches(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] -> pixel rows of every patch [B, T, L, 3 p^2] (`patchify` per frame)."""
        batch, frames = video.shape[:2]
        return patchify(video.flatten(0, 1), self.vision.patch_size).view(batch, frames, -1, self.codebook.shape[1])

    @torch.no_grad()
    def fit_codebook(self, patches: Tensor) -> None:
        """k-means of patch rows [N, 3 p^2] into `codebook` (module doc); rank 0's centroids under DDP."""
        generator = torch.Generator().manual_seed(0)
        centroids = kmeans(patches, self.codebook_size, self.kmeans_iterations, generator)
        if is_distributed():
            dist.broadcast(centroids, src=0)
        self.codebook.copy_(centroids)
        self.codebook_fitted.fill_(True)

    @torch.no_grad()
    def visual_tokens(self, video: Tensor) -> Tensor | None:
        """video [B, T, 3, H, W] -> the discrete visual token of every patch [B, T, L] (its nearest centroid); None
        while the codebook still collects its `codebook_batches` training batches (it is fitted on the last of
        them), and in evaluation before it is fitted."""
        patches = self.frame_patches(video).float()
        if not bool(self.codebook_fitted):
            if not self.training:  # only training batches fit it (not Lightning's sanity-check validation)
                return None
            rows = all_gather_no_grad(patches.reshape(-1, patches.shape[-1]))
            keep = 65536 // self.codebook_batches  # each batch's share of the patches k-means sees
            if rows.shape[0] > keep:
                rows = rows[torch.randperm(rows.shape[0], device=rows.device)[:keep]]
            self._codebook_patches.append(rows)
            if len(self._codebook_patches) < self.codebook_batches:
                return None
            self.fit_codebook(torch.cat(self._codebook_patches))
            self._codebook_patches = []
        distances = torch.cdist(patches.flatten(0, 2), self.codebook.float())
        return distances.argmin(dim=1).view(patches.shape[:3])

    def mask_video(self, video: Tensor, mask: Tensor) -> Tensor:
        """Zero the pixels of the masked patches (mask [B, T, L]) of video [B, T, 3, H, W] (official
        `img *= 1 - cov`; 0 is the data mean after normalisation)."""
        batch, frames = video.shape[:2]
        patch = self.vision.patch_size
        keep = (~mask).to(video.dtype).flatten(0, 1).unsqueeze(-1).expand(-1, -1, 3 * patch * patch)
        pixel_keep = unpatchify(keep, patch, self.patch_grid).view_as(video)
        return video * pixel_keep

    def mask_text(self, text: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """BERT masking of the real, non-special text tokens -> (masked ids [B, L], labels [B, L], -100 elsewhere)."""
        return mask_tokens(text["input_ids"], text["attention_mask"], mask_token_id=self.specials.mask_token_id,
                           vocab_size=self.specials.vocab_size, special_token_ids=self.specials.special_token_ids,
                           probability=self.mask_probability)

    # ------------------------------------------------------------------ objective
    def masked_visual_token_loss(self, patch_states: Tensor, codes: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """L_MVM (sec. 3.2): cross-entropy of the codebook logits at the masked patches only against their codes.
        patch_states [B, T, L, width], codes / mask [B, T, L] -> (loss, accuracy)."""
        logits = self.mvm_head(patch_states[mask]).float()                               # [M, K]
        targets = codes[mask]
        return F.cross_entropy(logits, targets), (logits.argmax(-1) == targets).float().mean()

    def matching_loss(self, video_tokens: Tensor, text_tokens: Tensor, attention_mask: Tensor,
                      captions: list[str]) -> tuple[Tensor, Tensor]:
        """L_VTM (sec. 3.2): each video against its text and O - 1 others, cross-entropy with the positive first."""
        batch = video_tokens.shape[0]
        count = min(batch, self.matching_count)
        if count < 2:  # one sample: nothing to rank against (the head still takes part, for DDP)
            return self.matching_head(video_tokens[:, 0]).sum() * 0.0, video_tokens.new_ones(())
        candidates = draw_matching_candidates(list(captions), count, video_tokens.device)     # [B, O]
        videos = video_tokens.repeat_interleave(count, dim=0)                            # [B O, V, width]
        out = self.cross_modal(videos, text_tokens[candidates.flatten()], attention_mask[candidates.flatten()])
        logits = self.matching_head(out[:, video_tokens.shape[1]]).view(batch, count).float()
        logits = logits / self.matching_temperature
        labels = torch.zeros(batch, dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, labels), (logits.argmax(-1) == 0).float().mean()

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        video, text = batch["video"], batch["text"]
        grid_h, grid_w = self.patch_grid
        codes = self.visual_tokens(video)                                                 # [B, T, L] | None
        mask = blockwise_mask(video.shape[0], video.shape[1], grid_h, grid_w, video.device).flatten(2)
        masked_ids, labels = self.mask_text(text)
        video_tokens = self.video_tokens(self.mask_video(video, mask))                     # [B, V, width]
        text_tokens = self.text_tokens(masked_ids)
        out = self.cross_modal(video_tokens, text_tokens, text["attention_mask"])
        length = video_tokens.shape[1]
        chosen = labels != -100  # vocabulary logits only where a token was masked
        text_out = self.mlm_head(out[:, length:][chosen])
        loss_mlm = mlm_loss(F.linear(text_out, self.token_embedding.weight, self.mlm_bias)[None],
                            labels[chosen][None])
        frames = video.shape[1]
        patch_states = out[:, :length].view(video.shape[0], frames, -1, out.shape[-1])
        patch_states = patch_states[:, :, self.vision.model.num_prefix_tokens:]           # [B, T, L, width]
        if codes is None:  # the codebook is not fitted yet: no targets (the head still takes part, for DDP)
            loss_mvm, mvm_accuracy = self.mvm_head(patch_states[:1, 0, :1]).sum() * 0.0, patch_states.new_zeros(())
        else:
            loss_mvm, mvm_accuracy = self.masked_visual_token_loss(patch_states, codes, mask)
        loss_vtm, vtm_accuracy = self.matching_loss(video_tokens, text_tokens, text["attention_mask"],
                                                    batch["caption"])
        loss = self.matching_weight * loss_vtm + self.mlm_weight * loss_mlm + self.mvm_weight * loss_mvm
        return {"loss": loss, "vtm": loss_vtm.detach(), "mlm": loss_mlm.detach(), "mvm": loss_mvm.detach(),
                "vtm_accuracy": vtm_accuracy, "mvm_accuracy": mvm_accuracy}
