"""What `vlp predict` writes: the embeddings of a shard set, with their sample keys, to one `.npz` file.

Every sample of the predict shards once, in shard order (`StreamingDataModule.predict_dataloader`), through
`VLPMethod.predict_step`. The file holds, one row per sample:

* `key` (str), and `caption` (str) / `label` (int) when the shards have them,
* `probe_features` [N, D]: the representation kNN and the linear probe use (every method),
* `image_embedding` [N, E] and, with captions, `text_embedding` [N, E]: the joint space (CLIP family).

Written with `numpy.savez` from plain arrays (strings as fixed-width unicode), so `numpy.load(path)` reads it with
its default `allow_pickle=False`; for pandas, `pandas.DataFrame({"key": z["key"], "label": z["label"]})` and the
embedding rows as arrays. The file appears once complete (written under a partial name, then renamed).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info


class EmbeddingWriter(Callback):
    """Collects `predict_step` outputs and writes them to `path` at the end of `vlp predict`.

    Args:
        path: the `.npz` file; None writes `predictions.npz` in the run's folder (`runs/<method>/<experiment>/`).
    """

    def __init__(self, path: str | None = None) -> None:
        if path is not None and not str(path).endswith(".npz"):
            raise ValueError(f"predictions.path={path!r} must end in .npz (numpy's archive format); e.g. out.npz")
        self.path = path
        self._rows: dict[str, list] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if str(getattr(stage, "value", stage)) == "predict" and trainer.world_size > 1:
            raise ValueError(
                f"vlp predict writes one file from one process, but the trainer runs {trainer.world_size}; "
                "set --trainer.devices 1 --trainer.num_nodes 1"
            )

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rows = {}

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        for name, value in outputs.items():
            self._rows.setdefault(name, []).append(value.numpy() if isinstance(value, torch.Tensor) else list(value))

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._rows:
            return
        arrays = {name: np.concatenate(parts) if isinstance(parts[0], np.ndarray) else np.asarray(sum(parts, []))
                  for name, parts in self._rows.items()}
        run_dir = trainer.loggers[0].save_dir if trainer.loggers else trainer.default_root_dir
        path = Path(self.path) if self.path is not None else Path(run_dir) / "predictions.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        with open(partial, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
        shapes = ", ".join(f"{name} {list(array.shape)}" for name, array in arrays.items())
        rank_zero_info(f"vlp predict: wrote {len(arrays['key'])} samples to {path} ({shapes})")
        self._rows = {}
