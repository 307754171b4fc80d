"""`vlp-data scenes` and the instances (boxes, instance masks) that follow the views' crops and flips."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fake_emoji_cache  # noqa: E402
from data_modules.builder import iterate_shard, main
from data_modules.datamodules import ImageTextDataModule
from data_modules.instances import INSTANCES_MEMBER, Instances, crop_instances, decode_instances, flip_instances
from data_modules.pipeline import BadSampleError, DataConfigError, SampleDecoder, make_eval_loader, make_loader
from data_modules.sources import SourceError
from data_modules.sources.scenes import PATTERN_SIDE, _background_image, plural, scenes_source
from data_modules.views import VIEWS_FIELD, Crop, SingleCrop, TwoCrops
from vlp_lightning.modules.tokenizers import ByteTokenizer

def build(out: Path, cache: Path, *options: str, capsys: pytest.CaptureFixture[str] | None = None) -> dict:
    argv = ["scenes", str(out), "--cache-dir", str(cache), "--styles", "twitter", "--count", "40",
            "--heldout-count", "10", "--heldout-concepts", "0.25", "--size", "96", "--max-objects", "5", *options]
    assert main(argv) == 0
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("scenes")
    cache = fake_emoji_cache(root / "npm")
    return root / "shards", cache, build(root / "shards", cache, "--backgrounds", "plain")


def samples_of(out: Path) -> dict[str, dict[str, dict[str, bytes]]]:
    """split -> key -> members."""
    splits: dict[str, dict] = {}
    for shard in sorted(out.glob("*.tar")):
        splits.setdefault(shard.name.rpartition("-")[0], {}).update(iterate_shard(shard))
    return splits


def test_scenes_are_reproducible_exact_and_hold_out_concepts(
    scenes: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    out, cache, manifest = scenes
    again = build(tmp_path / "again", cache, "--backgrounds", "plain")
    other_seed = build(tmp_path / "seed1", cache, "--backgrounds", "plain", "--seed", "1")

    assert manifest["splits"] == {"train": 36, "unseen": 10, "val": 4}
    for shard in manifest["shards"]:
        assert (out / shard).read_bytes() == (tmp_path / "again" / shard).read_bytes()
    assert again["build"]["fingerprint"] == manifest["build"]["fingerprint"]
    assert (out / "train-000000.tar").read_bytes() != (tmp_path / "seed1" / "train-000000.tar").read_bytes()
    assert other_seed["classnames"] == manifest["classnames"]  # the held-out concepts do not depend on the seed
    unseen = set(manifest["classnames"]["unseen"])
    assert unseen and "a flag" not in unseen | set(manifest["classnames"]["concepts"])
    splits = samples_of(out)
    for split, samples in splits.items():
        for key, sample in samples.items():
            meta = json.loads(sample["json"])
            names = {item["name"] for item in meta["objects"]}
            assert (names <= unseen) if split == "unseen" else not names & unseen, (split, key, names)
            labels = np.asarray(Image.open(io.BytesIO(sample[INSTANCES_MEMBER])))
            assert labels.shape == (96, 96) and labels.max() == len(meta["objects"])
            for index, item in enumerate(meta["objects"]):  # each box is the box of the object's visible pixels
                ys, xs = np.nonzero(labels == index + 1)
                assert item["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] and item["area"] == len(xs)
            assert meta["counts"] == {name: [o["name"] for o in meta["objects"]].count(name) for name in names}
            assert len(meta["regions"]) == len(meta["objects"]) and len(meta["blocks"]["objects"]) == 9
            assert sample["txt"].decode() == meta["caption"] and meta["caption"].endswith(meta["background"])
            for subject, predicate, other in meta["relations"]:
                first, second = meta["objects"][subject]["box"], meta["objects"][other]["box"]
                if predicate == "left of":
                    assert first[0] + first[2] < second[0] + second[2]
                if predicate == "above":
                    assert first[1] + first[3] < second[1] + second[3]
    long = [json.loads(s["json"]) for s in splits["train"].values() if len(json.loads(s["json"])["objects"]) > 2]
    assert long and all(sum(item["name"] in m["long_caption"] for item in m["objects"]) == len(m["objects"])
                        for m in long)


def check_views(boxes: list[torch.Tensor], masks: torch.Tensor, objects: list[torch.Tensor], meta: list[dict]) -> int:
    """Every kept object's mask is non-empty, its box is the box of its mask within 1 px, and nothing else is in the
    mask; returns the number of objects dropped by the crops."""
    dropped = 0
    for sample_boxes, labels, sample_objects, sample_meta in zip(boxes, masks, objects, meta):
        assert sample_boxes.shape == (len(sample_objects), 4) and int(labels.max()) == len(sample_objects)
        assert sorted(sample_objects.tolist()) == sample_objects.tolist()
        for index, box in enumerate(sample_boxes):
            ys, xs = torch.nonzero(labels == index + 1, as_tuple=True)
            mask_box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            assert torch.allclose(box, mask_box, atol=1.0), (box, mask_box)
        dropped += len(sample_meta["objects"]) - len(sample_objects)
    return dropped


def test_boxes_and_masks_follow_every_crop_and_flip(scenes: tuple[Path, Path, dict]) -> None:
    out, _, _ = scenes
    decoder = SampleDecoder(TwoCrops(scale=(0.1, 1.0)).build(48), with_instances=True)
    dropped = flipped = views = 0
    for seed in range(3):
        for batch in make_loader(str(out / "train-000000.tar"), decoder, 12, seed=seed, pad=False, finish=False):
            assert batch["__stream__"]["skipped"] == 0
            for view in range(2):
                boxes, masks, objects = batch["boxes"][view], batch["masks"][view], batch["objects"][view]
                dropped += check_views(boxes, masks, objects, batch["meta"])
                flipped += sum(batch[VIEWS_FIELD].flips[view])
                views += len(batch["boxes"][view])
    assert dropped > 0 and 0 < flipped < views  # crops cut objects away, about half the views are mirrored


def test_crop_and_flip_of_known_instances() -> None:
    labels = np.zeros((40, 60), np.uint8)
    labels[10:20, 5:15] = 1  # a square
    yy, xx = np.mgrid[:40, :60]
    labels[(yy - 25) ** 2 + (xx - 40) ** 2 <= 100] = 2  # a disc of radius 10 around (40, 25)
    instances = Instances(labels, np.float32([[5, 10, 15, 20], [30, 15, 51, 36]]), np.arange(2))

    view = crop_instances(instances, (0, 35, 40, 25), 50)  # x in [35, 60): the square is cut away, the disc halved
    assert view.objects.tolist() == [1] and view.labels.shape == (50, 50)
    np.testing.assert_allclose(view.boxes, [[0, 15 * 1.25, 16 * 2, 36 * 1.25]], atol=1)  # x * 50 / 25, y * 50 / 40
    mirrored = flip_instances(view)
    np.testing.assert_array_equal(mirrored.boxes, [[50 - view.boxes[0, 2], view.boxes[0, 1], 50, view.boxes[0, 3]]])
    assert (mirrored.labels == view.labels[:, ::-1]).all()
    whole = crop_instances(instances, (0, 0, 40, 60), 60)
    np.testing.assert_allclose(whole.boxes, [[5, 15, 15, 30], [30, 22.5, 51, 54]], atol=1)  # rows scaled by 60 / 40


def test_view_boxes_are_the_stored_boxes_transformed(scenes: tuple[Path, Path, dict]) -> None:
    """For random crop regions of real scenes: an object inside the region keeps its stored box, scaled; one the
    region cuts gets a box within the stored box clipped to the region; flips mirror them; all within 1 px. (The view
    is as large as the image: a nearest-neighbour downscale drops mask details thinner than its step, a triangle's
    tip, and the box follows the mask; the loader test covers downscaled views.)"""
    out, _, _ = scenes
    crop, rng, inside = Crop(96, scale=(0.1, 1.0)), random.Random(0), 0
    for _, sample in iterate_shard(out / "train-000000.tar"):
        instances = decode_instances(json.loads(sample["json"]), sample[INSTANCES_MEMBER], 96, 96)
        for _ in range(5):
            top, left, height, width = region = crop.box(96, 96, rng)
            view = crop_instances(instances, region, 96)
            scale = np.float32([96 / width, 96 / height] * 2)
            stored = instances.boxes[view.objects]
            clipped = (np.clip(stored, [left, top] * 2, [left + width, top + height] * 2) - [left, top] * 2) * scale
            whole = ((stored[:, :2] >= [left, top]) & (stored[:, 2:] <= [left + width, top + height])).all(1)
            np.testing.assert_allclose(view.boxes[whole], clipped[whole], atol=1)
            assert (view.boxes[:, :2] >= clipped[:, :2] - 1).all() and (view.boxes[:, 2:] <= clipped[:, 2:] + 1).all()
            mirrored = flip_instances(view).boxes
            np.testing.assert_array_equal(mirrored[:, [2, 1, 0, 3]] * [-1, 1, -1, 1] + [96, 0, 96, 0], view.boxes)
            inside += int(whole.sum())
    assert inside > 20


def test_eval_loader_returns_the_stored_boxes_scaled(scenes: tuple[Path, Path, dict]) -> None:
    out, _, _ = scenes
    batches = list(make_eval_loader(str(out / "val-000000.tar"), 48, batch_size=4))
    batch = batches[0]
    stored = [json.loads(sample["json"]) for _, sample in iterate_shard(out / "val-000000.tar")]
    for boxes, meta in zip(batch["boxes"], stored):
        np.testing.assert_allclose(boxes.numpy(), np.float32([item["box"] for item in meta["objects"]]) / 2, atol=1)
    assert batch["masks"].shape == (4, 48, 48) and batch["masks"].dtype == torch.uint8
    check_views(batch["boxes"], batch["masks"], batch["objects"], batch["meta"])


def test_bad_scene_inputs_are_counted_or_stop_strict_mode(
    scenes: tuple[Path, Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _, _ = scenes
    good = dict(next(iterate_shard(out / "train-000000.tar"))[1])
    meta = json.loads(good["json"])
    outside = {**meta, "objects": [{**meta["objects"][0], "box": [0, 0, 97, 10]}, *meta["objects"][1:]]}
    missing = {**meta, "relations": [[0, "left of", len(meta["objects"])]]}
    small = io.BytesIO()
    Image.new("L", (64, 64)).save(small, format="PNG")
    bad = [{**good, "json": json.dumps(outside).encode()}, {**good, INSTANCES_MEMBER: small.getvalue()},
           {**good, "json": json.dumps(missing).encode()}]
    shard = tmp_path / "train-000000.tar"
    with tarfile.open(shard, "w") as archive:
        for index, sample in enumerate([good, *bad]):
            for member, data in sample.items():
                info = tarfile.TarInfo(f"s{index}.{member}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    decoder = SampleDecoder(SingleCrop().build(32), with_instances=True)

    batches = list(make_loader(str(shard), decoder, 4, pad=False, shuffle=False))
    assert batches[0]["__key__"] == ["s0"] and batches[-1]["__stream__"]["skipped"] == 3
    with pytest.raises(BadSampleError, match=r"'s1'.*box \[0, 0, 97, 10\] is not inside the 96x96 image"):
        list(make_loader(str(shard), decoder, 4, pad=False, shuffle=False, strict=True))
    assert main(["inspect", str(tmp_path)]) == 1
    report = capsys.readouterr().out
    assert "bad samples: 3" in report and "instance mask is 64x64, the image 96x96" in report
    assert "relation [0, 'left of'" in report


def test_inspect_shows_boxes_relations_and_captions(
    scenes: tuple[Path, Path, dict], capsys: pytest.CaptureFixture[str]
) -> None:
    out, _, _ = scenes
    capsys.readouterr()
    assert main(["inspect", str(out), "--show", "2"]) == 0
    report = capsys.readouterr().out
    assert "members: instances.png 50, jpg 50, json 50, txt 50" in report and "bad samples: 0" in report
    assert "relations: " in report and "long caption: " in report and "region 0: " in report
    assert any(line.strip().startswith("0: ") and line.rstrip().endswith("]") for line in report.splitlines())


def test_scenes_on_scikit_image_backgrounds(tmp_path: Path) -> None:
    pytest.importorskip("skimage")
    manifest = build(tmp_path / "photos", fake_emoji_cache(tmp_path / "npm"), "--count", "4", "--heldout-count", "1")
    assert "scikit-image backgrounds" in manifest["source"] and "brick.png CC0" in manifest["licence"]
    metas = [json.loads(sample["json"]) for sample in samples_of(tmp_path / "photos")["train"].values()]
    assert all(not meta["background"].startswith("a plain") for meta in metas)


def test_datamodule_batches_carry_instances_and_methods_that_need_them_stop_without(
    scenes: tuple[Path, Path, dict], make_shards, tmp_path: Path
) -> None:
    out, _, _ = scenes
    grounding = SimpleNamespace(required_keys=("image", "text", "boxes"), image_size=32,
                                tokenizer=ByteTokenizer(context_length=16),
                                train_views=lambda: SingleCrop(scale=(0.3, 1.0)))
    datamodule = ImageTextDataModule(train_shards=str(out / "train-000000.tar"), batch_size=6, num_workers=1)
    datamodule.trainer = SimpleNamespace(lightning_module=grounding, global_rank=0, world_size=1, current_epoch=0,
                                         training=True, loggers=[])
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))  # through a worker process and its shared-memory handover
    assert len(batch["boxes"]) == 6 and batch["masks"].shape == (6, 32, 32) and len(batch["caption"]) == 6
    assert all(isinstance(boxes, torch.Tensor) and boxes.dtype == torch.float32 for boxes in batch["boxes"])
    check_views(batch["boxes"], batch["masks"], batch["objects"], batch["meta"])

    plain = make_shards(tmp_path, n=6, per_shard=6)
    datamodule = ImageTextDataModule(train_shards=plain.pattern, batch_size=6, num_workers=0)
    datamodule.trainer = SimpleNamespace(lightning_module=grounding, global_rank=0, world_size=1)
    with pytest.raises(DataConfigError, match=r"needs object boxes and masks .* no .instances.png members; use scene"):
        datamodule.setup("fit")


def test_plural_inflects_the_head_noun() -> None:
    assert [plural(name) for name in ("face screaming in fear", "man biking", "people hugging", "cherry", "fox")] == [
        "faces screaming in fear", "men biking", "people hugging", "cherries", "foxes"]


def test_position_prompts_name_the_block_the_object_covers_in_the_view_and_only_in_training(
    scenes: tuple[Path, Path, dict], make_shards, tmp_path: Path
) -> None:
    """PTP: every training caption gains "The block [P] has a [O]." where O covers most of block P of the image *as
    cropped and flipped*; validation captions stay as stored; shards without instance masks get one sentence."""
    import re

    from data_modules.instances import block_tags

    out, _, _ = scenes
    method = SimpleNamespace(required_keys=("image", "text"), image_size=48, tokenizer=ByteTokenizer(context_length=96),
                             train_views=lambda: SingleCrop(scale=(0.5, 1.0), hflip=True))
    datamodule = ImageTextDataModule(train_shards=str(out / "train-000000.tar"), val_shards=str(out / "val-*.tar"),
                                     batch_size=16, num_workers=0, position_prompts=True)
    datamodule.trainer = SimpleNamespace(lightning_module=method, global_rank=0, world_size=1, current_epoch=0,
                                         training=True, loggers=[])
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    prompted = 0
    for caption, meta, mask, objects in zip(batch["caption"], batch["meta"], batch["masks"], batch["objects"]):
        stored = meta["caption"]
        assert caption.startswith(stored)
        found = re.fullmatch(r" The block ([1-9]) has a (.+)\.", caption[len(stored):])
        if found is None:
            assert caption == stored and not any(block_tags(mask.numpy(), len(objects)))
            continue
        prompted += 1
        tags = block_tags(mask.numpy(), len(objects))  # the mask as the model sees it (flips applied)
        cell = int(found.group(1)) - 1
        assert tags[cell] and meta["objects"][int(objects[tags[cell][0]])]["name"] == found.group(2)
    assert prompted >= 12
    val = next(iter(datamodule.val_dataloader()))
    assert val["caption"] == [meta["caption"] for meta in val["meta"]]

    plain = make_shards(tmp_path, n=6, per_shard=6)
    datamodule = ImageTextDataModule(train_shards=plain.pattern, batch_size=6, num_workers=0, position_prompts=True)
    datamodule.trainer = SimpleNamespace(lightning_module=method, global_rank=0, world_size=1)
    with pytest.raises(DataConfigError, match="position_prompts .* captioned scene shards"):
        datamodule.setup("fit")


def test_scenes_mix_emoji_pngs_vector_emoji_and_tux_paint_stamps(tmp_path: Path) -> None:
    """`--styles twitter,openmoji,tuxpaint`: a vector emoji joins the PNG emoji of its code point under the emoji's
    name (not its own CLDR name), an emoji no PNG style draws is a concept of its own, skin-tone variants and
    non-things stay out, Tux Paint stamps are concepts named by their description's noun phrase, and the scenes show
    them all with exact boxes."""
    pytest.importorskip("resvg_py", reason="vector cut-outs need the svg extra (resvg-py)")
    from data_modules.sources.scenes import cutout_concepts
    from tests.test_sources import circle_svg, fake_debian_cache, fake_npm_cache

    cache = fake_npm_cache(fake_emoji_cache(tmp_path / "npm"))
    stamps = (fake_debian_cache(tmp_path / "debian") / "tuxpaint-stamps-default_2022.06.04-1_all"
              / "usr/share/tuxpaint/stamps")
    (stamps / "food" / "broken.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="0" height="0"/>')
    (stamps / "food" / "broken.txt").write_text("A broken drawing.\n")
    openmoji = cache / "openmoji-17.0.0" / "package"
    entries = json.loads((openmoji / "data" / "openmoji.json").read_text())
    entries.append({**entries[0], "hexcode": "0000", "annotation": "a cldr name", "group": "objects"})
    (openmoji / "data" / "openmoji.json").write_text(json.dumps(entries))
    (openmoji / "color" / "svg" / "0000.svg").write_text(circle_svg("#123456"))

    concepts, _, licences = cutout_concepts(("twitter", "openmoji", "tuxpaint"), cache)
    first_png = json.loads((cache / "emoji-datasource-twitter-16.0.0" / "package" / "emoji.json").read_text())[0]
    assert sorted(concepts[first_png["name"].lower()].images) == ["openmoji", "twitter"]
    assert "a cldr name" not in concepts and sorted(concepts["grinning face"].images) == ["openmoji"]
    assert "waving hand" in concepts and not any("skin tone" in name for name in concepts)
    assert concepts["cat"].images == {"tuxpaint": (str(tmp_path / "debian" / "tuxpaint-stamps-default_2022.06.04-1_all"
                                                       / "usr/share/tuxpaint/stamps/animals/cats/cat.png"),)}
    assert concepts["apple"].category == "food" and len(licences) == 3
    assert "broken drawing" not in concepts  # the renderer rejects it: left out, not a failure of every scene

    manifest = build(tmp_path / "mixed", cache, "--styles", "twitter,openmoji,tuxpaint", "--backgrounds", "plain",
                     "--heldout-concepts", "0.2")
    assert "OpenMoji" in manifest["licence"] and "Tux Paint" in manifest["licence"]
    styles = set()
    for samples in samples_of(tmp_path / "mixed").values():
        for sample in samples.values():
            meta = json.loads(sample["json"])
            labels = np.asarray(Image.open(io.BytesIO(sample[INSTANCES_MEMBER])))
            for index, item in enumerate(meta["objects"]):
                ys, xs = np.nonzero(labels == index + 1)
                assert item["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                styles.add(item["style"])
    assert styles == {"twitter", "openmoji", "tuxpaint"}
    assert main(["scenes", str(tmp_path / "bad"), "--cache-dir", str(cache), "--styles", "twitter,crayons"]) == 2


def test_scenes_on_openclipart_patterns_tiled_and_named(tmp_path: Path) -> None:
    """--backgrounds openclipart tiles the patterns (a palette tile with transparency over white), names them in the
    caption, and a missing package or unknown kind is one sentence."""
    patterns = tmp_path / "openclipart" / "png" / "special" / "patterns"
    patterns.mkdir(parents=True)
    tile = Image.new("P", (64, 64), 0)
    tile.putpalette([0, 0, 0, 255, 0, 0])
    tile.paste(1, (0, 0, 32, 32))  # a red quarter on transparent black
    tile.info["transparency"] = 0
    tile.save(patterns / "pattern-checkers-2.png", transparency=0)
    Image.new("L", (5, 5), 128).save(patterns / "notapattern.png")  # not `pattern-*`: never drawn
    cache = fake_emoji_cache(tmp_path / "npm")
    manifest = build(tmp_path / "out", cache, "--count", "4", "--heldout-count", "1", "--backgrounds", "openclipart",
                     "--openclipart-root", str(tmp_path / "openclipart"), "--max-objects", "1")
    assert "on openclipart backgrounds" in manifest["source"] and "1 openclipart patterns: public domain" in (
        manifest["licence"])
    for sample in samples_of(tmp_path / "out")["train"].values():
        meta = json.loads(sample["json"])
        assert meta["background"] == "a checkers pattern" and meta["caption"].endswith("on a checkers pattern")
        pixels = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), dtype=np.float32)
        background = pixels[np.asarray(Image.open(io.BytesIO(sample[INSTANCES_MEMBER]))) == 0]
        # tiled, not one tile stretched: both the tile's red and its transparent part (white, tinted) fill the scene
        assert (background[:, 0] - background[:, 1] > 100).mean() > 0.1
        assert (background.min(axis=1) > 120).mean() > 0.3
    tiled = _background_image(str(patterns / "pattern-checkers-2.png"))
    assert tiled.shape == (PATTERN_SIDE, PATTERN_SIDE, 3) and np.array_equal(tiled[:64, :64], tiled[64:128, 64:128])
    for bad, message in (("openclipart", "no png/special/patterns/pattern-\\*.png under"),
                         ("skimage,photos", "give plain, or one or more of skimage, openclipart")):
        with pytest.raises(SourceError, match=message):
            scenes_source(count=2, heldout_count=1, backgrounds=bad, cache_dir=cache, styles=("twitter",),
                          openclipart_root=tmp_path / "empty")
