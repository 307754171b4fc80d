"""The video-language family: X-CLIP's cross-frame communication and prompts, HecVL's levels, zero-shot sub-goal
recognition, the pretrained image-CLIP start (tiny towers: 2-block ViT at 32 px, 4 frames)."""

from __future__ import annotations

import pytest
import torch

from tests.test_methods import make_video_batch
from vlp_lightning import catalog
from vlp_lightning.methods import HecVL, XCLIP
from vlp_lightning.methods.video.base import VideoTextMethod
from vlp_lightning.methods.video.xclip import VideoSpecificPrompt


def test_the_index_and_catalogue_name_the_video_family():
    for method in (XCLIP, HecVL):
        entry = catalog.find(method.__name__)
        assert entry.family == "video-language" and entry.view_kind == "clip" and entry.paper.year >= 2022
        assert "video" in entry.required_keys
    assert "segments" in HecVL.required_keys


@pytest.mark.parametrize("method_class, communicates", [(XCLIP, True), (VideoTextMethod, False)])
def test_perturbing_frame_0_reaches_frame_1_only_through_message_tokens(method_class, communicates):
    torch.manual_seed(0)
    method = method_class().eval()
    video = torch.randn(2, 4, 3, 32, 32)
    perturbed = video.clone()
    perturbed[:, 0] += torch.randn_like(perturbed[:, 0])
    with torch.no_grad():
        before, after = method.frame_features(video), method.frame_features(perturbed)
    assert not torch.allclose(before[:, 0], after[:, 0])
    change = (before[:, 1:] - after[:, 1:]).abs().max().item()
    assert change > 1e-5 if communicates else change == 0.0


def test_prompt_generator_starts_at_alpha_and_conditions_each_text_on_each_video():
    torch.manual_seed(0)
    prompts = VideoSpecificPrompt(width=64, layers=2, heads=1, alpha=0.1)
    assert torch.equal(prompts.alpha, torch.full((64,), 0.1))
    assert prompts(torch.randn(2, 3, 64), torch.randn(2, 16, 64)).shape == (2, 3, 64)  # [videos, texts, D]

    method = XCLIP().eval()
    batch = make_video_batch(method, batch_size=3)
    video = batch["video"][:2]
    with torch.no_grad():
        logits = method.video_text_logits(video, batch["text"])
        assert logits.shape == (2, 3)
        method.prompts.alpha.zero_()  # no prompt: the plain two-tower similarities
        plain = method.logit_scale.exp() * method.encode_video(video) @ method.encode_text(batch["text"]).T
        assert torch.allclose(method.video_text_logits(video, batch["text"]), plain, atol=1e-5)
    assert not torch.allclose(logits, plain, atol=1e-4)


def test_hecvl_levels_each_give_a_loss_and_the_total_is_their_weighted_sum():
    torch.manual_seed(0)
    method = HecVL(narration_weight=2.0, summary_weight=0.5, abstract_weight=1.0)
    batch = make_video_batch(method, batch_size=4)
    batch["summaries"] = [[(0, method.num_frames - 1, f"summary {i % 2}")] for i in range(4)]
    outputs = method.forward_loss(batch)
    levels = [outputs[f"{level}_loss"] for level in ("narration", "summary", "abstract")]
    assert all(torch.isfinite(loss) and loss > 0 for loss in levels)
    assert torch.allclose(outputs["loss"], 2.0 * levels[0] + 0.5 * levels[1] + 1.0 * levels[2])
    # separate embedding spaces: each level has its own projections
    heads = [method.projections(level)[0] for level in ("narration", "summary", "abstract")]
    assert len({id(head) for head in heads}) == 3
    del batch["summaries"]
    with pytest.raises(ValueError, match="summary level .* reads `summaries`"):
        method.forward_loss(batch)


COLOURS = {"go to red": (1.0, -1.0, -1.0), "go to green": (-1.0, 1.0, -1.0), "go to blue": (-1.0, -1.0, 1.0),
           "go to white": (1.0, 1.0, 1.0)}


def toy_episodes() -> dict:
    """Eight 4-frame episodes of two sub-goals each (frames 0-1 and 2-3), every frame filled with its sub-goal's
    colour plus noise; the mission names both sub-goals."""
    generator = torch.Generator().manual_seed(0)
    names = list(COLOURS)
    videos, segments, captions = [], [], []
    for index in range(8):
        first, second = names[index % 4], names[(index + 1 + index // 4) % 4]
        frames = [torch.tensor(COLOURS[name]).view(3, 1, 1).expand(3, 32, 32) for name in (first, first, second,
                                                                                          second)]
        videos.append(torch.stack(frames) + 0.3 * torch.randn(4, 3, 32, 32, generator=generator))
        segments.append([(0, 1, first), (2, 3, second)])
        captions.append(f"{first}, then {second}")
    return {"video": torch.stack(videos), "segments": segments, "caption": captions}


def test_zero_shot_sub_goal_recognition_beats_chance_after_a_short_overfit():
    torch.manual_seed(0)
    method = HecVL()
    batch = toy_episodes()
    batch["text"] = method.tokenizer(batch["caption"])
    optimizer = torch.optim.AdamW(method.parameters(), lr=2e-3)
    for _ in range(25):
        loss = method.forward_loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    method.eval()
    names = list(COLOURS)
    with torch.no_grad():
        texts = method.encode_text(method.tokenizer(names))
        spans = [(sample, first, last, text) for sample, spans in enumerate(batch["segments"])
                 for first, last, text in spans]
        videos = torch.cat([method.encode_video(batch["video"][sample:sample + 1, first:last + 1])
                            for sample, first, last, _ in spans])
    predicted = (videos @ texts.T).argmax(dim=1).tolist()
    accuracy = sum(names[p] == text for p, (*_, text) in zip(predicted, spans)) / len(spans)
    assert accuracy >= 0.75, accuracy  # chance: 0.25


def test_xclip_starts_from_an_image_clip_checkpoint(tiny_clip_checkpoint):
    from vlp_lightning.pretrained import load_method

    clip, _ = load_method(tiny_clip_checkpoint)
    method = XCLIP(pretrained_clip=tiny_clip_checkpoint, num_frames=2)
    assert type(method.tokenizer) is type(clip.tokenizer)
    for name, value in clip.vision.state_dict().items():
        assert torch.equal(method.vision.state_dict()[name], value), name
    assert torch.equal(method.text_projection.weight, clip.text_projection.weight)
    assert all(module.training for module in method.modules())  # trained on, not frozen as an adaptation start
    video = torch.randn(2, 2, 3, 32, 32)
    assert method.encode_video(video).shape == (2, clip.text_projection.weight.shape[0])
