"""MMVP-style CLIP-blind pairs: images a CLIP embeds alike that a self-supervised encoder tells apart, and whether a
CLIP-family model can still match each of them to its own text.

MMVP (Tong et al. 2024, "Eyes Wide Shut? Exploring the Visual Shortcomings of Multimodal LLMs", sec. 2.1-2.2)
mines *CLIP-blind pairs*: two images whose CLIP image embeddings have cosine similarity above 0.95 while their
DINOv2 embeddings have a cosine below 0.6; for each pair one question is written whose answer differs between the
two images, and a pair counts as solved only when the model answers correctly for *both* images (sec. 2.2; its
CLIP-side benchmark MMVP-VLM, sec. 4.1, asks the same of CLIP models with one text per image).

Here (`mine_clip_blind_pairs`): the candidates are the minimal contrasts of `vlp-data emoji-contrasts` (one emoji in
two skin tones; one code point in Google's and Twitter's drawing, where their colours differ), pairs within a
contrast group; the CLIP is any CLIP-family checkpoint (`encode_image`), the self-supervised encoder any suite
checkpoint (`probe_features`, e.g. MoCo v3 or DINO); the thresholds are arguments, since tiny models trained here
do not share DINOv2's or OpenAI CLIP's similarity scales (MMVP's 0.95 / 0.6 are the defaults). The pairs are
written to a JSON file (`write_clip_blind_pairs`) so that every model is scored on the same, fixed pairs.

Scoring (`MMVPPairs`, `mmvp_pair_outcomes`): each image of a pair picks, of the pair's two texts, the one of higher
cosine with it (`encode_image` / `encode_text`); an image is right (1), wrong (0) or tied (0.5, within 1e-6), and a
pair scores the product of its two images, so a model that cannot see the difference scores the chance 0.25 (one
that ties everywhere exactly, one that guesses in expectation).
"""

from __future__ import annotations

import json
from collections import defaultdict
from itertools import combinations
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from vlp_lightning.callbacks.features import (
    EvaluationCallback,
    encode_texts,
    extract_features,
    has_joint_space,
    has_text_tower,
)

#: MMVP's thresholds (sec. 2.1): CLIP cosine above, self-supervised (DINOv2) cosine below.
CLIP_THRESHOLD, SSL_THRESHOLD = 0.95, 0.6
CHANCE = 0.25


def candidate_pairs(metas: list[dict]) -> list[tuple[int, int]]:
    """Every pair of two samples of one contrast `group` of `metas` (their `.json`), in sample order."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, meta in enumerate(metas):
        if "group" not in meta:
            raise ValueError(f"sample {index}'s .json has no `group`; build the candidates with `vlp-data "
                             "emoji-contrasts`")
        groups[meta["group"]].append(index)
    return sorted(pair for members in groups.values() for pair in combinations(members, 2))


def clip_blind_pairs(
    metas: list[dict], clip_features: Tensor, ssl_features: Tensor, clip_threshold: float, ssl_threshold: float
) -> list[tuple[int, int, float, float]]:
    """The candidate pairs (`candidate_pairs`) whose CLIP features [N, D] have cosine above `clip_threshold` and
    whose self-supervised features [N, D'] have cosine below `ssl_threshold`, as (first, second, CLIP cosine, SSL
    cosine), in sample order."""
    clip, ssl = F.normalize(clip_features.float(), dim=-1), F.normalize(ssl_features.float(), dim=-1)
    pairs = []
    for first, second in candidate_pairs(metas):
        clip_cosine, ssl_cosine = float(clip[first] @ clip[second]), float(ssl[first] @ ssl[second])
        if clip_cosine > clip_threshold and ssl_cosine < ssl_threshold:
            pairs.append((first, second, clip_cosine, ssl_cosine))
    return pairs


def mine_clip_blind_pairs(
    clip: LightningModule,
    ssl: LightningModule,
    shards: str,
    clip_threshold: float = CLIP_THRESHOLD,
    ssl_threshold: float = SSL_THRESHOLD,
    batch_size: int = 64,
) -> dict:
    """The CLIP-blind pairs of the contrast candidates `shards` (module doc) as a JSON-ready document: the
    thresholds, the number of candidate pairs, and per pair its `kind`, `keys`, `texts` (each image's caption) and
    both cosines."""
    if not has_joint_space(clip):
        raise ValueError(f"mine_clip_blind_pairs: clip is a {type(clip).__name__}, which has no encode_image; pass "
                         "a CLIP-family checkpoint")
    modes = [(module, module.training) for module in (clip, ssl)]
    try:
        with torch.no_grad():
            clip_pass = extract_features(clip.eval(), shards, batch_size, representation="joint")
            ssl_pass = extract_features(ssl.eval(), shards, batch_size, representation="probe")
    finally:
        for module, training in modes:
            module.train(training)
    if clip_pass.meta is None or clip_pass.captions is None:
        raise ValueError(f"mine_clip_blind_pairs: the shards {shards!r} have no .json groups and .txt texts; build "
                         "them with `vlp-data emoji-contrasts`")
    pairs = clip_blind_pairs(clip_pass.meta, clip_pass.image, ssl_pass.image, clip_threshold, ssl_threshold)
    return {
        "shards": shards, "clip_threshold": clip_threshold, "ssl_threshold": ssl_threshold,
        "candidates": len(candidate_pairs(clip_pass.meta)),
        "pairs": [{"kind": clip_pass.meta[first]["kind"], "keys": [clip_pass.keys[first], clip_pass.keys[second]],
                   "texts": [clip_pass.captions[first], clip_pass.captions[second]],
                   "clip_cosine": round(clip_cosine, 6), "ssl_cosine": round(ssl_cosine, 6)}
                  for first, second, clip_cosine, ssl_cosine in pairs],
    }


def write_clip_blind_pairs(path: str | Path, pairs: dict) -> Path:
    """Write a `mine_clip_blind_pairs` document to `path` (JSON), so every model is scored on the same pairs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(pairs, indent=1) + "\n")
    return path


def mmvp_pair_outcomes(images: Tensor, texts: Tensor, tolerance: float = 1e-6) -> Tensor:
    """Per pair, the product of its two images' outcomes (module doc): images [P, 2, D] and their texts [P, 2, D]
    (text j is image j's) -> [P] in {0, 0.25, 0.5, 1}."""
    similarity = torch.einsum("pid,ptd->pit", F.normalize(images.float(), dim=-1), F.normalize(texts.float(), dim=-1))
    own, other = similarity.diagonal(dim1=1, dim2=2), similarity.flip(2).diagonal(dim1=1, dim2=2)  # [P, 2]
    outcome = torch.where(torch.isclose(own, other, rtol=0.0, atol=tolerance), 0.5, (own > other).float())
    return outcome.prod(dim=1)


class MMVPPairs(EvaluationCallback):
    """MMVP pair accuracy on fixed CLIP-blind pairs (module doc), logged as `mmvp/<name>/pair_accuracy`, one
    `mmvp/<name>/<kind>` per pair kind, `mmvp/<name>/pairs` and `mmvp/<name>/chance` (0.25).

    Needs a CLIP-family method (`encode_image`, `encode_text` and a tokenizer); others skip it with one warning.

    Args:
        shards: the contrast shards the pairs were mined from (`vlp-data emoji-contrasts`).
        pairs: the JSON file `write_clip_blind_pairs` wrote.
        name: metric prefix.
        every_n_epochs, batch_size, num_workers: see `EvaluationCallback`.
    """

    def __init__(self, shards: str, pairs: str, name: str = "emoji", every_n_epochs: int = 1, batch_size: int = 64,
                 num_workers: int = 0) -> None:
        super().__init__(every_n_epochs=every_n_epochs, batch_size=batch_size, num_workers=num_workers)
        if not Path(pairs).is_file():
            raise ValueError(f"MMVPPairs pairs={pairs!r} is not a file; mine them with mine_clip_blind_pairs and "
                             "write_clip_blind_pairs")
        self.shards, self.pairs, self.name = shards, pairs, name
        self.document = json.loads(Path(pairs).read_text())
        if not self.document.get("pairs"):
            raise ValueError(f"MMVPPairs pairs={pairs!r} holds no pairs; mine with a lower clip_threshold or a higher "
                             "ssl_threshold")

    def evaluate(self, trainer: Trainer, method: LightningModule) -> dict[str, float]:
        if not (has_joint_space(method) and has_text_tower(method)):
            self.warn_once(f"MMVPPairs skipped: {type(method).__name__} has no encode_image / encode_text with a "
                           "tokenizer (a CLIP-family method)")
            return {}
        images = self.features(method, self.shards, representation="joint")
        row_of = {key: row for row, key in enumerate(images.keys)}
        pairs = self.document["pairs"]
        missing = sorted({key for pair in pairs for key in pair["keys"]} - row_of.keys())
        if missing:
            raise ValueError(f"MMVPPairs: {len(missing)} images of {self.pairs!r} (e.g. {missing[0]!r}) are not in "
                             f"{self.shards!r}; score the pairs on the shards they were mined from")
        rows = torch.tensor([[row_of[key] for key in pair["keys"]] for pair in pairs])  # [P, 2]
        texts = encode_texts(method, method.tokenizer, [text for pair in pairs for text in pair["texts"]])
        outcomes = mmvp_pair_outcomes(images.image[rows], texts.view(len(pairs), 2, -1))
        metrics = {"pair_accuracy": outcomes.mean().item(), "pairs": len(pairs), "chance": CHANCE}
        for kind in sorted({pair["kind"] for pair in pairs}):
            chosen = torch.tensor([pair["kind"] == kind for pair in pairs])
            metrics[kind] = outcomes[chosen].mean().item()
        return {f"mmvp/{self.name}/{metric}": value for metric, value in metrics.items()}
