"""OphCLIP (Hu et al. 2024/2025, "OphCLIP: Hierarchical Retrieval-Augmented Learning for Ophthalmic Surgical
Video-Language Pretraining", arXiv 2411.15421, ICCV 2025).

Two ideas on the HecVL base (same towers, one embedding space per hierarchy level, `HecVL`):

1. Hierarchical video-text pretraining (the method section's clip-level and video-level pretraining): short clips are
   aligned with their narrations (the transcribed speech: fine-grained actions) and whole videos with their titles
   (the procedure), each level a contrastive (InfoNCE) loss over the batch, in the level's own space,

       L_narration = ½ (CE(s V_n U_nᵀ, P) + CE(s U_n V_nᵀ, Pᵀ)),   V_n: clip spans, U_n: their narrations,
       L_title     = ½ (CE(s V_t U_tᵀ, P) + CE(s U_t V_tᵀ, Pᵀ)),   V_t: mean-pooled whole clips, U_t: their titles,

   HecVL's narration and abstract levels exactly (`HecVL.level_loss`; P: the same-text positives of the base).
2. Retrieval-augmented pretraining (the method section's third part; the paper's abstract: "leverage the
   underexplored large-scale silent surgical procedure videos, automatically retrieving semantically relevant
   content"): videos without any speech still teach, through texts retrieved for them by maximum-inner-product
   search (MIPS) over a dynamic memory bank. Two directions are built (`retrieval`):

   `retrieval: narrations` (the default, the issue's direction): a silent clip v (its whole-clip embedding in the
   narration space) retrieves the k most similar distinct narrations R_k(v) from a text memory M = [this batch's
   narration embeddings (with gradient) ; a FIFO queue of past narration embeddings (detached)], and they are its
   soft positives:

       R_k(v) = top-k over distinct narrations n of max_{m in M, text(m) = n} <v, m>       (no gradient: a search)
       q(m | v) = 1 / (k · copies(text(m)))  if text(m) in R_k(v), else 0                 (each narration 1/k)
       L_retrieval = mean_v  -Σ_m q(m | v) log softmax_m(s <v, m>)                           (clip -> text only)
       L = w_n L_narration + w_t L_title + w_r L_retrieval.

   Silent clips take part in nothing else: they are neither rows nor columns of the two hierarchical losses (their
   missing texts would be false pairs) and the retrieval term has no text -> silent-clip direction (a silent clip
   would become a negative of every narration), so a silent clip changes the loss only through its retrieved
   positives (tested). The memory is filled with the batch's distinct narration embeddings at each training
   step, after they were read, gathered from every rank (each rank holds the same memory); each slot keeps its
   text's id (CRC-32), so copies of a narration stored at different steps count as one narration.

   `retrieval: silent_videos` (the paper's direction: its memory bank "stores multi-modal embeddings of 30K+ silent
   surgical videos", and MIPS "retrieves the top-K most relevant silent videos for each narrative video, adding them
   as auxiliary supervisory signals" to the video level): each narrated video's title u (in the title space)
   retrieves the k nearest distinct silent videos from M = [this batch's silent clips' whole-clip embeddings in the
   title space (with gradient) ; a FIFO queue of past ones (detached)], by the same R_k, q and soft cross-entropy
   with u in place of v (title -> silent video only). The silent videos learn only as the positives of the titles
   that retrieve them; a silent video's id is the CRC-32 of its shard `__key__`, so a clip seen again counts once.

Which clips are silent (the convention of this suite): a sample whose `caption` is empty (or only whitespace), or
whose batch entry `silent` (a bool per sample, when the batch has that key) is True. OphCLIP `accepts_silent_clips`,
so `VideoDataModule` keeps a clip without `.txt` (or marked `"silent": true` in its `.json`) as a silent one with
`silent` set, where other methods count it as a skip; `vlp-data babyai --silent-fraction F` writes such shards.
`silent_fraction` makes silent clips of narrated ones for training: each training batch, round(silent_fraction · B)
of its narrated samples (at least one stays narrated) lose their caption and narrations, chosen at random (the
global torch RNG, so `seed_everything` fixes them). Validation and test batches are never silenced.

The weight of the retrieval term matters: the positives are the model's own nearest narrations, so from a random
start every silent clip retrieves the same few and pulls the shared towers there. On BabyAI shards (default
towers, batch 16, silent_fraction 0.25, 150 steps) w_r = 1 pinned the title loss at ln(12), chance for the 12
narrated clips, within 50 steps, also with w_r ramped up over the first 100 steps; w_r = 0.25 trained the title
level as well as w_r = 0 did (2.05 vs 2.11 at step 150, from 2.69). Hence the default 0.25.

Deliberate changes and what is not confirmed (no official code was reachable here, minghu0830/OphCLIP; the paper's
method section was not either, only its abstract, its project page (uni-medical gmai-web, "Hierarchical
Retrieval-Augmented Pretraining") and summaries, so no equation numbers are cited): whether the paper's query is
the title, the narrations or the video embedding, and how the retrieved videos enter its loss (extra positives as
here, a separate term, or feature fusion) are not known here; the memory size and k are this suite's choices, the
positives are uniform over the k retrieved items (no similarity weighting), the paper's alternating training of
the two levels is one summed loss here, and its clip-level SimSiam-style self-supervised term on the visual
features is not built. Each training sample is one sampled clip of an episode (HecVL's convention):
its timeline segments are the narrations, its caption the title.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from vlp_lightning.catalog import Paper
from vlp_lightning.distributed import all_gather_no_grad
from vlp_lightning.losses.fusion import distilled_contrastive_loss
from vlp_lightning.methods.base import WarmupCosineLR
from vlp_lightning.methods.video.hecvl import HecVL
from vlp_lightning.modules.tokenizers import Tokenizer
from vlp_lightning.modules.vision import VisionEncoder

Retrieval = Literal["narrations", "silent_videos"]

#: the batch keys a silent sample's texts live in (dropped for the hierarchical levels).
TEXT_KEYS = ("caption", "segments")


def text_ids(texts: Sequence[str], device: torch.device | None = None) -> Tensor:
    """[N] long: a CRC-32 id per text, the same on every rank and in every process (Python's `hash` is salted)."""
    return torch.tensor([zlib.crc32(text.encode("utf-8")) for text in texts], dtype=torch.long, device=device)


@torch.no_grad()
def retrieve_nearest(queries: Tensor, keys: Tensor, key_ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """MIPS of the k nearest distinct keys (module doc, R_k): narrations for silent clips, or silent videos for
    titles.

    Args:
        queries: [S, D] unit embeddings of the queries (silent clips; titles).
        keys: [C, D] unit key embeddings (batch and memory); several may hold the same item (a narration's text, a
            silent video's key).
        key_ids: [C] id of each key's item.
        k: items per query (fewer when the keys hold fewer distinct items).

    Returns:
        (retrieved [S, k'] item ids, nearest first; targets [S, C] the soft positives q(m | v): each retrieved
        item 1/k', split evenly over its copies among the keys).
    """
    unique, inverse = key_ids.unique(return_inverse=True)  # [U], [C]
    similarity = queries.float() @ keys.float().T  # [S, C]
    best = similarity.new_full((queries.shape[0], unique.shape[0]), -torch.inf)
    best = best.scatter_reduce(1, inverse.expand_as(similarity), similarity, reduce="amax")  # [S, U]
    top = best.topk(min(k, unique.shape[0]), dim=1).indices  # [S, k']
    retrieved = unique[top]
    positive = (key_ids[None, :, None] == retrieved[:, None, :]).any(dim=-1).float()  # [S, C]
    copies = (key_ids[:, None] == key_ids[None, :]).sum(dim=1)  # [C]
    return retrieved, positive / copies[None, :] / top.shape[1]


class RetrievalMemory(nn.Module):
    """FIFO queue of `size` embeddings and their item ids (-1: an empty slot), the same on every rank: the
    narrations silent clips retrieve, or the silent videos titles retrieve.

    `MemoryBank` does not fit: a step stores a varying number of distinct items (its enqueue needs a fixed global
    batch dividing the size) and an empty slot must never be retrieved (its bank starts as random keys).
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("embeddings", torch.zeros(size, dim))  # [K, D]
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))  # [K]
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    def filled(self) -> tuple[Tensor, Tensor]:
        """(embeddings [K', D], ids [K']) of the filled slots."""
        keep = self.ids >= 0
        return self.embeddings[keep], self.ids[keep]

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, ids: Tensor) -> None:
        """Write `embeddings` [N, D] and their `ids` [N] of every rank (rank order, N may differ per rank) at the
        pointer, wrapping around; only the newest `size` are kept when more arrive at once."""
        counts = all_gather_no_grad(torch.tensor([ids.shape[0]], device=ids.device))
        most = int(counts.max())
        padded = embeddings.new_zeros(most, embeddings.shape[1])
        padded[: ids.shape[0]] = embeddings.detach()
        padded_ids = ids.new_full((most,), -1)
        padded_ids[: ids.shape[0]] = ids
        gathered, gathered_ids = all_gather_no_grad(padded), all_gather_no_grad(padded_ids)
        keep = gathered_ids >= 0
        gathered, gathered_ids = gathered[keep][-self.ids.shape[0]:], gathered_ids[keep][-self.ids.shape[0]:]
        slots = (int(self.pointer) + torch.arange(gathered_ids.shape[0], device=self.ids.device)) % self.ids.shape[0]
        self.embeddings[slots] = gathered.to(self.embeddings.dtype)
        self.ids[slots] = gathered_ids
        self.pointer.fill_((int(self.pointer) + gathered_ids.shape[0]) % self.ids.shape[0])


class OphCLIP(HecVL):
    """Clip <-> narration and video <-> title contrast (HecVL's levels), plus retrieved narrations as the soft
    positives of silent clips (module doc).

    Args:
        narration_weight, title_weight, retrieval_weight: w_n, w_t, w_r (module doc); retrieval runs in the
            narration space (retrieval: narrations) or the title space (silent_videos), so w_r > 0 needs that
            level's weight > 0. w_r = 0.25 by default: 1 collapsed both spaces on BabyAI (module doc).
        retrieval: who retrieves what (module doc): "narrations" (silent clips retrieve narrations, the issue's
            direction) or "silent_videos" (narrated videos' titles retrieve silent videos, the paper's).
        retrieval_k: items retrieved per query (k).
        memory_size: slots of the retrieval memory (K).
        silent_fraction: share of each training batch's narrated clips made silent (module doc); 0: only the
            batch's own silent clips (empty caption or `silent`).
        zero_shot_level: the space `encode_video` / `encode_text` embed in ("narration" or "abstract", the title
            level).
        (the rest: see `VideoTextMethod`)
    """

    paper = Paper("OphCLIP: Hierarchical Retrieval-Augmented Learning for Ophthalmic Surgical Video-Language "
                  "Pretraining", "Hu et al.", 2025,
                  note="OphVL not reachable: BabyAI sub-goals as narrations, missions as titles, silent clips by "
                       "silent_fraction or --silent-fraction shards; retrieval: silent_videos is the paper's "
                       "direction (titles retrieve silent videos), narrations the issue's")
    required_keys = ("video", "text", "segments")
    accepts_silent_clips = True  # caption-less clips are data here, not bad samples (module doc)

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
        narration_weight: float = 1.0,
        title_weight: float = 1.0,
        retrieval_weight: float = 0.25,
        retrieval: Retrieval = "narrations",
        retrieval_k: int = 4,
        memory_size: int = 256,
        silent_fraction: float = 0.0,
        zero_shot_level: Literal["narration", "abstract"] = "narration",
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(vision, text, tokenizer, embed_dim, pretrained_clip, lock_text, num_frames, crop_scale,
                         narration_weight=narration_weight, summary_weight=0.0, abstract_weight=title_weight,
                         zero_shot_level=zero_shot_level, init_logit_scale=init_logit_scale,
                         max_logit_scale=max_logit_scale, optimizer=optimizer, lr_scheduler=lr_scheduler,
                         compile=compile)
        if retrieval not in ("narrations", "silent_videos"):
            raise ValueError(f"OphCLIP retrieval={retrieval!r} is not one of 'narrations' (silent clips retrieve "
                             "narrations) or 'silent_videos' (titles retrieve silent videos, the paper's)")
        space, weight = ("narration", narration_weight) if retrieval == "narrations" else ("title", title_weight)
        if retrieval_weight < 0 or (retrieval_weight > 0 and not weight):
            raise ValueError(f"retrieval_weight={retrieval_weight}: it must be >= 0, and > 0 needs {space}_weight "
                             f"> 0 (retrieval={retrieval!r} retrieves in the {space} space); set {space}_weight: "
                             "1.0 or retrieval_weight: 0")
        if retrieval_k < 1 or memory_size < 1:
            raise ValueError(f"retrieval_k={retrieval_k} and memory_size={memory_size} must both be >= 1")
        if not 0.0 <= silent_fraction < 1.0:
            raise ValueError(f"silent_fraction={silent_fraction} must lie in [0, 1) (at least one clip of a batch "
                             "stays narrated); e.g. silent_fraction: 0.25")
        self.retrieval_weight, self.retrieval = retrieval_weight, retrieval
        self.retrieval_k = retrieval_k
        self.silent_fraction = silent_fraction
        self.memory = RetrievalMemory(memory_size, self.embed_dim)

    # ------------------------------------------------------------------ silent clips
    def silent_mask(self, batch: dict) -> Tensor:
        """[B] bool on the CPU: the batch's silent clips (empty caption or `silent`), plus, in training,
        round(silent_fraction · B) of its narrated clips drawn at random (at least one stays narrated)."""
        silent = torch.tensor([not caption.strip() for caption in batch["caption"]], dtype=torch.bool)
        if "silent" in batch:
            silent |= torch.as_tensor(batch["silent"], dtype=torch.bool).cpu()
        if self.training and self.silent_fraction > 0:
            narrated = (~silent).nonzero().squeeze(1)
            count = min(round(self.silent_fraction * silent.shape[0]), narrated.shape[0] - 1)
            if count > 0:
                silent[narrated[torch.randperm(narrated.shape[0])[:count]]] = True
        return silent

    def narrated_batch(self, batch: dict, narrated: Tensor) -> dict:
        """The samples `narrated` ([B] bool) of a batch: video, text tokens, caption, segments."""
        index = narrated.nonzero().squeeze(1)
        rows = index.tolist()
        return {"video": batch["video"][index.to(batch["video"].device)],
                "text": {name: value[index.to(value.device)] for name, value in batch["text"].items()},
                **{key: [batch[key][row] for row in rows] for key in TEXT_KEYS}}

    def narration_keys(self, segments: list[list[tuple[int, int, str]]]) -> tuple[Tensor, Tensor]:
        """(unit embeddings [N, D] in the narration space, with gradient; text ids [N]) of the distinct narrations
        of the narrated clips."""
        texts = list(dict.fromkeys(text for spans in segments for *_, text in spans))
        device = self.logit_scale.device
        if not texts:
            return torch.zeros(0, self.embed_dim, device=device), torch.zeros(0, dtype=torch.long, device=device)
        tokens = {name: value.to(device) for name, value in self.tokenizer(texts).items()}
        return F.normalize(self.text_projections["narration"](self.text(tokens)), dim=-1), text_ids(texts, device)

    def silent_video_keys(self, batch: dict, silent: Tensor) -> tuple[Tensor, Tensor]:
        """(unit embeddings [S, D] of the silent clips in the title space, with gradient; ids [S]: the CRC-32 of
        each clip's `__key__`, or ids unique to this step and rank where the batch has no keys)."""
        video = batch["video"][silent.to(batch["video"].device)]
        if not video.shape[0]:
            device = self.logit_scale.device
            return torch.zeros(0, self.embed_dim, device=device), torch.zeros(0, dtype=torch.long, device=device)
        embeddings = F.normalize(self.image_projection(self.frame_features(video).mean(dim=1)), dim=-1)
        rows = silent.nonzero().squeeze(1).tolist()
        keys = ([str(batch["__key__"][row]) for row in rows] if "__key__" in batch else
                [f"step {self.global_step if self._trainer else 0} rank {self.global_rank} row {row}" for row in rows])
        return embeddings, text_ids(keys, embeddings.device)

    def retrieval_loss(self, queries: Tensor, batch_keys: Tensor, batch_ids: Tensor) -> Tensor | None:
        """L_retrieval (module doc) of unit queries [S, D] (silent clips; titles) against the batch's keys
        (narrations; silent videos) and the memory; None when there is nothing to retrieve."""
        memory_keys, memory_ids = self.memory.filled()
        keys = torch.cat([batch_keys, memory_keys.to(batch_keys.dtype)])  # [C, D]
        ids = torch.cat([batch_ids, memory_ids])
        if not ids.numel() or not queries.shape[0]:
            return None
        _, targets = retrieve_nearest(queries, keys, ids, self.retrieval_k)
        logits = self.logit_scale.exp() * queries @ keys.T  # [S, C]
        return distilled_contrastive_loss(logits, logits, targets, targets)  # ½ (L + L): the one-way soft CE

    # ------------------------------------------------------------------ objective
    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        silent = self.silent_mask(batch)
        outputs: dict[str, Tensor] = {}
        total = torch.zeros((), device=self.logit_scale.device)
        if not bool(silent.all()):
            outputs = dict(super().forward_loss(self.narrated_batch(batch, ~silent)))
            total = outputs.pop("loss")
            if "abstract_loss" in outputs:
                outputs["title_loss"] = outputs.pop("abstract_loss")
        if self.retrieval_weight:
            retrieval = None
            if self.retrieval == "narrations":  # silent clips query the narrations (module doc)
                narrated_segments = [spans for spans, is_silent in zip(batch["segments"], silent.tolist())
                                     if not is_silent]
                keys, ids = self.narration_keys(narrated_segments)
                if bool(silent.any()):
                    video = batch["video"][silent.to(batch["video"].device)]
                    queries = F.normalize(self.video_projections["narration"](
                        self.frame_features(video).mean(dim=1)), dim=-1)  # [S, D]
                    retrieval = self.retrieval_loss(queries, keys, ids)
            else:  # narrated videos' titles query the silent videos (the paper's direction)
                keys, ids = self.silent_video_keys(batch, silent)
                if not bool(silent.all()):
                    index = (~silent).nonzero().squeeze(1)
                    tokens = {name: value[index.to(value.device)] for name, value in batch["text"].items()}
                    queries = F.normalize(self.text_projection(self.text(tokens)), dim=-1)  # [N_narrated, D]
                    retrieval = self.retrieval_loss(queries, keys, ids)
            if retrieval is not None:
                total = total + self.retrieval_weight * retrieval
                outputs["retrieval_loss"] = retrieval.detach()
            if self.training:
                self.memory.enqueue(keys.detach(), ids)
        if not total.requires_grad:  # a batch with nothing to learn from (all silent, empty memory): a zero loss
            total = total + 0.0 * self.logit_scale
        return {"loss": total, **outputs, "silent_clips": silent.sum().float(),
                "logit_scale": self.logit_scale.detach().exp()}
