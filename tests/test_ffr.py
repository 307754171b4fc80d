"""FFR (Qraitem et al. 2024): `vlp-data ffr`'s groups, the GroupDRO loss, worst-group accuracy and the two steps."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import FFR_OPTIONS, fake_emoji_cache, fake_ffr_stamps
from data_modules.builder import iterate_shard, main
from vlp_lightning.callbacks import GroupAccuracy, group_metrics
from vlp_lightning.losses.group_robust import group_dro_loss, group_mean_losses
from vlp_lightning.methods import FFR

pytest.importorskip("skimage")


def samples_of(out: Path) -> dict[str, list[dict]]:
    """split -> the samples' .json, with their .cls as `cls`."""
    splits: dict[str, list[dict]] = {}
    for shard in sorted(out.glob("*.tar")):
        for _, sample in iterate_shard(shard):
            meta = json.loads(sample["json"])
            splits.setdefault(shard.name.rpartition("-")[0], []).append({**meta, "cls": int(sample["cls"])})
    return splits


def test_real_train_is_biased_and_val_test_synthetic_are_balanced(ffr_shards: Path) -> None:
    manifest = json.loads((ffr_shards / "manifest.json").read_text())
    assert manifest["classnames"] == {"cls": ["birds", "mammals"], "background": ["grass", "brick"],
                                      "group": ["birds on grass", "birds on brick", "mammals on grass",
                                                "mammals on brick"]}
    assert "GPL-2.0-or-later" in manifest["licence"] and "CC-BY 4.0" in manifest["licence"]
    splits = samples_of(ffr_shards)
    for split, samples in splits.items():
        for meta in samples:  # the group is (class, background), the class is also the .cls
            assert meta["group"] == 2 * meta["cls"] + ["grass", "brick"].index(meta["background"])
            assert manifest["classnames"]["group"][meta["group"]] == meta["group_name"]
            assert meta["domain"] == ("synthetic" if split == "synthetic" else "real")
            assert meta["majority"] == (meta["background"] == ["grass", "brick"][meta["cls"]])
    train = Counter(meta["group"] for meta in splits["train"])
    assert train == {0: 18, 1: 2, 2: 2, 3: 18}  # --bias 0.9: 18 of each class's 20 on its own background
    assert Counter(meta["group"] for meta in splits["val"]) == {group: 3 for group in range(4)}
    assert Counter(meta["group"] for meta in splits["test"]) == {group: 3 for group in range(4)}
    assert Counter(meta["group"] for meta in splits["synthetic"]) == {group: 4 for group in range(4)}
    stamps = {split: {meta["cutout"] for meta in splits[split]} for split in ("train", "val", "test")}
    assert not stamps["train"] & stamps["test"] and not stamps["train"] & stamps["val"]  # unseen stamps in test
    assert all("cartoon" not in cutout for cutouts in stamps.values() for cutout in cutouts)
    assert all(cutout.endswith(".png") and "/" not in cutout for cutout in {m["cutout"] for m in splits["synthetic"]})


def test_ffr_build_is_reproducible_and_bad_options_are_one_sentence(
    ffr_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stamps, npm = fake_ffr_stamps(tmp_path / "stamps"), fake_emoji_cache(tmp_path / "npm")
    common = ["--stamps-dir", str(stamps), "--npm-cache", str(npm)]
    assert main(["ffr", str(tmp_path / "again"), *common, *FFR_OPTIONS]) == 0
    for shard in ("train-000000.tar", "synthetic-000000.tar"):
        assert (tmp_path / "again" / shard).read_bytes() == (ffr_shards / shard).read_bytes()
    capsys.readouterr()
    for bad, says in ((["--bias", "1.5"], "--bias 1.5"), (["--backgrounds", "grass,lava"], "--backgrounds"),
                      (["--synthetic", "birds=circle"], "--synthetic"),
                      (["--classes", "birds=animals/birds,fish=animals/fish"], "--classes")):
        assert main(["ffr", str(tmp_path / "bad"), *common, *FFR_OPTIONS, *bad]) == 2
        error = capsys.readouterr().err
        assert error.startswith("vlp-data: error:") and says in error and error.count("\n") == 1


def test_group_dro_loss_matches_a_hand_computation() -> None:
    losses = torch.tensor([1.0, 3.0, 2.0, 0.5])
    groups = torch.tensor([0, 0, 2, 2])  # group 1 has no sample in the batch: L_1 = 0
    weights = torch.tensor([0.5, 0.25, 0.25])
    loss, updated = group_dro_loss(losses, groups, weights, step_size=0.1)
    means = [2.0, 0.0, 1.25]
    raw = [w * torch.exp(torch.tensor(0.1 * m)) for w, m in zip(weights, means)]
    expected = torch.stack(raw) / sum(raw)
    assert torch.allclose(updated, expected)
    assert torch.isclose(loss, sum(q * m for q, m in zip(expected, means)))
    group_losses, counts = group_mean_losses(losses, groups, 3)
    assert group_losses.tolist() == means and counts.tolist() == [2, 0, 2]
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        group_mean_losses(losses, torch.tensor([0, 0, 3, 2]), 3)


def test_group_dro_weights_move_toward_the_worst_group_and_its_gradient_follows() -> None:
    weights = torch.full((3,), 1 / 3)
    groups = torch.tensor([0, 1, 2, 0, 1, 2])
    for _ in range(50):
        losses = torch.tensor([0.2, 0.5, 2.0, 0.2, 0.5, 2.0], requires_grad=True)
        loss, weights = group_dro_loss(losses, groups, weights, step_size=0.05)
    assert weights.argmax() == 2 and weights[2] > 0.9 and weights[0] < weights[1] < weights[2]
    loss.backward()
    assert losses.grad[2] > 10 * losses.grad[0]  # the worst group's samples dominate the update


def test_worst_group_accuracy_on_a_constructed_case() -> None:
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])
    groups = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3])
    predictions = torch.tensor([0, 0, 1, 1, 1, 1, 1, 0, 0])  # group accuracies 2/3, 0, 1, 1/3
    metrics = group_metrics(predictions, labels, groups, ["a", "b", "c", "d", "empty"])
    assert metrics["worst"] == 0.0
    assert metrics["balanced"] == pytest.approx((2 / 3 + 0 + 1 + 1 / 3) / 4)
    assert metrics["average"] == pytest.approx(5 / 9)  # 2 + 0 + 2 + 1 of 9 samples
    assert metrics["group/a"] == pytest.approx(2 / 3) and metrics["group/d"] == pytest.approx(1 / 3)
    assert "group/empty" not in metrics


def test_ffr_step_two_starts_from_step_one_with_fresh_group_weights(ffr_shards: Path, tmp_path: Path) -> None:
    import lightning.pytorch as pl

    from data_modules import ImageDataModule

    train = str(ffr_shards / "train-000000.tar")
    torch.manual_seed(0)
    step_one = FFR(classnames_from=str(ffr_shards / "synthetic-000000.tar"), objective="groupdro")
    data = ImageDataModule(train_shards=train, batch_size=8, num_workers=0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(step_one, datamodule=data)
    assert not torch.allclose(step_one.group_weights, torch.full((4,), 0.25))  # q moved during training
    checkpoint = tmp_path / "step1.ckpt"
    trainer.save_checkpoint(checkpoint)
    step_two = FFR(classnames_from=train, objective="erm", group_names=None, start_from=str(checkpoint))
    for name, value in step_one.state_dict().items():
        if name != "group_weights":
            assert torch.equal(value, step_two.state_dict()[name]), name
    dro = FFR(classnames_from=train, objective="groupdro", start_from=str(checkpoint))
    assert torch.equal(dro.group_weights, torch.full((4,), 0.25))
    scores = GroupAccuracy(str(ffr_shards / "test-000000.tar"), name="test").evaluate(trainer, step_two.eval())
    assert set(scores) == {"groups/test/worst", "groups/test/balanced", "groups/test/average",
                           *(f"groups/test/group/{name} on {kind}" for name in ("birds", "mammals")
                             for kind in ("grass", "brick"))}
    assert scores["groups/test/worst"] <= scores["groups/test/balanced"]
    with pytest.raises(ValueError, match="objective must be 'erm' or 'groupdro'"):
        FFR(classnames_from=train, objective="dro")
    with pytest.raises(ValueError, match="needs the groups"):
        FFR(classnames=["a", "b"], objective="groupdro")


def test_a_step_two_checkpoint_loads_after_step_one_is_gone(ffr_shards: Path, tmp_path: Path) -> None:
    """A rebuild takes every weight from its own checkpoint: the `start_from` it was trained with is not read."""
    from vlp_lightning.pretrained import load_method, save_checkpoint

    train = str(ffr_shards / "train-000000.tar")
    step_one = tmp_path / "step1.ckpt"
    save_checkpoint(FFR(classnames_from=train), step_one,
                    {"class_path": "vlp_lightning.methods.FFR", "init_args": {"classnames_from": train}})
    step_two = FFR(classnames_from=train, start_from=str(step_one))
    with torch.no_grad():
        step_two.head.weight.add_(1.0)  # trained on after the start: differs from step one
    config = {"class_path": "vlp_lightning.methods.FFR",
              "init_args": {"classnames_from": train, "start_from": str(step_one)}}
    save_checkpoint(step_two, tmp_path / "step2.ckpt", config)
    step_one.unlink()
    loaded, _ = load_method(str(tmp_path / "step2.ckpt"))
    for name, value in step_two.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    config["init_args"]["classnames_from"] = str(tmp_path / "moved.tar")  # an argument the model's shape needs
    save_checkpoint(step_two, tmp_path / "moved.ckpt", config)
    with pytest.raises(ValueError, match=r"does not build a method \(no classnames for label field 'cls'"):
        load_method(str(tmp_path / "moved.ckpt"))  # the constructor's own sentence, not jsonargparse's report
