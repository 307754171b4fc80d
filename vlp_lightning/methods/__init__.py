"""The methods index: every pretraining method, importable as `vlp_lightning.methods.<Name>`."""

from vlp_lightning.methods.base import VLPMethod, WarmupCosineLR
from vlp_lightning.methods.clip import CLIP
from vlp_lightning.methods.convirt import ConVIRT
from vlp_lightning.methods.mae import MAE
from vlp_lightning.methods.selfie import Selfie
from vlp_lightning.methods.sit import SiT
from vlp_lightning.methods.swav import SwAV

__all__ = ["VLPMethod", "WarmupCosineLR", "CLIP", "ConVIRT", "SwAV", "MAE", "Selfie", "SiT"]
