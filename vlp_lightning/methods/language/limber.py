"""LiMBeR (Merullo et al. 2023, "Linearly Mapping from Image to Text Space", ICLR): a frozen image encoder, a frozen
language model, and between them only a linear map P from the image features into k soft prompts in the LM's input
space, trained with the LM's captioning loss (image-conditioned next-token prediction of the caption, CC3M).

The paper's point is the comparison of image encoders that differ in how much language supervision they had:
CLIP (image-text contrastive), NF-ResNet50 (ImageNet labels) and BEIT (none, self-supervised): the same linear map
transfers more of the concepts the LM can name from the more language-supervised tower. The official configs
(github.com/jmerullo/limber, `image_prefix.py`, `configs/*.yml`): CLIP RN50x16's 12 x 12 grid before the attention
pool, each grid token mapped on its own (k = 144); BEIT-L's 196 patch tokens (k = 196); NF-ResNet50's pooled vector
mapped to k tokens by one Linear (`image_seq_len: 1`); dropout 0.1 after the map, no norm. The default here is the
per-token map (`LinearConnector(mode="tokens")`, dropout 0.1); `connector: {class_path: LinearConnector,
init_args: {mode: pooled, num_prompts: k}}` is the NF-ResNet50 variant.

The comparison is a recipe set: experiments/limber/emoji_{clip,mae,random}_tiny.yaml map our CLIP's, our MAE's
and a random ViT's tower into SmolLM2 (the bench's LiMBeR rows). LiMBeR's LM (GPT-J 6B) is not chat-tuned and
reads [image prompts][caption]; SmolLM2-Instruct reads them inside its chat template with a caption instruction.
"""

from __future__ import annotations

from vlp_lightning.catalog import Paper
from vlp_lightning.methods.language.base import FrozenLMMethod
from vlp_lightning.modules.connectors import LinearConnector


class LiMBeR(FrozenLMMethod):
    """A linear map from a frozen tower into a frozen LM (module doc; arguments: `FrozenLMMethod`). LiMBeR trains
    only the map: keep `train_vision` False and the LM frozen."""

    paper = Paper("Linearly Mapping from Image to Text Space", "Merullo et al.", 2023)
    connector_class = LinearConnector
