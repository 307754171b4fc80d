"""Crash-safe training: SIGKILL mid-epoch then `--ckpt_path last`, NaN/Inf losses, interrupted checkpoint writes,
and checkpoints that belong to another method or architecture.

The SIGKILL run is a real `python -m vlp_lightning.cli fit` subprocess; the other runs call `vlp_lightning.cli.main`
in this process. Steps are recorded by `test_scale.StepRecorder` (per-step loss, sample keys, an RNG draw).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from test_scale import fit_command, read_steps, subprocess_env, tiny_clip
from vlp_lightning.cli import main
from vlp_lightning.methods.base import CheckpointMismatchError

STEPS_PER_EPOCH = 6  # 48 samples, batch 8


class PoisonBatch(Callback):
    """At global step `step`, fill the batch's images with NaN (a NaN loss, as a bad sample or a diverging run would
    give). Before doing so it writes `<report>`: the last checkpoint's path and sha256 at that moment; at the next
    batch it adds whether the poisoned step left the weights unchanged (what `--non_finite.action skip` promises)."""

    def __init__(self, step: int, report: str) -> None:
        self.step = step
        self.report = Path(report)
        self.weights_before: list[torch.Tensor] | None = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            last = trainer.checkpoint_callback.last_model_path  # "" before the first save
            self.report.write_text(json.dumps({"last": last, "sha256": sha256(Path(last)) if last else None}))
            self.weights_before = [p.detach().clone() for p in pl_module.parameters()]
            batch["image"].fill_(float("nan"))
        elif self.weights_before is not None:
            unchanged = all(torch.equal(a, b) for a, b in zip(self.weights_before, pl_module.parameters()))
            report = json.loads(self.report.read_text())
            self.report.write_text(json.dumps({**report, "unchanged_by_poisoned_step": unchanged}))
            self.weights_before = None


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def checkpoints_dir(workdir: Path, experiment: str) -> Path:
    return workdir / "runs/clip" / experiment / "checkpoints"


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)  # our checkpoints need no pickle


def in_process_fit(workdir: Path, shards: str, experiment: str, *extra: str) -> None:
    """`main(fit ...)` here, with the tiny CLIP, in `workdir` (runs/ goes there)."""
    command = fit_command(workdir, shards, experiment, *extra)
    main(command[command.index("fit"):])


@pytest.fixture
def in_workdir(monkeypatch, tmp_path) -> Path:
    """The CLI reads sys.argv when given no args (keep pytest's out) and writes runs/ to the working directory."""
    monkeypatch.setattr("sys.argv", ["vlp"])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_sigkill_mid_epoch_then_resume_last_matches_an_uninterrupted_run(make_shards, tmp_path):
    """Checkpoints every 2 steps; the run is SIGKILLed after step 4 (steps 3-4 are lost, the last checkpoint is at
    step 2). `--ckpt_path last` must replay steps 3-4 on the same samples and finish the epoch with exactly the
    weights, optimizer state and per-step losses of a run never killed; every sample of the epoch used once."""
    shards = make_shards(tmp_path / "shards", n=48, per_shard=12, image_size=32)
    common = ["--trainer.max_steps", str(STEPS_PER_EPOCH), "--checkpoint.every_n_train_steps", "2",
              "--data.num_workers", "1"]
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("reference", "crash")}
    reference = subprocess.Popen(fit_command(tmp_path, shards.pattern, "reference", *common), cwd=tmp_path,
                                 env=subprocess_env(), stdout=logs["reference"], stderr=subprocess.STDOUT)
    crashing = subprocess.Popen(
        fit_command(tmp_path, shards.pattern, "crash", *common, "--trainer.callbacks.pause_at_step", "4"),
        cwd=tmp_path, env=subprocess_env(), stdout=logs["crash"], stderr=subprocess.STDOUT,
    )
    paused = tmp_path / "steps/crash/paused"
    deadline = time.monotonic() + 240
    while not paused.exists() and crashing.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert paused.exists(), (tmp_path / "crash.log").read_text()[-4000:]
    crashing.send_signal(signal.SIGKILL)
    crashing.wait(timeout=30)
    assert crashing.returncode == -signal.SIGKILL
    last = checkpoints_dir(tmp_path, "crash") / "last.ckpt"
    assert os.path.realpath(last).endswith("epoch=0-step=2.ckpt")

    resumed = subprocess.run(fit_command(tmp_path, shards.pattern, "crash", *common, "--ckpt_path", "last"),
                             cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert reference.wait(timeout=240) == 0, (tmp_path / "reference.log").read_text()[-4000:]

    expected, crash = read_steps(tmp_path, "reference")[0], read_steps(tmp_path, "crash")[0]
    assert [r["step"] for r in crash] == [1, 2, 3, 4, 3, 4, 5, 6]  # killed after 4, resumed from 2
    effective = crash[:2] + crash[4:]
    assert [r["keys"] for r in effective] == [r["keys"] for r in expected]
    assert [r["keys"] for r in crash[2:4]] == [r["keys"] for r in crash[4:6]]  # lost steps replayed as they were
    seen = [key for record in effective for key in record["keys"]]
    assert sorted(seen) == sorted(shards.keys)  # the whole epoch, no sample twice, none skipped
    assert [r["draw"] for r in effective] == [r["draw"] for r in expected]
    assert [r["loss"] for r in effective] == pytest.approx([r["loss"] for r in expected], rel=1e-5)

    finished, never_killed = load(last), load(checkpoints_dir(tmp_path, "reference") / "last.ckpt")
    assert finished["global_step"] == never_killed["global_step"] == STEPS_PER_EPOCH
    torch.testing.assert_close(finished["state_dict"], never_killed["state_dict"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(finished["optimizer_states"], never_killed["optimizer_states"], rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_naming_the_step_and_the_untouched_last_checkpoint(make_shards, in_workdir, capsys):
    shards = make_shards(in_workdir / "shards", n=48, per_shard=12, image_size=32)
    report = in_workdir / "poison.json"
    with pytest.raises(SystemExit) as stopped:
        in_process_fit(in_workdir, shards.pattern, "nan", "--trainer.max_steps", "6",
                       "--checkpoint.every_n_train_steps", "2", "--trainer.callbacks+=test_crash_resume.PoisonBatch",
                       "--trainer.callbacks.step", "3", "--trainer.callbacks.report", str(report))
    assert stopped.value.code == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    before = json.loads(report.read_text())
    assert message.startswith("vlp: stopped: non-finite loss or gradients at step 3 (epoch 0)")
    assert f"the last good checkpoint is {before['last']} (-> epoch=0-step=2.ckpt) and was left untouched" in message
    assert sha256(Path(before["last"])) == before["sha256"]
    assert sorted(p.name for p in checkpoints_dir(in_workdir, "nan").iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    weights = load(Path(before["last"]))["state_dict"]
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_skip_action_drops_the_non_finite_step_and_trains_on(make_shards, in_workdir):
    shards = make_shards(in_workdir / "shards", n=48, per_shard=12, image_size=32)
    report = in_workdir / "poison.json"
    in_process_fit(in_workdir, shards.pattern, "skip", "--trainer.max_steps", "4", "--non_finite.action", "skip",
                   "--checkpoint.every_n_train_steps", "2", "--trainer.callbacks+=test_crash_resume.PoisonBatch",
                   "--trainer.callbacks.step", "1", "--trainer.callbacks.report", str(report))
    assert json.loads(report.read_text())["unchanged_by_poisoned_step"] is True
    losses = [r["loss"] for r in read_steps(in_workdir, "skip")[0]]
    assert math.isnan(losses[1]) and all(math.isfinite(loss) for i, loss in enumerate(losses) if i != 1)
    final = load(checkpoints_dir(in_workdir, "skip") / "last.ckpt")
    assert final["global_step"] == 4
    assert all(torch.isfinite(tensor).all() for tensor in final["state_dict"].values())


def test_interrupted_checkpoint_write_never_replaces_last(make_shards, in_workdir, monkeypatch):
    """Lightning writes a checkpoint to a temporary file and moves it into place; `last.ckpt` is a link updated only
    after the move. Simulate the worst case, a cross-device move killed half-way through the copy at step 3: the
    half-written file must not become `last.ckpt`, which still holds the complete step-2 checkpoint."""
    shards = make_shards(in_workdir / "shards", n=48, per_shard=12, image_size=32)
    real_move = shutil.move
    seen: dict[str, str] = {}

    def move_killed_half_way(source: str, destination: str):
        if "step=3" not in str(destination):
            return real_move(source, destination)
        last = checkpoints_dir(in_workdir, "partial") / "last.ckpt"
        seen["before"] = sha256(last)
        data = Path(source).read_bytes()
        Path(destination).write_bytes(data[: len(data) // 2])
        raise OSError("killed while copying the checkpoint")

    monkeypatch.setattr(shutil, "move", move_killed_half_way)
    with pytest.raises(OSError, match="killed while copying"):
        in_process_fit(in_workdir, shards.pattern, "partial", "--trainer.max_steps", "6",
                       "--checkpoint.every_n_train_steps", "1")
    last = checkpoints_dir(in_workdir, "partial") / "last.ckpt"
    assert os.path.realpath(last).endswith("epoch=0-step=2.ckpt")
    assert sha256(last) == seen["before"]
    assert load(last)["global_step"] == 2


def test_checkpoint_of_another_architecture_or_method_fails_in_one_sentence(make_shards, in_workdir, capsys):
    shards = make_shards(in_workdir / "shards", n=16, per_shard=16, image_size=32)
    in_process_fit(in_workdir, shards.pattern, "source", "--trainer.max_steps", "1")
    checkpoint = str(checkpoints_dir(in_workdir, "source") / "last.ckpt")
    capsys.readouterr()

    def error_of(*extra: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            in_process_fit(in_workdir, shards.pattern, "target", "--trainer.max_steps", "2", "--ckpt_path",
                           checkpoint, *extra)
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        return lines[-1]

    deeper = error_of("--model.init_args.vision.init_args.depth", "3")
    assert deeper.startswith(f"vlp: error: {checkpoint} does not fit this CLIP: the architecture changed")
    assert "vision.model.blocks.2.norm1.weight is missing from the checkpoint" in deeper
    wider = error_of("--model.init_args.embed_dim", "48")
    assert wider.startswith(f"vlp: error: {checkpoint} was trained with model.init_args.embed_dim=32, but the config "
                            "sets 48; resume with the method and arguments it was trained with")
    other = error_of("--model", "vlp_lightning.methods.ConVIRT")
    assert other.startswith(f"vlp: error: {checkpoint} was written by vlp_lightning.methods.CLIP, not "
                            "vlp_lightning.methods.ConVIRT")


def test_loading_a_checkpoint_of_another_method_outside_the_cli_names_both():
    """`VLPMethod.on_load_checkpoint` (also run by `load_from_checkpoint`) checks the writer before any weight."""
    with pytest.raises(CheckpointMismatchError, match=r"^the checkpoint was written by vlp_lightning\.methods\.swav\."
                                                      r"SwAV, not vlp_lightning\.methods\.clip\.CLIP; "):
        tiny_clip().on_load_checkpoint({"vlp": {"method": "vlp_lightning.methods.swav.SwAV"}})
