"""PVP: Pre-trained Visual Parameter-Efficient Tuning (Song et al. 2023, arXiv 2304.13639).

PETuning modules (VPT prompts, LoRA, adapters) start from a random or zero initialisation, and with one or two
examples per class that start is the reason PETuning does poorly (the paper's empirical finding). PVP therefore
trains in two stages on the same frozen backbone:

1. upstream: pre-train the PEFT modules (with a classification head) on a large labelled data set, the backbone
   frozen: a `PEFTClassifier` run (supervised ImageNet data in the paper's setting, `experiments/peftclassifier/`);
2. downstream: start the PEFT modules from the upstream run's checkpoint (`peft_checkpoint`: the PEFT tensors only,
   by name; the head starts anew for the downstream classes) and tune them and the head on the few-shot task with
   the same cross-entropy (`PEFTClassifier.forward_loss`). The paper evaluates 1, 2, 4, 8 and 16 shots per class on
   five FGVC data sets (CUB-200-2011, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars) and VTAB-1k.

What is and is not done here: the two stages and the start from pre-trained modules are as the abstract describes;
the paper's own text beyond the abstract, its code and its hyper-parameters were not available, so the recipes use
VPT's official optimisation settings (SGD, momentum 0.9, cosine after 10 warm-up epochs of 100; `configs/`) and say
so. Sampling k shots per class is the data's job: `vlp-data shots` builds a seeded k-per-class shard set (the tiny
recipe trains on 16 shots of Fashion-MNIST). Without `peft_checkpoint` PVP is the
randomly initialised PETuning baseline (`PEFTClassifier`).
"""

from __future__ import annotations

from vlp_lightning.catalog import Paper
from vlp_lightning.methods.adaptation.peft_classifier import PEFTClassifier


class PVP(PEFTClassifier):
    """PEFT classification from pre-trained PEFT modules (module doc; arguments: `PEFTClassifier`, with
    `peft_checkpoint` the upstream run's last.ckpt)."""

    paper = Paper("PVP: Pre-trained Visual Parameter-Efficient Tuning", "Song et al.", 2023,
                  "upstream stage: a PEFTClassifier run; VPT's optimisation settings, the paper's were not available")
