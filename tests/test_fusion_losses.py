"""Fusion-encoder losses (ALBEF / CoCa): hard-negative sampling, BERT masking, MLM / ITC / ITM / captioning losses.

Sampling statistics use large batches so that the tolerances are several standard deviations wide; every draw
comes from a seeded generator, so the tests are deterministic.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlp_lightning.losses.contrastive import clip_contrastive_loss
from vlp_lightning.losses.fusion import (
    caption_loss,
    distilled_contrastive_loss,
    itm_loss,
    mask_tokens,
    mlm_loss,
    momentum_targets,
    sample_hard_negatives,
)

PAD, CLS, SEP, MASK = 0, 101, 102, 103
SPECIALS = (PAD, CLS, SEP, MASK)
VOCAB = 1000


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draws(similarity: torch.Tensor, row_ids: torch.Tensor, column_ids: torch.Tensor, repeats: int) -> torch.Tensor:
    """[repeats, B] negatives: the rows tiled `repeats` times and sampled in one call."""
    negatives = sample_hard_negatives(
        similarity.repeat(repeats, 1), row_ids.repeat(repeats), column_ids, generator=generator()
    )
    return negatives.view(repeats, -1)


# ---------------------------------------------------------------- hard negatives


def test_hard_negatives_never_pick_the_positive_or_a_same_image_duplicate() -> None:
    ids = torch.tensor([0, 1, 2, 3, 3, 4, 5, 0])  # images 0 and 3 appear twice in the batch
    similarity = torch.randn(8, 8, generator=generator(1)) * 3 + 5 * torch.eye(8)
    negatives = draws(similarity, ids, ids, repeats=2000)
    assert (ids[negatives] != ids).all()
    assert negatives.unique().numel() == 8  # every column is reachable from some row


def test_hard_negatives_follow_the_softmax_over_the_other_columns() -> None:
    similarity = torch.tensor([[9.0, 3.0, 0.0, 1.0], [0.0, 9.0, -2.0, 2.0]])  # column 0 / 1 is each row's positive
    ids = torch.arange(4)
    negatives = draws(similarity, ids[:2], ids, repeats=8000)
    for row in range(2):
        others = [k for k in range(4) if k != row]
        expected = torch.softmax(similarity[row, others], dim=0)
        observed = torch.stack([(negatives[:, row] == k).float().mean() for k in others])
        assert torch.allclose(observed, expected, atol=0.02), (row, observed, expected)
    assert (negatives[:, 0] == 1).float().mean() > 0.8  # the hardest negative dominates


def test_hard_negatives_survive_nan_and_inf() -> None:
    nan, inf = float("nan"), float("inf")
    similarity = torch.tensor(
        [
            [1.0, nan, inf, 0.5, -inf],  # finite candidates: columns 3 (and 0 is the positive)
            [nan, nan, nan, nan, nan],  # nothing finite: uniform over columns 0, 2, 3, 4
            [inf, -inf, nan, inf, inf],  # only non-finite: uniform over columns 0, 1, 3, 4
        ]
    )
    ids = torch.arange(5)
    negatives = draws(similarity, ids[:3], ids, repeats=4000)
    assert (negatives[:, 0] == 3).all()
    for row in (1, 2):
        others = [k for k in range(5) if k != row]
        assert (negatives[:, row] != row).all()
        frequencies = torch.stack([(negatives[:, row] == k).float().mean() for k in others])
        assert torch.allclose(frequencies, torch.full((4,), 0.25), atol=0.03), (row, frequencies)


def test_hard_negatives_raise_when_the_batch_is_all_one_image() -> None:
    ids = torch.tensor([7, 7, 7, 7])
    with pytest.raises(ValueError, match="same image.*larger or shuffled batch"):
        sample_hard_negatives(torch.randn(4, 4), ids, ids)
    with pytest.raises(ValueError, match="Row 1"):  # one row whose only other column is its duplicate
        sample_hard_negatives(torch.randn(2, 2), torch.tensor([0, 5]), torch.tensor([5, 5]))


def test_hard_negatives_on_a_gathered_batch() -> None:
    """Rank 1 of 2 with a local batch of 4: rows are global samples 4..7, columns the gathered 8, and the image of
    local row 0 also sits on rank 0 (column 2)."""
    column_ids = torch.tensor([10, 11, 14, 13, 14, 15, 16, 17])
    row_ids = column_ids[4:]
    similarity = torch.randn(4, 8, generator=generator(2))
    negatives = draws(similarity, row_ids, column_ids, repeats=2000)
    assert negatives.shape == (2000, 4) and negatives.dtype == torch.long
    assert (column_ids[negatives] != row_ids).all()  # never the positive 4 + i, nor column 2 for row 0
    assert (negatives[:, 0] != 2).all() and (negatives < 4).any()  # other ranks' columns are drawn


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hard_negatives_accept_half_precision_and_compute_in_fp32(dtype: torch.dtype) -> None:
    """The same draws as from the fp32 copy: a softmax in half precision would move some of the 4096 rows' draws."""
    similarity = (torch.randn(4096, 64, generator=generator(3)) * 3).to(dtype)
    row_ids, column_ids = torch.arange(4096) % 64, torch.arange(64)
    low = sample_hard_negatives(similarity, row_ids, column_ids, generator=generator(4))
    full = sample_hard_negatives(similarity.float(), row_ids, column_ids, generator=generator(4))
    assert torch.equal(low, full)


def test_hard_negatives_are_reproducible_with_a_generator() -> None:
    similarity, ids = torch.randn(64, 64, generator=generator(5)), torch.arange(64)
    first = sample_hard_negatives(similarity, ids, ids, generator=generator(6))
    assert torch.equal(first, sample_hard_negatives(similarity, ids, ids, generator=generator(6)))
    assert not torch.equal(first, sample_hard_negatives(similarity, ids, ids, generator=generator(7)))


# ---------------------------------------------------------------- masking


def caption_batch(n: int = 512, length: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] words [SEP] then padding, with some [SEP] inside, and padded positions holding a non-pad id (7) so that
    only the attention mask marks them."""
    g = generator(seed)
    ids = torch.randint(200, VOCAB, (n, length), generator=g)
    ids[torch.rand(n, length, generator=g) < 0.02] = SEP
    lengths = torch.randint(length // 4, length + 1, (n,), generator=g)
    attention = (torch.arange(length) < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(n), lengths - 1] = SEP
    ids[attention == 0] = torch.where(torch.rand(n, length, generator=g) < 0.5, PAD, 7)[attention == 0]
    return ids, attention


def masked(ids: torch.Tensor, attention: torch.Tensor, seed: int = 0, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    options = {"mask_token_id": MASK, "vocab_size": VOCAB, "special_token_ids": SPECIALS, **kwargs}
    return mask_tokens(ids, attention, generator=generator(seed), **options)


def test_masking_never_touches_padding_or_special_tokens() -> None:
    ids, attention = caption_batch()
    masked_ids, labels = masked(ids, attention, probability=0.5)
    protected = (attention == 0) | torch.isin(ids, torch.tensor(SPECIALS))
    assert (labels[protected] == -100).all()
    assert torch.equal(masked_ids[protected], ids[protected])
    chosen = labels != -100
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked_ids[~chosen], ids[~chosen])


def test_masking_rate_and_80_10_10_split() -> None:
    ids, attention = caption_batch()
    masked_ids, labels = masked(ids, attention)
    eligible = (attention == 1) & ~torch.isin(ids, torch.tensor(SPECIALS))
    chosen = labels != -100
    rate = chosen.sum() / eligible.sum()  # ~20k eligible tokens: one standard deviation is 0.0025
    assert rate.item() == pytest.approx(0.15, abs=0.012)
    to_mask = (masked_ids == MASK) & chosen
    changed = (masked_ids != ids) & chosen & ~to_mask  # random replacements (minus the 1/V that drew the same id)
    count = chosen.sum()
    assert (to_mask.sum() / count).item() == pytest.approx(0.8, abs=0.03)
    assert (changed.sum() / count).item() == pytest.approx(0.1, abs=0.025)
    assert ((chosen & (masked_ids == ids)).sum() / count).item() == pytest.approx(0.1, abs=0.025)
    assert not torch.isin(masked_ids[changed], torch.tensor(SPECIALS)).any()


def test_random_replacements_are_uniform_over_the_non_special_ids() -> None:
    specials, vocab = (0, 1, 5), 8
    ids = torch.full((4000, 16), 2)
    masked_ids, labels = mask_tokens(
        ids, torch.ones_like(ids), mask_token_id=6, vocab_size=vocab, special_token_ids=specials,
        probability=0.9, generator=generator(8),
    )
    replaced = masked_ids[(labels != -100) & (masked_ids != 6)]
    assert set(replaced.unique().tolist()) == {2, 3, 4, 7}  # never 0, 1, 5 (special) nor 6 ([MASK], always special)
    changed = replaced[replaced != 2]  # 2 is also the kept original; the other three are drawn 1/4 of the time each
    shares = torch.stack([(changed == k).float().mean() for k in (3, 4, 7)])
    assert torch.allclose(shares, torch.full((3,), 1 / 3), atol=0.03)


def test_masking_is_deterministic_given_the_generator() -> None:
    ids, attention = caption_batch(n=32)
    first = masked(ids, attention, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, masked(ids, attention, seed=1)))
    assert not torch.equal(first[1], masked(ids, attention, seed=2)[1])


@pytest.mark.parametrize("probability", [0.0, 1.0, 1.5, -0.1])
def test_masking_rejects_a_probability_outside_0_1(probability: float) -> None:
    ids, attention = caption_batch(n=2)
    with pytest.raises(ValueError, match="probability must lie in"):
        masked(ids, attention, probability=probability)


def test_masking_matches_transformers_data_collator_statistics() -> None:
    """Same eligible positions (specials excluded) and the same rates as transformers'
    DataCollatorForLanguageModeling on a tokenizer built in memory (no download)."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocabulary = {f"w{i}": i for i in range(VOCAB)} | {"[PAD]": PAD, "[CLS]": CLS, "[SEP]": SEP, "[MASK]": MASK}
    vocabulary = {token: i for token, i in vocabulary.items() if not token.startswith("w") or i not in SPECIALS}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocabulary, unk_token="[PAD]")),
        pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    )
    collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=0)
    ids, attention = caption_batch()
    ids[attention == 0] = PAD  # the collator knows padding by its id only
    batch = collator([{"input_ids": row.tolist()} for row in ids])
    theirs_chosen = batch["labels"] != -100
    ours_ids, ours_labels = masked(ids, attention)
    ours_chosen = ours_labels != -100
    eligible = (attention == 1) & ~torch.isin(ids, torch.tensor(SPECIALS))
    assert not (theirs_chosen & ~eligible).any()
    for chosen, result in ((theirs_chosen, batch["input_ids"]), (ours_chosen, ours_ids)):
        assert (chosen.sum() / eligible.sum()).item() == pytest.approx(0.15, abs=0.012)
        assert (((result == MASK) & chosen).sum() / chosen.sum()).item() == pytest.approx(0.8, abs=0.03)
        assert (((result == ids) & chosen).sum() / chosen.sum()).item() == pytest.approx(0.1, abs=0.025)


# ---------------------------------------------------------------- MLM loss


def test_mlm_loss_without_labels_is_zero_finite_and_keeps_the_graph() -> None:
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.full((2, 5), -100)
    for soft_targets, alpha in ((None, 0.0), (torch.softmax(torch.randn(2, 5, 11), -1), 0.4)):
        loss = mlm_loss(logits, labels, soft_targets, alpha)
        assert loss.item() == 0.0 and torch.isfinite(loss)
        loss.backward()
        assert logits.grad is not None and (logits.grad == 0).all()
    assert torch.isnan(F.cross_entropy(logits.flatten(0, 1), labels.flatten()))  # the corner being avoided


def test_mlm_loss_is_cross_entropy_over_labelled_positions() -> None:
    logits = torch.randn(3, 6, 11, generator=generator(9), requires_grad=True)
    labels = torch.full((3, 6), -100)
    labels[0, 2], labels[1, 4], labels[2, 0] = 3, 7, 10
    loss = mlm_loss(logits, labels)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.flatten(0, 1), labels.flatten()).item(), rel=1e-6)
    loss.backward()
    assert logits.grad[labels != -100].abs().sum() > 0 and (logits.grad[labels == -100] == 0).all()


def test_distilled_mlm_loss_equals_albef_formula() -> None:
    logits = torch.randn(2, 4, 9, generator=generator(10))
    soft_targets = torch.softmax(torch.randn(2, 4, 9, generator=generator(11)), dim=-1)
    labels = torch.tensor([[-100, 2, -100, 5], [1, -100, -100, -100]])
    alpha = 0.4
    plain = F.cross_entropy(logits.view(-1, 9), labels.view(-1))
    distill = -torch.sum(F.log_softmax(logits, dim=-1) * soft_targets, dim=-1)[labels != -100].mean()
    expected = (1 - alpha) * plain + alpha * distill
    assert mlm_loss(logits, labels, soft_targets, alpha).item() == pytest.approx(expected.item(), rel=1e-6)
    assert mlm_loss(logits, labels, soft_targets, 0.0).item() == pytest.approx(plain.item(), rel=1e-6)
    with pytest.raises(ValueError, match="soft_targets must be given"):
        mlm_loss(logits, labels, alpha=0.4)


# ---------------------------------------------------------------- ITC with momentum distillation


def test_distilled_contrastive_loss_with_alpha_0_is_clip_infonce() -> None:
    g = generator(12)
    images = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    texts = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = 1 / 0.07
    sim_i2t, sim_t2i = scale * images @ texts.T, scale * texts @ images.T
    targets = momentum_targets(torch.randn(6, 6, generator=g), torch.eye(6, dtype=torch.bool), alpha=0.0)
    loss = distilled_contrastive_loss(sim_i2t, sim_t2i, targets, targets)
    reference = clip_contrastive_loss(images, texts, scale)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_distilled_contrastive_loss_equals_hand_computation() -> None:
    """B = 2, K = 3 (batch + one queue entry), α = 0.5, row 1 of i2t with two positives (same image id)."""
    sim_i2t = torch.tensor([[2.0, 0.0, 1.0], [0.5, 1.5, -1.0]])
    sim_t2i = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
    momentum_i2t = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    momentum_t2i = torch.zeros(2, 3)
    positive_i2t = torch.tensor([[True, False, False], [False, True, True]])
    positive_t2i = torch.tensor([[True, False, False], [False, True, False]])
    targets_i2t = momentum_targets(momentum_i2t, positive_i2t, alpha=0.5)
    targets_t2i = momentum_targets(momentum_t2i, positive_t2i, alpha=0.5)
    e = math.e
    q0 = [e / (e + 2), 1 / (e + 2), 1 / (e + 2)]
    expected_i2t = [[0.5 * q0[0] + 0.5, 0.5 * q0[1], 0.5 * q0[2]], [1 / 6, 1 / 6 + 0.25, 1 / 6 + 0.25]]
    expected_t2i = [[1 / 6 + 0.5, 1 / 6, 1 / 6], [1 / 6, 1 / 6 + 0.5, 1 / 6]]
    assert torch.allclose(targets_i2t, torch.tensor(expected_i2t))
    assert torch.allclose(targets_t2i, torch.tensor(expected_t2i))

    def soft_ce(logits: list[float], target: list[float]) -> float:
        log_z = math.log(sum(math.exp(x) for x in logits))
        return -sum(t * (x - log_z) for x, t in zip(logits, target))

    i2t = sum(soft_ce(sim_i2t[b].tolist(), expected_i2t[b]) for b in range(2)) / 2
    t2i = sum(soft_ce(sim_t2i[b].tolist(), expected_t2i[b]) for b in range(2)) / 2
    loss = distilled_contrastive_loss(sim_i2t, sim_t2i, targets_i2t, targets_t2i)
    assert loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)


def test_contrastive_targets_and_loss_in_bf16() -> None:
    sim = torch.randn(4, 10, generator=generator(13)) * 10
    positive = torch.zeros(4, 10, dtype=torch.bool)
    positive[torch.arange(4), torch.arange(4)] = True
    targets = momentum_targets(sim.bfloat16(), positive, alpha=0.4)
    assert targets.dtype == torch.float32 and torch.allclose(targets.sum(1), torch.ones(4))
    loss = distilled_contrastive_loss(sim.bfloat16(), sim.bfloat16(), targets, targets)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(distilled_contrastive_loss(sim, sim, targets, targets).item(), rel=2e-2)
    with pytest.raises(ValueError, match="Row 3 of positive has no True entry"):
        momentum_targets(sim, positive & (torch.arange(4) < 3)[:, None], alpha=0.4)


# ---------------------------------------------------------------- ITM and captioning


def test_itm_loss_is_fp32_cross_entropy() -> None:
    logits = torch.randn(12, 2, generator=generator(14)) * 30
    labels = torch.cat([torch.ones(4), torch.zeros(8)]).long()
    loss = itm_loss(logits.bfloat16(), labels)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(F.cross_entropy(logits.bfloat16().float(), labels).item(), rel=1e-6)


def test_caption_loss_ignores_padding_and_does_not_shift() -> None:
    g = generator(15)
    targets = torch.randint(0, 20, (3, 7), generator=g)
    pad_mask = torch.arange(7) >= torch.tensor([[7], [4], [2]])
    logits = torch.randn(3, 7, 20, generator=g)
    loss = caption_loss(logits, targets, pad_mask)
    reference = F.cross_entropy(logits.permute(0, 2, 1), targets.masked_fill(pad_mask, -100), ignore_index=-100)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    changed = logits.clone()
    changed[pad_mask] = torch.randn(int(pad_mask.sum()), 20, generator=g) * 100
    assert caption_loss(changed, targets.masked_fill(pad_mask, 0), pad_mask).item() == pytest.approx(loss.item())
    perfect = F.one_hot(targets, 20).float() * 50  # logits[:, t] predicting targets[:, t]
    assert caption_loss(perfect, targets, pad_mask).item() < 1e-6


def test_caption_loss_all_padding_is_zero_with_graph() -> None:
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = caption_loss(logits, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and (logits.grad == 0).all()
