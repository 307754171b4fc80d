"""The fastest correct settings are the defaults: a fused optimizer where torch has one, and the precision chosen
from the hardware when the config sets none; what a recipe sets explicitly is kept."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from vlp_lightning import hardware
from vlp_lightning.cli import VLPCLI
from vlp_lightning.methods import CLIP, DINO

CLIP_TINY = str(Path(__file__).parents[1] / "experiments/clip/emoji_tiny.yaml")


@pytest.mark.parametrize("method", [CLIP, DINO])
def test_default_optimizer_is_fused(method):
    optimizer = method(lr_scheduler=None).configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True


@pytest.mark.parametrize("explicit", [{"fused": False}, {"foreach": True}, {"foreach": False}])
def test_an_explicit_fused_or_foreach_setting_is_kept(explicit):
    optimizer = CLIP(lr_scheduler=None, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, **explicit))
    optimizer = optimizer.configure_optimizers()
    assert not optimizer.defaults["fused"]
    for name, value in explicit.items():
        assert optimizer.defaults[name] is value


def test_recipe_optimizer_through_the_cli_is_fused(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cli = VLPCLI(args=["--config", CLIP_TINY, "--trainer.max_steps", "1"], run=False)
    cli.model.lr_scheduler_factory = None
    assert cli.model.configure_optimizers().defaults["fused"] is True


@pytest.mark.parametrize(("flags", "expected"), [({"avx512_bf16", "avx512f"}, "bf16-mixed"),
                                                 ({"amx_bf16"}, "bf16-mixed"), ({"avx2", "avx512f"}, "32-true")])
def test_precision_follows_the_cpu_when_the_config_sets_none(flags, expected, monkeypatch, tmp_path, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    precision, reason = hardware.default_precision("cpu")
    assert precision == expected and ("native bf16" in reason)
    cli = VLPCLI(args=["--config", CLIP_TINY, "--trainer.precision", "null", "--trainer.max_steps", "1"], run=False)
    assert cli.trainer.precision == expected
    # a recipe's explicit precision is kept whatever the CPU
    cli = VLPCLI(args=["--config", CLIP_TINY, "--trainer.max_steps", "1"], run=False)
    assert cli.trainer.precision == "32-true"
