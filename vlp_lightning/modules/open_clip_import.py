"""Import open_clip CLIP weights (ViT image tower + causal text tower) into our CLIP pieces.

An open_clip `CLIP` with a ViT image tower is, parameter for parameter, the same network as
`VisionEncoder` (a timm ViT with `pre_norm=True`, class-token pooling, no fc_norm, LayerNorm eps 1e-5) +
`TextTransformer` + two bias-free linear projections + `logit_scale`. This module renames and reshapes the state
dict, and turns an open_clip model config (the JSON files in `open_clip/model_configs`) into our constructor
arguments. It needs neither open_clip nor a download: pass a state dict you already have.

    config = json.load(open("ViT-B-32.json"))
    model = CLIP(vision=VisionEncoder(**vision_config_from_open_clip(config)),
                 text=TextTransformer(**text_config_from_open_clip(config)),
                 tokenizer=CLIPTokenizer(context_length=config["text_cfg"]["context_length"]),
                 embed_dim=config["embed_dim"])
    model.load_state_dict(open_clip_state_dict_to_vlp(open_clip_state_dict))

Configs with other towers or heads (timm/HF towers, ResNets, attentional pooling, SigLIP's logit bias, CoCa,
layer scale, custom attention blocks) stop with an error naming the option, rather than loading into the wrong
network.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

VISION_PREFIX = "vision.model."
TEXT_PREFIX = "text."

#: residual block parameters: open_clip name -> timm ViT name (the text tower keeps open_clip's names).
BLOCK_RENAMES = {
    "ln_1": "norm1",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj": "attn.proj",
    "ln_2": "norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
#: other image tower parameters: open_clip name (after "visual.") -> timm ViT name.
VISION_RENAMES = {
    "conv1.weight": "patch_embed.proj.weight",
    "class_embedding": "cls_token",
    "positional_embedding": "pos_embed",
    "ln_pre.weight": "norm_pre.weight",
    "ln_pre.bias": "norm_pre.bias",
    "ln_post.weight": "norm.weight",
    "ln_post.bias": "norm.bias",
}
TEXT_NAMES = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias")
BLOCK_KEY = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def open_clip_state_dict_to_vlp(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """open_clip CLIP / CustomTextCLIP state dict -> keys of `vlp_lightning.methods.CLIP`.

    visual.* -> vision.model.* (timm names; class and position embeddings gain timm's batch dims),
    visual.proj [width, D] -> image_projection.weight [D, width], text tower -> text.*,
    text_projection [width, D] -> text_projection.weight [D, width], logit_scale unchanged.
    """
    converted: dict[str, Tensor] = {}
    unsupported: list[str] = []
    for key, value in state_dict.items():
        if key.startswith("visual."):
            name = key.removeprefix("visual.")
            if name == "proj":
                converted["image_projection.weight"] = value.t().contiguous()
            elif name in VISION_RENAMES:
                converted[VISION_PREFIX + VISION_RENAMES[name]] = _vision_shape(VISION_RENAMES[name], value)
            elif (block := _split_block_key(name)) is not None:
                index, part, rest = block
                converted[f"{VISION_PREFIX}blocks.{index}.{BLOCK_RENAMES[part]}{rest}"] = value
            else:
                unsupported.append(key)
            continue
        name = key.removeprefix("text.")  # CustomTextCLIP nests the text tower under `text.`
        if name == "text_projection":
            converted["text_projection.weight"] = value.t().contiguous()
        elif name == "logit_scale":
            converted["logit_scale"] = value
        elif name in TEXT_NAMES or _split_block_key(name) is not None:
            converted[TEXT_PREFIX + name] = value
        else:
            unsupported.append(key)
    if unsupported:
        raise ValueError(
            f"open_clip parameters with no counterpart in our CLIP (a tower or head we do not reproduce): {unsupported}"
        )
    return converted


def _split_block_key(name: str) -> tuple[str, str, str] | None:
    """transformer.resblocks.<i>.<part><rest> -> (i, part, rest) for a known block part, else None."""
    match = BLOCK_KEY.fullmatch(name)
    if match is None:
        return None
    index, parameter = match.groups()
    for part in BLOCK_RENAMES:
        if parameter == part or parameter.startswith(part + "."):
            return index, part, parameter[len(part) :]
    return None


def _vision_shape(timm_name: str, value: Tensor) -> Tensor:
    """timm keeps the class token as [1, 1, C] and position embeddings as [1, 1 + L, C]."""
    if timm_name == "cls_token":
        return value.reshape(1, 1, -1)
    if timm_name == "pos_embed":
        return value.unsqueeze(0)
    return value


#: open_clip's CLIPVisionCfg / CLIPTextCfg defaults for the fields we read (configs omit defaulted fields).
VISION_DEFAULTS = {"image_size": 224, "patch_size": 16, "width": 768, "layers": 12, "head_width": 64, "mlp_ratio": 4.0}
TEXT_DEFAULTS = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12, "mlp_ratio": 4.0}
_CUSTOM_BLOCK_DEFAULTS = {
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
    "ls_init_value": None,
    "act_kwargs": None,
    "norm_kwargs": None,
}
#: options we reproduce only at these values.
VISION_REQUIRED = {
    **_CUSTOM_BLOCK_DEFAULTS,
    "timm_model_name": None,
    "attentional_pool": False,
    "no_ln_pre": False,
    "pos_embed_type": "learnable",
    "pool_type": "tok",
    "patch_dropout": 0.0,
}
TEXT_REQUIRED = {
    **_CUSTOM_BLOCK_DEFAULTS,
    "hf_model_name": None,
    "hf_tokenizer_name": None,
    "tokenizer_mode": None,
    "tokenizer_kwargs": None,
    "embed_cls": False,
    "no_causal_mask": False,
    "pool_type": "argmax",
    "proj_type": "linear",
    "proj_bias": False,
}
#: options that do not change the weights or the pooled output of the towers we build.
VISION_IRRELEVANT = {"final_ln_after_pool", "output_tokens", "attn_pooler_queries", "attn_pooler_heads"} | {
    "timm_model_pretrained",
    "timm_pool",
    "timm_proj",
    "timm_proj_bias",
    "timm_drop",
    "timm_drop_path",
}
TEXT_IRRELEVANT = {"final_ln_after_pool", "output_tokens", "pad_id", "eos_id"} | {
    "hf_model_pretrained",
    "hf_proj_type",
    "hf_pooler_type",
}
TOP_LEVEL_KNOWN = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text"}


def vision_config_from_open_clip(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """open_clip model config -> `VisionEncoder` arguments reproducing its ViT image tower.

    The timm name only carries what the overrides do not: CLIP's pre-norm, LayerNorm eps 1e-5 and the
    activation (QuickGELU for the "-quickgelu" configs, i.e. OpenAI's original weights).
    """
    _check_top_level(model_config)
    vision = _read_tower_config(
        model_config["vision_cfg"], VISION_DEFAULTS, VISION_REQUIRED, VISION_IRRELEVANT, "vision"
    )
    if not isinstance(vision["layers"], int):
        raise ValueError("open_clip ResNet image towers (vision_cfg.layers is a list) are not supported; use a ViT")
    if not isinstance(vision["image_size"], int) or not isinstance(vision["patch_size"], int):
        raise ValueError("only square images and patches (integer image_size / patch_size) are supported")
    quick_gelu = model_config.get("quick_gelu", False)
    return {
        "model_name": "vit_base_patch16_clip_quickgelu_224" if quick_gelu else "vit_base_patch16_clip_224",
        "img_size": vision["image_size"],
        "patch_size": vision["patch_size"],
        "width": vision["width"],
        "depth": vision["layers"],
        "num_heads": vision["width"] // vision["head_width"],
        "mlp_ratio": vision["mlp_ratio"],
        "pool": "token",
        "pre_norm": True,
    }


def text_config_from_open_clip(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """open_clip model config -> `TextTransformer` arguments reproducing its text tower."""
    _check_top_level(model_config)
    text = _read_tower_config(model_config["text_cfg"], TEXT_DEFAULTS, TEXT_REQUIRED, TEXT_IRRELEVANT, "text")
    return {
        "vocab_size": text["vocab_size"],
        "context_length": text["context_length"],
        "width": text["width"],
        "layers": text["layers"],
        "heads": text["heads"],
        "mlp_ratio": text["mlp_ratio"],
        "act": "quick_gelu" if model_config.get("quick_gelu", False) else "gelu",
    }


def _check_top_level(model_config: Mapping[str, Any]) -> None:
    unknown = sorted(set(model_config) - TOP_LEVEL_KNOWN)
    if unknown:
        raise ValueError(f"open_clip model options not supported (e.g. SigLIP's logit bias, CoCa): {unknown}")


def _read_tower_config(
    tower_config: Mapping[str, Any],
    defaults: Mapping[str, Any],
    required: Mapping[str, Any],
    irrelevant: set[str],
    tower: str,
) -> dict[str, Any]:
    """Defaults filled in; every option outside `defaults`/`irrelevant` must keep the value we reproduce."""
    unsupported = {
        name: value
        for name, value in tower_config.items()
        if name not in defaults and name not in irrelevant and (name not in required or value != required[name])
    }
    if unsupported:
        raise ValueError(f"open_clip {tower}_cfg options not supported by our {tower} tower: {unsupported}")
    return {**defaults, **{name: value for name, value in tower_config.items() if name in defaults}}
