"""SwAV: Sinkhorn-Knopp codes (alone, against the official formulation, and on 2 gloo processes), the swapped
prediction loss, and the method's training rules (prototype normalisation and freezing, the queue).

Lightning, timm and the method are imported inside the helpers that need them: the spawned gloo workers re-import
this module, and with torch alone they start in seconds instead of tens of seconds on a busy 2-core machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import DataLoader

from vlp_lightning.losses.swav import sinkhorn_knopp, swav_loss

IMAGE_SIZE = 32
LOCAL_SIZE = 16
NUM_LOCAL_CROPS = 2
DISTRIBUTED_ROWS = (5, 7)  # rows per rank: unequal on purpose (a queue or a last batch can make them so)


def cosine_scores(rows: int, prototypes: int, seed: int = 0) -> torch.Tensor:
    """z^T C for L2-normalised random z and C, the scores SwAV feeds to Sinkhorn-Knopp."""
    generator = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(rows, 16, generator=generator), dim=1)
    c = F.normalize(torch.randn(prototypes, 16, generator=generator), dim=1)
    return z @ c.T


def official_sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """`distributed_sinkhorn` of facebookresearch/swav (one process), in float64, as the reference."""
    q = torch.exp(scores.double() / epsilon).T  # [K, B]
    num_prototypes, num_samples = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= num_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= num_samples
    return (q * num_samples).T


def test_sinkhorn_matches_official_formulation_and_its_marginals():
    scores = cosine_scores(24, 6)
    codes = sinkhorn_knopp(scores, epsilon=0.05, iterations=3)
    torch.testing.assert_close(codes.double(), official_sinkhorn(scores, 0.05, 3), rtol=1e-4, atol=1e-6)
    # each sample's codes are a distribution over prototypes, exactly after any number of iterations
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(24))
    # equal partition: every prototype receives B/K samples, reached as the iterations converge
    converged = sinkhorn_knopp(scores, epsilon=0.05, iterations=300)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((6,), 24 / 6), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(converged.sum(dim=1), torch.ones(24))
    # three iterations already balance the prototypes better than the plain softmax assignment does
    imbalance = (codes.sum(dim=0) - 4).abs().max()
    assert imbalance < (torch.softmax(scores / 0.05, dim=1).sum(dim=0) - 4).abs().max()


def test_sinkhorn_stays_finite_where_a_plain_exponential_overflows():
    scores = cosine_scores(16, 4)
    assert not torch.isfinite(torch.exp(scores / 0.005)).all()
    codes = sinkhorn_knopp(scores, epsilon=0.005, iterations=3)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(16))


def _distributed_sinkhorn_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(DISTRIBUTED_ROWS))
    try:
        scores = cosine_scores(sum(DISTRIBUTED_ROWS), 5)
        start = sum(DISTRIBUTED_ROWS[:rank])
        local_codes = sinkhorn_knopp(scores[start : start + DISTRIBUTED_ROWS[rank]], epsilon=0.05, iterations=3)
        torch.save(local_codes, Path(out_dir) / f"codes_{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_sinkhorn_equals_one_process_on_the_concatenated_batch(tmp_path):
    mp.spawn(
        _distributed_sinkhorn_worker,
        args=(str(tmp_path / "rendezvous"), str(tmp_path)),
        nprocs=len(DISTRIBUTED_ROWS),
        join=True,
    )
    gathered = torch.cat([torch.load(tmp_path / f"codes_{rank}.pt") for rank in range(len(DISTRIBUTED_ROWS))])
    single = sinkhorn_knopp(cosine_scores(sum(DISTRIBUTED_ROWS), 5), epsilon=0.05, iterations=3)
    torch.testing.assert_close(gathered, single)
    # the local half alone would give other codes: the statistics really were summed over ranks
    alone = sinkhorn_knopp(cosine_scores(sum(DISTRIBUTED_ROWS), 5)[: DISTRIBUTED_ROWS[0]], epsilon=0.05, iterations=3)
    assert not torch.allclose(alone, single[: DISTRIBUTED_ROWS[0]], atol=1e-3)


def test_swav_loss_is_the_mean_swapped_cross_entropy():
    scores = [cosine_scores(8, 5, seed) for seed in range(3)]
    codes = [sinkhorn_knopp(s) for s in scores[:2]]
    expected = []
    for coded_view, code in enumerate(codes):
        for view, s in enumerate(scores):
            if view != coded_view:
                expected.append(-(code * torch.log(torch.softmax(s / 0.1, dim=1))).sum(dim=1).mean())
    torch.testing.assert_close(swav_loss(scores, codes, temperature=0.1), torch.stack(expected).mean())
    with pytest.raises(ValueError, match="at least 2 views"):
        swav_loss(scores[:1], codes[:1])


def test_swav_loss_falls_when_optimising_the_features():
    """Features of 3 views of 16 images learn to agree on balanced cluster assignments (codes recomputed per step)."""
    torch.manual_seed(0)
    features = torch.randn(3, 16, 8, requires_grad=True)
    prototypes = F.normalize(torch.randn(6, 8), dim=1)
    optimizer = torch.optim.SGD([features], lr=0.5)
    losses = []
    for _ in range(20):
        scores = list(F.normalize(features, dim=2) @ prototypes.T)
        loss = swav_loss(scores, [sinkhorn_knopp(s) for s in scores[:2]])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------------------------------- the method
def tiny_swav(**options: object):
    """A SwAV small enough for a CPU step in milliseconds: 1-block ViT at 32 px, 16 px local crops, 8 prototypes."""
    from vlp_lightning.methods.swav import SwAV
    from vlp_lightning.modules.vision import VisionEncoder

    torch.manual_seed(0)
    vision = VisionEncoder(
        "vit_tiny_patch16_224", img_size=IMAGE_SIZE, patch_size=8, width=32, depth=1, num_heads=2, dynamic_img_size=True
    )
    defaults = dict(
        vision=vision,
        hidden_dim=32,
        projection_dim=16,
        num_prototypes=8,
        num_local_crops=NUM_LOCAL_CROPS,
        local_crop_size=LOCAL_SIZE,
        freeze_prototypes_steps=0,
        lr_scheduler=None,
    )
    return SwAV(**{**defaults, **options})


def multi_crop_batch(batch_size: int = 4, seed: int = 0, local_size: int = LOCAL_SIZE) -> dict:
    generator = torch.Generator().manual_seed(seed)
    sizes = [IMAGE_SIZE] * 2 + [local_size] * NUM_LOCAL_CROPS
    images = [torch.randn(batch_size, 3, size, size, generator=generator) for size in sizes]
    return {"image": images, "__key__": [f"{seed}-{i}" for i in range(batch_size)]}


def fit(method, steps: int, tmp_path: Path, **trainer_options):
    """Train `method` with a Lightning Trainer on `steps` different multi-crop batches; returns the trainer."""
    import lightning.pytorch as pl

    loader = DataLoader([multi_crop_batch(seed=step) for step in range(steps)], batch_size=None)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **({"max_steps": steps} | trainer_options),
    )
    trainer.fit(method, train_dataloaders=loader)
    return trainer


def test_train_views_are_multi_crop_of_the_paper():
    from PIL import Image

    method = tiny_swav()
    views = method.train_views().build(method.image_size)
    crops = views(Image.new("RGB", (48, 40), (120, 30, 200)))
    expected = [(3, IMAGE_SIZE, IMAGE_SIZE)] * 2 + [(3, LOCAL_SIZE, LOCAL_SIZE)] * NUM_LOCAL_CROPS
    assert [tuple(crop.shape) for crop in crops] == expected
    assert tiny_swav(local_crop_size=None).local_crop_size == 8  # 96/224 of 32 px is 13 px: whole 8 px patches


def test_fixed_size_vit_gets_full_size_local_crops_or_a_clear_error():
    """Swapping SwAV onto a recipe whose ViT takes one input size must still train (DESIGN: swap by class path)."""
    from vlp_lightning.modules.vision import VisionEncoder

    fixed = VisionEncoder("vit_tiny_patch16_224", img_size=IMAGE_SIZE, patch_size=8, width=32, depth=1, num_heads=2)
    with pytest.warns(UserWarning, match="dynamic_img_size"):
        method = tiny_swav(vision=fixed, local_crop_size=None)
    assert method.local_crop_size == IMAGE_SIZE
    assert torch.isfinite(method.forward_loss(multi_crop_batch(local_size=IMAGE_SIZE))["loss"])
    with pytest.raises(ValueError, match="dynamic_img_size=true"):
        tiny_swav(vision=fixed, local_crop_size=LOCAL_SIZE)


def test_prototypes_frozen_during_the_first_steps_then_trained(tmp_path):
    frozen = tiny_swav(freeze_prototypes_steps=2)
    initial = F.normalize(frozen.prototypes.weight.detach().clone(), dim=1)
    backbone_before = frozen.vision.model.patch_embed.proj.weight.detach().clone()
    fit(frozen, steps=2, tmp_path=tmp_path)
    torch.testing.assert_close(frozen.prototypes.weight.detach(), initial)  # only re-normalised, never stepped
    assert not torch.equal(frozen.vision.model.patch_embed.proj.weight, backbone_before)

    trained = tiny_swav(freeze_prototypes_steps=1)
    fit(trained, steps=2, tmp_path=tmp_path)
    assert not torch.allclose(trained.prototypes.weight, initial)


def test_prototypes_are_unit_norm_when_each_step_starts():
    method = tiny_swav()
    with torch.no_grad():
        method.prototypes.weight.mul_(3.0)
    method.on_train_batch_start(multi_crop_batch(), 0)
    torch.testing.assert_close(method.prototypes.weight.norm(dim=1), torch.ones(8))


def test_queue_joins_sinkhorn_once_full():
    batch_size, queue_length = 4, 8
    method = tiny_swav(queue_length=queue_length)
    method.train()
    method.forward_loss(multi_crop_batch(batch_size, seed=0))
    assert method.queued_rows == batch_size
    scores = method.prototypes(F.normalize(torch.randn(batch_size, 16), dim=1))
    torch.testing.assert_close(method.codes(scores, 0), sinkhorn_knopp(scores))  # half full: not used yet

    batch = multi_crop_batch(batch_size, seed=1)
    method.forward_loss(batch)
    assert method.queued_rows == queue_length
    with torch.no_grad():
        newest = method.embed_views(batch["image"])[:batch_size]
    torch.testing.assert_close(method.queue[0, :batch_size], newest)  # newest first

    with torch.no_grad():
        with_queue = sinkhorn_knopp(torch.cat([method.prototypes(method.queue[0]), scores]))[-batch_size:]
    torch.testing.assert_close(method.codes(scores, 0), with_queue)
    assert not torch.allclose(with_queue, sinkhorn_knopp(scores), atol=1e-3)

    method.eval()  # validation neither reads nor fills the queue
    torch.testing.assert_close(method.codes(scores, 0), sinkhorn_knopp(scores))


def test_queue_starts_after_queue_start_steps(tmp_path):
    method = tiny_swav(queue_length=64, queue_start_steps=1)
    fit(method, steps=3, tmp_path=tmp_path)
    assert method.queued_rows == 2 * 4  # filled on steps 1 and 2, not on step 0


def test_fast_dev_run_in_bf16(tmp_path):
    method = tiny_swav()
    before = method.projector[0].weight.detach().clone()
    trainer = fit(method, steps=2, tmp_path=tmp_path, fast_dev_run=2, precision="bf16-mixed")
    assert not torch.equal(method.projector[0].weight, before)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_single_view_batch_is_rejected_with_the_fix():
    method = tiny_swav()
    with pytest.raises(ValueError, match="MultiCrop"):
        method.forward_loss({"image": torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)})
