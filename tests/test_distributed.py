"""Distributed helpers and the distributed contrastive losses, in one process and on 2 gloo processes.

The 2-process test checks the exact relations stated in `vlp_lightning.losses.contrastive` against one process
on the concatenated batch (loss L, gradient dL/dx): naive mode returns L on each rank, local loss returns values
whose mean is L; with gather_with_grad each rank's gradient is world * dL/dx (DDP's averaging then gives the
single-process model gradient), without it the naive gradient is exactly dL/dx.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vlp_lightning import distributed
from vlp_lightning.losses.contrastive import (
    clip_contrastive_loss,
    convirt_contrastive_loss,
    weighted_two_way_infonce,
)
from vlp_lightning.losses.subcaption import multi_positive_contrastive_loss

WORLD = 2
LOCAL_BATCH = 4
DIM = 8
LOGIT_SCALE = 10.0
LOSS_MODES: dict[str, dict[str, bool]] = {
    "naive_with_grad": {"local_loss": False, "gather_with_grad": True},
    "local_with_grad": {"local_loss": True, "gather_with_grad": True},
    "naive_no_grad": {"local_loss": False, "gather_with_grad": False},
    "local_no_grad": {"local_loss": True, "gather_with_grad": False},
    "not_gathered": {"gather": False},
}


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The same [WORLD * LOCAL_BATCH, DIM] raw image / text features on every process."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(WORLD * LOCAL_BATCH, DIM, generator=generator)
    return images, images + torch.randn(WORLD * LOCAL_BATCH, DIM, generator=generator)


def clip_loss_and_grads(images: torch.Tensor, texts: torch.Tensor, **options: bool) -> dict[str, torch.Tensor]:
    """CLIP loss of raw features (normalised inside the graph) and its gradients w.r.t. the raw features."""
    images, texts = images.clone().requires_grad_(), texts.clone().requires_grad_()
    loss = clip_contrastive_loss(F.normalize(images, dim=-1), F.normalize(texts, dim=-1), LOGIT_SCALE, **options)
    loss.backward()
    return {"loss": loss.detach(), "image_grad": images.grad, "text_grad": texts.grad}


def multi_positive_loss_and_grads(images: torch.Tensor, texts: torch.Tensor, local_loss: bool
                                  ) -> dict[str, torch.Tensor]:
    """DreamLIP's multi-positive loss with K = 2 texts per image (the text and its negation) and its gradients."""
    images, texts = images.clone().requires_grad_(), texts.clone().requires_grad_()
    positives = F.normalize(torch.stack([texts, -texts + images], dim=1), dim=-1)  # [N, 2, D]
    loss = multi_positive_contrastive_loss(F.normalize(images, dim=-1), positives, LOGIT_SCALE, local_loss=local_loss)
    loss.backward()
    return {"loss": loss.detach(), "image_grad": images.grad, "text_grad": texts.grad}


def convirt_loss_and_grads(images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
    images, texts = images.clone().requires_grad_(), texts.clone().requires_grad_()
    loss = convirt_contrastive_loss(images, texts)
    loss.backward()
    return {"loss": loss.detach(), "image_grad": images.grad, "text_grad": texts.grad}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        images, texts = global_batch()
        results: dict[str, object] = {"rank": distributed.rank(), "world_size": distributed.world_size()}

        x = torch.full((LOCAL_BATCH, DIM), float(rank + 1), requires_grad=True)
        weights = torch.arange(WORLD * LOCAL_BATCH * DIM, dtype=torch.float32).reshape(WORLD * LOCAL_BATCH, DIM)
        gathered = distributed.all_gather_with_grad(x)
        (gathered * weights).sum().backward()
        results["gathered_with_grad"] = gathered.detach()
        results["gather_grad"] = x.grad
        gathered_no_grad = distributed.all_gather_no_grad(x)
        results["gathered_no_grad"] = gathered_no_grad
        results["gathered_no_grad_requires_grad"] = gathered_no_grad.requires_grad
        summand = torch.tensor([rank + 1.0, 10.0 * (rank + 1)])
        results["reduced"] = distributed.all_reduce_sum(summand)
        results["summand_after"] = summand

        for name, options in LOSS_MODES.items():
            results[name] = clip_loss_and_grads(images[local], texts[local], **options)
        results["convirt"] = convirt_loss_and_grads(images[local], texts[local])
        for mode in (False, True):
            results[f"multi_positive_local_{mode}"] = multi_positive_loss_and_grads(images[local], texts[local], mode)
        results["hard_negatives"] = hard_negative_draws(rank)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_helpers_are_identities_in_one_process() -> None:
    assert not dist.is_initialized()
    assert (distributed.world_size(), distributed.rank()) == (1, 0)
    x = torch.randn(3, 2, requires_grad=True)
    gathered = distributed.all_gather_with_grad(x)
    gathered.sum().backward()
    torch.testing.assert_close(gathered, x)
    torch.testing.assert_close(x.grad, torch.ones_like(x))
    no_grad = distributed.all_gather_no_grad(x)
    assert not no_grad.requires_grad
    torch.testing.assert_close(no_grad, x.detach())
    torch.testing.assert_close(distributed.all_reduce_sum(x), x.detach())


@pytest.fixture(scope="module")
def gloo_ranks(tmp_path_factory) -> list[dict]:
    """What `_worker` computed on each of 2 gloo processes (one spawn for every test of this module)."""
    folder = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(free_port(), str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def hard_negative_draws(rank: int) -> dict[str, torch.Tensor]:
    """ITM hard negatives on 2 ranks (`hard_negative_batch`, ALBEF / FIBER): 4 samples a rank, each sample's
    feature its global column index (so a drawn negative shows where it came from); rank 1's first sample is the
    same image as rank 0's first (id 0 on both); columns 0 and 4 (those two) are the most similar to every row."""
    from vlp_lightning.methods.fusion.common import hard_negative_batch

    ids = torch.arange(LOCAL_BATCH) + rank * LOCAL_BATCH
    if rank == 1:
        ids[0] = 0
    features = (torch.arange(LOCAL_BATCH) + rank * LOCAL_BATCH).float()[:, None].repeat(1, 3).requires_grad_(True)
    similarity = torch.zeros(LOCAL_BATCH, WORLD * LOCAL_BATCH)
    similarity[:, [0, LOCAL_BATCH]] = 50.0
    torch.manual_seed(rank)
    draws, drawn = [], []
    for _ in range(50):
        (images,), _, _ = hard_negative_batch([features], [features], similarity, similarity, ids)
        draws.append(images[LOCAL_BATCH : 2 * LOCAL_BATCH, 0].detach())
        drawn.append(images[LOCAL_BATCH : 2 * LOCAL_BATCH].sum())
    torch.stack(drawn).sum().backward()  # negatives drawn from the other rank send gradient back to their owner
    return {"draws": torch.stack(draws), "grad": features.grad}


def test_hard_negatives_come_from_the_whole_gathered_batch_never_a_duplicate_across_ranks(gloo_ranks) -> None:
    """Row 0 of each rank (image 0) never draws column 0 or 4 (itself and its twin on the other rank), though they
    are the most similar; the other rows draw both (one of them is the other rank's); gathered negatives carry
    gradient back to the rank that owns them."""
    for result in gloo_ranks:
        draws = result["hard_negatives"]["draws"]  # [50 draws, 4 rows]: the global column of each row's negative
        assert not bool(((draws[:, 0] == 0) | (draws[:, 0] == LOCAL_BATCH)).any())
        assert bool(((draws[:, 1:] == 0) | (draws[:, 1:] == LOCAL_BATCH)).float().mean() > 0.9)
        assert bool((draws[:, 1:] == LOCAL_BATCH).any()) and bool((draws[:, 1:] == 0).any())
    assert all(bool((result["hard_negatives"]["grad"] != 0).any()) for result in gloo_ranks)


def test_two_gloo_processes_match_one_process_on_the_concatenated_batch(gloo_ranks) -> None:
    ranks = gloo_ranks
    images, texts = global_batch()
    single = clip_loss_and_grads(images, texts)
    weights = torch.arange(WORLD * LOCAL_BATCH * DIM, dtype=torch.float32).reshape(WORLD * LOCAL_BATCH, DIM)
    expected_gathered = torch.cat([torch.full((LOCAL_BATCH, DIM), r + 1.0) for r in range(WORLD)])

    for r, result in enumerate(ranks):
        local = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
        assert (result["rank"], result["world_size"]) == (r, WORLD)
        # helpers: rank order, gradient routed back summed over the ranks, no graph, sum without mutation
        torch.testing.assert_close(result["gathered_with_grad"], expected_gathered)
        torch.testing.assert_close(result["gather_grad"], WORLD * weights[local])
        torch.testing.assert_close(result["gathered_no_grad"], expected_gathered)
        assert result["gathered_no_grad_requires_grad"] is False
        torch.testing.assert_close(result["reduced"], torch.tensor([3.0, 30.0]))
        torch.testing.assert_close(result["summand_after"], torch.tensor([r + 1.0, 10.0 * (r + 1)]))

        # naive: every rank computes L; with grad its gradient is WORLD * dL/dx, without it exactly dL/dx
        torch.testing.assert_close(result["naive_with_grad"]["loss"], single["loss"])
        torch.testing.assert_close(result["naive_no_grad"]["loss"], single["loss"])
        for key in ("image_grad", "text_grad"):
            torch.testing.assert_close(result["naive_with_grad"][key], WORLD * single[key][local])
            torch.testing.assert_close(result["local_with_grad"][key], WORLD * single[key][local])
            torch.testing.assert_close(result["naive_no_grad"][key], single[key][local])

        # local loss without gathered gradient: the gradient of this rank's own loss, other ranks' features fixed
        own = rank_loss_with_others_fixed(images, texts, r)
        torch.testing.assert_close(result["local_no_grad"]["loss"], own["loss"])
        torch.testing.assert_close(result["local_no_grad"]["image_grad"], own["image_grad"])
        torch.testing.assert_close(result["local_no_grad"]["text_grad"], own["text_grad"])

        # gather=False: the plain loss of the local batch
        torch.testing.assert_close(result["not_gathered"]["loss"],
                                   clip_loss_and_grads(images[local], texts[local])["loss"])

    # local loss: per-rank values differ, their mean is L
    local_losses = torch.stack([result["local_with_grad"]["loss"] for result in ranks])
    assert not torch.allclose(local_losses[0], local_losses[1])
    torch.testing.assert_close(local_losses.mean(), single["loss"])
    local_losses = torch.stack([result["local_no_grad"]["loss"] for result in ranks])
    torch.testing.assert_close(local_losses.mean(), single["loss"])

    single_multi_positive = multi_positive_loss_and_grads(images, texts, local_loss=False)
    local_multi_positive = torch.stack([result["multi_positive_local_True"]["loss"] for result in ranks])
    torch.testing.assert_close(local_multi_positive.mean(), single_multi_positive["loss"])
    for r, result in enumerate(ranks):
        local = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
        torch.testing.assert_close(result["multi_positive_local_False"]["loss"], single_multi_positive["loss"])
        for mode in (False, True):
            for key in ("image_grad", "text_grad"):
                torch.testing.assert_close(result[f"multi_positive_local_{mode}"][key],
                                           WORLD * single_multi_positive[key][local])

    single_convirt = convirt_loss_and_grads(images, texts)
    for r, result in enumerate(ranks):
        local = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
        torch.testing.assert_close(result["convirt"]["loss"], single_convirt["loss"])
        torch.testing.assert_close(result["convirt"]["image_grad"], WORLD * single_convirt["image_grad"][local])


def rank_loss_with_others_fixed(images: torch.Tensor, texts: torch.Tensor, rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s local-loss value and its gradient when only its own features carry a gradient."""
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    local_images, local_texts = images[local].clone().requires_grad_(), texts[local].clone().requires_grad_()
    all_images, all_texts = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)
    normalised_images, normalised_texts = F.normalize(local_images, dim=-1), F.normalize(local_texts, dim=-1)
    all_images = torch.cat([all_images[: local.start], normalised_images, all_images[local.stop :]])
    all_texts = torch.cat([all_texts[: local.start], normalised_texts, all_texts[local.stop :]])
    loss = weighted_two_way_infonce(
        normalised_images,
        normalised_texts,
        all_images,
        all_texts,
        LOGIT_SCALE,
        first_label=local.start,
        local_loss=True,
        image_to_text_weight=0.5,
    )
    loss.backward()
    return {"loss": loss.detach(), "image_grad": local_images.grad, "text_grad": local_texts.grad}
