"""Crash-safe training: SIGKILL mid-epoch then `--ckpt_path last`, NaN/Inf losses, interrupted checkpoint writes,
and checkpoints that belong to another method or architecture.

The SIGKILL run is a real `python -m vlp_lightning.cli fit` subprocess; the other runs call `vlp_lightning.cli.main`
in this process. Steps are recorded by `test_scale.StepRecorder` (per-step loss, sample keys, an RNG draw).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from test_scale import fit_command, read_steps, subprocess_env, tiny_clip
from vlp_lightning.checkpoints import checkpoint_is_complete
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


class KillAfterCheckpointRemoval(Callback):
    """SIGKILLs the run the moment the checkpoint callback has deleted the previous checkpoint (with
    `save_top_k: 1`, right after saving a new one): the fixed moment of a kill during a save."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        checkpoint_io = trainer.strategy.checkpoint_io
        remove = checkpoint_io.remove_checkpoint

        def remove_then_die(path) -> None:
            remove(path)
            os.kill(os.getpid(), signal.SIGKILL)

        checkpoint_io.remove_checkpoint = remove_then_die


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


def test_interrupted_checkpoint_write_never_replaces_last_nor_leaves_a_partial_file(make_shards, in_workdir,
                                                                                 monkeypatch):
    """Lightning writes a checkpoint to a temporary file in TMPDIR and moves it into place; on another file system
    the move is a copy. Simulate the worst case, that copy failing half-way (a full disk) at step 3: the half-written
    file must not become `last.ckpt`, which still holds the complete step-2 checkpoint, and no final name may hold
    incomplete bytes (Lightning left them under `epoch=0-step=3.ckpt`)."""
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
        raise OSError(errno.ENOSPC, "killed while copying the checkpoint")

    monkeypatch.setattr(shutil, "move", move_killed_half_way)
    with pytest.raises(OSError, match="killed while copying"):
        in_process_fit(in_workdir, shards.pattern, "partial", "--trainer.max_steps", "6",
                       "--checkpoint.every_n_train_steps", "1")
    last = checkpoints_dir(in_workdir, "partial") / "last.ckpt"
    assert os.path.realpath(last).endswith("epoch=0-step=2.ckpt")
    assert sha256(last) == seen["before"]
    assert load(last)["global_step"] == 2
    files = sorted(p.name for p in checkpoints_dir(in_workdir, "partial").iterdir())
    assert files == ["epoch=0-step=2.ckpt", "last.ckpt"]


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


# ---------------------------------------------------------------------------------------------- kills during saves

KILL_STEPS = 6  # 48 samples, batch 8: one epoch, a checkpoint after every step
KILL_COMMON = ["--trainer.max_steps", str(KILL_STEPS), "--checkpoint.every_n_train_steps", "1",
               "--data.num_workers", "1"]


def start_fit(workdir: Path, shards: str, experiment: str, *extra: str) -> subprocess.Popen:
    log = (workdir / f"{experiment}.log").open("a")
    return subprocess.Popen(fit_command(workdir, shards, experiment, *KILL_COMMON, *extra), cwd=workdir,
                            env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)


def resume_and_compare(workdir: Path, shards, experiment: str, reference: list[dict]) -> dict:
    """Resume the killed `experiment` with `--ckpt_path last` and compare it with the uninterrupted `reference`.

    Returns {"resumed_from": step of the checkpoint resumed, "exact": bool, "lost": samples of the epoch never
    trained on}; exact means the steps after the resume saw the reference's samples, RNG draws and losses and the
    final weights and optimizer state equal the reference's."""
    killed_steps = len(read_steps(workdir, experiment).get(0, []))
    resumed = subprocess.run(fit_command(workdir, shards.pattern, experiment, *KILL_COMMON, "--ckpt_path", "last"),
                             cwd=workdir, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    records = read_steps(workdir, experiment)[0]
    after = records[killed_steps:]
    effective = records[: after[0]["step"] - 1] + after  # what the finished run's weights were trained on
    final = load(checkpoints_dir(workdir, experiment) / "last.ckpt")
    expected = load(checkpoints_dir(workdir, "reference") / "last.ckpt")
    exact = (
        [r["step"] for r in effective] == list(range(1, KILL_STEPS + 1))
        and [r["keys"] for r in effective] == [r["keys"] for r in reference]
        and [r["draw"] for r in effective] == [r["draw"] for r in reference]
        and all(math.isclose(a["loss"], b["loss"], rel_tol=1e-5) for a, b in zip(effective, reference))
        and final["global_step"] == KILL_STEPS
        and all(torch.allclose(final["state_dict"][k], v, rtol=1e-5, atol=1e-6)
                for k, v in expected["state_dict"].items())
    )
    lost = len(set(shards.keys) - {key for record in effective for key in record["keys"]})
    return {"resumed_from": after[0]["step"] - 1, "exact": exact, "lost": lost}


def run_reference(workdir: Path, shards) -> list[dict]:
    assert start_fit(workdir, shards.pattern, "reference").wait(timeout=240) == 0
    return read_steps(workdir, "reference")[0]


def test_kill_right_after_a_save_deleted_the_previous_checkpoint_resumes_exactly(make_shards, tmp_path):
    """Lightning deletes the previous checkpoint before it moves `last.ckpt` on: killed between the two, the link
    dangled and `--ckpt_path last` started again from step 1. The link must already lead to the new checkpoint."""
    shards = make_shards(tmp_path / "shards", n=48, per_shard=12, image_size=32)
    reference = start_fit(tmp_path, shards.pattern, "reference")
    killed = start_fit(tmp_path, shards.pattern, "killed",
                       "--trainer.callbacks+=test_crash_resume.KillAfterCheckpointRemoval")
    assert killed.wait(timeout=240) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-4000:]
    last = checkpoints_dir(tmp_path, "killed") / "last.ckpt"
    assert os.path.realpath(last).endswith("epoch=0-step=2.ckpt") and checkpoint_is_complete(Path(last))
    assert reference.wait(timeout=240) == 0
    outcome = resume_and_compare(tmp_path, shards, "killed", read_steps(tmp_path, "reference")[0])
    assert outcome == {"resumed_from": 2, "exact": True, "lost": 0}


def kill_around_a_save(process: subprocess.Popen, checkpoints: Path, step: int, delay: float) -> None:
    """SIGKILL `process` `delay` seconds after the first file of the step-`step` save appears (partial or final)."""
    while process.poll() is None:
        if checkpoints.is_dir() and any(f"step={step}." in name for name in os.listdir(checkpoints)):
            time.sleep(delay)
            process.send_signal(signal.SIGKILL)
            return
        time.sleep(0.0002)


@pytest.mark.slow
def test_kills_at_random_moments_around_saves_resume_exactly(make_shards, tmp_path):
    """A run saving after every step is SIGKILLed 0-5 ms after a save at a random step (2-5) began to write its
    file (before, during or after the rename, the link switch and the deletion of the previous checkpoint), then
    resumed with `--ckpt_path last`. Every resume must continue from a complete checkpoint at most one save back,
    and end with the weights, samples, RNG draws and losses of a run never killed, no sample lost. The figures are
    printed (and quoted in the README's crash-safety section)."""
    shards = make_shards(tmp_path / "shards", n=48, per_shard=12, image_size=32)
    reference = run_reference(tmp_path, shards)
    rng = random.Random(22)
    kills = int(os.environ.get("VLP_KILLS", "12"))
    outcomes = []
    for attempt in range(kills):
        experiment, step, delay = f"kill{attempt}", rng.randint(2, KILL_STEPS - 1), rng.uniform(0, 0.005)
        process = start_fit(tmp_path, shards.pattern, experiment)
        killer = threading.Thread(target=kill_around_a_save,
                                  args=(process, checkpoints_dir(tmp_path, experiment), step, delay))
        killer.start()
        process.wait(timeout=240)
        killer.join()
        assert process.returncode == -signal.SIGKILL, f"{experiment} finished before the kill"
        outcome = resume_and_compare(tmp_path, shards, experiment, reference)
        outcomes.append({"step": step, "delay_ms": round(delay * 1000, 2), **outcome})
    summary = {"kills": len(outcomes), "resumed_exactly": sum(o["exact"] for o in outcomes),
               "samples_lost": sum(o["lost"] for o in outcomes)}
    print(json.dumps({"summary": summary, "kills": outcomes}, indent=1), file=sys.stderr)
    assert all(o["resumed_from"] >= o["step"] - 1 for o in outcomes), outcomes
    assert summary == {"kills": kills, "resumed_exactly": kills, "samples_lost": 0}, outcomes


# ------------------------------------------------------------------------------ concurrent runs, full disks

def test_a_second_run_on_a_live_experiment_stops_and_a_killed_runs_lock_does_not_block(make_shards, in_workdir,
                                                                                      capsys):
    shards = make_shards(in_workdir / "shards", n=16, per_shard=16, image_size=32)
    checkpoints = checkpoints_dir(in_workdir, "busy")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from vlp_lightning.checkpoints import ExperimentLock; "
         f"ExperimentLock({str(checkpoints)!r}).acquire(); print('locked', flush=True); time.sleep(120)"],
        env=subprocess_env(), stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as stopped:
            in_process_fit(in_workdir, shards.pattern, "busy", "--trainer.max_steps", "1")
        assert stopped.value.code == 2
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert message == (f"vlp: error: runs/clip/busy is being trained by pid {holder.pid} on "
                           f"{os.uname().nodename} right now (lock file runs/clip/busy/checkpoints.lock); wait for "
                           "that run to end, or start this one under another name with --experiment <name>")
        assert not checkpoints.exists()  # nothing of the live run was touched
    finally:
        holder.kill()
        holder.wait()
    assert Path(f"{checkpoints}.lock").read_text().startswith(f"pid {holder.pid} ")  # stale: its pid is dead
    in_process_fit(in_workdir, shards.pattern, "busy", "--trainer.max_steps", "1")
    assert load(checkpoints / "last.ckpt")["global_step"] == 1


def test_resume_passes_over_incomplete_files_a_full_disk_left(make_shards, in_workdir, caplog):
    """A full disk left a truncated newest checkpoint and a 0-byte `last-v1.ckpt`; `--ckpt_path last` must resume
    the newest complete checkpoint (Lightning took the newest `last*` file and failed with EOFError)."""
    shards = make_shards(in_workdir / "shards", n=48, per_shard=12, image_size=32)
    in_process_fit(in_workdir, shards.pattern, "full", "--trainer.max_steps", "2")
    checkpoints = checkpoints_dir(in_workdir, "full")
    complete = checkpoints / "epoch=0-step=2.ckpt"
    (checkpoints / "epoch=0-step=3.ckpt").write_bytes(complete.read_bytes()[:5000])
    time.sleep(0.01)
    (checkpoints / "last-v1.ckpt").write_bytes(b"")
    in_process_fit(in_workdir, shards.pattern, "full", "--trainer.max_steps", "4", "--ckpt_path", "last")
    steps = [r["step"] for r in read_steps(in_workdir, "full")[0]]
    assert steps == [1, 2, 3, 4]  # resumed after step 2, not from the start
    assert "passing over" in caplog.text and "last-v1.ckpt" in caplog.text


def test_ckpt_path_last_with_nothing_to_resume_stops_unless_asked_to_start_fresh(make_shards, in_workdir, capsys):
    shards = make_shards(in_workdir / "shards", n=16, per_shard=16, image_size=32)
    with pytest.raises(SystemExit) as stopped:
        in_process_fit(in_workdir, shards.pattern, "empty", "--trainer.max_steps", "1", "--ckpt_path", "last")
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"vlp: error: --ckpt_path last: {Path('runs/clip/empty/checkpoints')} holds no complete checkpoint to "
        "resume; drop --ckpt_path to start the experiment from step 0, or add --allow_fresh_start true to do so "
        "whenever there is nothing to resume")
    in_process_fit(in_workdir, shards.pattern, "empty", "--trainer.max_steps", "1", "--ckpt_path", "last",
                   "--allow_fresh_start", "true")
    assert [r["step"] for r in read_steps(in_workdir, "empty")[0]] == [1]


def test_a_checkpoint_never_chooses_what_is_imported(make_shards, in_workdir, capsys):
    """The saved `_class_path` is only compared by name: a checkpoint naming `this` used to print the Zen of
    Python (importlib ran the module)."""
    shards = make_shards(in_workdir / "shards", n=16, per_shard=16, image_size=32)
    in_process_fit(in_workdir, shards.pattern, "source", "--trainer.max_steps", "1")
    checkpoint = load(checkpoints_dir(in_workdir, "source") / "last.ckpt")
    checkpoint["hyper_parameters"]["_class_path"] = "this.Zen"
    hostile = in_workdir / "hostile.ckpt"
    torch.save(checkpoint, hostile)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        in_process_fit(in_workdir, shards.pattern, "target", "--trainer.max_steps", "2", "--ckpt_path", str(hostile))
    assert stopped.value.code == 2
    out, err = capsys.readouterr()
    assert "Beautiful is better than ugly" not in out + err
    assert err.strip().splitlines()[-1].startswith(
        f"vlp: error: {hostile} was written by this.Zen, which is neither a method of vlp_lightning.methods nor "
        "the configured vlp_lightning.methods.CLIP")
    assert "this" not in sys.modules


@pytest.mark.parametrize("monitor", [None, "val/loss"])
def test_a_run_ending_between_two_validations_still_saves_its_last_step(make_shards, in_workdir, monitor):
    """A validation every 4 batches of an epoch and max_steps 8 in another epoch than step 4's: Lightning's own saves
    stop at step 4 (without `AtomicModelCheckpoint.on_train_end` last.ckpt is step 4's); the final state must not be
    lost."""
    shards = make_shards(in_workdir / "shards", n=48, per_shard=12, image_size=32)
    experiment = f"between-{monitor is None}"
    in_process_fit(in_workdir, shards.pattern, experiment, "--trainer.max_steps", "8",
                   "--trainer.val_check_interval", "4", "--data.val_shards", shards.pattern,
                   "--trainer.limit_val_batches", "1", *(["--checkpoint.monitor", monitor] if monitor else []))
    folder = checkpoints_dir(in_workdir, experiment)
    assert load(folder / "last.ckpt")["global_step"] == 8
    if monitor is None:  # the newest top-k checkpoint is the final one, and last points at it
        assert sorted(p.name for p in folder.iterdir()) == ["epoch=2-step=8.ckpt", "last.ckpt"]
    else:  # the best by val/loss is kept as it was (step 4); last holds the final state
        assert load(next(folder.glob("epoch=0-step=4*.ckpt")))["global_step"] == 4
