"""TensorBoard embedding projector: image features with thumbnails, labels and captions.

The projector (TensorBoard's PROJECTOR tab) shows PCA / t-SNE / UMAP of the vectors, each drawn as its image
thumbnail and searchable by its metadata: whether classes form clusters, and which images sit next to which, is
often the quickest sanity check of a representation.
"""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer

from data_modules.pipeline import expand_shards, manifest_of
from vlp_lightning.callbacks.features import (
    MAX_THUMBNAILS,
    EvalFeatures,
    EvaluationCallback,
    has_joint_space,
    tensorboard_writers,
)


def projector_metadata(
    features: EvalFeatures, label_field: str, classnames: list[str] | None
) -> tuple[list, list[str] | None]:
    """Rows of (label, caption) as available, and the header (None for a single column, TensorBoard's format)."""
    columns: dict[str, list[str]] = {}
    if features.has_labels(label_field):
        labels = features.labels_of(label_field).tolist()
        columns["label"] = [
            classnames[label] if classnames and label < len(classnames) else str(label) for label in labels
        ]
    columns["caption"] = [
        " ".join(caption.split()) for caption in features.captions  # one line, no tabs: the metadata is a TSV file
    ] if features.captions is not None else list(features.keys)
    if len(columns) == 1:
        return next(iter(columns.values())), None
    return [list(row) for row in zip(*columns.values())], list(columns)


class EmbeddingProjector(EvaluationCallback):
    """Writes the image embeddings (joint space where the method has one, else `probe_features`) of the first
    `max_samples` samples of `shards` to TensorBoard's projector
    (`projector/<name>`), with thumbnails and labels / captions as metadata. Runs at the end of validate / test,
    and during fit every `every_n_epochs` epochs (default 0: never, projector data is large).

    Args:
        shards: shard pattern to embed.
        name: tag in the projector.
        max_samples: how many samples, at most `MAX_THUMBNAILS` (their thumbnails form one sprite image).
        label_field: `cls` or an integer `.json` field shown as the label (by its manifest class name if any).
        every_n_epochs, batch_size, num_workers: see `EvaluationCallback`.
    """

    def __init__(
        self,
        shards: str,
        name: str = "projector",
        max_samples: int = 500,
        label_field: str = "cls",
        every_n_epochs: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, batch_size=batch_size, num_workers=num_workers)
        if not 0 < max_samples <= MAX_THUMBNAILS:
            raise ValueError(f"EmbeddingProjector: max_samples must be in 1..{MAX_THUMBNAILS}, got {max_samples}")
        self.shards = shards
        self.name = name
        self.max_samples = max_samples
        self.label_field = label_field

    def evaluate(self, trainer: Trainer, method: LightningModule) -> dict[str, float]:
        representation = "joint" if has_joint_space(method) else "probe"
        features = self.features(method, self.shards, self.max_samples, representation)
        writers = tensorboard_writers(trainer)
        if writers:
            classnames = ((manifest_of(expand_shards(self.shards)) or {}).get("classnames") or {}).get(self.label_field)
            metadata, header = projector_metadata(features, self.label_field, classnames)
            for writer in writers:
                writer.add_embedding(
                    features.image,
                    metadata=metadata,
                    label_img=features.thumbnails.float() / 255,
                    global_step=trainer.global_step,
                    tag=f"projector/{self.name}",
                    metadata_header=header,
                )
        return {}
