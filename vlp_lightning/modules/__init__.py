"""Building blocks shared by the methods: image towers (timm), text towers, tokenizers, projection heads, visual
connectors into a language model, the memory bank."""

from vlp_lightning.modules.connectors import (
    Connector,
    LinearConnector,
    MLPConnector,
    PoolAdapter,
    QueryResampler,
    ScaleInvariantConnector,
    TokenMergingConnector,
    VisualAbstractor,
)
from vlp_lightning.modules.heads import GELUMLPProjection, MLPHead, ProjectionHead
from vlp_lightning.modules.language_model import LanguageModel
from vlp_lightning.modules.memory_bank import MemoryBank
from vlp_lightning.modules.text import HFTextEncoder, TextTransformer
from vlp_lightning.modules.tokenizers import ByteTokenizer, CLIPTokenizer, DecodingTokenizer, HFTokenizer, Tokenizer
from vlp_lightning.modules.vision import VisionEncoder

__all__ = [
    "ByteTokenizer",
    "CLIPTokenizer",
    "Connector",
    "DecodingTokenizer",
    "GELUMLPProjection",
    "HFTextEncoder",
    "HFTokenizer",
    "LinearConnector",
    "MLPConnector",
    "MLPHead",
    "LanguageModel",
    "MemoryBank",
    "PoolAdapter",
    "ProjectionHead",
    "QueryResampler",
    "ScaleInvariantConnector",
    "TextTransformer",
    "TokenMergingConnector",
    "Tokenizer",
    "VisionEncoder",
    "VisualAbstractor",
]
