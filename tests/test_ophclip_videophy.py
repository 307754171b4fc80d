"""OphCLIP's retrieval of narrations for silent clips and the VideoPhy twins callback (tiny towers: 2-block ViT at
32 px, 4 frames)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader

from tests.test_methods import make_video_batch
from vlp_lightning import catalog
from vlp_lightning.callbacks import VideoPhy, videophy_pair_accuracy
from vlp_lightning.callbacks.videophy import make_twin, teleport_order
from vlp_lightning.methods import OphCLIP
from vlp_lightning.methods.video.base import VideoTextMethod
from vlp_lightning.methods.video.ophclip import RetrievalMemory, retrieve_nearest, text_ids


def test_the_index_and_catalogue_name_ophclip():
    entry = catalog.find("OphCLIP")
    assert entry.family == "video-language" and entry.view_kind == "clip" and entry.paper.year == 2025
    assert {"video", "text", "segments"} <= set(entry.required_keys)


# ---------------------------------------------------------------------- retrieval
def test_retrieval_gives_each_silent_clip_its_nearest_distinct_narrations():
    keys = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0],
                                     [0.95, 0.0, 0.05]]), dim=1)
    ids = torch.tensor([7, 8, 9, 10, 7])  # keys 0 and 4 are two copies of narration 7
    queries = F.normalize(torch.tensor([[1.0, 0.05, 0.0], [0.0, 0.2, 1.0]]), dim=1)
    retrieved, targets = retrieve_nearest(queries, keys, ids, k=2)
    assert retrieved.tolist() == [[7, 8], [10, 9]]  # distinct texts, nearest first: the copy of 7 is not a second hit
    assert torch.allclose(targets.sum(1), torch.ones(2))
    assert targets[0].tolist() == pytest.approx([0.25, 0.5, 0.0, 0.0, 0.25])  # 7's half split over its two copies
    assert targets[1].tolist() == pytest.approx([0.0, 0.0, 0.5, 0.5, 0.0])
    retrieved, targets = retrieve_nearest(queries, keys, ids, k=10)  # more than there are: every narration
    assert retrieved.shape == (2, 4) and torch.allclose(targets.sum(1), torch.ones(2))


def test_narration_memory_is_a_fifo_of_filled_slots():
    memory = RetrievalMemory(size=4, dim=2)
    assert memory.filled()[1].numel() == 0  # an empty slot is never retrieved
    memory.enqueue(torch.ones(3, 2), torch.tensor([1, 2, 3]))
    memory.enqueue(torch.full((2, 2), 2.0), torch.tensor([4, 5]))
    embeddings, ids = memory.filled()
    assert sorted(ids.tolist()) == [2, 3, 4, 5] and int(memory.pointer) == 1  # the oldest (1) overwritten
    assert embeddings[ids == 5].tolist() == [[2.0, 2.0]]


def _memory_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        memory = RetrievalMemory(size=8, dim=2)
        count = 3 if rank == 0 else 1  # ranks store different numbers of narrations
        memory.enqueue(torch.full((count, 2), float(rank)), torch.arange(count) + 10 * rank)
        torch.save({"embeddings": memory.embeddings, "ids": memory.ids, "pointer": memory.pointer},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_memory_is_the_same_on_two_gloo_ranks_storing_different_counts(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_memory_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name in ("embeddings", "ids", "pointer"):
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    assert ranks[0]["ids"][:4].tolist() == [0, 1, 2, 10] and int(ranks[0]["pointer"]) == 4  # rank order, no padding
    assert ranks[0]["embeddings"][:4, 0].tolist() == [0.0, 0.0, 0.0, 1.0]


def silent_batch(method: OphCLIP, silent_rows: tuple[int, ...] = (1, 4)) -> dict:
    batch = make_video_batch(method, batch_size=6)
    batch["caption"] = ["" if row in silent_rows else caption for row, caption in enumerate(batch["caption"])]
    return batch


def test_a_training_step_stores_the_distinct_narrations_of_the_narrated_clips():
    torch.manual_seed(0)
    method = OphCLIP()
    batch = silent_batch(method)
    method.forward_loss(batch)
    narrations = {text for row, spans in enumerate(batch["segments"]) if row not in (1, 4) for *_, text in spans}
    assert sorted(method.memory.filled()[1].tolist()) == sorted(text_ids(sorted(narrations)).tolist())
    method.eval()
    method.forward_loss(batch)  # validation reads the memory, never writes it
    assert method.memory.filled()[1].numel() == len(narrations)


def test_silent_clips_change_the_loss_only_through_their_retrieved_positives():
    torch.manual_seed(0)
    method = OphCLIP().eval()
    batch = silent_batch(method)
    narrated = method.narrated_batch(batch, torch.tensor([row not in (1, 4) for row in range(6)]))
    batch["video"].requires_grad_(True)
    outputs = method.forward_loss(batch)
    alone = method.forward_loss(narrated)  # the narrated clips without the silent ones
    assert "retrieval_loss" in outputs and "retrieval_loss" not in alone
    assert torch.allclose(outputs["loss"], alone["loss"] + 0.25 * outputs["retrieval_loss"], atol=1e-5)  # w_r 0.25
    assert torch.allclose(outputs["narration_loss"], alone["narration_loss"], atol=1e-6)
    assert torch.allclose(outputs["title_loss"], alone["title_loss"], atol=1e-6)
    (gradient,) = torch.autograd.grad(outputs["loss"], batch["video"])
    assert gradient[[1, 4]].abs().sum() > 0  # the silent clips learn, through retrieval

    method.retrieval_weight = 0.0  # without the retrieved positives, silent clips are not in the loss at all
    outputs = method.forward_loss(batch)
    assert torch.allclose(outputs["loss"], alone["loss"], atol=1e-6)
    (gradient,) = torch.autograd.grad(outputs["loss"], batch["video"])
    assert gradient[[1, 4]].abs().sum() == 0 and gradient[[0, 2, 3, 5]].abs().sum() > 0


def test_the_silent_flag_marks_silent_clips_like_an_empty_caption():
    torch.manual_seed(0)
    method = OphCLIP().eval()
    flagged = make_video_batch(method, batch_size=6)
    flagged["silent"] = [row in (1, 4) for row in range(6)]
    with torch.no_grad():
        assert torch.allclose(method.forward_loss(flagged)["loss"], method.forward_loss(silent_batch(method))["loss"])


def test_silent_fraction_silences_a_share_of_training_batches_only():
    torch.manual_seed(0)
    method = OphCLIP(silent_fraction=0.25)
    batch = make_video_batch(method, batch_size=8)
    assert int(method.silent_mask(batch).sum()) == 2  # round(0.25 * 8)
    assert method.forward_loss(batch)["silent_clips"] == 2
    method.eval()
    assert int(method.silent_mask(batch).sum()) == 0


def test_the_papers_direction_titles_retrieve_silent_videos_which_learn_through_them():
    torch.manual_seed(0)
    method = OphCLIP(retrieval="silent_videos").eval()
    batch = silent_batch(method)
    narrated = method.narrated_batch(batch, torch.tensor([row not in (1, 4) for row in range(6)]))
    batch["video"].requires_grad_(True)
    outputs = method.forward_loss(batch)
    alone = method.forward_loss(narrated)
    assert torch.allclose(outputs["loss"], alone["loss"] + 0.25 * outputs["retrieval_loss"], atol=1e-5)
    assert torch.allclose(outputs["title_loss"], alone["title_loss"], atol=1e-6)
    (gradient,) = torch.autograd.grad(outputs["loss"], batch["video"])
    assert gradient[[1, 4]].abs().sum() > 0  # the silent videos learn, as the titles' retrieved positives
    # the retrieval term by hand: each narrated title's soft CE over the two silent videos, both retrieved (k = 4)
    with torch.no_grad():
        titles = F.normalize(method.text_projection(method.text(narrated["text"])), dim=-1)  # [4, D]
        silent = F.normalize(method.image_projection(method.frame_features(batch["video"][[1, 4]]).mean(dim=1)),
                             dim=-1)
        expected = -(method.logit_scale.exp() * titles @ silent.T).log_softmax(dim=1).mean(dim=1).mean()
    assert torch.allclose(outputs["retrieval_loss"], expected, atol=1e-5)
    method.train()
    method.forward_loss(batch)  # training stores the silent videos, by their shard keys
    assert sorted(method.memory.filled()[1].tolist()) == sorted(text_ids([batch["__key__"][1],
                                                                          batch["__key__"][4]]).tolist())


@pytest.mark.parametrize("arguments, message", [
    ({"silent_fraction": 1.0}, "silent_fraction=1.0 must lie in"),
    ({"narration_weight": 0.0, "zero_shot_level": "abstract"}, "retrieval_weight=0.25.* needs narration_weight"),
    ({"retrieval": "silent_videos", "title_weight": 0.0}, "retrieval_weight=0.25.* needs title_weight"),
    ({"retrieval": "titles"}, "retrieval='titles' is not one of"),
    ({"retrieval_k": 0}, "retrieval_k=0"),
])
def test_bad_configurations_name_the_value_and_the_fix(arguments, message):
    with pytest.raises(ValueError, match=message):
        OphCLIP(**arguments)


# ---------------------------------------------------------------------- VideoPhy
def test_the_twins_are_exactly_reversed_and_teleported():
    video = torch.arange(2 * 8).float().view(2, 8, 1, 1, 1).expand(2, 8, 3, 2, 2)
    assert torch.equal(make_twin(video, "reversed"), video[:, [7, 6, 5, 4, 3, 2, 1, 0]])
    assert teleport_order(8) == [0, 1, 6, 7, 2, 3, 4, 5] and teleport_order(4) == [0, 3, 1, 2]
    assert torch.equal(make_twin(video, "teleport"), video[:, [0, 1, 6, 7, 2, 3, 4, 5]])
    for frames in range(1, 12):
        assert sorted(teleport_order(frames)) == list(range(frames))
    with pytest.raises(ValueError, match="unknown twin kind 'mirror'"):
        make_twin(video, "mirror")


class BrighteningScore(LightningModule):
    """Order-sensitive by construction: a clip's score with any caption is Σ_t (t - mean t) · brightness_t, largest
    for the clips' own frame order (brightness rising) among all orders of their frames."""

    def video_text_logits(self, video: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        brightness = video.mean(dim=(2, 3, 4))  # [B, T]
        times = torch.arange(video.shape[1], dtype=video.dtype)
        score = (brightness * (times - times.mean())).sum(dim=1)  # [B]
        return score[:, None].expand(-1, text["input_ids"].shape[0])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        return None


def brightening_batch(batch_size: int = 6, frames: int = 8) -> dict:
    generator = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-1, 1, frames).view(1, frames, 1, 1, 1)
    video = ramp + 0.01 * torch.randn(batch_size, frames, 3, 8, 8, generator=generator)
    captions = [f"it gets brighter {index}" for index in range(batch_size)]
    tokens = torch.arange(batch_size)[:, None].expand(-1, 4)
    text = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
    return {"video": video, "caption": captions, "text": text}


def test_an_order_sensitive_model_wins_every_pair_and_a_frame_averaged_one_ties():
    batch = brightening_batch()
    accuracy = videophy_pair_accuracy(BrighteningScore(), batch["video"], batch["text"])
    assert accuracy == {"reversed": 1.0, "teleport": 1.0, "chance": 0.5}

    torch.manual_seed(0)
    method = VideoTextMethod().eval()  # mean over frames: blind to their order, every pair a tie
    clips = make_video_batch(method, batch_size=4)
    accuracy = videophy_pair_accuracy(method, clips["video"], clips["text"])
    assert accuracy["reversed"] == 0.5 and accuracy["teleport"] == 0.5


def test_the_callback_logs_pair_accuracy_in_a_validate_loop_on_clip_batches():
    batches = [brightening_batch(), brightening_batch(batch_size=3)]
    batches[1]["caption"][0] = ""  # a silent clip: no caption to judge it against, skipped
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[VideoPhy()])
    trainer.validate(BrighteningScore(), dataloaders=DataLoader(batches, batch_size=None), verbose=False)
    assert trainer.callback_metrics["val/videophy_reversed_pair_accuracy"] == 1.0
    assert trainer.callback_metrics["val/videophy_teleport_pair_accuracy"] == 1.0
    assert trainer.callback_metrics["val/videophy_chance"] == 0.5

    torch.manual_seed(0)
    method = OphCLIP()
    clips = [make_video_batch(method, batch_size=4, seed=seed) for seed in (0, 1)]
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[VideoPhy(kinds=["reversed"])])
    trainer.validate(method, dataloaders=DataLoader(clips, batch_size=None), verbose=False)
    assert trainer.callback_metrics["val/videophy_reversed_pair_accuracy"] == 0.5  # frame-averaged: all ties
    assert "val/videophy_teleport_pair_accuracy" not in trainer.callback_metrics
