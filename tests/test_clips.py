"""Clips: decoding (.mp4 written with PyAV here, .frames.npy), the frame samplers, clip views (one crop per clip, tube
masks), the counted skips, VideoDataModule batches and exact mid-epoch resume, and the `vlp-data` clip sources."""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data_modules import BadSampleError, ClipViews, DataConfigError, VideoDataModule
from data_modules.builder import iterate_shard
from data_modules.builder import main as vlp_data
from data_modules.clips import FrameSampler, read_clip
from data_modules.manifest import write_manifest
from data_modules.pipeline import STREAM_FIELD, make_loader
from data_modules.video import ClipDecoder

av = pytest.importorskip("av")

FPS = 8.0


def frame_stack(count: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """uint8 [count, size, size, 3] whose frame i is filled with 8 * i (so a frame's index reads off its pixels)
    plus a little noise in one corner (so crops differ)."""
    frames = np.empty((count, size, size, 3), np.uint8)
    for index in range(count):
        frames[index] = 8 * index
    frames[:, :2, :2] = np.random.default_rng(seed).integers(0, 256, (count, 2, 2, 3), dtype=np.uint8)
    return frames


def npy_bytes(frames: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, frames, allow_pickle=False)
    return buffer.getvalue()


def mp4_bytes(frames: np.ndarray, fps: int = 8) -> bytes:
    """The frames as an H.264 .mp4 (a keyframe every 4 frames, so decoding has to seek), written with PyAV."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"g": "4", "keyint_min": "4", "crf": "10"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def write_clip_shards(directory: Path, samples: list[dict[str, bytes]], per_shard: int = 4) -> str:
    """`samples` ({"__key__", member: bytes}) as `train-%06d.tar` shards plus a manifest; returns the glob."""
    from conftest import write_tar

    directory.mkdir(parents=True, exist_ok=True)
    shards = {}
    for index, first in enumerate(range(0, len(samples), per_shard)):
        chunk = samples[first : first + per_shard]
        name = f"train-{index:06d}.tar"
        write_tar(directory / name, chunk)
        shards[name] = {"split": "train", "count": len(chunk), "keys": [sample["__key__"] for sample in chunk]}
    members = sorted({name for sample in samples for name in sample if name != "__key__"})
    write_manifest(directory, {"format": 1, "source": "test clips", "licence": "CC0", "shards": shards,
                               "splits": {"train": len(samples)}, "members": members, "classnames": {}})
    return str(directory / "train-*.tar")


def clip_sample(key: str, count: int, timeline: list | None = None, caption: str = "a clip", label: int = 0,
                member: str = "frames.npy", seed: int = 0) -> dict[str, bytes]:
    frames = frame_stack(count, seed=seed)
    data = npy_bytes(frames) if member == "frames.npy" else mp4_bytes(frames)
    meta = {"fps": FPS, "timeline": timeline if timeline is not None else [], "source": "test"}
    return {"__key__": key, member: data, "txt": caption.encode(), "cls": str(label).encode(),
            "json": json.dumps(meta).encode()}


def loader(pattern: str, views: ClipViews, batch_size: int = 2, image_size: int = 16, **options):
    decoder = ClipDecoder(views.build(image_size), with_caption=True, with_label=True)
    return make_loader(pattern, decoder, batch_size, **options)


# ---------------------------------------------------------------------------------------------- decoding, sampling


def test_mp4_and_frame_stack_decode_the_asked_frames():
    frames = frame_stack(16)
    for member, data in (("frames.npy", npy_bytes(frames)), ("mp4", mp4_bytes(frames))):
        clip = read_clip({member: data})
        assert (clip.count, clip.height, clip.width) == (16, 16, 16)
        decoded = clip.frames([5, 6, 13])  # keyframes every 4 frames: decoding seeks to frame 4 first
        assert decoded.shape == (3, 16, 16, 3) and decoded.dtype == np.uint8
        # the flat part of each frame tells its index (lossy H.264 within a few levels)
        assert np.abs(decoded[:, 8:, 8:].mean((1, 2, 3)) - [40, 48, 104]).max() < 3
    assert read_clip({"mp4": mp4_bytes(frames)}).fps == 8


def test_the_pixel_limit_is_checked_before_decoding(monkeypatch):
    monkeypatch.setattr("data_modules.clips.MAX_CLIP_PIXELS", 4 * 16 * 16)  # four 16 px frames
    for member, data in (("frames.npy", npy_bytes(frame_stack(8))), ("mp4", mp4_bytes(frame_stack(8)))):
        clip = read_clip({member: data})
        assert clip.frames([0, 1, 2, 3]).shape == (4, 16, 16, 3)
        with pytest.raises(ValueError, match="5 frames of 16x16 pixels exceed the limit of 1024 pixels"):
            clip.frames([0, 1, 2, 3, 4])


def test_frame_samplers_pick_the_documented_indices():
    rng = random.Random(0)
    assert FrameSampler("uniform", 4).indices(10, rng) == [0, 3, 6, 9]
    assert FrameSampler("segments", 4).indices(16, None) == [1, 5, 9, 13]  # the middle of each quarter
    drawn = [FrameSampler("segments", 4).indices(16, rng) for _ in range(50)]
    assert all(4 * part <= index < 4 * part + 4 for draw in drawn for part, index in enumerate(draw))
    assert len({tuple(draw) for draw in drawn}) > 10  # a random frame per segment in training
    assert FrameSampler("stride", 3, (2,)).indices(11, None) == [3, 5, 7]  # centred window
    windows = [FrameSampler("stride", 3, (2, 4)).indices(11, rng) for _ in range(50)]
    assert {draw[1] - draw[0] for draw in windows} == {2, 4} and min(draw[0] for draw in windows) == 0
    assert all(draw[-1] <= 10 and draw[1] - draw[0] == draw[2] - draw[1] for draw in windows)
    with pytest.raises(ValueError, match="shorter than the 5 frames the stride sampler needs"):
        FrameSampler("stride", 3, (2,)).indices(4, rng)


def test_views_crop_every_frame_of_a_clip_alike_and_tube_mask_is_constant_over_time():
    frames = frame_stack(8, size=32)
    frames[:] = np.random.default_rng(1).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)  # every frame alike
    transform = ClipViews(num_frames=8, scale=(0.2, 0.5), mask_ratio=0.75, patch_size=4).build(16)
    clips = [transform.crop(frames, random.Random(seed)) for seed in range(6)]
    assert all((clip == clip[0]).all() for clip in clips)  # the same crop on every frame of a clip
    assert len({clip.tobytes() for clip in clips}) == 6  # and a new one per clip
    packed, recipe, masks = transform.pack(clips, seed=3)
    assert packed[0].shape == (6, 8, 16, 16, 3) and masks.shape == (6, 4, 16)
    assert (masks == masks[:, :1]).all() and (masks.sum(-1) == 12).all()  # 0.75 of the 16 patches, every tubelet
    assert len({tuple(mask[0].tolist()) for mask in masks}) > 1  # one mask per clip
    video = recipe.finish(packed)
    assert video.shape == (6, 8, 3, 16, 16) and video.dtype == torch.float32
    flipped = [row for row in range(6) if not torch.equal(packed[0][row], torch.from_numpy(clips[row]))]
    assert flipped and all(torch.equal(packed[0][row], torch.from_numpy(clips[row][:, :, ::-1].copy()))
                           for row in flipped)


# ---------------------------------------------------------------------------------------------- the pipeline


def test_clips_round_trip_through_the_data_module(tmp_path):
    timeline = [{"start": 0.0, "end": 1.0, "text": "moving left"}, {"start": 1.0, "end": 2.0, "text": "moving up"}]
    samples = [clip_sample("npy0", 16, timeline, caption="a frame stack", label=1),
               clip_sample("mp40", 16, timeline, caption="a video", label=2, member="mp4")]
    pattern = write_clip_shards(tmp_path / "clips", samples)
    views = ClipViews(num_frames=4, sampling="uniform", scale=None, hflip=False, mask_ratio=0.5, patch_size=8)
    datamodule = VideoDataModule(train_shards=pattern, batch_size=2, num_workers=0, image_size=16, views=views,
                                 shuffle_buffer=1)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["video"].shape == (2, 4, 3, 16, 16) and batch["video"].dtype == torch.float32
    by_key = {key: row for row, key in enumerate(batch["__key__"])}
    assert set(by_key) == {"npy0", "mp40"}
    expected_times = torch.tensor([0, 5, 10, 15]) / FPS  # uniform: frames 0, 5, 10, 15
    assert torch.allclose(batch["frame_times"], expected_times.expand(2, 4))
    assert batch["segments"] == [[(0, 1, "moving left"), (2, 3, "moving up")]] * 2
    assert [batch["caption"][by_key["npy0"]], batch["label"][by_key["mp40"]].item()] == ["a frame stack", 2]
    assert batch["tube_mask"].shape == (2, 2, 4) and (batch["tube_mask"].sum(-1) == 2).all()
    mean, std = torch.tensor(views.normalization).view(2, 1, 3, 1, 1)
    pixels = (batch["video"][:, :, :, 8:, 8:] * std + mean) * 255  # the flat part: 8 x the frame index
    assert torch.allclose(pixels.mean((2, 3, 4)), torch.tensor([0.0, 40, 80, 120]).expand(2, 4), atol=3)


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"mp4": b"\x00\x00\x00\x18ftypmp42 not really a video"}, "undecodable video"),
        ({"frames.npy": npy_bytes(frame_stack(3))}, "shorter than the 4 frames"),
        ({"json": json.dumps({"fps": FPS, "timeline": [{"start": 1.0, "end": 9.0, "text": "x"}]}).encode()},
         "timeline segment 0 [1.0, 9.0) s is outside the clip of 2 s"),
        ({"json": json.dumps({"fps": FPS, "timeline": [{"start": 1.0, "end": 1.0, "text": "x"}]}).encode()},
         "outside the clip"),
        ({"json": json.dumps({"fps": FPS, "timeline": [{"start": -0.5, "end": 1.0, "text": "x"}]}).encode()},
         "timeline segment 0 [-0.5, 1.0) s is outside"),
    ],
    ids=["corrupt-video", "too-short", "segment-outside", "empty-segment", "negative-start"],
)
def test_bad_clips_are_counted_with_their_reason_and_strict_mode_raises(tmp_path, caplog, bad, reason):
    samples = [clip_sample(f"clip{index}", 16) for index in range(4)]
    kept = {name: data for name, data in samples[1].items() if name != "frames.npy" or "mp4" not in bad}
    samples[1] = {**kept, **bad}  # the corrupt video replaces the frame stack, the rest replace their member
    pattern = write_clip_shards(tmp_path / "clips", samples)
    views = ClipViews(num_frames=4, hflip=False)
    batches = list(loader(pattern, views, batch_size=2, pad=False, shuffle=False))
    assert [key for batch in batches for key in batch["__key__"]] == ["clip0", "clip2", "clip3"]
    assert batches[-1][STREAM_FIELD]["skipped"] == 1
    assert any(reason in message and "clip1" in message for message in caplog.messages)
    with pytest.raises(BadSampleError, match=reason.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        list(loader(pattern, views, batch_size=2, pad=False, shuffle=False, strict=True))


def test_caption_less_clips_are_skips_unless_the_method_accepts_silent_clips(tmp_path):
    samples = [clip_sample(f"clip{index}", 16, caption=f"clip {index}") for index in range(4)]
    del samples[1]["txt"]  # no narration at all
    meta = json.loads(samples[2]["json"])
    samples[2]["json"] = json.dumps({**meta, "silent": True}).encode()  # a caption, but marked silent
    pattern = write_clip_shards(tmp_path / "clips", samples)
    views = ClipViews(num_frames=4, hflip=False)

    def keys_and_flags(silent_ok: bool) -> tuple[list, list, list]:
        decoder = ClipDecoder(views.build(16), with_caption=True, silent_ok=silent_ok)
        batches = list(make_loader(pattern, decoder, 4, pad=False, shuffle=False))
        return ([key for batch in batches for key in batch["__key__"]],
                [caption for batch in batches for caption in batch["caption"]],
                [flag for batch in batches for flag in batch.get("silent", torch.empty(0)).tolist()])

    assert keys_and_flags(False) == (["clip0", "clip2", "clip3"], ["clip 0", "clip 2", "clip 3"], [])
    assert keys_and_flags(True) == (["clip0", "clip1", "clip2", "clip3"], ["clip 0", "", "", "clip 3"],
                                    [False, True, True, False])

    class Silent:  # the data module asks the method (OphCLIP declares it)
        required_keys = ("video", "caption")
        accepts_silent_clips = True
        image_size = 16

        def train_views(self) -> ClipViews:
            return views

    class Narrated(Silent):
        accepts_silent_clips = False

    for method, count in ((Silent(), 4), (Narrated(), 3)):
        datamodule = VideoDataModule(train_shards=pattern, batch_size=4, num_workers=0, shuffle_buffer=1)
        datamodule.trainer = SimpleNamespace(lightning_module=method, global_rank=0, world_size=1)
        datamodule.setup("fit")
        assert datamodule.decoders["train"].silent_ok is method.accepts_silent_clips
        assert sum(len(batch["__key__"]) for batch in make_loader(pattern, datamodule.decoders["train"], 4,
                                                                   pad=False, shuffle=False)) == count


@pytest.mark.parametrize("num_workers", [0, 2])
def test_clip_stream_resumes_mid_epoch_exactly(tmp_path, num_workers):
    samples = [clip_sample(f"clip{index:02d}", 12, seed=index, member="mp4" if index % 5 == 0 else "frames.npy")
               for index in range(14)]
    pattern = write_clip_shards(tmp_path / "clips", samples, per_shard=5)
    views = ClipViews(num_frames=4, sampling="stride", strides=(1, 2), scale=(0.3, 1.0), mask_ratio=0.5,
                      patch_size=8)

    def fresh() -> VideoDataModule:
        datamodule = VideoDataModule(train_shards=pattern, batch_size=2, num_workers=num_workers, image_size=16,
                                     views=views, shuffle_buffer=3)
        datamodule.setup("fit")
        return datamodule

    reference = list(fresh().train_dataloader())
    datamodule = fresh()
    head = []
    for batch in datamodule.train_dataloader():
        head.append(datamodule.on_before_batch_transfer(batch, 0))
        if len(head) == 3:
            break
    resumed = fresh()
    resumed.load_state_dict(datamodule.state_dict())
    tail = list(resumed.train_dataloader())
    assert len(head) + len(tail) == len(reference) == 7
    for expected, got in zip(reference, head + tail):
        assert expected["__key__"] == got["__key__"] and expected["segments"] == got["segments"]
        for field in ("video", "frame_times", "tube_mask"):
            assert torch.equal(expected[field], got[field]), field


def test_the_method_declares_the_clip_views_and_the_trainer_finishes_them_on_its_device(tmp_path):
    pattern = write_clip_shards(tmp_path / "clips", [clip_sample(f"c{index}", 8) for index in range(4)])

    class VideoMAE:
        required_keys = ("video",)
        image_size = 16

        def train_views(self) -> ClipViews:
            return ClipViews(num_frames=4, mask_ratio=0.9, patch_size=4)

    datamodule = VideoDataModule(train_shards=pattern, batch_size=2, num_workers=0)
    datamodule.trainer = SimpleNamespace(lightning_module=VideoMAE(), global_rank=0, world_size=1, current_epoch=0,
                                         training=True, loggers=[])
    datamodule.setup("fit")
    batch = datamodule.on_before_batch_transfer(next(iter(datamodule.train_dataloader())), 0)
    assert [(tuple(video.shape), video.dtype) for video in batch["video"]] == [((2, 4, 16, 16, 3), torch.uint8)]
    batch = datamodule.on_after_batch_transfer(batch, 0)
    assert batch["video"].shape == (2, 4, 3, 16, 16) and batch["video"].dtype == torch.float32
    assert batch["tube_mask"].shape == (2, 2, 16) and (batch["tube_mask"].sum(-1) == 14).all()  # round(0.9 x 16)


def test_video_data_module_names_what_the_method_needs(tmp_path):
    pattern = write_clip_shards(tmp_path / "clips", [{"__key__": "a", "frames.npy": npy_bytes(frame_stack(8))}])

    class Classifier:
        required_keys = ("video", "label")
        image_size = 16

        def train_views(self) -> ClipViews:
            return ClipViews(num_frames=4)

    datamodule = VideoDataModule(train_shards=pattern, num_workers=0)
    datamodule.trainer = SimpleNamespace(lightning_module=Classifier(), global_rank=0, world_size=1)
    with pytest.raises(DataConfigError, match="Classifier needs `label` but train_shards=.* has no .cls members"):
        datamodule.setup("fit")


# ---------------------------------------------------------------------------------------------- vlp-data


def test_vlp_data_moving_is_deterministic_and_captions_follow_the_motion(make_shards, tmp_path, capsys):
    images = make_shards(tmp_path / "shapes", n=6, per_shard=6, image_size=24)
    outputs = []
    for name in ("a", "b"):
        assert vlp_data(["moving", str(tmp_path / name), "--images", str(images.directory / "train-*.tar"),
                         "--source", "images", "--count", "6", "--frames", "12", "--size", "32", "--seed", "3"]) == 0
        outputs.append(b"".join(path.read_bytes() for path in sorted((tmp_path / name).glob("*.tar"))))
    assert outputs[0] == outputs[1]
    for key, sample in iterate_shard(next((tmp_path / "a").glob("train-*.tar"))):
        meta = json.loads(sample["json"])
        frames = np.load(io.BytesIO(sample["frames.npy"]), allow_pickle=False)
        assert frames.shape == (12, 32, 32, 3) and meta["fps"] > 0
        legs = meta["legs"]
        caption = sample["txt"].decode()
        assert caption.endswith("moving " + ", then ".join(leg["direction"] for leg in legs))
        assert [segment["text"] for segment in meta["timeline"]] == [f"moving {leg['direction']}" for leg in legs]
        for leg, segment in zip(legs, meta["timeline"]):  # the object's centre moves the way the caption says
            first, last = round(segment["start"] * meta["fps"]), round(segment["end"] * meta["fps"]) - 1
            (x0, y0), (x1, y1) = meta["centres"][first], meta["centres"][last]
            dx, dy = leg["step"]
            assert np.sign(x1 - x0) == np.sign(dx) and np.sign(y1 - y0) == np.sign(dy)
    capsys.readouterr()
    assert vlp_data(["inspect", str(tmp_path / "a")]) == 0
    shown = capsys.readouterr().out
    assert "12 frames 32x32 at" in shown and "s: moving " in shown


def test_vlp_data_moving_from_fashion_mnist_names_the_garment(tmp_path):
    import gzip

    images = np.zeros((3, 28, 28), np.uint8)
    images[:, 6:22, 9:19] = 200  # a bright garment-sized block on black
    labels = np.array([1, 8, 1], np.uint8)  # trouser, bag, trouser
    header = lambda data: bytes([0, 0, 8, data.ndim]) + b"".join(  # noqa: E731
        int(size).to_bytes(4, "big") for size in data.shape)
    for name, data in (("train-images-idx3-ubyte.gz", images), ("train-labels-idx1-ubyte.gz", labels)):
        (tmp_path / name).write_bytes(gzip.compress(header(data) + data.tobytes()))
    assert vlp_data(["moving", str(tmp_path / "out"), "--source", "fashion-mnist", "--root", str(tmp_path),
                     "--count", "4", "--frames", "8", "--size", "32"]) == 0
    for _, sample in iterate_shard(tmp_path / "out" / "train-000000.tar"):
        meta = json.loads(sample["json"])
        assert meta["object"] in ("trouser", "bag") and meta["object_label"] == {"trouser": 1, "bag": 8}[meta["object"]]
        assert sample["txt"].decode().startswith(f"a {meta['object']} moving ")
        frames = np.load(io.BytesIO(sample["frames.npy"]), allow_pickle=False)
        assert (frames.max((1, 2, 3)) >= 150).all()  # the garment is in every frame


def test_vlp_data_videos_from_a_csv_keeps_the_bytes_and_skips_undecodable_files(tmp_path, capsys):
    folder = tmp_path / "videos"
    folder.mkdir()
    video = mp4_bytes(frame_stack(10))
    (folder / "walk.mp4").write_bytes(video)
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    with open(folder / "clips.csv", "w", newline="") as table:
        writer = csv.writer(table)
        writer.writerow(["path", "caption", "label", "timeline"])
        writer.writerow(["walk.mp4", "a grey square fading in", "walking",
                         json.dumps([{"start": 0, "end": 0.5, "text": "dark"}])])
        writer.writerow(["broken.mp4", "nothing", "walking", ""])
    assert vlp_data(["videos", str(tmp_path / "out"), "--csv", str(folder / "clips.csv")]) == 0
    assert "broken" in capsys.readouterr().err
    samples = dict(iterate_shard(tmp_path / "out" / "train-000000.tar"))
    assert list(samples) == ["walk"] and samples["walk"]["mp4"] == video
    assert json.loads(samples["walk"]["json"])["timeline"] == [{"start": 0, "end": 0.5, "text": "dark"}]
    assert samples["walk"]["txt"] == b"a grey square fading in" and samples["walk"]["cls"] == b"0"
    assert vlp_data(["inspect", str(tmp_path / "out")]) == 0
    shown = capsys.readouterr().out
    assert "10 frames 16x16 at 8 fps" in shown and "0-0.5 s: dark" in shown
    assert vlp_data(["videos", str(tmp_path / "out2"), "--csv", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err
