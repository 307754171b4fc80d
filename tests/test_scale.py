"""Scale: strategies, precision, memory savers, and exact resume under DDP and FSDP2 (2 CPU processes, gloo).

Distributed runs launch `python -m vlp_lightning.cli fit` as a user would. `StepRecorder`, a test callback the
subprocess imports by class path from tests/, writes each rank's per-step loss, sample keys and one draw of torch's
global RNG (as random masking would draw) to JSONL, so a resumed run can be compared step by step with an
uninterrupted one. Lightning's FSDP1 and DeepSpeed need CUDA: their fragments are checked as configuration only
(bench/gpu_smoke.sh runs them on a GPU).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from timm.models.vision_transformer import Block

from vlp_lightning.methods import CLIP
from vlp_lightning.modules import ByteTokenizer, HFTextEncoder, TextTransformer, VisionEncoder
from vlp_lightning.modules.text import ResidualAttentionBlock

REPO = Path(__file__).parents[1]
CLIP_TINY = REPO / "experiments/clip/emoji_tiny.yaml"
TRAINER_FRAGMENTS = REPO / "experiments/trainer"
#: a CLIP small enough that a subprocess run is dominated by imports (byte tokenizer: a 258-row embedding).
TINY_CLIP = {
    "trainer": {"log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False},
    "model": {"init_args": {
        "embed_dim": 32,
        "vision": {"init_args": {"img_size": 32, "patch_size": 8, "width": 64, "depth": 2, "num_heads": 2}},
        "text": {"init_args": {"vocab_size": 258, "context_length": 16, "width": 64, "layers": 2, "heads": 2}},
        "tokenizer": {"class_path": "vlp_lightning.modules.ByteTokenizer", "init_args": {"context_length": 16}},
    }},
    "data": {"init_args": {"val_shards": None, "batch_size": 8, "num_workers": 0, "shuffle_buffer": 16}},
}


class StepRecorder(Callback):
    """Appends one JSON line per training step to `<directory>/rank<r>.jsonl`: the step, the loss, the sample keys,
    `draw` (a number from torch's global RNG, as a method's random masking would draw) and CLIP's logit scale (a
    parameter of the method itself, outside every encoder). With `pause_at_step`, the run writes
    `<directory>/paused` after that step and sleeps until it is killed.
    """

    def __init__(self, directory: str, pause_at_step: int | None = None) -> None:
        self.directory = Path(directory)
        self.pause_at_step = pause_at_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        record = {"step": trainer.global_step, "loss": float(loss), "keys": list(batch["__key__"]),
                  "draw": torch.rand(()).item(), "logit_scale": pl_module.logit_scale.item()}
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / f"rank{trainer.global_rank}.jsonl", "a") as stream:
            stream.write(json.dumps(record) + "\n")
        if trainer.global_step == self.pause_at_step:
            (self.directory / "paused").touch()
            time.sleep(600)


def write_tiny_config(directory: Path) -> Path:
    path = directory / "tiny_clip.yaml"
    path.write_text(yaml.safe_dump(TINY_CLIP))
    return path


def fit_command(workdir: Path, shards: str, experiment: str, *extra: str) -> list[str]:
    """`vlp fit` of the tiny CLIP recipe in `workdir` (runs/ goes there), recording steps in steps/<experiment>."""
    return [
        sys.executable, "-m", "vlp_lightning.cli", "fit",
        "--config", str(CLIP_TINY), "--config", str(write_tiny_config(workdir)),
        "--data.train_shards", shards, "--experiment", experiment,
        "--trainer.callbacks+=test_scale.StepRecorder",
        "--trainer.callbacks.directory", str(workdir / "steps" / experiment), *extra,
    ]


def subprocess_env() -> dict[str, str]:
    paths = [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "OMP_NUM_THREADS": "1"}


def run_fit(workdir: Path, shards: str, experiment: str, *extra: str, timeout: float = 240) -> None:
    completed = subprocess.run(
        fit_command(workdir, shards, experiment, *extra), cwd=workdir, env=subprocess_env(),
        capture_output=True, text=True, timeout=timeout,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]


def read_steps(workdir: Path, experiment: str) -> dict[int, list[dict]]:
    """rank -> records in step order (a resumed run's records follow the interrupted run's when they share a dir)."""
    files = sorted((workdir / "steps" / experiment).glob("rank*.jsonl"))
    return {int(f.stem.removeprefix("rank")): [json.loads(line) for line in f.read_text().splitlines()] for f in files}


def assert_resume_matches(workdir: Path, shards: str, strategy_args: list[str]) -> None:
    """An uninterrupted 4-step run saving at step 2, then a run resumed from that checkpoint: steps 3 and 4 must see
    the same samples, the same RNG draws and the same losses on every rank. With the local loss each rank's
    gradient of the logit scale differs, so the ranks agree on it only if its gradient is synchronised."""
    common = [*strategy_args, "--trainer.max_steps", "4", "--checkpoint.every_n_train_steps", "2",
              "--checkpoint.save_top_k", "-1", "--model.init_args.local_loss", "true"]
    run_fit(workdir, shards, "uninterrupted", *common)
    checkpoint = workdir / "runs/clip/uninterrupted/checkpoints/epoch=0-step=2.ckpt"  # a folder under FSDP2
    assert checkpoint.exists(), sorted(p.name for p in checkpoint.parent.iterdir())
    run_fit(workdir, shards, "resumed", *common, "--ckpt_path", str(checkpoint))
    uninterrupted, resumed = read_steps(workdir, "uninterrupted"), read_steps(workdir, "resumed")
    assert sorted(uninterrupted) == sorted(resumed) == [0, 1]
    for rank in (0, 1):
        expected = [r for r in uninterrupted[rank] if r["step"] > 2]
        assert [r["step"] for r in resumed[rank]] == [r["step"] for r in expected] == [3, 4]
        assert [r["keys"] for r in resumed[rank]] == [r["keys"] for r in expected]
        assert [r["draw"] for r in resumed[rank]] == [r["draw"] for r in expected]
        assert [r["loss"] for r in resumed[rank]] == pytest.approx([r["loss"] for r in expected], rel=1e-5)
    assert [r["logit_scale"] for r in uninterrupted[0]] == [r["logit_scale"] for r in uninterrupted[1]]
    assert uninterrupted[0][-1]["logit_scale"] != uninterrupted[0][0]["logit_scale"]  # it is being learned
    rank_keys = [set(k for r in uninterrupted[rank] for k in r["keys"]) for rank in (0, 1)]
    assert not rank_keys[0] & rank_keys[1], "the two ranks read overlapping samples"


@pytest.mark.slow  # ~65 s each on a 2-core CPU; `make test-all` runs them (the SIGKILL resume tests stay)
def test_ddp_two_processes_resume_to_the_same_losses(make_shards, tmp_path):
    shards = make_shards(tmp_path / "shards", n=64, per_shard=16, image_size=32)
    ddp = ["--config", str(TRAINER_FRAGMENTS / "ddp_cpu.yaml")]
    assert_resume_matches(tmp_path, shards.pattern, ddp)


@pytest.mark.slow  # ~65 s each on a 2-core CPU; `make test-all` runs them (the SIGKILL resume tests stay)
def test_fsdp2_two_processes_resume_to_the_same_losses(make_shards, tmp_path):
    shards = make_shards(tmp_path / "shards", n=64, per_shard=16, image_size=32)
    # tensor_parallel_size auto (= devices per node): the fragment's `1` with data_parallel_size auto (= nodes)
    # does not multiply to 2 processes on one node.
    fsdp2 = ["--config", str(TRAINER_FRAGMENTS / "fsdp2.yaml"), "--trainer.devices", "2",
             "--trainer.strategy.init_args.tensor_parallel_size", "auto"]
    assert_resume_matches(tmp_path, shards.pattern, fsdp2)


# ---------------------------------------------------------------------------------------------- strategy fragments
def parse_trainer_fragment(name: str) -> tuple[LightningArgumentParser, Namespace]:
    """Parse `experiments/trainer/<name>.yaml` as `vlp` does: the strategy's class path must import and its init
    args must match the class signature (types included)."""
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(Trainer, "trainer")
    return parser, parser.parse_path(TRAINER_FRAGMENTS / f"{name}.yaml")


@pytest.mark.parametrize("name", sorted(path.stem for path in TRAINER_FRAGMENTS.glob("*.yaml")))
def test_every_trainer_fragment_parses(name):
    _, config = parse_trainer_fragment(name)
    assert config.trainer.devices is not None


def tiny_clip(compile: bool = False) -> CLIP:
    torch.manual_seed(0)
    return CLIP(
        vision=VisionEncoder("vit_tiny_patch16_224", img_size=32, patch_size=8, width=32, depth=2, num_heads=2),
        text=TextTransformer(vocab_size=258, context_length=8, width=32, layers=2, heads=2),
        tokenizer=ByteTokenizer(context_length=8), embed_dim=16, compile=compile,
        optimizer=partial(torch.optim.AdamW, lr=1e-3), lr_scheduler=None,
    )


def test_fsdp_fragment_wraps_and_checkpoints_every_transformer_block_of_both_towers():
    parser, config = parse_trainer_fragment("fsdp")
    assert config.trainer.strategy.class_path == "lightning.pytorch.strategies.FSDPStrategy"
    assert config.trainer.accelerator == "gpu"  # Lightning's FSDP1 needs CUDA
    strategy = parser.instantiate(config).trainer.strategy
    assert isinstance(strategy, FSDPStrategy)
    blocks = {type(block) for block in tiny_clip().encoder_blocks()}
    assert {Block, ResidualAttentionBlock} <= blocks
    assert blocks <= strategy.kwargs["auto_wrap_policy"]._module_classes
    assert blocks <= strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes
    assert strategy.sharding_strategy.name == "FULL_SHARD"
    assert strategy._state_dict_type == "sharded"


def test_fsdp2_fragment_builds_model_parallel_strategy():
    parser, config = parse_trainer_fragment("fsdp2")
    strategy = parser.instantiate(config).trainer.strategy
    assert isinstance(strategy, ModelParallelStrategy)
    assert strategy._save_distributed_checkpoint  # one shard per rank, written in parallel


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_fragments_configure_zero_stage(stage):
    parser, config = parse_trainer_fragment(f"deepspeed_stage{stage}")
    strategy = config.trainer.strategy
    assert strategy.class_path == "lightning.pytorch.strategies.DeepSpeedStrategy"
    assert (strategy.init_args.stage, strategy.init_args.overlap_comm, strategy.init_args.contiguous_gradients) == (
        stage, True, True)
    assert config.trainer.accelerator == "gpu"
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed: configuration checked by parsing only")
    built = parser.instantiate(config).trainer.strategy
    assert built.config["zero_optimization"]["stage"] == stage


# ---------------------------------------------------------------------------------------------- memory savers
def hf_text_encoder(directory: Path, grad_checkpointing: bool) -> HFTextEncoder:
    from transformers import BertConfig

    BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64).save_pretrained(directory)
    torch.manual_seed(0)
    return HFTextEncoder(str(directory), from_config=True, grad_checkpointing=grad_checkpointing)


ENCODERS = {
    "vision": (lambda tmp, ckpt: (torch.manual_seed(0), VisionEncoder(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, width=32, depth=2, num_heads=2,
        grad_checkpointing=ckpt))[1], lambda: torch.randn(2, 3, 32, 32)),
    "text": (lambda tmp, ckpt: (torch.manual_seed(0), TextTransformer(
        vocab_size=258, context_length=8, width=32, layers=2, heads=2, grad_checkpointing=ckpt))[1],
        lambda: ByteTokenizer(context_length=8)(["a cat", "a dog"])),
    "hf_text": (hf_text_encoder, lambda: {"input_ids": torch.randint(1, 64, (2, 8)),
                                          "attention_mask": torch.ones(2, 8, dtype=torch.long)}),
}


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_gradient_checkpointing_recomputes_each_block_and_keeps_the_gradients(name, tmp_path):
    """With the switch on, every layer inside a block runs twice (forward, then again in backward) and the gradients
    are the same. (transformers checkpoints a layer's `forward`, not its hooks: count the linears inside.)"""
    build, make_input = ENCODERS[name]
    torch.manual_seed(1)
    inputs = make_input()
    results = []
    for checkpointing in (False, True):
        encoder = build(tmp_path / str(checkpointing), checkpointing)
        blocks = [m for m in encoder.modules() if type(m).__name__ in {"Block", "ResidualAttentionBlock", "BertLayer"}]
        linears = [m for block in blocks for m in block.modules() if isinstance(m, torch.nn.Linear)]
        calls = []
        for linear in linears:
            linear.register_forward_pre_hook(lambda *_: calls.append(1))  # recompute may stop before a post-hook
        encoder(inputs).square().sum().backward()
        grads = [p.grad.clone() for p in encoder.parameters() if p.grad is not None]
        results.append((len(calls), len(blocks), grads))
    (plain_calls, num_blocks, plain_grads), (checkpointed_calls, _, checkpointed_grads) = results
    assert num_blocks == 2 and plain_calls >= 2 * num_blocks  # (attention's out_proj is not called as a module)
    assert checkpointed_calls == 2 * plain_calls
    torch.testing.assert_close(checkpointed_grads, plain_grads)


def fit_in_process(method: CLIP, precision: str, steps: int) -> list[float]:
    """Train `method` for `steps` steps on random image-caption batches; returns the per-step losses."""
    batches = [{"image": torch.randn(4, 3, 32, 32), "text": method.tokenizer(["a", "b", "c", "d"]),
                "__key__": ["a", "b", "c", "d"]} for _ in range(steps)]
    losses: list[float] = []

    class LossDtype(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            assert outputs["loss"].dtype == torch.float32  # the loss computes in fp32 at every precision
            losses.append(outputs["loss"].item())

    trainer = Trainer(accelerator="cpu", precision=precision, max_steps=steps, logger=False, callbacks=[LossDtype()],
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(method, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return losses


@pytest.mark.parametrize(("precision", "logit_scale_dtype"), [
    ("32-true", torch.float32), ("bf16-mixed", torch.float32), ("bf16-true", torch.bfloat16)])
def test_precision_keeps_the_loss_in_fp32_and_the_logit_scale_as_documented(precision, logit_scale_dtype):
    """bf16-mixed keeps every weight (the logit scale too) in fp32; bf16-true casts all of them to bf16, where the
    log temperature moves in steps of 1/64 and small updates are lost (see the README: train with bf16-mixed)."""
    method = tiny_clip()
    initial = method.logit_scale.item()
    losses = fit_in_process(method, precision, steps=3)
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert method.logit_scale.dtype == logit_scale_dtype
    if logit_scale_dtype == torch.float32:
        assert method.logit_scale.item() != initial


@pytest.mark.slow  # inductor compiles C++ kernels: a minute or more on a small CPU
def test_compile_switch_runs_a_step_with_the_same_loss_and_state_dict_keys():
    compiled, reference = tiny_clip(compile=True), tiny_clip()
    keys = list(compiled.state_dict())
    compiled.configure_model()
    assert list(compiled.state_dict()) == keys  # a compiled run's checkpoints load into plain models
    batch = {"image": torch.randn(4, 3, 32, 32), "text": reference.tokenizer(["a", "b", "c", "d"])}
    loss = compiled.forward_loss(batch)["loss"]
    loss.backward()
    torch.testing.assert_close(loss, reference.forward_loss(batch)["loss"], rtol=1e-4, atol=1e-4)
    assert compiled.vision.model.patch_embed.proj.weight.grad is not None
