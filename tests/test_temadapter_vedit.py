"""Tem-Adapter (frozen CLIP, causal language-guided Temporal Aligner, Semantic Aligner, QA over candidates) and VEDIT
(frozen tower, flow-matching latent predictor, attentive probes); tiny towers: 2-block ViT at 32 px, 4 frames."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.test_methods import make_video_batch
from tests.test_video_methods import toy_episodes
from vlp_lightning import catalog
from vlp_lightning.methods import VEDIT, TemAdapter
from vlp_lightning.methods.video.vedit import AttentiveProbe, flow_matching_pair


def train(method, batch: dict, steps: int, lr: float = 1e-3) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = method.forward_loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_catalogue_names_both_methods_as_clip_methods():
    for method in (TemAdapter, VEDIT):
        entry = catalog.find(method.__name__)
        assert entry.view_kind == "clip" and "video" in entry.required_keys and entry.paper.year >= 2023
    assert "text" in TemAdapter.required_keys and VEDIT.required_keys == ("video",)


@pytest.mark.parametrize("method_class", [TemAdapter, VEDIT])
def test_the_image_tower_is_frozen_and_gets_no_gradient(method_class):
    torch.manual_seed(0)
    method = method_class()
    frozen = {name: value.clone() for name, value in method.vision.state_dict().items()}
    method.train()
    assert not method.vision.training  # locked: its normalisation statistics and dropout stay in eval mode
    train(method, make_video_batch(method), steps=2)
    assert all(not p.requires_grad and p.grad is None for p in method.vision.parameters())
    assert all(torch.equal(value, frozen[name]) for name, value in method.vision.state_dict().items())
    if method_class is TemAdapter:  # the whole CLIP: text tower, projections and temperature too
        clip_parts = [method.text, method.image_projection, method.text_projection]
        assert all(not p.requires_grad for part in clip_parts for p in part.parameters())
        assert not method.logit_scale.requires_grad


def test_temporal_aligner_predicts_frame_t_plus_1_from_frames_up_to_t_only():
    torch.manual_seed(0)
    aligner = TemAdapter().temporal_aligner.eval()
    frames, guidance = torch.randn(2, 6, 64), torch.randn(2, 64)
    changed = 3
    perturbed = frames.clone()
    perturbed[:, changed] += torch.randn(2, 64)
    with torch.no_grad():
        before, after = aligner.predict_next(frames, guidance), aligner.predict_next(perturbed, guidance)
    assert before.shape == (2, 5, 64)  # row t predicts frame t + 1
    assert torch.allclose(before[:, :changed], after[:, :changed], atol=1e-6)  # frames 1 .. 3 from frames <= 2
    assert not torch.allclose(before[:, changed:], after[:, changed:], atol=1e-4)  # later rows read frame 3
    with torch.no_grad():  # and the language guidance steers every prediction
        guided = aligner.predict_next(frames, torch.randn(2, 64))
    assert (guided - before).abs().amax(dim=-1).min() > 1e-4


def test_semantic_aligner_starts_at_clips_text_embedding_and_refines_per_video():
    torch.manual_seed(0)
    aligner = TemAdapter().semantic_aligner.eval()
    assert torch.equal(aligner.gamma, torch.full((64,), 1e-4))
    descriptions, frames = torch.randn(2, 3, 64), torch.randn(2, 4, 64)
    with torch.no_grad():
        refined = aligner(descriptions, frames)
        assert refined.shape == (2, 3, 64) and torch.allclose(refined, descriptions, atol=1e-3)
        aligner.gamma.fill_(1.0)
        one = aligner(descriptions, frames)
        other = aligner(descriptions, frames.flip(0))
    assert not torch.allclose(one, other, atol=1e-4)  # the same texts, refined differently by another video


def test_candidates_come_from_the_batch_captions_or_from_multiple_choice_questions():
    torch.manual_seed(0)
    method = TemAdapter()
    batch = make_video_batch(method, batch_size=4)
    batch["caption"] = ["red apple", "blue car", "red apple", "dog"]
    questions, candidates, answers = method.questions_and_candidates(batch)
    assert candidates[0] == ["red apple", "blue car", "dog"] and answers.tolist() == [0, 1, 0, 2]
    assert questions[0] == "" and method.describe(questions[0], "dog") == "dog"
    assert method.describe("what is it?", "a dog") == "what is it? a dog"

    batch["meta"] = [{"question": f"where does it go {i}?", "candidates": ["left", "right", "up"], "answer": i % 3}
                     for i in range(4)]
    questions, candidates, answers = method.questions_and_candidates(batch)
    assert questions[1] == "where does it go 1?" and candidates[1] == ["left", "right", "up"]
    assert answers.tolist() == [0, 1, 2, 0]
    outputs = method.forward_loss(batch)
    assert outputs["candidates"] == 3 and torch.isfinite(outputs["loss"])
    batch["meta"][0]["candidates"] = ["left", "right"]
    with pytest.raises(ValueError, match=r"same number of candidates .* \[2, 3\]"):
        method.forward_loss(batch)


def test_video_qa_accuracy_beats_chance_and_the_frame_average_after_a_short_overfit():
    """Eight two-colour episodes, eight captions ("go to red, then go to blue"): chance is 1/8, and the frame
    average (the frozen image CLIP's own video embedding) cannot tell red-then-blue from blue-then-red, so it tops
    out at 6/8; the Temporal Aligner's positions can."""
    torch.manual_seed(0)
    method = TemAdapter()
    batch = toy_episodes()
    batch["text"] = method.tokenizer(batch["caption"])
    losses = train(method, batch, steps=24, lr=2e-3)
    assert losses[-1] < losses[0]
    method.eval()
    with torch.no_grad():
        accuracy = method.forward_loss(batch)["qa_accuracy"].item()
        logits = method.video_text_logits(batch["video"], batch["text"])  # zero-shot: the captions as texts
    assert accuracy >= 0.875, accuracy
    assert logits.shape == (8, 8) and (logits.argmax(dim=1) == torch.arange(8)).float().mean() >= 0.875


def test_bad_configurations_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r"template '\{question\}' has no \{answer\}"):
        TemAdapter(template="{question}")
    with pytest.raises(ValueError, match="num_frames must be >= 2, got 1"):
        TemAdapter(num_frames=1)
    with pytest.raises(ValueError, match="masking='past' is not one of"):
        VEDIT(masking="past")
    with pytest.raises(ValueError, match="num_future=4 must leave an observed step: pick 1 .. 3"):
        VEDIT(num_future=4)


def test_flow_matching_input_and_velocity_on_a_hand_built_example():
    clean = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    noise = torch.tensor([[3.0, -1.0], [1.0, 1.0]])
    noisy, velocity = flow_matching_pair(clean, noise, torch.tensor([0.25, 1.0]))
    assert torch.allclose(noisy, torch.tensor([[1.5, 1.25], [1.0, 1.0]]))  # (1 - t) z + t ε; t = 1 is pure noise
    assert torch.allclose(velocity, torch.tensor([[2.0, -3.0], [1.0, 1.0]]))  # ε - z
    assert torch.allclose(noisy[0] - 0.25 * velocity[0], clean[0])  # x_t - t v = z: the one-step estimate


class ExactVelocity(nn.Module):
    """A stand-in predictor that knows the clean steps: the conditional velocity (x_t - z) / t of the straight path."""

    def __init__(self, clean: torch.Tensor) -> None:
        super().__init__()
        self.clean = clean

    def forward(self, x, unseen, time):
        return (x - self.clean) / time.clamp(min=1e-6)[:, None, None], x


def test_forecast_integrates_the_velocity_from_noise_to_the_clean_steps():
    torch.manual_seed(0)
    method = VEDIT(sampling_steps=4).eval()
    video = torch.randn(2, 4, 3, 32, 32)
    clean = method.step_embeddings(video)
    method.predictor = ExactVelocity(clean)
    unseen = torch.tensor([[False, False, False, True], [False, True, True, False]])
    assert torch.allclose(method.forecast(video, unseen), clean, atol=1e-5)


def test_vedit_learns_to_forecast_and_its_probes_classify():
    torch.manual_seed(0)
    steps = ("first", "last")
    method = VEDIT(num_classes=4, step_classes=steps, masking="future")
    assert method.required_keys == ("video", "label", "segments")
    batch = make_video_batch(method)  # segments: the captions' first word, then their last one
    batch["segments"] = [[(0, 1, "first"), (2, 3, "last")] for _ in range(8)]
    outputs = method.forward_loss(batch)
    assert {"flow_matching_loss", "task_loss", "forecast_loss"} <= set(outputs)
    assert torch.allclose(outputs["loss"], outputs["flow_matching_loss"] + outputs["task_loss"]
                          + outputs["forecast_loss"])
    losses = train(method, batch, steps=15, lr=2e-3)
    assert losses[-1] < losses[0]
    method.eval()
    with torch.no_grad():
        assert method.task_logits(batch["video"]).shape == (8, 4)
        assert (method.forecast_logits(batch["video"]).argmax(dim=1) == steps.index("last")).all()
    del batch["label"]
    with pytest.raises(ValueError, match="task probe .* reads `label`"):
        method.forward_loss(batch)


def test_attentive_probe_pools_tokens_to_class_logits():
    torch.manual_seed(0)
    probe = AttentiveProbe(input_width=64, num_classes=5, heads=2)
    tokens = torch.randn(3, 4, 64)
    assert probe(tokens).shape == (3, 5)
    mask = torch.tensor([[True, True, False, False]] * 3)
    assert torch.allclose(probe(tokens, mask), probe(tokens[:, :2]), atol=1e-6)  # pools the chosen tokens only
    method = VEDIT().eval()
    with torch.no_grad():
        assert method.probe_features(torch.randn(3, 4, 3, 32, 32)).shape == (3, 64)


@pytest.mark.parametrize("method_class", [TemAdapter, VEDIT])
def test_starts_from_a_clip_checkpoint_with_its_tower_frozen(method_class, tiny_clip_checkpoint):
    from vlp_lightning.pretrained import load_method

    clip, _ = load_method(tiny_clip_checkpoint)
    method = method_class(pretrained_clip=tiny_clip_checkpoint, num_frames=3)
    for name, value in clip.vision.state_dict().items():
        assert torch.equal(method.vision.state_dict()[name], value), name
    assert not any(p.requires_grad for p in method.vision.parameters())
    video = torch.randn(2, 3, 3, clip.vision.img_size, clip.vision.img_size)
    assert torch.isfinite(method.probe_features(video)).all()
