"""The momentum-teacher block (`MomentumMethod`): the τ schedule, one update per optimizer step under gradient
accumulation, fp32 teachers under bf16, teachers outside the optimizer and inside checkpoints, and a resumed run
that reproduces the uninterrupted run's teacher (and MoCo's queue, DINO's centre) exactly."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from test_methods import make_batch
from vlp_lightning import methods
from vlp_lightning.methods import momentum
from vlp_lightning.methods.momentum import momentum_at


def tiny(name: str = "BYOL", **options):
    torch.manual_seed(0)
    return getattr(methods, name)(lr_scheduler=None, **options)


def trainer(tmp_path, **options) -> pl.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path)
    return pl.Trainer(**{**defaults, **options})


def loader(method, batches: int) -> DataLoader:
    return DataLoader([make_batch(method, seed=i) for i in range(batches)], batch_size=None)


def teacher_state(method) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in method.state_dict().items() if key.startswith(("target.", "queue."))}


def test_tau_schedule_runs_from_base_to_final_on_a_cosine():
    assert momentum_at(0, 100, 0.996) == 0.996
    assert momentum_at(100, 100, 0.996) == 1.0
    assert momentum_at(50, 100, 0.99) == pytest.approx(0.995)
    assert momentum_at(25, 100, 0.99) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)
    assert momentum_at(7, math.inf, 0.99) == 0.99  # an unbounded run keeps the base


def test_two_micro_batches_of_accumulation_give_one_teacher_update(tmp_path, monkeypatch):
    method = tiny()
    updates = []
    original = momentum.update_momentum
    monkeypatch.setattr(momentum, "update_momentum", lambda s, t, m: (updates.append(m), original(s, t, m)))
    trainer(tmp_path, max_steps=2, accumulate_grad_batches=2).fit(method, train_dataloaders=loader(method, 4))
    # two optimizer steps of 2 micro-batches each: two updates, the first with τ_base, the last with τ_final
    assert updates == [pytest.approx(0.996), pytest.approx(1.0)]


def test_first_and_last_teacher_updates_of_a_run_use_base_and_final_momentum(tmp_path, monkeypatch):
    """A 3-step run: τ_base at the first update, τ_final at the last, the cosine's midpoint between."""
    method = tiny("MoCoV3")  # τ 0.99 -> 1
    updates = []
    original = momentum.update_momentum
    monkeypatch.setattr(momentum, "update_momentum", lambda s, t, m: (updates.append(m), original(s, t, m)))
    trainer(tmp_path, max_steps=3).fit(method, train_dataloaders=loader(method, 3))
    assert updates == [pytest.approx(0.99), pytest.approx(0.995), pytest.approx(1.0)]


def test_teacher_is_outside_the_optimizer_and_moves_towards_the_student(tmp_path):
    method = tiny()
    before = teacher_state(method)
    fit = trainer(tmp_path, max_steps=2)
    fit.fit(method, train_dataloaders=loader(method, 2))
    optimized = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in method.target.parameters()}
    assert not any(p.requires_grad for p in method.target.parameters())
    assert any(not torch.equal(before[k], v) for k, v in teacher_state(method).items())


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_teacher_stays_fp32_under_bf16(tmp_path, precision):
    method = tiny()
    trainer(tmp_path, max_steps=2, precision=precision).fit(method, train_dataloaders=loader(method, 2))
    assert all(p.dtype == torch.float32 for p in method.target.parameters())
    if precision == "bf16-true":
        assert next(method.vision.parameters()).dtype == torch.bfloat16


def test_teacher_and_queue_are_in_the_checkpoint_and_load_back(tmp_path):
    method = tiny("MoCoV2")
    fit = trainer(tmp_path, max_steps=2)
    fit.fit(method, train_dataloaders=loader(method, 2))
    fit.save_checkpoint(tmp_path / "moco.ckpt")
    state = torch.load(tmp_path / "moco.ckpt", weights_only=True)["state_dict"]
    assert int(state["queue.pointer"]) == 16 and any(key.startswith("key_encoder.") for key in state)
    restored = tiny("MoCoV2")
    restored.load_state_dict(state)
    for key, value in method.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


@pytest.mark.parametrize("name", ["BYOL", "MoCoV2", "DINO"])
def test_resumed_run_reproduces_the_uninterrupted_teacher(tmp_path, name):
    """A 4-step run checkpointing at step 2 (2 batches an epoch), and a run resumed from that checkpoint as after
    a kill: the same teacher (and queue) at the end, to the bit. τ depends on the run's length, so the resumed run
    must get it from the same schedule."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt_path=None):
        method = tiny(name)
        save = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
        fit = trainer(tmp_path, max_steps=4, enable_checkpointing=True, callbacks=[save])
        fit.fit(method, train_dataloaders=loader(method, 2), ckpt_path=ckpt_path)
        return method

    uninterrupted = run()
    (checkpoint,) = (tmp_path / "ckpt").glob("*step=2.ckpt")
    resumed = run(ckpt_path=checkpoint)
    expected, actual = uninterrupted.state_dict(), resumed.state_dict()
    teacher_state_prefixes = ("target.", "key_encoder.", "queue.", "teacher.", "centre")
    teacher_keys = [key for key in expected if key.startswith(teacher_state_prefixes)]
    assert teacher_keys
    for key in teacher_keys:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


class TeacherRecorder(pl.Callback):
    """Writes each rank's teacher at the start and the end of training to `<directory>/rank<r>.pt` (full tensors,
    also under FSDP2)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.initial: dict[str, torch.Tensor] = {}

    @staticmethod
    def teacher(pl_module) -> dict[str, torch.Tensor]:
        from torch.distributed.tensor import DTensor

        return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                for name, p in pl_module.target.named_parameters()}

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        self.initial = self.teacher(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        state = {"initial": self.initial, "final": self.teacher(pl_module)}
        torch.save(state, f"{self.directory}/rank{trainer.global_rank}.pt")


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp2", marks=pytest.mark.slow)])  # fsdp2: +20 s
def test_teacher_is_identical_on_two_gloo_ranks_and_moves(strategy, make_shards, tmp_path):
    """BYOL's recipe on 2 CPU processes (DDP, and FSDP2 with the teacher's blocks sharded): after 2 steps both
    ranks hold the same teacher, and it left its initial (= student's initial) weights."""
    import subprocess
    import sys

    from test_scale import REPO, subprocess_env

    shards = make_shards(tmp_path / "shards", n=32, per_shard=16, image_size=32)
    fragment = {"ddp": ["--config", str(REPO / "experiments/trainer/ddp_cpu.yaml")],
                "fsdp2": ["--config", str(REPO / "experiments/trainer/fsdp2.yaml"), "--trainer.devices", "2",
                          "--trainer.strategy.init_args.tensor_parallel_size", "auto"]}[strategy]
    vision = "--model.init_args.vision.init_args."
    command = [
        sys.executable, "-m", "vlp_lightning.cli", "fit", "--config", str(REPO / "experiments/byol/emoji_tiny.yaml"),
        *fragment, "--data.train_shards", shards.pattern, "--data.val_shards", "null", "--data.batch_size", "4",
        "--data.num_workers", "0", "--trainer.max_steps", "2", "--trainer.callbacks", "[]",
        "--trainer.callbacks+=test_momentum.TeacherRecorder", "--trainer.callbacks.directory", str(tmp_path),
        f"{vision}img_size", "32", f"{vision}depth", "2", f"{vision}width", "64", f"{vision}num_heads", "2",
        "--model.init_args.hidden_dim", "32", "--model.init_args.projection_dim", "16",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ]
    completed = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    final = [r["final"] for r in ranks]
    assert final[0].keys() == final[1].keys()
    for name in final[0]:
        assert torch.equal(final[0][name], final[1][name]), name
    assert any(not torch.equal(final[0][name], ranks[0]["initial"][name]) for name in final[0])


def test_dino_head_last_layer_and_its_gain_stay_frozen_for_the_first_steps(tmp_path):
    """`freeze_last_layer_steps` (official `cancel_gradients_last_layer`) covers every parameter of the last layer,
    the learnt row norms of `norm_last_layer=False` too; the rest of the head trains from the first step."""
    method = tiny("DINO", norm_last_layer=False, freeze_last_layer_steps=2)
    states = []

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            states.append({name: p.detach().clone() for name, p in pl_module.head.named_parameters()})

    before = {name: p.detach().clone() for name, p in method.head.named_parameters()}
    trainer(tmp_path, max_steps=3, callbacks=[Snapshot()]).fit(method, train_dataloaders=loader(method, 3))
    last_layer = ["last_layer.weight", "last_layer.gain"]
    for name in last_layer:
        assert torch.equal(states[1][name], before[name]), name  # steps 0 and 1: frozen
        assert not torch.equal(states[2][name], before[name]), name  # step 2: trained
    assert not torch.equal(states[0]["mlp.0.weight"], before["mlp.0.weight"])
