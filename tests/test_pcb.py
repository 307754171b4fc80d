"""PCB (Bang et al. 2024): the acquisition functions and the pseudo-class balancing alone, `PCB.query`, and a
two-round `vlp active` run on generated shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlp_lightning.commands.fewshot import drawn_keys
from vlp_lightning.methods import PCB
from vlp_lightning.methods.adaptation.pcb import (
    badge_select, coreset_select, entropy_scores, gradient_embeddings, pcb_balance,
)

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
CLASSES = ["red apple", "grinning face", "blue car", "green tree"]


def test_entropy_ranks_a_uniform_prediction_above_a_confident_one():
    probabilities = torch.tensor([[0.97, 0.01, 0.01, 0.01], [0.25, 0.25, 0.25, 0.25], [0.6, 0.4, 0.0, 0.0]])
    scores = entropy_scores(probabilities)
    assert scores.argsort(descending=True).tolist() == [1, 2, 0]
    assert scores[1] == pytest.approx(torch.log(torch.tensor(4.0)).item())


def test_balancing_picks_the_rarest_pseudo_classes_first_and_never_exceeds_the_budget():
    candidates = torch.tensor([10, 11, 12, 13, 14, 15])
    pseudo = torch.tensor([0, 0, 0, 1, 2, 2])
    counts = torch.tensor([3, 1, 0])  # class 2 is the rarest, then 1
    picks = pcb_balance(candidates, pseudo, counts, budget=2, generator=torch.Generator().manual_seed(0))
    assert len(picks) == 2 and len(set(picks.tolist())) == 2
    classes = [int(pseudo[candidates.tolist().index(pick)]) for pick in picks.tolist()]
    assert classes == [2, 1]  # class 2 (0 -> 1 labelled), then 1 and 2 tie at 1: the lower class
    # a class with no candidate left is skipped, not filled at random; the budget caps the picks
    picks = pcb_balance(candidates, pseudo, torch.tensor([0, 0, 0]), budget=5)
    assert len(picks) == 5 and set(picks.tolist()) <= set(candidates.tolist())
    assert len(pcb_balance(candidates, pseudo, counts, budget=100)) == len(candidates)


def test_coreset_picks_the_point_farthest_from_the_labelled_set():
    features = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0], [0.0, 3.0]])
    labelled = torch.tensor([[0.0, 0.1]])
    picks = coreset_select(features, labelled, count=2)
    assert picks.tolist() == [2, 3]  # 5 away first; then (0, 3), farther from both than (1, 0)
    assert coreset_select(features, labelled, count=10).unique().numel() == 4


def test_badge_returns_distinct_indices_of_the_requested_count():
    generator = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(30, 8, generator=generator), dim=1)
    probabilities = torch.randn(30, 4, generator=generator).softmax(dim=1)
    embeddings = gradient_embeddings(features, probabilities)
    assert embeddings.shape == (30, 32)
    picks = badge_select(embeddings, 7, generator)
    assert len(picks) == 7 and picks.unique().numel() == 7
    assert int(picks[0]) == int(embeddings.norm(dim=1).argmax())  # k-means++ starts at the largest gradient
    assert badge_select(torch.zeros(5, 3), 5).unique().numel() == 5  # coinciding rows still give distinct picks


@pytest.fixture(scope="module")
def pcb(tiny_clip_checkpoint) -> PCB:
    return PCB(pretrained=tiny_clip_checkpoint, classnames=CLASSES, n_ctx=2)


def test_query_balances_the_candidates_and_labels_only_unlabelled_samples(pcb):
    generator = torch.Generator().manual_seed(0)
    pool = 40
    features = torch.nn.functional.normalize(torch.randn(pool, 32, generator=generator), dim=1)
    probabilities = torch.full((pool, 4), 0.01)
    probabilities[:, 0] = 0.97
    probabilities[30:, :] = torch.tensor([0.01, 0.01, 0.97, 0.01])  # ten samples look like class 2
    labels = torch.arange(pool) % 4
    labelled = torch.zeros(pool, dtype=torch.bool)
    labelled[:4] = True  # one of each class
    for acquisition in ("entropy", "coreset", "badge", "random"):
        pcb.acquisition, pcb.candidate_fraction = acquisition, 1.0
        picks = pcb.query(features, probabilities, labelled, labels, 4, generator)
        assert len(picks) == 4 and picks.unique().numel() == 4 and not bool(labelled[picks].any())
        if acquisition != "random":  # balanced: both pseudo-classes of the pool, not four of class 0
            assert {int(probabilities[pick].argmax()) for pick in picks} == {0, 2}
    with pytest.raises(ValueError, match=r"^budget=0 must be at least 1"):
        pcb.query(features, probabilities, labelled, labels, 0)


@pytest.mark.parametrize(("arguments", "says"), [({"acquisition": "margin"}, "acquisition='margin' is unknown"),
                                                  ({"candidate_fraction": 0.0}, "candidate_fraction=0.0 is not in")])
def test_bad_settings_are_one_sentence(tiny_clip_checkpoint, arguments, says):
    with pytest.raises(ValueError) as raised:
        PCB(pretrained=tiny_clip_checkpoint, classnames=CLASSES, **arguments)
    assert says in str(raised.value) and "\n" not in str(raised.value)


@pytest.fixture()
def active_argv(tiny_clip_checkpoint, make_shards, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["vlp"])
    monkeypatch.chdir(tmp_path)
    pool = make_shards(tmp_path / "pool", n=24, per_shard=24, image_size=32, num_classes=4)
    return ["--config", f"{EXPERIMENTS}/pcb/emoji_tiny.yaml", "--pool", pool.pattern, "--steps", "2",
            "--out", str(tmp_path / "out"), "--model.init_args.pretrained", tiny_clip_checkpoint,
            "--model.init_args.classnames_from", pool.pattern, "--model.init_args.n_ctx", "2",
            "--data.test_shards", pool.pattern, "--data.batch_size", "4", "--data.num_workers", "0"]


def test_vlp_active_labels_budget_times_rounds_samples_and_reports_each_round(active_argv, tmp_path, capsys):
    from vlp_lightning.commands import active

    assert active.main([*active_argv, "--rounds", "2", "--budget", "3", "--acquisition", "entropy"]) == 0
    results = json.loads((tmp_path / "out/results.json").read_text())
    assert len(results["labelled"]) == len(set(results["labelled"])) == 6
    assert [row["labelled"] for row in results["rounds"]] == [3, 6]
    assert all(0 <= row["score"] <= 1 for row in results["rounds"])
    assert len(drawn_keys(tmp_path / "out/rounds/round1")) == 6
    assert drawn_keys(tmp_path / "out/rounds/round0") < drawn_keys(tmp_path / "out/rounds/round1")
    out = capsys.readouterr().out
    assert "| 1 | entropy | 6 |" in out and list((tmp_path / "out/curve").glob("events.out.tfevents.*"))


@pytest.mark.parametrize(("extra", "says"), [(["--budget", "0"], "--budget 0 must be at least 1"),
                                             (["--acquisition", "margin"], "--acquisition 'margin' is unknown"),
                                             (["--budget", "20", "--rounds", "2"], "more labels than the pool's 24")])
def test_vlp_active_bad_arguments_are_one_sentence(active_argv, capsys, extra, says):
    from vlp_lightning.commands import active

    assert active.main([*active_argv, *extra]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("vlp active: error: ") and says in error[0]
