"""`vlp export CKPT OUT`: a checkpoint's towers load in timm, open_clip and transformers and give the features and
embeddings of the checkpoint's model; bad input ends in one sentence.

The CLIP checkpoint comes from a real `vlp fit` of the tiny recipe (one step on generated shards, once per module).
The other methods' checkpoints are written here the way Lightning writes them (state dict, hyper-parameters, the
`vlp` record) next to a `version_0/config.yaml`, which keeps those tests to a second or two.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import yaml
from torch import nn

from conftest import generate_shards
from vlp_lightning.cli import main as vlp_main
from vlp_lightning.commands import export
from vlp_lightning.methods import CLIP, ConVIRT
from vlp_lightning.methods.base import _class_path
from vlp_lightning.modules import CLIPTokenizer, TextTransformer, VisionEncoder
from vlp_lightning.modules.open_clip_import import (
    open_clip_config_from_vlp,
    open_clip_state_dict_to_vlp,
    text_config_from_open_clip,
    vision_config_from_open_clip,
)

REPO = Path(__file__).parents[1]
CLIP_TINY = str(REPO / "experiments/clip/emoji_tiny.yaml")
TINY_MODEL = [  # as tests/test_cli.py: the recipe shrunk so one step takes a second
    "--model.init_args.vision.init_args.img_size", "32",
    "--model.init_args.vision.init_args.depth", "2",
    "--model.init_args.text.init_args.layers", "1",
]
CAPTIONS = ["a photo of a red square", "a photo of a green circle", "a blue triangle on grey", "x" * 50]


def tiny_recipe_clip() -> CLIP:
    """The CLIP that `emoji_tiny.yaml` + TINY_MODEL configure, built here by hand (not from a config file)."""
    return CLIP(
        vision=VisionEncoder("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2),
        text=TextTransformer(vocab_size=49408, context_length=32, width=128, layers=1, heads=4),
        tokenizer=CLIPTokenizer(context_length=32),
        embed_dim=128,
    )


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clip_run")
    shards = generate_shards(root / "shards", n=16, per_shard=16)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setattr("sys.argv", ["vlp"])
        vlp_main(["fit", "--config", CLIP_TINY, "--data.train_shards", shards.pattern, "--data.val_shards", "null",
                  "--data.batch_size", "8", "--data.num_workers", "0", "--trainer.max_steps", "1",
                  "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
                  "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(root / "run"),
                  *TINY_MODEL])
    return root / "run/checkpoints/last.ckpt"


@pytest.fixture(scope="module")
def clip_reference(clip_checkpoint) -> CLIP:
    """The checkpoint's model, loaded without `vlp export`."""
    method = tiny_recipe_clip()
    method.load_state_dict(torch.load(clip_checkpoint, weights_only=True)["state_dict"], strict=True)
    return method.eval()


@pytest.fixture(scope="module")
def clip_export(clip_checkpoint, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("exported") / "clip_emoji_tiny"
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        assert export.main([str(clip_checkpoint), str(out)]) == 0
    return out, summary.getvalue()


def test_clip_checkpoint_exports_timm_and_open_clip_as_safetensors_and_json(clip_export) -> None:
    out, summary = clip_export
    files = sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file())
    assert files == ["open_clip/open_clip_config.json", "open_clip/open_clip_model.safetensors",
                     "vision/config.json", "vision/model.safetensors"]
    for path in out.rglob("*.safetensors"):  # no pickle: every weight file is safetensors, every config JSON
        assert safetensors.torch.load_file(path)
    for path in out.rglob("*.json"):
        json.loads(path.read_text())
    lines = summary.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["vision/", "open_clip/", "text/"]  # one line per output
    assert f"timm.create_model('local-dir:{out / 'vision'}', pretrained=True)" in lines[1]
    assert f"open_clip.create_model_and_transforms('local-dir:{out / 'open_clip'}')" in lines[2]
    assert "not written" in lines[3] and "part of open_clip/" in lines[3]


def test_vision_tower_reloads_in_timm_with_the_checkpoints_features(clip_export, clip_reference) -> None:
    out, _ = clip_export
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = clip_reference.vision(images)
        from_folder = timm.create_model(f"local-dir:{out / 'vision'}", pretrained=True).eval()
        config = json.loads((out / "vision/config.json").read_text())
        by_hand = timm.create_model(config["architecture"], pretrained=False, **config["model_args"]).eval()
        by_hand.load_state_dict(safetensors.torch.load_file(out / "vision/model.safetensors"), strict=True)
        assert torch.allclose(from_folder(images), expected, atol=1e-6)
        assert torch.allclose(by_hand(images), expected, atol=1e-6)
    assert config["pretrained_cfg"]["mean"] == list(clip_reference.vision.mean)
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]


def test_open_clip_export_round_trips_vlp_open_clip_vlp_with_equal_embeddings(clip_export, clip_reference) -> None:
    open_clip = pytest.importorskip("open_clip")
    folder = clip_export[0] / "open_clip"
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")  # loads strictly
    model.eval()
    tokens = clip_reference.tokenizer(CAPTIONS)
    assert torch.equal(open_clip.get_tokenizer(f"local-dir:{folder}")(CAPTIONS), tokens["input_ids"])
    assert tuple(preprocess.transforms[-1].mean) == clip_reference.vision.mean
    model_cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    back = CLIP(
        vision=VisionEncoder(**vision_config_from_open_clip(model_cfg)),
        text=TextTransformer(**text_config_from_open_clip(model_cfg)),
        tokenizer=CLIPTokenizer(context_length=model_cfg["text_cfg"]["context_length"]),
        embed_dim=model_cfg["embed_dim"],
    ).eval()
    back.load_state_dict(open_clip_state_dict_to_vlp(model.state_dict()), strict=True)
    images = torch.randn(len(CAPTIONS), 3, 32, 32)
    with torch.no_grad():
        image_embeddings = clip_reference.encode_image(images)
        text_embeddings = clip_reference.encode_text(tokens)
        assert torch.allclose(model.encode_image(images, normalize=True), image_embeddings, atol=1e-5)
        assert torch.allclose(model.encode_text(tokens["input_ids"], normalize=True), text_embeddings, atol=1e-5)
        assert torch.allclose(back.encode_image(images), image_embeddings, atol=1e-5)
        assert torch.allclose(back.encode_text(tokens), text_embeddings, atol=1e-5)
    assert torch.equal(model.logit_scale, clip_reference.logit_scale)
    assert torch.equal(back.logit_scale, model.logit_scale)


# ---------------------------------------------------------------------------------------------- other methods
def instantiate(node):
    """{"class_path", "init_args"} -> the object, recursively (as LightningCLI builds a config)."""
    if isinstance(node, dict) and "class_path" in node:
        module, _, name = node["class_path"].rpartition(".")
        arguments = {key: instantiate(value) for key, value in node.get("init_args", {}).items()}
        return getattr(importlib.import_module(module), name)(**arguments)
    return node


def write_run(directory: Path, model_config: dict) -> tuple[Path, nn.Module]:
    """A run folder as `vlp fit` leaves it: checkpoints/last.ckpt (weights moved off their initialisation, so an
    export that skipped them would differ) and version_0/config.yaml; -> (checkpoint, the model in eval mode)."""
    torch.manual_seed(7)
    method = instantiate(model_config)
    with torch.no_grad():
        for parameter in method.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    (directory / "checkpoints").mkdir(parents=True)
    (directory / "version_0").mkdir()
    checkpoint = directory / "checkpoints/last.ckpt"
    torch.save({"state_dict": method.state_dict(), "vlp": {"method": _class_path(method)},
                "hyper_parameters": {**method.hparams, "_class_path": model_config["class_path"]}}, checkpoint)
    (directory / "version_0/config.yaml").write_text(yaml.safe_dump({"model": model_config}))
    return checkpoint, method.eval()


def tiny_vit(**overrides) -> dict:
    arguments = {"model_name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "width": 32, "depth": 1,
                 "num_heads": 2, **overrides}
    return {"class_path": "vlp_lightning.modules.VisionEncoder", "init_args": arguments}


def tiny_bert(directory: Path) -> str:
    """A randomly initialised BERT config and a WordPiece vocabulary, written locally (nothing downloaded)."""
    from transformers import BertConfig, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "red", "green", "square", "circle"]
    directory.mkdir()
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(directory / "vocab.txt")).save_pretrained(directory)
    BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=16).save_pretrained(directory)
    return str(directory)


def test_hf_text_tower_is_saved_with_its_tokenizer_and_pooling(tmp_path, capsys) -> None:
    from transformers import AutoModel, AutoTokenizer

    bert = tiny_bert(tmp_path / "bert")
    checkpoint, method = write_run(tmp_path / "run", {"class_path": "vlp_lightning.methods.CLIP", "init_args": {
        "vision": tiny_vit(),
        "text": {"class_path": "vlp_lightning.modules.HFTextEncoder",
                 "init_args": {"name_or_path": bert, "pooling": "max", "from_config": True}},
        "tokenizer": {"class_path": "vlp_lightning.modules.HFTokenizer",
                      "init_args": {"path": bert, "context_length": 12}},
        "embed_dim": 16}})
    out = tmp_path / "out"
    assert export.main([str(checkpoint), str(out)]) == 0
    summary = capsys.readouterr().out
    assert "open_clip/ not written" in summary and "HFTextEncoder" in summary
    assert not (out / "open_clip").exists()
    assert (out / "text/model.safetensors").is_file() and not list(out.rglob("*.bin"))
    assert json.loads((out / "text/vlp_pooling.json").read_text()) == {"pooling": "max", "max_length": 12}
    tokens = method.tokenizer(["a photo of a red square", "a green circle"])
    reloaded = AutoTokenizer.from_pretrained(out / "text")(["a photo of a red square", "a green circle"],
                                                           padding="max_length", max_length=12, return_tensors="pt")
    assert torch.equal(reloaded["input_ids"], tokens["input_ids"])
    model = AutoModel.from_pretrained(out / "text").eval()
    with torch.no_grad():
        hidden = model(**tokens).last_hidden_state
        pooled = hidden.masked_fill(tokens["attention_mask"].unsqueeze(-1) == 0, float("-inf")).amax(dim=1)
        assert torch.allclose(pooled, method.text(tokens), atol=1e-5)


def test_method_without_joint_space_exports_only_its_vision_tower(tmp_path, capsys) -> None:
    checkpoint, method = write_run(tmp_path / "run", {"class_path": "vlp_lightning.methods.SwAV", "init_args": {
        "vision": {"class_path": "vlp_lightning.modules.VisionEncoder",
                   "init_args": {"model_name": "resnet10t", "img_size": 32}},
        "num_prototypes": 16, "hidden_dim": 32, "projection_dim": 16}})
    out = tmp_path / "out"
    assert export.main([str(checkpoint), str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[0] for line in lines] == ["vision/", "open_clip/"]
    assert "SwAV has no joint image-text space" in lines[1]
    assert sorted(path.name for path in out.iterdir()) == ["vision"]
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reloaded = timm.create_model(f"local-dir:{out / 'vision'}", pretrained=True).eval()
        assert torch.allclose(reloaded(images), method.vision(images), atol=1e-5)


def test_tower_without_its_head_convolution_reloads_as_the_config_says(tmp_path) -> None:
    """ALIGN's EfficientNet drops the 1x1 head convolution (`head_conv=False`), which no timm argument expresses:
    the config lists the modules to replace by Identity before loading."""
    torch.manual_seed(0)
    vision = VisionEncoder("tinynet_e", head_conv=False).eval()
    line = export.export_vision(vision, tmp_path / "vision")
    config = json.loads((tmp_path / "vision/config.json").read_text())
    assert config["identity_modules"] == ["conv_head", "bn2"] and "torch.nn.Identity()" in line
    model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"])
    for name in config["identity_modules"]:
        setattr(model, name, nn.Identity())
    model.load_state_dict(safetensors.torch.load_file(tmp_path / "vision/model.safetensors"), strict=True)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.eval()(images), vision(images), atol=1e-6)


def test_open_clip_config_names_what_open_clip_cannot_express() -> None:
    tokenizer = CLIPTokenizer(context_length=16)

    def clip(vision: dict, act: str = "gelu", **arguments) -> CLIP:
        text = TextTransformer(context_length=16, width=32, layers=1, heads=2, act=act)
        return CLIP(vision=instantiate(vision), text=text, **{"tokenizer": tokenizer, "embed_dim": 16, **arguments})

    assert open_clip_config_from_vlp(clip(tiny_vit()))["vision_cfg"]["no_ln_pre"]
    refused = {
        "'avg' pooling instead of the class token": clip(tiny_vit(pool="avg")),
        "not a plain timm VisionTransformer": clip({"class_path": "vlp_lightning.modules.VisionEncoder",
                                                    "init_args": {"model_name": "resnet10t", "img_size": 32}}),
        "different activations": clip(tiny_vit(), act="quick_gelu"),
        "the tokenizer is ByteTokenizer": clip(tiny_vit(), tokenizer=None),
        "the image_projection is MLPHead": ConVIRT(vision=instantiate(tiny_vit()), text=TextTransformer(
            context_length=16, width=32, layers=1, heads=2), tokenizer=tokenizer, embed_dim=16),
    }
    for reason, method in refused.items():
        with pytest.raises(ValueError, match=reason):
            open_clip_config_from_vlp(method)


# ---------------------------------------------------------------------------------------------- bad input
def export_error(capsys, *argv: str) -> str:
    assert export.main(list(argv)) == 2
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1, message  # one sentence, never a traceback
    assert message[0].startswith("vlp export: error: ")
    return message[0].removeprefix("vlp export: error: ")


def test_bad_checkpoints_and_folders_are_one_sentence(clip_checkpoint, tmp_path, capsys) -> None:
    missing = tmp_path / "missing.ckpt"
    assert export_error(capsys, str(missing), str(tmp_path / "out")) == (
        f"CKPT {missing}: no such file; give the path of a checkpoint written by vlp fit, e.g. "
        "runs/clip/emoji_tiny/checkpoints/last.ckpt")
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "payload": argparse.Namespace(x=1)}, pickled)
    assert export_error(capsys, str(pickled), str(tmp_path / "out")).startswith(
        f"CKPT {pickled} holds pickled Python objects")
    loose = tmp_path / "loose.ckpt"  # away from its run: rebuilt from the model config it stores
    shutil.copy(clip_checkpoint, loose)
    assert export.main([str(loose), str(tmp_path / "out_loose")]) == 0
    assert "built from the model config stored in" in capsys.readouterr().out
    checkpoint = torch.load(loose, weights_only=True)
    del checkpoint["vlp"]["model_config"]  # as checkpoints of older versions: the run's config.yaml is needed
    torch.save(checkpoint, loose)
    message = export_error(capsys, str(loose), str(tmp_path / "out"))
    assert message.startswith(f"found no config.yaml of the run of {loose}") and "pass --config" in message
    (tmp_path / "full").mkdir()
    (tmp_path / "full/notes.txt").write_text("mine")
    assert export_error(capsys, str(clip_checkpoint), str(tmp_path / "full")) == (
        f"OUT {tmp_path / 'full'} already holds files; pass --overwrite to replace an earlier export there, or give "
        "another folder")
    assert export_error(capsys, str(clip_checkpoint), str(tmp_path / "full/notes.txt")).startswith(
        f"OUT {tmp_path / 'full/notes.txt'} is a file")
    assert export_error(capsys).startswith("the following arguments are required: CKPT, OUT")


def test_configs_that_do_not_build_the_checkpoints_model_are_one_sentence(clip_checkpoint, tmp_path, capsys) -> None:
    out = str(tmp_path / "out")
    message = export_error(capsys, str(clip_checkpoint), out, "--config", CLIP_TINY)  # without TINY_MODEL
    assert message.startswith(f"{clip_checkpoint} does not fit the CLIP that {CLIP_TINY} builds (")
    assert message.endswith(f"pass --config with the config {clip_checkpoint} was trained with")
    configs = {
        "swav": {"model": {"class_path": "vlp_lightning.methods.SwAV"}},
        "not_a_method": {"model": {"class_path": "os.system"}},
        "foreign_tower": {"model": {"class_path": "vlp_lightning.methods.CLIP", "init_args": {
            "text": {"class_path": "somewhere.else.TextTower"}}}},
    }
    for name, config in configs.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    message = export_error(capsys, str(clip_checkpoint), out, "--config", str(tmp_path / "swav.yaml"))
    assert message.startswith(f"{clip_checkpoint} was written by vlp_lightning.methods.CLIP, not "
                              "vlp_lightning.methods.SwAV")
    message = export_error(capsys, str(clip_checkpoint), out, "--config", str(tmp_path / "not_a_method.yaml"))
    assert "configures the model os.system, which is not a method of vlp_lightning.methods" in message
    message = export_error(capsys, str(clip_checkpoint), out, "--config", str(tmp_path / "foreign_tower.yaml"))
    assert "sets model.init_args.text to somewhere.else.TextTower" in message and "write_exports" in message


def test_overwrite_replaces_an_earlier_export(clip_checkpoint, clip_export, tmp_path, capsys) -> None:
    out = tmp_path / "again"
    shutil.copytree(clip_export[0], out)
    (out / "vision/stale.json").write_text("{}")
    assert export.main([str(clip_checkpoint), str(out), "--overwrite"]) == 0
    assert not (out / "vision/stale.json").exists() and (out / "vision/model.safetensors").is_file()


def test_help_says_what_is_written_and_how_to_load_it(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        vlp_main(["export", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for expected in ('timm.create_model("local-dir:OUT/vision", pretrained=True)',
                     'open_clip.create_model_and_transforms("local-dir:OUT/open_clip")',
                     'transformers.AutoModel.from_pretrained("OUT/text")', "no pickle", "--config", "--overwrite"):
        assert expected in text
