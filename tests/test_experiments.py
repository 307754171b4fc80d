"""Every recipe in experiments/ parses with the CLI; every tiny one trains a step on generated shards."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from data_modules.builder import main as build_shards
from vlp_lightning import methods
from vlp_lightning.cli import main

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
RECIPES = sorted(path for path in EXPERIMENTS.glob("*/*.yaml") if path.parent.name != "trainer")
TINY = [path for path in RECIPES if path.stem.endswith("_tiny")]
FRAGMENTS = sorted((EXPERIMENTS / "trainer").glob("*.yaml"))


def recipe_id(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setattr("sys.argv", ["vlp"])
    monkeypatch.chdir(tmp_path)


def test_there_are_recipes_for_every_method_family():
    families = {path.parent.name for path in TINY}
    assert {"clip", "convirt", "align", "swav", "mae", "selfie", "sit", "byol", "simclr", "mocov2", "mocov3", "dino",
            "barlowtwins", "vicreg", "mmc", "look", "hvp", "coop", "cocoop", "maple", "pre", "finetune", "drtune",
            "damvp", "damvpmeta", "peftclassifier", "pvp", "llava", "limber", "simvlg", "infmllm", "visionflan",
            "pa-llava", "pllava", "youku-mplug", "xclip", "hecvl", "ophclip", "sigma", "temadapter", "vedit", "violet",
            "robustmae", "gfsltvlp", "ffr"} <= families


@pytest.mark.parametrize("recipe", RECIPES, ids=recipe_id)
def test_recipe_parses(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda path: path.stem)
def test_trainer_fragment_stacks_on_a_recipe(fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(EXPERIMENTS / "clip/emoji_tiny.yaml"), "--config", str(fragment),
              "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "strategy" in capsys.readouterr().out


def model_arguments(recipe: Path) -> dict:
    return yaml.safe_load(recipe.read_text())["model"].get("init_args") or {}


def needs_instances(recipe: Path) -> bool:
    """Whether the recipe's method class needs object boxes or masks in every batch (its `required_keys`)."""
    method_class = getattr(methods, yaml.safe_load(recipe.read_text())["model"]["class_path"].rsplit(".", 1)[1], None)
    return bool({"boxes", "masks"} & set(getattr(method_class, "required_keys", ())))


def adapts(recipe: Path) -> bool:
    """Whether the recipe's method starts from a pretrained checkpoint (`pretrained:`)."""
    return "pretrained" in model_arguments(recipe)


@pytest.mark.parametrize("recipe", TINY, ids=recipe_id)
def test_tiny_recipe_trains_a_step(recipe, make_shards, tmp_path, request):
    shards = make_shards(tmp_path / "shards", n=16, per_shard=16, image_size=32)
    start, train_shards = [], shards.pattern
    if adapts(recipe):  # from the tests' tiny CLIP, classifying (and clustering) the generated shapes (`.cls`)
        start = ["--model.init_args.pretrained", request.getfixturevalue("tiny_clip_checkpoint"),
                 "--model.init_args.label_field", "cls"]
        if "tasks" in model_arguments(recipe):  # DAMVPMeta: one task, the shapes (their manifest names the classes)
            start += ["--model.init_args.tasks", json.dumps([shards.pattern])]
        else:
            start += ["--model.init_args.classnames_from", shards.pattern]
        if "cluster_shards" in model_arguments(recipe):
            start += ["--model.init_args.cluster_shards", shards.pattern]
    position_prompts = "position_prompts: true" in recipe.read_text()  # PTP reads the scenes' instance masks
    long_captions = re.search(r"caption_source: (long|mixed)|methods\.DreamLIP", recipe.read_text())  # .json
    if (model_arguments(recipe).get("stage") == "fine" or position_prompts or needs_instances(recipe)
            or long_captions):  # the tests' tiny scenes
        train_shards = str(request.getfixturevalue("scene_shards") / "train-000000.tar")
    if recipe.parent.name == "ffr":  # groups in `.json`: the tests' tiny `vlp-data ffr` set; step 2 from scratch
        train_shards = str(request.getfixturevalue("ffr_shards") / "train-000000.tar")
        start += ["--model.init_args.classnames_from", train_shards]
        if "start_from" in model_arguments(recipe):
            start += ["--model.init_args.start_from", "null"]
    if "peft_checkpoint" in model_arguments(recipe):  # PVP's upstream run is another recipe's: start without it
        start += ["--model.init_args.peft_checkpoint", "null"]
    if "knowledge" in model_arguments(recipe):  # ARL's knowledge.json is `vlp-data wordnet`'s: start without it
        start += ["--model.init_args.knowledge", "null"]
    if "language_model" in model_arguments(recipe):  # frozen-LM family: the tiny random LM, no earlier runs
        # the tiny LM's byte tokenizer makes ~4x SmolLM2's tokens: room for the answers after the prompts
        start += ["--model.init_args.language_model.init_args.name", "tiny", "--model.init_args.max_length", "512"]
        if "image_tower" in model_arguments(recipe):
            start += ["--model.init_args.image_tower", request.getfixturevalue("tiny_clip_checkpoint")]
        if "start_from" in model_arguments(recipe):
            start += ["--model.init_args.start_from", "null"]
        if "InstructionDataModule" in recipe.read_text():  # `vlp-data instructions` of the generated shards
            assert build_shards(["instructions", shards.pattern, str(tmp_path / "instructions")]) == 0
            train_shards = str(tmp_path / "instructions" / "train-000000.tar")
    if "VideoDataModule" in recipe.read_text():  # clips with timelines: `vlp-data moving` of the generated shapes
        assert build_shards(["moving", str(tmp_path / "clips"), "--images", shards.pattern, "--source", "images",
                             "--count", "8", "--frames", "8", "--size", "32"]) == 0
        train_shards = str(tmp_path / "clips" / "train-*.tar")
        if "pretrained_clip" in model_arguments(recipe):  # from the tests' tiny CLIP, not the emoji run
            start += ["--model.init_args.pretrained_clip", request.getfixturevalue("tiny_clip_checkpoint")]
        if "target_tower" in model_arguments(recipe):  # SIGMA (DINO): the tiny CLIP's tower, not the DINO run's
            start += ["--model.init_args.target_tower", request.getfixturevalue("tiny_clip_checkpoint")]
    main(["fit", "--config", str(recipe), *start, "--data.train_shards", train_shards, "--data.val_shards", "null",
          "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.max_steps", "1",
          "--trainer.callbacks", "[]", "--trainer.val_check_interval", "1.0", "--trainer.check_val_every_n_epoch", "1",
          "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false"])
    assert list((tmp_path / "runs").glob("*/*/checkpoints/last.ckpt"))
