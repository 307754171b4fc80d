"""Pixel-space visual prompts and their per-cluster selection: the blocks of DAM-VP (and of any method that prompts
the input image of a frozen model).

* `PadPrompt` — the padding prompt of visual prompting (Bahng et al. 2022, "Exploring Visual Prompts for Adapting
  Large-Scale Models", sec. 3): four learnable strips of width p framing the image (the centre left untouched),
  added to the normalised image, x~ = x + P; 4 p (S - p) x 3 parameters.
* `ClusterPrompts` — one prompt per cluster of the downstream data and the rule that picks it (DAM-VP, Huang et al.
  2023, sec. 3.2-3.3): the clusters are found on the frozen model's features of the un-prompted images by
  agglomerative clustering with average linkage and a distance threshold τ (scikit-learn's
  `AgglomerativeClustering(n_clusters=None, linkage="average", distance_threshold=τ)`, official
  `coarse_clustering`), so more diverse data gets more clusters; the prototype of a cluster is its mean feature,
  and an image takes the prompt of the prototype nearest (Euclidean) to its frozen feature, in training and at test.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PadPrompt(nn.Module):
    """Learnable frame of width `width` around a `size` x `size` image, added to it (module doc)."""

    def __init__(self, size: int, width: int) -> None:
        super().__init__()
        if not 0 < 2 * width < size:
            raise ValueError(f"a padding prompt of width {width} does not fit a {size} px image (need 0 < 2 x width < "
                             f"{size}); choose a smaller prompt_width")
        self.size, self.width = size, width
        self.top = nn.Parameter(torch.randn(3, width, size))
        self.bottom = nn.Parameter(torch.randn(3, width, size))
        self.left = nn.Parameter(torch.randn(3, size - 2 * width, width))
        self.right = nn.Parameter(torch.randn(3, size - 2 * width, width))

    def frame(self) -> Tensor:
        """The prompt as an image [3, S, S], zero inside the frame."""
        centre = torch.zeros(3, self.size - 2 * self.width, self.size - 2 * self.width, device=self.top.device,
                             dtype=self.top.dtype)
        middle = torch.cat([self.left, centre, self.right], dim=2)
        return torch.cat([self.top, middle, self.bottom], dim=1)

    def forward(self, images: Tensor) -> Tensor:
        return images + self.frame().to(images.dtype)


def cluster_prototypes(features: Tensor, distance_threshold: float | None) -> Tensor:
    """Prototypes [M, D] of `features` [N, D]: the means of the clusters agglomerative clustering finds (average
    linkage, merges stop at `distance_threshold`); None gives one cluster (DAM-VP without diversity awareness)."""
    if distance_threshold is None or len(features) < 2:
        return features.mean(0, keepdim=True)
    from sklearn.cluster import AgglomerativeClustering

    labels = AgglomerativeClustering(n_clusters=None, linkage="average", distance_threshold=distance_threshold
                                     ).fit_predict(features.double().numpy())
    labels = torch.as_tensor(labels)
    return torch.stack([features[labels == cluster].mean(0) for cluster in labels.unique()])


class ClusterPrompts(nn.Module):
    """One `PadPrompt` per prototype, each image prompted by its nearest prototype's (module doc).

    Args:
        prototypes: [M, D] cluster prototypes in the frozen model's feature space.
        size, width: of every `PadPrompt`.
    """

    def __init__(self, prototypes: Tensor, size: int, width: int) -> None:
        super().__init__()
        self.register_buffer("prototypes", prototypes.float().clone())
        self.prompts = nn.ModuleList(PadPrompt(size, width) for _ in range(len(prototypes)))

    def start_from(self, prompt: PadPrompt | dict[str, Tensor]) -> None:
        """Every cluster's prompt copied from one (the meta-prompt)."""
        state = prompt.state_dict() if isinstance(prompt, nn.Module) else prompt
        for cluster_prompt in self.prompts:
            cluster_prompt.load_state_dict(state)

    def nearest(self, features: Tensor) -> Tensor:
        """Index of the nearest prototype of each feature [N, D] -> [N]."""
        return torch.cdist(features.float(), self.prototypes).argmin(dim=1)

    def forward(self, images: Tensor, features: Tensor) -> Tensor:
        """Each image plus the prompt of the prototype nearest to its frozen feature."""
        frames = torch.stack([prompt.frame() for prompt in self.prompts])  # [M, 3, S, S]
        return images + frames[self.nearest(features)].to(images.dtype)
