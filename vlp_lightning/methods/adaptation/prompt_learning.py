"""The shared part of CLIP prompt learning (CoOp, CoCoOp, PRE, MaPLe): a frozen CLIP-family method, learnable text
context (`modules.prompts.ContextPrompts`), and classification by prompted class embeddings.

For an image x with normalised embedding f(x) and classes c = 1..C, each method builds the prompt t_c from its
context vectors and the class name, and classifies with CLIP's scaled cosine (CoOp, Zhou et al. 2022, eq. 3):

    p(y = c | x) = exp(cos(g(t_c), f(x)) * s) / sum_j exp(cos(g(t_j), f(x)) * s)

g the frozen text tower and its projection, s = exp(logit_scale) the pretrained temperature; the loss is the
cross-entropy of the labels. Only the context (and what a method adds: CoCoOp's meta-net, PRE's encoder, MaPLe's
deep prompts and couplings) trains. A method defines `context(image_features)` (the vectors [B, C or 1, M, width])
and may add deep prompts (`text_before_block`) or its own image path (`encode_image`).

Evaluation callbacks classify through `class_logits(image_features, classnames)` with any class names (the
base-to-novel protocol asks for unseen ones), and `encode_image` gives the image embeddings they extract.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from vlp_lightning.methods.adaptation.base import AdaptationMethod, ClassNames, TrainClasses
from vlp_lightning.methods.base import WarmupCosineLR
from vlp_lightning.modules.prompts import ClassTokenPosition, ContextPrompts


class PromptLearning(AdaptationMethod):
    """Learn text prompts for a frozen CLIP-family method (module doc).

    Args:
        pretrained: checkpoint of a CLIP-family method whose text tower is the built-in `TextTransformer`.
        classnames / classnames_from / label_field / train_classes: the classes (`adaptation.base.ClassNames`).
        n_ctx: context vectors M (None with `ctx_init`: one per token of the phrase).
        ctx_init: phrase the context starts from ("a photo of a"), or None for N(0, 0.02^2).
        class_specific: one context per class (CoOp's CSC; cannot prompt novel classes).
        class_token_position: "end", "middle" or "front".
        pretrained_config, crop_scale, optimizer, lr_scheduler, compile: see `AdaptationMethod`.
    """

    pretrained_needs = "joint"
    required_keys = ("image",)

    def __init__(
        self,
        pretrained: str,
        classnames: list[str] | None = None,
        classnames_from: str | None = None,
        label_field: str = "cls",
        train_classes: TrainClasses = "all",
        n_ctx: int | None = 16,
        ctx_init: str | None = None,
        class_specific: bool = False,
        class_token_position: ClassTokenPosition = "end",
        pretrained_config: str | None = None,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(pretrained, pretrained_config, crop_scale, optimizer, lr_scheduler, compile)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.classes = ClassNames(classnames, classnames_from, label_field, train_classes, type(self).__name__)
        self.prompts = ContextPrompts(
            self.pretrained.text, self.tokenizer, n_ctx, ctx_init, class_specific,
            len(self.classes.trained) if class_specific else None, class_token_position,
        )
        with torch.no_grad():  # the joint space's width, whatever the projection
            self.embed_dim = self.pretrained.encode_text(self.tokenizer(["a"])).shape[-1]

    # ------------------------------------------------------------------ what a method defines
    def context(self, image_features: Tensor) -> Tensor:
        """Context vectors [B, C or 1, M, width] for images with normalised embeddings [N, D]; B = 1 when the
        context does not depend on the image (CoOp: the learned vectors as they are)."""
        return self.prompts.context()

    def text_before_block(self) -> Callable[[int, Tensor], Tensor] | None:
        """A rewrite of the text sequence before each block (MaPLe's deep prompts); None: none."""
        return None

    # ------------------------------------------------------------------ classification
    def encode_image(self, images: Tensor) -> Tensor:
        """The frozen pretrained image embedding (normalised); MaPLe prompts the image tower too."""
        with torch.no_grad():
            return self.pretrained.encode_image(images)

    def encode_text(self, text: dict[str, Tensor]) -> Tensor:
        return self.pretrained.encode_text(text)

    def class_embeddings(self, classnames: list[str], image_features: Tensor) -> Tensor:
        """Normalised embeddings of the prompted classes, [B, C, D] (B = 1 or N, see `context`)."""
        ctx = self.context(image_features)
        text = self.pretrained.text
        embeddings, end = self.prompts.embeddings(text, classnames, ctx)
        features = text.forward_embeddings(embeddings, end, self.text_before_block())
        joint = F.normalize(self.pretrained.text_projection(features), dim=-1)
        return joint.view(ctx.shape[0], len(classnames), -1)

    def class_logits(self, image_features: Tensor, classnames: list[str]) -> Tensor:
        """Scaled cosine logits [N, C] of images (normalised embeddings [N, D]) against prompted classes (eq. 3)."""
        classes = self.class_embeddings(classnames, image_features)  # [B, C, D]
        scale = self.pretrained.logit_scale.detach().float().exp()
        if classes.shape[0] == 1:
            return scale * image_features @ classes[0].T
        return scale * torch.einsum("nd,ncd->nc", image_features, classes)

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        labels = self.classes.labels(batch).to(self.device)
        keep = labels < len(self.classes.trained)  # train_classes "base": novel samples are left out
        if not bool(keep.any()):
            return {"loss": self.zero_loss().to(self.device)}
        images = batch["image"][keep] if not bool(keep.all()) else batch["image"]
        labels = labels[keep]
        logits = self.class_logits(self.encode_image(images), self.classes.trained)
        loss = F.cross_entropy(logits.float(), labels)
        return {"loss": loss, "accuracy": (logits.argmax(dim=1) == labels).float().mean()}

