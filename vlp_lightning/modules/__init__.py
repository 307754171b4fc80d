"""Building blocks shared by the methods: image towers (timm), text towers, tokenizers, projection heads."""

from vlp_lightning.modules.heads import GELUMLPProjection, MLPHead, ProjectionHead
from vlp_lightning.modules.text import HFTextEncoder, TextTransformer
from vlp_lightning.modules.tokenizers import ByteTokenizer, CLIPTokenizer, HFTokenizer, Tokenizer
from vlp_lightning.modules.vision import VisionEncoder

__all__ = [
    "ByteTokenizer",
    "CLIPTokenizer",
    "GELUMLPProjection",
    "HFTextEncoder",
    "HFTokenizer",
    "MLPHead",
    "ProjectionHead",
    "TextTransformer",
    "Tokenizer",
    "VisionEncoder",
]
