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
