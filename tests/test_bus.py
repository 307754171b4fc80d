"""BUS (Jiang et al. 2023): the text-aware patch selector inside the ViT, the patch abstraction decoder's summary,
the four losses on a fixed batch and caption generation."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import Block

from vlp_lightning.methods import BUS
from vlp_lightning.methods.fusion.bus import TextSemanticsPatchSelector


def identity_selector(width: int, keep_ratio: float) -> tuple[TextSemanticsPatchSelector, Block]:
    """A selector whose guide is LayerNorm(text [CLS]) and a one-head block whose query and key are LayerNorm(x):
    a patch scores highest exactly when it points the way the text does."""
    selector = TextSemanticsPatchSelector(width, width, keep_ratio)
    block = Block(width, num_heads=1, qkv_bias=False)
    with torch.no_grad():
        selector.guide[1].weight.copy_(torch.eye(width))
        selector.guide[1].bias.zero_()
        block.attn.qkv.weight.copy_(torch.eye(width).repeat(3, 1))
    return selector, block


def test_selector_keeps_the_configured_number_of_patches_the_text_attends_to_most():
    torch.manual_seed(0)
    width, patches = 8, 16
    selector, block = identity_selector(width, keep_ratio=0.25)
    texts = torch.randn(2, width)
    planted = [[2, 5, 11, 14], [0, 3, 7, 9]]  # the patches that are (scaled copies of) each text
    tokens = torch.randn(1, 1 + patches, width).repeat(2, 1, 1)
    for text, indices in zip(texts, planted):
        tokens[:, 1 + torch.tensor(indices)] = 3.0 * text
    reduced, kept = selector(block, tokens, texts, prefix=1)
    assert selector.kept(patches) == 4 and kept.shape == (2, 4)
    assert kept.tolist() == planted  # each text keeps its own patches, in image order
    assert reduced.shape == (2, 1 + 4 + 1, width)  # [CLS], the kept patches, one token fusing the other 12
    torch.testing.assert_close(reduced[:, 1:5], tokens[:, 1:][torch.arange(2)[:, None], kept])
    scores = selector.scores(block, tokens, selector.guide(texts), prefix=1)
    dropped = torch.ones(2, patches, dtype=torch.bool).scatter(1, kept, False)
    weights = scores * dropped / (scores * dropped).sum(1, keepdim=True)
    torch.testing.assert_close(reduced[:, -1], (weights[..., None] * tokens[:, 1:]).sum(1))
    everything, _ = TextSemanticsPatchSelector(width, width, keep_ratio=1.0)(block, tokens, texts, prefix=1)
    assert everything.shape == tokens.shape  # nothing dropped: no fused token


def test_summary_has_n_queries_tokens_whatever_text_selects():
    torch.manual_seed(0)
    method = BUS(n_queries=6, keep_ratio=0.25).eval()
    images = torch.randn(3, 3, 32, 32)
    text = method.tokenizer(["red apple", "blue car", "a green tree"])
    with torch.no_grad():
        patches = method.patch_tokens(images)  # 4 x 4 patches of 8 px and the [CLS]
        tokens, summary = method.summarise(patches)
        states = method.text.encode(text)[1]
        memory = method.fusion_memory(patches, states)
    assert patches.shape == (3, 17, 64) and tokens.shape == (3, 1 + 4 + 1, 64)
    assert summary.shape == memory.shape == method.caption_memory(images).shape == (3, 6, 64)
    assert not torch.allclose(summary, memory)  # the text, not the image [CLS], chose the patches
    assert method.match_scores(images, text).shape == (3,)


def test_loss_and_its_captioning_term_fall_on_a_fixed_batch():
    torch.manual_seed(0)
    method = BUS(lr_scheduler=None)
    images = torch.stack([torch.full((3, 32, 32), -1.0), torch.full((3, 32, 32), 1.0)]).repeat(2, 1, 1, 1)
    batch = {"image": images, "text": method.tokenizer(["red apple", "blue car"] * 2), "__key__": ["a", "b"] * 2}
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for _ in range(15):
        torch.manual_seed(0)
        outputs = method.forward_loss(batch)
        optimizer.zero_grad()
        outputs["loss"].backward()
        optimizer.step()
        history.append({name: float(outputs[name]) for name in ("loss", "caption")})
    assert history[-1]["loss"] < 0.8 * history[0]["loss"], history
    assert history[-1]["caption"] < 0.5 * history[0]["caption"], history
    method.eval()
    captions = method.generate_captions(images[:2], max_length=8)
    assert len(captions) == 2 and all(isinstance(caption, str) for caption in captions)
    assert all(isinstance(caption, str) for caption in method.generate_captions(images[:2], beam_size=2))


@pytest.mark.parametrize(("arguments", "message"), [
    ({"select_layer": 2}, "select_layer 2 is not a block"),
    ({"keep_ratio": 0.0}, "keep_ratio is the fraction"),
    ({"n_queries": 0}, "at least one query"),
])
def test_bad_configurations_are_one_sentence_naming_the_fix(arguments, message):
    with pytest.raises(ValueError, match=message):
        BUS(**arguments)
