"""`vlp-data babyai`: BabyAI episodes solved by minigrid's bot as clip samples (frames, mission, sub-goal timeline)."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from data_modules.builder import _check_sample, inspect_shards, iterate_shard, main
from data_modules.sources import SourceError
from data_modules.sources.babyai import FRAMES_MEMBER, babyai_source, timeline

needs_minigrid = pytest.mark.skipif(importlib.util.find_spec("minigrid") is None,
                                    reason="minigrid is not installed (the sim extra: pip install -e '.[sim]')")
# one training level whose bot plans every kind of sub-goal but opening, one held out
OPTIONS = ["--levels", "PutNextLocal", "--heldout-levels", "GoToLocal", "--episodes", "2", "--split",
           "train=0.5,val=0.5"]


def build(out: Path, *options: str) -> dict:
    assert main(["babyai", str(out), *OPTIONS, *options]) == 0
    return json.loads((out / "manifest.json").read_text())


def samples_of(out: Path) -> dict[str, dict[str, dict[str, bytes]]]:
    """split -> key -> members."""
    splits: dict[str, dict] = {}
    for shard in sorted(out.glob("*.tar")):
        splits.setdefault(shard.name.rpartition("-")[0], {}).update(iterate_shard(shard))
    return splits


@pytest.fixture(scope="module")
def episodes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("babyai") / "shards"
    return out, build(out)


@needs_minigrid
def test_episodes_are_clips_with_mission_timeline_actions_and_level(episodes: tuple[Path, dict]) -> None:
    out, manifest = episodes
    assert manifest["classnames"] == {"cls": ["PutNextLocal", "GoToLocal"]} and not manifest["skipped"]
    assert manifest["members"] == ["cls", FRAMES_MEMBER, "json", "txt"]
    samples = {key: sample for split in samples_of(out).values() for key, sample in split.items()}
    assert sorted(samples) == ["GoToLocal_00000", "GoToLocal_00001", "PutNextLocal_00000", "PutNextLocal_00001"]
    for key, sample in samples.items():
        frames = np.load(io.BytesIO(sample[FRAMES_MEMBER]), allow_pickle=False)
        meta = json.loads(sample["json"])
        assert frames.dtype == np.uint8 and frames.shape == (len(meta["actions"]) + 1, 64, 64, 3)
        assert not np.array_equal(frames[0], frames[-1])  # the agent moved or turned
        assert sample["txt"].decode() == meta["mission"] and "\n" not in meta["mission"]
        assert meta["level"] == key.rpartition("_")[0] == manifest["classnames"]["cls"][int(sample["cls"])]
        assert meta["fps"] == 4.0 and isinstance(meta["seed"], int)
        assert set(meta["actions"]) <= {"left", "right", "forward", "pickup", "drop", "toggle", "done"}
        segments = meta["timeline"]
        assert segments[0]["start"] == 0 and segments[-1]["end"] == len(meta["actions"]) / meta["fps"]
        assert segments[-1]["end"] <= len(frames) / meta["fps"]
        for segment, following in zip(segments, segments[1:] + [None]):
            assert segment["start"] < segment["end"] and segment["text"].strip()
            if following is not None:  # contiguous, and equal consecutive sub-goals merged
                assert segment["end"] == following["start"] and segment["text"] != following["text"]
        texts = [segment["text"] for segment in segments]
        if meta["level"] == "PutNextLocal":  # "put the grey box next to the blue box"
            moved, fixed = re.fullmatch(r"put (?:the|a) (.+) next to (?:the|a) (.+)", meta["mission"]).groups()
            assert f"pick up the {moved}" in texts and texts[-1] == f"drop the {moved}"
            assert f"bring the {moved} next to the {fixed}" in texts
            assert meta["actions"][-1] == "drop" and "pickup" in meta["actions"]
        else:
            assert texts[-1] == f"go next to the {meta['mission'].split(' ', 3)[3]}"


@needs_minigrid
def test_heldout_levels_only_in_their_split_and_inspect_reads_clips(
    episodes: tuple[Path, dict], capsys: pytest.CaptureFixture[str]
) -> None:
    out, manifest = episodes
    splits = samples_of(out)
    assert manifest["splits"] == {"train": 1, "unseen": 2, "val": 1}
    assert all(key.startswith("GoToLocal_") for key in splits["unseen"])
    assert not any(key.startswith("GoToLocal_") for split in ("train", "val") for key in splits[split])
    assert inspect_shards(out, show=1) == 0
    assert re.search(r"GoToLocal_0000\d  \d+ frames 64x64 at 4 fps  cls 1 \(GoToLocal\)", capsys.readouterr().out)


@needs_minigrid
def test_builds_are_byte_identical_and_follow_the_seed(episodes: tuple[Path, dict], tmp_path: Path) -> None:
    out, manifest = episodes
    again = build(tmp_path / "again")
    assert again["shards"] == manifest["shards"]
    for shard in manifest["shards"]:
        assert (out / shard).read_bytes() == (tmp_path / "again" / shard).read_bytes()
    build(tmp_path / "seed1", "--seed", "1")
    assert (out / "unseen-000000.tar").read_bytes() != (tmp_path / "seed1" / "unseen-000000.tar").read_bytes()


@needs_minigrid
def test_silent_fraction_writes_caption_less_episodes_of_the_trained_levels_only(tmp_path: Path) -> None:
    build(tmp_path / "silent", "--episodes", "6", "--silent-fraction", "0.5")
    splits = samples_of(tmp_path / "silent")
    trained = {key: sample for split in ("train", "val") for key, sample in splits[split].items()}
    silent = {key for key, sample in trained.items() if json.loads(sample["json"]).get("silent")}
    assert 0 < len(silent) < len(trained)  # 6 episodes at 0.5: some of each (the draws follow the episode seeds)
    assert all(("txt" in sample) == (key not in silent) for key, sample in trained.items())
    assert all("txt" in sample and not json.loads(sample["json"]).get("silent") for sample in splits["unseen"].values())
    with pytest.raises(SourceError, match="--silent-fraction 1.0: must lie in"):
        babyai_source(silent_fraction=1.0)


@needs_minigrid
def test_episodes_past_the_step_cap_are_counted_skips(tmp_path: Path) -> None:
    manifest = build(tmp_path / "capped", "--episodes", "3", "--max-steps", "2")
    skipped = manifest["skipped"]
    assert {f"PutNextLocal_0000{index}" for index in range(3)} <= set(skipped)  # pick up, carry and drop: > 2 steps
    assert all("--max-steps 2" in reason for reason in skipped.values())
    kept = [key for shard in manifest["shards"].values() for key in shard["keys"]]
    assert kept and len(kept) + len(skipped) == 6


@needs_minigrid
def test_unknown_level_is_one_sentence_listing_the_levels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["babyai", str(tmp_path / "out"), "--levels", "GoToObj,GoToRedBal"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "'GoToRedBal'" in error and "GoToRedBall," in error and "PutNextLocal" in error
    assert not (tmp_path / "out").exists()


def test_missing_minigrid_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "minigrid", None)  # `import minigrid` raises ImportError
    with pytest.raises(SourceError, match=re.escape("pip install -e '.[sim]'")):
        babyai_source()


def test_timeline_merges_equal_consecutive_subgoals() -> None:
    assert timeline(["explore", "go next to the red ball", "go next to the red ball", "explore"], 4.0) == [
        {"start": 0.0, "end": 0.25, "text": "explore"},
        {"start": 0.25, "end": 0.75, "text": "go next to the red ball"},
        {"start": 0.75, "end": 1.0, "text": "explore"},
    ]


def test_check_sample_accepts_uint8_clips_only() -> None:
    def npy(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=True)
        return buffer.getvalue()

    fps = json.dumps({"fps": 4.0}).encode()
    assert _check_sample({FRAMES_MEMBER: npy(np.zeros((3, 16, 24, 3), np.uint8)), "json": fps}) == \
        "3 frames 24x16 at 4 fps"
    with pytest.raises(ValueError, match="must hold uint8"):
        _check_sample({FRAMES_MEMBER: npy(np.zeros((3, 16, 24, 3), np.float32)), "json": fps})
    with pytest.raises(ValueError, match="must hold uint8"):  # an object array needs pickle: never loaded
        _check_sample({FRAMES_MEMBER: npy(np.array([None, 1], dtype=object)), "json": fps})
    with pytest.raises(ValueError, match="no image member"):
        _check_sample({"txt": b"a mission"})
