"""Task-tagged image batches, for meta-learning across datasets (DAMVPMeta): `TaskImageDataModule`.

A task is a dataset: a shard set of its own folder (one `vlp-data` build, with its manifest and class names). The
tasks' shards stream as one shard set through the one pipeline (their `::` list, with the same shard shuffle,
split by rank and worker, shuffle buffer and exact mid-epoch resume as any split), and every sample carries `task`,
the index of the task whose folder holds its shard: a batch is the usual batch dict plus `task` [N] long. Validation
and test shards are tagged the same way, so a task's `val-*` shards score that task. A `.cls` label must lie among
its own task's classes (the tasks' manifests each count their own; the pooled set has no one manifest).

How many tasks a batch holds depends on how far each worker's shuffle buffer reaches across shards: with `vlp-data`'s
1,000-sample shards, a `shuffle_buffer` of several thousand puts several tasks into every batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt

from data_modules.datamodules import ImageDataModule
from data_modules.manifest import class_count, local_path
from data_modules.pipeline import (
    DataConfigError,
    SampleDecoder,
    _BadSample,
    expand_shards,
    manifest_of,
    shard_members,
)
from data_modules.views import Views


def shard_folder(url: str) -> str:
    """The folder of a shard: a local shard's resolved directory, else its URL up to the last '/'."""
    path = local_path(url)
    return str(path.resolve().parent) if path is not None else url.rsplit("/", 1)[0]


@dataclass
class TaskSampleDecoder(SampleDecoder):
    """`SampleDecoder` plus each sample's `task` (module doc): `task_of_shard` maps the split's shard URLs to task
    indices, `class_counts` holds each task's number of `.cls` classes (None: unknown, only negative labels are
    refused)."""

    task_of_shard: dict[str, int] = field(default_factory=dict)
    class_counts: tuple[int | None, ...] = ()

    def decode(self, raw: dict, rng: random.Random, caption_seed: str = "") -> dict:
        sample = super().decode(raw, rng, caption_seed)
        task = self.task_of_shard[raw["__url__"]]
        count = self.class_counts[task]
        if "label" in sample and count is not None and sample["label"] >= count:
            raise _BadSample(f"label {sample['label']} (.cls) is not one of the {count} classes of task {task}")
        sample["task"] = task
        return sample

    def collate(self, samples: list[dict], seed: int) -> dict:
        batch = super().collate(samples, seed)
        batch["task"] = torch.tensor([sample["task"] for sample in samples], dtype=torch.long)
        return batch


class TaskImageDataModule(ImageDataModule):
    """Images of several datasets, each sample tagged with its dataset's index `task` (module doc).

    Args:
        tasks: one shard pattern per task, each in a folder of its own; None asks the attached method
            (`task_shards`, DAMVPMeta's `tasks`), which fixes the task indices.
        train_shards: the shards to train on; None: every task's, joined by `::`.
        (the rest: see `StreamingDataModule`)
    """

    def __init__(
        self,
        tasks: list[str] | None = None,
        train_shards: str | None = None,
        val_shards: str | None = None,
        test_shards: str | None = None,
        batch_size: PositiveInt = 64,
        num_workers: NonNegativeInt = 2,
        image_size: int | None = None,
        views: Views | None = None,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        seed: int = 0,
        strict: bool = False,
        predict_shards: str | None = None,
    ) -> None:
        super().__init__(train_shards, val_shards, test_shards, batch_size, num_workers, image_size, views,
                         samples_per_epoch, shuffle_buffer, resampled, seed, strict, predict_shards)
        self.tasks = list(tasks) if tasks is not None else None

    def setup(self, stage: str) -> None:
        if str(getattr(stage, "value", stage)) != "predict":
            method = self.trainer.lightning_module if self.trainer is not None else None
            self.tasks = self._resolve_tasks(method)
            if self.train_shards is None:
                self.train_shards = "::".join(self.tasks)
        super().setup(stage)

    def _resolve_tasks(self, method: object | None) -> list[str]:
        """The task shard patterns: this module's, else the method's; the two must agree where both are set."""
        wanted = list(getattr(method, "task_shards", None) or [])
        if self.tasks and wanted and self.tasks != wanted:
            raise DataConfigError(f"data.tasks {self.tasks} differ from the tasks of {type(method).__name__} "
                                  f"{wanted}; set them in one place (the method's tasks)")
        tasks = self.tasks or wanted
        if not tasks:
            raise DataConfigError("TaskImageDataModule needs the task shard sets: set data.tasks, or the tasks of the "
                                  "method (e.g. DAMVPMeta's model.init_args.tasks)")
        return tasks

    def _build_decoders(self, method: object | None) -> None:
        """The usual decoders, each tagging samples with their task; a split's shard outside every task's folder
        stops here in one sentence."""
        task_of_folder: dict[str, int] = {}
        for task, pattern in enumerate(self.tasks):
            for url in expand_shards(pattern):
                other = task_of_folder.setdefault(shard_folder(url), task)
                if other != task:
                    raise DataConfigError(f"tasks {self.tasks[other]!r} and {pattern!r} share the folder "
                                          f"{shard_folder(url)}; each task is a shard set of its own folder")
        manifests = [manifest_of(expand_shards(pattern)) for pattern in self.tasks]
        counts = tuple(class_count(manifest) for manifest in manifests)
        unlabelled = [pattern for pattern, manifest in zip(self.tasks, manifests)
                      if "cls" not in shard_members(expand_shards(pattern), manifest)]
        if unlabelled and len(unlabelled) < len(self.tasks):
            raise DataConfigError(f"the tasks {unlabelled} have no .cls labels but the others have; give every task "
                                  "labelled shards (a meta-learning task is a classification task)")
        for data in self.splits.values():
            outside = [url for url in data.urls if shard_folder(url) not in task_of_folder]
            if outside:
                raise DataConfigError(f"{data.describe()} holds {outside[0]}, which is in the folder of none of the "
                                      f"tasks {self.tasks}; give shards of the tasks' folders")
        super()._build_decoders(method)
        for split, data in self.splits.items():
            decoder = self.decoders[split]
            options = {option.name: getattr(decoder, option.name) for option in fields(SampleDecoder)}
            self.decoders[split] = TaskSampleDecoder(
                **{**options, "num_classes": None},
                task_of_shard={url: task_of_folder[shard_folder(url)] for url in data.urls},
                class_counts=counts,
            )
