"""Parameter-efficient classification: the frozen image backbone of any suite method, one kind of PEFT module
(`modules.peft`: VPT-shallow, VPT-deep, LoRA, adapters, or none: a linear probe), and a linear head trained with the
cross-entropy of the labels,

    p(y = c | x) = softmax_c(W f_theta,phi(x) + b),

f the pretrained method's `probe_features` (its backbone's pooled features, as its paper probes them) computed with
the PEFT parameters phi in the backbone, theta frozen. Only phi and the head (W, b) train: the protocol of VPT (Jia
et al. 2022, sec. 4: "Linear" is the head alone, VPT the prompts and the head) and of the LoRA / adapter baselines
it compares with.

`peft_checkpoint` starts phi from an earlier run's checkpoint (a PEFTClassifier or PVP run on the same pretrained
backbone): the PEFT tensors are copied by name, nothing else (the head is new: other classes), after checking that
the run adapted the same frozen backbone. That is PVP's start (`pvp.py`).
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from vlp_lightning.catalog import Paper
from vlp_lightning.methods.adaptation.base import AdaptationMethod, ClassNames
from vlp_lightning.methods.base import WarmupCosineLR
from vlp_lightning.modules.peft import AdapterPosition, PEFTKind, apply_peft, peft_modules


class PEFTClassifier(AdaptationMethod):
    """A linear classifier on a frozen pretrained backbone adapted by one PEFT kind (module doc).

    Args:
        pretrained: checkpoint of any suite method with a timm ViT image tower (a CNN takes `peft: linear` only).
        classnames / classnames_from / label_field: the classes (`adaptation.base.ClassNames`; all classes train).
        peft: "linear" (head only), "vpt_shallow", "vpt_deep", "lora" or "adapter".
        peft_checkpoint: a checkpoint of a PEFTClassifier / PVP run whose PEFT parameters start this one's.
        num_prompts: VPT prompt tokens P per layer (5: the official `MODEL.PROMPT.NUM_TOKENS` default).
        lora_rank, lora_alpha, lora_dropout, lora_targets: LoRA's r, alpha (scaling alpha / r), the dropout on its
            input and the Linear layers it adapts (names or name endings, e.g. attn.qkv, mlp.fc1).
        adapter_bottleneck, adapter_scale, adapter_dropout, adapter_position: AdaptFormer's bottleneck width, s,
            dropout and placement ("parallel" to the MLP, or "sequential" after it).
        pretrained_config, crop_scale, optimizer, lr_scheduler, compile: see `AdaptationMethod`.
    """

    paper = Paper("Visual Prompt Tuning", "Jia et al.", 2022,
                  "the PEFT protocol with VPT, LoRA (Hu et al. 2021) and AdaptFormer (Chen et al. 2022) modules")

    def __init__(
        self,
        pretrained: str,
        classnames: list[str] | None = None,
        classnames_from: str | None = None,
        label_field: str = "cls",
        peft: PEFTKind = "vpt_deep",
        peft_checkpoint: str | None = None,
        num_prompts: int = 5,
        lora_rank: int = 8,
        lora_alpha: float = 8.0,
        lora_dropout: float = 0.0,
        lora_targets: tuple[str, ...] = ("attn.qkv",),
        adapter_bottleneck: int = 64,
        adapter_scale: float = 0.1,
        adapter_dropout: float = 0.1,
        adapter_position: AdapterPosition = "parallel",
        pretrained_config: str | None = None,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(pretrained, pretrained_config, crop_scale, optimizer, lr_scheduler, compile)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.classes = ClassNames(classnames, classnames_from, label_field, "all", type(self).__name__)
        self.peft = peft
        apply_peft(
            self.vision, peft, num_prompts=num_prompts, lora_rank=lora_rank, lora_alpha=lora_alpha,
            lora_dropout=lora_dropout, lora_targets=list(lora_targets), adapter_bottleneck=adapter_bottleneck,
            adapter_scale=adapter_scale, adapter_dropout=adapter_dropout, adapter_position=adapter_position,
        )
        if peft_checkpoint is not None:
            self.load_peft_parameters(peft_checkpoint)
        with torch.no_grad():  # the width of the pretrained method's probe features
            size = self.image_size
            width = self.pretrained.probe_features(torch.zeros(1, 3, size, size, device=self.device)).shape[-1]
        self.head = nn.Linear(width, len(self.classes.all))

    def peft_parameters(self) -> dict[str, nn.Parameter]:
        """The PEFT parameters by their names in this method's state dict (the trainable part of `pretrained`)."""
        return {name: param for name, param in self.named_parameters()
                if param.requires_grad and name.startswith("pretrained.")}

    def load_peft_parameters(self, path: str) -> None:
        """Copy the PEFT tensors of the checkpoint at `path` into this method's, by name (module doc)."""
        from vlp_lightning.cli import load_checkpoint_for_check  # here: the CLI imports the methods index

        own = self.peft_parameters()
        if not own:
            raise ValueError(f"peft={self.peft!r} has no PEFT parameters to start from peft_checkpoint={path}; "
                             "choose vpt_shallow, vpt_deep, lora or adapter, or leave peft_checkpoint unset")
        stored = load_checkpoint_for_check(
            path, name="peft_checkpoint", if_missing="give the last.ckpt of a PEFTClassifier run "
            "(e.g. runs/peftclassifier/fashion_mnist_tiny/checkpoints/last.ckpt)")["state_dict"]
        missing = [name for name, param in own.items() if name not in stored or stored[name].shape != param.shape]
        if missing:
            raise ValueError(
                f"peft_checkpoint={path} has no {missing[0]} of shape {list(own[missing[0]].shape)} "
                f"({len(missing)} of {len(own)} PEFT tensors missing or of another shape); give a checkpoint of a run "
                f"with peft={self.peft!r} and the same PEFT sizes"
            )
        frozen = {name: value for name, value in self.pretrained.state_dict(prefix="pretrained.").items()
                  if name not in own}
        if any(name in stored and not torch.equal(stored[name], value) for name, value in frozen.items()):
            raise ValueError(f"peft_checkpoint={path} adapted another backbone than pretrained="
                             f"{self.hparams.pretrained}; give a checkpoint of a run from the same pretrained one")
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(stored[name])

    def train(self, mode: bool = True) -> PEFTClassifier:
        """The frozen backbone stays in eval mode (`AdaptationMethod`); the PEFT blocks' dropout follows `mode`."""
        super().train(mode)
        for module in peft_modules(self.pretrained):
            module.train(mode)
        return self

    def probe_features(self, images: Tensor) -> Tensor:
        """The adapted backbone's pooled features: the pretrained method's `probe_features` with the PEFT modules in."""
        return self.pretrained.probe_features(images)

    def classify(self, images: Tensor) -> Tensor:
        """Class logits [N, C] (what `callbacks.AdversarialRobustness` attacks)."""
        return self.head(self.probe_features(images))

    def forward(self, images: Tensor) -> Tensor:
        return self.classify(images)

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        return self.classification_loss(batch)
