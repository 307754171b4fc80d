"""Evaluation and monitoring callbacks, configured under `trainer.callbacks` in YAML.

Evaluation (`features.EvaluationCallback`: end of validate / test, and every `every_n_epochs` during fit):
`ZeroShotClassification`, `Retrieval`, `KNNClassifier`, `LinearProbe`, `EmbeddingProjector`,
`ZeroShotSegmentation` (MMC's prompt-patch segmentation, scored on `.mask.png` foreground masks or on each object
instance of scene shards), `DenseProbe` (linear segmentation of frozen patch features on scene shards: mIoU),
`CompositionalProbe` (SNARE-style true vs perturbed scene-graph captions: attribute, relation, shuffle, negation),
`MMVPPairs` (MMVP pair accuracy on CLIP-blind pairs mined by `mine_clip_blind_pairs`), `BaseToNovel`
(base / novel / harmonic-mean accuracy of prompt learning, zero-shot for other CLIP-family methods),
`AdversarialRobustness` (clean and ℓ∞ PGD accuracy of a method with `classify(images)`), `GroupAccuracy`
(worst-group, balanced and per-group accuracy of `classify` over the (class, attribute) groups of `.json`),
`CaptionMetrics` (BLEU, ROUGE-L and CIDEr-D of a method with `generate_captions(images, ...)`; `nearest_neighbour_captions` is the 1-NN
caption baseline), `RegressionProbe` (UrbanCLIP's MLP regressing a numeric `.json` field from frozen features: R²,
RMSE, MAE, MAPE, and a ridge regression's R²), `PhraseGrounding` (acc@0.5 and mean IoU of a method with
`ground(images, phrases)` on scene shards; `constant_box_grounding` is the box-prior baseline),
`InstructionAccuracy` (exact match per task and multiple-choice accuracy of a method with
`answer_questions(images, questions, max_length)` on `vlp-data instructions` shards), `VideoPhy` (pair accuracy of
validation clips over their time-reversed and teleporting twins against their captions, for the video family).
Monitoring: `ThroughputMonitor` (samples/s, data wait, MFU), `NonFiniteLossGuard`.
Set-up: `GlobalBatchSize` (effective global batch vs the paper's, learning-rate scaling rule).
Output: `EmbeddingWriter` (`vlp predict`: keys and embeddings of a shard set to `.npz`).
Console: `VLPProgressBar` (steps of a `max_steps` run), `VLPModelSummary` (no FLOPs column of zeros).
"""

from vlp_lightning.callbacks.adversarial import AdversarialRobustness, pgd_attack
from vlp_lightning.callbacks.base_to_novel import BaseToNovel, harmonic_mean
from vlp_lightning.callbacks.captioning import CaptionMetrics, caption_metrics, nearest_neighbour_captions
from vlp_lightning.callbacks.dense_probe import DenseProbe, dense_probe_predictions, segmentation_metrics
from vlp_lightning.callbacks.embedding_projector import EmbeddingProjector
from vlp_lightning.callbacks.embedding_writer import EmbeddingWriter
from vlp_lightning.callbacks.features import EvalFeatures, EvaluationCallback, extract_features
from vlp_lightning.callbacks.global_batch import GlobalBatchSize, lr_scale_factor
from vlp_lightning.callbacks.group_accuracy import GroupAccuracy, group_accuracies, group_metrics
from vlp_lightning.callbacks.grounding import (
    PatchTextGrounding,
    PhraseGrounding,
    constant_box_grounding,
    grounding_metrics,
    patch_similarity_boxes,
)
from vlp_lightning.callbacks.knn import KNNClassifier, weighted_knn_scores
from vlp_lightning.callbacks.linear_probe import LinearProbe, fit_logistic_regression, linear_probe_scores
from vlp_lightning.callbacks.mmvp import MMVPPairs, mine_clip_blind_pairs, write_clip_blind_pairs
from vlp_lightning.callbacks.model_summary import VLPModelSummary
from vlp_lightning.callbacks.non_finite_loss import NonFiniteLossGuard
from vlp_lightning.callbacks.progress import VLPProgressBar
from vlp_lightning.callbacks.regression_probe import (
    RegressionProbe,
    regression_metrics,
    regression_probe_predictions,
    ridge_predictions,
)
from vlp_lightning.callbacks.retrieval import Retrieval, retrieval_metrics, retrieval_ranks
from vlp_lightning.callbacks.snare import CompositionalProbe, snare_pairs
from vlp_lightning.callbacks.throughput import ThroughputMonitor
from vlp_lightning.callbacks.videophy import VideoPhy, videophy_pair_accuracy
from vlp_lightning.callbacks.zero_shot import (
    TEMPLATE_SETS,
    ZeroShotClassification,
    ZeroShotDataset,
    build_zero_shot_classifier,
)
from vlp_lightning.callbacks.vqa import InstructionAccuracy, instruction_metrics, parse_choice
from vlp_lightning.callbacks.zero_shot_segmentation import ZeroShotSegmentation

__all__ = [
    "AdversarialRobustness",
    "BaseToNovel",
    "CaptionMetrics",
    "CompositionalProbe",
    "DenseProbe",
    "EmbeddingProjector",
    "EmbeddingWriter",
    "EvalFeatures",
    "EvaluationCallback",
    "GlobalBatchSize",
    "GroupAccuracy",
    "InstructionAccuracy",
    "KNNClassifier",
    "LinearProbe",
    "MMVPPairs",
    "NonFiniteLossGuard",
    "PatchTextGrounding",
    "PhraseGrounding",
    "RegressionProbe",
    "Retrieval",
    "TEMPLATE_SETS",
    "ThroughputMonitor",
    "VLPModelSummary",
    "VLPProgressBar",
    "VideoPhy",
    "ZeroShotClassification",
    "ZeroShotDataset",
    "ZeroShotSegmentation",
    "build_zero_shot_classifier",
    "caption_metrics",
    "constant_box_grounding",
    "dense_probe_predictions",
    "extract_features",
    "fit_logistic_regression",
    "grounding_metrics",
    "group_accuracies",
    "group_metrics",
    "harmonic_mean",
    "instruction_metrics",
    "linear_probe_scores",
    "mine_clip_blind_pairs",
    "nearest_neighbour_captions",
    "parse_choice",
    "patch_similarity_boxes",
    "pgd_attack",
    "regression_metrics",
    "regression_probe_predictions",
    "lr_scale_factor",
    "retrieval_metrics",
    "retrieval_ranks",
    "ridge_predictions",
    "segmentation_metrics",
    "snare_pairs",
    "videophy_pair_accuracy",
    "weighted_knn_scores",
    "write_clip_blind_pairs",
]
