"""Stop (or skip the step) when the loss or the gradients stop being finite.

A NaN that reaches the optimizer poisons every weight and, at the next periodic save, the checkpoint too. The guard
looks at the gradients right before each optimizer step: with `action="stop"` it ends the run with a message naming
the step and the last good checkpoint (which is left as it was: nothing is saved after the failure); with
`action="skip"` it drops that step's gradients so the optimizer leaves every weight and moment untouched, and logs
how many steps it skipped (`train/skipped_non_finite_steps`).
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient and the guard was asked to stop."""


class NonFiniteLossGuard(Callback):
    """Check gradients before every optimizer step.

    Args:
        action: "stop" ends the run with a clear message; "skip" drops the step and keeps training.
        max_skipped: with "skip", stop anyway after this many skipped steps (a run that only produces NaNs).
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop", max_skipped: int = 100) -> None:
        self.action = action
        self.max_skipped = max_skipped
        self.skipped = 0

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if "16-mixed" == str(trainer.precision):
            return  # fp16's GradScaler skips inf steps itself and lowers the scale
        bad = _non_finite_gradients(pl_module)
        # Sharded gradients (FSDP) put a NaN on one rank only: every rank must take the same decision.
        if trainer.strategy.reduce_boolean_decision(not bad, all=True):
            return
        if self.action == "skip" and self.skipped < self.max_skipped:
            self.skipped += 1
            optimizer.zero_grad(set_to_none=True)
            pl_module.log("train/skipped_non_finite_steps", float(self.skipped))
            return
        where = f" ({len(bad)} gradient tensors, first {bad[0]})" if bad else " (on another rank)"
        raise NonFiniteLossError(
            f"non-finite loss or gradients at step {trainer.global_step} (epoch {trainer.current_epoch}){where}; "
            f"the last good checkpoint is {_last_checkpoint(trainer)} and was left untouched. Lower the learning "
            "rate, use bf16 instead of fp16, or set --non_finite.action skip to drop such steps."
        )


def _non_finite_gradients(module: LightningModule) -> list[str]:
    """Names of the parameters whose (local shard of the) gradient holds a NaN or Inf; one host sync per step."""
    named = [(name, p.grad) for name, p in module.named_parameters() if p.grad is not None]
    if not named:
        return []
    local = [grad.to_local() if hasattr(grad, "to_local") else grad for _, grad in named]  # DTensor under FSDP2
    # A NaN/Inf entry makes its tensor's norm non-finite: one fused norm kernel per dtype instead of a bool copy of
    # every gradient (8 ms against 168 ms per step for a 14 M-parameter CLIP on one CPU core).
    if bool(torch.isfinite(torch.stack(torch._foreach_norm(local))).all()):
        return []
    # Slow path, only on a bad step: the exact test per tensor (a norm can also overflow on large finite entries).
    finite = torch.stack([torch.isfinite(grad).all() for grad in local])
    if bool(finite.all()):
        return []
    return [name for (name, _), ok in zip(named, finite.tolist()) if not ok]


def _last_checkpoint(trainer: Trainer) -> str:
    """The last saved checkpoint; `last.ckpt` is a link (`save_last: link`), so name the file it points to as well."""
    callback = trainer.checkpoint_callback
    path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
    if not path:
        return "none (no checkpoint was saved yet)"
    target = os.path.realpath(path)
    return path if target == os.path.abspath(path) else f"{path} (-> {os.path.basename(target)})"
