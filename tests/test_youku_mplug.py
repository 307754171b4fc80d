"""Youku-mPLUG's released layout (`vlp-data youku-mplug`): the release's CSV columns, categories by its
classname.json, lists of reference captions, Chinese text kept exactly, through the tokenizers and the clip data
module (videos written with PyAV here)."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest
import torch

from data_modules import VideoDataModule
from data_modules.builder import iterate_shard
from data_modules.builder import main as vlp_data
from tests.test_clips import frame_stack, mp4_bytes
from vlp_lightning.modules.tokenizers import ByteTokenizer, CLIPTokenizer, clean_caption

TITLES = {"v1": "小猫在草地上玩耍", "v2": "篮球比赛精彩瞬间 NBA 2023", "v3": "萌娃日常：宝宝第一次吃柠檬"}
#: a part of the release's classname.json: its indices are not the sorted order of the names
CLASSNAMES = {"翻唱": 0, "萌娃日常": 1, "篮球": 2}


@pytest.fixture
def release(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for index, key in enumerate(TITLES):
        (videos / f"{key}.mp4").write_bytes(mp4_bytes(frame_stack(8, seed=index)))
    with open(tmp_path / "cls_train.csv", "w", newline="", encoding="utf-8") as table:
        writer = csv.writer(table)
        writer.writerow(["video_id:FILE", "title", "label"])
        for key, label in zip(TITLES, ("萌娃日常", "篮球", "萌娃日常")):
            writer.writerow([f"{key}.mp4", TITLES[key], label])
    with open(tmp_path / "cap_val.csv", "w", newline="", encoding="utf-8") as table:
        writer = csv.writer(table)
        writer.writerow(["video_id:FILE", "golden_caption"])
        writer.writerow(["v1", str(["一只小猫在玩", "小猫在草地上"])])  # no extension, a list of references
    (tmp_path / "classname.json").write_text(json.dumps(CLASSNAMES, ensure_ascii=False), encoding="utf-8")
    return tmp_path


def test_the_release_csvs_become_clip_shards_with_chinese_text_and_the_release_indices(release, tmp_path):
    out = tmp_path / "shards"
    assert vlp_data(["youku-mplug", str(out), "--csv", str(release / "cls_train.csv"), "--video-root",
                     str(release / "videos"), "--classnames", str(release / "classname.json")]) == 0
    samples = dict(iterate_shard(out / "train-000000.tar"))
    assert {key: sample["txt"].decode("utf-8") for key, sample in samples.items()} == TITLES
    assert {key: int(sample["cls"]) for key, sample in samples.items()} == {"v1": 1, "v2": 2, "v3": 1}
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["classnames"]["cls"] == ["翻唱", "萌娃日常", "篮球"]

    captions = tmp_path / "captions"
    assert vlp_data(["youku-mplug", str(captions), "--csv", str(release / "cap_val.csv"), "--video-root",
                     str(release / "videos")]) == 0
    (key, sample), = iterate_shard(captions / "train-000000.tar")
    assert key == "v1" and sample["txt"].decode("utf-8") == "一只小猫在玩"
    assert json.loads(sample["json"])["references"] == ["一只小猫在玩", "小猫在草地上"]


def test_a_category_the_classnames_do_not_name_and_a_foreign_csv_are_one_sentence(release, tmp_path, capsys):
    (release / "classname.json").write_text(json.dumps({"翻唱": 0}, ensure_ascii=False), encoding="utf-8")
    assert vlp_data(["youku-mplug", str(tmp_path / "a"), "--csv", str(release / "cls_train.csv"), "--video-root",
                     str(release / "videos"), "--classnames", str(release / "classname.json")]) == 2
    assert "has category '篮球', which" in capsys.readouterr().err  # the first unknown, sorted
    (release / "other.csv").write_text("path,caption\nv1.mp4,x\n", encoding="utf-8")
    assert vlp_data(["youku-mplug", str(tmp_path / "b"), "--csv", str(release / "other.csv")]) == 2
    assert "is not a Youku-mPLUG CSV: it needs a path column (video_id:FILE or clip_name:FILE)" in (
        capsys.readouterr().err)


def test_the_suite_tokenizers_keep_chinese_text():
    """Byte-level tokenizers have no unknown token: ByteTokenizer round-trips exactly (3 ids per character);
    CLIP's byte-level BPE keeps every Chinese character (its cleaning lower-cases, splits digits and unfolds
    full-width punctuation, as for English)."""
    for title in TITLES.values():
        byte_level = ByteTokenizer(context_length=128)
        assert byte_level.decode(byte_level([title])["input_ids"][0].tolist()) == title
        clip = CLIPTokenizer(context_length=77)
        decoded = clip.decode(clip([title])["input_ids"][0].tolist())
        assert decoded.replace(" ", "") == clean_caption(title).replace(" ", "")
        hanzi = [char for char in title if "\u4e00" <= char <= "\u9fff"]
        assert hanzi and [char for char in decoded if "\u4e00" <= char <= "\u9fff"] == hanzi


def test_chinese_captions_reach_a_video_method_batch(release, tmp_path):
    from vlp_lightning.methods import XCLIP

    out = tmp_path / "shards"
    assert vlp_data(["youku-mplug", str(out), "--csv", str(release / "cls_train.csv"), "--video-root",
                     str(release / "videos")]) == 0
    method = XCLIP(tokenizer=ByteTokenizer(context_length=96), num_frames=4)
    datamodule = VideoDataModule(train_shards=str(out / "train-*.tar"), batch_size=3, num_workers=0)
    datamodule.trainer = SimpleNamespace(lightning_module=method, global_rank=0, world_size=1, current_epoch=0,
                                         training=True, loggers=[])
    datamodule.setup("fit")
    batch = datamodule.on_before_batch_transfer(next(iter(datamodule.train_dataloader())), 0)
    batch = datamodule.on_after_batch_transfer(batch, 0)
    assert sorted(batch["caption"]) == sorted(TITLES.values()) and batch["video"].shape[:2] == (3, 4)
    tokens = batch["text"]["input_ids"]
    decoded = sorted(method.tokenizer.decode(row.tolist()) for row in tokens)
    assert decoded == sorted(TITLES.values())
    assert torch.isfinite(method.forward_loss(batch)["loss"])
