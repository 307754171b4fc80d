"""The `vlp` command as a user runs it: recipes train, methods swap by class path, bad input gets one sentence."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlp_lightning.cli import available_methods, main

CLIP_TINY = str(Path(__file__).parents[1] / "experiments/clip/emoji_tiny.yaml")
TINY_MODEL = [  # shrink the recipe further so each run takes seconds
    "--model.init_args.vision.init_args.img_size", "32",
    "--model.init_args.vision.init_args.depth", "2",
    "--model.init_args.text.init_args.layers", "1",
]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch, tmp_path):
    """The CLI reads sys.argv when given no args; keep pytest's own arguments out of it; runs/ goes to tmp."""
    monkeypatch.setattr("sys.argv", ["vlp"])
    monkeypatch.chdir(tmp_path)


def run_vlp(*args: str) -> None:
    main(list(args))


def fit_args(shards, *extra: str) -> list[str]:
    return ["fit", "--config", CLIP_TINY, "--data.train_shards", shards.pattern, "--data.val_shards", "null",
            "--data.batch_size", "8", "--data.num_workers", "0", "--trainer.max_steps", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *TINY_MODEL, *extra]


def error_of(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_vlp(*args)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1, message  # one sentence, no traceback wall
    return message[0]


def test_clip_recipe_trains_and_writes_checkpoint_and_tensorboard(make_shards, tmp_path, monkeypatch):
    shards = make_shards(tmp_path / "shards", n=32, per_shard=16)
    run_vlp(*fit_args(shards))
    assert (tmp_path / "runs/clip/emoji_tiny/checkpoints/last.ckpt").is_file()
    assert list((tmp_path / "runs/clip/emoji_tiny").glob("version_*/events.out.tfevents.*"))


@pytest.mark.parametrize("method", ["vlp_lightning.methods.ConVIRT", "vlp_lightning.methods.SwAV",
                                    "vlp_lightning.methods.MAE"])
def test_swap_method_by_class_path_alone(method, make_shards, tmp_path, monkeypatch):
    if method not in available_methods():
        pytest.skip(f"{method} is not in the methods index")
    shards = make_shards(tmp_path / "shards", n=32, per_shard=16)
    run_vlp(*fit_args(shards, "--model", method))
    name = method.rsplit(".", 1)[-1].lower()
    assert (tmp_path / f"runs/{name}/emoji_tiny/checkpoints/last.ckpt").is_file()


def test_unknown_method_lists_the_available_ones(capsys):
    message = error_of(capsys, "fit", "--config", CLIP_TINY, "--model", "vlp_lightning.methods.NoSuchMethod")
    assert "unknown method 'vlp_lightning.methods.NoSuchMethod'" in message
    assert "vlp_lightning.methods.CLIP" in message and "vlp_lightning.methods.ConVIRT" in message


def test_wrong_argument_type_names_the_key(capsys):
    message = error_of(capsys, "fit", "--config", CLIP_TINY, "--data.batch_size", "many")
    assert "data.init_args.batch_size" in message and "many" in message


def test_missing_shards_path_says_how_to_build_them(capsys, tmp_path):
    missing = str(tmp_path / "nowhere/train-{000000..000001}.tar")
    message = error_of(capsys, "fit", "--config", CLIP_TINY, "--data.train_shards", missing, "--data.val_shards",
                       "null", *TINY_MODEL)
    assert "train_shards" in message and "vlp-data" in message


def test_text_less_data_under_clip_names_the_missing_key(capsys, make_shards, tmp_path):
    shards = make_shards(tmp_path / "shards", n=16, per_shard=16, with_text=False)
    message = error_of(capsys, *fit_args(shards))
    assert "text" in message and "SwAV" in message


# Methods and the recipes of another method they must fit into: the older image methods into an SSL recipe on
# emoji and one on Fashion-MNIST; the methods of issue 14 into CLIP's emoji recipe.
SSL_SWAPS = [
    *[(method, recipe) for method in ("SwAV", "MAE", "Selfie", "SiT")
      for recipe in ("swav/emoji_tiny", "mae/fashion_mnist_tiny")],
    *[(method, "clip/emoji_tiny")
      for method in ("BYOL", "SimCLR", "MoCoV2", "MoCoV3", "DINO", "BarlowTwins", "VICReg", "MMC", "LOOK", "HVP")],
]


@pytest.mark.parametrize(("method", "recipe"), SSL_SWAPS)
def test_self_supervised_methods_swap_into_other_methods_recipes(method, recipe, make_shards, tmp_path):
    """Only the data (16 generated samples) is overridden; the method changes by `--model` alone, and its
    views, resolution and optimizer come from the recipe and the method's own defaults."""
    shards = make_shards(tmp_path / "shards", n=16, per_shard=16, image_size=32)
    run_vlp("fit", "--config", str(Path(__file__).parents[1] / f"experiments/{recipe}.yaml"),
            "--model", f"vlp_lightning.methods.{method}",
            "--data.train_shards", shards.pattern, "--data.val_shards", "null", "--data.batch_size", "4",
            "--data.num_workers", "0", "--trainer.max_steps", "1", "--trainer.callbacks", "[]",
            "--trainer.val_check_interval", "1.0", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false")
    assert (tmp_path / f"runs/{method.lower()}/{recipe.split('/')[1]}/checkpoints/last.ckpt").is_file()


@pytest.mark.parametrize("value", ["0", "-4"])
def test_non_positive_batch_size_is_one_sentence(capsys, value):
    message = error_of(capsys, "fit", "--config", CLIP_TINY, "--data.init_args.batch_size", value)
    assert message == (f"vlp: error: bad value '{value}' for 'data.init_args.batch_size' of "
                       f"data_modules.ImageTextDataModule: Not of type PositiveInt: {value} does not conform to "
                       "restriction v>0 (see --help or --print_config for the expected types)")


def test_nan_learning_rate_names_the_key_not_an_unknown_method(capsys):
    message = error_of(capsys, "fit", "--config", CLIP_TINY, "--model.init_args.optimizer.init_args.lr", "nan")
    assert message.startswith("vlp: error: bad value 'nan' for 'model.init_args.optimizer.init_args.lr' of "
                              "vlp_lightning.methods.CLIP: expected float")
    assert "unknown method" not in message


def test_unknown_model_argument_is_named(capsys):
    message = error_of(capsys, "fit", "--config", CLIP_TINY, "--model.init_args.no_such_knob", "3")
    assert message == ("vlp: error: unknown argument 'model.init_args.no_such_knob' for vlp_lightning.methods.CLIP; "
                       "`--print_config` lists the arguments it takes")


def _bad_checkpoints(directory: Path) -> dict[str, Path]:
    import argparse

    import torch

    good = directory / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "global_step": 1}, good)
    files = {"truncated": good.read_bytes()[: len(good.read_bytes()) // 2], "zero-byte": b"",
             "garbage": b"this is not a checkpoint at all\n" * 10}
    paths = {}
    for name, data in files.items():
        paths[name] = directory / f"{name}.ckpt"
        paths[name].write_bytes(data)
    paths["pickled"] = directory / "pickled.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "payload": argparse.Namespace(x=1)}, paths["pickled"])
    return paths


def test_unusable_checkpoints_are_one_sentence(capsys, tmp_path):
    paths = _bad_checkpoints(tmp_path)
    missing = tmp_path / "missing.ckpt"
    assert error_of(capsys, "fit", "--config", CLIP_TINY, "--ckpt_path", str(missing)) == (
        f"vlp: error: --ckpt_path {missing}: no such file; give the path of a checkpoint, or --ckpt_path last to "
        "resume the experiment's newest one")
    for name in ("truncated", "zero-byte", "garbage"):
        message = error_of(capsys, "fit", "--config", CLIP_TINY, "--ckpt_path", str(paths[name]))
        assert message.startswith(f"vlp: error: --ckpt_path {paths[name]} is not a complete checkpoint (")
        assert message.endswith("resume from another one (--ckpt_path last picks the newest complete checkpoint of "
                                "the experiment)")
    message = error_of(capsys, "fit", "--config", CLIP_TINY, "--ckpt_path", str(paths["pickled"]))
    assert message.startswith(f"vlp: error: --ckpt_path {paths['pickled']} holds pickled Python objects")
    assert message.endswith("use a checkpoint written by vlp (tensors and plain values)")


def test_default_root_dir_holds_the_whole_run(make_shards, tmp_path):
    shards = make_shards(tmp_path / "shards", n=16, per_shard=16)
    run_vlp(*fit_args(shards, "--trainer.default_root_dir", str(tmp_path / "elsewhere")))
    assert (tmp_path / "elsewhere/checkpoints/last.ckpt").is_file()
    assert list((tmp_path / "elsewhere").glob("version_*/events.out.tfevents.*"))
    assert not (tmp_path / "runs").exists()
