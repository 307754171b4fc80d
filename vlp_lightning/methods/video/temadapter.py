"""Tem-Adapter (Chen et al. 2023, "Tem-Adapter: Adapting Image-Text Pretraining for Video Question Answer", ICCV;
official code XLiu443/Tem-adapter: model/TempAligner.py, SemanticAligner.py, train.py).

A FROZEN image CLIP answers questions about videos through two small trained aligners (paper sec. 3, Fig. 3); the
image tower, the text tower, their projections and the temperature stay as they were (`pretrained_clip`, or the
base's tiny towers, frozen all the same). With the frame embeddings f_t = W_v f(x_t) [B, T, D] and the embedding
e = W_u g(y) of a text (CLIP's joint space, as the official code reads pre-extracted CLIP ViT-B/32 features):

1. Event descriptions (sec. 3.3, the template): a question q and a candidate answer a_k become one sentence,
   y_k = template(q, a_k), here `template.format(question=q, answer=a_k)`; e_k = W_u g(y_k).
2. Semantic Aligner (sec. 3.3; official `SemanticAligner` / `ContextDecoder`): a transformer decoder whose query is
   the description's embedding and whose memory is the whole clip's frame sequence refines it, with a learned
   per-channel gate γ that starts at 1e-4 (so training starts from CLIP's own text embedding):

       ê_k = e_k + γ ⊙ Dec_s(e_k, [f_1 .. f_T])

3. Temporal Aligner (sec. 3.2; official `TempAligner`): a transformer encoder over the frames with sinusoidal
   positions p_t gives the aligned video embedding, and a language-guided autoregressive decoder predicts the next
   frame's feature from the previous ones and the event description of the correct answer (the "language guidance
   that describes event progression"):

       h = Enc(f + p)                                   v = normalise(mean_t h_t)   the aligned video embedding
       h^c = Enc_causal(f + p)                          the same encoder, each frame seeing frames <= t only
       f̂_{t+1} = Dec_t(f_{<=t} + p_{<=t} ; memory h^c_{<=t} + e_{y*})   causal self- and cross-attention
       L_pred = 1/(T-1) sum_{t=1}^{T-1} || f̂_{t+1} - f_{t+1} ||² / D     (official `mseloss`, the "reconstruction")

4. Video QA (sec. 3.4): the answer scores are the similarities of v to each refined description,
   s_k = s cos(v, ê_k) with CLIP's (frozen) temperature s, and L_QA = CE(s, k*) over the K candidates;
   L = w_qa L_QA + w_pred L_pred.

Candidates on this suite's clips: when every sample's `.json` (the batch's `meta`) holds a multiple-choice question,
`{"question": str, "candidates": [str, ...], "answer": int}` with the same number of candidates per sample, those
are the candidates. Otherwise the clip's caption (a moving emoji's motion, a BabyAI mission) is its answer to the
fixed `question` (default none: the same for every candidate, it tells no two apart, and a short context such
as the byte tokenizer's 32 would be spent on it), and the candidates of every sample are the DISTINCT
captions of the batch: its own is the correct one, the other samples' captions the distractors (equal captions are
one candidate, as the base's same-text positives). `video_text_logits` (zero-shot recognition) scores texts the same
way, each text refined with each video.

Deliberate changes from the official code, so that the autoregressive prediction is causal: the official decoder
reads the frames at positions <= t and is asked to return frame t itself, with a memory made of the bidirectional
encoder's output over ALL frames plus the (video-refined) correct answer, so it can see the frame it predicts; here
the decoder at position t reads frames <= t and predicts frame t + 1, its memory is the same encoder run causally
(frames <= t only; the prediction loss still trains the encoder, as in the official code) plus the UNREFINED
description embedding e_{y*} (the refined one has seen the whole clip). The official QA loss is a multi-class hinge,
sum_k max(0, 1 + s_k - s_{k*}) on unnormalised dot products, weighted 0.01 against the MSE; here CE over the scaled
cosines (w_qa = w_pred = 1 by default; Fig. 3's caption names "classification and reconstruction losses"). Not
confirmed: the paper's equation numbers and the section numbers cited above (read from the official code and the
abstract's order, not from the paper's text), its exact template sentences (the official repository ships the
SUTD-TrafficQA annotations already converted), and whether the paper's prediction is of the next frame or of the
next clip (here the next sampled frame).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from vlp_lightning.catalog import Paper
from vlp_lightning.methods.base import WarmupCosineLR
from vlp_lightning.methods.video.base import VideoTextMethod
from vlp_lightning.modules.tokenizers import Tokenizer
from vlp_lightning.modules.vision import VisionEncoder


def sinusoidal_encoding(positions: Tensor, width: int) -> Tensor:
    """positions [...] (frame indices, or diffusion times) -> [..., width] sine-cosine encodings (Vaswani et al. 2017,
    sec. 3.5; the official `PositionalEncoding`), sines on the even channels and cosines on the odd ones."""
    frequency = torch.exp(torch.arange(0, width, 2, dtype=torch.float32, device=positions.device)
                          * (-math.log(10000.0) / width))
    angles = positions.float()[..., None] * frequency
    encoding = torch.zeros(*positions.shape, width, device=positions.device)
    encoding[..., 0::2] = torch.sin(angles)
    encoding[..., 1::2] = torch.cos(angles)[..., : width // 2]
    return encoding


def causal_mask(length: int, device: torch.device) -> Tensor:
    """[length, length] bool, True above the diagonal: position t may not attend to positions after t."""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(1)


class TemporalAligner(nn.Module):
    """Enc over the frames (the aligned video embedding) and the language-guided autoregressive Dec_t (module doc,
    item 3)."""

    def __init__(self, width: int, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, batch_first=True), layers,
            enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(width, heads, 4 * width, dropout, batch_first=True), layers)
        for parameter in self.parameters():  # the official `init_modules(..., w_init="xavier_uniform")`
            if parameter.ndim > 1:
                nn.init.xavier_uniform_(parameter)

    def with_positions(self, frames: Tensor) -> Tensor:
        positions = sinusoidal_encoding(torch.arange(frames.shape[1], device=frames.device), frames.shape[2])
        return self.dropout(frames + positions)

    def encode(self, frames: Tensor, causal: bool = False) -> Tensor:
        """frames [B, T, D] -> h [B, T, D]; `causal`: frame t attends to frames <= t only."""
        mask = causal_mask(frames.shape[1], frames.device) if causal else None
        return self.encoder(self.with_positions(frames), mask=mask, is_causal=causal)

    def predict_next(self, frames: Tensor, guidance: Tensor) -> Tensor:
        """frames [B, T, D] and a description embedding [B, D] -> f̂_2 .. f̂_T [B, T-1, D]: row t is the prediction
        of frame t + 1 from frames <= t and the description only."""
        observed = frames[:, :-1]
        memory = self.encode(observed, causal=True) + guidance[:, None]      # h^c_{<=t} + e_{y*}
        mask = causal_mask(observed.shape[1], frames.device)
        return self.decoder(self.with_positions(observed), memory, tgt_mask=mask, memory_mask=mask,
                            tgt_is_causal=True)


class SemanticAligner(nn.Module):
    """ê = e + γ ⊙ Dec_s(e, frames): each description embedding attends to its video's frames (module doc, item 2;
    the official `ContextDecoder`: LayerNorm + linear into a narrower width, decoder layers, LayerNorm + linear
    back)."""

    def __init__(self, embed_dim: int, width: int, layers: int, heads: int, dropout: float, gamma: float) -> None:
        super().__init__()
        self.memory_projection = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, width),
                                               nn.LayerNorm(width))
        self.text_projection = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, width))
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(width, heads, 4 * width, dropout, batch_first=True, norm_first=True), layers)
        self.output_projection = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, embed_dim))
        self.gamma = nn.Parameter(torch.full((embed_dim,), gamma))
        for module in self.modules():  # the official `_init_weights`: truncated normal, std 0.02, zero biases
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, descriptions: Tensor, frames: Tensor) -> Tensor:
        """descriptions [B, K, D] (K candidates per video), frames [B, T, D] -> refined ê [B, K, D]; each candidate
        is its own one-token query."""
        batch, candidates, dim = descriptions.shape
        queries = self.text_projection(descriptions).reshape(batch * candidates, 1, -1)
        memory = self.memory_projection(frames).repeat_interleave(candidates, dim=0)
        refined = self.output_projection(self.decoder(queries, memory)).view(batch, candidates, dim)
        return descriptions + self.gamma * refined


class TemAdapter(VideoTextMethod):
    """A frozen image CLIP with a Temporal Aligner and a Semantic Aligner for video QA (module doc).

    Args:
        question: the question a caption answers when the batch has no multiple-choice questions (module doc).
        template: how a question and an answer become an event description (`{question}`, `{answer}`).
        temporal_layers: encoder and decoder layers of the Temporal Aligner (official 1 each).
        semantic_layers, semantic_width: decoder layers and width of the Semantic Aligner (official 1, 128).
        heads: attention heads of both aligners (official 16 at width 512; each must divide its width).
        dropout: dropout of both aligners (official 0.1 in the Temporal, 0.2 in the Semantic Aligner).
        gamma: initial gate γ of the Semantic Aligner (official 1e-4).
        qa_weight, prediction_weight: w_qa and w_pred.
        (vision, text, tokenizer, embed_dim, pretrained_clip, num_frames, crop_scale, init_logit_scale,
        max_logit_scale, optimizer, lr_scheduler, compile: see `VideoTextMethod`; the towers, projections and
        temperature are frozen whatever they are)
    """

    paper = Paper("Tem-Adapter: Adapting Image-Text Pretraining for Video Question Answer", "Chen et al.", 2023,
                  note="no VideoQA data here: captions answer a fixed question, the batch's other captions are the "
                       "distractors")

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        text: nn.Module | None = None,
        tokenizer: Tokenizer | None = None,
        embed_dim: int = 64,
        pretrained_clip: str | None = None,
        num_frames: int = 4,
        crop_scale: tuple[float, float] = (0.9, 1.0),
        question: str = "",
        template: str = "{question} {answer}",
        temporal_layers: int = 1,
        semantic_layers: int = 1,
        semantic_width: int = 32,
        heads: int = 2,
        dropout: float = 0.1,
        gamma: float = 1e-4,
        qa_weight: float = 1.0,
        prediction_weight: float = 1.0,
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(vision, text, tokenizer, embed_dim, pretrained_clip, True, num_frames, crop_scale,
                         init_logit_scale, max_logit_scale, optimizer, lr_scheduler, compile)
        if "{answer}" not in template:
            raise ValueError(f"TemAdapter's template {template!r} has no {{answer}}: the event description must "
                             "name the answer, e.g. '{question} {answer}'")
        if num_frames < 2:
            raise ValueError(f"TemAdapter predicts the next frame from the previous ones: num_frames must be >= 2, "
                             f"got {num_frames}")
        self.vision.lock()
        for frozen in (self.image_projection, self.text_projection):
            frozen.requires_grad_(False)
        self.logit_scale.requires_grad_(False)
        self.question, self.template = question, template
        self.qa_weight, self.prediction_weight = qa_weight, prediction_weight
        dim = self.embed_dim
        self.temporal_aligner = TemporalAligner(dim, temporal_layers, heads, dropout)
        self.semantic_aligner = SemanticAligner(dim, semantic_width, semantic_layers, heads, dropout, gamma)

    # ------------------------------------------------------------------ frozen CLIP
    def clip_frames(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] -> the frozen CLIP's frame embeddings f [B, T, D]."""
        with torch.no_grad():
            return self.image_projection(self.frame_features(video))

    def clip_texts(self, texts: list[str]) -> Tensor:
        """Sentences -> the frozen CLIP's text embeddings e [N, D], each distinct sentence encoded once (the batch's
        candidates repeat for every sample)."""
        positions = {text: index for index, text in enumerate(dict.fromkeys(texts))}
        tokens = {name: value.to(self.logit_scale.device) for name, value in self.tokenizer(list(positions)).items()}
        index = torch.tensor([positions[text] for text in texts], device=self.logit_scale.device)
        with torch.no_grad():
            return self.text_projection(self.text(tokens))[index]

    def describe(self, question: str, answer: str) -> str:
        """The event description of a question-answer pair (sec. 3.3's template)."""
        return self.template.format(question=question, answer=answer).strip()

    # ------------------------------------------------------------------ representations
    def aligned_video(self, frames: Tensor) -> Tensor:
        """f [B, T, D] -> v before normalisation: mean_t Enc(f + p)."""
        return self.temporal_aligner.encode(frames).mean(dim=1)

    def encode_video(self, video: Tensor) -> Tensor:
        return F.normalize(self.aligned_video(self.clip_frames(video)), dim=-1)

    def probe_features(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] (or images: one-frame clips) -> the Temporal Aligner's mean output [B, D] (the
        frozen tower alone would not show what the adapter learned)."""
        return self.aligned_video(self.clip_frames(video if video.ndim == 5 else video.unsqueeze(1)))

    def answer_logits(self, frames: Tensor, descriptions: Tensor) -> Tensor:
        """f [B, T, D] and the candidates' description embeddings [B, K, D] -> s cos(v, ê_k) [B, K]."""
        video = F.normalize(self.aligned_video(frames), dim=-1)
        refined = F.normalize(self.semantic_aligner(descriptions, frames), dim=-1)
        return self.logit_scale.exp() * torch.einsum("bd,bkd->bk", video, refined)

    def video_text_logits(self, video: Tensor, text: dict[str, Tensor]) -> Tensor:
        """[B_video, B_text]: every text refined with every video, then scored as an answer (module doc)."""
        frames = self.clip_frames(video)
        with torch.no_grad():
            texts = self.text_projection(self.text(text))
        return self.answer_logits(frames, texts.unsqueeze(0).expand(video.shape[0], -1, -1))

    # ------------------------------------------------------------------ objective
    def questions_and_candidates(self, batch: dict) -> tuple[list[str], list[list[str]], Tensor]:
        """Per sample its question and candidate answers, and the index of the correct one [B] (module doc)."""
        meta = batch.get("meta")
        if meta and all(isinstance(sample, dict) and "candidates" in sample for sample in meta):
            counts = {len(sample["candidates"]) for sample in meta}
            if len(counts) != 1:
                raise ValueError(f"TemAdapter needs the same number of candidates for every question of a batch, got "
                                 f"{sorted(counts)}; pad the .json candidates to one count")
            questions = [sample.get("question", self.question) for sample in meta]
            candidates = [list(sample["candidates"]) for sample in meta]
            answers = [int(sample["answer"]) for sample in meta]
        else:
            distinct = list(dict.fromkeys(batch["caption"]))
            questions = [self.question] * len(batch["caption"])
            candidates = [distinct] * len(batch["caption"])
            answers = [distinct.index(caption) for caption in batch["caption"]]
        return questions, candidates, torch.tensor(answers, device=self.logit_scale.device)

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        frames = self.clip_frames(batch["video"])                                   # f   [B, T, D]
        questions, candidates, answers = self.questions_and_candidates(batch)
        sentences = [self.describe(question, answer) for question, options in zip(questions, candidates)
                     for answer in options]
        descriptions = self.clip_texts(sentences).view(frames.shape[0], len(candidates[0]), -1)  # e [B, K, D]
        logits = self.answer_logits(frames, descriptions)
        qa_loss = F.cross_entropy(logits, answers)
        guidance = descriptions[torch.arange(frames.shape[0], device=frames.device), answers]    # e_{y*} [B, D]
        predicted = self.temporal_aligner.predict_next(frames, guidance)                         # [B, T-1, D]
        prediction_loss = F.mse_loss(predicted, frames[:, 1:])
        loss = self.qa_weight * qa_loss + self.prediction_weight * prediction_loss
        accuracy = (logits.argmax(dim=1) == answers).float().mean()
        return {"loss": loss, "qa_loss": qa_loss.detach(), "prediction_loss": prediction_loss.detach(),
                "qa_accuracy": accuracy, "candidates": torch.tensor(float(logits.shape[1]))}
