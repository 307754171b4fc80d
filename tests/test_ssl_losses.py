"""The self-supervised losses against their references (lightly 1.6.0 where it has the loss, else the paper's
official formulation), in one process and on 2 gloo processes (global-batch relations, the DINO centre, the
memory bank), and each falls when its inputs are optimised.

torch alone is imported at module level: the spawned gloo workers re-import this module.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vlp_lightning.losses.instance_contrastive import moco_queue_loss, moco_v3_contrastive_loss, nt_xent_loss
from vlp_lightning.losses.redundancy_reduction import barlow_twins_loss, vicreg_loss
from vlp_lightning.losses.self_distillation import byol_regression_loss, dino_centre, dino_distillation_loss
from vlp_lightning.modules.memory_bank import MemoryBank

WORLD, LOCAL_BATCH, DIM = 2, 4, 8


def features(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def official_moco_v3(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """`MoCo.contrastive_loss` of facebookresearch/moco-v3 in one process."""
    q, k = F.normalize(queries, dim=1), F.normalize(keys, dim=1)
    logits = torch.einsum("nc,mc->nm", q, k) / temperature
    return F.cross_entropy(logits, torch.arange(len(q))) * (2 * temperature)


def official_moco_queue(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's Algorithm 1 (He et al. 2020): l_pos = bmm(q, k), l_neg = mm(q, queue), labels zero."""
    positives = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    negatives = torch.einsum("nc,kc->nk", q, queue)
    logits = torch.cat([positives, negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))


# ---------------------------------------------------------------------------------------------- references
def test_nt_xent_equals_lightly():
    lightly_loss = pytest.importorskip("lightly.loss")
    a, b = features(6, DIM), features(6, DIM, seed=1)
    for temperature in (0.1, 0.5):
        reference = lightly_loss.NTXentLoss(temperature=temperature)(a, b)
        torch.testing.assert_close(nt_xent_loss(a, b, temperature), reference)


def test_moco_queue_loss_equals_the_official_formulation():
    q, k = F.normalize(features(5, DIM), dim=1), F.normalize(features(5, DIM, seed=1), dim=1)
    queue = F.normalize(features(12, DIM, seed=2), dim=1)
    torch.testing.assert_close(moco_queue_loss(q, k, queue, 0.2), official_moco_queue(q, k, queue, 0.2))


def test_moco_v3_loss_equals_the_official_formulation_with_its_two_tau_scale():
    q, k = features(6, DIM), features(6, DIM, seed=1)
    torch.testing.assert_close(moco_v3_contrastive_loss(q, k, 0.2), official_moco_v3(q, k, 0.2))
    # the 2τ factor: the same logits at τ = 1 give half the τ = 0.5 cross-entropy's scale
    unscaled = F.cross_entropy(F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.5, torch.arange(6))
    torch.testing.assert_close(moco_v3_contrastive_loss(q, k, 0.5), unscaled)


def test_byol_loss_equals_two_plus_two_lightly_negative_cosine():
    lightly_loss = pytest.importorskip("lightly.loss")
    p, z = features(6, DIM), features(6, DIM, seed=1)
    torch.testing.assert_close(byol_regression_loss(p, z), 2 + 2 * lightly_loss.NegativeCosineSimilarity()(p, z))
    squared_distance = F.mse_loss(F.normalize(p), F.normalize(z), reduction="none").sum(1)
    torch.testing.assert_close(byol_regression_loss(p, z), squared_distance.mean())


def test_dino_loss_and_centre_equal_lightly():
    lightly_loss = pytest.importorskip("lightly.loss")
    teacher = [features(5, 16, seed=s) for s in range(2)]
    student = [features(5, 16, seed=10 + s) for s in range(4)]
    centre = features(16, seed=20) * 0.1
    reference = lightly_loss.DINOLoss(output_dim=16, teacher_temp=0.05, student_temp=0.1, center_momentum=0.9)
    reference.center.copy_(centre.view(1, 1, 16))
    expected = reference(teacher, student, teacher_temp=0.05)  # lightly moves its centre inside forward
    torch.testing.assert_close(dino_distillation_loss(teacher, student, centre, 0.05, 0.1), expected)
    torch.testing.assert_close(dino_centre(centre, teacher, 0.9), reference.center.view(16))


def test_barlow_twins_loss_equals_lightly():
    lightly_loss = pytest.importorskip("lightly.loss")
    a, b = features(10, DIM), features(10, DIM, seed=1)
    reference = lightly_loss.BarlowTwinsLoss(lambda_param=5e-3)(a, b)
    torch.testing.assert_close(barlow_twins_loss(a, b, 5e-3), reference)


def test_vicreg_loss_equals_lightly():
    lightly_loss = pytest.importorskip("lightly.loss")
    a, b = features(10, DIM), features(10, DIM, seed=1)
    torch.testing.assert_close(vicreg_loss(a, b), lightly_loss.VICRegLoss()(a, b))


@pytest.mark.parametrize("name", ["nt_xent", "moco_v3", "byol", "dino", "barlow_twins", "vicreg"])
def test_each_loss_falls_when_its_inputs_are_optimised(name):
    a, b = features(16, DIM).requires_grad_(), features(16, DIM, seed=1).requires_grad_()
    losses_of = {
        "nt_xent": lambda: nt_xent_loss(a, b),
        "moco_v3": lambda: moco_v3_contrastive_loss(a, b.detach() + a.detach()),
        "byol": lambda: byol_regression_loss(a, b.detach()),
        "dino": lambda: dino_distillation_loss([b.detach()], [a, b], torch.zeros(DIM)),
        "barlow_twins": lambda: barlow_twins_loss(a, b),
        "vicreg": lambda: vicreg_loss(a, b),
    }
    optimizer = torch.optim.Adam([a, b], lr=0.05)
    losses = []
    for _ in range(20):
        loss = losses_of[name]()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_memory_bank_is_a_fifo_with_a_pointer_and_refuses_an_indivisible_batch():
    bank = MemoryBank(6, 3)
    first, second = torch.ones(3, 3), torch.full((3, 3), 2.0)
    bank.enqueue(first)
    assert int(bank.pointer) == 3 and torch.equal(bank.bank[:3], first)
    bank.enqueue(second)
    assert int(bank.pointer) == 0 and torch.equal(bank.bank[3:], second)
    assert set(bank.state_dict()) == {"bank", "pointer"}  # persistent: resumed with the checkpoint
    with pytest.raises(ValueError, match=r"MemoryBank size 6 is not divisible by the global batch 4"):
        bank.enqueue(torch.ones(4, 3))


# ---------------------------------------------------------------------------------------------- 2 processes
def global_views() -> tuple[torch.Tensor, torch.Tensor]:
    return features(WORLD * LOCAL_BATCH, DIM), features(WORLD * LOCAL_BATCH, DIM, seed=1)


def loss_and_grads(name: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss = {
        "nt_xent": lambda: nt_xent_loss(a, b, 0.5),
        "moco_v3": lambda: moco_v3_contrastive_loss(a, b, 0.2),
        "barlow_twins": lambda: barlow_twins_loss(a, b),
        "vicreg": lambda: vicreg_loss(a, b),
    }[name]()
    loss.backward()
    return loss.detach(), a.grad, (b.grad if b.grad is not None else torch.zeros_like(b))


DISTRIBUTED_LOSSES = ("nt_xent", "moco_v3", "barlow_twins", "vicreg")


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        a, b = global_views()
        local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        results = {name: loss_and_grads(name, a[local], b[local]) for name in DISTRIBUTED_LOSSES}
        results["centre"] = dino_centre(torch.zeros(DIM), [a[local], b[local]], 0.9)
        bank = MemoryBank(16, DIM)
        bank.enqueue(a[local])
        results["bank"], results["pointer"] = bank.bank.clone(), bank.pointer.clone()
        try:
            MemoryBank(12, DIM).enqueue(torch.zeros(LOCAL_BATCH, DIM))
        except ValueError as error:
            results["error"] = str(error)
        results["shuffle_bn"] = shuffle_batchnorm_keys(local)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def shuffle_batchnorm_keys(local: slice) -> dict[str, torch.Tensor]:
    """MoCoV2's keys of this rank's images with ShuffleBN, and without it (the same weights on every rank): for its
    per-sample key encoder (LayerNorm ViT, no-norm head) and for one whose batch statistics mix samples."""
    from torch import nn

    from vlp_lightning.methods import MoCoV2

    torch.manual_seed(0)
    method = MoCoV2(queue_length=16).train()
    images = torch.randn(WORLD * LOCAL_BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))[local]
    keys = {"per_sample": method.encode_keys(images)}
    keys["per_sample_unshuffled"] = F.normalize(method.key_encoder(images), dim=1)
    method.key_encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, DIM), nn.BatchNorm1d(DIM)).train()
    keys["batchnorm"] = method.encode_keys(images)
    keys["batchnorm_unshuffled"] = F.normalize(method.key_encoder(images), dim=1)
    return {name: value.detach() for name, value in keys.items()}


def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    a, b = global_views()
    for name in DISTRIBUTED_LOSSES:
        loss, grad_a, grad_b = loss_and_grads(name, a, b)
        # the mean of the ranks' losses is the global batch's loss (MoCo v3: only with labels offset by rank x N)
        torch.testing.assert_close(sum(r[name][0] for r in ranks) / WORLD, loss, msg=name)
        # gathered features carry gradient: each rank's gradient is world x the global loss's, which DDP averages
        torch.testing.assert_close(torch.cat([r[name][1] for r in ranks]), WORLD * grad_a, msg=name)
        torch.testing.assert_close(torch.cat([r[name][2] for r in ranks]), WORLD * grad_b, msg=name)
    # DINO's centre is the global batch's mean, the same on both ranks (sum / (B x world))
    expected_centre = dino_centre(torch.zeros(DIM), [a, b], 0.9)
    for r in ranks:
        torch.testing.assert_close(r["centre"], expected_centre)
    # the queue holds the keys of both ranks, in rank order, identical on every rank
    single = MemoryBank(16, DIM)
    single.enqueue(a)
    for r in ranks:
        assert torch.equal(r["bank"], single.bank) and int(r["pointer"]) == WORLD * LOCAL_BATCH
        assert "MemoryBank size 12 is not divisible by the global batch 8" in r["error"]
    # ShuffleBN (MoCo sec. 3.3): each rank gets back the keys of its own images, in their order (a per-sample key
    # encoder gives exactly the unshuffled keys), while batch statistics now come from a mix of both ranks' images
    for r in ranks:
        keys = r["shuffle_bn"]
        torch.testing.assert_close(keys["per_sample"], keys["per_sample_unshuffled"])
        assert keys["batchnorm"].shape == (LOCAL_BATCH, DIM)
        assert not torch.allclose(keys["batchnorm"], keys["batchnorm_unshuffled"], atol=1e-3)
