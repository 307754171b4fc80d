"""`vlp-data shots`: K samples per class of existing shards, seeded, nested across K, labels from .cls or .json."""

from __future__ import annotations

import json
from collections import Counter

from data_modules.builder import iterate_shard, main


def drawn(folder) -> dict[str, int]:
    """key -> label of every sample of a shard folder."""
    return {key: int(sample["cls"]) for path in sorted(folder.glob("*.tar")) for key, sample in iterate_shard(path)}


def test_shots_draws_k_per_class_nested_and_seeded(make_shards, tmp_path, capsys):
    shards = make_shards(tmp_path / "src", n=40, per_shard=20, num_classes=4, with_json=True)
    for shots, seed in ((3, 0), (2, 0), (3, 0), (3, 1)):
        out = tmp_path / f"k{shots}s{seed}"
        assert main(["shots", shards.pattern, str(out), "--shots", str(shots), "--seed", str(seed), "--force"]) == 0
    three, two, again, other = (drawn(tmp_path / name) for name in ("k3s0", "k2s0", "k3s0", "k3s1"))
    assert Counter(three.values()) == {0: 3, 1: 3, 2: 3, 3: 3}
    assert set(two) < set(three) and three == again  # nested across K, the same draw for the same seed
    assert set(other) != set(three)
    assert all(shards.labels[key] == label for key, label in three.items())  # members copied as they were
    manifest = json.loads((tmp_path / "k3s0/manifest.json").read_text())
    assert "3-shot subset (seed 0, label field cls)" in manifest["source"] and manifest["classnames"]["cls"]


def test_shots_reads_labels_from_a_json_field_and_names_a_missing_one(make_shards, tmp_path, capsys):
    shards = make_shards(tmp_path / "src", n=12, per_shard=12, num_classes=3, with_json=True)
    assert main(["shots", shards.pattern, str(tmp_path / "by_index"), "--shots", "1", "--label-field", "index"]) == 0
    assert len(drawn(tmp_path / "by_index")) == 12  # every index is its own class
    assert "classes have fewer than" not in capsys.readouterr().err
    assert main(["shots", shards.pattern, str(tmp_path / "bad"), "--shots", "1", "--label-field", "colour"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("vlp-data: error: sample train000000 has no integer label ('colour' in its .json")
    assert "pass --label-field" in error and "\n" not in error


def test_fraction_draws_a_class_balanced_nested_subset(make_shards, tmp_path):
    shards = make_shards(tmp_path / "src", n=40, per_shard=20, num_classes=4)
    for fraction in ("0.25", "0.5"):
        assert main(["shots", shards.pattern, str(tmp_path / fraction), "--fraction", fraction]) == 0
    quarter, half = drawn(tmp_path / "0.25"), drawn(tmp_path / "0.5")
    per_class = Counter(shards.labels.values())
    assert Counter(half.values()) == {label: max(1, round(0.5 * count)) for label, count in per_class.items()}
    assert set(quarter) < set(half)
    assert main(["shots", shards.pattern, str(tmp_path / "bad"), "--fraction", "1.5"]) == 2
