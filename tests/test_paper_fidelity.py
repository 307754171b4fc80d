"""Paper-fidelity checks of the contrastive and clustering methods (issue 13): each test fails on the behaviour it
replaced — the representation the probes score, CLIP's temperature cap, the per-paper weight-decay rule, ALIGN's
label smoothing and towers, SwAV's fp32 scores and LARS preset, the schedule's warm-up start and linear decay,
and the global-batch line with its learning-rate scaling rule."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch import LightningDataModule
from torch import Tensor, nn
from torch.utils.data import DataLoader

from data_modules.views import SingleCrop, Views
from vlp_lightning.callbacks import GlobalBatchSize, KNNClassifier, LinearProbe
from vlp_lightning.cli import VLPCLI
from vlp_lightning.losses.contrastive import clip_contrastive_loss
from vlp_lightning.methods import CLIP, SwAV, VLPMethod, WarmupCosineLR
from vlp_lightning.modules import VisionEncoder

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def tiny_clip(**kwargs) -> CLIP:
    vision = VisionEncoder("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, width=48, num_heads=2)
    return CLIP(vision=vision, embed_dim=16, **kwargs)


def test_probes_score_clip_image_features_before_the_projection(make_shards, tmp_path: Path) -> None:
    """CLIP's linear probe uses the image tower's output (App. A.3): width 48 here, not the embedding size 16."""
    shards = make_shards(tmp_path / "shapes", n=24, per_shard=24, seed=1)
    method = tiny_clip()
    callbacks = [
        KNNClassifier(shards.pattern, shards.pattern, k=3, name="shapes", batch_size=24),
        LinearProbe(shards.pattern, shards.pattern, name="shapes", batch_size=24, max_iter=5),
    ]
    trainer = pl.Trainer(callbacks=callbacks, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    batch = {"image": torch.zeros(2, 3, 32, 32), "text": method.tokenizer(["a", "b"])}
    (results,) = trainer.validate(method, dataloaders=DataLoader([batch], batch_size=None), verbose=False)
    assert results["knn/shapes/dim"] == results["linear_probe/shapes/dim"] == method.vision.num_features == 48
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(method.probe_features(images), method.vision(images))


@pytest.mark.parametrize("recipe", ["emoji_tiny", "fashion_mnist_tiny"])
def test_mae_recipes_probe_standardised_features(recipe: str) -> None:
    """MAE's linear probe normalises features with a BatchNorm without affine (He et al. 2021, App. A.2)."""
    cli = VLPCLI(args=["--config", str(EXPERIMENTS / "mae" / f"{recipe}.yaml")], run=False)
    probes = [callback for callback in cli.trainer.callbacks if isinstance(callback, LinearProbe)]
    assert probes and all(probe.standardize for probe in probes)


def test_clip_logit_scale_is_clamped_in_place_after_each_optimizer_step() -> None:
    """Above the cap the old forward clamp gave the parameter a zero gradient, so it stayed above 100 for good;
    now the parameter is clipped after the step (open_clip) and the logged value is the one the loss used."""
    torch.manual_seed(0)
    method = tiny_clip(init_logit_scale=50.0, lr_scheduler=None)
    with torch.no_grad():
        method.logit_scale.fill_(math.log(400.0))  # e.g. momentum carried it past the cap
    batch = {
        "image": torch.randn(4, 3, 32, 32),
        "text": method.tokenizer(["a red square", "a green circle", "a blue triangle", "a yellow cross"]),
    }
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(method, train_dataloaders=DataLoader([batch], batch_size=None))
    assert method.logit_scale.item() <= math.log(100.0) + 1e-6
    outputs = method.forward_loss(batch)
    assert outputs["logit_scale"].item() == pytest.approx(method.logit_scale.exp().item())
    outputs["loss"].backward()
    assert method.logit_scale.grad.abs().item() > 0  # at the cap the temperature still learns


def test_weight_decay_follows_each_paper() -> None:
    """CLIP decays every weight but gains and biases (sec. 2.5), so its position and class embeddings too (the old
    base exempted them); SwAV's official SGD + LARC decays every parameter, biases and prototypes included."""
    def decayed(method: VLPMethod) -> set[str]:
        ids = {id(p) for group in method.parameter_groups() if group.get("weight_decay") != 0.0 for p in group["params"]}
        return {name for name, param in method.named_parameters() if id(param) in ids}

    clip = decayed(tiny_clip())
    assert {"vision.model.pos_embed", "vision.model.cls_token"} <= clip
    assert not any(name.endswith(".bias") or "logit_scale" in name for name in clip)
    swav = SwAV()
    assert decayed(swav) == {name for name, param in swav.named_parameters() if param.requires_grad}


def test_label_smoothing_matches_the_smoothed_cross_entropy_formula() -> None:
    """ALIGN smooths both directions with 0.1 (Jia et al. 2021, sec. 5): target 1-ε on the pair + ε/G everywhere."""
    torch.manual_seed(0)
    images, texts = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    scale, epsilon = 10.0, 0.1
    logits = scale * images @ texts.T

    def smoothed(scores: Tensor) -> Tensor:
        log_probs = scores.log_softmax(dim=1)
        return (-(1 - epsilon) * log_probs.diag() - epsilon * log_probs.mean(dim=1)).mean()

    expected = (smoothed(logits) + smoothed(logits.T)) / 2
    assert torch.allclose(clip_contrastive_loss(images, texts, scale, label_smoothing=epsilon), expected, atol=1e-6)
    assert not torch.allclose(clip_contrastive_loss(images, texts, scale), expected, atol=1e-3)
    with pytest.raises(ValueError, match="label_smoothing"):
        clip_contrastive_loss(images, texts, scale, label_smoothing=1.0)


def test_align_tiny_recipe_follows_the_paper() -> None:
    """Label smoothing 0.1, the pooled EfficientNet output without its head conv as the embedding (no image
    projection), LAMB, linear decay (Jia et al. 2021, sec. 4-5)."""
    cli = VLPCLI(args=["--config", str(EXPERIMENTS / "align" / "emoji_tiny.yaml"), "--data.init_args.num_workers", "0"],
                 run=False)
    method = cli.model
    assert method.label_smoothing == 0.1 and isinstance(method.image_projection, nn.Identity)
    assert isinstance(method.vision.model.conv_head, nn.Identity) and method.vision.num_features == 320
    optimizer = method.optimizer_factory(method.parameter_groups())
    assert type(optimizer).__name__ == "Lamb"
    assert method.lr_scheduler_factory(optimizer).decay == "linear"
    paper = yaml.safe_load((EXPERIMENTS / "align" / "alt_text_paper.yaml").read_text())
    init = paper["model"]["init_args"]
    assert init["label_smoothing"] == 0.1 and init["project_image"] is False
    assert init["vision"]["init_args"]["head_conv"] is False and init["optimizer"]["class_path"] == "timm.optim.Lamb"
    assert init["lr_scheduler"]["init_args"]["decay"] == "linear" and paper["global_batch"]["paper_batch_size"] == 16384


def test_align_without_an_image_projection_needs_a_matching_embedding_size() -> None:
    with pytest.raises(ValueError, match="embed_dim: 48"):
        tiny_clip(project_image=False)
    with pytest.raises(ValueError, match="no conv_head"):
        VisionEncoder("vit_tiny_patch16_224", img_size=32, patch_size=8, head_conv=False)


def test_swav_prototype_scores_are_fp32_under_bf16_autocast() -> None:
    """The scores feed exp(s / 0.05): under bf16 autocast the old nn.Linear call returned bf16."""
    torch.manual_seed(0)
    method = SwAV()
    embeddings = F.normalize(torch.randn(5, method.prototypes.in_features), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = method.prototype_scores(embeddings)
    assert scores.dtype == torch.float32
    assert torch.allclose(scores, embeddings @ method.prototypes.weight.T, atol=1e-6)


def test_swav_paper_preset_uses_lars_from_the_official_warmup_start() -> None:
    paper = yaml.safe_load((EXPERIMENTS / "swav" / "imagenet_paper.yaml").read_text())
    optimizer, schedule = paper["model"]["init_args"]["optimizer"], paper["model"]["init_args"]["lr_scheduler"]
    assert optimizer["class_path"] == "timm.optim.Lars" and optimizer["init_args"]["lr"] == 4.8
    assert schedule["init_args"]["warmup_start_ratio"] == pytest.approx(0.3 / 4.8)
    assert schedule["init_args"]["min_lr_ratio"] == pytest.approx(0.0048 / 4.8)


def test_schedule_warms_up_from_a_start_ratio_and_decays_linearly() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=4.8)
    schedule = WarmupCosineLR(optimizer, warmup_steps=10, total_steps=110, warmup_start_ratio=0.0625, decay="linear")
    factors = [schedule._factor(step) for step in range(111)]
    assert factors[0] == pytest.approx(0.0625 + 0.9375 / 10) and factors[9] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.5) and factors[110] == pytest.approx(0.0)  # a straight line, not a cosine
    with pytest.raises(ValueError, match="decay='step'"):
        WarmupCosineLR(optimizer, decay="step")


def test_constant_warmup_holds_the_start_ratio_then_decays_from_the_base() -> None:
    """Dassl's ConstantWarmupScheduler (CoOp & co.): 1e-5 through the warmup epoch, then cosine from 0.002."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.002)
    schedule = WarmupCosineLR(optimizer, warmup_steps=10, total_steps=110, warmup_start_ratio=0.005,
                              warmup="constant")
    factors = [schedule._factor(step) for step in range(111)]
    assert factors[:10] == pytest.approx([0.005] * 10) and factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.5) and factors[110] == pytest.approx(0.0)


class _Regressor(VLPMethod):
    def __init__(self) -> None:
        super().__init__(optimizer=lambda groups: torch.optim.SGD(groups, lr=0.1), lr_scheduler=WarmupCosineLR)
        self.layer = nn.Linear(4, 1)

    @property
    def image_size(self) -> int:
        return 4

    def train_views(self) -> Views:
        return SingleCrop()

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        return {"loss": self.layer(batch["image"]).square().mean()}


class _Batches(LightningDataModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader([{"image": torch.randn(self.batch_size, 4)} for _ in range(4)], batch_size=None)


@pytest.mark.parametrize(("rule", "factor"), [("linear", 16 / 256), ("sqrt", math.sqrt(16 / 256)), ("none", 1.0)])
def test_global_batch_line_and_learning_rate_scaling(rule: str, factor: float) -> None:
    """Global batch = 8 per device x 1 device x 2 accumulation = 16, against a paper batch of 4096."""
    callback = GlobalBatchSize(paper_batch_size=4096, lr_scaling=rule, reference_batch_size=256)
    method = _Regressor()
    trainer = pl.Trainer(max_steps=1, accumulate_grad_batches=2, callbacks=[callback], accelerator="cpu",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(method, datamodule=_Batches(batch_size=8))
    assert "global batch 16 = 8 per device x 1 device(s) x 1 node(s) x 2 accumulation" in callback.message
    assert "the paper's is 4096" in callback.message
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(0.1 * factor)
    if rule == "none":
        assert "consider lr_scaling" in callback.message


def test_global_batch_rejects_an_unknown_rule() -> None:
    with pytest.raises(ValueError, match="lr_scaling='cubic'"):
        GlobalBatchSize(lr_scaling="cubic")
