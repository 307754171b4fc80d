"""Visual connectors: M = num_tokens(N) for every connector, gradients to every parameter, the pool-adapter keeps
position, token merging keeps the size-weighted mean and merges the most similar pair, and the errors."""

import pytest
import torch
import torch.nn.functional as F

from vlp_lightning.modules import (
    LinearConnector,
    MLPConnector,
    PoolAdapter,
    QueryResampler,
    ScaleInvariantConnector,
    TokenMergingConnector,
)

IN, OUT = 12, 16
TINY_QFORMER = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, dropout=0.0)


def build(name: str):
    return {
        "linear_tokens": lambda: LinearConnector(IN, OUT),
        "linear_pooled": lambda: LinearConnector(IN, OUT, mode="pooled", num_prompts=3),
        "mlp": lambda: MLPConnector(IN, OUT),
        "pool": lambda: PoolAdapter(IN, OUT, pool_size=2),
        "merge": lambda: TokenMergingConnector(IN, OUT, final_tokens=5),
        "qformer": lambda: QueryResampler(IN, OUT, num_queries=3, cross_attention_frequency=2, **TINY_QFORMER),
        "scale_invariant": lambda: ScaleInvariantConnector(
            IN, OUT, query_grid=2, num_hidden_layers=2, num_attention_heads=2, dropout=0.0
        ),
    }[name]()


NAMES = ["linear_tokens", "linear_pooled", "mlp", "pool", "merge", "qformer", "scale_invariant"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("progress", [0.0, 0.4, 1.0])
def test_output_count_is_num_tokens_for_two_grids(name, progress):
    torch.manual_seed(0)
    connector = build(name).train()
    connector.set_progress(progress)
    for n in (16, 64):
        out = connector(torch.randn(2, n, IN))
        assert out.shape == (2, connector.num_tokens(n), OUT)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["qformer", "scale_invariant", "pool", "linear_pooled"])
def test_fixed_count_whatever_the_grid(name):
    connector = build(name)
    assert connector.num_tokens(16) == connector.num_tokens(64)
    assert connector(torch.randn(1, 16, IN)).shape == connector(torch.randn(1, 64, IN)).shape


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    connector = build(name).train()
    connector.set_progress(0.5)
    tokens = torch.randn(2, 16, IN, requires_grad=True)
    connector(tokens).square().mean().backward()
    missing = [n for n, p in connector.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert tokens.grad.abs().sum() > 0


def test_scale_invariant_reads_crops_with_their_mask():
    torch.manual_seed(0)
    connector = build("scale_invariant").eval()
    resized, crops = torch.randn(2, 16, IN), torch.randn(2, 3 * 16, IN)
    mask = torch.ones(2, 48, dtype=torch.bool)
    mask[0, 16:] = False  # image 0 has one crop, padded to three
    out = connector(resized, crops, mask)
    assert out.shape == (2, 4, OUT)
    changed = crops.clone()
    changed[0, 16:] = 100.0  # padding: masked, so image 0's output must not move
    assert torch.allclose(connector(resized, changed, mask)[0], out[0], atol=1e-5)
    assert not torch.allclose(connector(resized, changed)[0], out[0], atol=1e-3)


def test_pool_adapter_keeps_position():
    torch.manual_seed(0)
    adapter = PoolAdapter(IN, OUT, pool_size=2)
    tokens = torch.randn(1, 16, IN)
    permuted = tokens[:, torch.randperm(16, generator=torch.Generator().manual_seed(1))]
    assert not torch.allclose(adapter(tokens), adapter(permuted), atol=1e-4)
    # one bright token at grid row 3, column 0 of the 4 x 4 grid lies in the 2 x 2 output's cell (1, 0) = index 2
    bright = torch.zeros(1, 16, IN)
    bright[0, 3 * 4 + 0] = 8.0
    moved = adapter(bright) - adapter(torch.zeros(1, 16, IN))
    assert moved[0].norm(dim=-1).argmax() == 2
    assert torch.allclose(moved[0, [0, 1, 3]], torch.zeros(3, OUT))


def test_merging_keeps_the_size_weighted_mean():
    torch.manual_seed(0)
    connector = TokenMergingConnector(IN, OUT, final_tokens=3).eval()
    tokens = torch.randn(2, 64, IN, dtype=torch.float64)
    merged, sizes = connector.merge(tokens)
    assert merged.shape == (2, 3, IN) and sizes.sum(1).squeeze(-1).tolist() == [64.0, 64.0]
    assert torch.allclose((merged * sizes).sum(1) / sizes.sum(1), tokens.mean(1))


def test_merging_identical_tokens_loses_nothing():
    distinct = F.normalize(torch.eye(IN)[:4] + 0.1, dim=-1)  # 4 different directions
    # each distinct token twice, once in A (even position) and once in B (odd): 8 tokens, 4 distinct
    tokens = distinct.repeat_interleave(2, dim=0)[None]
    merged, sizes = TokenMergingConnector(IN, OUT, final_tokens=4).eval().merge(tokens)
    assert sizes.flatten().tolist() == [2.0] * 4
    assert torch.allclose(merged[0].sort(dim=0).values, distinct.sort(dim=0).values)


def test_the_two_most_similar_tokens_are_merged():
    torch.manual_seed(0)
    tokens = torch.randn(1, 16, IN)
    tokens[0, 5] = tokens[0, 10] + 0.01 * torch.randn(IN)  # A's 10 (even) and B's 5 (odd): far the closest pair
    merged, sizes = TokenMergingConnector(IN, OUT, final_tokens=15).eval().merge(tokens)
    assert sizes.flatten().tolist().count(2.0) == 1
    pair = merged[0, sizes.flatten() == 2.0][0]
    assert torch.allclose(pair, (tokens[0, 5] + tokens[0, 10]) / 2)
    rest = {tuple(t.tolist()) for i, t in enumerate(tokens[0]) if i not in (5, 10)}
    assert {tuple(t.tolist()) for t in merged[0, sizes.flatten() == 1.0]} == rest


def test_merging_schedule_reaches_the_final_count():
    connector = TokenMergingConnector(IN, OUT, final_tokens=4).train()
    counts = []
    for step in range(11):
        connector.set_progress(step / 10)
        counts.append(connector.num_tokens(64))
    assert counts[0] == 64 and counts[-1] == 4
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    connector.set_progress(0.0)
    assert connector.eval().num_tokens(64) == 4  # evaluation always uses the final count
    connector.train().set_progress(0.3)
    tokens = torch.randn(2, 64, IN)
    assert torch.equal(connector(tokens), connector(tokens))  # deterministic given the progress


def test_bad_inputs_say_what_to_fix():
    with pytest.raises(ValueError, match="15, which is not a perfect square"):
        PoolAdapter(IN, OUT)(torch.randn(1, 15, IN))
    with pytest.raises(ValueError, match="not a perfect square"):
        build("scale_invariant")(torch.randn(1, 15, IN))
    with pytest.raises(ValueError, match="pool_size=4 is larger than the 2 x 2 token grid"):
        PoolAdapter(IN, OUT, pool_size=4)(torch.randn(1, 4, IN))
    with pytest.raises(ValueError, match="final_tokens=20 is more than the 16 input tokens"):
        TokenMergingConnector(IN, OUT, final_tokens=20)(torch.randn(1, 16, IN))
    with pytest.raises(ValueError, match=r"progress must lie in \[0, 1\], got 1.5"):
        TokenMergingConnector(IN, OUT).set_progress(1.5)
    with pytest.raises(ValueError, match="mode must be 'tokens' or 'pooled'"):
        LinearConnector(IN, OUT, mode="grid")
    with pytest.raises(ValueError, match="not divisible by its 5 heads"):
        QueryResampler(IN, OUT, hidden_size=16, num_attention_heads=5)


def test_pool_adapter_matches_infmllm_block_means():
    """InfMLLM's `Pooler.forward`: reshape the s-divisible grid into blocks, permute, mean, then the MLP."""
    torch.manual_seed(0)
    adapter = PoolAdapter(IN, OUT, pool_size=2)
    tokens = torch.randn(2, 64, IN)
    blocks = tokens.reshape(2, 2, 4, 2, 4, IN).permute(0, 1, 3, 5, 2, 4).reshape(2, 4, IN, -1).mean(-1)
    assert torch.allclose(adapter(tokens), adapter.mlp(blocks), atol=1e-6)
