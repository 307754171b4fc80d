"""DAMVPMeta (DAM-VP's Reptile meta-prompt, Huang et al. 2023, sec. 3.4): the Reptile step on a known case and in a
real meta step over two task-tagged datasets, DAMVP started from its checkpoint, and misuse in one sentence."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from data_modules import DataConfigError, TaskImageDataModule
from vlp_lightning import methods
from vlp_lightning.methods.adaptation.damvp_meta import reptile_direction
from vlp_lightning.modules.visual_prompts import PadPrompt
from vlp_lightning.pretrained import save_checkpoint

CLASSES = ["red square", "green circle", "blue triangle", "yellow cross"]


def fill(prompt: PadPrompt, value: float) -> PadPrompt:
    with torch.no_grad():
        for param in prompt.parameters():
            param.fill_(value)
    return prompt


def flat(prompt: torch.nn.Module) -> torch.Tensor:
    return torch.cat([param.detach().flatten() for param in prompt.parameters()])


def two_tasks(make_shards, tmp_path):
    """Two datasets of their own folders: 2 classes and 4 classes (their manifests say so)."""
    return (make_shards(tmp_path / "two", n=16, per_shard=8, image_size=32, num_classes=2, seed=1),
            make_shards(tmp_path / "four", n=16, per_shard=8, image_size=32, num_classes=4, seed=2))


def test_reptile_direction_is_the_mean_move_of_the_adapted_prompts():
    theta = fill(PadPrompt(8, 2), 1.0)
    direction = reptile_direction(theta, [fill(PadPrompt(8, 2), 2.0), fill(PadPrompt(8, 2), 4.0)])
    assert set(direction) == {"top", "bottom", "left", "right"}
    assert all(torch.equal(move, torch.full_like(move, 2.0)) for move in direction.values())  # ((2-1) + (4-1)) / 2
    # the meta step is SGD at learning rate ε on the gradient -direction: θ + ε (θ' - θ) with one adapted prompt
    adapted = PadPrompt(8, 2)
    before = flat(theta)
    outer = torch.optim.SGD(theta.parameters(), lr=0.5)
    for name, param in theta.named_parameters():
        param.grad = -reptile_direction(theta, [adapted])[name]
    outer.step()
    assert torch.allclose(flat(theta), before + 0.5 * (flat(adapted) - before))


def test_a_meta_step_moves_theta_by_epsilon_toward_the_adapted_cluster_prompts_of_both_tasks(
        tiny_clip_checkpoint, make_shards, tmp_path):
    two, four = two_tasks(make_shards, tmp_path)
    torch.manual_seed(0)
    method = methods.DAMVPMeta(pretrained=tiny_clip_checkpoint, tasks=[two.pattern, four.pattern],
                               distance_threshold=0.5, inner_steps=3, meta_step_size=0.5,
                               optimizer=lambda groups: torch.optim.Adam(groups, lr=0.1), lr_scheduler=None)
    assert [len(classes.all) for classes in method.task_classes] == [2, 4]  # each task's own manifest
    assert len(method.task_prompts[0].prompts) > 1  # diversity-aware: several clusters in a task
    frozen = {key: value.clone() for key, value in method.pretrained.state_dict().items()}
    theta = flat(method.meta_prompt)
    datamodule = TaskImageDataModule(batch_size=32, num_workers=0, shuffle_buffer=64)  # asks the method for tasks
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(method, datamodule=datamodule)
    assert trainer.global_step == 1  # one meta step, however many inner steps
    assert trainer.callback_metrics["train/tasks"] == 2
    assert trainer.callback_metrics["train/adapted_loss"] < trainer.callback_metrics["train/loss"]  # tasks adapt
    adapted = torch.stack([flat(prompt) for prompts in method.task_prompts for prompt in prompts.prompts]).mean(0)
    after = flat(method.meta_prompt)
    assert torch.allclose(after, theta + 0.5 * (adapted - theta), atol=1e-6)
    assert torch.allclose((after - adapted).norm(), 0.5 * (theta - adapted).norm(), rtol=1e-4)
    assert all(torch.equal(frozen[key], value) for key, value in method.pretrained.state_dict().items())
    assert not any(module.training for module in method.pretrained.modules())


def test_task_batches_are_tagged_and_keep_each_tasks_own_labels(tiny_clip_checkpoint, make_shards, tmp_path):
    two, four = two_tasks(make_shards, tmp_path)
    method = methods.DAMVPMeta(pretrained=tiny_clip_checkpoint, tasks=[two.pattern, four.pattern])
    datamodule = TaskImageDataModule(batch_size=8, num_workers=0)
    datamodule.trainer = SimpleNamespace(lightning_module=method, global_rank=0, world_size=1, current_epoch=0,
                                         training=True, loggers=[])
    datamodule.setup("fit")
    assert datamodule.train_shards == f"{two.pattern}::{four.pattern}"
    batches = [datamodule.on_before_batch_transfer(batch, 0) for batch in datamodule.train_dataloader()]
    seen = [(int(task), int(label)) for batch in batches for task, label in zip(batch["task"], batch["label"])]
    assert len(seen) == 32 and datamodule.skipped_count() == 0  # none of the 4-class task's labels dropped
    assert {task for task, _ in seen} == {0, 1} and all(label < 2 for task, label in seen if task == 0)
    assert any(label >= 2 for task, label in seen if task == 1)
    stranger = make_shards(tmp_path / "stranger", n=8, per_shard=8, image_size=32)
    datamodule = TaskImageDataModule(tasks=[two.pattern, four.pattern], train_shards=stranger.pattern, batch_size=8)
    datamodule.trainer = SimpleNamespace(lightning_module=None, global_rank=0, world_size=1)
    with pytest.raises(DataConfigError, match="in the folder of none of the tasks"):
        datamodule.setup("fit")


def test_damvp_started_from_a_damvpmeta_checkpoint_has_the_meta_prompt_in_every_cluster(tiny_clip_checkpoint,
                                                                                        make_shards, tmp_path):
    shards = make_shards(tmp_path / "shards", n=24, per_shard=24, image_size=32, num_classes=4)
    meta = methods.DAMVPMeta(pretrained=tiny_clip_checkpoint, classnames=CLASSES)
    torch.manual_seed(3)
    with torch.no_grad():
        for param in meta.meta_prompt.parameters():
            param.normal_()
    config = {"class_path": "vlp_lightning.methods.DAMVPMeta",
              "init_args": {"pretrained": tiny_clip_checkpoint, "classnames": CLASSES}}
    checkpoint = save_checkpoint(meta, tmp_path / "meta.ckpt", config)
    damvp = methods.DAMVP(pretrained=tiny_clip_checkpoint, classnames_from=shards.pattern,
                          cluster_shards=shards.pattern, distance_threshold=0.5, meta_prompt=str(checkpoint))
    assert len(damvp.cluster_prompts.prompts) > 1
    theta = meta.meta_prompt.state_dict()
    for prompt in damvp.cluster_prompts.prompts:
        assert all(torch.equal(value, theta[name]) for name, value in prompt.state_dict().items())


@pytest.mark.parametrize("wrong", ["clip", "missing", "other width"])
def test_a_wrong_meta_prompt_checkpoint_is_one_sentence(wrong, tiny_clip_checkpoint, tmp_path):
    path = {"clip": tiny_clip_checkpoint, "missing": str(tmp_path / "none.ckpt")}.get(wrong)
    if wrong == "other width":
        meta = methods.DAMVPMeta(pretrained=tiny_clip_checkpoint, classnames=CLASSES, prompt_width=3)
        path = str(save_checkpoint(meta, tmp_path / "meta.ckpt", {"class_path": "vlp_lightning.methods.DAMVPMeta"}))
    says = {"clip": "holds neither a DAMVPMeta meta prompt.*give the last.ckpt of a DAMVPMeta run",
            "missing": "is not a file; give the last.ckpt of a DAMVPMeta run",
            "other width": "holds a prompt of shapes.*same pretrained model and prompt_width"}[wrong]
    with pytest.raises(ValueError, match=says) as error:
        methods.DAMVP(pretrained=tiny_clip_checkpoint, classnames=CLASSES, prompt_width=4, meta_prompt=path)
    assert len(str(error.value).splitlines()) == 1


def test_untagged_batches_several_processes_and_fp16_are_one_sentence(tiny_clip_checkpoint, make_shards, tmp_path):
    two, four = two_tasks(make_shards, tmp_path)
    method = methods.DAMVPMeta(pretrained=tiny_clip_checkpoint, tasks=[two.pattern, four.pattern])
    batch = {"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 1, 0, 1])}
    with pytest.raises(DataConfigError, match="needs task-tagged batches.*TaskImageDataModule"):
        method.forward_loss(batch)
    with pytest.raises(ValueError, match="classes from the manifest.json"):
        methods.DAMVPMeta(pretrained=tiny_clip_checkpoint, tasks=[two.pattern], classnames=CLASSES)
    method._trainer = SimpleNamespace(world_size=2, precision_plugin=SimpleNamespace())
    with pytest.raises(ValueError, match="meta-trains in one process"):
        method.setup("fit")
    method._trainer = SimpleNamespace(world_size=1, precision_plugin=SimpleNamespace(scaler=object()))
    with pytest.raises(ValueError, match="fp16's loss scaling would rescale it"):
        method.setup("fit")
