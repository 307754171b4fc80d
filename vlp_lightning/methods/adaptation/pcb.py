"""PCB: active prompt learning (Bang et al. 2024, "Active Prompt Learning in Vision Language Models", CVPR).

Active learning for CoOp on a frozen CLIP: labels are bought a few at a time. Each round (official code,
`trainers/alvlm.py` `ALVLM.train`; section numbers of the paper are not cited: only its abstract was at hand):

1. the prompts are trained from scratch on the labelled set L (CoOp's loss, eq. 3 of CoOp; the official trainer
   rebuilds the prompt learner in `before_train` every round, so nothing carries over but L);
2. an acquisition function scores the unlabelled pool U with the frozen CLIP and the round's prompts and keeps a
   candidate set of gamma |pool| samples (gamma = 0.1, `TRAINER.COOPAL.GAMMA`):
   - entropy: the largest H(p) = -sum_c p_c log p_c of the prompted classifier (`entropy_scores`);
   - coreset (Sener & Savarese 2018): k-center greedy on the normalised image features, each pick the sample
     farthest from L and the picks so far (`coreset_select`);
   - BADGE (Ash et al. 2020): k-means++ seeding on the gradient embeddings g = (onehot(y^) - p) (x) f(x), the
     gradient of the cross-entropy at the pseudo-label y^ with respect to a linear classifier on f (`badge_select`);
3. PCB's balance sampler (`trainers/active_learning/pcb.py`): the classifier's pseudo-labels of the candidates
   stand in for their unknown labels, and the B = budget queries are picked one at a time from the class that L
   (plus the picks so far) holds fewest of, a random candidate of that pseudo-class each time (`pcb_balance`). The
   paper's observation (abstract, Fig. 1) is that plain acquisition on a VLM picks strongly class-imbalanced sets
   and can fall below random selection, and that the VLM's own predictions are good enough to rebalance the
   candidates before labelling;
4. the oracle labels the B queries and they move from U to L.

Round 0 has no trained prompts: B samples are drawn at random. The official protocol labels B = C (the number of
classes) per round for 8 rounds, with CoOp's class-specific context (CSC, 16 vectors, `scripts/alvlm/main.sh`) and
the CoOp optimiser (SGD 0.002, cosine, 200 epochs per round); random selection is the baseline.
The released code balances every acquisition's candidates; random selection draws B samples directly (its
balancing of B candidates down to B changes nothing), and `balance=False` gives the conventional baselines.

Deviation from the official `PCB.select`: when the rarest class has no candidate left, the official loop takes a
random candidate without counting it, so from then on every pick is random; here the rarest class among those that
still have candidates is taken, which keeps the labelled counts as uniform as the candidates allow (the paper's
stated aim). The description-augmented variants (AS / AE: several "<class>, which is/has <description>" prompts
per class, scores or embeddings averaged) are not built: they need per-dataset LLM-written descriptor files
(the official `descriptors/*.json`).

The round loop is `vlp active` (`vlp_lightning.commands.active`): each round's labelled subset is written as
shards and the recipe trained on it, as `vlp fewshot` does. This class is CoOp plus the query settings and
`query`, the selection from the pool's scores.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from vlp_lightning.catalog import Paper
from vlp_lightning.methods.adaptation.coop import CoOp
from vlp_lightning.methods.base import WarmupCosineLR
from vlp_lightning.modules.prompts import ClassTokenPosition

Acquisition = Literal["random", "entropy", "coreset", "badge"]
ACQUISITIONS = ("random", "entropy", "coreset", "badge")


def entropy_scores(probabilities: Tensor) -> Tensor:
    """Shannon entropy -sum_c p_c log p_c of each row of class probabilities [N, C] -> [N] (higher: less sure)."""
    return -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=1)


def coreset_select(features: Tensor, labelled_features: Tensor, count: int) -> Tensor:
    """k-center greedy (Sener & Savarese 2018, Algorithm 1): `count` rows of `features` [N, D], each the one
    farthest (Euclidean) from its nearest labelled row [L, D] or earlier pick; the covering radius of the labelled
    set shrinks greedily. Returns distinct indices in pick order."""
    count = min(count, features.shape[0])
    if labelled_features.shape[0]:
        nearest = torch.cdist(features, labelled_features).min(dim=1).values
    else:
        nearest = torch.full((features.shape[0],), float("inf"))
    picks: list[int] = []
    for _ in range(count):
        if picks:  # a picked row is at distance 0 from itself, so it is never picked again
            nearest = torch.minimum(nearest, torch.cdist(features, features[picks[-1:]]).squeeze(1))
        farthest = int(torch.argmax(nearest)) if picks or labelled_features.shape[0] else 0
        picks.append(farthest)
        nearest[farthest] = -1.0
    return torch.tensor(picks, dtype=torch.long)


def gradient_embeddings(features: Tensor, probabilities: Tensor) -> Tensor:
    """BADGE's embedding (Ash et al. 2020, eq. 1) [N, C x D]: (onehot(argmax p) - p) (x) f, the negated gradient
    of the cross-entropy at the pseudo-label with respect to the weights of a linear classifier on the features."""
    onehot = F.one_hot(probabilities.argmax(dim=1), probabilities.shape[1]).to(probabilities)
    return ((onehot - probabilities).unsqueeze(2) * features.unsqueeze(1)).flatten(1)


def badge_select(embeddings: Tensor, count: int, generator: torch.Generator | None = None) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) of `count` rows of `embeddings` [N, E], as BADGE does: the
    first the row of largest norm, each next drawn with probability proportional to its squared distance to the
    nearest pick, so the picks are both large (uncertain) gradients and diverse. Returns distinct indices."""
    count = min(count, embeddings.shape[0])
    picks = [int(embeddings.norm(dim=1).argmax())]
    nearest = torch.cdist(embeddings, embeddings[picks]).squeeze(1).pow(2)
    while len(picks) < count:
        weights = nearest.clone()
        weights[picks] = 0.0
        if float(weights.sum()) <= 0:  # every row left coincides with a pick: take the rest in order
            weights = torch.ones_like(nearest)
            weights[picks] = 0.0
        picks.append(int(torch.multinomial(weights, 1, generator=generator)))
        nearest = torch.minimum(nearest, torch.cdist(embeddings, embeddings[picks[-1:]]).squeeze(1).pow(2))
    return torch.tensor(picks, dtype=torch.long)


def pcb_balance(candidates: Tensor, pseudo_labels: Tensor, labelled_counts: Tensor, budget: int,
                generator: torch.Generator | None = None) -> Tensor:
    """PCB's pseudo-class balancing (official `PCB.select`): `budget` of the `candidates` (pool indices [K]) with
    their pseudo-labels [K], one at a time, each a random candidate of the pseudo-class that the labelled set
    (`labelled_counts` [C], counted by true label) plus the picks so far holds fewest of; ties go to the lower
    class. Classes with no candidate left are skipped (module doc: the official code turns random there). Returns
    at most `budget` distinct pool indices."""
    counts = labelled_counts.clone().long()
    order = torch.randperm(len(candidates), generator=generator)
    queues = {int(c): [int(candidates[i]) for i in order if int(pseudo_labels[i]) == int(c)]
              for c in pseudo_labels.unique()}
    picks: list[int] = []
    while len(picks) < budget and any(queues.values()):
        rarest = min((c for c, queue in queues.items() if queue), key=lambda c: (int(counts[c]), c))
        picks.append(queues[rarest].pop(0))
        counts[rarest] += 1
    return torch.tensor(picks, dtype=torch.long)


class PCB(CoOp):
    """CoOp trained in rounds of active learning with pseudo-class-balanced queries (module doc).

    Args:
        acquisition: "random" (the baseline), "entropy", "coreset" or "badge".
        balance: PCB's balancing of the acquisition's candidates (False: the acquisition's top `budget` as they are,
            conventional active learning).
        candidate_fraction: the candidate set as a fraction gamma of the whole pool (official GAMMA 0.1).
        class_specific: one context per class (CSC, the official active-learning setting; every class is trained,
            so there is no base-to-novel split); the other arguments are CoOp's (`PromptLearning`).
    """

    paper = Paper("Active Prompt Learning in Vision Language Models", "Bang et al.", 2024,
                  note="description-augmented AS / AE variants not built")

    def __init__(
        self,
        pretrained: str,
        classnames: list[str] | None = None,
        classnames_from: str | None = None,
        label_field: str = "cls",
        acquisition: Acquisition = "entropy",
        balance: bool = True,
        candidate_fraction: float = 0.1,
        n_ctx: int | None = 16,
        ctx_init: str | None = None,
        class_specific: bool = True,
        class_token_position: ClassTokenPosition = "end",
        pretrained_config: str | None = None,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        if acquisition not in ACQUISITIONS:
            raise ValueError(f"acquisition={acquisition!r} is unknown; use one of {', '.join(ACQUISITIONS)}")
        if not 0 < candidate_fraction <= 1:
            raise ValueError(f"candidate_fraction={candidate_fraction} is not in (0, 1]; the paper uses 0.1")
        super().__init__(
            pretrained, classnames, classnames_from, label_field, "all", n_ctx, ctx_init, class_specific,
            class_token_position, pretrained_config, crop_scale, optimizer, lr_scheduler, compile,
        )
        self.acquisition = acquisition
        self.balance = balance
        self.candidate_fraction = candidate_fraction

    def query(self, features: Tensor, probabilities: Tensor, labelled: Tensor, labels: Tensor, budget: int,
              generator: torch.Generator | None = None) -> Tensor:
        """The pool indices to label next (steps 2-3 of the module doc).

        Args:
            features: normalised image embeddings of the whole pool [N, D].
            probabilities: the prompted classifier's class probabilities of the pool [N, C].
            labelled: bool mask [N] of the samples labelled so far.
            labels: the true labels [N] (read only where `labelled`: the oracle's answers so far).
            budget: how many to query (at most the unlabelled count).
        """
        if budget < 1:
            raise ValueError(f"budget={budget} must be at least 1 (the paper queries one per class per round)")
        unlabelled = (~labelled).nonzero().squeeze(1)
        budget = min(budget, len(unlabelled))
        if self.acquisition == "random" or not bool(labelled.any()):  # round 0: nothing trained to score with
            return unlabelled[torch.randperm(len(unlabelled), generator=generator)[:budget]]
        size = budget if not self.balance else max(budget, round(self.candidate_fraction * len(labelled)))
        size = min(size, len(unlabelled))
        if self.acquisition == "entropy":
            chosen = entropy_scores(probabilities[unlabelled]).argsort(descending=True, stable=True)[:size]
        elif self.acquisition == "coreset":
            chosen = coreset_select(features[unlabelled], features[labelled], size)
        else:
            embeddings = gradient_embeddings(features[unlabelled], probabilities[unlabelled])
            chosen = badge_select(embeddings, size, generator)
        candidates = unlabelled[chosen]
        if not self.balance:
            return candidates[:budget]
        counts = torch.bincount(labels[labelled], minlength=probabilities.shape[1])
        return pcb_balance(candidates, probabilities[candidates].argmax(dim=1), counts, budget, generator)
