"""The shared base of every pretraining method.

`VLPMethod` owns what all methods share and nothing that belongs to one family:

* the optimizer and LR schedule, injected as typed callables so YAML can swap them
  (`OptimizerCallable` / `LRSchedulerCallable`; default AdamW + linear-warmup cosine decay),
* weight-decay parameter groups (no decay on norms, biases, temperatures, prototypes, position embeddings),
* logging names (`train/<name>`, `val/<name>`, `test/<name>`),
* the representation protocol the evaluation callbacks use (`encode_image`, `encode_text`),
* what the data module asks of the attached method (`train_views`, `tokenizer`, `image_size`, `required_keys`),
* optional memory savers shared by every method (`torch.compile`, FSDP2 `fully_shard` in `configure_model`).

A method subclass implements `forward_loss(batch) -> dict[str, Tensor]` (with a `"loss"` key) and the protocol
methods; the training / validation / test steps are here, once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from data_modules.views import Views


class WarmupCosineLR(LambdaLR):
    """Linear warmup then cosine decay to `min_lr_ratio` x base LR, stepped every optimizer step.

    The schedule CLIP (Radford et al. 2021, sec. 2.5), MAE and SwAV use. `warmup_steps` below 1 is a fraction of the
    run; `total_steps=None` is filled in from the trainer's estimated stepping batches by `VLPMethod`.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: float = 0.05,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
    ) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        total = max(1, self.total_steps or 1)
        warmup = self.warmup_steps * total if self.warmup_steps < 1 else self.warmup_steps
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1.0, total - warmup))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class VLPMethod(LightningModule):
    """Base LightningModule of every method in the suite.

    Args:
        optimizer: callable building the optimizer from parameter groups (default AdamW; set `lr`, `weight_decay`
            in YAML under `model.init_args.optimizer.init_args`).
        lr_scheduler: callable building a per-step scheduler from the optimizer (default `WarmupCosineLR`).
        compile: wrap the encoders with `torch.compile` in `configure_model`.
    """

    #: batch keys this method needs from the data; the data module checks them at setup.
    required_keys: tuple[str, ...] = ("image",)
    #: parameter-name fragments that never get weight decay (besides every tensor with ndim <= 1).
    no_weight_decay_names: tuple[str, ...] = (
        "logit_scale",
        "temperature",
        "prototypes",
        "pos_embed",
        "positional_embedding",
        "cls_token",
        "mask_token",
    )

    def __init__(
        self,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.compile_encoders = compile
        self.tokenizer = None

    # ------------------------------------------------------------------ protocol
    @property
    def image_size(self) -> int:
        """Input resolution of the vision tower; the data module crops to it unless told otherwise."""
        raise NotImplementedError(f"{type(self).__name__} must define image_size")

    def train_views(self) -> Views:
        """The augmented views one training sample becomes (one crop, two crops, multi-crop...)."""
        raise NotImplementedError(f"{type(self).__name__} must define train_views()")

    def encode_image(self, images: Tensor) -> Tensor:
        """Images [N,3,H,W] -> features [N,D] used by kNN, linear probe, zero-shot and retrieval."""
        raise NotImplementedError(f"{type(self).__name__} does not learn visual features")

    def encode_text(self, text: dict[str, Tensor]) -> Tensor:
        """Tokens -> features [N,D] in the image space (CLIP family only)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no text tower in the image space; "
            "zero-shot and retrieval need a CLIP-family method"
        )

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        """Compute the method's objective on one batch; returns at least {"loss": scalar}."""
        raise NotImplementedError

    # ------------------------------------------------------------------ steps
    def _step(self, batch: dict, stage: str) -> Tensor:
        outputs = self.forward_loss(batch)
        loss = outputs["loss"]
        options = dict(
            batch_size=_batch_size(batch),
            on_step=stage == "train",
            on_epoch=stage != "train",
            sync_dist=stage != "train",
        )
        self.log(f"{stage}/loss", loss.detach().float(), prog_bar=True, **options)
        extras = {f"{stage}/{name}": value.detach().float() for name, value in outputs.items() if name != "loss"}
        if extras:
            self.log_dict(extras, **options)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    # ------------------------------------------------------------------ optimisation
    def parameter_groups(self) -> list[dict]:
        """Two groups: decayed weights, and norms/biases/temperatures/prototypes/embeddings with no decay."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if param.ndim <= 1 or any(fragment in name for fragment in self.no_weight_decay_names):
                no_decay.append(param)
            else:
                decay.append(param)
        groups = [{"params": decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameter_groups())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        if isinstance(scheduler, WarmupCosineLR) and scheduler.total_steps is None:
            scheduler.total_steps = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ scale
    def encoder_blocks(self) -> Iterable[nn.Module]:
        """Transformer blocks to shard / checkpoint one by one (FSDP auto-wrap, FSDP2 fully_shard)."""
        for module in self.modules():
            if type(module).__name__ in {"Block", "ResidualAttentionBlock", "BertLayer"}:
                yield module

    def configure_model(self) -> None:
        """Apply FSDP2 sharding (ModelParallelStrategy) block by block, then optional torch.compile."""
        mesh = getattr(self, "device_mesh", None)
        if mesh is not None:
            from torch.distributed.fsdp import fully_shard

            data_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
            for block in self.encoder_blocks():
                fully_shard(block, mesh=data_mesh)
            for child in self.children():
                if any(p.requires_grad for p in child.parameters()):
                    fully_shard(child, mesh=data_mesh)
        if self.compile_encoders:
            for name, child in list(self.named_children()):
                if name in {"vision", "text"}:
                    setattr(self, name, torch.compile(child))


def _batch_size(batch: dict) -> int:
    images = batch.get("image")
    if isinstance(images, (list, tuple)):
        images = images[0]
    if isinstance(images, Tensor):
        return images.shape[0]
    return len(batch.get("__key__", [])) or 1
