"""Projection heads: from an encoder's features into the space a loss compares.

* `ProjectionHead` — one linear map without bias: CLIP's image and text projections (Radford et al. 2021,
  sec. 2.4, "only a linear projection to map from each encoder's representation to the multi-modal embedding").
* `MLPHead` — the non-linear projection of SimCLR (Chen et al. 2020, sec. 2.1, g(.) = W2 ReLU(W1 h)), ConVIRT
  (Zhang et al. 2020, eq. 1) and SwAV (Caron et al. 2020, a 2-layer MLP with BatchNorm before the prototypes):
  hidden layers are Linear -> norm -> ReLU, the last layer is a plain Linear.
* `DINOHead` — DINO's MLP, bottleneck and weight-normalised last layer (Caron et al. 2021, sec. 3.1).
* `GELUMLPProjection` — open_clip's `proj_type="mlp"` text projection, which BiomedCLIP's released model uses
  (Zhang et al. 2023; open_clip `hf_model.py`): Linear -> GELU -> Linear, no biases, hidden width (in + out) // 2.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

NORMS: dict[str, type[nn.Module]] = {"bn": nn.BatchNorm1d, "ln": nn.LayerNorm}


class ProjectionHead(nn.Linear):
    """x @ W^T with no bias; state-dict key `weight` like `nn.Linear(in, out, bias=False)`."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)


class MLPHead(nn.Sequential):
    """`layers` linear layers; between them norm (BatchNorm "bn", LayerNorm "ln" or "none") and ReLU.

    A linear layer followed by a norm has no bias (the norm's shift replaces it).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int,
        layers: int = 2,
        norm: Literal["bn", "ln", "none"] = "bn",
    ) -> None:
        if layers < 1:
            raise ValueError(f"MLPHead needs at least one layer, got layers={layers}")
        if norm not in ("bn", "ln", "none"):
            raise ValueError(f"norm must be 'bn', 'ln' or 'none', got {norm!r}")
        modules: list[nn.Module] = []
        width = in_features
        for _ in range(layers - 1):
            modules.append(nn.Linear(width, hidden_features, bias=norm == "none"))
            if norm != "none":
                modules.append(NORMS[norm](hidden_features))
            modules.append(nn.ReLU(inplace=True))
            width = hidden_features
        modules.append(nn.Linear(width, out_features))
        super().__init__(*modules)


class GELUMLPProjection(nn.Sequential):
    """Linear(in, (in + out) // 2) -> GELU -> Linear(-> out), without biases: open_clip's `proj_type="mlp"`, with
    its state-dict keys (`0.weight`, `2.weight`) so released weights load unchanged."""

    def __init__(self, in_features: int, out_features: int) -> None:
        hidden = (in_features + out_features) // 2
        super().__init__(
            nn.Linear(in_features, hidden, bias=False), nn.GELU(), nn.Linear(hidden, out_features, bias=False)
        )


class WeightNormLinear(nn.Module):
    """A linear layer without bias whose rows are v / ||v|| times a gain g (weight normalisation, Salimans & Kingma
    2016, as `torch.nn.utils.weight_norm`): g is fixed at 1 unless `learn_gain`."""

    def __init__(self, in_features: int, out_features: int, learn_gain: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's initialisation
        self.gain = nn.Parameter(torch.ones(out_features)) if learn_gain else None

    def forward(self, inputs):
        weight = nn.functional.normalize(self.weight, dim=1)
        return nn.functional.linear(inputs, weight if self.gain is None else weight * self.gain[:, None])


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021, sec. 3.1 and appendix): a 3-layer MLP (hidden 2048, GELU) to a
    bottleneck of 256, L2 normalisation, then a weight-normalised linear layer without bias to K outputs
    (`WeightNormLinear`) whose weight norm g is fixed at 1 (`norm_last_layer=True`, the official default and its
    ViT-B setting) or learnt (`norm_last_layer=False`: the official README's ViT-S setting, "better performance
    but can make the training unstable"). `last_layer` is the one DINO freezes during the first epoch."""

    def __init__(
        self, in_features: int, out_features: int, hidden_features: int = 2048, bottleneck: int = 256,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_features, hidden_features), nn.GELU(),
            nn.Linear(hidden_features, hidden_features), nn.GELU(),
            nn.Linear(hidden_features, bottleneck),
        )
        self.last_layer = WeightNormLinear(bottleneck, out_features, learn_gain=not norm_last_layer)

    def forward(self, features):
        return self.last_layer(nn.functional.normalize(self.mlp(features), dim=-1))
