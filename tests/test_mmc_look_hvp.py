"""What MMC, LOOK and HVP add to the shared blocks: the leave-one-out kNN loss against a brute-force reference,
the SimMIM-style masked forward against timm's own forward, MMC's patch features, LOOK's labelled bank."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from test_methods import make_batch
from vlp_lightning import methods
from vlp_lightning.losses.nearest_neighbour import leave_one_out_knn_loss
from vlp_lightning.modules.vision import tiny_vit
from vlp_lightning.modules.masking import vit_forward_with_mask_tokens


def reference_loo_knn(features, labels, bank, bank_labels, k, temperature):
    """One sample at a time: its k most similar *other* valid candidates, -log of its class's softmax share."""
    features, bank = torch.nn.functional.normalize(features, dim=1), torch.nn.functional.normalize(bank, dim=1)
    losses = []
    for i in range(len(features)):
        others = [(features[j], labels[j]) for j in range(len(features)) if j != i]
        others += [(bank[j], bank_labels[j]) for j in range(len(bank)) if bank_labels[j] >= 0]
        scores = torch.stack([features[i] @ f for f, _ in others]) / temperature
        top = scores.topk(k).indices
        weights = scores[top].softmax(dim=0)
        share = sum(w for w, j in zip(weights, top) if others[j][1] == labels[i])
        if torch.is_tensor(share):
            losses.append(-share.log())
    return torch.stack(losses).mean()


def test_leave_one_out_knn_loss_equals_a_brute_force_reference():
    torch.manual_seed(0)
    features, labels = torch.randn(12, 8), torch.randint(0, 3, (12,))
    bank, bank_labels = torch.randn(20, 8), torch.randint(0, 3, (20,))
    bank_labels[15:] = -1  # five empty slots
    loss, _ = leave_one_out_knn_loss(features, labels, bank, bank_labels, k=5, temperature=0.2)
    torch.testing.assert_close(loss, reference_loo_knn(features, labels, bank, bank_labels, 5, 0.2))


def test_a_sample_is_never_its_own_neighbour_and_empty_slots_never_vote():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    bank = torch.tensor([[1.0, 0.01], [0.0, 1.0]])  # an empty slot right next to sample 0, a class-1 key by sample 1
    loss, accuracy = leave_one_out_knn_loss(features, labels, bank, torch.tensor([-1, 1]), k=1, temperature=0.1)
    # sample 0's only neighbour is sample 1 (class 1): no vote for its class, so only sample 1 (voted right) counts
    assert accuracy == 0.5 and loss.item() == pytest.approx(0.0, abs=1e-6)


def test_leave_one_out_knn_loss_falls_when_optimised():
    torch.manual_seed(0)
    features = torch.randn(16, 8, requires_grad=True)
    labels = torch.arange(16) % 4
    optimizer = torch.optim.SGD([features], lr=1.0)
    losses = []
    for _ in range(20):
        loss, _ = leave_one_out_knn_loss(features, labels, torch.zeros(0, 8), torch.zeros(0, dtype=torch.long), k=15)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_masked_forward_without_masked_patches_is_the_vits_own_forward():
    torch.manual_seed(0)
    vision = tiny_vit().eval()
    images = torch.randn(2, 3, 32, 32)
    tokens = vit_forward_with_mask_tokens(vision.model, images, torch.zeros(2, 16), torch.randn(1, 1, 64))
    torch.testing.assert_close(tokens, vision.model.forward_features(images))
    masked = vit_forward_with_mask_tokens(vision.model, images, torch.eye(16)[:2], torch.randn(1, 1, 64))
    assert not torch.allclose(masked, tokens)


def test_mmc_exposes_one_feature_per_patch():
    torch.manual_seed(0)
    method = methods.MMC().eval()
    with torch.no_grad():
        features = method.patch_features(torch.randn(3, 3, 32, 32))
    assert features.shape == (3, 16, method.vision.num_features)


def test_look_bank_holds_the_trained_batches_embeddings_and_labels(tmp_path):
    torch.manual_seed(0)
    method = methods.LOOK(lr_scheduler=None)
    batches = [make_batch(method, seed=i) for i in range(2)]
    pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, default_root_dir=tmp_path).fit(method, DataLoader(batches, batch_size=None))
    labels = method.bank_labels.bank[:, 0]
    assert int(method.bank.pointer) == 16
    assert torch.equal(labels[:16], torch.cat([b["label"] for b in batches]).float())
    assert (labels[16:] == -1).all()
    assert torch.allclose(method.bank.bank[:16].norm(dim=1), torch.ones(16))
