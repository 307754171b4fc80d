"""Fusion layers, the text-fusion transformer, generation, and the fusion / captioning methods' own mechanisms."""

from __future__ import annotations

import math

import pytest
import torch

from vlp_lightning.modules.fusion import AttentionalPooler, FusionBlock, FusionTextTransformer
from vlp_lightning.modules.generation import generate


def test_a_gated_block_starts_as_the_text_only_block():
    torch.manual_seed(0)
    gated = FusionBlock(16, 2, cross_attention=True, memory_width=8, gated=True)
    plain = FusionBlock(16, 2)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if k in plain.state_dict()})
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 3, 8)
    torch.testing.assert_close(gated(x, memory=memory), plain(x))
    torch.testing.assert_close(gated(x), plain(x))  # no image tokens: fusion switched off (FIBER's ITC)
    with torch.no_grad():
        gated.gate.fill_(1.0)
    assert not torch.allclose(gated(x, memory=memory), plain(x))  # the gate opens the image path


def test_cross_attention_without_memory_is_one_sentence():
    with pytest.raises(ValueError, match="ungated cross-attention needs image tokens"):
        FusionBlock(16, 2, cross_attention=True)(torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match="set cross_attention=True"):
        FusionBlock(16, 2, gated=True)


def _text(ids: list[list[int]], length: int) -> dict[str, torch.Tensor]:
    input_ids = torch.zeros(len(ids), length, dtype=torch.long)
    mask = torch.zeros(len(ids), length, dtype=torch.long)
    for row, tokens in enumerate(ids):
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


@pytest.mark.parametrize("causal,class_token", [(False, False), (True, True)])
def test_padding_never_changes_the_real_tokens_or_the_pooled_feature(causal, class_token):
    torch.manual_seed(0)
    model = FusionTextTransformer(20, context_length=12, width=16, heads=2, causal=causal, class_token=class_token)
    model.eval()
    memory = torch.randn(1, 4, 16)
    short, long = _text([[1, 5, 6, 2]], 4), _text([[1, 5, 6, 2]], 12)
    long["input_ids"][0, 4:] = 7  # padding ids that are real tokens elsewhere must not leak in
    pooled_short, states_short, mask_short = model.encode(short)
    pooled_long, states_long, mask_long = model.encode(long)
    torch.testing.assert_close(pooled_short, pooled_long)
    torch.testing.assert_close(states_short, states_long[:, :4])
    fused_short = model.fuse(states_short, mask_short, memory)
    torch.testing.assert_close(fused_short, model.fuse(states_long, mask_long, memory)[:, :4])


def test_a_causal_decoder_never_sees_the_future():
    torch.manual_seed(0)
    model = FusionTextTransformer(20, context_length=8, width=16, heads=2, causal=True).eval()
    memory = torch.randn(1, 4, 16)
    a, b = _text([[1, 3, 4, 5]], 4), _text([[1, 3, 9, 9]], 4)
    torch.testing.assert_close(model(a, memory)[:, :2], model(b, memory)[:, :2])
    assert not torch.allclose(model(a, memory)[:, 3], model(b, memory)[:, 3])


def test_too_long_text_is_one_sentence():
    model = FusionTextTransformer(20, context_length=4, width=16, heads=2)
    with pytest.raises(ValueError, match="longer than the context length 4"):
        model.encode(_text([[1, 2, 3, 4, 5]], 5))


def test_attentional_pooler_gives_its_queries():
    pooler = AttentionalPooler(16, 8, n_queries=3, heads=2)
    assert pooler(torch.randn(2, 5, 8)).shape == (2, 3, 16)


# ---------------------------------------------------------------------------------------------------- generation
START, STOP = 0, 4
#: next-token probabilities of a toy decoder after the last token: greedy takes 1 (0.5), then 3 (0.6), then stops:
#: 0.3 in all; the beam finds 2 (0.4) then the stop (0.9): 0.36.
TABLE = {
    START: [0.0, 0.5, 0.4, 0.0, 0.1],
    1: [0.0, 0.0, 0.0, 0.6, 0.4],
    2: [0.0, 0.0, 0.0, 0.1, 0.9],
    3: [0.0, 0.0, 0.0, 0.0, 1.0],
}


def toy_decoder(calls: list[int] | None = None):
    def next_token_logits(prefixes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(prefixes.shape[1])
        probabilities = torch.tensor([TABLE.get(int(last), [0.0, 0.0, 0.0, 0.0, 1.0]) for last in prefixes[:, -1]])
        return (probabilities + 1e-9).log()

    return next_token_logits


def test_greedy_follows_the_most_likely_token_and_stops_at_the_stop_token():
    out = generate(toy_decoder(), 2, start_token_id=START, stop_token_id=STOP, max_length=10)
    assert out == [[1, 3], [1, 3]]  # the stop token ends the caption and is not part of it


def test_beam_search_finds_the_likelier_sequence_greedy_misses():
    greedy = generate(toy_decoder(), 1, start_token_id=START, stop_token_id=STOP, max_length=10)[0]
    beam = generate(toy_decoder(), 1, start_token_id=START, stop_token_id=STOP, max_length=10, beam_size=3)[0]

    def probability(tokens: list[int]) -> float:
        previous, total = START, 1.0
        for token in [*tokens, STOP]:
            total *= TABLE.get(previous, [0, 0, 0, 0, 1])[token]
            previous = token
        return total

    assert beam == [2] and greedy == [1, 3]
    assert probability(beam) > probability(greedy)


def test_generation_respects_the_length_limit_and_ends_when_all_stopped():
    def never_stop(prefixes, rows):
        logits = torch.zeros(prefixes.shape[0], 5)
        logits[:, 3] = 10.0
        return logits

    assert generate(never_stop, 3, start_token_id=START, stop_token_id=STOP, max_length=6) == [[3] * 6] * 3
    calls: list[int] = []
    generate(toy_decoder(calls), 1, start_token_id=START, stop_token_id=STOP, max_length=50, beam_size=2)
    assert len(calls) < 50  # stopped once every beam had ended
    with pytest.raises(ValueError, match="max_length"):
        generate(never_stop, 1, start_token_id=START, stop_token_id=STOP, max_length=0)


def test_min_length_forbids_stopping_early():
    def stop_at_once(prefixes, rows):
        logits = torch.zeros(prefixes.shape[0], 5)
        logits[:, STOP] = 10.0
        logits[:, 2] = 5.0
        return logits

    assert generate(stop_at_once, 1, start_token_id=START, stop_token_id=STOP, max_length=5) == [[]]
    assert generate(stop_at_once, 1, start_token_id=START, stop_token_id=STOP, max_length=5, min_length=2) == [[2, 2]]


def test_logits_processors_apply_before_the_choice():
    def ban_one(prefixes, logits):
        logits[:, 1] = -math.inf
        return logits

    out = generate(toy_decoder(), 1, start_token_id=START, stop_token_id=STOP, max_length=5,
                   logits_processors=[ban_one])
    assert out == [[2]]


# ---------------------------------------------------------------------------------------------------- methods
def overfit(method, batch: dict, steps: int, lr: float = 3e-3) -> None:
    """`steps` AdamW steps of the method's whole loss on one fixed batch."""
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = method.forward_loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _fit(method, batches, steps: int, tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(method, train_dataloaders=DataLoader(batches, batch_size=None))
    return trainer


def test_albef_enqueues_momentum_features_clamps_temperature_and_moves_its_momentum_model(tmp_path):
    from test_methods import make_batch
    from vlp_lightning.methods import ALBEF

    torch.manual_seed(0)
    method = ALBEF(lr_scheduler=None, momentum=0.5)
    with torch.no_grad():
        method.temperature.fill_(0.9)  # above ALBEF's cap of 0.5
    initial_teacher = {k: v.clone() for k, v in method.text_m.state_dict().items()}
    initial_queue = method.text_queue.bank.clone()
    _fit(method, [make_batch(method, seed=i) for i in range(2)], 2, tmp_path)
    assert int(method.image_queue.pointer) == int(method.text_queue.pointer) == 16  # 2 steps x 8 pairs
    assert not torch.equal(method.text_queue.bank[:16], initial_queue[:16])
    torch.testing.assert_close(method.text_queue.bank[16:], initial_queue[16:])
    assert 0.001 <= float(method.temperature) <= 0.5
    assert any(not torch.equal(v, initial_teacher[k]) for k, v in method.text_m.state_dict().items())
    assert not any(p.requires_grad for p in method.text_m.parameters())


def test_albef_match_scores_rank_its_own_pair_first_after_training():
    """ITM learns on a fixed batch: each image's own caption scores above the hard negatives it was trained on."""
    from vlp_lightning.methods import ALBEF

    torch.manual_seed(0)
    method = ALBEF(lr_scheduler=None)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batch = {"image": images, "text": method.tokenizer(["red apple", "blue car", "green tree", "cat face"]),
             "__key__": ["a", "b", "c", "d"]}
    overfit(method, batch, steps=40)
    method.eval()
    images, text = batch["image"], batch["text"]
    scores = torch.stack([method.match_scores(images, {k: v.roll(shift, 0) for k, v in text.items()})
                          for shift in range(4)], dim=1)  # [4 images, 4 shifts]: column 0 the own caption
    assert (scores.argmax(dim=1) == 0).float().mean() >= 0.75, scores


def test_reranking_moves_the_ground_truth_only_within_the_top_k():
    from vlp_lightning.callbacks.retrieval import reranked_ranks

    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.9, 0.8, 0.7, 0.1]])  # the truth: candidate 2, then 3
    own = [torch.tensor(2), torch.tensor(3)]

    def is_own(query, candidates):
        return candidates == own[query]

    def match(query, candidates):
        return (candidates == own[query]).float()  # a perfect matching head

    assert reranked_ranks(scores, is_own, match, top_k=3).tolist() == [0, 3]  # 3 is outside the top 3: kept
    assert reranked_ranks(scores, is_own, lambda q, c: -c.float(), top_k=3).tolist() == [2, 3]


def test_coca_learns_to_caption_and_generates_the_caption(tmp_path):
    """Overfitting two images with two captions: greedy and beam decoding give back each image's caption."""
    from vlp_lightning.methods import CoCa

    torch.manual_seed(0)
    method = CoCa(lr_scheduler=None)
    images = torch.stack([torch.full((3, 32, 32), -1.0), torch.full((3, 32, 32), 1.0)])
    captions = ["red apple", "blue car"]
    batch = {"image": images, "text": method.tokenizer(captions)}
    overfit(method, batch, steps=60)
    method.eval()
    assert method.generate_captions(images) == captions
    assert method.generate_captions(images, beam_size=3) == captions
    assert all(len(caption) <= 5 for caption in method.generate_captions(images, max_length=5))


def test_coca_caption_loss_ignores_padding():
    from vlp_lightning.methods import CoCa

    torch.manual_seed(0)
    method = CoCa().eval()
    images = torch.randn(2, 3, 32, 32)
    text = method.tokenizer(["cat", "a dog"])
    other = {k: v.clone() for k, v in text.items()}
    other["input_ids"][other["attention_mask"] == 0] = 99  # different ids where the mask says padding
    first = method.forward_loss({"image": images, "text": text})
    second = method.forward_loss({"image": images, "text": other})
    torch.testing.assert_close(first["caption"], second["caption"])
    torch.testing.assert_close(first["contrastive"], second["contrastive"])


def test_vlp_test_on_coca_prints_caption_metrics(make_shards, tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from vlp_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    shards = make_shards(tmp_path / "shards", n=16, per_shard=16, image_size=32)
    recipe = Path(__file__).parents[1] / "experiments/coca/emoji_tiny.yaml"
    common = ["--config", str(recipe), "--data.train_shards", shards.pattern, "--data.val_shards", "null",
              "--data.test_shards", shards.pattern, "--data.batch_size", "8", "--data.num_workers", "0",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--trainer.callbacks", "[]", "--trainer.callbacks+=vlp_lightning.callbacks.CaptionMetrics",
              "--trainer.callbacks.shards", shards.pattern, "--trainer.callbacks.name", "generated",
              "--trainer.callbacks.every_n_epochs", "0", "--model.init_args.vision.init_args.img_size", "32",
              "--model.init_args.vision.init_args.depth", "1"]
    main(["fit", *common, "--trainer.max_steps", "2"])
    (checkpoint,) = (tmp_path / "runs").glob("*/*/checkpoints/last.ckpt")
    main(["test", *common, "--ckpt_path", str(checkpoint)])
    out = capsys.readouterr()
    printed = out.out + out.err
    for metric in ("captions/generated/BLEU-4", "captions/generated/ROUGE-L", "captions/generated/CIDEr"):
        assert metric in printed


def test_fiber_starts_as_two_separate_encoders_and_its_gates_open_with_training():
    """FIBER's gates α are 0 at init: fusion on equals fusion off (a dual encoder) until training moves them."""
    from test_methods import make_batch
    from vlp_lightning.methods import FIBER

    torch.manual_seed(0)
    method = FIBER(lr_scheduler=None)
    batch = make_batch(method, batch_size=4)
    padding = batch["text"]["attention_mask"]

    def both_ways():
        image = method.image_bottom(batch["image"])
        _, states, mask = method.text.encode(batch["text"])
        return (method.top_layers(image, states, mask, padding, fuse=True),
                method.top_layers(image, states, mask, padding, fuse=False))

    fused, unfused = both_ways()
    torch.testing.assert_close(fused, unfused)
    overfit(method, batch, steps=3, lr=1e-2)
    assert all(float(cross.gate) != 0 for cross in method.image_cross)
    fused, unfused = both_ways()
    assert not torch.allclose(fused[0], unfused[0]) and not torch.allclose(fused[1], unfused[1])


def test_fiber_trains_its_new_modules_at_their_own_learning_rate():
    from vlp_lightning.methods import FIBER

    method = FIBER(new_module_lr=5e-5)
    groups = method.parameter_groups()
    fast = {id(p) for group in groups if group.get("lr") == 5e-5 for p in group["params"]}
    assert {id(p) for p in method.itm_head.parameters()} <= fast
    assert {id(p) for p in method.image_cross.parameters()} <= fast
    assert id(method.text.fusion_blocks[0].gate) in fast
    assert not {id(p) for p in method.vision.parameters()} & fast
    assert not {id(p) for p in method.text.fusion_blocks[0].attn.parameters()} & fast  # the backbone's own layer
    assert sum(len(group["params"]) for group in groups) == sum(1 for p in method.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="fusion_layers=3"):
        FIBER(fusion_layers=3)

