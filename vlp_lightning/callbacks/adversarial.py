"""Clean and adversarial accuracy of a classifier under an ℓ∞ PGD attack (Madry et al. 2018, "Towards Deep Learning
Models Resistant to Adversarial Attacks", eq. 2): from a uniform random start in the ε-ball, `steps` signed-gradient
ascent steps of size α on the cross-entropy, each projected back onto the ball and the valid pixel range [0, 1].

ε and α are in pixel units (4/255 is the usual ImageNet budget); the attack runs on the pixels and normalises them as
the method's training views do, so the budget means the same for every method. It scores any method with
`classify(images) -> logits [N, C]` over its classes (the classification adaptation methods: DRTune, DAMVP,
PEFTClassifier, PVP, RobustMAE); others are skipped with one warning. Metrics: `robustness/<name>/clean`,
`robustness/<name>/pgd`; a prompting method that also has `classify_unprompted(images)` (RobustMAE: the same
classifier without its prompts) is scored both ways on the same images, the second as
`robustness/<name>/clean_no_prompt` and `robustness/<name>/pgd_no_prompt`. The attack sees whatever the scored
function does (for RobustMAE the prompt selection too, recomputed on every attacked image).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from data_modules.pipeline import batch_labels, make_eval_loader
from data_modules.views import EvalView
from vlp_lightning.callbacks.features import EvaluationCallback, module_device


def pgd_attack(classify, pixels: Tensor, labels: Tensor, normalise, epsilon: float, step_size: float, steps: int,
               generator: torch.Generator | None = None) -> Tensor:
    """Adversarial pixels [N, 3, H, W] in [0, 1] within ε (ℓ∞) of `pixels` (module doc)."""
    noise = torch.empty(pixels.shape, dtype=pixels.dtype).uniform_(-epsilon, epsilon, generator=generator)
    adversarial = (pixels + noise.to(pixels.device)).clamp(0, 1)
    for _ in range(steps):
        adversarial.requires_grad_(True)
        loss = F.cross_entropy(classify(normalise(adversarial)).float(), labels)
        (gradient,) = torch.autograd.grad(loss, adversarial)
        with torch.no_grad():
            adversarial = adversarial + step_size * gradient.sign()
            adversarial = torch.min(torch.max(adversarial, pixels - epsilon), pixels + epsilon).clamp(0, 1)
    return adversarial.detach()


class AdversarialRobustness(EvaluationCallback):
    """Clean and PGD top-1 on a labelled shard set (module doc).

    Args:
        shards: labelled shard pattern.
        name: metric prefix.
        label_field: `cls` or an integer field of the samples' `.json`.
        epsilon, step_size, steps: the attack (pixel units; 4/255, 1/255, 10 by default).
        max_samples: images attacked (the attack costs `steps` forward-backward passes per image).
        seed: of the random starts.
        every_n_epochs, batch_size, num_workers: see `EvaluationCallback`.
    """

    def __init__(
        self,
        shards: str,
        name: str = "pgd",
        label_field: str = "cls",
        epsilon: float = 4 / 255,
        step_size: float = 1 / 255,
        steps: int = 10,
        max_samples: int | None = 512,
        seed: int = 0,
        every_n_epochs: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, batch_size=batch_size, num_workers=num_workers)
        if epsilon < 0 or step_size <= 0 or steps < 1:
            raise ValueError(
                f"PGD needs epsilon >= 0, step_size > 0 and steps >= 1, got {epsilon}, {step_size}, {steps}"
            )
        self.shards, self.name, self.label_field = shards, name, label_field
        self.epsilon, self.step_size, self.steps = epsilon, step_size, steps
        self.max_samples, self.seed = max_samples, seed

    def evaluate(self, trainer: Trainer, method: LightningModule) -> dict[str, float]:
        if not hasattr(method, "classify"):
            self.warn_once(f"AdversarialRobustness skipped: {type(method).__name__} has no classify(images)")
            return {}
        with torch.inference_mode(False):  # `vlp test` evaluates under inference mode; the attack needs autograd
            return self.attack_scores(method)

    def attack_scores(self, method: LightningModule) -> dict[str, float]:
        """Clean and PGD accuracy of `classify` (and `classify_unprompted`) on the shards (module doc)."""
        device = module_device(method)
        mean, std = method.train_views().normalization
        mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)

        def normalise(pixels: Tensor) -> Tensor:
            return (pixels - mean_t) / std_t

        loader = make_eval_loader(self.shards, method.image_size, self.batch_size, num_workers=self.num_workers,
                                  view=EvalView(mean=mean, std=std), device=device)
        generator = torch.Generator().manual_seed(self.seed)
        scored = {"": method.classify}
        if hasattr(method, "classify_unprompted"):
            scored["_no_prompt"] = method.classify_unprompted
        correct = {f"{kind}{suffix}": 0 for suffix in scored for kind in ("clean", "pgd")}
        seen = 0
        for batch in loader:
            rows = len(batch["__key__"]) if self.max_samples is None else min(len(batch["__key__"]),
                                                                               self.max_samples - seen)
            if rows <= 0:
                break
            labels = batch_labels(batch, self.label_field)[:rows].to(device)
            pixels = (batch["image"][:rows] * std_t + mean_t).clamp(0, 1)
            for suffix, classify in scored.items():
                correct[f"clean{suffix}"] += int((classify(normalise(pixels)).argmax(1) == labels).sum())
                with torch.enable_grad():
                    adversarial = pgd_attack(classify, pixels, labels, normalise, self.epsilon, self.step_size,
                                             self.steps, generator)
                correct[f"pgd{suffix}"] += int((classify(normalise(adversarial)).argmax(1) == labels).sum())
            seen += rows
        if not seen:
            raise ValueError(f"AdversarialRobustness: {self.shards} holds no samples")
        return {f"robustness/{self.name}/{key}": count / seen for key, count in correct.items()}

