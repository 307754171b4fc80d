"""Contrastive losses in one process: equality with the papers' equations written as loops, fp32 under bf16
autocast, the loss falls when its inputs are optimised, and the distributed options reduce to the plain loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlp_lightning.losses.contrastive import clip_contrastive_loss, contrastive_accuracy, convirt_contrastive_loss


def loop_reference_loss(images: torch.Tensor, texts: torch.Tensor, scale: float, image_to_text_weight: float) -> float:
    """ConVIRT eq. 2-4 (CLIP is λ = 0.5) with cosine similarities, one explicit softmax per row, in float64."""
    images = [v / v.norm() for v in images.double()]
    texts = [u / u.norm() for u in texts.double()]
    n = len(images)
    total = 0.0
    for i in range(n):
        image_to_text = [math.exp(scale * float(images[i] @ texts[k])) for k in range(n)]
        text_to_image = [math.exp(scale * float(texts[i] @ images[k])) for k in range(n)]
        total += image_to_text_weight * -math.log(image_to_text[i] / sum(image_to_text))
        total += (1 - image_to_text_weight) * -math.log(text_to_image[i] / sum(text_to_image))
    return total / n


def random_pairs(n: int = 8, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, dim, generator=generator)
    texts = images + 0.8 * torch.randn(n, dim, generator=generator)  # paired, but not trivially
    return images, texts


@pytest.mark.parametrize("logit_scale", [1 / 0.07, 100.0, 1.0])
def test_clip_loss_equals_loop_reference(logit_scale: float) -> None:
    images, texts = random_pairs()
    loss = clip_contrastive_loss(F.normalize(images, dim=-1), F.normalize(texts, dim=-1), torch.tensor(logit_scale))
    assert loss.item() == pytest.approx(loop_reference_loss(images, texts, logit_scale, 0.5), rel=1e-5)


@pytest.mark.parametrize("image_to_text_weight", [0.75, 0.0, 1.0])
def test_convirt_loss_equals_eq_2_to_4(image_to_text_weight: float) -> None:
    images, texts = random_pairs(seed=1)
    images = 3.0 * images  # raw projections: ConVIRT uses cosine similarity, so the scale must not matter
    loss = convirt_contrastive_loss(images, texts, temperature=0.1, image_to_text_weight=image_to_text_weight)
    reference = loop_reference_loss(images, texts, 1 / 0.1, image_to_text_weight)
    assert loss.item() == pytest.approx(reference, rel=1e-5)


def test_convirt_weights_the_two_directions_differently() -> None:
    images, texts = random_pairs(seed=2)
    image_to_text = convirt_contrastive_loss(images, texts, image_to_text_weight=1.0)
    text_to_image = convirt_contrastive_loss(images, texts, image_to_text_weight=0.0)
    assert image_to_text.item() != pytest.approx(text_to_image.item(), rel=1e-3)
    weighted = convirt_contrastive_loss(images, texts, image_to_text_weight=0.75)
    assert weighted.item() == pytest.approx(0.75 * image_to_text.item() + 0.25 * text_to_image.item(), rel=1e-6)


def test_logits_stay_fp32_under_bf16_autocast() -> None:
    images, texts = random_pairs(n=64, dim=32, seed=3)
    images, texts = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)
    expected = clip_contrastive_loss(images, texts, 100.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        from_fp32 = clip_contrastive_loss(images, texts, 100.0)
    assert from_fp32.dtype == torch.float32
    assert from_fp32.item() == pytest.approx(expected.item(), rel=1e-6)
    # bf16 features from a bf16 tower: the loss is the fp32 loss of those (rounded) features
    images_bf16, texts_bf16 = images.bfloat16(), texts.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        from_bf16 = clip_contrastive_loss(images_bf16, texts_bf16, torch.tensor(100.0, dtype=torch.bfloat16))
    reference = clip_contrastive_loss(images_bf16.float(), texts_bf16.float(), 100.0)
    assert from_bf16.dtype == torch.float32
    assert from_bf16.item() == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize("loss_name", ["clip", "convirt"])
def test_loss_falls_when_features_are_optimised(loss_name: str) -> None:
    torch.manual_seed(0)
    images = torch.randn(16, 32, requires_grad=True)
    texts = torch.randn(16, 32, requires_grad=True)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    optimizer = torch.optim.Adam([images, texts, log_scale], lr=0.05)

    def loss_fn() -> torch.Tensor:
        if loss_name == "clip":
            return clip_contrastive_loss(
                F.normalize(images, dim=-1), F.normalize(texts, dim=-1), log_scale.exp().clamp(max=100)
            )
        return convirt_contrastive_loss(images, texts)

    losses = []
    for _ in range(20):
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    image_to_text, text_to_image = contrastive_accuracy(F.normalize(images, dim=-1), F.normalize(texts, dim=-1))
    assert image_to_text.item() == 1.0 and text_to_image.item() == 1.0


def test_learned_temperature_receives_gradient() -> None:
    images, texts = random_pairs(seed=4)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    clip_contrastive_loss(F.normalize(images, dim=-1), F.normalize(texts, dim=-1), log_scale.exp()).backward()
    assert log_scale.grad is not None and log_scale.grad.abs().item() > 1e-4


@pytest.mark.parametrize(
    ("gather", "local_loss", "gather_with_grad"),
    [(False, False, True), (True, True, True), (True, False, False), (True, True, False)],
)
def test_distributed_options_reduce_to_plain_loss_in_one_process(
    gather: bool, local_loss: bool, gather_with_grad: bool
) -> None:
    assert not torch.distributed.is_initialized()
    images, texts = random_pairs(seed=5)

    def loss_and_grads(**options: bool) -> tuple[torch.Tensor, ...]:
        leaf_images, leaf_texts = images.clone().requires_grad_(), texts.clone().requires_grad_()
        loss = clip_contrastive_loss(F.normalize(leaf_images, dim=-1), F.normalize(leaf_texts, dim=-1), 20.0, **options)
        loss.backward()
        return loss.detach(), leaf_images.grad, leaf_texts.grad

    expected = loss_and_grads()
    actual = loss_and_grads(gather=gather, local_loss=local_loss, gather_with_grad=gather_with_grad)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_contrastive_accuracy_counts_top1_matches() -> None:
    features = F.normalize(torch.randn(10, 8, generator=torch.Generator().manual_seed(6)), dim=-1)
    assert [a.item() for a in contrastive_accuracy(features, features)] == [1.0, 1.0]
    assert [a.item() for a in contrastive_accuracy(features, features.roll(1, dims=0))] == [0.0, 0.0]


def test_mismatched_pairs_are_rejected_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="must both be \\[N, D\\]"):
        clip_contrastive_loss(torch.randn(4, 8), torch.randn(5, 8), 10.0)
    with pytest.raises(ValueError, match="image_to_text_weight"):
        convirt_contrastive_loss(torch.randn(4, 8), torch.randn(4, 8), image_to_text_weight=1.5)
