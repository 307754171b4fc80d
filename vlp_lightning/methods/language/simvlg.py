"""SimVLG (Jian et al. 2023, "SimVLG: Simple and Efficient Pretraining of Visual Language Generative Models"): one
stage, one loss: the frozen LLM's captioning loss (image-conditioned next-token prediction of the caption), with
the visual tokens compacted by gradually merging similar ones during training instead of a separate
representation-learning stage (BLIP-2's Q-Former pre-training).

The connector is `modules.TokenMergingConnector`: ToMe's bipartite soft matching (Bolya et al. 2023) of the
tower's tokens, size-weighted averages, repeated until the token count of the current point of training is
reached; the count falls linearly from the tower's N to `final_tokens` over the run (`set_progress`, which
`FrozenLMMethod` calls before every batch from the optimizer steps done), then an MLP into the LM's space.
Catalogue note: the paper body and code were not readable here; the merging rule (ToMe on the tower's output
features) and the linear schedule are inferred from the abstract and ToMe, and the connector's docstring says so.
"""

from __future__ import annotations

from vlp_lightning.catalog import Paper
from vlp_lightning.methods.language.base import FrozenLMMethod
from vlp_lightning.modules.connectors import TokenMergingConnector


class SimVLG(FrozenLMMethod):
    """Frozen LM, captioning loss only, gradual token merging (module doc; arguments: `FrozenLMMethod`)."""

    paper = Paper("SimVLG: Simple and Efficient Pretraining of Visual Language Generative Models", "Jian et al.", 2023,
                  note="merging rule and schedule inferred from the abstract and ToMe (paper body not readable)")
    connector_class = TokenMergingConnector
