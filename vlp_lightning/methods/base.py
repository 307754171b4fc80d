"""The shared base of every pretraining method.

`VLPMethod` owns what all methods share and nothing that belongs to one family:

* the optimizer and LR schedule, injected as typed callables so YAML can swap them
  (`OptimizerCallable` / `LRSchedulerCallable`; default AdamW + linear-warmup cosine decay),
* weight-decay parameter groups, following each paper (`decays_weight`: by default no decay on gains and biases),
* a hook after every optimizer step (`after_optimizer_step`: parameter clamps, EMA teachers),
* the learning-rate factor `lr_scale` that the `GlobalBatchSize` callback sets (linear / sqrt scaling rules),
* logging names (`train/<name>`, `val/<name>`, `test/<name>`),
* the two representations the evaluation callbacks use: `probe_features` (kNN, linear probe: the backbone's
  features as each paper probes them) and `encode_image` / `encode_text` (the joint image-text space that
  zero-shot, retrieval and the projector use; CLIP family), and the patch features of dense evaluations
  (`patch_features`),
* what the data module asks of the attached method (`train_views`, `tokenizer`, `image_size`, `required_keys`),
* optional memory savers shared by every method (`torch.compile`, FSDP2 `fully_shard` in `configure_model`).

A method subclass implements `forward_loss(batch) -> dict[str, Tensor]` (with a `"loss"` key) and the protocol
methods; the training / validation / test steps are here, once.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from data_modules.views import Views
from vlp_lightning.catalog import Paper


class WarmupCosineLR(LambdaLR):
    """Linear warmup then decay to `min_lr_ratio` x base LR, stepped every optimizer step.

    Cosine decay is the schedule CLIP (Radford et al. 2021, sec. 2.5), MAE and SwAV use; `decay="linear"` is ALIGN's
    (Jia et al. 2021, sec. 5). The warmup rises linearly from `warmup_start_ratio` x base LR (SwAV's official
    `--start_warmup 0.3` at base 4.8 is 0.0625) to the base LR. `warmup_steps` below 1 is a fraction of the run;
    `total_steps=None` is filled in from the trainer's estimated stepping batches by `VLPMethod`.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: float = 0.05,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        warmup_start_ratio: float = 0.0,
        decay: Literal["cosine", "linear"] = "cosine",
        warmup: Literal["linear", "constant"] = "linear",
    ) -> None:
        if decay not in ("cosine", "linear"):
            raise ValueError(f"WarmupCosineLR: decay={decay!r} is not one of 'cosine', 'linear'")
        if warmup not in ("linear", "constant"):
            raise ValueError(f"WarmupCosineLR: warmup={warmup!r} is not one of 'linear', 'constant'")
        self.warmup = warmup
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        self.warmup_start_ratio = warmup_start_ratio
        self.decay = decay
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        total = max(1, self.total_steps or 1)
        warmup = self.warmup_steps * total if self.warmup_steps < 1 else self.warmup_steps
        if step < warmup:
            if self.warmup == "constant":
                return self.warmup_start_ratio
            return self.warmup_start_ratio + (1 - self.warmup_start_ratio) * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1.0, total - warmup))
        remaining = 0.5 * (1 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * remaining


class VLPMethod(LightningModule):
    """Base LightningModule of every method in the suite.

    Args:
        optimizer: callable building the optimizer from parameter groups (default AdamW; set `lr`, `weight_decay`
            in YAML under `model.init_args.optimizer.init_args`).
        lr_scheduler: callable building a per-step scheduler from the optimizer (default `WarmupCosineLR`).
        compile: compile the encoders with `torch.compile` (in place, same state-dict keys) in `configure_model`.
    """

    #: the paper the method implements, its family and the views it trains on, in words (`catalog.VIEW_KINDS`):
    #: what `vlp methods` and the README's method table show (a shared test checks `view_kind`).
    paper: Paper | None = None
    family: str = ""
    view_kind: str = ""
    #: batch keys this method needs from the data; the data module checks them at setup.
    required_keys: tuple[str, ...] = ("image",)
    #: gains, biases and scalars (every tensor with ndim <= 1) get no weight decay: CLIP's rule (Radford et al.
    #: 2021, sec. 2.5: "weight decay ... to all weights that are not gains or biases") and timm's / MAE's
    #: `param_groups_weight_decay`. A method whose paper decays everything (SwAV's LARS) sets it False.
    exempt_gains_and_biases: bool = True
    #: parameter-name fragments that also get no weight decay (none by default; each method names its paper's).
    no_weight_decay_names: tuple[str, ...] = ()

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
        self._scale_configured = False
        self._pending_rng_states: dict | None = None
        #: factor on every parameter group's learning rate, set before the optimizer is built (GlobalBatchSize).
        self.lr_scale = 1.0
        #: the `model:` config this method was built from, as JSON (set by `vlp`); stored in every checkpoint so the
        #: method can be rebuilt from the checkpoint alone (`vlp_lightning.pretrained.load_method`).
        self.model_config: str | None = None

    # ------------------------------------------------------------------ protocol
    @property
    def image_size(self) -> int:
        """Input resolution of the vision tower (default: `self.vision.img_size`); the data module crops to it
        unless told otherwise."""
        return self._vision_backbone("image_size").img_size

    def _vision_backbone(self, needed_by: str) -> nn.Module:
        """The method's `vision` tower, which the protocol defaults use; one sentence when there is none."""
        vision = getattr(self, "vision", None)
        if not isinstance(vision, nn.Module):
            raise NotImplementedError(f"{type(self).__name__} has no `vision` backbone: define {needed_by}")
        return vision

    def train_views(self) -> Views:
        """The augmented views one training sample becomes (one crop, two crops, multi-crop...)."""
        raise NotImplementedError(f"{type(self).__name__} must define train_views()")

    def probe_features(self, images: Tensor) -> Tensor:
        """Images [N,3,H,W] -> the representation [N,D] kNN and the linear probe score: the layer each paper probes.

        Default: the vision backbone's pooled features (`self.vision`), before any projection head, the layer CLIP
        (Radford et al. 2021, App. A.3), ConVIRT (sec. 4) and SwAV (sec. 4.1) probe. A method whose paper probes
        another layer overrides this and says why."""
        return self._vision_backbone("probe_features()")(images)

    def patch_features(self, images: Tensor) -> Tensor:
        """Images [N,3,H,W] -> one feature per patch [N, L, D], row-major over the patch grid, for dense evaluations
        (MMC's zero-shot segmentation from a prompt patch, Wu et al. 2023, sec. 3).

        Default: the spatial tokens of the vision backbone after its final norm (`VisionEncoder.forward_tokens`; a
        CNN's last feature map). A method whose paper reads another layer overrides this."""
        vision = self._vision_backbone("patch_features()")
        if not hasattr(vision, "forward_tokens"):
            raise NotImplementedError(f"{type(self).__name__}'s backbone has no patch tokens: define patch_features()")
        return vision.forward_tokens(images)

    def encode_image(self, images: Tensor) -> Tensor:
        """Images [N,3,H,W] -> embeddings [N,D] in the joint image-text space, used by zero-shot and retrieval
        (CLIP family only; methods without a joint space leave it undefined and the projector shows
        `probe_features`)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no joint image-text space; zero-shot and retrieval need a CLIP-family method"
        )

    def encode_text(self, text: dict[str, Tensor]) -> Tensor:
        """Tokens -> embeddings [N,D] in the joint image-text space (CLIP family only)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no text tower in the image space; "
            "zero-shot and retrieval need a CLIP-family method"
        )

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        """Compute the method's objective on one batch; returns at least {"loss": scalar}."""
        raise NotImplementedError(f"{type(self).__name__} must define forward_loss(batch)")

    # ------------------------------------------------------------------ steps
    def _step(self, batch: dict, stage: str) -> Tensor:
        outputs = self.forward_loss(batch)
        loss = outputs["loss"]
        options = dict(
            batch_size=batch_size_of(batch),
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
        self._restore_rng_states()
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """`vlp predict`: per sample its key, `probe_features` and, for a method with a joint image-text space,
        `encode_image` and (with captions) `encode_text` embeddings, all float32 on the CPU
        (`callbacks.EmbeddingWriter` writes them to a file); a clip batch's `video` stands where `image` would."""
        images = batch["image"] if "image" in batch else batch["video"]
        outputs: dict = {"key": list(batch["__key__"]), "probe_features": self.probe_features(images)}
        if self.has_joint_space():
            outputs["image_embedding"] = self.encode_image(images)
            if "text" in batch:
                outputs["text_embedding"] = self.encode_text(batch["text"])
        for name in ("caption", "label"):
            if name in batch:
                outputs[name] = batch[name]
        return {name: value.float().cpu() if isinstance(value, Tensor) else value for name, value in outputs.items()}

    def has_joint_space(self) -> bool:
        """Whether the method embeds images and texts in one space (defines `encode_image` / `encode_text`)."""
        return is_overridden("encode_image", self, parent=VLPMethod)

    # ------------------------------------------------------------------ optimisation
    def decays_weight(self, name: str, param: nn.Parameter) -> bool:
        """Whether `param` gets weight decay: the class's `exempt_gains_and_biases` and `no_weight_decay_names`."""
        if self.exempt_gains_and_biases and param.ndim <= 1:
            return False
        return not any(fragment in name for fragment in self.no_weight_decay_names)

    def parameter_groups(self) -> list[dict]:
        """Two groups: decayed weights, and those `decays_weight` exempts (weight_decay 0)."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (decay if self.decays_weight(name, param) else no_decay).append(param)
        groups = [{"params": decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def parameter_groups_at(self, lr: float | None, modules: Iterable[nn.Module],
                            lr_multiplier: float | None = None) -> list[dict]:
        """`parameter_groups`, each split in two: the parameters of `modules` at learning rate `lr` (or at
        `lr_multiplier` times the optimizer's), the others at the optimizer's (a head or new layers trained faster
        than a pretrained body, a fine-tuned tower slower than its head; both None: no split)."""
        if lr is None and lr_multiplier is None:
            return VLPMethod.parameter_groups(self)
        setting = {"lr": lr} if lr is not None else {"lr_multiplier": lr_multiplier}
        chosen = {id(param) for module in modules for param in module.parameters()}
        groups = []
        for group in VLPMethod.parameter_groups(self):  # the weight-decay split (an override calls this method)
            extra = {name: value for name, value in group.items() if name != "params"}
            rest = [param for param in group["params"] if id(param) not in chosen]
            picked = [param for param in group["params"] if id(param) in chosen]
            groups += [{"params": rest, **extra}] if rest else []
            groups += [{"params": picked, **extra, **setting}] if picked else []
        return groups

    def configure_optimizers(self):
        groups = self.parameter_groups()
        optimizer = self.optimizer_factory(groups, **fast_optimizer_options(self.optimizer_factory, groups))
        for group in optimizer.param_groups:  # before the scheduler records its base learning rates
            group["lr"] *= self.lr_scale * group.get("lr_multiplier", 1.0)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        if isinstance(scheduler, WarmupCosineLR) and scheduler.total_steps is None:
            scheduler.total_steps = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_step(self, *args, **kwargs) -> None:
        """Lightning's step, then `after_optimizer_step`: once per optimizer step, never per micro-batch."""
        super().optimizer_step(*args, **kwargs)
        self.after_optimizer_step()

    def after_optimizer_step(self) -> None:
        """Runs right after every optimizer step (parameter clamps, EMA teacher updates); nothing by default."""

    # ------------------------------------------------------------------ scale
    def encoder_blocks(self) -> Iterable[nn.Module]:
        """Transformer blocks to shard / checkpoint one by one (FSDP auto-wrap, FSDP2 fully_shard)."""
        for module in self.modules():
            if type(module).__name__ in {"Block", "ResidualAttentionBlock", "BertLayer"}:
                yield module

    def configure_model(self) -> None:
        """Shard with FSDP2 under ModelParallelStrategy, then optionally compile the encoders.

        No method uses tensor parallelism, so every process is a data-parallel rank. Mesh dimensions of size 1 are
        dropped: what remains is one dimension (FSDP: shard over all processes) or, with Lightning's default
        `data_parallel_size: auto` (= nodes) x `tensor_parallel_size: auto` (= devices per node), two (HSDP:
        replicate across nodes, shard within a node). Each transformer block is a unit of its own, then each
        trainable child, so only one block's full weights exist at a time. Lightning calls this hook at every
        fit/validate/test, hence the guard.
        """
        if self._scale_configured:
            return
        self._scale_configured = True
        mesh = self._device_mesh
        if mesh is not None:
            from torch.distributed.fsdp import fully_shard

            used = tuple(name for name in mesh.mesh_dim_names if mesh[name].size() > 1)
            shard_mesh = mesh[used] if used else mesh[mesh.mesh_dim_names[0]]
            for block in self.encoder_blocks():
                fully_shard(block, mesh=shard_mesh)
            for child in self.children():
                if any(p.requires_grad for p in child.parameters()):
                    fully_shard(child, mesh=shard_mesh)
        if self.compile_encoders:
            for name, child in self.named_children():
                if name in {"vision", "text"}:
                    child.compile()  # in place: state-dict keys stay the same as without compile

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Under FSDP2, parameters of the method itself (CLIP's logit scale, learned tokens) sit outside every
        sharded module, so nothing synchronises them: average their gradients across ranks as DDP would, or each
        rank's copy drifts apart. Such parameters take part in every step on every rank (a gradient dropped by the
        non-finite guard is dropped on all ranks alike)."""
        if self._device_mesh is None or self._device_mesh.size() == 1:
            return
        from torch.distributed.tensor import DTensor

        for param in self.parameters():
            if param.grad is not None and not isinstance(param, DTensor):
                dist.all_reduce(param.grad)  # SUM: gloo has no AVG
                param.grad /= self._device_mesh.size()

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record which method wrote the checkpoint, the model config it was built from, and every rank's RNG states
        (exact resume of random masking, noise, ...). Lightning calls this on every rank, so the gather is
        collective."""
        states = [_rng_states()]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, _rng_states())
        checkpoint["vlp"] = {"method": _class_path(self), "rng_states": states}
        if self.model_config is not None:
            checkpoint["vlp"]["model_config"] = self.model_config

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse, in one sentence, a checkpoint of another method or another architecture (before Lightning's
        strict load would print a list of keys); keep this rank's RNG states for the first training step."""
        attached = self._trainer is not None  # load_from_checkpoint calls this hook without a trainer
        source = self.trainer.ckpt_path if attached else "the checkpoint"
        stored = checkpoint.get("vlp", {})
        written_by = stored.get("method")
        if written_by is not None and written_by != _class_path(self):
            raise CheckpointMismatchError(
                f"{source} was written by {written_by}, not {_class_path(self)}; resume with the method that wrote "
                "it, or start a new run with --experiment <name>"
            )
        if "state_dict" in checkpoint:
            differences = _state_dict_differences(checkpoint["state_dict"], self.state_dict(), self.strict_loading)
            if differences:
                raise CheckpointMismatchError(
                    f"{source} does not fit this {type(self).__name__}: the architecture changed since it was saved "
                    f"({len(differences)} tensors differ, e.g. {'; '.join(differences[:3])}); resume with the model "
                    "arguments it was trained with, or start a new run with --experiment <name>"
                )
        states = stored.get("rng_states") or []
        rank, world_size = (self.global_rank, self.trainer.world_size) if attached else (0, 1)
        self._pending_rng_states = states[rank] if len(states) == world_size else None

    def _restore_rng_states(self) -> None:
        """Set the RNG states a checkpoint carried right before the first resumed step: later than
        on_load_checkpoint, because creating the data loader iterator draws from the global RNG."""
        if self._pending_rng_states is not None:
            _set_rng_states(self._pending_rng_states)
            self._pending_rng_states = None


class CheckpointMismatchError(RuntimeError):
    """A checkpoint written by another method or for another architecture; the CLI prints it in one line."""


def load_earlier_stage(method: nn.Module, path: str, example: str, may_lack: str | None = None,
                       writers: tuple[type, ...] = (), restart: str | None = None) -> None:
    """Every weight of `path` (loaded `weights_only`) into `method`: the checkpoint of an earlier stage of the same
    method built with the same model arguments (`start_from` of UNIT's and FIBER's second stages), or of one of
    `writers` (classes with the same modules: Vision-Flan starts from LLaVA's stage 1). Tensors under the `may_lack`
    prefix (a head the earlier stage did not have) may be missing; those under `restart` (state every stage starts
    afresh: FFR's GroupDRO weights) are neither compared nor loaded; anything else that differs, a missing file or
    another method's checkpoint is one sentence (`example`: a path to suggest)."""
    name = type(method).__name__
    if not Path(path).is_file():
        raise ValueError(f"start_from {path!r} is not a file; give the earlier stage's checkpoint, e.g. {example}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    written_by = checkpoint.get("vlp", {}).get("method", _class_path(method))
    state = checkpoint.get("state_dict", {})
    current = method.state_dict()
    if restart is not None:
        state = {key: value for key, value in state.items() if not key.startswith(restart)}
        current = {key: value for key, value in current.items() if not key.startswith(restart)}
    differences = [difference for difference in _state_dict_differences(state, current, strict=True)
                   if may_lack is None or not difference.startswith(may_lack)]
    if written_by not in {_class_path(method), *(f"{kind.__module__}.{kind.__qualname__}" for kind in writers)}:
        raise ValueError(f"start_from {path} was written by {written_by}; give a checkpoint of an earlier {name} "
                         "stage")
    if differences:
        raise ValueError(f"start_from {path} does not fit this {name} ({len(differences)} tensors differ, e.g. "
                         f"{differences[0]}); build it with the model arguments of the run that wrote it")
    method.load_state_dict(state, strict=may_lack is None and restart is None)


def _class_path(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _state_dict_differences(stored: dict[str, Tensor], current: dict[str, Tensor], strict: bool) -> list[str]:
    """Human-readable differences between a stored and the current state dict: shapes, then missing/extra keys."""
    differences = [
        f"{key} is {list(stored[key].shape)} in the checkpoint but {list(value.shape)} now"
        for key, value in current.items()
        if key in stored and stored[key].shape != value.shape
    ]
    if strict:
        differences += [f"{key} is missing from the checkpoint" for key in current if key not in stored]
        differences += [f"{key} is not in this model" for key in stored if key not in current]
    return differences


def _rng_states() -> dict:
    """The global RNGs (torch, CUDA, numpy, python) as types `torch.load(weights_only=True)` accepts."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, keys.tolist(), position, has_gauss, cached_gaussian),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"].cpu())
    kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


#: optimizers with a fused implementation (one kernel for all parameters: torch's `fused=True`, CPU and GPU).
FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)


def fast_optimizer_options(factory: object, groups: list[dict]) -> dict:
    """`{"fused": True}` when the optimizer `factory` builds has a fused implementation, its config leaves both
    `fused` and `foreach` unset, and every parameter is a floating-point tensor on a device torch fuses for; else
    `{}` (torch then picks its foreach or per-tensor loop). An explicit `fused: false` or `foreach: ...` in YAML
    is kept. The fused step is one kernel over all parameters instead of one per tensor (issue 20's measurement:
    the optimizer's share of a bf16 CLIP step fell from 10 % to 1 % on CPU)."""
    keywords = getattr(factory, "keywords", {}) or {}
    arguments = getattr(factory, "args", ())
    optimizer_class = next((a for a in (factory, *arguments) if isinstance(a, type)), None)
    explicit = keywords.get("fused") is not None or keywords.get("foreach") is not None
    if optimizer_class not in FUSED_OPTIMIZERS or explicit or keywords.get("differentiable"):
        return {}
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    supported = set(_get_fused_kernels_supported_devices())
    params = [param for group in groups for param in group["params"]]
    if not params or any(not param.is_floating_point() or param.device.type not in supported for param in params):
        return {}
    return {"fused": True}


def batch_size_of(batch: dict) -> int:
    """Samples in a batch: rows of its image tensor (of the first view for multi-view batches), else its keys."""
    images = batch.get("image")
    if isinstance(images, (list, tuple)):
        images = images[0]
    if isinstance(images, Tensor):
        return images.shape[0]
    return len(batch.get("__key__", [])) or 1
