"""The defects a new user met on the README's path, each pinned: `vlp test` without a test split, `vlp predict`,
the progress bar of a `max_steps` run, the FLOPs column of zeros, the resume warning, start-up noise, and
TensorBoard bound to every interface."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from vlp_lightning.callbacks import VLPModelSummary, VLPProgressBar
from vlp_lightning.checkpoints import AtomicModelCheckpoint
from vlp_lightning.cli import main

REPO = Path(__file__).parents[1]
README = REPO / "README.md"
CLIP_TINY = str(REPO / "experiments/clip/emoji_tiny.yaml")
SWAV_TINY = str(REPO / "experiments/swav/emoji_tiny.yaml")
TINY = ["--data.batch_size", "8", "--data.num_workers", "0", "--trainer.max_steps", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--model.init_args.vision.init_args.img_size", "32", "--model.init_args.vision.init_args.depth", "1"]


@pytest.fixture(autouse=True)
def _in_tmp(monkeypatch, tmp_path):
    monkeypatch.setattr("sys.argv", ["vlp"])
    monkeypatch.chdir(tmp_path)


def one_sentence_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_test_without_a_test_split_names_the_command_the_argument_and_a_fix(capsys, make_shards, tmp_path):
    shards = make_shards(tmp_path / "shards", n=16, per_shard=16)
    message = one_sentence_error(capsys, "test", "--config", CLIP_TINY, "--data.train_shards", shards.pattern,
                                 "--data.val_shards", "null", "--data.test_shards", "null", *TINY)
    assert "`vlp test` needs --data.test_shards" in message
    assert "TrainerFn" not in message
    assert "test=0.1" in message  # the hint builds a test split


def test_predict_writes_keys_and_embeddings_numpy_reads_without_pickle(make_shards, tmp_path):
    shards = make_shards(tmp_path / "shards", n=24, per_shard=12)
    main(["fit", "--config", CLIP_TINY, "--data.train_shards", shards.pattern, "--data.val_shards", "null",
          "--model.init_args.text.init_args.layers", "1", *TINY])
    main(["predict", "--config", CLIP_TINY, "--data.predict_shards", shards.pattern, "--ckpt_path", "last",
          "--model.init_args.text.init_args.layers", "1", *TINY])
    result = np.load(tmp_path / "runs/clip/emoji_tiny/predictions.npz")  # allow_pickle=False by default
    snippet = re.search(r"```python\n(import numpy as np\npredictions = .*?)```", README.read_text(), re.S).group(1)
    exec(snippet, {})  # the README's lines read it as written
    assert list(result["key"]) == shards.keys  # every sample once, in shard order
    assert result["image_embedding"].shape == (24, 128) and result["text_embedding"].shape == (24, 128)
    assert np.isfinite(result["probe_features"]).all()
    assert list(result["caption"]) == [shards.captions[key] for key in shards.keys]
    assert list(result["label"]) == [shards.labels[key] for key in shards.keys]
    # an image-only method writes its probe features only
    main(["fit", "--config", SWAV_TINY, "--data.train_shards", shards.pattern, "--trainer.callbacks", "null",
          *TINY[:-4]])
    main(["predict", "--config", SWAV_TINY, "--data.predict_shards", shards.pattern, "--ckpt_path", "last",
          "--predictions.path", str(tmp_path / "swav.npz"), "--trainer.callbacks", "null", *TINY[:-4]])
    swav = np.load(tmp_path / "swav.npz")
    assert set(swav.files) == {"key", "probe_features", "caption", "label"}


def test_predict_without_shards_is_one_sentence(capsys, make_shards, tmp_path):
    shards = make_shards(tmp_path / "shards", n=16, per_shard=16)
    message = one_sentence_error(capsys, "predict", "--config", SWAV_TINY, "--data.train_shards", shards.pattern,
                                 "--trainer.callbacks", "null", *TINY[:-4])
    assert "--data.predict_shards" in message


def test_progress_bar_of_a_max_steps_run_counts_steps_not_epoch_minus_two():
    bar = VLPProgressBar()
    bar._trainer = SimpleNamespace(max_steps=400, max_epochs=-1, global_step=120)
    assert bar._get_train_description(1).strip() == "Epoch 1 · step 120/400"
    bar._trainer = SimpleNamespace(max_steps=-1, max_epochs=10, global_step=120)
    assert bar._get_train_description(1).strip() == "Epoch 1/9"


def test_model_summary_leaves_out_flops_that_were_not_counted(capsys):
    data = [(" ", ["0", "1"]), ("Name", ["vision", "text"]), ("Type", ["VisionEncoder", "TextTransformer"]),
            ("Params", ["5.4 M", "7.1 M"]), ("Mode", ["train", "train"]), ("FLOPs", ["0", "0"])]
    VLPModelSummary.summarize(data, 12_500_000, 12_500_000, 50.0, {"train": 2, "eval": 0}, total_flops=0)
    printed = capsys.readouterr().out
    assert "VisionEncoder" in printed and "12.5 M" in printed
    assert "FLOPs" not in printed
    VLPModelSummary.summarize(data[:-1] + [("FLOPs", ["1.0 G", "2.0 G"])], 1, 1, 1.0, {"train": 2, "eval": 0},
                              total_flops=3_000_000_000)
    assert "FLOPs" in capsys.readouterr().out


def test_checkpoint_state_survives_a_changed_save_schedule():
    """A run resumed with another --checkpoint.every_n_train_steps finds its checkpoint callback's state (no
    Lightning warning that callbacks are missing); a callback ranking another metric does not."""
    default = AtomicModelCheckpoint(dirpath="ckpt")
    assert AtomicModelCheckpoint(dirpath="ckpt", every_n_train_steps=200).state_key == default.state_key
    assert AtomicModelCheckpoint(dirpath="ckpt", monitor="val/loss").state_key != default.state_key


NOISE_SCRIPT = """
import tempfile
from lightning.pytorch import Trainer
from lightning.pytorch.utilities._pytree import _tree_flatten
from vlp_lightning.cli import quiet_lightning_noise

def start():
    _tree_flatten(1)
    Trainer(accelerator="cpu", logger=True, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tempfile.mkdtemp())

start()
print("=== quiet ===", flush=True)
quiet_lightning_noise()
start()
"""


def test_start_up_noise_is_dropped():
    run = subprocess.run([sys.executable, "-c", NOISE_SCRIPT], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    output = run.stdout + run.stderr
    before, after = run.stdout.split("=== quiet ===")[0] + run.stderr, run.stdout.split("=== quiet ===")[1]
    assert "litlogger" in output and "LeafSpec" in run.stderr  # the noise exists without the filter...
    assert "litlogger" not in after  # ...and is gone after it (stderr holds the warning of the first start only)
    assert run.stderr.count("LeafSpec") == 1 and "litlogger" in before


def test_make_tensorboard_serves_on_localhost_only():
    target = (REPO / "Makefile").read_text().split("\ntensorboard:")[1].split("\n\n")[0]
    assert "--bind_all" not in target and "--host 0.0.0.0" not in target
