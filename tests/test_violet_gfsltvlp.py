"""VIOLET's visual tokens, masks and matching candidates; GFSLT-VLP's sentence noise, its two stages and its
translations (tiny towers: 2-block ViT at 32 px, 4 or 8 frames)."""

from __future__ import annotations

import pytest
import torch

from tests.test_methods import make_video_batch
from vlp_lightning import catalog
from vlp_lightning.callbacks.captioning import caption_metrics
from vlp_lightning.methods import GFSLTVLP, VIOLET
from vlp_lightning.methods.video.gfsltvlp import omit_last
from vlp_lightning.methods.video.violet import blockwise_mask, draw_matching_candidates, kmeans
from vlp_lightning.modules import VisionEncoder
from vlp_lightning.modules.masking import patchify


def test_the_catalogue_names_both_methods_in_the_video_family():
    for method in (VIOLET, GFSLTVLP):
        entry = catalog.find(method.__name__)
        assert entry.family == "video-language" and entry.view_kind == "clip"
        assert {"video", "text"} <= set(entry.required_keys)


# ---------------------------------------------------------------------------------------------------- VIOLET
def test_kmeans_finds_separated_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([centre + 0.1 * torch.randn(50, 2) for centre in centres])
    found = kmeans(points, 3, iterations=10, generator=torch.Generator().manual_seed(0))
    assert torch.cdist(centres, found).min(dim=1).values.max() < 0.2


def test_mvm_targets_are_the_kmeans_codes_of_the_masked_patches_only():
    torch.manual_seed(0)
    method = VIOLET()
    video = make_video_batch(method)["video"]                                   # [8, 4, 3, 32, 32]
    assert not bool(method.codebook_fitted)
    codes = method.visual_tokens(video)                                         # fits on this first batch
    assert bool(method.codebook_fitted) and codes.shape == (8, 4, 16)
    patches = patchify(video.flatten(0, 1), 8).view(8, 4, 16, -1)
    assert torch.equal(codes, torch.cdist(patches.flatten(0, 2), method.codebook).argmin(1).view(8, 4, 16))
    assert codes.unique().numel() > 4  # the codebook is used, not collapsed
    fitted = method.codebook.clone()
    method.visual_tokens(torch.randn_like(video))
    assert torch.equal(method.codebook, fitted)  # fitted once, then frozen
    mask = blockwise_mask(8, 4, 4, 4).flatten(2)
    states = torch.randn(8, 4, 16, 64)
    loss, _ = method.masked_visual_token_loss(states, codes, mask)
    other_visible = torch.where(mask, codes, (codes + 1) % method.codebook_size)
    assert torch.equal(method.masked_visual_token_loss(states, other_visible, mask)[0], loss)
    other_masked = torch.where(mask, (codes + 1) % method.codebook_size, codes)
    assert not torch.equal(method.masked_visual_token_loss(states, other_masked, mask)[0], loss)


def test_the_codebook_waits_for_its_batches_and_mvm_is_zero_until_then():
    torch.manual_seed(0)
    method = VIOLET(codebook_batches=2)
    batch = make_video_batch(method)
    assert method.eval().visual_tokens(batch["video"]) is None  # validation never fits it
    method.train()
    first = method.forward_loss(batch)
    assert first["mvm"] == 0 and not bool(method.codebook_fitted)
    second = method.forward_loss(make_video_batch(method, seed=1))
    assert bool(method.codebook_fitted) and second["mvm"] > 0


def test_blockwise_mask_masks_blocks_of_every_clip_but_never_whole_frames():
    torch.manual_seed(0)
    mask = blockwise_mask(16, 4, 6, 6)
    assert mask.shape == (16, 4, 6, 6) and mask.dtype == torch.bool
    assert mask.flatten(1).any(dim=1).all()
    assert not mask.flatten(2).all(dim=2).any()  # each block is under 2/3 of the grid's side


def test_mlm_masks_only_text_tokens_and_mvm_only_the_masked_patches():
    torch.manual_seed(0)
    method = VIOLET()
    batch = make_video_batch(method)
    text = method.tokenizer(["a grinning face emoji moving left then up"] * 8)
    masked, labels = method.mask_text(text)
    changed = masked != text["input_ids"]
    real = text["attention_mask"].bool() & ~torch.isin(text["input_ids"], torch.tensor(
        method.specials.special_token_ids))
    assert changed.any() and not (changed & ~real).any() and not ((labels != -100) & ~real).any()
    mask = blockwise_mask(8, 4, 4, 4).flatten(2)
    video = batch["video"]
    hidden = patchify(method.mask_video(video, mask).flatten(0, 1), 8).view(8, 4, 16, -1)
    original = patchify(video.flatten(0, 1), 8).view(8, 4, 16, -1)
    assert (hidden[mask] == 0).all() and torch.equal(hidden[~mask], original[~mask])


def test_vtm_candidates_put_the_positive_first_and_prefer_other_captions():
    torch.manual_seed(0)
    captions = ["red ball", "red ball", "blue key", "green box", "grey door"]
    candidates = draw_matching_candidates(captions, 4)
    assert candidates.shape == (5, 4) and torch.equal(candidates[:, 0], torch.arange(5))  # the VTM label is 0
    for row, picks in enumerate(candidates.tolist()):
        negatives = picks[1:]
        assert row not in negatives and len(set(negatives)) == 3
        assert all(captions[index] != captions[row] for index in negatives)  # 3 other captions exist for all rows


def test_vtm_scores_pairs_and_its_loss_is_a_ranking_with_the_positive_first():
    torch.manual_seed(0)
    method = VIOLET()
    batch = make_video_batch(method)
    method.eval()
    pairs = method.match_scores(batch["video"], batch["text"])
    assert pairs.shape == (8,)
    # every (video, text) pair by the same head, in chunks: its diagonal is match_scores, row i's column j the pair
    everything = method.video_text_logits(batch["video"], batch["text"], chunk=5)
    assert everything.shape == (8, 8) and torch.allclose(everything.diagonal(), pairs, atol=1e-5)
    shifted = {key: value.roll(1, 0) for key, value in batch["text"].items()}
    assert torch.allclose(everything.roll(1, 1).diagonal(), method.match_scores(batch["video"], shifted),
                          atol=1e-5)
    method.train()
    outputs = method.forward_loss(batch)
    assert 0 <= outputs["vtm_accuracy"] <= 1 and outputs["vtm"] > 0


def test_violet_bad_configs_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match="matching_candidates=1.*2 or more"):
        VIOLET(matching_candidates=1)
    with pytest.raises(ValueError, match="not a ResNet.*vit_"):
        VIOLET(vision=VisionEncoder("resnet18", img_size=32))
    with pytest.raises(ValueError, match="codebook_batches=0"):
        VIOLET(codebook_batches=0)


# ---------------------------------------------------------------------------------------------------- GFSLT-VLP
def test_omit_last_masks_the_end_of_each_sentence_only():
    torch.manual_seed(0)
    method = GFSLTVLP()
    text = method.tokenizer(["go to the red ball", "open the blue door and pick up the key"])
    specials = method.specials
    masked = omit_last(text["input_ids"], text["attention_mask"], specials.mask_token_id,
                       specials.special_token_ids, noise_rate=0.9)
    eligible = text["attention_mask"].bool() & ~torch.isin(text["input_ids"], torch.tensor(
        specials.special_token_ids))
    for row in range(2):
        hidden = (masked[row] == specials.mask_token_id).nonzero().flatten()
        positions = eligible[row].nonzero().flatten()
        assert 1 <= len(hidden) <= len(positions)
        assert torch.equal(hidden, positions[len(positions) - len(hidden):])  # a suffix of the real tokens
    assert torch.equal(masked[masked != specials.mask_token_id],
                       text["input_ids"][masked != specials.mask_token_id])


def test_stage_1_losses_train_disjoint_parts():
    """E_t learns from the contrast only, D from the reconstruction only (official: E_t encodes ŷ without grad)."""
    torch.manual_seed(0)
    method = GFSLTVLP()
    batch = make_video_batch(method)
    with torch.no_grad():
        states = method.text.encode(method.mask_sentence(batch["text"]))[1]
    method.decoder_loss(states, batch["text"]).backward()
    assert all(param.grad is None for param in method.text.parameters())
    assert all(param.grad is None for param in method.vision.parameters())
    assert any(param.grad is not None for param in method.decoder.parameters())
    method.zero_grad(set_to_none=True)
    video, text = method.encode_video(batch["video"]), method.encode_text(batch["text"])
    method.contrastive_loss(video, text, batch["caption"]).backward()
    assert all(param.grad is None for param in method.decoder.parameters())
    assert any(param.grad is not None for param in method.text.parameters())


def test_stage_2_inherits_stage_1s_visual_encoder_and_decoder_exactly(tmp_path):
    torch.manual_seed(0)
    stage1 = GFSLTVLP(stage=1)
    optimizer = torch.optim.AdamW([p for p in stage1.parameters() if p.requires_grad], lr=1e-3)
    batch = make_video_batch(stage1)
    for _ in range(2):  # move the weights away from their initialisation
        optimizer.zero_grad()
        stage1.forward_loss(batch)["loss"].backward()
        optimizer.step()
    path = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": stage1.state_dict(), "vlp": {"method": "vlp_lightning.methods.video.gfsltvlp.GFSLTVLP"}},
               path)
    torch.manual_seed(1)
    stage2 = GFSLTVLP(stage=2, start_from=str(path))
    inherited = ("vision", "temporal_conv", "visual_blocks", "visual_positions", "visual_norm", "decoder")
    stage1_weights = stage1.state_dict()
    for name, value in stage2.state_dict().items():
        if name.startswith(inherited):
            assert torch.equal(value, stage1_weights[name]), name
    trainable = {name.split(".")[0] for name, param in stage2.named_parameters() if param.requires_grad}
    assert {"vision", "temporal_conv", "sign_projection", "sign_norm", "visual_blocks", "decoder"} <= trainable
    assert not trainable & {"text", "video_projection", "logit_scale", "visual_class_token"}
    with pytest.raises(ValueError, match="is not a file.*babyai_stage1_tiny"):
        GFSLTVLP(stage=2, start_from=str(tmp_path / "missing.ckpt"))


def test_stage_2_translation_loss_falls_and_decodes_one_text_per_clip():
    torch.manual_seed(0)
    method = GFSLTVLP(stage=2)
    batch = make_video_batch(method)
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(8):
        loss = method.forward_loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    translations = method.eval().generate_captions(batch["video"], max_length=5)
    assert len(translations) == 8 and all(isinstance(text, str) for text in translations)


@pytest.mark.slow
def test_greedy_translation_after_a_short_overfit_reproduces_the_sentences():
    torch.manual_seed(0)
    sentences = ["go to the red ball", "open the blue door", "go to the red ball", "pick up a key"]
    method = GFSLTVLP(stage=2)
    video = torch.randn(4, 8, 3, 32, 32)
    text = method.tokenizer(sentences)
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=5e-3)
    method.train()
    losses = []
    for _ in range(50):
        loss = method.forward_loss({"video": video, "text": text, "caption": sentences})["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses[::10]
    method.eval()
    translations = method.generate_captions(video)
    references = [[sentence] for sentence in sentences]
    scores = caption_metrics(translations, references)
    assert scores["exact_match"] >= 0.75, translations
    assert scores["BLEU-4"] > caption_metrics(["the"] * 4, references)["BLEU-4"] + 0.5
    assert len(method.generate_captions(video, beam_size=2)) == 4


def test_gfsltvlp_bad_configs_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match="stage=3"):
        GFSLTVLP(stage=3)
    with pytest.raises(ValueError, match="noise='words'"):
        GFSLTVLP(noise="words")
    with pytest.raises(ValueError, match="stage 1 trains no translator.*stage: 2"):
        GFSLTVLP(stage=1).generate_captions(torch.randn(1, 8, 3, 32, 32))
    method = GFSLTVLP(num_frames=4)
    with pytest.raises(ValueError, match="position embeddings for 5.*larger num_frames"):
        method.encode_video(torch.randn(1, 32, 3, 32, 32))
