"""Visual prompts added to the input image of a frozen model, and their per-cluster selection: the blocks of DAM-VP
and RobustMAE. Every prompt is a module whose `pattern()` is the image [3, S, S] it adds.

* `PadPrompt` — the padding prompt of visual prompting (Bahng et al. 2022, "Exploring Visual Prompts for Adapting
  Large-Scale Models", sec. 3): four learnable strips of width p framing the image (the centre left untouched),
  added to the normalised image, x~ = x + P; 4 p (S - p) x 3 parameters.
* `ClusterPrompts` — one prompt per cluster of the downstream data and the rule that picks it (DAM-VP, Huang et al.
  2023, sec. 3.2-3.3): the clusters are found on the frozen model's features of the un-prompted images by
  agglomerative clustering with average linkage and a distance threshold τ (scikit-learn's
  `AgglomerativeClustering(n_clusters=None, linkage="average", distance_threshold=τ)`, official
  `coarse_clustering`), so more diverse data gets more clusters; the prototype of a cluster is its mean feature,
  and an image takes the prompt of the prototype nearest (Euclidean) to its frozen feature, in training and at test.
  `cluster_prototypes(features, num_clusters=K)` clusters with k-means instead (RobustMAE, Huang et al. 2023,
  ICCV: K clusters of the data, the prototypes are the k-means centres).
* `FrequencyPrompt` — a prompt that lives in the medium / high frequencies only (RobustMAE): a learnable half
  spectrum P (the real 2-D FFT layout, orthonormal scaling) multiplied by a high-pass mask M, brought back to pixels
  by the inverse FFT, x~ = F^-1(F(x) + M P) = x + F^-1(M P); the frequencies of normalised radius below r (r = 1 is
  the Nyquist frequency) are left exactly as they are. `high_pass` is the same mask applied to an image.
"""

from __future__ import annotations

from typing import Callable

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

    def pattern(self) -> Tensor:
        """The prompt as an image [3, S, S], zero inside the frame."""
        centre = torch.zeros(3, self.size - 2 * self.width, self.size - 2 * self.width, device=self.top.device,
                             dtype=self.top.dtype)
        middle = torch.cat([self.left, centre, self.right], dim=2)
        return torch.cat([self.top, middle, self.bottom], dim=1)

    def forward(self, images: Tensor) -> Tensor:
        return images + self.pattern().to(images.dtype)


def high_frequency_mask(size: int, radius: float) -> Tensor:
    """M [S, S // 2 + 1] in the real-FFT layout: 1 where the normalised radial frequency sqrt(fy² + fx²) / 0.5 is at
    least `radius` (medium and high frequencies), 0 below it (module doc)."""
    if not 0 <= radius <= 2 ** 0.5:
        raise ValueError(f"low_frequency_radius must be in [0, 1.41] (1 is the Nyquist frequency), got {radius}")
    rows = torch.fft.fftfreq(size).abs().view(-1, 1)
    columns = torch.fft.rfftfreq(size).view(1, -1)
    return ((rows ** 2 + columns ** 2).sqrt() / 0.5 >= radius).float()


def high_pass(images: Tensor, mask: Tensor) -> Tensor:
    """The medium / high-frequency part F^-1(M F(x)) of images [..., S, S] (`high_frequency_mask`)."""
    size = images.shape[-1]
    spectrum = torch.fft.rfft2(images.float(), norm="ortho")
    return torch.fft.irfft2(spectrum * mask, s=(size, size), norm="ortho").to(images.dtype)


class FrequencyPrompt(nn.Module):
    """A prompt restricted to the medium / high frequencies of a `size` x `size` image (module doc); it starts at
    zero (the prompted image is the image)."""

    def __init__(self, size: int, low_frequency_radius: float) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("mask", high_frequency_mask(size, low_frequency_radius), persistent=False)
        self.spectrum = nn.Parameter(torch.zeros(3, size, size // 2 + 1, 2))  # real and imaginary parts

    def pattern(self) -> Tensor:
        """F^-1(M P): the prompt in pixels [3, S, S]; its FFT is zero below the radius."""
        spectrum = torch.view_as_complex(self.spectrum) * self.mask
        return torch.fft.irfft2(spectrum, s=(self.size, self.size), norm="ortho")

    def forward(self, images: Tensor) -> Tensor:
        return images + self.pattern().to(images.dtype)


def cluster_prototypes(features: Tensor, distance_threshold: float | None = None, num_clusters: int | None = None,
                       seed: int = 0) -> Tensor:
    """Prototypes [M, D] of `features` [N, D]: the means of the clusters agglomerative clustering finds (average
    linkage, merges stop at `distance_threshold`), or the `num_clusters` k-means centres (k-means++ start, `seed`);
    neither gives one cluster (DAM-VP without diversity awareness)."""
    if num_clusters is not None:
        if not 1 <= num_clusters <= len(features):
            raise ValueError(f"num_clusters={num_clusters} needs between 1 and the {len(features)} clustered images; "
                             "lower num_clusters or cluster more images")
        from sklearn.cluster import KMeans

        kmeans = KMeans(n_clusters=num_clusters, n_init=10, random_state=seed).fit(features.double().numpy())
        return torch.as_tensor(kmeans.cluster_centers_, dtype=features.dtype)
    if distance_threshold is None or len(features) < 2:
        return features.mean(0, keepdim=True)
    from sklearn.cluster import AgglomerativeClustering

    labels = AgglomerativeClustering(n_clusters=None, linkage="average", distance_threshold=distance_threshold
                                     ).fit_predict(features.double().numpy())
    labels = torch.as_tensor(labels)
    return torch.stack([features[labels == cluster].mean(0) for cluster in labels.unique()])


class ClusterPrompts(nn.Module):
    """One prompt per prototype, each image prompted by its nearest prototype's (module doc).

    Args:
        prototypes: [M, D] cluster prototypes in the frozen model's feature space.
        make_prompt: builds one prompt (a module with `pattern()`), e.g. `lambda: PadPrompt(size, width)`.
    """

    def __init__(self, prototypes: Tensor, make_prompt: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.register_buffer("prototypes", prototypes.float().clone())
        self.prompts = nn.ModuleList(make_prompt() for _ in range(len(prototypes)))

    def start_from(self, prompt: nn.Module | dict[str, Tensor]) -> None:
        """Every cluster's prompt copied from one (the meta-prompt)."""
        state = prompt.state_dict() if isinstance(prompt, nn.Module) else prompt
        for cluster_prompt in self.prompts:
            cluster_prompt.load_state_dict(state)

    def nearest(self, features: Tensor) -> Tensor:
        """Index of the nearest prototype of each feature [N, D] -> [N]."""
        return torch.cdist(features.float(), self.prototypes).argmin(dim=1)

    def forward(self, images: Tensor, features: Tensor) -> Tensor:
        """Each image plus the prompt of the prototype nearest to its frozen feature."""
        patterns = torch.stack([prompt.pattern() for prompt in self.prompts])  # [M, 3, S, S]
        return images + patterns[self.nearest(features)].to(images.dtype)
