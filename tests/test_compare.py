"""`vlp compare`: several methods, one budget, one table; a failing method is a row, finished ones are skipped."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from vlp_lightning.cli import main as vlp_main
from vlp_lightning.commands import compare

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
SIMCLR_RECIPE = str(EXPERIMENTS / "simclr/emoji_tiny.yaml")
TINY = [  # a 1-block ViT on 16 px images (2x2 patches), small heads, batches of 8: a step takes milliseconds
    "--model.init_args.vision.init_args.img_size", "16", "--model.init_args.vision.init_args.depth", "1",
    "--model.init_args.hidden_dim", "32", "--model.init_args.projection_dim", "16",
    "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0", "--trainer.log_every_n_steps", "1",
]
#: a SimCLR whose loss is NaN from the first step: the NaN guard stops it (`vlp: stopped: non-finite loss ...`).
NAN_METHOD = '''
from vlp_lightning.methods import SimCLR


class NaNSimCLR(SimCLR):
    def forward_loss(self, batch):
        outputs = super().forward_loss(batch)
        return {**outputs, "loss": outputs["loss"] * float("nan")}
'''


@pytest.fixture
def workspace(tmp_path, monkeypatch, make_shards):
    """Training / probe shards and the NaN method importable by the parent and its subprocesses; cwd is tmp."""
    (tmp_path / "nan_methods.py").write_text(NAN_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    monkeypatch.chdir(tmp_path)
    train = make_shards(tmp_path / "shards", n=32, per_shard=16, image_size=16)
    test = make_shards(tmp_path / "test-shards", n=16, per_shard=16, image_size=16, split="test", seed=1)
    return train, test


def compare_args(train, test, *methods: str) -> list[str]:
    return ["--config", SIMCLR_RECIPE, "--methods", *methods, "--steps", "2", "--train-shards", train.pattern,
            "--probe-train", train.pattern, "--probe-test", test.pattern, "--random-init", "--raw-pixels",
            "--raw-pixels-size", "16", "--out", "cmp", *TINY]


def test_failed_method_is_a_row_and_finished_methods_are_skipped_on_rerun(workspace, tmp_path, capsys):
    train, test = workspace
    status = compare.main(compare_args(train, test, "simclr", "nan_methods.NaNSimCLR"))
    out = capsys.readouterr().out
    assert status == 1  # one method failed; the comparison still finished the other
    assert "[1/2] SimCLR: training for 2 steps" in out and "[2/2] NaNSimCLR: training for 2 steps" in out

    results = json.loads((tmp_path / "cmp/results.json").read_text())
    simclr, nan = results["methods"]["SimCLR"], results["methods"]["NaNSimCLR"]
    assert simclr["status"] == "ok" and simclr["run"]["steps"] == 2 and simclr["run"]["batch_size"] == 8
    for scores in (simclr["scores"], simclr["random_init"], results["references"]["raw_pixels"]["scores"]):
        assert 0 <= scores["knn_top1"] <= 1 and 0 <= scores["linear_top1"] <= 1
        assert scores["test_samples"] == 16
    assert simclr["scores"]["feature_dim"] == 192  # ViT-tiny's width
    assert results["references"]["raw_pixels"]["scores"]["feature_dim"] == 16 * 16 * 3
    assert nan["status"].startswith("failed: stopped: non-finite loss or gradients at step 0"), nan["status"]
    assert simclr["recipe"].endswith("simclr/emoji_tiny.yaml --model=vlp_lightning.methods.SimCLR")

    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table] == [
        "encoder", "-" * len("SimCLR random init"), "raw pixels", "SimCLR", "SimCLR random init", "NaNSimCLR"]
    assert "| failed: stopped: non-finite loss" in table[-1] and "2 x 8" in table[3]
    with open(tmp_path / "cmp/results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["encoder"], row["kind"], row["status"][:6]) for row in rows] == [
        ("raw pixels", "raw_pixels", "refere"), ("SimCLR", "pretrained", "ok"),
        ("SimCLR random init", "random_init", "refere"), ("NaNSimCLR", "pretrained", "failed")]
    assert float(rows[1]["linear_top1"]) == pytest.approx(simclr["scores"]["linear_top1"])
    assert len(list((tmp_path / "cmp/hparams").glob("*/events.out.tfevents.*"))) == 4  # one session per row
    assert list((tmp_path / "cmp/SimCLR").glob("version_*/events.out.tfevents.*"))  # the method's training curves
    assert "non-finite loss" in (tmp_path / "cmp/logs/NaNSimCLR.log").read_text()

    log_written = (tmp_path / "cmp/logs/SimCLR.log").stat().st_mtime_ns
    assert compare.main(compare_args(train, test, "SimCLR")) == 0
    out = capsys.readouterr().out
    assert "[1/1] SimCLR: already finished with these settings" in out and "skipped" in out
    assert "raw pixels: already measured" in out
    assert (tmp_path / "cmp/logs/SimCLR.log").stat().st_mtime_ns == log_written  # no new run
    rerun = json.loads((tmp_path / "cmp/results.json").read_text())
    assert rerun["methods"]["SimCLR"] == simclr and "NaNSimCLR" in rerun["methods"]  # kept, not rerun


def error_of(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        vlp_main(["compare", *args])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines  # one sentence, no traceback
    return lines[0]


def test_bad_input_is_one_sentence_with_exit_status_2(workspace, tmp_path, make_shards, capsys):
    train, test = workspace
    good = compare_args(train, test, "SimCLR")
    message = error_of(capsys, *compare_args(train, test, "SimCLR", "NoSuchMethod"))
    assert message.startswith("vlp compare: error: unknown method 'NoSuchMethod'; give names of the methods index (")
    assert "SimCLR" in message and "all-image" in message
    missing = str(Path("nowhere/test-{000000..000001}.tar"))
    message = error_of(capsys, *[missing if arg == test.pattern else arg for arg in good])
    assert message.startswith("vlp compare: error: --probe-test") and "does not exist" in message
    assert "vlp-data" in message
    message = error_of(capsys, *[arg for arg in good if arg not in ("--steps", "2")])
    assert message == ("vlp compare: error: no budget: give --steps N (optimizer steps per method) or --minutes M "
                       "(wall-clock minutes per method)")
    message = error_of(capsys, *good, "--trainer.max_steps", "5")
    assert message == "vlp compare: error: --trainer.max_steps is set by vlp compare; use --steps or --minutes"
    message = error_of(capsys, *good, "--minute", "5")
    assert message.startswith("vlp compare: error: unknown option '--minute'")
    unlabelled = make_shards(tmp_path / "unlabelled", n=4, per_shard=4, with_label=False).pattern
    message = error_of(capsys, *[unlabelled if arg == test.pattern else arg for arg in good])
    assert message.startswith(f"vlp compare: error: --probe-test '{unlabelled}' has no .cls labels")


def test_help_explains_budget_isolation_and_outputs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        vlp_main(["compare", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for phrase in ("--steps", "--minutes", "calibration", "--random-init", "--raw-pixels", "failed: <reason>",
                   "skips each method already finished", "results.csv", "HParams", "--own-recipes"):
        assert phrase in text, phrase


def test_methods_and_recipes_resolve_like_vlp_fit():
    image_only = [method.name for method in compare.resolve_methods(["all-image"])]
    assert {"SimCLR", "BYOL", "MAE", "SwAV"} <= set(image_only)
    assert not {"CLIP", "ConVIRT", "LOOK", "HVP"} & set(image_only)  # captions or labels needed
    assert [m.name for m in compare.resolve_methods(["byol", "vlp_lightning.methods.BYOL", "MAE"])] == ["BYOL", "MAE"]
    base = EXPERIMENTS / "clip/emoji_tiny.yaml"
    comparison = compare.Comparison(configs=[base], methods=[], budget=compare.Budget(steps=1),
                                    probe=compare.Probe("a", "b"), out=Path("cmp"), train_shards="t.tar",
                                    own_recipes=True)
    recipe, arguments = compare.method_arguments(comparison, compare.Method("SimCLR", "vlp_lightning.methods.SimCLR"))
    assert arguments[:2] == ["--config", str(EXPERIMENTS / "simclr/emoji_tiny.yaml")]
    assert not any(argument.startswith("--model=") for argument in arguments)
    recipe, arguments = compare.method_arguments(comparison, compare.Method("X", "my.methods.X"))
    assert arguments[:3] == ["--config", str(base), "--model=my.methods.X"]
    assert "--data.init_args.train_shards=t.tar" in arguments and "--trainer.limit_val_batches=0" in arguments


def test_minutes_budget_calibrates_the_step_time_then_fills_the_budget(workspace, tmp_path):
    from vlp_lightning.comparison import Budget, train_for_budget

    train, _ = workspace
    arguments = ["--config", SIMCLR_RECIPE, f"--data.init_args.train_shards={train.pattern}", *TINY,
                 "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    budget = Budget(minutes=0.02)  # 1.2 s
    _, run, initial = train_for_budget(arguments, budget, tmp_path / "run", keep_initial_weights=True)
    assert run["calibrated_step_s"] > 0 and run["planned_steps"] >= 12  # at least the calibration's 12 steps
    assert run["planned_steps"] == max(12, int(1.2 / run["calibrated_step_s"]))
    # the run ends at its planned step, or the overshoot guard stopped it past 1.1x the budget
    assert run["steps"] == run["planned_steps"] or run["train_seconds"] > 1.2 * 1.1
    assert initial is not None and list((tmp_path / "run/calibration").glob("version_*"))
    assert not list((tmp_path / "run/calibration").rglob("*.ckpt"))  # calibration saves no checkpoint
