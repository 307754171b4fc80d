"""Evaluation and monitoring callbacks.

The metric functions are checked on embeddings of known structure (a perfect model scores 1, a random one chance)
and against references (torchmetrics' retrieval hit rate, scikit-learn's kNN and logistic regression); the
callbacks run inside `Trainer.validate` / `fit` with a fixed-encoder method on tiny generated shards.
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from jsonargparse import ArgumentParser
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.retrieval import RetrievalHitRate

from data_modules.views import IMAGENET_MEAN, IMAGENET_STD, SingleCrop, Views
from vlp_lightning.callbacks import (
    EmbeddingProjector,
    EvaluationCallback,
    KNNClassifier,
    LinearProbe,
    Retrieval,
    ThroughputMonitor,
    ZeroShotClassification,
    ZeroShotDataset,
    build_zero_shot_classifier,
    fit_logistic_regression,
    linear_probe_scores,
    retrieval_metrics,
    retrieval_ranks,
    weighted_knn_scores,
)
from vlp_lightning.callbacks.features import classification_metrics, encode_across_ranks, format_results_table
from vlp_lightning.callbacks.retrieval import ranked_caption_lines, split_captions
from vlp_lightning.callbacks.zero_shot import confusion_matrix_picture
from vlp_lightning.methods.base import VLPMethod
from vlp_lightning.modules.tokenizers import ByteTokenizer

# ---------------------------------------------------------------------------------------------- helpers

BACKGROUND = 90  # grey of the generated shard images (tests/conftest.py)
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def decode_bytes(input_ids: Tensor, attention_mask: Tensor) -> list[str]:
    """ByteTokenizer ids -> the texts (start and end tokens dropped)."""
    return [bytes(ids[mask.bool()][1:-1].tolist()).decode() for ids, mask in zip(input_ids, attention_mask)]


class LookupTextEncoder(nn.Module):
    """`encode_text` of a fixed table: a text's embedding is the vector of the first table word it contains."""

    def __init__(self, table: dict[str, Tensor]) -> None:
        super().__init__()
        self.table = table
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device

    def encode_text(self, text: dict[str, Tensor]) -> Tensor:
        texts = decode_bytes(text["input_ids"], text["attention_mask"])
        return torch.stack([next(vector for word, vector in self.table.items() if word in t) for t in texts])


class ColourMethod(VLPMethod):
    """Fixed encoders for the generated shapes: an image is its mean colour minus the grey background, a text the
    colour of the colour word it names. Counts its image-encoder calls."""

    required_keys = ("image", "text")

    def __init__(self, with_text: bool = True) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.tokenizer = ByteTokenizer(context_length=48) if with_text else None
        colours = {name: torch.tensor(rgb) - float(BACKGROUND) for name, rgb in COLOURS.items()}
        self.text_encoder = LookupTextEncoder(colours)
        self.image_calls = 0

    @property
    def image_size(self) -> int:
        return 16

    def train_views(self) -> Views:
        return SingleCrop()

    def encode_image(self, images: Tensor) -> Tensor:
        self.image_calls += 1
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return ((images.float() * std + mean) * 255 - BACKGROUND).mean((2, 3)) + self.anchor

    def probe_features(self, images: Tensor) -> Tensor:
        """The same colour features, one dimension wider (a backbone wider than its joint space, like CLIP's)."""
        features = self.encode_image(images)
        return torch.cat([features, features[:, :1]], dim=1)

    def encode_text(self, text: dict[str, Tensor]) -> Tensor:
        return self.text_encoder.encode_text(text)

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        return {"loss": self.anchor * 0}


class ImageOnlyColourMethod(ColourMethod):
    """The same image encoder without a text tower (like SwAV or MAE)."""

    required_keys = ("image",)
    encode_text = VLPMethod.encode_text
    encode_image = VLPMethod.encode_image

    def probe_features(self, images: Tensor) -> Tensor:
        return ColourMethod.encode_image(self, images)

    def __init__(self) -> None:
        super().__init__(with_text=False)


def dummy_loader() -> DataLoader:
    """One tiny batch so that `Trainer.validate` / `test` run their epoch hooks."""
    return DataLoader([{"image": torch.zeros(3, 16, 16)}], batch_size=1)


def clustered_features(
    num_classes: int, per_class: int, dim: int, noise: float, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(prototypes [C, D], features [C * per_class, D], labels): unit prototypes plus Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(num_classes, dim, generator=generator), dim=-1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = prototypes[labels] + noise * torch.randn(len(labels), dim, generator=generator)
    return prototypes, features, labels


# ---------------------------------------------------------------------------------------------- retrieval


def test_retrieval_is_perfect_for_a_perfect_model_and_at_chance_for_a_random_one() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(200, 32, generator=generator)
    text_to_image = torch.arange(200).repeat_interleave(3)  # three captions per image
    texts = images[text_to_image] + 0.05 * torch.randn(600, 32, generator=generator)
    perfect = retrieval_metrics(*retrieval_ranks(images, texts, text_to_image, chunk_size=64))
    assert perfect["i2t_R@1"] == perfect["t2i_R@1"] == 1.0
    assert perfect["i2t_median_rank"] == perfect["t2i_median_rank"] == 1.0

    random = retrieval_metrics(*retrieval_ranks(images, torch.randn(600, 32, generator=generator), text_to_image))
    # chance: i2t R@1 = 1 - (1 - 1/200)^3 ~ 0.015, t2i R@10 = 10/200 = 0.05, median rank ~ half the candidates
    assert random["i2t_R@1"] < 0.05 and random["t2i_R@1"] < 0.03 and random["t2i_R@10"] < 0.12
    assert 60 < random["t2i_median_rank"] < 140


def test_retrieval_ranks_match_torchmetrics_hit_rate_and_do_not_depend_on_chunking() -> None:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(30, 8, generator=generator)
    text_to_image = torch.tensor([i for i in range(30) for _ in range(1 + i % 3)])  # 1 to 3 captions per image
    texts = images[text_to_image] + 1.5 * torch.randn(len(text_to_image), 8, generator=generator)
    image_ranks, text_ranks = retrieval_ranks(images, texts, text_to_image, chunk_size=7)
    full_image_ranks, full_text_ranks = retrieval_ranks(images, texts, text_to_image, chunk_size=10_000)
    assert torch.equal(image_ranks, full_image_ranks) and torch.equal(text_ranks, full_text_ranks)
    metrics = retrieval_metrics(image_ranks, text_ranks)

    similarity = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T  # [N, M]
    relevant = text_to_image[None, :] == torch.arange(30)[:, None]
    for k in (1, 5, 10):
        i2t = RetrievalHitRate(top_k=k)(
            similarity.flatten(), relevant.flatten(), indexes=torch.arange(30).repeat_interleave(len(text_to_image))
        )
        t2i = RetrievalHitRate(top_k=k)(
            similarity.T.flatten(), relevant.T.flatten(), indexes=torch.arange(len(text_to_image)).repeat_interleave(30)
        )
        assert metrics[f"i2t_R@{k}"] == pytest.approx(i2t.item())
        assert metrics[f"t2i_R@{k}"] == pytest.approx(t2i.item())
    assert 0.2 < metrics["t2i_R@5"] < 1.0  # the noise makes this a real test of ranking, not a trivial one


def test_several_caption_lines_are_several_captions_and_the_examples_show_the_truth() -> None:
    assert split_captions("a dog on grass\n\n  a brown dog \n") == ["a dog on grass", "a brown dog"]
    texts = ["dog", "brown dog", "cat", "car"]
    text_to_image = torch.tensor([0, 0, 1, 2])
    lines = ranked_caption_lines(torch.tensor([[1, 2], [3, 0]]), texts, text_to_image)
    assert lines[0] == [("1. brown dog", True), ("2. cat", False)]
    assert lines[1] == [("1. car", False), ("2. dog", False), ("truth: cat", True)]  # image 1's caption, not ranked


# ---------------------------------------------------------------------------------------------- zero-shot


def test_zero_shot_classifier_averages_normalised_template_embeddings() -> None:
    generator = torch.Generator().manual_seed(2)
    table = {word: torch.randn(6, generator=generator) * scale for word, scale in
             [("photo of a cat", 1.0), ("drawing of a cat", 5.0), ("photo of a dog", 2.0), ("drawing of a dog", 0.1)]}
    encoder = LookupTextEncoder(table)
    classifier = build_zero_shot_classifier(
        encoder, ByteTokenizer(32), ["cat", "dog"], ["a photo of a {}.", "a drawing of a {}."]
    )
    for row, name in enumerate(["cat", "dog"]):
        mean = (F.normalize(table[f"photo of a {name}"], dim=0) + F.normalize(table[f"drawing of a {name}"], dim=0)) / 2
        torch.testing.assert_close(classifier[row], F.normalize(mean, dim=0))


def test_zero_shot_accuracy_is_one_for_a_perfect_model_and_chance_for_a_random_one() -> None:
    classnames = [f"class{index:02d}" for index in range(10)]
    prototypes, images, labels = clustered_features(10, 50, 16, noise=0.05, seed=3)
    encoder = LookupTextEncoder(dict(zip(classnames, prototypes)))
    classifier = build_zero_shot_classifier(encoder, ByteTokenizer(32), classnames, ["a photo of a {}."])
    perfect = classification_metrics(F.normalize(images, dim=-1) @ classifier.T, labels, 10)
    assert perfect == {"top1": 1.0, "top5": 1.0}
    random = classification_metrics(torch.randn(500, 16) @ classifier.T, labels, 10)
    assert 0.03 < random["top1"] < 0.18 and 0.4 < random["top5"] < 0.6


def test_confusion_matrix_picture_is_dark_on_the_diagonal_and_names_the_classes() -> None:
    picture = confusion_matrix_picture(torch.eye(3), ["alpha", "beta", "gamma"])
    unnamed = confusion_matrix_picture(torch.eye(3))
    cell = 28
    assert picture.shape[0] > unnamed.shape[0]  # room for the names
    margin = unnamed.shape[0] - 3 * cell - 4
    assert tuple(unnamed[margin + 3, margin + 3]) == (8, 48, 107)  # inside cell (0, 0): the colour of 1.0
    assert tuple(unnamed[margin + 3, margin + cell + 3]) == (255, 255, 255)  # cell (0, 1): 0.0


def test_templates_and_zero_shot_dataset_configure_from_yaml() -> None:
    parser = ArgumentParser()
    parser.add_class_arguments(ZeroShotClassification, "zero_shot")
    config = parser.parse_string(
        "zero_shot:\n  datasets:\n"
        "    - {name: noto, shards: data/noto/val-000000.tar, label_field: subcategory_id}\n"
        "    - {name: fashion, shards: data/f/val-000000.tar, classnames: [shirt, shoe], templates: openai_imagenet}\n"
    )
    callback = parser.instantiate_classes(config).zero_shot
    assert isinstance(callback, ZeroShotClassification)
    assert callback.datasets == [
        ZeroShotDataset(name="noto", shards="data/noto/val-000000.tar", label_field="subcategory_id"),
        ZeroShotDataset(
            name="fashion", shards="data/f/val-000000.tar", classnames=["shirt", "shoe"], templates="openai_imagenet"
        ),
    ]
    with pytest.raises(ValueError, match="unknown template set 'imagenet'"):
        ZeroShotClassification([ZeroShotDataset(name="x", shards="x.tar", templates="imagenet")])
    with pytest.raises(ValueError, match="one '{}'"):
        ZeroShotClassification([ZeroShotDataset(name="x", shards="x.tar", templates=["a photo"])])


# ---------------------------------------------------------------------------------------------- kNN, linear probe


def test_weighted_knn_matches_scikit_learn_and_is_perfect_on_separated_classes() -> None:
    _, train, train_labels = clustered_features(5, 30, 12, noise=0.6, seed=4)
    _, test, test_labels = clustered_features(5, 20, 12, noise=0.6, seed=4)  # same prototypes, other noise
    test = test + 0.3 * torch.randn(test.shape, generator=torch.Generator().manual_seed(5))
    k, temperature = 7, 0.1
    votes = weighted_knn_scores(train, train_labels, test, num_classes=5, k=k, temperature=temperature, chunk_size=16)
    reference = KNeighborsClassifier(
        n_neighbors=k, metric="cosine", algorithm="brute", weights=lambda distance: np.exp((1 - distance) / temperature)
    ).fit(train.numpy(), train_labels.numpy())
    probabilities = (votes / votes.sum(1, keepdim=True)).numpy()
    np.testing.assert_allclose(probabilities, reference.predict_proba(test.numpy()), atol=1e-5)
    accuracy = classification_metrics(votes, test_labels, 5)["top1"]
    assert 0.4 < accuracy < 1.0  # noisy enough that the comparison covers wrong votes too

    _, separated, labels = clustered_features(5, 20, 12, noise=0.05, seed=6)
    assert classification_metrics(weighted_knn_scores(separated, labels, separated, 5), labels, 5)["top1"] == 1.0


def test_linear_probe_matches_scikit_learn_logistic_regression() -> None:
    _, features, labels = clustered_features(3, 40, 8, noise=0.8, seed=7)
    weight, bias = fit_logistic_regression(features, labels, num_classes=3, inverse_regularization=0.5)
    probabilities = torch.softmax(features.double() @ weight.T + bias, dim=1)
    reference = LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000).fit(features.double().numpy(), labels.numpy())
    np.testing.assert_allclose(probabilities.numpy(), reference.predict_proba(features.double().numpy()), atol=1e-5)
    np.testing.assert_allclose(weight.numpy(), reference.coef_, atol=1e-4)  # the penalty fixes W (rows sum to 0)
    assert (probabilities.argmax(1) == labels).float().mean() > 0.7


def test_standardized_linear_probe_matches_scikit_learn_on_standardized_features_whatever_the_feature_scale() -> None:
    _, features, labels = clustered_features(3, 40, 8, noise=0.8, seed=8)
    features = features.double()
    scaled = features * torch.logspace(-3, 3, 8, dtype=torch.float64) + 50.0  # wildly different scales, offsets
    scores = linear_probe_scores(scaled, labels, scaled, num_classes=3, standardize=True)
    standardized = ((features - features.mean(0)) / features.std(0)).double().numpy()
    reference = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(standardized, labels.numpy())
    np.testing.assert_allclose(torch.softmax(scores, 1).numpy(), reference.predict_proba(standardized), atol=1e-4)


# ---------------------------------------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _encode_worker(rank: int, port: int, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    calls = []

    def encode(batch: Tensor) -> Tensor:
        calls.append(len(batch))
        return batch * 2

    sizes = [4, 4, 4, 4, 3]  # five batches: rank 0 encodes three, rank 1 two plus one throw-away call
    batches = [(torch.arange(size * 2.0).view(size, 2) + 100 * index, size) for index, size in enumerate(sizes)]
    features = encode_across_ranks(encode, batches)
    torch.save({"features": features, "calls": len(calls)}, Path(result_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_encode_across_ranks_shares_the_work_and_gives_every_rank_all_features(tmp_path: Path) -> None:
    # fork: the children need nothing but torch, re-importing this test module in a fresh interpreter is slow
    mp.start_processes(_encode_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    sizes = [4, 4, 4, 4, 3]
    batches = [torch.arange(size * 2.0).view(size, 2) + 100 * index for index, size in enumerate(sizes)]
    expected = torch.cat(batches) * 2
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["features"], expected)
        assert result["calls"] == 3  # equal encoder calls on both ranks (FSDP needs them)


# ---------------------------------------------------------------------------------------------- in a Trainer


def test_callbacks_inside_trainer_validate(make_shards, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    train = make_shards(tmp_path / "train", n=40, per_shard=20, seed=1)
    val = make_shards(tmp_path / "val", n=40, per_shard=20, split="val", seed=2)
    method = ColourMethod()
    callbacks = [
        ZeroShotClassification([ZeroShotDataset(name="shapes", shards=val.pattern)], batch_size=16),
        Retrieval(val.pattern, name="shapes", batch_size=16),
        KNNClassifier(train.pattern, val.pattern, k=5, name="shapes", batch_size=16),
        LinearProbe(train.pattern, val.pattern, name="shapes", batch_size=16),
        EmbeddingProjector(val.pattern, name="shapes", max_samples=30, batch_size=16),
    ]
    logger = TensorBoardLogger(tmp_path / "runs", name="colour")
    trainer = Trainer(
        logger=logger, callbacks=callbacks, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False
    )
    logging.getLogger("lightning.pytorch").addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
            (results,) = trainer.validate(method, dataloaders=dummy_loader(), verbose=False)
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(caplog.handler)

    assert results["zeroshot/shapes/top1"] == 1.0  # the colour encoders are a perfect zero-shot model
    assert results["retrieval/shapes/i2t_R@1"] == 1.0  # captions of one class are identical: all count as hits
    assert results["retrieval/shapes/t2i_R@10"] >= 10 / 40  # and a caption's image is one of its class
    assert results["knn/shapes/top1"] >= 0.9 and results["linear_probe/shapes/top1"] >= 0.9
    # 3 batches per (shard set, representation): val in the joint space (zero-shot, retrieval, projector), train
    # and val as probe features (kNN, linear probe); each encoded once for all five callbacks
    assert method.image_calls == 9
    assert results["knn/shapes/dim"] == 4 and results["linear_probe/shapes/dim"] == 4  # probe_features, not joint
    assert "zeroshot/shapes" in caplog.text and "linear_probe/shapes" in caplog.text  # the results table

    events = EventAccumulator(logger.log_dir).Reload()
    assert {"zeroshot/shapes/confusion", "retrieval/shapes/examples"} <= set(events.Tags()["images"])
    projector = (Path(logger.log_dir) / "projector_config.pbtxt").read_text()
    assert "projector/shapes" in projector and "sprite" in projector
    metadata = next(Path(logger.log_dir).glob("*/*/metadata.tsv")).read_text().splitlines()
    assert metadata[0] == "label\tcaption" and len(metadata) == 31  # header + max_samples rows
    assert metadata[1].split("\t")[0] in {"red square", "green circle", "blue triangle", "yellow cross"}


@pytest.mark.slow
def test_two_ddp_processes_give_the_single_process_metrics(make_shards, tmp_path: Path) -> None:
    train = make_shards(tmp_path / "train", n=40, per_shard=20, seed=1)
    val = make_shards(tmp_path / "val", n=37, per_shard=20, split="val", seed=2)  # 5 batches of 8: uneven split
    callbacks = [
        ZeroShotClassification([ZeroShotDataset(name="shapes", shards=val.pattern)], batch_size=8),
        Retrieval(val.pattern, name="shapes", batch_size=8),
        KNNClassifier(train.pattern, val.pattern, k=5, name="shapes", batch_size=8),
        LinearProbe(train.pattern, val.pattern, name="shapes", batch_size=8),
    ]
    results = []
    for strategy, devices in (("auto", 1), ("ddp_spawn", 2)):
        trainer = Trainer(
            strategy=strategy, devices=devices, accelerator="cpu", logger=False, callbacks=callbacks,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        )
        results.append(trainer.validate(ColourMethod(), dataloaders=dummy_loader(), verbose=False)[0])
    assert len(results[0]) > 10 and results[0] == pytest.approx(results[1])


def test_text_evaluations_skip_methods_without_text_tower_with_one_warning(make_shards, tmp_path: Path) -> None:
    val = make_shards(tmp_path, n=8, per_shard=8)
    callbacks = [ZeroShotClassification([ZeroShotDataset(name="shapes", shards=val.pattern)]), Retrieval(val.pattern)]
    method = ImageOnlyColourMethod()
    with pytest.warns(UserWarning, match="has no text tower") as warnings:
        for _ in range(2):
            assert all(callback.evaluate(None, method) == {} for callback in callbacks)
    assert len([w for w in warnings if "text tower" in str(w.message)]) == 2  # once per callback, not per call
    assert method.image_calls == 0


class RecordingEvaluation(EvaluationCallback):
    """Records the trainer function and stage of every evaluation."""

    def __init__(self, every_n_epochs: int) -> None:
        super().__init__(every_n_epochs=every_n_epochs)
        self.runs: list[tuple[str, str, int]] = []

    def evaluate(self, trainer: Trainer, method: LightningModule) -> dict[str, float]:
        self.runs.append((trainer.state.fn.value, trainer.state.stage.value, trainer.current_epoch))
        return {"recording/probe/epoch": float(trainer.current_epoch)}


@pytest.mark.parametrize("with_validation", [True, False])
def test_evaluations_run_every_n_epochs_in_fit_and_always_in_validate_and_test(
    with_validation: bool, tmp_path: Path
) -> None:
    recorder = RecordingEvaluation(every_n_epochs=2)
    trainer = Trainer(
        max_epochs=4, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=1,
        callbacks=[recorder], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
    )
    method = ColourMethod()
    trainer.fit(method, train_dataloaders=dummy_loader(), val_dataloaders=dummy_loader() if with_validation else None)
    stage = "validate" if with_validation else "train"  # after the epoch's validation, else at the epoch's end
    assert recorder.runs == [("fit", stage, 1), ("fit", stage, 3)]
    assert trainer.callback_metrics["recording/probe/epoch"] == 3.0
    trainer.validate(method, dataloaders=dummy_loader(), verbose=False)
    trainer.test(method, dataloaders=dummy_loader(), verbose=False)
    assert [run[0] for run in recorder.runs[2:]] == ["validate", "test"]


def test_results_table_groups_metrics_by_evaluation() -> None:
    table = format_results_table({"zeroshot/noto/top1": 0.41234, "zeroshot/noto/top5": 0.7, "knn/noto/top1": 0.5})
    assert table.splitlines() == ["  zeroshot/noto  top1 0.4123  top5 0.7", "  knn/noto       top1 0.5"]


# ---------------------------------------------------------------------------------------------- throughput


class SlowImages(Dataset):
    """Images that take `delay` seconds each to load: a data-bound input pipeline."""

    def __init__(self, count: int, delay: float) -> None:
        self.count = count
        self.delay = delay

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        time.sleep(self.delay)
        return {"image": torch.randn(3, 4, 4)}


class LinearModel(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(48, 4)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self.linear(batch["image"].flatten(1)).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_throughput_monitor_counts_flops_and_sees_a_data_bound_pipeline(tmp_path: Path) -> None:
    batch_size, delay = 8, 0.005
    monitor = ThroughputMonitor(every_n_steps=3, ceiling_matrix_size=256)
    trainer = Trainer(
        max_epochs=1, limit_train_batches=7, callbacks=[monitor], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
    )
    trainer.fit(LinearModel(), DataLoader(SlowImages(64, delay), batch_size=batch_size))
    # forward x @ W.T and the weight gradient, 2 * B * 48 * 4 FLOPs each (the input needs no gradient)
    assert monitor.flops_per_batch == 2 * (2 * batch_size * 48 * 4)
    assert monitor.ceiling_flops_per_sec > 1e8
    metrics = trainer.callback_metrics
    assert 0 < metrics["perf/samples_per_sec"] <= batch_size / (batch_size * delay) * 1.05
    assert metrics["perf/data_wait_fraction"] > 0.5  # loading a batch takes 40 ms, the step well under 1 ms
    assert 0 < metrics["perf/mfu"] < 0.1


def test_features_are_never_served_to_another_model_with_the_same_id(make_shards, tmp_path: Path) -> None:
    """The pass cache is keyed by id(method); an id outlives its object (a new model may get a dead one's id), so an
    entry of another object is recomputed, and `new_evaluation_pass` forgets everything (a bench's before/after)."""
    from vlp_lightning.callbacks import features as features_module

    shards = make_shards(tmp_path / "val", n=8, per_shard=8, split="val")
    callback = Retrieval(shards.pattern, batch_size=8)
    first, second = ColourMethod(), ColourMethod()
    callback.features(first, shards.pattern, representation="joint")
    calls = first.image_calls
    callback.features(first, shards.pattern, representation="joint")
    assert first.image_calls == calls  # served from the pass
    stale = {key: value for key, value in features_module._PASS.features.items()}
    features_module._PASS.features.clear()
    for (_, *rest), value in stale.items():  # pretend `second` got the id `first` had
        features_module._PASS.features[(id(second), *rest)] = value
    callback.features(second, shards.pattern, representation="joint")
    assert second.image_calls > 0  # recomputed for its real owner
    features_module.new_evaluation_pass()
    callback.features(first, shards.pattern, representation="joint")
    assert first.image_calls > calls
