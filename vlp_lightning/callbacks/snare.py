"""SNARE-style compositional probing of image-text matching on the scenes, with negatives certainly false.

SNARE (Wang et al. 2023, "Can Linguistic Knowledge Improve Multimodal Alignment in Vision-Language Pretraining?")
asks a VLP model to score an image against a correct sentence and against perturbed ones, in four tasks: semantic
structure (the words shuffled), negation logic (a sentence and its negation), attribute ownership (attributes bound
to the wrong nouns) and relationship composition (subject and object of a relation exchanged); accuracy is the
share of images where the correct sentence scores higher. Its sentences come from Visual Genome / COCO annotations,
whose negatives can be accidentally true. Here every text is built from the scene graph of `vlp-data scenes`
(`.json` objects with `name` and `colour`, and `relations` listing every ordered pair a predicate holds for), and a
perturbation is made only where the graph proves it false:

* `attribute` -- "a red X and a blue Y" vs "a blue X and a red Y": two objects whose names occur once in the scene
  (so "the X" is one object) and whose colours differ;
* `relation` -- "a X left of a Y" vs "a Y left of a X": a relation between two once-occurring names whose predicate
  is antisymmetric (left of, right of, above, below, bigger than; `overlaps` is symmetric and never used);
* `shuffle` -- the scene's own caption vs the same words in another order (a permutation drawn with a seed from the
  scene's key, so the probe is fixed);
* `negation` -- "a X that is red" vs "a X that is not red": a once-occurring object and its colour.

Per scene and kind the first qualifying objects (in `.json` order) are used, so each scene gives at most one pair
per kind. A pair is right when the true text's cosine with the image (`encode_image` / `encode_text`) is above the
false one's; a tie (within 1e-6) counts half, so a model blind to the perturbation scores exactly the chance 0.5.
What SNARE fixes and this follows: the four tasks and the pairwise accuracy. What differs: the sentences are the
suite's templates, not SNARE's released ones; `shuffle` shuffles all words (SNARE also shuffles content and
function words apart); `relation` scores the exchange only (not SNARE's "no relation" variant).
"""

from __future__ import annotations

import random
import zlib
from collections import Counter

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from vlp_lightning.callbacks.features import EvaluationCallback, encode_texts, has_joint_space, has_text_tower

#: the perturbation kinds, in the order of the module doc.
PERTURBATIONS = ("attribute", "relation", "shuffle", "negation")
#: predicates for which "X p Y" excludes "Y p X" (how `vlp-data scenes` defines them).
ANTISYMMETRIC = ("left of", "right of", "above", "below", "bigger than")
CHANCE = 0.5


def _unique_objects(meta: dict) -> list[int]:
    """Indices of the objects whose name occurs once in the scene."""
    counts = Counter(item["name"] for item in meta["objects"])
    return [index for index, item in enumerate(meta["objects"]) if counts[item["name"]] == 1]


def shuffled_words(text: str, key: str, tries: int = 20) -> str | None:
    """`text`'s words in another order, drawn with a seed from `key`; None when no other order is drawn."""
    words = text.split()
    rng = random.Random(zlib.crc32(key.encode()))
    for _ in range(tries):
        order = rng.sample(words, len(words))
        if order != words:
            return " ".join(order)
    return None


def snare_pairs(meta: dict, key: str) -> dict[str, tuple[str, str]]:
    """Per perturbation kind a scene qualifies for, its (true text, false text) built from the scene graph `meta`
    (module doc)."""
    objects = meta["objects"]
    unique = _unique_objects(meta)
    pairs: dict[str, tuple[str, str]] = {}
    for first, second in ((a, b) for position, a in enumerate(unique) for b in unique[position + 1 :]):
        x, y = objects[first], objects[second]
        if x["colour"] != y["colour"]:
            pairs["attribute"] = (f"a {x['colour']} {x['name']} and a {y['colour']} {y['name']}",
                                  f"a {y['colour']} {x['name']} and a {x['colour']} {y['name']}")
            break
    for subject, predicate, other in meta.get("relations", []):
        if predicate in ANTISYMMETRIC and subject in unique and other in unique:
            x, y = objects[subject]["name"], objects[other]["name"]
            pairs["relation"] = (f"a {x} {predicate} a {y}", f"a {y} {predicate} a {x}")
            break
    caption = meta.get("caption")
    shuffled = shuffled_words(caption, key) if caption else None
    if shuffled is not None:
        pairs["shuffle"] = (caption, shuffled)
    if unique:
        item = objects[unique[0]]
        pairs["negation"] = (f"a {item['name']} that is {item['colour']}", f"a {item['name']} that is not "
                                                                           f"{item['colour']}")
    return pairs


def pair_outcomes(images: Tensor, true_texts: Tensor, false_texts: Tensor, tolerance: float = 1e-6) -> Tensor:
    """1 where each image [P, D] is closer (cosine) to its true text [P, D] than to its false one [P, D], 0 where
    farther, 0.5 for a tie -> [P]."""
    images = F.normalize(images.float(), dim=-1)
    true = (images * F.normalize(true_texts.float(), dim=-1)).sum(-1)
    false = (images * F.normalize(false_texts.float(), dim=-1)).sum(-1)
    tie = torch.isclose(true, false, rtol=0.0, atol=tolerance)
    return torch.where(tie, CHANCE, (true > false).float())


class CompositionalProbe(EvaluationCallback):
    """SNARE-style image-text matching accuracy per perturbation kind on scene shards (module doc), logged as
    `snare/<name>/<kind>` (accuracy), `snare/<name>/<kind>_pairs` (how many scenes qualified), `snare/<name>/mean`
    (the mean over the kinds scored) and `snare/<name>/chance` (0.5).

    Needs a CLIP-family method (`encode_image`, `encode_text` and a tokenizer); others skip it with one warning.

    Args:
        shards: scene shard pattern (`vlp-data scenes`: `.json` objects with colours, relations, captions).
        name: metric prefix (e.g. `val`, `unseen`).
        kinds: the perturbation kinds to score (of `PERTURBATIONS`).
        max_samples: score the first this many scenes (None: all).
        every_n_epochs, batch_size, num_workers: see `EvaluationCallback`.
    """

    def __init__(
        self,
        shards: str,
        name: str = "scenes",
        kinds: tuple[str, ...] = PERTURBATIONS,
        max_samples: int | None = None,
        every_n_epochs: int = 1,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, batch_size=batch_size, num_workers=num_workers)
        unknown = [kind for kind in kinds if kind not in PERTURBATIONS]
        if unknown or not kinds:
            raise ValueError(f"CompositionalProbe kinds={list(kinds)} must be a non-empty choice of {PERTURBATIONS}")
        self.shards, self.name, self.kinds, self.max_samples = shards, name, tuple(kinds), max_samples

    def evaluate(self, trainer: Trainer, method: LightningModule) -> dict[str, float]:
        if not (has_joint_space(method) and has_text_tower(method)):
            self.warn_once(f"CompositionalProbe skipped: {type(method).__name__} has no encode_image / encode_text "
                           "with a tokenizer (a CLIP-family method)")
            return {}
        scenes = self.features(method, self.shards, self.max_samples, representation="joint")
        if scenes.meta is None or not all("objects" in meta for meta in scenes.meta):
            raise ValueError(f"CompositionalProbe: the shards {self.shards!r} have no scene graph (.json objects); "
                             "build scene shards with `vlp-data scenes data/scenes`")
        rows: dict[str, list[int]] = {kind: [] for kind in self.kinds}
        texts: dict[str, list[str]] = {kind: [] for kind in self.kinds}
        for row, (meta, key) in enumerate(zip(scenes.meta, scenes.keys)):
            for kind, pair in snare_pairs(meta, key).items():
                if kind in rows:
                    rows[kind].append(row)
                    texts[kind].extend(pair)
        metrics: dict[str, float] = {}
        for kind in self.kinds:
            metrics[f"{kind}_pairs"] = len(rows[kind])
            if not rows[kind]:
                continue
            encoded = encode_texts(method, method.tokenizer, texts[kind])  # [2P, D]: true, false, true, ...
            metrics[kind] = pair_outcomes(scenes.image[rows[kind]], encoded[0::2], encoded[1::2]).mean().item()
        scored = [metrics[kind] for kind in self.kinds if kind in metrics]
        if not scored:
            raise ValueError(f"CompositionalProbe: no scene of {self.shards!r} qualifies for any of {self.kinds}")
        metrics |= {"mean": sum(scored) / len(scored), "chance": CHANCE}
        return {f"snare/{self.name}/{metric}": value for metric, value in metrics.items()}
