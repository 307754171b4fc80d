"""Momentum teachers: the student / teacher mechanism of BYOL, MoCo and DINO, once (solo-learn's
`BaseMomentumMethod`, lightly's `update_momentum` + `cosine_schedule`).

A method declares `momentum_pairs`, its (student, teacher) modules, builds each teacher with `momentum_copy` and
runs it with `forward_teacher`; this base does the rest:

* the teacher is an exponential moving average of its student, ξ ← τ ξ + (1 - τ) θ (BYOL, Grill et al. 2020, eq. 1;
  MoCo, He et al. 2020, eq. 2), updated once per *optimizer* step, right after it (`after_optimizer_step`), so the
  micro-batches of gradient accumulation do not each move it;
* τ rises from `base_momentum` to `final_momentum` on a half cosine over the run's K optimizer steps
  (`trainer.estimated_stepping_batches`): τ_k = 1 - (1 - τ_base)(cos(π k / (K - 1)) + 1) / 2 (BYOL sec. 3.2), k =
  0..K-1 the index of the update, so the first update uses τ_base and the last one τ_final (BYOL's "k the current
  training step, K the maximum number of training steps" leaves both ends open; these are the documented ends);
* the teacher's weights and the update are fp32 whatever the precision (a bf16 weight cannot hold a 1e-3 step:
  its spacing near 1 is 2^-8), so under `bf16-true` the teachers are cast back to fp32 when fitting starts and
  `forward_teacher` feeds them fp32 inputs;
* the teacher gets no gradient and is never in the optimizer (`requires_grad=False`); it is a submodule, so
  checkpoints carry it and a resumed run continues from the very same teacher;
* its BatchNorm layers run in train mode by default, with batch statistics, as in the official BYOL and MoCo code
  (`teacher_batchnorm_train = False` puts every teacher in eval mode instead);
* under DDP every rank applies the same update to the same weights, so the teachers stay identical; under FSDP2
  (ModelParallelStrategy) a teacher's blocks are sharded as its student's are (the base shards every transformer
  block), so their shards are updated locally, and an unsharded teacher tensor is updated from the gathered student
  tensor (a collective every rank joins, in the same order).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from vlp_lightning.methods.base import VLPMethod


def momentum_at(step: int, total_steps: float, base_momentum: float, final_momentum: float = 1.0) -> float:
    """τ after `step` of `total_steps` optimizer steps: base at step 0, final at `total_steps`, cosine between
    (an unbounded run, `total_steps` infinite, keeps the base)."""
    progress = min(1.0, step / max(1.0, total_steps))
    return final_momentum - (final_momentum - base_momentum) * (math.cos(math.pi * progress) + 1) / 2


def momentum_copy(student: nn.Module) -> nn.Module:
    """A teacher for `student`: a deep copy in fp32 that takes no gradient."""
    teacher = copy.deepcopy(student).float()
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def update_momentum(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """ξ ← τ ξ + (1 - τ) θ for every parameter pair, in the teacher's dtype (fp32)."""
    for student_param, teacher_param in zip(student.parameters(), teacher.parameters(), strict=True):
        student_value, teacher_value = _local_pair(student_param.detach(), teacher_param.detach())
        teacher_value.lerp_(student_value.to(teacher_value.dtype), 1 - momentum)


def _local_pair(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """The tensors to update in place: both local shards when both are sharded alike (FSDP2), else full tensors."""
    from torch.distributed.tensor import DTensor

    if isinstance(teacher, DTensor):
        if not isinstance(student, DTensor) or student.placements != teacher.placements:
            raise RuntimeError("a sharded teacher needs a student sharded the same way (same mesh and placements)")
        return student.to_local(), teacher.to_local()
    if isinstance(student, DTensor):
        return student.full_tensor(), teacher
    return student, teacher


class MomentumMethod(VLPMethod):
    """Base of methods with an EMA teacher (module doc).

    Args:
        base_momentum: τ at the first optimizer step.
        final_momentum: τ at the last optimizer step (1.0 in BYOL, MoCo v3 and DINO).
        optimizer, lr_scheduler, compile: as `VLPMethod`.
    """

    #: teachers' BatchNorm layers use batch statistics (train mode) as in the official BYOL / MoCo code.
    teacher_batchnorm_train: bool = True

    def __init__(self, base_momentum: float, final_momentum: float = 1.0, **base_options) -> None:
        super().__init__(**base_options)
        if not 0.0 <= base_momentum <= final_momentum <= 1.0:
            raise ValueError(
                f"momentum must rise within [0, 1]: got base_momentum={base_momentum}, final_momentum={final_momentum}"
            )
        self.base_momentum = base_momentum
        self.final_momentum = final_momentum
        self.momentum = base_momentum

    @property
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(student, teacher) pairs, the teacher built with `momentum_copy(student)`."""
        raise NotImplementedError(f"{type(self).__name__} must define momentum_pairs")

    def teachers(self) -> list[nn.Module]:
        return [teacher for _, teacher in self.momentum_pairs]

    def forward_teacher(self, teacher: nn.Module, images: Tensor) -> Tensor:
        """`teacher(images)` without gradient, in the teacher's dtype (fp32 weights take fp32 inputs in bf16-true)."""
        with torch.no_grad():
            return teacher(images.to(next(teacher.parameters()).dtype))

    def train(self, mode: bool = True) -> MomentumMethod:
        super().train(mode)
        if not self.teacher_batchnorm_train:
            for teacher in self.teachers():
                teacher.eval()
        return self

    def on_fit_start(self) -> None:
        """Teachers back to fp32 where the precision plugin converted the whole module (`bf16-true`)."""
        for teacher in self.teachers():
            if any(param.dtype != torch.float32 for param in teacher.parameters()):
                teacher.float()

    def after_optimizer_step(self) -> None:
        """One EMA update per optimizer step; τ of update k of K (module doc). Inside `optimizer_step` Lightning's
        `global_step` still counts the steps before this one (its automatic loop marks the step completed after the
        hook returns), so it is k."""
        super().after_optimizer_step()
        last_update = float(self.trainer.estimated_stepping_batches) - 1
        self.momentum = momentum_at(self.trainer.global_step, last_update, self.base_momentum, self.final_momentum)
        for student, teacher in self.momentum_pairs:
            update_momentum(student, teacher, self.momentum)
        self.log("train/momentum", self.momentum, on_step=True, on_epoch=False)
