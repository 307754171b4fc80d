"""The progress bar `vlp` installs: Lightning's rich bar, with a description that means something for step-budgeted
runs and without the logger version in the metrics.

Lightning writes `Epoch {n}/{max_epochs - 1}`; a run bounded by `max_steps` has `max_epochs = -1`, which reads
`Epoch 1/-2`. Here such a run reads `Epoch 1 · step 120/400` (updated every batch), an epoch-bounded one keeps
`Epoch 1/9`. The `v_num` entry (the TensorBoard version number, shown as a float) is dropped from the metrics.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar
from typing_extensions import override


class VLPProgressBar(RichProgressBar):
    """`RichProgressBar` whose training description counts steps when the run is bounded by `max_steps`."""

    def _step_bounded(self) -> bool:
        trainer = self.trainer
        return trainer.max_steps is not None and trainer.max_steps > 0 and trainer.max_epochs in (None, -1)

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if self._step_bounded():
            description = f"Epoch {current_epoch} · step {trainer.global_step}/{trainer.max_steps}"
        elif trainer.max_epochs is not None and trainer.max_epochs > 0:
            description = f"Epoch {current_epoch}/{trainer.max_epochs - 1}"
        else:
            description = f"Epoch {current_epoch}"
        if len(self.validation_description) > len(description):  # Lightning's padding against flicker
            description = f"{description:{len(self.validation_description)}}"
        return description

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._step_bounded() and self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id,
                                 description=self._get_train_description(trainer.current_epoch))

    @override
    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, int | str | float | dict]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
