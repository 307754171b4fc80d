"""Global batch honesty: the batch a run really takes per optimizer step, next to the batch its paper used.

A contrastive paper's number of negatives and every paper's learning rate depend on the global batch
(per-device batch x devices x nodes x gradient accumulation). A recipe written for 32,768 pairs (CLIP) that runs
on one machine gets a few hundred: `GlobalBatchSize` prints one line at setup comparing the two, and scales the
learning rate the way the recipe says:

* `linear`: lr = base lr x global batch / `reference_batch_size` (Goyal et al. 2017; MAE, He et al. 2021, App. A.1:
  `lr = base_lr x batch / 256`), so the YAML's `lr` is the base lr;
* `sqrt`: lr = base lr x sqrt(global batch / reference) (the rule for Adam-type optimizers, Krizhevsky 2014);
* `none`: the YAML's lr is used as written; when the global batch differs from `paper_batch_size` the line says
  so (a warning), since the paper's lr was tuned for its own batch.

The factor is applied when the optimizer is built (`VLPMethod.lr_scale`), before the scheduler records its base
rates, so warmup and decay follow the scaled value and a resumed run restores the same rates from its checkpoint.
"""

from __future__ import annotations

import math
from typing import Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

#: how the learning rate follows the global batch.
LRScaling = Literal["none", "linear", "sqrt"]


def lr_scale_factor(global_batch: int, reference_batch_size: int, rule: LRScaling) -> float:
    """The factor on the YAML's learning rate for `global_batch` under `rule`."""
    if rule == "linear":
        return global_batch / reference_batch_size
    if rule == "sqrt":
        return math.sqrt(global_batch / reference_batch_size)
    return 1.0


class GlobalBatchSize(Callback):
    """Print the effective global batch next to the paper's and scale the learning rate (module doc).

    Args:
        paper_batch_size: the global batch the recipe's paper trained with (CLIP 32768, ALIGN 16384, MAE 4096...);
            None when the recipe states none.
        lr_scaling: `none`, `linear` or `sqrt` (module doc).
        reference_batch_size: the batch the YAML's lr refers to under `linear` / `sqrt` (256 in MAE's and Goyal's
            rule).
    """

    def __init__(
        self,
        paper_batch_size: int | None = None,
        lr_scaling: LRScaling = "none",
        reference_batch_size: int = 256,
    ) -> None:
        if lr_scaling not in ("none", "linear", "sqrt"):
            raise ValueError(f"GlobalBatchSize: lr_scaling={lr_scaling!r} is not one of 'none', 'linear', 'sqrt'")
        if reference_batch_size < 1 or (paper_batch_size is not None and paper_batch_size < 1):
            raise ValueError(
                "GlobalBatchSize: paper_batch_size and reference_batch_size must be positive, got "
                f"{paper_batch_size} and {reference_batch_size}"
            )
        self.paper_batch_size = paper_batch_size
        self.lr_scaling = lr_scaling
        self.reference_batch_size = reference_batch_size
        self.message = ""

    def setup(self, trainer: Trainer, method: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        per_device = getattr(trainer.datamodule, "batch_size", None)
        if per_device is None:
            raise ValueError(
                "GlobalBatchSize needs a data module with a `batch_size` (the per-device batch); this run has "
                f"{type(trainer.datamodule).__name__}: remove the callback or use a suite DataModule"
            )
        devices, nodes, accumulation = trainer.num_devices, trainer.num_nodes, trainer.accumulate_grad_batches
        global_batch = per_device * devices * nodes * accumulation
        factor = lr_scale_factor(global_batch, self.reference_batch_size, self.lr_scaling)
        method.lr_scale = factor
        parts = f"{per_device} per device x {devices} device(s) x {nodes} node(s) x {accumulation} accumulation"
        line = f"global batch {global_batch} = {parts}"
        if self.paper_batch_size is not None:
            ratio = global_batch / self.paper_batch_size
            line += f"; the paper's is {self.paper_batch_size} ({ratio:.3g}x: {ratio:.3g}x its negatives per step)"
        if self.lr_scaling == "none":
            line += "; learning rate as written in the recipe"
            if self.paper_batch_size is not None and global_batch != self.paper_batch_size:
                line += " (tuned for the paper's batch: consider lr_scaling: linear or sqrt)"
                self.message = line
                rank_zero_warn(line)
                return
        else:
            line += (
                f"; learning rate x {factor:.4g} ({self.lr_scaling} rule: global batch / {self.reference_batch_size})"
            )
        self.message = line
        rank_zero_info(line)
