"""Image captioning: BLEU, ROUGE-L, CIDEr-D and exact match of generated captions on a held-out captioned shard
set, and the nearest-neighbour caption baseline.

The protocol of the COCO caption evaluation (Chen et al. 2015, "Microsoft COCO Captions: Data Collection and
Evaluation Server"; its code is `pycocoevalcap`): every image gets one generated caption, scored against
all its reference captions (the lines of its `.txt`, as Retrieval reads them), BLEU at corpus level, ROUGE-L and
CIDEr-D per image averaged. Candidates and references are normalised once (`normalize_caption`), then:

* BLEU-1 / BLEU-4: torchmetrics' `BLEUScore` (Papineni et al. 2002), no smoothing. Against `pycocoevalcap.bleu.Bleu`
  it differs in two ways. (1) Both take the reference length closest to each candidate's for the brevity penalty,
  but on a tie torchmetrics takes the first reference and COCO the shorter; each image's references are sorted
  by length before scoring, which makes the two rules the same. (2) When some n-gram order has no match in the
  whole corpus, torchmetrics returns exactly 0 and COCO a small positive value, its precisions being
  (matches + 1e-15) / (total + 1e-9): below 1e-3 when the candidates have n-grams of that order, 0.03 for BLEU-4
  when none has 4 words (a perfect corpus of 3-word captions). Otherwise the two agree to about 1e-9
  (tests/test_captioning.py).
* ROUGE-L: torchmetrics' `ROUGEScore(rouge_keys="rougeL", accumulate="best")`: the LCS F1 against the best-scoring
  reference, averaged over images. COCO's `Rouge` differs by design: it combines the maximum precision and maximum
  recall over the references with β = 1.2, so its numbers are not the same.
* CIDEr: CIDEr-D (Vedantam et al. 2015, "CIDEr: Consensus-based Image Description Evaluation": Gaussian length
  penalty σ = 6, clipped n-gram counts, n = 1..4, x10) by `pycocoevalcap.cider.cider.Cider`, its pure-Python
  scorer (no Java, no download). The n-gram IDF comes from the references of the evaluated images, as in COCO:
  scores depend on the set, and a set of one image scores 0.
* names the object: the share of images whose caption contains a content word of one of its references
  (`names_object`), for frozen-LM captioners whose captions are rarely exactly right.
* exact match: the share of images whose caption equals one of its references, both normalised: the word accuracy
  of text recognition (case- and punctuation-insensitive, as scene-text benchmarks score words), for a reader of
  rendered words (UNIT on `vlp-data words`) whose caption is the text in the image.

Distributed runs: as in `features`, every rank reads every sample; batch `i` is captioned by rank
`i % world_size` (`generate_across_ranks`) and the captions are exchanged, so every rank computes the same metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import regex
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from torchmetrics.text import BLEUScore, ROUGEScore

from vlp_lightning import distributed
from vlp_lightning.callbacks.features import (
    EvaluationCallback,
    InputT,
    encode_across_ranks,
    examples_picture,
    log_picture,
    method_eval_loader,
    module_device,
    to_thumbnails,
)
from vlp_lightning.callbacks.retrieval import split_captions

_PUNCTUATION = regex.compile(r"\p{P}+")


def normalize_caption(text: str) -> str:
    """A caption as the metrics compare it: lower-cased, every punctuation character (Unicode category P) replaced
    by a space, split on white space and joined with single spaces.

    Roughly what COCO's evaluation does with Stanford's PTBTokenizer (lower-cased tokens, punctuation tokens
    dropped). It differs on hyphenated words, which PTB keeps as one token ("black-and-white" here becomes three),
    and on contractions, which PTB splits keeping the apostrophe ("dog's": PTB "dog 's", here "dog s").
    """
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def _cider_scorer():
    try:
        from pycocoevalcap.cider.cider import Cider  # imported here: an optional extra
    except ImportError as error:
        raise ImportError(
            "CIDEr needs pycocoevalcap's pure-Python scorer; install it with pip install pycocoevalcap"
        ) from error
    return Cider()


def caption_metrics(candidates: list[str], references: list[list[str]]) -> dict[str, float]:
    """`BLEU-1`, `BLEU-4`, `ROUGE-L`, `CIDEr`, `exact_match` and `names_object` of one candidate per image against that image's
    references (module doc), all captions normalised by `normalize_caption` first."""
    if not candidates or len(candidates) != len(references):
        raise ValueError(
            f"caption_metrics needs one candidate per image and at least one image, got {len(candidates)} candidates "
            f"for {len(references)} images"
        )
    empty = next((index for index, refs in enumerate(references) if not refs), None)
    if empty is not None:
        raise ValueError(f"caption_metrics: image {empty} has no reference caption; give every image at least one")
    candidates = [normalize_caption(candidate) for candidate in candidates]
    # sorted by length: torchmetrics then breaks closest-length ties towards the shorter reference, as COCO does
    references = [
        sorted((normalize_caption(ref) for ref in refs), key=lambda ref: len(ref.split())) for refs in references
    ]
    metrics = {f"BLEU-{n}": BLEUScore(n_gram=n)(candidates, references).item() for n in (1, 4)}
    rouge = ROUGEScore(rouge_keys="rougeL", accumulate="best", normalizer=normalize_caption, tokenizer=str.split)
    metrics["ROUGE-L"] = rouge(candidates, references)["rougeL_fmeasure"].item()
    images = range(len(candidates))
    cider, _ = _cider_scorer().compute_score(
        {image: references[image] for image in images}, {image: [candidates[image]] for image in images}
    )
    metrics["CIDEr"] = float(cider)
    metrics["exact_match"] = sum(candidate in refs for candidate, refs in zip(candidates, references)) / len(images)
    metrics["names_object"] = sum(names_object(candidate, refs) for candidate, refs in zip(candidates, references)
                                  ) / len(images)
    return metrics


#: words that never name an object: a name's articles, prepositions, conjunctions and the emoji's "with" / "of".
_NOT_NAMES = frozenset("a an the of with and or in on at to for by from as is are its this that".split())


def names_object(candidate: str, references: list[str]) -> bool:
    """Whether a (normalised) caption mentions the object: it contains a content word (not an article or a
    preposition, at least 3 letters) of one of the image's (normalised) reference names as a whole word. Lenient by
    design ("dog face" names the "cat face" image's face): the frozen-LM papers' question is whether the image
    reached the LM at all, which CIDEr's n-gram consensus hides when few captions are exactly right."""
    words = set(candidate.split())
    return any(word in words for ref in references for word in ref.split()
               if len(word) >= 3 and word not in _NOT_NAMES)


def generate_across_ranks(
    generate: Callable[[InputT], list[str]], batches: Iterable[tuple[InputT, int]], name: str = "generate_captions"
) -> list[str]:
    """Captions of `(images, rows)` batches, batch `i` generated on rank `i % world_size`; all captions, in batch
    order, on every rank. The inputs may also be a tuple whose first item is the images (`(images, questions)` for
    `vqa`); `name` is the method the error names when a call returns the wrong number of texts.

    The schedule is `encode_across_ranks`'s (a rank with one batch fewer makes one throw-away call, so every rank
    calls the method equally often); each rank keeps its own batches' captions, and one `all_gather_object`
    exchanges them. Every rank must iterate the same batches. In one process this is a plain loop.
    """
    owned: dict[int, list[str]] = {}

    def encode(inputs: tuple[InputT, int]) -> Tensor:
        data, index = inputs
        captions = list(generate(data))
        images = data[0] if isinstance(data, tuple) else data
        if len(captions) != images.shape[0]:
            raise ValueError(
                f"{name} returned {len(captions)} texts for {images.shape[0]} images; it must return one per image"
            )
        owned[index] = captions
        return torch.zeros(len(captions), 1, device=images.device)  # the schedule's placeholder features

    def indexed() -> Iterator[tuple[tuple[InputT, int], int]]:
        for index, (images, rows) in enumerate(batches):
            yield (images, index), rows

    encode_across_ranks(encode, indexed())
    world = distributed.world_size()
    parts = [owned]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, owned)
    merged = {index: captions for rank, part in enumerate(parts) for index, captions in part.items()
              if index % world == rank}  # the throw-away call's captions belong to another rank's batch
    return [caption for index in sorted(merged) for caption in merged[index]]


def nearest_neighbour_captions(
    train_features: Tensor, train_captions: list[str], query_features: Tensor, chunk_size: int = 1024
) -> list[str]:
    """The nearest-neighbour caption baseline: each query [Q, D] gets the first caption line of the training
    sample [N, D] most similar to it by cosine similarity.

    Devlin et al. 2015, "Exploring Nearest Neighbor Approaches for Image Captioning", simplified to 1-NN: the paper
    gathers the captions of the k nearest training images and returns their consensus caption (the one with the
    highest mean BLEU / CIDEr against the others); here the single nearest image's first caption is returned.
    Queries are processed `chunk_size` at a time (memory chunk x N).
    """
    if train_features.shape[0] != len(train_captions) or not train_captions:
        raise ValueError(
            f"nearest_neighbour_captions needs one caption per training sample, got {len(train_captions)} captions "
            f"for {train_features.shape[0]} features"
        )
    train = F.normalize(train_features.float(), dim=-1)
    queries = F.normalize(query_features.float(), dim=-1)
    first_lines = [(split_captions(caption) or [""])[0] for caption in train_captions]
    nearest: list[int] = []
    for start in range(0, queries.shape[0], chunk_size):
        nearest.extend((queries[start : start + chunk_size] @ train.T).argmax(dim=1).tolist())
    return [first_lines[index] for index in nearest]


class CaptionMetrics(EvaluationCallback):
    """BLEU-1, BLEU-4, ROUGE-L, CIDEr and exact match of the method's captions of held-out images (module doc),
    logged as `captions/<name>/BLEU-1`, `.../BLEU-4`, `.../ROUGE-L`, `.../CIDEr`, `.../exact_match`, plus a
    TensorBoard picture `captions/<name>/examples`: the first `num_examples` images with their generated caption
    and a true one.

    Needs a method with `generate_captions(images [N, 3, H, W], max_length: int | None, beam_size: int) -> list[str]`
    (one caption per image); other methods skip it with one warning. The images are the evaluation crops every
    evaluation reads (`method_eval_loader`).

    Args:
        shards: captioned shard pattern (`.txt`; each line one reference caption of the image).
        name: metric prefix.
        max_samples: caption the first this many images (None: all).
        num_examples: images shown in the TensorBoard picture.
        max_length: longest caption in tokens (None: the method's default).
        beam_size: beams of the method's decoding (1: greedy).
        every_n_epochs, batch_size, num_workers: see `EvaluationCallback`.
    """

    def __init__(
        self,
        shards: str,
        name: str = "captions",
        max_samples: int | None = None,
        num_examples: int = 4,
        max_length: int | None = None,
        beam_size: int = 1,
        every_n_epochs: int = 1,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, batch_size=batch_size, num_workers=num_workers)
        if beam_size < 1:
            raise ValueError(f"CaptionMetrics beam_size={beam_size} must be at least 1 (1 decodes greedily)")
        if max_length is not None and max_length < 1:
            raise ValueError(f"CaptionMetrics max_length={max_length} must be at least 1 token, or None")
        self.shards = shards
        self.name = name
        self.max_samples = max_samples
        self.num_examples = num_examples
        self.max_length = max_length
        self.beam_size = beam_size

    def evaluate(self, trainer: Trainer, method: LightningModule) -> dict[str, float]:
        if not callable(getattr(method, "generate_captions", None)):
            self.warn_once(f"CaptionMetrics skipped: {type(method).__name__} has no generate_captions(images, ...)")
            return {}
        device = module_device(method)
        loader, view = method_eval_loader(method, self.shards, self.batch_size, self.num_workers)
        mean, std = view.normalization
        references: list[list[str]] = []
        thumbnails: list[Tensor] = []

        def batches() -> Iterator[tuple[Tensor, int]]:
            kept_thumbnails = 0
            for batch in loader:
                if "caption" not in batch:
                    raise ValueError(f"CaptionMetrics {self.name!r}: the shards {self.shards} have no .txt captions")
                rows = len(batch["__key__"]) if self.max_samples is None else min(
                    len(batch["__key__"]), self.max_samples - len(references))
                if rows <= 0:
                    return
                references.extend(split_captions(caption) for caption in batch["caption"][:rows])
                images = batch["image"][:rows]
                if kept_thumbnails < self.num_examples:
                    thumbnails.append(to_thumbnails(images[: self.num_examples - kept_thumbnails], mean=mean, std=std))
                    kept_thumbnails += thumbnails[-1].shape[0]
                yield images, rows

        def generate(images: Tensor) -> list[str]:
            return method.generate_captions(images.to(device), self.max_length, self.beam_size)

        captions = generate_across_ranks(generate, batches())
        if not captions:
            raise ValueError(f"CaptionMetrics {self.name!r}: the shards {self.shards} hold no samples")
        metrics = caption_metrics(captions, references)

        def draw() -> np.ndarray:
            lines = [[(f"generated: {caption}", False), (f"truth: {refs[0]}", True)]
                     for caption, refs in zip(captions, references)]
            shown = torch.cat(thumbnails)
            return examples_picture(shown, lines[: len(shown)])

        if thumbnails:
            log_picture(trainer, f"captions/{self.name}/examples", draw)
        return {f"captions/{self.name}/{metric}": value for metric, value in metrics.items()}
