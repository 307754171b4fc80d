"""`vlp-data`: every sub-command round-trips (build -> inspect -> read back with plain webdataset / tarfile).

The real sources are exercised on tiny fake layouts in `tmp_path` that mirror what the npm and Debian packages
install (see the module docstrings of `data_modules.sources.*`); nothing here touches the network.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import stat
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import webdataset
from PIL import Image, PngImagePlugin

from data_modules.builder import assign_splits, main, parse_split
from data_modules.sources import Record, SourceError


def save_image(
    path: Path, size: tuple[int, int] = (8, 6), colour: tuple[int, ...] = (200, 30, 30), mode: str = "RGB"
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_samples(out_dir: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of a shard set, read with plain webdataset (raw bytes, no decoding)."""
    urls = sorted(str(path) for path in out_dir.glob("*.tar"))
    samples = {sample["__key__"]: sample for sample in webdataset.WebDataset(urls, shardshuffle=False)}
    assert len(samples) == sum(json.loads((out_dir / "manifest.json").read_text())["splits"].values())
    return samples


def decode(sample: dict[str, bytes]) -> Image.Image:
    return Image.open(io.BytesIO(sample["png"]))


def manifest_of(out_dir: Path) -> dict:
    return json.loads((out_dir / "manifest.json").read_text())


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("folder", "csv", "jsonl", "emoji", "fashion-mnist", "openclipart", "openmoji", "tuxpaint", "ffr",
                    "inspect"):
        assert command in out
    assert "vlp fit" in out


def test_folder_with_captions_and_class_subfolders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "photos"
    save_image(source / "cats" / "tabby.png")
    (source / "cats" / "tabby.txt").write_text("a tabby cat\na cat on a mat\n")
    save_image(source / "cats" / "black cat.jpg", colour=(10, 10, 10))
    save_image(source / "dogs" / "pug.png")
    (source / "dogs" / "pug.txt").write_text("a pug")
    save_image(source / "dogs" / "small" / "corgi.png", size=(5, 9))
    (source / "dogs" / "notes.md").write_text("not an image")
    out = tmp_path / "shards"

    code, stdout, _ = run_cli(capsys, "folder", source, out, "--maxcount", 3, "--caption-template", "a photo of a {}.")

    assert code == 0 and "wrote 4 samples" in stdout
    manifest = manifest_of(out)
    assert manifest["format"] == 1 and manifest["source"] == f"folder:{source.resolve()}"
    assert manifest["classnames"] == {"cls": ["cats", "dogs"]}
    assert manifest["splits"] == {"train": 4} and manifest["members"] == ["cls", "png", "txt"]
    assert {name: shard["count"] for name, shard in manifest["shards"].items()} == {
        "train-000000.tar": 3,
        "train-000001.tar": 1,
    }
    samples = read_samples(out)
    assert sorted(samples) == ["cats_black_cat", "cats_tabby", "dogs_pug", "dogs_small_corgi"]
    assert samples["cats_tabby"]["txt"] == b"a tabby cat\na cat on a mat"
    assert samples["cats_black_cat"]["txt"] == b"a photo of a cats."
    assert samples["dogs_small_corgi"]["txt"] == b"a photo of a dogs."
    assert {key: int(sample["cls"]) for key, sample in samples.items()} == {
        "cats_black_cat": 0,
        "cats_tabby": 0,
        "dogs_pug": 1,
        "dogs_small_corgi": 1,
    }
    assert decode(samples["dogs_small_corgi"]).size == (5, 9)
    for name in manifest["shards"]:
        with tarfile.open(out / name) as archive:
            assert all(member.isfile() and "/" not in member.name for member in archive)

    code, stdout, _ = run_cli(capsys, "inspect", out)
    assert code == 0
    assert "train-000001.tar" in stdout and "bad samples: 0" in stdout
    assert "cls 0 (cats)" in stdout and "members: cls 4, png 4, txt 4" in stdout


def test_file_names_that_sanitise_to_the_same_key_stay_apart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "icons"
    save_image(source / "viewmag.png", colour=(1, 2, 3))
    save_image(source / "viewmag+.png", colour=(4, 5, 6))
    save_image(source / "zoom in.png", colour=(7, 8, 9))
    out = tmp_path / "shards"
    assert run_cli(capsys, "folder", source, out)[0] == 0
    samples = read_samples(out)
    assert len(samples) == 3 and "zoom_in" in samples
    colliding = sorted(key for key in samples if key.startswith("viewmag_"))
    assert len(colliding) == 2
    assert sorted(decode(samples[key]).getpixel((0, 0)) for key in colliding) == [(1, 2, 3), (4, 5, 6)]


def test_undecodable_images_are_reported_and_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "mixed"
    save_image(source / "good.png")
    (source / "good.txt").write_text("fine")
    (source / "garbage.png").write_bytes(b"this is not a png")
    (source / "empty.jpg").write_bytes(b"")
    whole = io.BytesIO()
    Image.effect_noise((64, 64), 50).save(whole, format="PNG")
    (source / "truncated.png").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    save_image(source / "transparent.png", size=(4, 4), colour=(0, 0, 0, 0), mode="RGBA")
    save_image(source / "wide.png", size=(40, 20))
    out = tmp_path / "shards"

    code, _, stderr = run_cli(capsys, "folder", source, out, "--resize", 10)

    assert code == 0
    assert "skipped 3 images that failed to decode" in stderr
    for name in ("garbage", "empty", "truncated"):
        assert f"{source / name}" in stderr
    manifest = manifest_of(out)
    assert sorted(manifest["skipped"]) == ["empty", "garbage", "truncated"]
    assert "classnames" not in manifest or manifest["classnames"] == {}
    samples = read_samples(out)
    assert sorted(samples) == ["good", "transparent", "wide"]
    assert "txt" not in samples["wide"] and samples["good"]["txt"] == b"fine"
    transparent = decode(samples["transparent"])
    assert transparent.mode == "RGB" and transparent.getpixel((0, 0)) == (255, 255, 255)
    assert decode(samples["wide"]).size == (20, 10)
    assert decode(samples["good"]).size == (8, 6)
    code, stdout, _ = run_cli(capsys, "inspect", out)
    assert code == 0 and "skipped while building: 3" in stdout


def test_csv_merges_captions_maps_label_names_and_keeps_other_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_image(tmp_path / "img" / "one.png")
    save_image(tmp_path / "img" / "two.jpg")
    table = tmp_path / "captions.csv"
    table.write_text(
        "filepath,title,kind,photographer\n"
        "img/one.png,a red square,square,ann\n"
        "img/one.png,a small red block,square,bob\n"
        "img/two.jpg,another red thing,blob,cy\n"
        "img/missing.png,never seen,blob,dee\n"
    )
    out = tmp_path / "shards"

    code, _, stderr = run_cli(
        capsys,
        "csv",
        table,
        out,
        "--image-col",
        "filepath",
        "--caption-col",
        "title",
        "--label-col",
        "kind",
        "--licence",
        "CC0",
    )

    assert code == 0 and "img_missing" in stderr
    manifest = manifest_of(out)
    assert manifest["classnames"] == {"cls": ["blob", "square"]} and manifest["licence"] == "CC0"
    samples = read_samples(out)
    assert sorted(samples) == ["img_one", "img_two"]
    assert samples["img_one"]["txt"] == b"a red square\na small red block"
    assert int(samples["img_one"]["cls"]) == 1 and int(samples["img_two"]["cls"]) == 0
    assert json.loads(samples["img_one"]["json"]) == {"photographer": "ann"}

    code, _, stderr = run_cli(capsys, "csv", table, tmp_path / "other", "--image-col", "path")
    assert code == 2 and "no column 'path' (--image-col); its columns are filepath, title, kind, photographer" in stderr


def test_jsonl_with_custom_fields_caption_lists_and_integer_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    save_image(images / "a.png")
    save_image(images / "b.png")
    table = tmp_path / "data" / "pairs.jsonl"
    table.parent.mkdir()
    rows = [
        {"path": "a.png", "texts": ["first caption", "second caption"], "y": 7, "source": "web"},
        {"path": "b.png", "texts": "only caption", "y": 3},
    ]
    table.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    out = tmp_path / "shards"

    code, _, _ = run_cli(
        capsys,
        "jsonl",
        table,
        out,
        "--image-field",
        "path",
        "--caption-field",
        "texts",
        "--label-field",
        "y",
        "--image-root",
        images,
    )

    assert code == 0
    assert manifest_of(out)["classnames"] == {}
    samples = read_samples(out)
    assert samples["a"]["txt"] == b"first caption\nsecond caption" and int(samples["a"]["cls"]) == 7
    assert json.loads(samples["a"]["json"]) == {"source": "web"}
    assert samples["b"]["txt"] == b"only caption" and int(samples["b"]["cls"]) == 3 and "json" not in samples["b"]
    code, stdout, _ = run_cli(capsys, "inspect", out)
    assert code == 0 and "'first caption | second caption'" in stdout


def fake_records(count: int) -> list[Record]:
    return [
        Record(key=f"sample{index:03d}", open_image=partial(Image.new, "L", (2, 2)), origin="memory")
        for index in range(count)
    ]


def test_split_assignment_is_exact_seeded_and_independent_of_input_order() -> None:
    records = fake_records(100)
    fractions = {"train": 0.7, "val": 0.2, "test": 0.1}
    splits = assign_splits(records, fractions, seed=3)
    assert {name: len(part) for name, part in splits.items()} == {"train": 70, "val": 20, "test": 10}
    assert sorted(record.key for part in splits.values() for record in part) == [record.key for record in records]
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    again = assign_splits(shuffled, fractions, seed=3)
    assert {name: [r.key for r in part] for name, part in again.items()} == {
        name: [r.key for r in part] for name, part in splits.items()
    }
    other_seed = assign_splits(records, fractions, seed=4)
    assert {r.key for r in other_seed["val"]} != {r.key for r in splits["val"]}


def test_split_option_is_validated() -> None:
    assert parse_split("train=0.9, val=0.1") == {"train": 0.9, "val": 0.1}
    with pytest.raises(SourceError, match="add up to 0.8"):
        parse_split("train=0.7,val=0.1")
    with pytest.raises(SourceError, match="lower-case name"):
        parse_split("Train=1")
    with pytest.raises(SourceError, match="not NAME=FRACTION"):
        parse_split("train")


def test_same_input_gives_identical_shards_and_reruns_are_up_to_date(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "photos"
    for index in range(12):
        save_image(source / f"p{index:02d}.png", colour=(index * 20, 0, 0))
        (source / f"p{index:02d}.txt").write_text(f"photo {index}")
    first, second = tmp_path / "first", tmp_path / "second"
    options = ("--split", "train=0.75,val=0.25", "--seed", 5, "--maxcount", 4)
    assert run_cli(capsys, "folder", source, first, *options)[0] == 0
    assert run_cli(capsys, "folder", source, second, *options)[0] == 0

    shard_names = sorted(manifest_of(first)["shards"])
    assert shard_names == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"]
    assert manifest_of(first)["shards"] == manifest_of(second)["shards"]
    for name in shard_names:
        assert (first / name).read_bytes() == (second / name).read_bytes()

    written = {name: (first / name).stat().st_mtime_ns for name in shard_names}
    code, stdout, _ = run_cli(capsys, "folder", source, first, *options)
    assert code == 0 and "is up to date (12 samples)" in stdout
    assert {name: (first / name).stat().st_mtime_ns for name in shard_names} == written

    before = {name: (first / name).read_bytes() for name in shard_names}
    code, stdout, _ = run_cli(capsys, "folder", source, first, *options, "--force")
    assert code == 0 and "wrote 12 samples" in stdout
    assert {name: (first / name).read_bytes() for name in shard_names} == before

    (source / "p03.txt").write_text("a changed caption")
    code, stdout, _ = run_cli(capsys, "folder", source, first, "--maxcount", 100)
    assert code == 0 and "wrote 12 samples" in stdout
    assert sorted(path.name for path in first.iterdir()) == ["manifest.json", "train-000000.tar"]
    assert read_samples(first)["p03"]["txt"] == b"a changed caption"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["first", "photos", "second"]


def test_refuses_to_replace_a_folder_that_is_not_a_shard_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_image(tmp_path / "photos" / "a.png")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("keep me")
    code, _, stderr = run_cli(capsys, "folder", tmp_path / "photos", precious)
    assert code == 2 and "is not a vlp-data shard set" in stderr
    assert (precious / "thesis.tex").read_text() == "keep me"


EMOJI = [
    {
        "name": "GRINNING FACE",
        "short_name": "grinning",
        "short_names": ["grinning"],
        "unified": "1F600",
        "image": "1f600.png",
        "category": "Smileys & Emotion",
        "subcategory": "face-smiling",
        "sort_order": 1,
        "has_img_twitter": True,
    },
    {
        "name": "FATHER CHRISTMAS",
        "short_name": "santa",
        "short_names": ["santa"],
        "unified": "1F385",
        "image": "1f385.png",
        "category": "People & Body",
        "subcategory": "person-fantasy",
        "sort_order": 3,
        "has_img_twitter": True,
    },
    {
        "name": "WINKING FACE",
        "short_name": "wink",
        "short_names": ["wink"],
        "unified": "1F609",
        "image": "1f609.png",
        "category": "Smileys & Emotion",
        "subcategory": "face-affection",
        "sort_order": 2,
        "has_img_twitter": True,
    },
    {
        "name": "",
        "short_name": "hash_key-sign",
        "short_names": ["hash_key-sign"],
        "unified": "0023-FE0F-20E3",
        "image": "0023-fe0f-20e3.png",
        "category": "Symbols",
        "subcategory": "keycap",
        "sort_order": 4,
        "has_img_twitter": True,
    },
    {
        "name": "NO TWITTER IMAGE",
        "short_name": "nope",
        "short_names": ["nope"],
        "unified": "1FFFF",
        "image": "1ffff.png",
        "category": "Objects",
        "subcategory": "tool",
        "sort_order": 5,
        "has_img_twitter": False,
    },
]


def fake_emoji_package(root: Path, package: str, with_metadata: bool = True, with_images: bool = True) -> Path:
    """An unpacked npm package as `npm pack` ships it: package/{package.json, emoji.json, img/twitter/64/*.png}."""
    package_dir = root / package / "package"
    package_dir.mkdir(parents=True)
    (package_dir / "package.json").write_text(json.dumps({"name": package, "version": "16.0.0"}))
    if with_metadata:
        (package_dir / "emoji.json").write_text(json.dumps(EMOJI))
    if with_images:
        for entry in EMOJI:
            save_image(
                package_dir / "img" / "twitter" / "64" / entry["image"],
                size=(64, 64),
                colour=(255, 200, 0, 128),
                mode="RGBA",
            )
        save_image(package_dir / "img" / "twitter" / "sheets" / "64.png", size=(4, 4))
    return package_dir


def test_emoji_from_an_unpacked_package(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    package_dir = fake_emoji_package(tmp_path, "emoji-datasource-twitter")
    out = tmp_path / "shards"

    code, _, _ = run_cli(
        capsys, "emoji", out, "--style", "twitter", "--package-dir", package_dir, "--cache-dir", tmp_path / "cache"
    )

    assert code == 0
    manifest = manifest_of(out)
    assert manifest["source"] == "npm:emoji-datasource-twitter@16.0.0 img/twitter/64"
    assert "CC-BY 4.0" in manifest["licence"] and "MIT" in manifest["licence"]
    assert manifest["classnames"] == {
        "cls": ["Smileys & Emotion", "People & Body", "Symbols"],
        "subcategory_id": ["face-smiling", "face-affection", "person-fantasy", "keycap"],
    }
    samples = read_samples(out)
    assert sorted(samples) == ["0023-fe0f-20e3", "1f385", "1f600", "1f609"]
    assert samples["1f385"]["txt"] == b"father christmas" and int(samples["1f385"]["cls"]) == 1
    assert samples["0023-fe0f-20e3"]["txt"] == b"hash key sign"
    meta = json.loads(samples["1f609"]["json"])
    assert (meta["category"], meta["subcategory"], meta["subcategory_id"], meta["short_names"]) == (
        "Smileys & Emotion",
        "face-affection",
        1,
        ["wink"],
    )
    image = decode(samples["1f600"])
    assert image.size == (64, 64) and image.mode == "RGB" and image.getpixel((0, 0)) == (255, 227, 127)


def install_fake_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, packages: Path) -> Path:
    """An `npm` on PATH that answers `npm pack NAME@16 --pack-destination DIR` from `packages` and logs each call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "npm.log"
    npm = bin_dir / "npm"
    npm.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{log}"\n'
        'name="${2%@16}"\n'
        f'tar czf "$4/$name-16.0.0.tgz" -C "{packages}/$name" package\n'
        'echo "$name-16.0.0.tgz"\n'
    )
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_emoji_fetches_with_npm_pack_once_and_takes_metadata_from_the_base_package(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    packages = tmp_path / "registry"
    fake_emoji_package(packages, "emoji-datasource-twitter", with_metadata=False)
    fake_emoji_package(packages, "emoji-datasource", with_images=False)
    log = install_fake_npm(tmp_path, monkeypatch, packages)
    cache = tmp_path / "cache"

    for out in (tmp_path / "first", tmp_path / "second"):
        code, _, _ = run_cli(capsys, "emoji", out, "--cache-dir", cache)
        assert code == 0 and len(read_samples(out)) == 4

    assert log.read_text().splitlines() == [
        f"pack emoji-datasource-twitter@16 --pack-destination {cache}",
        f"pack emoji-datasource@16 --pack-destination {cache}",
    ]
    unpacked = cache / "emoji-datasource-twitter-16.0.0" / "package"
    assert (unpacked / "img" / "twitter" / "64" / "1f385.png").is_file()
    assert not (unpacked / "img" / "twitter" / "sheets").exists()
    assert sorted(path.name for path in cache.iterdir()) == [
        "emoji-datasource-16.0.0",
        "emoji-datasource-twitter-16.0.0",
    ]


def test_emoji_without_npm_says_how_to_get_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    code, _, stderr = run_cli(capsys, "emoji", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert code == 2 and "install it with: apt-get install npm" in stderr


def write_idx(path: Path, array: list[list[list[int]]] | list[int]) -> None:
    """A gzipped IDX file of unsigned bytes (magic 0x0000080N, big-endian dims, data)."""
    data = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, data.ndim]) + b"".join(dim.to_bytes(4, "big") for dim in data.shape)
    path.write_bytes(gzip.compress(header + data.tobytes()))


def fake_fashion_mnist(root: Path, train: int, test: int) -> None:
    root.mkdir(parents=True)
    for prefix, count in (("train", train), ("t10k", test)):
        write_idx(
            root / f"{prefix}-images-idx3-ubyte.gz",
            [[[(10 * index + row) % 256] * 28 for row in range(28)] for index in range(count)],
        )
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", [index % 10 for index in range(count)])


def test_fashion_mnist_keeps_the_official_test_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "fashion-mnist"
    fake_fashion_mnist(root, train=6, test=4)
    out = tmp_path / "shards"

    code, _, _ = run_cli(capsys, "fashion-mnist", out, "--root", root, "--split", "train=0.5,val=0.5")

    assert code == 0
    manifest = manifest_of(out)
    assert manifest["splits"] == {"test": 4, "train": 3, "val": 3}
    assert manifest["classnames"]["cls"][:2] == ["t-shirt/top", "trouser"] and "MIT" in manifest["licence"]
    samples = read_samples(out)
    assert {key for key in manifest["shards"]["test-000000.tar"]["keys"]} == {f"test_{index:05d}" for index in range(4)}
    assert samples["train_00001"]["txt"] == b"a photo of a trouser." and int(samples["train_00001"]["cls"]) == 1
    image = decode(samples["test_00003"])
    assert (image.size, image.mode, image.getpixel((0, 5))) == ((28, 28), "L", 35)

    code, _, stderr = run_cli(
        capsys, "fashion-mnist", tmp_path / "other", "--root", root, "--split", "train=0.8,test=0.2"
    )
    assert code == 2 and "may not name test" in stderr


def test_fashion_mnist_missing_package_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = run_cli(capsys, "fashion-mnist", tmp_path / "out", "--root", tmp_path / "nowhere")
    assert code == 2 and "install it with: apt-get install dataset-fashion-mnist" in stderr
    assert not (tmp_path / "out").exists()


def clipart_svg(title: str, keywords: list[str]) -> str:
    items = "".join(f"<rdf:li>{keyword}</rdf:li>" for keyword in keywords)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
        'xmlns:cc="http://web.resource.org/cc/" xmlns:dc="http://purl.org/dc/elements/1.1/">'
        '<metadata><rdf:RDF><cc:Work rdf:about="">'
        f"<dc:title>{title}</dc:title><dc:subject><rdf:Bag>{items}</rdf:Bag></dc:subject>"
        '<cc:license rdf:resource="http://web.resource.org/cc/PublicDomain" />'
        "</cc:Work></rdf:RDF></metadata><rect width='4' height='4'/></svg>"
    )


def fake_openclipart(root: Path) -> None:
    """/usr/share/openclipart/{png,svg}/<category>/.../<name>.{png,svg}; PNGs carry a Title text chunk."""

    def clipart_png(relative: str, title: str, colour: tuple[int, int, int, int]) -> Path:
        path = root / "png" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        info = PngImagePlugin.PngInfo()
        info.add_text("Title", title)
        Image.new("RGBA", (30, 12), colour).save(path, pnginfo=info)
        return path

    owl = clipart_png("animals/birds/owl_01.png", "Owl", (90, 60, 20, 255))
    (root / "png" / "animals" / "owl_01.png").write_bytes(owl.read_bytes())
    clipart_png("food/fruit/apple_red.png", "red apple", (200, 0, 0, 0))
    (root / "png" / "food" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for relative, title, keywords in (
        ("animals/birds/owl_01.svg", "Owl", ["bird", "night_bird", "owl", "Bird"]),
        ("food/fruit/apple_red.svg", "red apple", ["fruit", "food"]),
    ):
        (root / "svg" / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / "svg" / relative).write_text(clipart_svg(title, keywords))


def test_openclipart_captions_from_svg_keywords_and_duplicates_merged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "openclipart"
    fake_openclipart(root)
    out = tmp_path / "shards"

    code, _, stderr = run_cli(capsys, "openclipart", out, "--root", root, "--resize", 6)

    assert code == 0 and "food_broken" in stderr
    manifest = manifest_of(out)
    assert manifest["classnames"] == {"cls": ["animals", "food"]} and "public domain" in manifest["licence"]
    samples = read_samples(out)
    assert sorted(samples) == ["animals_birds_owl_01", "food_fruit_apple_red"]
    owl = samples["animals_birds_owl_01"]
    assert owl["txt"] == b"Owl: bird, night bird" and int(owl["cls"]) == 0
    assert json.loads(owl["json"])["folders"] == ["animals", "animals/birds"]
    apple = samples["food_fruit_apple_red"]
    assert apple["txt"] == b"red apple: fruit, food" and int(apple["cls"]) == 1
    assert decode(apple).size == (15, 6) and decode(apple).getpixel((0, 0)) == (255, 255, 255)

    for svg in (root / "svg").rglob("*.svg"):
        svg.unlink()
    code, _, _ = run_cli(capsys, "openclipart", tmp_path / "without-svg", "--root", root)
    assert code == 0
    captions = {key: sample["txt"] for key, sample in read_samples(tmp_path / "without-svg").items()}
    assert captions == {
        "animals_birds_owl_01": b"Owl: animals, birds",
        "food_fruit_apple_red": b"red apple: food, fruit",
    }


def test_openclipart_missing_package_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = run_cli(capsys, "openclipart", tmp_path / "out", "--root", tmp_path / "nowhere")
    assert code == 2 and "install it with: apt-get install openclipart-png openclipart-svg" in stderr


def test_inspect_finds_undecodable_samples_and_count_mismatches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "photos"
    for index in range(4):
        save_image(source / f"p{index}.png")
    out = tmp_path / "shards"
    assert run_cli(capsys, "folder", source, out, "--maxcount", 2)[0] == 0
    with tarfile.open(out / "train-000001.tar", "w") as archive:
        for name, data in (("p9.png", b"garbage"), ("p9.cls", b"not a number")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))

    code, stdout, _ = run_cli(capsys, "inspect", out)

    assert code == 1
    assert "bad samples: 2" in stdout
    assert "train-000001.tar p9: png does not decode" in stdout
    assert "train-000001.tar: its 1 keys differ from the 2 in manifest.json" in stdout


def test_built_shards_feed_the_evaluation_loader(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from data_modules.pipeline import make_eval_loader

    root = tmp_path / "fashion-mnist"
    fake_fashion_mnist(root, train=2, test=5)
    out = tmp_path / "shards"
    assert run_cli(capsys, "fashion-mnist", out, "--root", root, "--maxcount", 3)[0] == 0

    batches = list(make_eval_loader(str(out / "test-{000000..000001}.tar"), image_size=16, batch_size=4))

    assert [tuple(batch["image"].shape) for batch in batches] == [(4, 3, 16, 16), (1, 3, 16, 16)]
    labels = {key: int(label) for batch in batches for key, label in zip(batch["__key__"], batch["label"])}
    assert labels == {f"test_{index:05d}": index % 10 for index in range(5)}
    assert batches[0]["caption"][0].startswith("a photo of a ")


# ------------------------------------------------------------------------------ containment and bad input


def test_csv_refuses_empty_image_cells_and_non_utf8_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_image(tmp_path / "one.png")
    empty = tmp_path / "empty.csv"
    empty.write_text("image,caption\none.png,fine\n,no image here\n")
    code, _, err = run_cli(capsys, "csv", empty, tmp_path / "out")
    assert code == 2 and err == (f"vlp-data: error: {empty}: row 2 has an empty 'image' cell; give every row an image "
                                 "path or remove the row\n")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("image,caption\none.png,caf\xe9\n".encode("latin-1"))
    code, _, err = run_cli(capsys, "csv", latin, tmp_path / "out")
    assert code == 2 and err.startswith(f"vlp-data: error: {latin} is not UTF-8 text (invalid continuation byte")
    assert err.endswith("save it as UTF-8 and run again\n") and err.count("\n") == 1


def test_csv_keeps_images_inside_its_folder_unless_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outside = save_image(tmp_path / "outside.png")
    table = tmp_path / "data" / "table.csv"
    save_image(tmp_path / "data" / "inside.png")
    for image in ("../outside.png", str(outside)):
        table.write_text(f"image,caption\ninside.png,in\n{image},out\n")
        code, _, err = run_cli(capsys, "csv", table, tmp_path / "out")
        assert code == 2 and err == (f"vlp-data: error: {table}: row 2 names {image!r}, outside {table.parent}; keep "
                                     "the images under the table's folder (or --image-root), or pass "
                                     "--allow-outside-root\n")
    assert not (tmp_path / "out").exists()
    code, _, _ = run_cli(capsys, "csv", table, tmp_path / "out", "--allow-outside-root")
    assert code == 0 and manifest_of(tmp_path / "out")["splits"] == {"train": 2}


def test_folder_reads_no_symlink_and_skips_non_utf8_captions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "src"
    save_image(source / "plain.png")
    (source / "plain.txt").write_text("a plain caption")
    save_image(source / "linked.png")
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0")
    (source / "linked.txt").symlink_to(secret)
    save_image(source / "latin.png")
    (source / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    code, _, err = run_cli(capsys, "folder", source, tmp_path / "out")
    assert code == 0
    samples = read_samples(tmp_path / "out")
    assert sorted(samples) == ["plain"] and b"root:x" not in b"".join(s.get("txt", b"") for s in samples.values())
    skipped = manifest_of(tmp_path / "out")["skipped"]
    assert "is a symbolic link (pass --follow-symlinks" in skipped["linked"]
    assert "is not UTF-8" in skipped["latin"] and "skipped 2 images" in err
    code, _, _ = run_cli(capsys, "folder", source, tmp_path / "followed", "--follow-symlinks")
    assert read_samples(tmp_path / "followed")["linked"]["txt"] == b"root:x:0:0"


def test_rebuilding_keeps_files_vlp_data_did_not_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "src"
    for name in ("a", "b", "c"):
        save_image(source / f"{name}.png")
        (source / f"{name}.txt").write_text(f"caption {name}")
    out = tmp_path / "out"
    assert run_cli(capsys, "folder", source, out, "--maxcount", "1")[0] == 0
    (out / "notes.txt").write_text("my notes")
    assert run_cli(capsys, "folder", source, out, "--maxcount", "2", "--force")[0] == 0
    assert (out / "notes.txt").read_text() == "my notes"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "notes.txt", "train-000000.tar",
                                                     "train-000001.tar"]


def test_inspect_fails_on_a_manifest_count_that_lies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "src"
    for name in ("a", "b"):
        save_image(source / f"{name}.png")
    out = tmp_path / "out"
    assert run_cli(capsys, "folder", source, out)[0] == 0
    manifest = manifest_of(out)
    for claimed in (1000, 1):
        manifest["shards"]["train-000000.tar"]["count"] = claimed
        (out / "manifest.json").write_text(json.dumps(manifest))
        code, out_text, _ = run_cli(capsys, "inspect", out)
        assert code == 1 and f"train-000000.tar: holds 2 samples, but manifest.json lists {claimed}" in out_text
