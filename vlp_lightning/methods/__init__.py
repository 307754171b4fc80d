"""The methods index: every pretraining method, importable as `vlp_lightning.methods.<Name>`."""

from vlp_lightning.methods.adaptation.cocoop import CoCoOp
from vlp_lightning.methods.adaptation.coop import CoOp
from vlp_lightning.methods.adaptation.damvp import DAMVP
from vlp_lightning.methods.adaptation.damvp_meta import DAMVPMeta
from vlp_lightning.methods.adaptation.drtune import DRTune
from vlp_lightning.methods.adaptation.finetune import FineTune
from vlp_lightning.methods.adaptation.maple import MaPLe
from vlp_lightning.methods.adaptation.pcb import PCB
from vlp_lightning.methods.adaptation.peft_classifier import PEFTClassifier
from vlp_lightning.methods.adaptation.pre import PRE
from vlp_lightning.methods.adaptation.pvp import PVP
from vlp_lightning.methods.adaptation.robust_mae import RobustMAE
from vlp_lightning.methods.base import VLPMethod, WarmupCosineLR
from vlp_lightning.methods.clip import CLIP
from vlp_lightning.methods.contrastive.grain import GRAIN
from vlp_lightning.methods.contrastive.dreamlip import DreamLIP
from vlp_lightning.methods.convirt import ConVIRT
from vlp_lightning.methods.ffr import FFR
from vlp_lightning.methods.fusion.albef import ALBEF
from vlp_lightning.methods.fusion.arl import ARL
from vlp_lightning.methods.fusion.bus import BUS
from vlp_lightning.methods.fusion.coca import CoCa
from vlp_lightning.methods.fusion.fiber import FIBER
from vlp_lightning.methods.fusion.unit import UNIT
from vlp_lightning.methods.fusion.urbanclip import UrbanCLIP
from vlp_lightning.methods.language.infmllm import InfMLLM
from vlp_lightning.methods.language.limber import LiMBeR
from vlp_lightning.methods.language.llava import LLaVA
from vlp_lightning.methods.language.mplug_video import MPLUGVideo
from vlp_lightning.methods.language.pllava import PLLaVA
from vlp_lightning.methods.language.simvlg import SimVLG
from vlp_lightning.methods.language.visionflan import VisionFlan
from vlp_lightning.methods.mae import MAE
from vlp_lightning.methods.self_supervised.barlow_twins import BarlowTwins
from vlp_lightning.methods.self_supervised.byol import BYOL
from vlp_lightning.methods.self_supervised.dino import DINO
from vlp_lightning.methods.self_supervised.hvp import HVP
from vlp_lightning.methods.self_supervised.look import LOOK
from vlp_lightning.methods.self_supervised.mmc import MMC
from vlp_lightning.methods.self_supervised.mocov2 import MoCoV2
from vlp_lightning.methods.self_supervised.mocov3 import MoCoV3
from vlp_lightning.methods.self_supervised.simclr import SimCLR
from vlp_lightning.methods.self_supervised.vicreg import VICReg
from vlp_lightning.methods.selfie import Selfie
from vlp_lightning.methods.sit import SiT
from vlp_lightning.methods.swav import SwAV
from vlp_lightning.methods.video.gfsltvlp import GFSLTVLP
from vlp_lightning.methods.video.hecvl import HecVL
from vlp_lightning.methods.video.ophclip import OphCLIP
from vlp_lightning.methods.video.sigma import SIGMA
from vlp_lightning.methods.video.temadapter import TemAdapter
from vlp_lightning.methods.video.vedit import VEDIT
from vlp_lightning.methods.video.violet import VIOLET
from vlp_lightning.methods.video.xclip import XCLIP



def method_names() -> list[str]:
    """Names of every pretraining method of the index, in index order (what `vlp methods`, error messages, the
    benches and the shared tests iterate)."""
    return [name for name in __all__ if name not in {"VLPMethod", "WarmupCosineLR"}]


__all__ = [
    "VLPMethod", "WarmupCosineLR", "CLIP", "ConVIRT", "GRAIN", "DreamLIP", "SwAV", "MAE", "Selfie", "SiT",
    "BYOL", "SimCLR", "MoCoV2", "MoCoV3", "DINO", "BarlowTwins", "VICReg", "MMC", "LOOK", "HVP", "FFR",
    "CoOp", "CoCoOp", "MaPLe", "PRE", "FineTune", "DRTune", "DAMVP", "DAMVPMeta", "PEFTClassifier", "PVP", "PCB",
    "RobustMAE",
    "ALBEF", "CoCa", "UrbanCLIP", "FIBER", "BUS", "UNIT", "ARL",
    "LLaVA", "LiMBeR", "SimVLG", "InfMLLM", "VisionFlan", "PLLaVA", "MPLUGVideo",
    "XCLIP", "HecVL", "OphCLIP", "SIGMA", "TemAdapter", "VEDIT", "VIOLET", "GFSLTVLP",
]
