"""open_clip CLIP weights (ViT image tower + causal text tower) to our CLIP pieces and back.

An open_clip `CLIP` with a ViT image tower is, parameter for parameter, the same network as
`VisionEncoder` (a timm ViT with class-token pooling and no fc_norm; with `pre_norm=True` and LayerNorm eps 1e-5
for OpenAI's and LAION's towers) + `TextTransformer` + two bias-free linear projections + `logit_scale`. This module
renames and reshapes the state dict, and turns an open_clip model config (the JSON files in
`open_clip/model_configs`) into our constructor arguments. It needs neither open_clip nor a download: pass a state
dict you already have.

    config = json.load(open("ViT-B-32.json"))
    model = CLIP(vision=VisionEncoder(**vision_config_from_open_clip(config)),
                 text=TextTransformer(**text_config_from_open_clip(config)),
                 tokenizer=CLIPTokenizer(context_length=config["text_cfg"]["context_length"]),
                 embed_dim=config["embed_dim"])
    model.load_state_dict(open_clip_state_dict_to_vlp(open_clip_state_dict))

The other way (what `vlp export` writes), `open_clip_config_from_vlp(method)` is the open_clip model config of a
CLIP-family method and `vlp_state_dict_to_open_clip(method.state_dict())` its weights under open_clip's names;
`open_clip.CLIP(**config)` loads them strictly. A timm ViT without CLIP's pre-norm (e.g. `vit_tiny_patch16_224`, as
our small recipes train) is written with `no_ln_pre`, its LayerNorm eps in `norm_kwargs`, and its patch-embedding
bias (open_clip's patch convolution has none) folded into the position embeddings of the patch tokens; importing
such a config builds `vit_base_patch16_224` with a zero patch bias, the same function.

Configs with other towers or heads (timm/HF towers, ResNets, attentional pooling, SigLIP's logit bias, CoCa,
layer scale, custom attention blocks) stop with an error naming the option, rather than loading into the wrong
network; so does the export of a method open_clip's CLIP cannot express.
"""

from __future__ import annotations

import filecmp
import re
from collections.abc import Mapping
from typing import Any

import torch
from timm.layers import Mlp, PatchEmbed
from timm.layers.activations import QuickGELU as TimmQuickGELU
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor, nn

from vlp_lightning.modules.text import QuickGELU, TextTransformer
from vlp_lightning.modules.tokenizers import CLIPTokenizer, default_clip_vocab_path

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
TIMM_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


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
    if "visual.conv1.weight" in state_dict and "visual.ln_pre.weight" not in state_dict:
        # no ln_pre: `vision_config_from_open_clip` builds a timm ViT without pre-norm, whose patch embedding has a
        # bias; open_clip's patch convolution has none.
        width = state_dict["visual.conv1.weight"].shape[0]
        converted[VISION_PREFIX + "patch_embed.proj.bias"] = state_dict["visual.conv1.weight"].new_zeros(width)
    return converted


def vlp_state_dict_to_open_clip(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """State dict of `vlp_lightning.methods.CLIP` -> keys of open_clip's `CLIP`: the inverse of
    `open_clip_state_dict_to_vlp`.

    vision.model.* -> visual.* (class and position embeddings lose timm's batch dims), image_projection.weight
    [D, width] -> visual.proj [width, D] (the identity when the method has no image projection), text.* -> the text
    tower's open_clip names, text_projection.weight [D, width] -> text_projection [width, D], logit_scale unchanged.
    A patch-embedding bias (timm ViTs without pre-norm) is added to the position embeddings of the patch tokens:
    the same sums, since every patch token gets both. Check the architecture with `open_clip_config_from_vlp`.
    """
    vision_names = {timm_name: name for name, timm_name in VISION_RENAMES.items()}
    block_names = {timm_name: name for name, timm_name in BLOCK_RENAMES.items()}
    converted: dict[str, Tensor] = {}
    unsupported: list[str] = []
    patch_bias = None
    for key, value in state_dict.items():
        if key.startswith(VISION_PREFIX):
            name = key.removeprefix(VISION_PREFIX)
            if name == "patch_embed.proj.bias":
                patch_bias = value
            elif name in vision_names:
                converted["visual." + vision_names[name]] = _open_clip_shape(name, value)
            elif (block := _split_block_key(name, TIMM_BLOCK_KEY, block_names)) is not None:
                index, part, rest = block
                converted[f"visual.transformer.resblocks.{index}.{block_names[part]}{rest}"] = value
            else:
                unsupported.append(key)
        elif key == "image_projection.weight":
            converted["visual.proj"] = value.t().contiguous()
        elif key == "text_projection.weight":
            converted["text_projection"] = value.t().contiguous()
        elif key == "logit_scale":
            converted["logit_scale"] = value
        elif key.startswith(TEXT_PREFIX) and (
            (name := key.removeprefix(TEXT_PREFIX)) in TEXT_NAMES or _split_block_key(name) is not None
        ):
            converted[name] = value
        else:
            unsupported.append(key)
    if unsupported:
        raise ValueError(f"parameters with no counterpart in open_clip's CLIP: {unsupported}")
    if patch_bias is not None:
        positions = converted["visual.positional_embedding"].clone()  # [1 + L, width], the class token first
        positions[1:] += patch_bias
        converted["visual.positional_embedding"] = positions
    if "visual.class_embedding" in converted and "visual.proj" not in converted:  # project_image=False
        width = converted["visual.class_embedding"].shape[0]
        converted["visual.proj"] = torch.eye(width, dtype=converted["visual.class_embedding"].dtype)
    return converted


def _split_block_key(
    name: str, pattern: re.Pattern = BLOCK_KEY, parts: Mapping[str, str] = BLOCK_RENAMES
) -> tuple[str, str, str] | None:
    """<blocks>.<i>.<part><rest> -> (i, part, rest) for a known block part, else None (open_clip's block names by
    default; timm's with `TIMM_BLOCK_KEY` and the inverse renames)."""
    match = pattern.fullmatch(name)
    if match is None:
        return None
    index, parameter = match.groups()
    for part in parts:
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


def _open_clip_shape(timm_name: str, value: Tensor) -> Tensor:
    """open_clip keeps the class embedding as [C] and position embeddings as [1 + L, C]."""
    if timm_name == "cls_token":
        return value.reshape(-1)
    if timm_name == "pos_embed":
        return value.squeeze(0)
    return value


#: open_clip's CLIPVisionCfg / CLIPTextCfg defaults for the fields we read (configs omit defaulted fields).
VISION_DEFAULTS = {
    "image_size": 224,
    "patch_size": 16,
    "width": 768,
    "layers": 12,
    "head_width": 64,
    "mlp_ratio": 4.0,
    "no_ln_pre": False,
    "norm_kwargs": None,
}
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
    **{name: value for name, value in _CUSTOM_BLOCK_DEFAULTS.items() if name != "norm_kwargs"},
    "timm_model_name": None,
    "attentional_pool": False,
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
#: (LayerNorm eps, QuickGELU) -> the timm ViT whose defaults carry them; VisionEncoder sets the rest. The CLIP
#: towers always have a pre-norm; the ImageNet ViT gets one from `pre_norm` where the config has ln_pre.
TIMM_VITS = {
    (1e-5, False): "vit_base_patch16_clip_224",
    (1e-5, True): "vit_base_patch16_clip_quickgelu_224",
    (1e-6, False): "vit_base_patch16_224",
}
CLIP_LAYER_NORM_EPS = 1e-5  # open_clip's default, and CLIP's


def vision_config_from_open_clip(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """open_clip model config -> `VisionEncoder` arguments reproducing its ViT image tower.

    The timm name only carries what the overrides do not: CLIP's pre-norm, LayerNorm eps 1e-5 and the
    activation (QuickGELU for the "-quickgelu" configs, i.e. OpenAI's original weights); configs without ln_pre
    and with eps 1e-6 in `norm_kwargs` (what `open_clip_config_from_vlp` writes for an ImageNet-style timm ViT)
    get timm's ImageNet ViT.
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
    norm_kwargs = vision["norm_kwargs"] or {}
    if set(norm_kwargs) - {"eps"}:
        raise ValueError(f"open_clip vision_cfg.norm_kwargs other than eps are not supported: {norm_kwargs}")
    eps = norm_kwargs.get("eps", CLIP_LAYER_NORM_EPS)
    model_name = TIMM_VITS.get((eps, quick_gelu))
    if model_name is None or (vision["no_ln_pre"] and eps == CLIP_LAYER_NORM_EPS):
        raise ValueError(
            f"no timm ViT that VisionEncoder builds has LayerNorm eps {eps}, {'QuickGELU' if quick_gelu else 'GELU'}"
            f"{' and no ln_pre' if vision['no_ln_pre'] else ''}; supported: eps 1e-5 with ln_pre (CLIP's towers), "
            "or eps 1e-6 with GELU (timm's ImageNet ViT)"
        )
    return {
        "model_name": model_name,
        "img_size": vision["image_size"],
        "patch_size": vision["patch_size"],
        "width": vision["width"],
        "depth": vision["layers"],
        "num_heads": vision["width"] // vision["head_width"],
        "mlp_ratio": vision["mlp_ratio"],
        "pool": "token",
        "pre_norm": not vision["no_ln_pre"],
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


def open_clip_config_from_vlp(method: nn.Module) -> dict[str, Any]:
    """The open_clip model config (`open_clip.CLIP(**config)`) of a CLIP-family method (`vision`, `text`,
    `tokenizer`, `image_projection`, `text_projection`), or a ValueError naming what open_clip's CLIP cannot express.

    open_clip's CLIP is: a ViT image tower (class token, learnt position embeddings, class-token pooling, pre-LN
    blocks with biases, one LayerNorm eps), the causal text tower pooled at the largest token id (CLIP BPE's
    end-of-text token, so only with `CLIPTokenizer` and open_clip's merges), one activation for both towers (its
    `quick_gelu` switch) and bias-free linear projections. Pair with `vlp_state_dict_to_open_clip`.
    """
    text, tokenizer = method.text, method.tokenizer
    if not isinstance(text, TextTransformer):
        raise ValueError(
            f"the text tower is {type(text).__name__}, not the built-in TextTransformer open_clip's CLIP has"
        )
    if not isinstance(tokenizer, CLIPTokenizer) or not _is_open_clip_vocab(tokenizer.vocab_path):
        own_merges = " with another merges file" if isinstance(tokenizer, CLIPTokenizer) else ""
        raise ValueError(
            f"the tokenizer is {type(tokenizer).__name__}{own_merges}, but open_clip tokenizes with CLIP BPE and its "
            "own merges file (vlp_lightning.modules.CLIPTokenizer without vocab_path)"
        )
    for name in ("image_projection", "text_projection"):
        projection = getattr(method, name)
        linear = isinstance(projection, nn.Linear) and projection.bias is None
        if not linear and not (name == "image_projection" and isinstance(projection, nn.Identity)):
            raise ValueError(f"the {name} is {type(projection).__name__}, not the bias-free linear map open_clip has")
    vision_cfg, vision_quick_gelu = _open_clip_vision_cfg(method.vision)
    block = text.transformer["resblocks"][0]
    text_quick_gelu = isinstance(block.mlp.act, QuickGELU)
    if vision_quick_gelu != text_quick_gelu:
        raise ValueError(
            "the image tower and the text tower use different activations (GELU and QuickGELU); open_clip's CLIP "
            "uses one for both (quick_gelu)"
        )
    return {
        "embed_dim": method.text_projection.out_features,
        "quick_gelu": text_quick_gelu,
        "vision_cfg": vision_cfg,
        "text_cfg": {
            "context_length": text.context_length,
            "vocab_size": text.token_embedding.num_embeddings,
            "width": text.num_features,
            "heads": block.attn.num_heads,
            "layers": len(text.transformer["resblocks"]),
            "mlp_ratio": block.mlp.c_fc.out_features / text.num_features,
        },
    }


def _is_open_clip_vocab(vocab_path: str) -> bool:
    try:
        return filecmp.cmp(vocab_path, default_clip_vocab_path(), shallow=False)
    except FileNotFoundError:  # open_clip is not installed: nothing to compare with
        return False


def _open_clip_vision_cfg(vision: nn.Module) -> tuple[dict[str, Any], bool]:
    """(open_clip vision_cfg, QuickGELU?) of a `VisionEncoder` holding a timm ViT open_clip's ViT reproduces."""
    vit = getattr(vision, "model", None)
    if type(vit) is not VisionTransformer:
        raise ValueError(
            f"the image tower is {type(vit or vision).__name__}, not a plain timm VisionTransformer (open_clip's CLIP "
            "has a ViT image tower)"
        )
    blocks = list(vit.blocks)
    if type(vit.patch_embed) is not PatchEmbed or any(
        type(block) is not Block or type(block.attn) is not Attention or type(block.mlp) is not Mlp for block in blocks
    ):
        raise ValueError("the image tower has other parts than timm's PatchEmbed / Block / Attention / Mlp, which "
                         "open_clip's ViT does not")
    width, heads = vit.embed_dim, blocks[0].attn.num_heads
    hidden = blocks[0].mlp.fc1.out_features
    activation = type(blocks[0].mlp.act)
    layer_norms = [module for module in vit.modules() if isinstance(module, nn.LayerNorm)]
    eps = {module.eps for module in layer_norms}
    image_size, patch_size = vit.patch_embed.img_size, vit.patch_embed.patch_size
    identities = [vit.patch_embed.norm, vit.fc_norm]
    for block in blocks:
        identities += [block.ls1, block.ls2, block.attn.q_norm, block.attn.k_norm, block.mlp.norm]
        identities += [getattr(block.attn, "norm", nn.Identity())]  # timm's scale_attn_norm
    problems = {
        "no class token": not vit.has_class_token,
        "register tokens": vit.num_reg_tokens > 0,
        "position embeddings without the class token": vit.no_embed_class,
        "no learnt position embeddings": vit.pos_embed is None,
        f"{vit.global_pool!r} pooling instead of the class token": vit.global_pool != "token"
        or vit.attn_pool is not None,
        "no final LayerNorm before pooling": not isinstance(vit.norm, nn.LayerNorm),
        "layer scale, or norms inside the patch embedding, attention or MLP, or after pooling": not all(
            isinstance(module, nn.Identity) for module in identities
        ),
        "non-square images or patches": image_size is None or len(set(image_size)) > 1 or len(set(patch_size)) > 1,
        "linear layers without biases": any(
            layer.bias is None
            for block in blocks
            for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2)
        ),
        "gated or narrowed attention": any(
            getattr(block.attn, "gate", None) is not None or block.attn.qkv.out_features != 3 * width
            for block in blocks
        ),
        "blocks of different sizes": any(
            (block.attn.num_heads, block.mlp.fc1.out_features, type(block.mlp.act)) != (heads, hidden, activation)
            for block in blocks
        ),
        f"the activation {activation.__name__}": activation not in (nn.GELU, TimmQuickGELU)
        or (activation is nn.GELU and blocks[0].mlp.act.approximate != "none"),
        "LayerNorms without affine parameters or with different eps": len(eps) != 1
        or any(module.weight is None or module.bias is None for module in layer_norms),
        "an MLP width open_clip cannot derive from mlp_ratio": int(width * (hidden / width)) != hidden,
    }
    found = [problem for problem, present in problems.items() if present]
    if found:
        raise ValueError(f"the image tower has {', '.join(found)}, which open_clip's ViT does not")
    vision_cfg: dict[str, Any] = {
        "image_size": image_size[0],
        "patch_size": patch_size[0],
        "width": width,
        "layers": len(blocks),
        "head_width": width // heads,
        "mlp_ratio": hidden / width,
    }
    if isinstance(vit.norm_pre, nn.Identity):
        vision_cfg["no_ln_pre"] = True
    (layer_norm_eps,) = eps
    if layer_norm_eps != CLIP_LAYER_NORM_EPS:
        vision_cfg["norm_kwargs"] = {"eps": layer_norm_eps}
    return vision_cfg, activation is TimmQuickGELU
