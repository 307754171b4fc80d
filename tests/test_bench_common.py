"""The benches' shared reporting (bench/common.py): what a bench publishes is what the README's results table shows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import common  # noqa: E402  (bench/ is a folder of scripts, not a package)


def test_published_targets_reach_the_results_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    targets = [common.Target("margin over shuffled", 0.04, 0.001), common.Target("minutes", 50.0, 45.0, "<=")]
    path = common.publish("toy", {"seconds": 1.0, "quick": False}, targets)
    stored = json.loads(path.read_text())
    assert [target["passed"] for target in stored["targets"]] == [True, False]
    assert "target minutes: 50 (goal <= 45) MISS" in capsys.readouterr().out
    table = common.results_markdown(common.read_results(tmp_path))
    assert "| toy | margin over shuffled | 0.04 | >= 0.001 | PASS |" in table
    assert "| toy | minutes | 50 | <= 45 | MISS |" in table


def test_video_bench_merge_keeps_the_other_sections_and_refuses_another_budget(tmp_path, monkeypatch):
    import video  # bench/video.py

    monkeypatch.setattr(video, "RESULTS_DIR", tmp_path)
    stored = {"quick": False, "steps": 300, "seconds": 100.0, "machine": {"cpu": "EPYC", "date": "2026-12-02"},
              "runs": {"HecVL": {"steps": 300}, "SIGMA": {"steps": 300}}, "babyai": {"HecVL": 0.2},
              "sigma": {"SIGMA": 0.1}, "sections": {"babyai": {"date": "d1", "cpu": "EPYC", "seconds": 60.0},
                                                    "sigma": {"date": "d2", "cpu": "EPYC", "seconds": 40.0}},
              "section_runs": {"babyai": ["HecVL"], "sigma": ["SIGMA"]}}
    (tmp_path / "video.json").write_text(json.dumps(stored))
    fresh = {"quick": False, "steps": 300, "runs": {}, "sections": {}, "section_runs": {}}
    report = video.merged_start(dict(fresh), ["sigma", "violet"])
    assert report["babyai"] == {"HecVL": 0.2} and "sigma" not in report  # the rerun section is dropped, not kept
    assert report["runs"] == {"HecVL": {"steps": 300}}
    assert report["sections"] == {"babyai": stored["sections"]["babyai"]}
    assert report["stored_seconds"] == 60.0
    try:
        video.merged_start({**fresh, "steps": 5, "quick": True}, ["violet"])
    except SystemExit as error:
        assert "steps=300 quick=False" in str(error) and "same --steps" in str(error)
    else:
        raise AssertionError("a merge across step budgets must be refused")


def test_video_bench_targets_recompute_from_the_published_results():
    import video

    stored = json.loads((common.RESULTS_DIR / "video.json").read_text())
    recomputed = {target.name: target.as_dict()["passed"] for target in video.targets(stored)}
    assert recomputed == {target["name"]: target["passed"] for target in stored["targets"]}


def test_method_overhead_merge_keeps_one_row_per_method_and_cpu_kind():
    import method_overhead  # bench/method_overhead.py

    def row(method: str, cpu: str, ratio: float) -> dict:
        return {"method": method, "cpu": cpu, "precision": "32-true", "vs_bare": ratio,
                "vlp_fit": {"data_wait_fraction": 0.01}}

    previous = {"config": {"cpu": "AMD EPYC"}, "machine": {"date": "2026-12-01T16:16:00"},
                "methods": [row("CLIP", "AMD EPYC", 1.0), row("SIGMA", "Intel(R) Xeon(R) Processor", 0.73)]}
    merged = method_overhead.merge_rows(previous, [row("SIGMA", "AMD EPYC", 0.98), row("CLIP", "AMD EPYC 7B13", 0.99)],
                                        ["CLIP", "SIGMA"])
    assert [(r["method"], r["cpu"], r["vs_bare"]) for r in merged] == [
        ("CLIP", "AMD EPYC 7B13", 0.99), ("SIGMA", "AMD EPYC", 0.98), ("SIGMA", "Intel(R) Xeon(R) Processor", 0.73)]
    names = [target.name for target in method_overhead.find_targets(merged)]
    assert names[:2] == ["CLIP vlp fit / bare (32-true)", "CLIP data wait share of a vlp fit step"]
    assert "SIGMA vlp fit / bare (32-true, Intel Xeon)" in names
    assert "SIGMA data wait share of a vlp fit step on AMD EPYC" in names
