"""MAE and the shared masking helpers: exact mask ratio, patchify round trip, the encoder sees visible patches only,
the loss counts masked patches only, the loss falls, and a Lightning fast_dev_run."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from timm.layers import build_sincos2d_pos_embed
from torch.utils.data import DataLoader

from vlp_lightning.losses.masked_modeling import masked_reconstruction_loss
from vlp_lightning.methods.mae import MAE
from vlp_lightning.modules.masking import patchify, random_masking, unpatchify
from vlp_lightning.modules.vision import VisionEncoder


def tiny_mae(**options) -> MAE:
    """32 px, 8 px patches (a 4x4 grid), two encoder blocks: milliseconds per step."""
    torch.manual_seed(0)
    return MAE(VisionEncoder("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), **options)


def ramps(count: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Images that are linear colour ramps in random directions: the masked patches are predictable."""
    generator = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, size)
    slopes = torch.randn(count, 2, 3, 1, 1, generator=generator)
    return slopes[:, 0] * axis.view(1, 1, size, 1) + slopes[:, 1] * axis.view(1, 1, 1, size)


@pytest.mark.parametrize("mask_ratio", [0.75, 0.5, 0.1])
def test_random_masking_masks_exactly_the_ratio(mask_ratio):
    torch.manual_seed(0)
    num_patches = 64
    mask = random_masking(16, num_patches, mask_ratio)
    expected = round(num_patches * mask_ratio)
    assert (mask.mask.sum(dim=1) == expected).all()
    assert mask.ids_masked.shape == (16, expected) and mask.ids_keep.shape == (16, num_patches - expected)
    # kept and masked positions partition the grid, and `mask` marks exactly the masked ones
    everything = torch.cat([mask.ids_keep, mask.ids_masked], dim=1)
    assert (everything.sort(dim=1).values == torch.arange(num_patches)).all()
    assert (mask.mask.gather(1, mask.ids_masked) == 1).all() and (mask.mask.gather(1, mask.ids_keep) == 0).all()
    # ids_restore undoes the shuffle
    assert (everything.gather(1, mask.ids_restore) == torch.arange(num_patches)).all()
    # masks differ between samples (per-sample shuffling)
    assert len({tuple(row.tolist()) for row in mask.mask}) > 1


def test_random_masking_rejects_ratios_that_mask_nothing_or_everything():
    with pytest.raises(ValueError, match="masks 0 of 16 patches"):
        random_masking(2, 16, 0.01)
    with pytest.raises(ValueError, match="masks 16 of 16 patches"):
        random_masking(2, 16, 1.0)


def test_patchify_layout_and_round_trip():
    images = torch.randn(2, 3, 32, 48)
    patches = patchify(images, 8)  # a 4 x 6 grid
    assert patches.shape == (2, 24, 3 * 8 * 8)
    row, column = 2, 5
    assert torch.equal(patches[1, row * 6 + column], images[1, :, 16:24, 40:48].flatten())
    assert torch.equal(unpatchify(patches, 8, (4, 6)), images)
    with pytest.raises(ValueError, match="not a multiple of patch_size=5"):
        patchify(images, 5)


def test_reconstruction_loss_counts_masked_patches_only():
    torch.manual_seed(0)
    predicted, target = torch.randn(4, 16, 12), torch.randn(4, 16, 12)
    mask = random_masking(4, 16, 0.75).mask
    loss = masked_reconstruction_loss(predicted, target, mask)

    at_visible = predicted + 5.0 * (1 - mask).unsqueeze(-1)
    assert torch.equal(masked_reconstruction_loss(at_visible, target, mask), loss)
    at_masked = predicted + 5.0 * mask.unsqueeze(-1)
    assert masked_reconstruction_loss(at_masked, target, mask) > loss + 1

    # reference: normalise every target patch, squared error per patch, mean over the masked patches
    normalised = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((predicted - normalised) ** 2).mean(-1)
    assert torch.allclose(loss, per_patch[mask.bool()].mean())
    raw = masked_reconstruction_loss(predicted, target, mask, normalize_target=False)
    assert torch.allclose(raw, ((predicted - target) ** 2).mean(-1)[mask.bool()].mean())


def test_encoder_sees_only_the_visible_patches():
    mae = tiny_mae(mask_ratio=0.75).eval()
    images = torch.randn(3, 3, 32, 32)
    torch.manual_seed(1)
    mask = random_masking(3, 16, 0.75)
    token_counts = []

    def count_tokens(_module, inputs, _output) -> None:
        token_counts.append(inputs[0].shape[1])

    hook = mae.vision.model.blocks[0].register_forward_hook(count_tokens)
    with torch.no_grad():
        encoded = mae.forward_encoder(images, mask)
        # change every masked pixel: the encoder output must not move
        pixel_mask = unpatchify(mask.mask[..., None].expand(-1, -1, 3 * 64), 8, (4, 4))
        scrambled = torch.where(pixel_mask.bool(), torch.randn_like(images) * 10, images)
        encoded_scrambled = mae.forward_encoder(scrambled, mask)
    hook.remove()
    assert token_counts == [1 + 4, 1 + 4]  # class token + the 4 visible patches of 16
    assert torch.allclose(encoded, encoded_scrambled, atol=1e-6)


def test_encoder_position_embedding_is_frozen_sine_cosine():
    mae = tiny_mae()
    pos_embed = mae.vision.model.pos_embed
    assert not pos_embed.requires_grad
    assert torch.equal(pos_embed[0, 0], torch.zeros(192))  # the class token's slot
    assert torch.allclose(pos_embed[0, 1:], build_sincos2d_pos_embed([4, 4], 192))
    trainable = {id(p) for group in mae.parameter_groups() for p in group["params"]}
    assert id(pos_embed) not in trainable


def test_weights_are_initialised_as_the_released_code():
    """models_mae.py `initialize_weights`: xavier-uniform Linears with zero bias (timm's ViT draws N(0, 0.02), PyTorch's
    Linear kaiming-uniform with a non-zero bias), the patch embedding as a Linear, tokens N(0, 0.02)."""
    mae = tiny_mae()
    vit = mae.vision.model
    for linear in (vit.blocks[0].attn.qkv, vit.blocks[1].mlp.fc2, mae.decoder_embed, mae.decoder_blocks[0].mlp.fc1,
                   mae.decoder_pred):
        fan_out, fan_in = linear.weight.shape
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert linear.weight.abs().max() <= bound
        assert linear.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)  # uniform(-b, b)
        assert torch.equal(linear.bias, torch.zeros_like(linear.bias))
    patch_weight = vit.patch_embed.proj.weight  # [192, 3, 8, 8] viewed as a Linear 192 -> 192
    assert patch_weight.std().item() == pytest.approx((2 / (192 + 192)) ** 0.5, rel=0.05)
    assert vit.cls_token.std().item() == pytest.approx(0.02, rel=0.25)
    assert mae.mask_token.std().item() == pytest.approx(0.02, rel=0.25)
    assert torch.equal(mae.decoder_norm.weight, torch.ones(128)) and torch.equal(vit.norm.bias, torch.zeros(192))
    # a loaded checkpoint keeps its weights when asked
    torch.manual_seed(0)
    encoder = VisionEncoder("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    kept = encoder.model.blocks[0].attn.qkv.weight.detach().clone()
    MAE(encoder, initialize_weights=False)
    assert torch.equal(encoder.model.blocks[0].attn.qkv.weight, kept)


def test_decoder_predicts_every_patch_in_grid_order():
    mae = tiny_mae().eval()
    torch.manual_seed(0)
    mask = random_masking(2, 16, 0.75)
    with torch.no_grad():
        predicted = mae.forward_decoder(mae.forward_encoder(torch.randn(2, 3, 32, 32), mask), mask)
    assert predicted.shape == (2, 16, 8 * 8 * 3)


def test_mae_loss_falls():
    mae = tiny_mae()
    optimizer = torch.optim.AdamW([p for p in mae.parameters() if p.requires_grad], lr=1e-3)
    batch = {"image": ramps(8)}
    losses = []
    for _ in range(10):
        loss = mae.forward_loss(batch)["loss"]  # fresh random masks every step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.85 * losses[0], losses


def test_fast_dev_run_with_a_plain_dataloader(tmp_path):
    mae = tiny_mae()
    batches = [{"image": ramps(4, seed=seed), "__key__": [str(i) for i in range(4)]} for seed in range(2)]
    trainer = pl.Trainer(
        fast_dev_run=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    before = mae.decoder_pred.weight.detach().clone()
    trainer.fit(mae, train_dataloaders=DataLoader(batches, batch_size=None))
    assert not torch.equal(before, mae.decoder_pred.weight)
    assert mae.probe_features(ramps(2)).shape == (2, 192)
