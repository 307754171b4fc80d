"""mPLUG-video: mPLUG-Owl's visual abstractor (queries and temporal queries over [queries ; all frames' tokens],
SwiGLU layers, an end-of-vision token) in front of a frozen LM (tiny random LM, 2-block ViT)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlp_lightning import methods
from vlp_lightning.modules.connectors import AbstractorLayer, VisualAbstractor


def reference_layer(layer: AbstractorLayer, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """mplug_owl_video's `MplugOwlVisualAbstractorLayer` written out: q = LN1(q); keys / values from
    [q ; LNk(x)] with shared projections; q = q + out_proj(attention); q + w2(ffn_ln(SiLU(w1 h) * w3 h)), h = LN2(q)."""
    attention = layer.attention
    width, heads = queries.shape[-1], attention.num_heads
    q = layer.norm1(queries)
    context = torch.cat([q, layer.normk(tokens)], dim=1)
    w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attention.in_proj_bias.chunk(3)

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], heads, width // heads).transpose(1, 2)

    scores = split(F.linear(q, w_q, b_q)) @ split(F.linear(context, w_k, b_k)).transpose(-1, -2)
    mixed = (scores / (width // heads) ** 0.5).softmax(dim=-1) @ split(F.linear(context, w_v, b_v))
    q = q + attention.out_proj(mixed.transpose(1, 2).reshape(q.shape))
    hidden = layer.norm2(q)
    return q + layer.w2(layer.ffn_ln(F.silu(layer.w1(hidden)) * layer.w3(hidden)))


def test_an_abstractor_layer_is_the_releases_cross_attention_over_queries_and_tokens():
    torch.manual_seed(0)
    layer = AbstractorLayer(width=16, heads=2, intermediate_size=24).eval()
    queries, tokens = torch.randn(3, 4, 16), torch.randn(3, 10, 16)
    assert torch.allclose(layer(queries, tokens), reference_layer(layer, queries, tokens), atol=1e-5)


def test_the_abstractor_gives_queries_plus_one_tokens_whatever_the_frames_and_reads_time():
    torch.manual_seed(0)
    abstractor = VisualAbstractor(in_dim=48, out_dim=32, num_queries=6, num_temporal_queries=6).eval()
    assert abstractor.num_tokens(999) == 7
    frames = torch.randn(2, 4, 16, 48)  # [B, T, N, width]
    with torch.no_grad():
        out = abstractor(frames.flatten(1, 2))
        assert out.shape == (2, 7, 32) and abstractor(frames[:, :1].flatten(1, 2)).shape == (2, 7, 32)
        assert torch.allclose(out[:, -1], abstractor.eos[0, 0].expand(2, -1))  # the end-of-vision token
        # the main queries' outputs plus the temporal queries' through their own linear map
        queries = torch.cat([abstractor.queries, abstractor.temporal_queries], dim=1).expand(2, -1, -1)
        context = abstractor.input_proj(frames.flatten(1, 2))
        for layer in abstractor.layers:
            queries = layer(queries, context)
        expected = abstractor.visual_fc(queries[:, :6]) + abstractor.temporal_fc(queries[:, 6:])
        assert torch.allclose(out[:, :6], expected, atol=1e-5)
    image_form = VisualAbstractor(in_dim=48, out_dim=32, num_queries=6, num_temporal_queries=0)
    assert image_form.temporal_fc is None and image_form(torch.randn(2, 16, 48)).shape == (2, 7, 32)
    with pytest.raises(ValueError, match="num_queries=0, num_temporal_queries=8, depth=2: need at least one query"):
        VisualAbstractor(in_dim=48, out_dim=32, num_queries=0)


def test_mplug_video_reads_every_frame_through_the_abstractor_and_trains_only_it():
    torch.manual_seed(0)
    method = methods.MPLUGVideo(num_frames=4)
    assert isinstance(method.connector, VisualAbstractor)
    trainable = {name.split(".")[0] for name, parameter in method.named_parameters() if parameter.requires_grad}
    assert trainable == {"connector", "temporal_embedding"}  # the tower and the LM are frozen
    method.eval()
    video = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        tokens = method.visual_tokens(video)
        assert tokens.shape == (2, method.connector.num_tokens(0), method.language_model.hidden_size)
        frames = method.vision.forward_tokens(video.flatten(0, 1)).reshape(2, 4 * 16, -1)
        assert torch.allclose(tokens, method.connector(frames), atol=1e-5)  # zero temporal embeddings at the start
        # the release's abstractor is blind to frame order (a set of keys); the learned temporal embedding is not
        assert torch.allclose(method.visual_tokens(video.flip(1)), tokens, atol=1e-5)
        method.temporal_embedding.normal_()
        assert not torch.allclose(method.visual_tokens(video.flip(1)), method.visual_tokens(video), atol=1e-4)
        assert method.visual_tokens(video[:, 0]).shape == tokens.shape  # a still image: a one-frame clip
    with pytest.raises(ValueError, match="temporal embeddings for 4 frames but got a clip of 6"):
        method.visual_tokens(torch.randn(1, 6, 3, 32, 32))
    assert methods.MPLUGVideo(temporal_embedding=False).temporal_embedding is None
