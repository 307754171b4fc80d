"""DAM-VP's meta-prompt: a Reptile-learned start for every cluster prompt (Huang et al. 2023, CVPR, sec. 3.4).

DAM-VP (`damvp.DAMVP`) starts all cluster prompts of a new dataset from one padding prompt θ, the meta-prompt,
learned beforehand across several upstream datasets (the tasks) so that a few steps on any cluster of any dataset go
far (the paper's "prompt boosting"). θ is learned with Reptile (Nichol et al. 2018, "On First-Order Meta-Learning
Algorithms", Alg. 2, the batched form): at every meta step each task t of the batch clusters as DAMVP does (sec.
3.2-3.3: prototypes c_{t,m} of its frozen features, each image prompted by its nearest prototype's prompt), every
cluster prompt P_{t,m} starts at θ and takes k inner steps of the task's cross-entropy on the task's images of the
batch (the same images at every inner step), and θ moves toward the adapted prompts:

    P_{t,m} <- θ;   k x:  P_t <- P_t - lr · ∇ CE(h_t(x + P_{t,m(x)}), y)      (x, y: task t's images of the batch)
    θ <- θ + ε · (1 / Σ_t M_t) · Σ_t Σ_m (P_{t,m} - θ)                        (`reptile_direction`)

M_t is task t's number of clusters (a cluster no image of the batch selects keeps P = θ and still counts). The inner
steps are the injected `optimizer` (fresh for every task: its state is cleared), its learning rate follows
`lr_scheduler` over the meta steps. θ takes no gradient of a loss: its step is SGD at the constant learning rate ε
(`meta_step_size`) along the Reptile direction, once per meta step, which is what `trainer.global_step` and
`max_steps` count (the inner steps are not trainer steps). h_t is task t's head: CLIP's text classifier of its class
names (`head: text`) or a linear head of its own (`head: linear`, trained in every inner loop and kept across meta
steps, not meta-learned). The checkpoint's `meta_prompt.*` is θ: the `meta_prompt:` of a DAMVP run
(`damvp.load_meta_prompt`), which starts every cluster prompt there.

Tasks, within the data contract. A task is an upstream dataset: a shard set in a folder of its own (one `vlp-data`
build whose manifest names its classes), given as `tasks` (shard patterns). The method reads each task's class names
and clusters its first `max_cluster_samples` images when it is built; the data arrive from
`data_modules.TaskImageDataModule`, which asks the method for the tasks, streams their shards as one shard set through
the one pipeline (shard shuffle, rank / worker split, shuffle buffer, exact resume: nothing new) and tags every sample
with `task`, its dataset's index. So batches stay plain batch dicts, a dataset joins by naming its shards, and each
keeps its own manifest and classes; tasks as label groups of one pool would need the datasets merged into one shard
set first, and one loader per task would give batches that are not dicts and a resume state per loader. The price:
a meta step adapts to the tasks its batch holds, weighted by how often they come (their size), where the official
loop takes one batch of every task per step; serial or batched, that is Reptile, and a `shuffle_buffer` of several
shards mixes several tasks into each batch. Without `tasks` there is one task, the whole training stream, with
`classnames` / `classnames_from` and one prompt.

Official settings (github.com/shikiw/DAM-VP, `meta-training/`, read at its last commit; paths in that repository):
* tasks: SUN397, STL-10, Fru92, Veg200, Oxford-IIIT Pets, EuroSAT (`arguments.py:18-25`, `--num_tasks 6`); each meta
  step takes the next batch of every task (`main_hf.py:111-117`), an epoch is as many steps as the smallest task has
  batches (`main_hf.py:58`; Pets' 3,680 trainval images: 29), 200 epochs (`arguments.py:156`), batch 128 per task
  (`arguments.py:122`), 224 px crops (resize 256, random crop, flip: `data_utils/transforms.py`), 30 px padding
  prompts from `randn` (`arguments.py:131`, `models/prompters.py:14-32`);
* inner loop: every cluster prompt a copy of θ (`meta_hf.py:210-213`), `--update_step` 4 steps (README; default 8,
  `arguments.py:162`) on the task's batch (`meta_hf.py:222-275`), a fresh optimizer per task and step: Adam
  (`meta_hf.py:217`, `meta_clip.py:213`), or for head tuning SGD with weight decay 1e-4 for the prompts and lr 0.1
  for the task's linear head (`meta_ht.py:186-196`); cross-entropy (`meta_hf.py:48`);
* inner learning rate `--meta_lr` (README: 0.5 for ViT-B-1k, Swin-B, MoCo-v3, ResNet-50; 1.0 for CLIP and ViT-B-22k)
  on a cosine over all meta steps, no warmup (`meta_hf.py:51-60`, `main_hf.py:120`); `--update_lr` is unread (:37);
* outer step θ <- θ - ε Σ (θ - P_{t,m}) / Σ_t M_t (`meta_hf.py:131-178`, `computer_diff`, `computer_meta_weight`),
  ε = `--meta_step_size` 0.5 (README), constant;
* clusters: per task the first 1,000 training images, average linkage, τ per backbone (ViT-B-1k 31, ViT-B-22k 10,
  Swin-B-22k 20, MoCo-v3 18, ResNet-50 21; `meta_hf.py:327-379`); for CLIP τ per dataset (SUN397 40, STL-10 6,
  Fru92 25, Veg200 40, Pets 16, EuroSAT 6) on CLIP's class logits of the task (`meta_clip.py:324-362`);
* heads: CLIP's logit scale x cosine with "a photo of a {class}" (`meta_clip.py:51-70`, `:191`); head tuning one
  linear head per task (`meta_ht.py:51-60`); head-free: the task's C most active features of the backbone as
  logits (`meta_hf.py:63-82`).

Not as the official code: the head-free "most active features" logits are not built (DAMVP has the text and linear
heads); the clusters live in the frozen joint embeddings (text head) or probe features as DAMVP's, with one τ for all
tasks; the head's learning rate (`head_lr`) follows the schedule too; the prompts of clusters no image selects get a
zero gradient (nothing moves under Adam without weight decay; SGD's weight decay shrinks them slightly); the official
keeps the prompt of the lowest training loss and scores every epoch by fine-tuning on a held-out dataset
(`main_hf.py:126-142`): here that evaluation is the DAMVP run the meta prompt starts. Meta-training runs in one
process, as the official loop does, and in bf16 or fp32 (fp16's loss scaling would rescale the Reptile step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from data_modules.pipeline import DataConfigError, batch_labels
from vlp_lightning.catalog import Paper
from vlp_lightning.methods.adaptation.base import ClassNames
from vlp_lightning.methods.adaptation.damvp import Head, PixelPrompting
from vlp_lightning.methods.base import WarmupCosineLR
from vlp_lightning.modules.visual_prompts import ClusterPrompts


class DAMVPMeta(PixelPrompting):
    """Reptile meta-training of DAM-VP's meta prompt θ over several tasks (module doc).

    Args:
        pretrained: checkpoint of a suite method (CLIP-family for `head: text`).
        tasks: one shard pattern per task (a folder of its own, whose manifest names the classes of `label_field`);
            None: one task, the training stream, with `classnames` / `classnames_from`.
        classnames / classnames_from: the classes of the one task without `tasks` (`adaptation.base.ClassNames`).
        label_field: the labels of every task (`cls` or an integer field of the samples' `.json`).
        head / template / prompt_width: see `damvp.PixelPrompting`.
        distance_threshold: τ of the clustering of each task's images (None: one prompt per task, DAM-VP without
            diversity awareness).
        max_cluster_samples: images of each task clustered (1,000 in the official code).
        inner_steps: k, the inner steps of every task at every meta step.
        meta_step_size: ε of the Reptile update.
        head_lr: learning rate of the tasks' linear heads (None: the optimizer's).
        pretrained_config, crop_scale, compile: see `AdaptationMethod`.
        optimizer / lr_scheduler: the inner steps' optimizer (fresh for each task) and its schedule over meta steps.
    """

    paper = Paper("Diversity-Aware Meta Visual Prompting", "Huang et al.", 2023,
                  "the meta-prompt training of sec. 3.4, with the official meta-training/ settings")
    #: the tasks' linear heads get no weight decay (the official head-tuning loop, `meta_ht.py:177`).
    no_weight_decay_names = ("task_heads.",)

    def __init__(
        self,
        pretrained: str,
        tasks: list[str] | None = None,
        classnames: list[str] | None = None,
        classnames_from: str | None = None,
        label_field: str = "cls",
        head: Head = "text",
        template: str = "a photo of a {}",
        prompt_width: int | None = None,
        distance_threshold: float | None = None,
        max_cluster_samples: int = 1000,
        inner_steps: int = 4,
        meta_step_size: float = 0.5,
        head_lr: float | None = None,
        pretrained_config: str | None = None,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(pretrained, head, template, prompt_width, pretrained_config, crop_scale, optimizer,
                         lr_scheduler, compile)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.automatic_optimization = False  # the inner steps and the Reptile update are this method's own loop
        name = type(self).__name__
        if tasks is not None and (classnames is not None or classnames_from is not None):
            raise ValueError(f"{name} reads each task's classes from the manifest.json of its shards; leave "
                             "classnames and classnames_from unset when tasks are given")
        if inner_steps < 1 or meta_step_size <= 0:
            raise ValueError(f"{name} needs inner_steps >= 1 and meta_step_size > 0, got {inner_steps} and "
                             f"{meta_step_size}")
        self.task_shards = list(tasks or [])
        self.label_field = label_field
        self.inner_steps, self.meta_step_size, self.head_lr = inner_steps, meta_step_size, head_lr
        self.task_classes = ([ClassNames(None, pattern, label_field, "all", name) for pattern in self.task_shards]
                             or [ClassNames(classnames, classnames_from, label_field, "all", name)])
        self.meta_prompt = self.make_prompt().requires_grad_(False)  # θ: moved by the Reptile step only
        clustered = self.task_shards if distance_threshold is not None else []  # no shards: one prompt per task
        self.task_prompts = nn.ModuleList(
            ClusterPrompts(self.frozen_prototypes(clustered[task] if clustered else None, self.representation,
                                                  max_cluster_samples, distance_threshold=distance_threshold),
                           self.make_prompt)
            for task in range(len(self.task_classes))
        )
        for prompts in self.task_prompts:
            prompts.start_from(self.meta_prompt)
        self.task_heads = None
        if head == "linear":
            width = self.frozen_dim("probe")
            self.task_heads = nn.ModuleList(nn.Linear(width, len(classes.all)) for classes in self.task_classes)

    def setup(self, stage: str) -> None:
        """Stop, in one sentence, where the meta step would be wrong: several processes, or fp16's loss scaling."""
        name = type(self).__name__
        if self.trainer.world_size > 1:
            raise ValueError(f"{name} meta-trains in one process (its inner loops differ per batch, as in the "
                             f"official single-GPU loop); run it with trainer.devices: 1, not {self.trainer.world_size}"
                             " processes")
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(f"{name}'s Reptile step is no loss gradient, and fp16's loss scaling would rescale it; "
                             "use trainer.precision bf16-mixed or 32-true")

    # ------------------------------------------------------------------ tasks
    def batch_tasks(self, batch: dict) -> Tensor:
        """The task index of every sample [N]: the batch's `task` (`TaskImageDataModule`), or 0 with one task."""
        count = len(batch["image"])
        if "task" not in batch:
            if len(self.task_classes) > 1:
                raise DataConfigError(f"{type(self).__name__} with {len(self.task_classes)} tasks needs task-tagged "
                                      "batches (`task`); use data: class_path: data_modules.TaskImageDataModule")
            return torch.zeros(count, dtype=torch.long, device=self.device)
        return batch["task"].to(self.device)

    def task_logits(self, task: int, prompted: Tensor) -> Tensor:
        """Task `task`'s class logits [N, C_t] of prompted images, through its head."""
        head = self.task_heads[task] if self.task_heads is not None else None
        return self.head_logits(prompted, self.task_classes[task].all, head).float()

    # ------------------------------------------------------------------ representations: the frozen model with θ
    def encode_image(self, images: Tensor) -> Tensor:
        return self.pretrained.encode_image(self.meta_prompt(images))

    def encode_text(self, text: dict[str, Tensor]) -> Tensor:
        return self.pretrained.encode_text(text)

    def has_joint_space(self) -> bool:
        return self.pretrained.has_joint_space()

    def probe_features(self, images: Tensor) -> Tensor:
        return self.pretrained.probe_features(self.meta_prompt(images))

    # ------------------------------------------------------------------ loss and the meta step
    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        """The inner loops' objective on a batch (each sample through its task's cluster prompts and head, as they
        stand), its accuracy, and `meta_loss`: the same with θ as every prompt."""
        labels = batch_labels(batch, self.label_field).to(self.device)
        tasks = self.batch_tasks(batch)
        loss, correct, meta_loss = [], [], []
        for task in tasks.unique().tolist():
            images, targets = batch["image"][tasks == task], labels[tasks == task]
            logits = self.task_logits(task, self.task_prompts[task](images, self.frozen_features(images)))
            loss.append(F.cross_entropy(logits, targets, reduction="sum"))
            correct.append((logits.argmax(1) == targets).sum())
            with torch.no_grad():
                meta_logits = self.task_logits(task, self.meta_prompt(images))
                meta_loss.append(F.cross_entropy(meta_logits, targets, reduction="sum"))
        count = len(labels)
        return {"loss": sum(loss) / count, "accuracy": sum(correct).float() / count,
                "meta_loss": sum(meta_loss) / count}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        """One meta step (module doc): k inner steps per task of the batch from θ, then θ toward the results."""
        self._restore_rng_states()
        inner, outer = self.optimizers()
        labels = batch_labels(batch, self.label_field).to(self.device)
        tasks = self.batch_tasks(batch)
        first_losses, last_losses = [], []
        for task in tasks.unique().tolist():
            images, targets = batch["image"][tasks == task], labels[tasks == task]
            features = self.frozen_features(images)
            prompts = self.task_prompts[task]
            prompts.start_from(self.meta_prompt)
            inner.optimizer.state.clear()  # a fresh optimizer for every task (module doc)
            for step in range(self.inner_steps):
                loss = F.cross_entropy(self.task_logits(task, prompts(images, features)), targets)
                inner.zero_grad()
                self.manual_backward(loss)
                # through the strategy (precision, the non-finite guard), but not counted as a trainer step
                self.trainer.strategy.optimizer_step(inner.optimizer, closure=lambda: None)
                (first_losses if step == 0 else last_losses).append(loss.detach())
        inner.zero_grad()
        adapted = [prompt for task in tasks.unique().tolist() for prompt in self.task_prompts[task].prompts]
        direction = reptile_direction(self.meta_prompt, adapted)
        for name, theta in self.meta_prompt.named_parameters():
            theta.grad = -direction[name]
        outer.step()  # θ - ε · grad = θ + ε · mean(θ' - θ): the meta step `trainer.global_step` counts
        outer.zero_grad()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        size = len(labels)
        first = torch.stack(first_losses).mean()
        self.log("train/loss", first, prog_bar=True, on_step=True, batch_size=size)  # θ's loss: the first step's
        if last_losses:
            self.log("train/adapted_loss", torch.stack(last_losses).mean(), on_step=True, batch_size=size)
        self.log("train/tasks", float(len(first_losses)), on_step=True, batch_size=size)
        return first

    def configure_optimizers(self):
        """The inner steps' optimizer and its schedule (`VLPMethod`: over the parameter groups), and the Reptile step
        on θ: SGD at learning rate ε, given θ - mean(θ') as θ's gradient, once per meta step."""
        inner = super().configure_optimizers()
        outer = torch.optim.SGD(self.meta_prompt.parameters(), lr=self.meta_step_size)
        if isinstance(inner, dict):
            return [inner["optimizer"], outer], [inner["lr_scheduler"]]
        return [inner, outer]

    def parameter_groups(self) -> list[dict]:
        """The inner optimizer's parameters: the tasks' cluster prompts, and their linear heads at `head_lr`."""
        return self.parameter_groups_at(self.head_lr, self.task_heads if self.task_heads is not None else [])


@torch.no_grad()
def reptile_direction(meta: nn.Module, adapted: list[nn.Module]) -> dict[str, Tensor]:
    """mean_i(θ'_i - θ) per parameter of `meta` (θ), over `adapted` (θ'_i: modules of `meta`'s structure after their
    inner steps from θ): the Reptile direction, θ <- θ + ε · mean_i(θ'_i - θ) (Nichol et al. 2018, Alg. 2)."""
    return {name: torch.stack([dict(module.named_parameters())[name] - theta for module in adapted]).mean(0)
            for name, theta in meta.named_parameters()}
