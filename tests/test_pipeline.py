"""The streaming pipeline: sample-exact epochs across ranks and workers, ordering, resampling, exact resume,
bad / malicious data, strict mode, evaluation loader."""

from __future__ import annotations

import io
import json
import pickle
import random
import re
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_modules.manifest import count_samples, shard_counts
from data_modules.pipeline import (
    STREAM_FIELD,
    BadSampleError,
    Handover,
    ResumePoint,
    SampleDecoder,
    decode_image,
    expand_shards,
    make_eval_loader,
    make_loader,
    resolve_counts,
    tar_entries,
)
from data_modules.views import EvalView, SingleCrop
from vlp_lightning.modules.tokenizers import ByteTokenizer


def decoder(with_caption: bool = True, with_label: bool = True) -> SampleDecoder:
    return SampleDecoder(SingleCrop().build(16), with_caption=with_caption, with_label=with_label)


def epoch_keys(shards, *, world_size: int = 1, num_workers: int = 0, passes: int = 1, **options) -> list[list[list[str]]]:
    """keys[rank][batch] of the last of `passes` passes of every rank."""
    per_rank = []
    for rank in range(world_size):
        loader = make_loader(shards, decoder(), 5, rank=rank, world_size=world_size, num_workers=num_workers, **options)
        for _ in range(passes):
            batches = [batch["__key__"] for batch in loader]
        assert len(batches) == len(loader)
        per_rank.append(batches)
    return per_rank


def flat(per_rank: list[list[list[str]]]) -> list[str]:
    return [key for batches in per_rank for batch in batches for key in batch]


def test_shard_patterns(make_shards, tmp_path):
    shards = make_shards(tmp_path, n=30, per_shard=10)
    assert expand_shards(shards.pattern) == shards.urls
    assert expand_shards(str(tmp_path / "train-*.tar")) == shards.urls
    assert expand_shards(f"{shards.urls[0]}::{shards.urls[2]}") == [shards.urls[0], shards.urls[2]]
    assert expand_shards("pipe:cat /x/a-{0..1}.tar") == ["pipe:cat /x/a-0.tar", "pipe:cat /x/a-1.tar"]
    assert shard_counts(shards.urls) == [10, 10, 10] and count_samples(shards.urls) == 30


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_sample_exactly_once_per_epoch_on_two_ranks(make_shards, tmp_path, num_workers):
    shards = make_shards(tmp_path, n=40, per_shard=10)
    per_rank = epoch_keys(shards.pattern, world_size=2, num_workers=num_workers)
    assert [len(batches) for batches in per_rank] == [4, 4]
    keys = flat(per_rank)
    assert sorted(keys) == sorted(shards.keys)  # all 40, none twice


def test_uneven_shards_give_equal_batches_and_pad_by_repetition(make_shards, tmp_path):
    shards = make_shards(tmp_path, n=43, per_shard=7, manifest=False)  # counts come from the tar headers
    assert resolve_counts(shards.urls) == [7, 7, 7, 7, 7, 7, 1]
    per_rank = epoch_keys(shards.pattern, world_size=2, num_workers=2)
    assert [len(batches) for batches in per_rank] == [5, 5]  # ceil(43 / 10)
    counts = Counter(flat(per_rank))
    assert set(counts) == set(shards.keys)
    assert sum(counts.values()) - len(shards.keys) == 50 - 43  # only the padding repeats


def test_order_changes_with_epoch_and_seed_but_not_with_rerun(make_shards, tmp_path):
    shards = make_shards(tmp_path, n=40, per_shard=10)
    first = epoch_keys(shards.pattern, num_workers=0)
    assert epoch_keys(shards.pattern, num_workers=0) == first
    second_epoch = epoch_keys(shards.pattern, num_workers=0, passes=2)
    assert second_epoch != first and sorted(flat(second_epoch)) == sorted(flat(first))
    assert epoch_keys(shards.pattern, num_workers=0, seed=1) != first


def test_images_are_a_function_of_seed_epoch_and_position(make_shards, tmp_path):
    shards = make_shards(tmp_path, n=20, per_shard=10)
    runs = [[batch["image"] for batch in make_loader(shards.pattern, decoder(), 5)] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_resampled_draws_whole_shards_with_replacement(make_shards, tmp_path):
    shards = make_shards(tmp_path, n=40, per_shard=10)
    per_rank = epoch_keys(shards.pattern, world_size=2, resampled=True, shuffle_buffer=1)
    assert [len(batches) for batches in per_rank] == [4, 4]
    keys = flat(per_rank)
    assert set(keys) <= set(shards.keys)
    # Shards are read whole and the buffer of 1 keeps file order, so each run of 10 is one shard: drawn with
    # replacement, 4 draws of 4 shards repeat one with probability 1 - 4!/4^4 (fixed here by the seed).
    runs = [tuple(keys[i : i + 10]) for i in range(0, 40, 10)]
    assert all(run in {tuple(shards.keys[i : i + 10]) for i in range(0, 40, 10)} for run in runs)
    assert len(set(runs)) < 4
    assert epoch_keys(shards.pattern, world_size=2, resampled=True, shuffle_buffer=1) == per_rank


def consume(loader, count: int | None = None) -> tuple[list[dict], ResumePoint]:
    """Take `count` batches (all when None) and the resume point after them, as a DataModule records it."""
    batches, workers, epoch = [], {}, None
    for batch in loader:
        info = batch.pop(STREAM_FIELD)
        epoch = info["epoch"]
        workers[info["worker"]] = (info["position"], info["skipped"])
        batches.append(batch)
        if len(batches) == count:
            break
    return batches, ResumePoint(epoch, len(batches), workers)


def replace_member(shard: str, name: str, data: bytes) -> None:
    """Rewrite `shard` with member `name` holding `data` (same samples, same count)."""
    with tarfile.open(shard) as tar:
        members = [(member.name, tar.extractfile(member).read()) for member in tar]
    with tarfile.open(shard, "w") as tar:
        for member_name, member_data in members:
            member_data = data if member_name == name else member_data
            info = tarfile.TarInfo(member_name)
            info.size = len(member_data)
            tar.addfile(info, io.BytesIO(member_data))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_equals_uninterrupted(make_shards, tmp_path, num_workers):
    shards = make_shards(tmp_path, n=60, per_shard=13)
    # bad data inside the epoch: the resumed run must skip exactly what the uninterrupted one skips
    replace_member(shards.urls[1], f"{shards.keys[15]}.png", b"not a png")
    Path(shards.urls[2]).write_bytes(Path(shards.urls[2]).read_bytes()[:-3000])  # truncated shard
    make = lambda: make_loader(shards.pattern, decoder(), 4, num_workers=num_workers, shuffle_buffer=7)  # noqa: E731
    reference, end = consume(make())  # epoch 0, uninterrupted
    assert sum(skipped for _, skipped in end.workers.values()) == 2  # the bad image and the truncated shard
    for stop in (1, 5, 10):
        head, point = consume(make(), stop)
        resumed_loader = make()
        resumed_loader.resume_from(point)
        tail, _ = consume(resumed_loader)
        assert len(head) + len(tail) == len(reference) == 15
        assert shards.keys[15] not in {key for batch in reference for key in batch["__key__"]}
        for expected, got in zip(reference, head + tail):
            assert expected["__key__"] == got["__key__"]
            assert torch.equal(expected["image"], got["image"])


def test_resume_applies_to_its_epoch_only(make_shards, tmp_path):
    shards = make_shards(tmp_path, n=40, per_shard=10)
    loader = make_loader(shards.pattern, decoder(), 5)
    _, point = consume(loader, 3)
    epoch_1 = [batch["__key__"] for batch in loader]  # no resume: the next pass is epoch 1, whole
    resumed = make_loader(shards.pattern, decoder(), 5)
    resumed.resume_from(point)
    assert len(list(resumed)) == 8 - 3
    assert [batch["__key__"] for batch in resumed] == epoch_1


class _CreatesFileWhenUnpickled:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_bad_and_malicious_members_are_skipped_and_never_unpickled(make_shards, tmp_path, write_tar):
    shards = make_shards(tmp_path / "good", n=6, per_shard=6)
    good = tarfile.open(shards.urls[0])
    good_png = good.extractfile(f"{shards.keys[0]}.png").read()
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_CreatesFileWhenUnpickled(marker))
    pickle.loads(payload)  # the payload works ...
    assert marker.exists()
    marker.unlink()  # ... so it must not work again below
    samples = [
        {"__key__": "ok1", "png": good_png, "txt": b"fine", "cls": b"0"},
        {"__key__": "evil", "png": good_png, "txt": b"fine", "cls": b"1", "pyd": payload, "pth": payload,
         "pickle": payload},
        {"__key__": "garbage", "png": b"\x89PNG but not really", "txt": b"broken", "cls": b"1"},
        {"__key__": "nocaption", "png": good_png, "cls": b"2"},
        {"__key__": "badlabel", "png": good_png, "txt": b"x", "cls": b"three"},
        {"__key__": "noimage", "txt": b"no image", "cls": b"0"},
        {"__key__": "ok2", "png": good_png, "txt": b"fine", "cls": b"3"},
    ]
    bad = write_tar(tmp_path / "bad-000000.tar", samples)
    truncated = tmp_path / "bad-000001.tar"
    truncated.write_bytes(Path(shards.urls[0]).read_bytes()[:2500])
    loader = make_eval_loader(f"{bad}::{truncated}", image_size=16, batch_size=4)
    batches = list(loader)
    keys = [key for batch in batches for key in batch["__key__"]]
    assert keys[:3] == ["ok1", "evil", "ok2"]  # then whatever the truncated shard held before the cut
    assert set(keys[3:]) <= set(shards.keys) and len(keys) < 3 + 6
    assert not marker.exists()
    stream = make_loader(f"{bad}::{truncated}", decoder(), 20, shuffle=False, pad=False)
    (batch,) = list(stream)
    # four bad samples; the truncated shard has no manifest, so counting its headers already stopped at the cut
    assert batch[STREAM_FIELD]["skipped"] == 4
    assert not marker.exists()


def _encoded(image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def test_decoders_agree_with_pil_flatten_alpha_and_refuse_bombs_and_other_formats():
    from PIL import Image

    pixels = torch.randint(0, 256, (21, 34, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy()
    image = Image.fromarray(pixels)
    reference = lambda data: np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # noqa: E731
    for data in (_encoded(image, "PNG"), _encoded(image.convert("L"), "PNG"), _encoded(image.convert("P"), "PNG"),
                 _encoded(image, "WEBP", lossless=True)):
        assert np.array_equal(decode_image(data), reference(data))
    # 16-bit PNGs keep their high byte (PIL would clip every value above 255 to white)
    deep = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
    assert np.array_equal(decode_image(_encoded(deep, "PNG")), np.repeat(pixels[..., :1], 3, axis=2))
    jpeg = _encoded(image, "JPEG", quality=95)
    assert np.abs(decode_image(jpeg).astype(int) - reference(jpeg)).max() <= 1  # both libjpeg-turbo
    # transparency is flattened onto white: alpha channel, and a palette colour made transparent by tRNS
    rgba = np.concatenate([pixels, np.full((21, 34, 1), 255, np.uint8)], axis=2)
    rgba[0, 0, 3] = 0
    assert decode_image(_encoded(Image.fromarray(rgba), "PNG"))[0, 0].tolist() == [255, 255, 255]
    palette = Image.fromarray(pixels).convert("P")
    assert decode_image(_encoded(palette, "PNG", transparency=palette.getpixel((0, 0))))[0, 0].tolist() == [255] * 3
    # a header claiming 10^10 pixels is refused before any decoding (PNG and JPEG)
    ihdr = struct.pack(">II5B", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    with pytest.raises(Image.DecompressionBombError, match="100000x100000"):
        decode_image(bomb)
    frame = jpeg.index(b"\xff\xc0")
    with pytest.raises(Image.DecompressionBombError, match="65535x65535"):
        decode_image(jpeg[: frame + 5] + b"\xff\xff\xff\xff" + jpeg[frame + 9 :])
    # ... also when a length-less RST marker and comment segments try to hide the real frame header behind a fake
    huge = jpeg[: frame + 5] + struct.pack(">HH", 20_000, 20_000) + jpeg[frame + 9 :]
    fake_frame = b"\xff\xc0\x00\x11\x08" + struct.pack(">HH", 16, 16) + b"\x03" + bytes(9)
    first = b"\xff\xfe" + struct.pack(">H", 60_000) + bytes(59_998)
    second = bytearray(65_533)
    second[65_538 - (4 + len(first) + 4) :][: len(fake_frame)] = fake_frame  # where a walk skipping 2 bytes lands
    hidden = b"\xff\xd8\xff\xd0" + first + b"\xff\xfe\xff\xff" + bytes(second) + huge[2:]
    with pytest.raises(Image.DecompressionBombError, match="20000x20000"):
        decode_image(hidden)
    # a tRNS chunk after another chunk whose text happens to contain "IDAT" still counts
    text = struct.pack(">I", 9) + b"tEXt" + b"note\x00IDAT"
    text += struct.pack(">I", zlib.crc32(b"tEXt" + b"note\x00IDAT"))
    transparent = _encoded(palette, "PNG", transparency=palette.getpixel((0, 0)))
    assert decode_image(transparent[:33] + text + transparent[33:])[0, 0].tolist() == [255] * 3
    for data in (_encoded(image, "GIF"), _encoded(image, "BMP"), _encoded(image, "PNG")[:300], jpeg[: len(jpeg) // 2]):
        with pytest.raises(Exception):
            decode_image(data)


def test_handover_slots_are_never_overwritten_before_release():
    images = [torch.arange(2 * 4 * 4 * 3, dtype=torch.uint8).view(2, 1, 4, 4, 3)]

    def batch(value: int) -> dict:
        return {"image": [images[0] + value], "label": torch.tensor([value, value]), "__key__": ["a", "b"]}

    handover = Handover(num_workers=1, slots=2, slot_bytes=images[0].numel())
    first, second = handover.pack(0, batch(1)), handover.pack(0, batch(2))
    assert isinstance(first["label"], np.ndarray)  # small tensors travel inside the pickled batch
    third = handover.pack(0, batch(3))  # the slot of `first`, not yet released: PyTorch's own handover instead
    assert isinstance(third["image"], list)
    for sent, value in ((first, 1), (second, 2), (third, 3)):
        received = handover.unpack(pickle.loads(pickle.dumps(sent)))
        assert torch.equal(received["image"][0], images[0] + value) and received["label"].tolist() == [value] * 2
    fourth = handover.pack(0, batch(4))  # released by now: through the slot again
    assert not isinstance(fourth["image"], list) and torch.equal(handover.unpack(fourth)["image"][0], images[0] + 4)
    too_big = {"image": [torch.zeros(3, 1, 4, 4, 3, dtype=torch.uint8)], "__key__": ["a", "b", "c"]}
    assert isinstance(handover.pack(0, too_big)["image"], list)


def test_strict_mode_names_shard_and_key(tmp_path, write_tar, make_shards):
    # (in-process: PyTorch re-raises a worker's exception unchanged, but then spends 5 s shutting that worker down)
    shards = make_shards(tmp_path, n=4, per_shard=4)
    bad = write_tar(tmp_path / "bad-000000.tar", [{"__key__": "garbage", "png": b"nope", "txt": b"x", "cls": b"0"}])
    loader = make_loader(f"{shards.urls[0]}::{bad}", decoder(), 2, strict=True)
    with pytest.raises(BadSampleError, match=rf"bad sample 'garbage' in shard {bad}: undecodable image"):
        list(loader)


def test_eval_loader_every_sample_once_in_order(make_shards, tmp_path):
    shards = make_shards(tmp_path, n=23, per_shard=6)
    tokenizer = ByteTokenizer(context_length=24)
    batches = list(make_eval_loader(shards.pattern, image_size=16, batch_size=5, tokenizer=tokenizer))
    assert [len(batch["__key__"]) for batch in batches] == [5, 5, 5, 5, 3]
    assert [key for batch in batches for key in batch["__key__"]] == shards.keys
    first = batches[0]
    assert first["image"].shape == (5, 3, 16, 16) and STREAM_FIELD not in first
    assert first["caption"] == [shards.captions[key] for key in first["__key__"]]
    assert first["label"].tolist() == [shards.labels[key] for key in first["__key__"]]
    assert torch.equal(first["text"]["input_ids"], tokenizer(first["caption"])["input_ids"])
    again = list(make_eval_loader(shards.pattern, image_size=16, batch_size=5, num_workers=2))
    assert sorted(key for batch in again for key in batch["__key__"]) == sorted(shards.keys)
    by_key = {key: image for batch in again for key, image in zip(batch["__key__"], batch["image"])}
    assert all(torch.equal(by_key[key], image) for key, image in zip(first["__key__"], first["image"]))


def test_eval_view_of_the_loader_is_the_reference_transform(make_shards, tmp_path):
    from PIL import Image

    shards = make_shards(tmp_path, n=3, per_shard=3, image_size=20)
    (batch,) = list(make_eval_loader(shards.pattern, image_size=12, batch_size=3))
    png = tarfile.open(shards.urls[0]).extractfile(f"{shards.keys[0]}.png").read()
    expected = EvalView().build(12)(Image.open(io.BytesIO(png)))
    assert torch.allclose(batch["image"][0], expected)


def test_pipe_urls_and_json_meta(make_shards, tmp_path):
    shards = make_shards(tmp_path, n=8, per_shard=4, with_json=True)
    urls = "::".join(f"pipe:cat {url}" for url in shards.urls)
    batches = list(make_eval_loader(urls, image_size=16, batch_size=8))
    assert batches[0]["__key__"] == shards.keys
    assert [meta["index"] for meta in batches[0]["meta"]] == list(range(8))


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_tarfile(tmp_path, tar_format):
    path = tmp_path / "archive.tar"
    files = {"a/b.txt": b"x" * 700, "deep/" * 30 + "long.png": b"\x89PNG", "empty.cls": b"", "z\u00e9.json": b"{}"}
    with tarfile.open(path, "w", format=tar_format) as tar:
        tar.addfile(tarfile.TarInfo("a"))  # a directory-less entry of size 0
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as stream:
        entries = [(name, read()) for name, read in tar_entries(stream) if name != "a"]
    assert entries == list(files.items())
    with open(path, "rb") as stream:  # names only: data skipped by seeking
        assert [name for name, _ in tar_entries(stream)] == ["a", *files]
    broken = bytearray(path.read_bytes())
    broken[600] ^= 0xFF  # inside the second header
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(tar_entries(io.BytesIO(bytes(broken))))


# ------------------------------------------------------------------------------ broken shards, lying manifests

def _set_manifest_count(shards, shard_index: int, count: int) -> None:
    path = shards.directory / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][Path(shards.urls[shard_index]).name]["count"] = count
    path.write_text(json.dumps(manifest))


def _one_pass(urls: list[str], batch_size: int, **options) -> tuple[list[str], int]:
    """(keys, skipped) of one unshuffled pass, every position once (no padding)."""
    keys, skipped = [], 0
    for batch in make_loader(urls, decoder(), batch_size, shuffle=False, pad=False, **options):
        keys += batch["__key__"]
        skipped = batch[STREAM_FIELD]["skipped"]
    return keys, skipped


def test_a_truncated_shard_counts_every_sample_it_lost(make_shards, tmp_path, caplog):
    shards = make_shards(tmp_path, n=32, per_shard=16)
    data = Path(shards.urls[1]).read_bytes()
    Path(shards.urls[1]).write_bytes(data[: len(data) // 2])
    keys, skipped = _one_pass(shards.urls, 32)
    assert keys[:16] == shards.keys[:16] and keys[16:] == shards.keys[16 : len(keys)]
    assert 0 < len(keys) - 16 < 16 and skipped == 32 - len(keys)  # the sample cut in two and every one after it
    assert re.search(rf"shard {re.escape(shards.urls[1])} ended after \d+ of its 16 samples", caplog.text)


def test_an_empty_shard_is_not_believed_and_its_samples_are_reported_missing(make_shards, tmp_path, caplog):
    shards = make_shards(tmp_path, n=32, per_shard=16)
    Path(shards.urls[1]).write_bytes(b"")
    assert resolve_counts(shards.urls) == [16, 0]
    assert (f"shard {shards.urls[1]} cannot hold the 16 samples manifest.json lists (0 bytes); it holds 0: 16"
            in caplog.text)
    loader = make_loader(shards.urls, decoder(), 8, counts=resolve_counts(shards.urls))
    keys = [key for batch in loader for key in batch["__key__"]]
    assert len(loader) == 2 and sorted(keys) == sorted(shards.keys[:16])  # no epoch padded with 16 repeats


@pytest.mark.parametrize("claimed", [1000, 2])
def test_a_manifest_count_that_differs_from_the_shard_is_reported_and_counted(make_shards, tmp_path, caplog,
                                                                              claimed):
    shards = make_shards(tmp_path, n=16, per_shard=16)
    _set_manifest_count(shards, 0, claimed)
    counts = resolve_counts(shards.urls)
    keys, skipped = _one_pass(shards.urls, 8, counts=counts)
    if claimed == 1000:  # more than the file can hold: counted from the tar, a 2-step epoch, not 129
        assert counts == [16] and sorted(keys) == sorted(shards.keys) and skipped == 0
        assert "cannot hold the 1000 samples manifest.json lists" in caplog.text
    else:  # 2 listed, 16 held: 2 read, the other 14 counted once
        assert counts == [2] and keys == shards.keys[:2] and skipped == 14
        assert caplog.text.count(f"shard {shards.urls[0]} holds 14 samples more than the 2 manifest.json lists") == 1


def test_link_members_are_never_followed_and_their_samples_are_counted(make_shards, tmp_path, caplog):
    shards = make_shards(tmp_path / "good", n=3, per_shard=3)
    with tarfile.open(shards.urls[0]) as tar:
        members = [(member.name, tar.extractfile(member).read()) for member in tar]
    linked = tmp_path / "linked-000000.tar"
    with tarfile.open(linked, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if name.startswith(shards.keys[1]) or name.startswith(shards.keys[2]):
                info.type = tarfile.SYMTYPE if name.startswith(shards.keys[1]) else tarfile.LNKTYPE
                info.linkname = "/etc/passwd" if info.type == tarfile.SYMTYPE else members[0][0]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert resolve_counts([str(linked)]) == [3]
    keys, skipped = _one_pass([str(linked)], 3, counts=[3])
    assert keys == shards.keys[:1] and skipped == 2
    assert "is a link or special file, not read" in caplog.text


def test_an_epoch_padded_by_repetition_says_how_much(make_shards, tmp_path, caplog):
    shards = make_shards(tmp_path, n=20, per_shard=10)
    loader = make_loader(shards.urls, decoder(), 8)
    assert len(loader) == 3
    assert "the epoch takes 24 samples (3 batches of 8 on 1 ranks) from 20 in the shards: 4 are repeated" in caplog.text


def test_labels_outside_the_manifest_classes_are_skipped(make_shards, tmp_path, write_tar):
    shards = make_shards(tmp_path, n=4, per_shard=4, num_classes=4)
    with tarfile.open(shards.urls[0]) as tar:
        png = tar.extractfile(f"{shards.keys[0]}.png").read()
    bad = write_tar(tmp_path / "train-000001.tar", [
        {"__key__": "negative", "png": png, "txt": b"x", "cls": b"-1"},
        {"__key__": "huge", "png": png, "txt": b"x", "cls": b"99999"},
        {"__key__": "fine", "png": png, "txt": b"x", "cls": b"3"},
    ])
    batches = list(make_eval_loader(f"{shards.urls[0]}::{bad}", image_size=16, batch_size=8))
    assert [key for batch in batches for key in batch["__key__"]] == [*shards.keys, "fine"]
    lenient = SampleDecoder(SingleCrop().build(16), with_label=True, num_classes=None)
    with pytest.raises(Exception, match="label -1"):
        lenient.decode({"__key__": "negative", "png": png, "cls": b"-1"}, random.Random(0))


def test_a_png_header_smaller_than_its_data_is_refused():
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = bytearray(_encoded(Image.fromarray(noise), "PNG"))
    data[16:24] = struct.pack(">II", 1, 1)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    with pytest.raises(ValueError, match=r"too large for its 1x1 header"):
        decode_image(bytes(data))
    assert decode_image(_encoded(Image.fromarray(noise), "PNG")).shape == (32, 32, 3)
