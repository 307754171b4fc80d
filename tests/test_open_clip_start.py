"""open_clip weights as a start: an open_clip model folder (config + weights, as the hub and `vlp export` hold them)
rebuilds as our CLIP with the same embeddings, and every `pretrained:` start takes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlp_lightning import methods
from vlp_lightning.callbacks.zero_shot import build_zero_shot_classifier
from vlp_lightning.commands.export import export_open_clip
from vlp_lightning.methods import CLIP
from vlp_lightning.modules import CLIPTokenizer, TextTransformer, VisionEncoder
from vlp_lightning.modules.open_clip_import import vlp_state_dict_to_open_clip
from vlp_lightning.pretrained import PretrainedError, load_method

CLASSES = ["red apple", "grinning face", "blue car", "green tree"]


@pytest.fixture(scope="module")
def clip_and_folder(tmp_path_factory) -> tuple[CLIP, Path]:
    torch.manual_seed(0)
    clip = CLIP(vision=VisionEncoder("vit_tiny_patch16_224", img_size=32, patch_size=8, width=64, depth=2,
                                     num_heads=2, pre_norm=True, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)),
                text=TextTransformer(vocab_size=49408, context_length=16, width=64, layers=2, heads=2),
                tokenizer=CLIPTokenizer(context_length=16), embed_dim=32).eval()
    folder = tmp_path_factory.mktemp("open_clip") / "ViT-tiny"
    export_open_clip(clip, folder)
    return clip, folder


def embeddings(clip: CLIP) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    with torch.no_grad():
        return (clip.encode_image(torch.randn(3, 3, 32, 32)),
                clip.encode_text(clip.tokenizer(["a photo of a cat", "a dog", "x" * 40])))


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_an_open_clip_folder_loads_as_our_clip_with_the_same_embeddings(clip_and_folder, weights, tmp_path):
    clip, folder = clip_and_folder
    if weights == "bin":  # the hub's other file name: a torch state dict under open_clip's names
        folder = tmp_path / "bin"
        folder.mkdir()
        (folder / "open_clip_config.json").write_text((clip_and_folder[1] / "open_clip_config.json").read_text())
        torch.save(vlp_state_dict_to_open_clip(clip.state_dict()), folder / "open_clip_pytorch_model.bin")
    loaded, source = load_method(str(folder))
    assert isinstance(loaded, CLIP) and "open_clip" in source and not loaded.training
    assert loaded.vision.mean == clip.vision.mean and loaded.vision.std == clip.vision.std
    for ours, theirs in zip(embeddings(clip), embeddings(loaded)):
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_coop_starts_from_open_clip_weights_as_from_the_checkpoint(clip_and_folder):
    """CoOp at the template's words is the zero-shot classifier of the CLIP it starts from (test_adaptation):
    from the open_clip folder, that is the original CLIP's classifier."""
    clip, folder = clip_and_folder
    coop = methods.CoOp(pretrained=str(folder), classnames=CLASSES, n_ctx=None, ctx_init="a photo of a")
    assert not any(parameter.requires_grad for parameter in coop.pretrained.parameters())
    with torch.no_grad():
        prompted = coop.class_embeddings(CLASSES, torch.zeros(1, coop.embed_dim))[0]
        zero_shot = build_zero_shot_classifier(clip, clip.tokenizer, CLASSES, ["a photo of a {}."])
    assert torch.allclose(prompted, zero_shot, atol=1e-5)


def test_bad_open_clip_folders_are_one_sentence(clip_and_folder, tmp_path):
    _, folder = clip_and_folder
    config = json.loads((folder / "open_clip_config.json").read_text())
    with pytest.raises(PretrainedError, match="folder without open_clip_config.json"):
        load_method(str(tmp_path))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedError, match="no weights; put open_clip_model.safetensors or"):
        load_method(str(no_weights), name="pretrained")
    resnet = tmp_path / "resnet"
    resnet.mkdir()
    config["model_cfg"]["vision_cfg"]["layers"] = [3, 4, 6, 3]
    (resnet / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedError, match=r"pretrained .*resnet: .*ResNet image towers .* not supported"):
        load_method(str(resnet), name="pretrained")
    (resnet / "open_clip_config.json").write_text("{}")
    with pytest.raises(PretrainedError, match="no 'model_cfg' entry"):
        load_method(str(resnet))
