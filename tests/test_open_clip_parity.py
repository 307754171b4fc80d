"""An open_clip CLIP, converted with `open_clip_state_dict_to_vlp`, gives the same embeddings in our pieces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlp_lightning.modules.open_clip_import import (
    open_clip_config_from_vlp,
    open_clip_state_dict_to_vlp,
    text_config_from_open_clip,
    vision_config_from_open_clip,
    vlp_state_dict_to_open_clip,
)
from vlp_lightning.modules.text import TextTransformer
from vlp_lightning.modules.tokenizers import CLIPTokenizer
from vlp_lightning.modules.vision import VisionEncoder

open_clip = pytest.importorskip("open_clip")

CAPTIONS = ["a photo of a dog", "a drawing of two cats on a sofa", "It’s a “red” car!", "x" * 80]


def tiny_config(quick_gelu: bool) -> dict:
    """open_clip's CLIPVisionCfg has no `heads`: it derives heads = width // head_width."""
    return {
        "embed_dim": 64,
        "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


class Towers(nn.Module):
    """Our pieces named as `vlp_lightning.methods.CLIP` names them."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.vision = VisionEncoder(**vision_config_from_open_clip(config))
        self.text = TextTransformer(**text_config_from_open_clip(config))
        self.image_projection = nn.Linear(self.vision.num_features, config["embed_dim"], bias=False)
        self.text_projection = nn.Linear(self.text.num_features, config["embed_dim"], bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(0.0))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_projection(self.vision(images)), dim=-1)

    def encode_text(self, text: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.text_projection(self.text(text)), dim=-1)


def reference_model(config: dict) -> nn.Module:
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=config["embed_dim"],
        vision_cfg=config["vision_cfg"],
        text_cfg=config["text_cfg"],
        quick_gelu=config["quick_gelu"],
    ).eval()


def assert_same_embeddings(ours: nn.Module, reference: nn.Module, image_size: int, context_length: int) -> None:
    torch.manual_seed(1)
    images = torch.randn(len(CAPTIONS), 3, image_size, image_size)
    tokens = CLIPTokenizer(context_length=context_length)(CAPTIONS)
    assert torch.equal(tokens["input_ids"], open_clip.tokenize(CAPTIONS, context_length=context_length))
    with torch.no_grad():
        expected_image = reference.encode_image(images, normalize=True)
        expected_text = reference.encode_text(tokens["input_ids"], normalize=True)
        assert torch.allclose(ours.encode_image(images), expected_image, atol=1e-5)
        assert torch.allclose(ours.encode_text(tokens), expected_text, atol=1e-5)


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_converted_weights_reproduce_open_clip_embeddings(quick_gelu: bool) -> None:
    config = tiny_config(quick_gelu)
    reference = reference_model(config)
    ours = Towers(config).eval()
    ours.load_state_dict(open_clip_state_dict_to_vlp(reference.state_dict()), strict=True)
    assert torch.equal(ours.logit_scale, reference.logit_scale)
    assert_same_embeddings(ours, reference, image_size=32, context_length=16)


def test_converted_weights_load_into_the_clip_method() -> None:
    from vlp_lightning.methods.clip import CLIP

    config = tiny_config(quick_gelu=True)
    reference = reference_model(config)
    method = CLIP(
        vision=VisionEncoder(**vision_config_from_open_clip(config)),
        text=TextTransformer(**text_config_from_open_clip(config)),
        tokenizer=CLIPTokenizer(context_length=config["text_cfg"]["context_length"]),
        embed_dim=config["embed_dim"],
    ).eval()
    method.load_state_dict(open_clip_state_dict_to_vlp(reference.state_dict()), strict=True)
    assert_same_embeddings(method, reference, image_size=32, context_length=16)


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_the_export_conversion_inverts_the_import(quick_gelu: bool) -> None:
    """open_clip -> vlp -> open_clip gives back every tensor, and the config `vlp export` writes is the one we built
    the towers from."""
    config = tiny_config(quick_gelu)
    state_dict = reference_model(config).state_dict()
    again = vlp_state_dict_to_open_clip(open_clip_state_dict_to_vlp(state_dict))
    assert again.keys() == state_dict.keys()
    assert all(torch.equal(again[key], value) for key, value in state_dict.items())
    from vlp_lightning.methods.clip import CLIP

    method = CLIP(vision=VisionEncoder(**vision_config_from_open_clip(config)),
                  text=TextTransformer(**text_config_from_open_clip(config)),
                  tokenizer=CLIPTokenizer(context_length=16), embed_dim=config["embed_dim"])
    exported = open_clip_config_from_vlp(method)
    assert exported["quick_gelu"] == quick_gelu and exported["embed_dim"] == config["embed_dim"]
    assert exported["text_cfg"] == {**config["text_cfg"], "mlp_ratio": 4.0}
    assert exported["vision_cfg"] == {**config["vision_cfg"], "mlp_ratio": 4.0}


def test_vits_without_ln_pre_import_as_timm_imagenet_vits_with_a_zero_patch_bias() -> None:
    """What `vlp export` writes for a timm ViT without CLIP's pre-norm (no ln_pre, LayerNorm eps 1e-6 in
    norm_kwargs) imports as timm's ImageNet ViT, whose patch-embedding bias open_clip lacks: zero."""
    config = tiny_config(quick_gelu=False)
    config["vision_cfg"] = {**config["vision_cfg"], "no_ln_pre": True, "norm_kwargs": {"eps": 1e-6}}
    reference = reference_model(config)
    vision = vision_config_from_open_clip(config)
    assert (vision["model_name"], vision["pre_norm"]) == ("vit_base_patch16_224", False)
    ours = Towers(config).eval()
    ours.load_state_dict(open_clip_state_dict_to_vlp(reference.state_dict()), strict=True)
    assert not ours.vision.model.patch_embed.proj.bias.any()
    assert_same_embeddings(ours, reference, image_size=32, context_length=16)
    with pytest.raises(ValueError, match="no timm ViT that VisionEncoder builds has LayerNorm eps 1e-06, QuickGELU"):
        vision_config_from_open_clip({**config, "quick_gelu": True})
    with pytest.raises(ValueError, match="eps 1e-05, GELU and no ln_pre"):
        vision_config_from_open_clip({**config, "vision_cfg": {**config["vision_cfg"], "norm_kwargs": None}})


def test_unsupported_configs_and_parameters_are_refused() -> None:
    config = tiny_config(False)
    with pytest.raises(ValueError, match="init_logit_bias"):
        vision_config_from_open_clip({**config, "init_logit_bias": -10.0})
    with pytest.raises(ValueError, match="timm_model_name"):
        vision_config_from_open_clip({**config, "vision_cfg": {"timm_model_name": "convnext_tiny", "image_size": 224}})
    with pytest.raises(ValueError, match="ResNet"):
        vision_config_from_open_clip({**config, "vision_cfg": {"layers": [3, 4, 6, 3], "width": 64}})
    with pytest.raises(ValueError, match="hf_model_name"):
        text_config_from_open_clip({**config, "text_cfg": {"hf_model_name": "roberta-base"}})
    with pytest.raises(ValueError, match="ls_1"):
        open_clip_state_dict_to_vlp({"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(4)})


@pytest.mark.parametrize("name, heads", [("ViT-B-32", 12), ("ViT-H-14", 16), ("ViT-bigG-14", 16)])
def test_released_configs_map_onto_timm_vit_arguments(name: str, heads: int) -> None:
    config = open_clip.get_model_config(name)
    vision = vision_config_from_open_clip(config)
    assert vision["num_heads"] == heads and vision["pre_norm"] and vision["pool"] == "token"
    assert (vision["img_size"], vision["patch_size"], vision["width"]) == (
        config["vision_cfg"]["image_size"],
        config["vision_cfg"]["patch_size"],
        config["vision_cfg"]["width"],
    )
    assert text_config_from_open_clip(config)["context_length"] == 77


@pytest.mark.slow
def test_full_size_vit_b_32_parity() -> None:
    config = {**open_clip.get_model_config("ViT-B-32"), "quick_gelu": True}
    reference = open_clip.CLIP(**config).eval()
    ours = Towers(config).eval()
    ours.load_state_dict(open_clip_state_dict_to_vlp(reference.state_dict()), strict=True)
    assert_same_embeddings(ours, reference, image_size=224, context_length=77)
