"""BenchX: the FineTune classifier (its learning-rate groups, head, frozen original) and `vlp benchx` (fixed splits,
the learning-rate search on validation, seeds at the chosen rate, resuming, bad options)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlp_lightning import methods
from vlp_lightning.commands import benchx
from vlp_lightning.commands.fewshot import drawn_keys

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
CLASSES = ["red apple", "grinning face", "blue car", "green tree"]


def test_finetune_trains_the_tower_at_a_tenth_of_the_head_rate_and_keeps_the_original(tiny_clip_checkpoint):
    method = methods.FineTune(pretrained=tiny_clip_checkpoint, classnames=CLASSES,
                              optimizer=lambda groups, **kw: torch.optim.Adam(groups, lr=1e-2, **kw),
                              lr_scheduler=None)
    optimizer = method.configure_optimizers()
    tower = {id(param) for param in method.encoder.parameters()}
    rates = {("tower" if id(group["params"][0]) in tower else "head"): group["lr"] for group in optimizer.param_groups}
    assert rates == {"tower": pytest.approx(1e-3), "head": pytest.approx(1e-2)}
    assert isinstance(method.head_norm, torch.nn.LayerNorm) and method.head.weight.std() < 4e-5
    original = {name: value.clone() for name, value in method.pretrained.state_dict().items()}
    batch = {"image": torch.randn(8, 3, 32, 32), "label": torch.arange(8) % 4}
    method.train()
    losses = []
    for _ in range(15):
        loss = method.forward_loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert all(torch.equal(original[name], value) for name, value in method.pretrained.state_dict().items())
    assert not torch.equal(next(method.encoder.parameters()), next(method.pretrained.vision.parameters()))
    with pytest.raises(ValueError, match="backbone_lr_scale must lie in"):
        methods.FineTune(pretrained=tiny_clip_checkpoint, classnames=CLASSES, backbone_lr_scale=0)


def test_vlp_benchx_searches_the_rate_on_validation_then_runs_the_seeds(tiny_clip_checkpoint, make_shards, tmp_path,
                                                                       monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["vlp"])
    monkeypatch.chdir(tmp_path)
    pool = make_shards(tmp_path / "pool", n=40, per_shard=40, image_size=32, num_classes=4)
    test = make_shards(tmp_path / "test", n=8, per_shard=8, image_size=32, num_classes=4)
    out = tmp_path / "out"
    argv = [tiny_clip_checkpoint, "--config", f"{EXPERIMENTS}/finetune/fashion_mnist_tiny.yaml", "--pool",
            pool.pattern, "--test", test.pattern, "--fractions", "0.5", "1", "--lrs", "1e-4", "1e-2", "--seeds", "3",
            "4", "--val-fraction", "0.25", "--steps", "2", "--out", str(out), "--model.init_args.classnames_from",
            pool.pattern, "--data.batch_size", "4", "--data.num_workers", "0"]
    assert benchx.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    val, train = _keys(out / "splits/pool", "val"), _keys(out / "splits/pool", "train")
    assert val | train == drawn_keys(out / "splits/pool")
    assert len(val) == 10 and len(train) == 30 and not val & train
    assert _keys(out / "splits/f0.5", "train") < train  # the fraction is drawn from the training part only
    assert len(results["runs"]) == 2 * (2 + 1)  # per fraction: the search (2 rates, first seed) + the second seed
    for row in results["summary"]:
        assert row["lr"] == max((1e-4, 1e-2), key=lambda lr: row["validation"][f"{lr:g}"])
        assert len(row["scores"]) == 2 and 0 <= row["mean"] <= 1
        assert {run["lr"] for run in results["runs"].values() if run["settings"]["seed"] == 4
                and f"-f{row['fraction']:g}-" in run["settings"]["point"]} == {row["lr"]}
    half = len(_keys(out / "splits/f0.5", "train"))
    assert [row["samples"] for row in results["summary"]] == [half, 30] and 13 <= half <= 17
    assert "| 50 % (test/accuracy mean" in capsys.readouterr().out
    assert benchx.main(argv) == 0  # everything done before: no run repeats
    assert capsys.readouterr().out.count("done before") == 6
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert benchx.main([*argv, "--lrs", "0"]) == 2
    assert "--lrs must be positive" in capsys.readouterr().err
    assert benchx.main([str(tmp_path / "missing.ckpt"), "--pool", pool.pattern, "--test", test.pattern]) == 2
    assert "missing.ckpt does not exist" in capsys.readouterr().err


def _keys(folder: Path, split: str) -> set[str]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return {key for name, shard in manifest["shards"].items() if name.startswith(f"{split}-") for key in shard["keys"]}
