"""Captioning evaluation: BLEU agrees with COCO's `pycocoevalcap` (and differs only where the module doc says), CIDEr
ranks a matching corpus above a shuffled one, `CaptionMetrics` runs inside `Trainer.validate` on tiny hand-made
shards, captions are shared across ranks, and the nearest-neighbour baseline picks the nearest caption."""

from __future__ import annotations

import io
import logging
import math
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor
from torchmetrics.text import BLEUScore

from test_callbacks import COLOURS, ColourMethod, dummy_loader
from vlp_lightning.callbacks import CaptionMetrics, caption_metrics, nearest_neighbour_captions
from vlp_lightning.callbacks.captioning import generate_across_ranks, normalize_caption

pytest.importorskip("pycocoevalcap")
from pycocoevalcap.bleu.bleu import Bleu  # noqa: E402  (after the skip: an optional extra)


def coco_bleu(candidates: list[str], references: list[list[str]]) -> list[float]:
    """BLEU-1..4 of COCO's scorer (corpus level, its "closest" reference length)."""
    images = range(len(candidates))
    scores, _ = Bleu(4).compute_score(
        {image: references[image] for image in images}, {image: [candidates[image]] for image in images}, verbose=0
    )
    return scores


# ---------------------------------------------------------------------------------------------- metrics

CANDIDATES = ["a man riding a horse on the beach", "two dogs play in the snow", "a red square", "a dog runs on grass"]
REFERENCES = [
    ["a man rides a horse along the beach at sunset", "a person riding a horse on the beach"],
    ["two dogs are playing in the snow", "dogs play in the snow together", "two dogs"],
    ["a red square on grey", "a square"],  # 3 words: the references of 4 and 2 are equally close
    ["a dog runs on the grass", "a dog runs on"],  # 5 words: 6 and 4 equally close
]


def test_bleu_agrees_with_pycocoevalcap_on_a_multi_reference_corpus() -> None:
    ours = caption_metrics(CANDIDATES, REFERENCES)
    coco = coco_bleu(CANDIDATES, REFERENCES)
    assert all(score > 0.1 for score in coco)  # every n-gram order has matches: the case where the two must agree
    assert ours["BLEU-1"] == pytest.approx(coco[0], abs=1e-6)
    assert ours["BLEU-4"] == pytest.approx(coco[3], abs=1e-6)


def test_bleu_differs_from_pycocoevalcap_exactly_where_documented() -> None:
    # (1) a tie in the closest reference length: raw torchmetrics takes the first (6 words), COCO the shorter (4)
    candidate, references = ["a dog runs on grass"], [["a dog runs on the grass", "a dog runs on"]]
    coco = coco_bleu(candidate, references)[3]
    raw = BLEUScore(n_gram=4)(candidate, references).item()
    assert raw == pytest.approx(coco * math.exp(1 - 6 / 5), abs=1e-6)  # brevity penalty exp(1 - r / c), r = 6, c = 5
    assert caption_metrics(candidate, references)["BLEU-4"] == pytest.approx(coco, abs=1e-6)  # sorted references
    # (2) an n-gram order without any match: torchmetrics 0, COCO a small positive value from its 1e-15 / 1e-9
    no_trigram = (["a dog on grass"], [["a dog in grass"]])
    assert caption_metrics(*no_trigram)["BLEU-4"] == 0.0 and 0 < coco_bleu(*no_trigram)[3] < 1e-3
    too_short = (["a dog runs"], [["a dog runs"]])  # a perfect caption without 4-grams: COCO's p4 is 1e-15 / 1e-9
    assert caption_metrics(*too_short)["BLEU-4"] == 0.0
    assert coco_bleu(*too_short)[3] == pytest.approx(1e-6 ** (1 / 4), rel=1e-6)  # 0.0316


def test_rouge_l_is_the_lcs_f1_of_the_best_reference() -> None:
    # LCS with "a x c d e" is 3 of 4 / 5 words (F1 2/3); with "a b" 2 of 4 / 2 (F1 2/3 too); "a b c d" scores 1
    metrics = caption_metrics(["a b c d", "a b c d"], [["a x c d e", "a b"], ["a x c d e", "a b c d"]])
    assert metrics["ROUGE-L"] == pytest.approx((2 / 3 + 1.0) / 2)


def test_cider_of_a_matching_corpus_is_high_and_of_a_shuffled_one_lower() -> None:
    captions = [
        "a red square on a grey background", "two dogs play in the snow", "a man riding a horse on the beach",
        "a plate of pasta with tomato sauce", "a train crossing a bridge at night", "children flying kites in a park",
    ]
    references = [[caption] for caption in captions]
    matching = caption_metrics(captions, references)["CIDEr"]
    shuffled = caption_metrics(captions[1:] + captions[:1], references)["CIDEr"]
    assert matching > 5 and shuffled < matching / 4
    assert caption_metrics(captions[:1], references[:1])["CIDEr"] == 0.0  # IDF from one image: every weight is 0


def test_names_object_is_the_share_of_captions_mentioning_a_word_of_the_name() -> None:
    from vlp_lightning.callbacks.captioning import names_object

    assert names_object("a dog face", ["cat face"]) and not names_object("a dog", ["cat face"])
    assert not names_object("with the of", ["face with tears of joy"])  # no content word in common
    candidates = ["big red apple", "blue car", "something else", "face"]
    references = [["red apple"], ["green tree"], ["cat"], ["grinning face"]]
    assert caption_metrics(candidates, references)["names_object"] == pytest.approx(2 / 4)


def test_exact_match_is_the_share_of_captions_equal_to_a_reference_after_normalising() -> None:
    """Word accuracy of text recognition: case and punctuation do not count, a near miss does."""
    candidates = ["Apple", "pear.", "plum", "kiwi"]
    references = [["apple"], ["a pear", "PEAR"], ["plums"], ["lime", "kiwi!"]]
    assert caption_metrics(candidates, references)["exact_match"] == pytest.approx(3 / 4)


def test_metrics_reject_images_without_references_and_name_pycocoevalcap_when_missing(monkeypatch) -> None:
    with pytest.raises(ValueError, match="image 1 has no reference caption"):
        caption_metrics(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="one candidate per image"):
        caption_metrics(["a"], [["a"], ["b"]])
    monkeypatch.setitem(sys.modules, "pycocoevalcap.cider.cider", None)
    with pytest.raises(ImportError, match="pip install pycocoevalcap"):
        caption_metrics(["a"], [["a"]])


def test_normalize_caption_lowercases_drops_punctuation_and_collapses_white_space() -> None:
    assert normalize_caption("  A Dog's  ball, on\tthe GRASS!\n") == "a dog s ball on the grass"
    assert normalize_caption("black-and-white (photo) — “old”...") == "black and white photo old"
    assert normalize_caption("Café naïve 3.5 $") == "café naïve 3 5 $"  # letters kept, symbols are not punctuation
    assert normalize_caption("") == "" and normalize_caption("a dog s") == "a dog s"  # idempotent


def test_nearest_neighbour_captions_returns_the_first_line_of_the_most_similar_training_sample() -> None:
    train = torch.eye(3)
    captions = ["a cat\na kitten", "a dog", "a bird"]
    queries = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.0, 2.0], [0.0, 5.0, 1.0]])  # cosine: the scale does not matter
    assert nearest_neighbour_captions(train, captions, queries, chunk_size=2) == ["a cat", "a bird", "a dog"]
    with pytest.raises(ValueError, match="one caption per training sample"):
        nearest_neighbour_captions(train, captions[:2], queries)


# ---------------------------------------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _generate_worker(rank: int, port: int, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    calls = []

    def generate(images: Tensor) -> list[str]:
        calls.append(int(images[0]))
        return [f"batch {int(images[0])} image {row}" for row in range(len(images))]

    batches = [(torch.full((size, 1), index), size) for index, size in enumerate([2, 2, 1])]
    captions = generate_across_ranks(generate, batches)
    torch.save({"captions": captions, "calls": len(calls)}, Path(result_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_generate_across_ranks_gives_every_rank_all_captions_in_order(tmp_path: Path) -> None:
    mp.start_processes(_generate_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    expected = ["batch 0 image 0", "batch 0 image 1", "batch 1 image 0", "batch 1 image 1", "batch 2 image 0"]
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["captions"] == expected  # rank 1's throw-away call on batch 0 is not counted twice
        assert result["calls"] == 2


# ---------------------------------------------------------------------------------------------- in a Trainer

SHAPES = ("square", "circle")


def caption_shards(directory: Path, write_tar) -> tuple[str, list[list[str]]]:
    """8 plain-colour images, each with two reference lines; the shard path and the references in order."""
    directory.mkdir()
    samples, references = [], []
    for index, (colour, shape) in enumerate((colour, shape) for colour in COLOURS for shape in SHAPES):
        lines = [f"A {colour} {shape} on a grey background.", f"The {shape} is {colour}"]
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), COLOURS[colour]).save(buffer, format="PNG")
        samples.append({"__key__": f"val{index:06d}", "png": buffer.getvalue(), "txt": "\n".join(lines).encode()})
        references.append(lines)
    return str(write_tar(directory / "val-000000.tar", samples)), references


class FixedCaptioner(ColourMethod):
    """`generate_captions` returns fixed captions in loader order, and records what it was asked for."""

    def __init__(self, captions: list[str]) -> None:
        super().__init__(with_text=False)
        self.captions = captions
        self.given = 0
        self.requests: list[tuple[tuple[int, ...], int | None, int]] = []

    def generate_captions(self, images: Tensor, max_length: int | None, beam_size: int) -> list[str]:
        self.requests.append((tuple(images.shape), max_length, beam_size))
        captions = self.captions[self.given : self.given + len(images)]
        self.given += len(images)
        return captions


def test_caption_metrics_inside_trainer_validate(tmp_path: Path, write_tar, caplog: pytest.LogCaptureFixture) -> None:
    shards, references = caption_shards(tmp_path / "val", write_tar)
    perfect = [f"the {refs[1].split()[1].upper()} is {refs[1].split()[-1]}!" for refs in references]  # 2nd line
    wrong = ["zebra stripes on a wall"] * len(references)
    half = [perfect[index] if index % 2 == 0 else wrong[index] for index in range(len(references))]
    results = {}
    for label, captions in (("perfect", perfect), ("half", half), ("wrong", wrong)):
        callback = CaptionMetrics(shards, name="shapes", num_examples=3, max_length=12, beam_size=2, batch_size=3)
        method = FixedCaptioner(captions)
        logger = TensorBoardLogger(tmp_path / "runs", name=label) if label == "half" else False
        trainer = Trainer(logger=logger, callbacks=[callback], accelerator="cpu", enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=tmp_path)
        logging.getLogger("lightning.pytorch").addHandler(caplog.handler)
        try:
            with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
                (results[label],) = trainer.validate(method, dataloaders=dummy_loader(), verbose=False)
        finally:
            logging.getLogger("lightning.pytorch").removeHandler(caplog.handler)
        assert method.requests == [((3, 3, 16, 16), 12, 2)] * 2 + [((2, 3, 16, 16), 12, 2)]  # eval crops, the args
        if label == "half":
            events = EventAccumulator(logger.log_dir).Reload()
            assert "captions/shapes/examples" in events.Tags()["images"]

    names = {f"captions/shapes/{metric}" for metric in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr", "exact_match",
                                                                  "names_object")}
    assert {name for name in results["half"] if name.startswith("captions/")} == names
    assert results["perfect"]["captions/shapes/BLEU-4"] == pytest.approx(1.0)  # matches a reference after normalising
    assert results["perfect"]["captions/shapes/ROUGE-L"] == pytest.approx(1.0)
    for name in names:
        assert results["perfect"][name] > results["half"][name] > results["wrong"][name]
    assert "captions/shapes" in caplog.text and "CIDEr" in caplog.text  # the results table of `vlp validate / test`


def test_caption_metrics_skip_methods_without_generate_captions_with_one_warning(tmp_path: Path, write_tar) -> None:
    shards, _ = caption_shards(tmp_path / "val", write_tar)
    callback = CaptionMetrics(shards)
    method = ColourMethod()
    with pytest.warns(UserWarning, match="has no generate_captions") as warnings:
        assert callback.evaluate(None, method) == {} and callback.evaluate(None, method) == {}
    assert len([w for w in warnings if "generate_captions" in str(w.message)]) == 1
    assert method.image_calls == 0
    with pytest.raises(ValueError, match="beam_size=0 must be at least 1"):
        CaptionMetrics(shards, beam_size=0)
