"""Building blocks shared by the methods: image towers (timm), text towers, tokenizers, projection heads, the
memory bank."""

from vlp_lightning.modules.heads import GELUMLPProjection, MLPHead, ProjectionHead
from vlp_lightning.modules.memory_bank import MemoryBank
from vlp_lightning.modules.text import HFTextEncoder, TextTransformer
from vlp_lightning.modules.tokenizers import ByteTokenizer, CLIPTokenizer, DecodingTokenizer, HFTokenizer, Tokenizer
from vlp_lightning.modules.vision import VisionEncoder

__all__ = [
    "ByteTokenizer",
    "CLIPTokenizer",
    "DecodingTokenizer",
    "GELUMLPProjection",
    "HFTextEncoder",
    "HFTokenizer",
    "MLPHead",
    "MemoryBank",
    "ProjectionHead",
    "TextTransformer",
    "Tokenizer",
    "VisionEncoder",
]
