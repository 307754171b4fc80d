"""Image <-> text retrieval: recall at K and median rank on a captioned shard set.

The protocol of CLIP (Radford et al. 2021) sec. 3.1.5 / table 13 and of the Flickr30k / MSCOCO benchmarks
(Karpathy split): every image is a query over all captions, every caption a query over all images, ranked by cosine
similarity. Image -> text R@K is the fraction of images with at least one of their own captions in the top K;
text -> image R@K the fraction of captions whose image is in the top K; the median rank is 1-based.

Several captions per image: a sample's `.txt` may hold several lines, each one caption of that image (how COCO and
Flickr30k's five captions are stored). `caption_source="long"` ranks each sample's `.json` long caption instead
(one per image, e.g. the scenes' `long_caption`: DreamLIP's long-caption retrieval, Zheng et al. 2024). Scores that
tie with the ground truth do not push it down (ranks count the strictly better candidates), so identical captions of
different images all count as hits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from data_modules.captions import LONG_CAPTION_FIELD
from vlp_lightning.callbacks.features import (
    EvalFeatures,
    EvaluationCallback,
    encode_texts,
    examples_picture,
    has_text_tower,
    log_picture,
    method_eval_loader,
)

RECALL_AT = (1, 5, 10)


def split_captions(caption: str) -> list[str]:
    """The captions of one sample: the non-empty lines of its `.txt`."""
    return [line.strip() for line in caption.splitlines() if line.strip()]


def retrieval_ranks(
    image_features: Tensor, text_features: Tensor, text_to_image: Tensor, chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """0-based ranks by cosine similarity: per image [N] that of its best-ranked own caption among all M texts, per
    text [M] that of its image among all N images. `text_to_image` [M] is the image index of each text.

    Works in chunks of `chunk_size` queries, so memory is chunk x (N or M), never N x M."""
    images = F.normalize(image_features.float(), dim=-1)
    texts = F.normalize(text_features.float(), dim=-1)
    image_ranks = []
    for start in range(0, images.shape[0], chunk_size):
        scores = images[start : start + chunk_size] @ texts.T  # [b, M]
        own = text_to_image[None, :] == torch.arange(start, start + scores.shape[0])[:, None]  # [b, M]
        best_own = scores.masked_fill(~own, -torch.inf).amax(1, keepdim=True)  # [b, 1]
        image_ranks.append((scores > best_own).sum(1))
    text_ranks = []
    for start in range(0, texts.shape[0], chunk_size):
        scores = texts[start : start + chunk_size] @ images.T  # [b, N]
        own = scores.gather(1, text_to_image[start : start + chunk_size, None])  # [b, 1]
        text_ranks.append((scores > own).sum(1))
    return torch.cat(image_ranks), torch.cat(text_ranks)


def reranked_ranks(
    scores: Tensor,
    is_own: Callable[[int, Tensor], Tensor],
    match_scores: Callable[[int, Tensor], Tensor],
    top_k: int,
) -> Tensor:
    """0-based ranks after re-ranking each query's top `top_k` candidates by a second score (ALBEF's retrieval,
    Li et al. 2021, official `Retrieval.py`: the ITM logit re-scores the ITC top k, every other candidate keeps
    score -100). `scores` [Q, C] are the first-stage similarities; `is_own(q, candidates)` flags the query's ground
    truth among candidate indices, `match_scores(q, candidates)` re-scores them. A query whose ground truth is not in
    its top k keeps its first-stage rank (>= k)."""
    ranks = []
    k = min(top_k, scores.shape[1])
    for query, row in enumerate(scores):
        candidates = row.topk(k).indices
        own = is_own(query, candidates)
        if not bool(own.any()):
            ranks.append(int((row > row[is_own(query, torch.arange(len(row)))].max()).sum()))
            continue
        second = match_scores(query, candidates).float().cpu()
        ranks.append(int((second > second[own].max()).sum()))
    return torch.tensor(ranks)


def retrieval_metrics(image_ranks: Tensor, text_ranks: Tensor) -> dict[str, float]:
    """`i2t_R@1/5/10`, `i2t_median_rank`, `t2i_R@1/5/10`, `t2i_median_rank` from the 0-based ranks."""
    metrics = {}
    for direction, ranks in (("i2t", image_ranks), ("t2i", text_ranks)):
        for k in RECALL_AT:
            metrics[f"{direction}_R@{k}"] = (ranks < k).float().mean().item()
        metrics[f"{direction}_median_rank"] = (ranks + 1).float().median().item()
    return metrics


def ranked_caption_lines(
    top_texts: Tensor, texts: list[str], text_to_image: Tensor
) -> list[list[tuple[str, bool]]]:
    """Per query image (row of `top_texts` [Q, K], text indices best first): `1. caption` lines flagged when the
    caption is the query's own, plus a `truth: ...` line when none of the K is."""
    lines_per_query = []
    for query, ranked in enumerate(top_texts.tolist()):
        lines = [
            (f"{place + 1}. {texts[text]}", int(text_to_image[text]) == query) for place, text in enumerate(ranked)
        ]
        if not any(is_ground_truth for _, is_ground_truth in lines):
            own = int((text_to_image == query).nonzero()[0])
            lines.append((f"truth: {texts[own]}", True))
        lines_per_query.append(lines)
    return lines_per_query


class Retrieval(EvaluationCallback):
    """Image -> text and text -> image R@1/5/10 and median rank, logged as `retrieval/<name>/i2t_R@1`, ...,
    `retrieval/<name>/t2i_median_rank`, plus a TensorBoard picture `retrieval/<name>/examples`: the first
    `num_examples` images with their top-5 captions, ground truth marked (and shown when not among them).

    Needs a method with a text tower (`encode_text`) and a tokenizer; other methods skip it with one warning.

    `rerank_top_k` > 0 re-ranks, for a method with a matching head (`match_scores(images, text) -> [N]`, ALBEF's
    ITM), each query's top k of the contrastive ranking by that head, as ALBEF evaluates retrieval (k 128 / 256
    there), and logs both: `.../i2t_R@1` etc. re-ranked, `.../itc_i2t_R@1` etc. contrastive only. Every rank
    re-ranks every query (k fusion passes a query: keep the set small or `max_samples` set).

    Args:
        shards: captioned shard pattern (`.txt`; several lines = several captions of the image).
        name: metric prefix.
        max_samples: evaluate the first this many images (None: all).
        num_examples: images shown in the TensorBoard picture.
        rerank_top_k: candidates a query re-ranks with the method's matching head (0: none).
        caption_source: "short" ranks the `.txt` captions (each line one caption); "long" the `.json` long caption
            of each sample (one per image; shards without one stop with one sentence).
        every_n_epochs, batch_size, num_workers: see `EvaluationCallback`.
    """

    def __init__(
        self,
        shards: str,
        name: str = "retrieval",
        max_samples: int | None = None,
        num_examples: int = 4,
        rerank_top_k: int = 0,
        caption_source: Literal["short", "long"] = "short",
        every_n_epochs: int = 1,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, batch_size=batch_size, num_workers=num_workers)
        self.shards = shards
        self.name = name
        self.max_samples = max_samples
        self.num_examples = num_examples
        if rerank_top_k < 0:
            raise ValueError(f"rerank_top_k is a number of candidates (0: no re-ranking), got {rerank_top_k}")
        self.rerank_top_k = rerank_top_k
        if caption_source not in ("short", "long"):
            raise ValueError(f"caption_source must be 'short' (.txt) or 'long' (.json long_caption), got "
                             f"{caption_source!r}")
        self.caption_source = caption_source

    def captions_per_image(self, features: EvalFeatures) -> list[list[str]]:
        """The texts of each image: its `.txt` lines ("short") or its one `.json` long caption ("long")."""
        if self.caption_source == "short":
            if features.captions is None:
                raise ValueError(f"Retrieval {self.name!r}: the shards {self.shards} have no .txt captions")
            return [split_captions(caption) for caption in features.captions]
        longs = [(meta or {}).get(LONG_CAPTION_FIELD) for meta in (features.meta or [None] * len(features.image))]
        if not all(isinstance(text, str) and text.strip() for text in longs):
            raise ValueError(f"Retrieval {self.name!r} with caption_source='long' needs a .json {LONG_CAPTION_FIELD!r} "
                             f"in every sample of {self.shards}; use long-captioned shards (e.g. `vlp-data scenes`) "
                             "or caption_source: short")
        return [[text.strip()] for text in longs]

    def evaluate(self, trainer: Trainer, method: LightningModule) -> dict[str, float]:
        if not has_text_tower(method):
            self.warn_once(f"Retrieval skipped: {type(method).__name__} has no text tower (encode_text)")
            return {}
        features = self.features(method, self.shards, self.max_samples, representation="joint")
        captions_per_image = self.captions_per_image(features)
        texts = [caption for captions in captions_per_image for caption in captions]
        text_to_image = torch.tensor([image for image, captions in enumerate(captions_per_image) for _ in captions])
        text_features = encode_texts(method, method.tokenizer, texts, self.batch_size)
        image_ranks, text_ranks = retrieval_ranks(features.image, text_features, text_to_image)
        metrics = retrieval_metrics(image_ranks, text_ranks)
        if self.rerank_top_k and not hasattr(method, "match_scores"):
            self.warn_once(f"Retrieval {self.name!r}: {type(method).__name__} has no matching head (match_scores); "
                           "ranked by the contrastive similarity only")
        elif self.rerank_top_k:
            reranked = retrieval_metrics(*self.rerank(method, features.image, text_features, texts, text_to_image))
            metrics = {**reranked, **{f"itc_{name}": value for name, value in metrics.items()}}

        def draw() -> np.ndarray:
            queries = F.normalize(features.image[: self.num_examples], dim=-1)
            top = (queries @ F.normalize(text_features, dim=-1).T).topk(min(5, len(texts)), dim=1).indices  # [Q, 5]
            lines = ranked_caption_lines(top, texts, text_to_image)
            return examples_picture(features.thumbnails[: self.num_examples], lines)

        if self.num_examples > 0:
            log_picture(trainer, f"retrieval/{self.name}/examples", draw)
        return {f"retrieval/{self.name}/{metric}": value for metric, value in metrics.items()}

    def rerank(
        self, method: LightningModule, image_features: Tensor, text_features: Tensor, texts: list[str],
        text_to_image: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Image and text ranks after re-ranking the contrastive top `rerank_top_k` by `method.match_scores`."""
        loader, _ = method_eval_loader(method, self.shards, self.batch_size, self.num_workers)
        images = torch.cat([batch["image"] for batch in loader])[: len(image_features)]
        tokens = method.tokenizer(texts)
        device = images.device
        similarity = F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T

        def text_batch(indices: Tensor) -> dict[str, Tensor]:
            return {name: value[indices].to(device) for name, value in tokens.items()}

        image_ranks = reranked_ranks(
            similarity,
            lambda query, candidates: text_to_image[candidates] == query,
            lambda query, candidates: method.match_scores(images[query].expand(len(candidates), -1, -1, -1),
                                                          text_batch(candidates)),
            self.rerank_top_k,
        )
        text_ranks = reranked_ranks(
            similarity.T,
            lambda query, candidates: candidates == text_to_image[query],
            lambda query, candidates: method.match_scores(images[candidates.to(device)],
                                                          text_batch(torch.full_like(candidates, query))),
            self.rerank_top_k,
        )
        return image_ranks, text_ranks
