"""SIGMA and its VideoMAE pixel baseline: tube masks, VideoMAE's normalised-pixel target, Sinkhorn-balanced
assignments and the symmetric swapped prediction of the released code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlp_lightning.methods import SIGMA
from vlp_lightning.modules.video_vision import VideoVisionTransformer, tube_masking
from vlp_lightning.modules.vision import VisionEncoder


def tiny_sigma(**overrides) -> SIGMA:
    torch.manual_seed(0)
    return SIGMA(**overrides)


def test_tube_mask_hides_the_same_positions_in_every_tubelet():
    torch.manual_seed(0)
    mask = tube_masking(batch_size=5, tubelets=3, positions=16, ratio=0.75)
    slots = mask.mask.view(5, 3, 16)
    assert torch.equal(slots, slots[:, :1].expand_as(slots))  # one spatial mask per clip, over all its tubelets
    assert (slots[:, 0].sum(dim=1) == 12).all()
    assert not torch.equal(slots[0, 0], slots[1, 0])  # but each clip its own
    for row in range(5):  # the indices agree with the mask and cover every token once
        assert mask.mask[row, mask.ids_masked[row]].eq(1).all() and mask.mask[row, mask.ids_keep[row]].eq(0).all()
        assert sorted(torch.cat([mask.ids_keep[row], mask.ids_masked[row]]).tolist()) == list(range(48))


def test_the_encoder_never_sees_either_frame_of_a_masked_tube():
    method = tiny_sigma().eval()
    video = torch.randn(2, 4, 3, 32, 32)
    torch.manual_seed(1)
    mask = method.draw_mask(2, video.device)
    position = mask.ids_masked[0, 0].item() % method.vision.num_positions  # a masked spatial position of clip 0
    row, column = divmod(position, 4)
    perturbed = video.clone()
    perturbed[0, :, :, row * 8:(row + 1) * 8, column * 8:(column + 1) * 8] += 5.0  # every frame of that tube
    with torch.no_grad():
        before = method.vision.forward_tokens(video, mask.ids_keep)
        after = method.vision.forward_tokens(perturbed, mask.ids_keep)
        assert torch.equal(before, after)
        position = mask.ids_keep[0, 0].item() % method.vision.num_positions  # a visible one does reach it
        row, column = divmod(position, 4)
        perturbed = video.clone()
        perturbed[0, 1, :, row * 8:(row + 1) * 8, column * 8:(column + 1) * 8] += 5.0  # its second frame only
        assert not torch.allclose(before[0], method.vision.forward_tokens(perturbed, mask.ids_keep)[0])


def videomae_normalised_tubes(video: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """The released target by loops: per tube, pixels laid out (frame, row, column) x channel, each channel
    normalised by its mean and unbiased std + 1e-6, then flattened (p0 p1 p2 c)."""
    batch, frames, _, height, width = video.shape
    rows = []
    for sample in range(batch):
        tubes = []
        for t in range(0, frames, tubelet):
            for y in range(0, height, patch):
                for x in range(0, width, patch):
                    tube = video[sample, t:t + tubelet, :, y:y + patch, x:x + patch]  # [t, C, p, p]
                    pixels = tube.permute(0, 2, 3, 1).reshape(-1, 3)
                    pixels = (pixels - pixels.mean(dim=0)) / (pixels.std(dim=0, unbiased=True) + 1e-6)
                    tubes.append(pixels.reshape(-1))
        rows.append(torch.stack(tubes))
    return torch.stack(rows)


def test_pixel_target_is_videomaes_normalised_pixel_mse_on_the_masked_tubes():
    vision = VideoVisionTransformer(img_size=8, patch_size=4, tubelet_size=2, num_frames=4, width=32, depth=1,
                                    num_heads=2, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    torch.manual_seed(0)
    method = SIGMA(vision=vision, target="pixels", mask_ratio=0.5, decoder_width=32, decoder_heads=2)
    pixels = torch.rand(2, 4, 3, 8, 8)  # in [0, 1], then normalised as the views do
    video = (pixels - torch.tensor(vision.mean).view(1, 1, 3, 1, 1)) / torch.tensor(vision.std).view(1, 1, 3, 1, 1)
    torch.manual_seed(3)
    loss = method.forward_loss({"video": video})["loss"]
    torch.manual_seed(3)
    mask = method.draw_mask(2, video.device)
    predicted = method.forward_decoder(video, mask)  # [B, M, 2*4*4*3]
    reference = videomae_normalised_tubes(pixels, 2, 4)  # [B, N, 96]
    target = torch.stack([reference[row, mask.ids_masked[row]] for row in range(2)])
    assert predicted.shape == target.shape == (2, 4, 96)  # 2 of 4 positions x 2 tubelets masked
    assert torch.allclose(loss, ((predicted - target) ** 2).mean(), atol=1e-6)


def reference_sigma_loss(decoder_scores, projection_scores, decoder_codes, projection_codes, temperature):
    """engine_for_pretraining.py with loss_func=SWAV: CE(projection scores / τ, argmax of the decoder's codes)
    + CE(decoder scores / τ, argmax of the projection's codes)."""
    return (F.cross_entropy(projection_scores / temperature, decoder_codes.argmax(dim=1))
            + F.cross_entropy(decoder_scores / temperature, projection_codes.argmax(dim=1)))


def test_sigma_loss_is_the_released_symmetric_swapped_prediction_and_swapping_roles_keeps_it():
    method = tiny_sigma()
    with torch.no_grad():
        method.prototypes.copy_(F.normalize(method.prototypes, dim=1))
    predicted, projected = torch.randn(4, 28, 32), torch.randn(4, 28, 32)
    outputs = method.sigma_loss(predicted, projected)
    decoder_scores = F.normalize(predicted.flatten(0, 1), dim=-1) @ method.prototypes.detach().T
    projection_scores = F.normalize(projected.flatten(0, 1), dim=-1) @ method.prototypes.detach().T
    reference = reference_sigma_loss(decoder_scores, projection_scores, method.assignments(decoder_scores),
                                     method.assignments(projection_scores), method.temperature)
    assert torch.allclose(outputs["loss"], reference, atol=1e-5)
    assert torch.allclose(method.sigma_loss(projected, predicted)["loss"], outputs["loss"], atol=1e-5)


def test_the_prototypes_learn_through_the_projection_side_only():
    """The released `extract_assignments(x, detach=True)` for the decoder: C gets the projection side's gradient."""
    method = tiny_sigma()
    with torch.no_grad():
        method.prototypes.copy_(F.normalize(method.prototypes, dim=1))
    predicted, projected = torch.randn(2, 28, 32), torch.randn(2, 28, 32)
    method.sigma_loss(predicted, projected)["loss"].backward()
    gradient = method.prototypes.grad.clone()

    def reference_gradient(detach_decoder_side: bool) -> torch.Tensor:
        method.prototypes.grad = None
        prototypes = method.prototypes
        decoder = F.normalize(predicted.flatten(0, 1), dim=-1) @ (prototypes.detach() if detach_decoder_side
                                                                   else prototypes).T
        projection = F.normalize(projected.flatten(0, 1), dim=-1) @ prototypes.T
        reference_sigma_loss(decoder, projection, method.assignments(decoder), method.assignments(projection),
                             method.temperature).backward()
        return method.prototypes.grad

    assert torch.allclose(gradient, reference_gradient(True), atol=1e-5)
    assert not torch.allclose(gradient, reference_gradient(False), atol=1e-3)


def test_sinkhorn_spreads_a_collapsed_batch_evenly_over_the_prototypes():
    method = tiny_sigma(hard_assignments=False)
    torch.manual_seed(0)
    scores = 0.1 * torch.randn(256, 32)
    scores[:, 0] += 0.5  # every tube's raw argmax is prototype 0: the collapse SIGMA's equipartition prevents
    assert scores.argmax(dim=1).eq(0).all()
    codes = method.assignments(scores)
    assert torch.allclose(codes.sum(dim=1), torch.ones(256), atol=1e-5)  # each tube: a distribution
    assert torch.allclose(codes.sum(dim=0), torch.full((32,), 256 / 32), rtol=0.05)  # each prototype: B/K
    method.hard_assignments = True
    hard = method.assignments(scores)
    assert hard.sum(dim=1).eq(1).all() and hard.argmax(dim=1).unique().numel() > 24


def test_forward_normalises_the_prototypes_and_the_probe_reads_the_whole_clip():
    method = tiny_sigma()
    video = torch.randn(3, 4, 3, 32, 32)
    outputs = method.forward_loss({"video": video})
    assert torch.allclose(method.prototypes.norm(dim=1), torch.ones(32), atol=1e-5)
    assert {"loss", "assignment_agreement", "prototypes_used"} <= set(outputs)
    method.eval()
    with torch.no_grad():
        assert torch.allclose(method.probe_features(video), method.vision.forward_tokens(video).mean(dim=1))
        image = video[:, 0]  # a still image is a clip of repeated frames
        assert torch.allclose(method.probe_features(image), method.probe_features(torch.stack([image] * 2, dim=1)))


def test_pixel_baseline_builds_no_projection_and_its_loss_falls():
    method = tiny_sigma(target="pixels")
    assert not hasattr(method, "prototypes") and not hasattr(method, "projection")
    assert method.decoder_head.out_features == 2 * 8 * 8 * 3
    video = torch.randn(8, 4, 3, 32, 32)
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        torch.manual_seed(0)
        loss = method.forward_loss({"video": video})["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses


def dino_tower(**overrides) -> VisionEncoder:
    arguments = {"img_size": 32, "patch_size": 8, "width": 48, "depth": 1, "num_heads": 2, "mean": (0.4, 0.45, 0.5),
                 "std": (0.2, 0.22, 0.25), **overrides}
    return VisionEncoder("vit_tiny_patch16_224", **arguments)


def test_dino_target_is_the_frozen_towers_patch_tokens_of_each_tubelets_first_frame_standardised_per_clip():
    torch.manual_seed(0)
    method = SIGMA(target="dino", target_vision=dino_tower(), mask_ratio=0.5)
    assert isinstance(method.projection, torch.nn.Identity) and method.decoder_head.out_features == 48
    assert method.prototypes.shape == (32, 48) and not any(p.requires_grad for p in method.target_vision.parameters())
    pixels = torch.rand(2, 4, 3, 32, 32)
    mean, std = (torch.tensor(values).view(1, 1, 3, 1, 1) for values in (method.vision.mean, method.vision.std))
    video = (pixels - mean) / std  # the clip as SIGMA's views normalise it
    mask = method.draw_mask(2, video.device)
    features = method.masked_tube_features(video, mask)
    # by hand: frames 0 and 2 in the tower's own normalisation, its patch tokens, channels standardised per clip
    tower = method.target_vision
    tower_mean, tower_std = (torch.tensor(v).view(1, 3, 1, 1) for v in (tower.mean, tower.std))
    with torch.no_grad():
        tokens = torch.stack([torch.cat([tower.forward_tokens((pixels[b, t:t + 1] - tower_mean) / tower_std)[0]
                                         for t in (0, 2)]) for b in range(2)])  # [2, 2 * 16, 48]
    tokens = (tokens - tokens.mean(dim=1, keepdim=True)) / (tokens.std(dim=1, keepdim=True) + 1e-6)
    expected = torch.stack([tokens[b, mask.ids_masked[b]] for b in range(2)])
    assert features.shape == (2, 16, 48) and torch.allclose(features, expected, atol=1e-4)
    # the second frame of a tubelet does not change the target; the first does
    changed = video.clone()
    changed[:, 1] += 1.0
    assert torch.allclose(method.masked_tube_features(changed, mask), features, atol=1e-5)
    changed[:, 0] += 1.0
    assert not torch.allclose(method.masked_tube_features(changed, mask), features, atol=1e-3)


def test_dino_target_trains_the_video_model_and_prototypes_never_the_tower():
    torch.manual_seed(0)
    method = SIGMA(target="dino", target_vision=dino_tower())
    tower = {name: value.clone() for name, value in method.target_vision.state_dict().items()}
    video = torch.randn(8, 4, 3, 32, 32)
    parameters = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3)
    method.train()
    assert not method.target_vision.training  # locked: eval mode even when the method trains
    losses = []
    for _ in range(10):
        torch.manual_seed(0)
        outputs = method.forward_loss({"video": video})
        optimizer.zero_grad()
        outputs["loss"].backward()
        optimizer.step()
        losses.append(outputs["loss"].item())
    assert losses[-1] < 0.95 * losses[0], losses
    assert method.vision.tube_embed.weight.grad is not None and method.prototypes.grad is not None
    assert all(torch.equal(value, method.target_vision.state_dict()[name]) for name, value in tower.items())


def test_dino_target_reads_the_ema_teacher_of_a_dino_checkpoint(tmp_path):
    from vlp_lightning.modules.vision import frozen_image_tower
    from vlp_lightning.pretrained import build_method, save_checkpoint

    config = {"class_path": "vlp_lightning.methods.DINO"}
    torch.manual_seed(0)
    dino, _ = build_method(config, "DINO", "")
    with torch.no_grad():  # a teacher that differs from the student, as after training
        for parameter in dino.teacher.parameters():
            parameter.add_(0.01)
    path = str(save_checkpoint(dino, tmp_path / "dino.ckpt", config))
    teacher = dino.teacher[0].state_dict()
    tower = frozen_image_tower(None, path, "target_tower", teacher=True)
    assert all(torch.equal(value, teacher[name]) for name, value in tower.state_dict().items())
    method = SIGMA(target="dino", target_tower=path)
    assert all(torch.equal(value, teacher[name]) for name, value in method.target_vision.state_dict().items())


@pytest.mark.parametrize(("arguments", "says"), [
    ({"target": "tokens"}, "target='tokens' is not one of"),
    ({"target": "dino"}, "the 'dino' target needs its frozen tower"),
    ({"target": "mlp", "target_vision": "tower"}, "the 'dino' target needs its frozen tower and only it takes one"),
    ({"target": "dino", "target_vision": dino_tower(patch_size=16)}, "its patch grid must be the tube grid"),
    ({"mask_ratio": 0.99}, "mask_ratio=0.99 masks 16 of 16 patches"),
])
def test_bad_configuration_names_the_value_and_the_fix(arguments, says):
    with pytest.raises(ValueError, match=says):
        SIGMA(**arguments)


def test_a_clip_the_encoder_was_not_built_for_is_one_sentence():
    method = tiny_sigma()
    with pytest.raises(ValueError, match="takes up to 4 frames"):
        method.probe_features(torch.randn(1, 3, 3, 32, 32))
