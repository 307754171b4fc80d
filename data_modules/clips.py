"""Clips: the video member of a sample decoded to uint8 frames, the frames a sampler picks, and the clip's timeline.

A clip sample holds one of two member kinds:

- `<key>.mp4` / `<key>.webm`: a real video, decoded with PyAV (the `video` extra). Its packets are read first
  (no pixel decoded) to count the frames and find the keyframes; decoding then seeks to the last keyframe before
  the first wanted frame and converts to RGB only the wanted frames, stopping after the last one;
- `<key>.frames.npy`: a generated frame stack, uint8 `[T, H, W, 3]`. The header is parsed as `numpy.load(...,
  allow_pickle=False)` parses it (uint8 only: nothing can unpickle) and only the wanted frames are copied out.

`<key>.json` may hold `{"fps": float, "timeline": [{"start": s, "end": s, "text": str}, ...]}`: frame i is at time
i / fps and a segment covers the frames with start <= t < end; a video takes its fps from the container when the
json lacks it. Before any pixel is decoded, the sampled pixels (frames x height x width) are refused above the image
pipeline's limit (twice PIL's decompression-bomb limit, `pipeline.decode_image`). A clip that does not decode, is
shorter than its sampler needs, or has a timeline segment outside it raises `ClipError`; the pipeline counts the
sample as skipped with that message (`data_modules.video`).

Samplers (`FrameSampler`): `uniform` (T frames evenly over the clip), `segments` (TSN, Wang et al. 2016, sec. 3.1:
T equal segments, a random frame of each in training, the middle one otherwise), `stride` (T consecutive frames
a stride apart, a random start in training and the centred window otherwise; the stride drawn from the `strides`
that fit the clip in training, the first of them otherwise).
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

VIDEO_MEMBERS = ("mp4", "webm")
FRAMES_MEMBER = "frames.npy"
#: the member kinds of a clip, one per sample.
CLIP_MEMBERS = (*VIDEO_MEMBERS, FRAMES_MEMBER)
#: decoded pixels one clip may take: the image pipeline's limit (twice PIL's decompression-bomb limit).
MAX_CLIP_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
SAMPLINGS = ("uniform", "segments", "stride")


class ClipError(ValueError):
    """A clip that cannot be used (undecodable, too short, a timeline outside it); the message says why."""


@dataclass(frozen=True)
class FrameSampler:
    """Which `num_frames` frames of a clip a sample takes (module doc); `rng=None` draws nothing (evaluation)."""

    kind: Literal["uniform", "segments", "stride"] = "segments"
    num_frames: int = 8
    strides: tuple[int, ...] = (1,)

    def __post_init__(self) -> None:
        if self.kind not in SAMPLINGS:
            raise ValueError(f"frame sampling {self.kind!r} is not one of {SAMPLINGS}")
        if self.num_frames < 1 or not self.strides or min(self.strides) < 1:
            raise ValueError(f"num_frames ({self.num_frames}) and strides ({self.strides}) must be positive")

    def frames_needed(self) -> int:
        """The shortest clip this sampler can take its frames from."""
        return (self.num_frames - 1) * min(self.strides) + 1 if self.kind == "stride" else self.num_frames

    def indices(self, count: int, rng: random.Random | None) -> list[int]:
        """`num_frames` frame indices into a clip of `count` frames, in time order."""
        if count < self.frames_needed():
            raise ClipError(f"clip of {count} frames is shorter than the {self.frames_needed()} frames the "
                            f"{self.kind} sampler needs")
        frames = self.num_frames
        if self.kind == "uniform":
            return np.linspace(0, count - 1, frames).round().astype(int).tolist()
        if self.kind == "segments":
            bounds = [index * count // frames for index in range(frames + 1)]
            return [rng.randrange(start, end) if rng is not None else (start + end - 1) // 2
                    for start, end in zip(bounds, bounds[1:])]
        fitting = [stride for stride in self.strides if (frames - 1) * stride < count]
        stride = rng.choice(fitting) if rng is not None else fitting[0]
        slack = count - (frames - 1) * stride - 1
        start = rng.randint(0, slack) if rng is not None else slack // 2
        return list(range(start, start + frames * stride, stride))


class FrameStack:
    """A `.frames.npy` member: uint8 [T, H, W, 3], frames copied out only when asked for."""

    fps = None  # a frame stack has no container to tell it; the .json must

    def __init__(self, data: bytes) -> None:
        stream = io.BytesIO(data)
        try:
            version = np.lib.format.read_magic(stream)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else (
                np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = read_header(stream)
        except (ValueError, EOFError) as error:
            raise ClipError(f"undecodable .{FRAMES_MEMBER}: {error}") from error
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran_order:
            raise ClipError(f".{FRAMES_MEMBER} must hold uint8 [T, H, W, 3] in C order, not {dtype} {list(shape)}")
        if len(data) - stream.tell() != math.prod(shape):
            raise ClipError(f".{FRAMES_MEMBER} holds {len(data) - stream.tell()} bytes of pixels, not the "
                            f"{math.prod(shape)} its header's shape {list(shape)} needs")
        self.count, self.height, self.width = shape[:3]
        self._pixels = np.frombuffer(data, np.uint8, offset=stream.tell()).reshape(shape)

    def frames(self, indices: list[int]) -> np.ndarray:
        check_pixels(len(indices), self.height, self.width)
        return self._pixels[indices]  # [len(indices), H, W, 3], a copy of those frames only


class VideoFile:
    """An `.mp4` / `.webm` member: frame count, fps and size from its first video stream and packets."""

    def __init__(self, data: bytes) -> None:
        import av  # the `video` extra; only clip shards need it

        self._av = av
        self._data = data
        try:
            with av.open(io.BytesIO(data), mode="r") as container:
                if not container.streams.video:
                    raise ClipError("the video member has no video stream")
                stream = container.streams.video[0]
                self.width, self.height = stream.codec_context.width, stream.codec_context.height
                check_pixels(1, self.height, self.width)
                rate = stream.average_rate or stream.guessed_rate
                self.fps = float(rate) if rate else None
                packets = [(packet.pts, packet.is_keyframe) for packet in container.demux(stream) if packet.size]
        except av.FFmpegError as error:
            raise ClipError(f"undecodable video: {error}") from error
        if any(pts is None for pts, _ in packets):
            raise ClipError("undecodable video: a packet without a presentation time")
        packets.sort()
        self.count = len(packets)
        self._pts = [pts for pts, _ in packets]
        self._keyframes = [index for index, (_, keyframe) in enumerate(packets) if keyframe]
        self._index_of = {pts: index for index, pts in enumerate(self._pts)}

    def frames(self, indices: list[int]) -> np.ndarray:
        """The frames at `indices` (presentation order), decoded from the keyframe before the first one on."""
        check_pixels(len(indices), self.height, self.width)
        wanted = set(indices)
        first, last = min(wanted), max(wanted)
        start = max((key for key in self._keyframes if key <= first), default=0)
        decoded: dict[int, np.ndarray] = {}
        try:
            with self._av.open(io.BytesIO(self._data), mode="r") as container:
                stream = container.streams.video[0]
                if start > 0:
                    container.seek(self._pts[start], stream=stream, backward=True, any_frame=False)
                index = start
                for frame in container.decode(stream):
                    index = self._index_of.get(frame.pts, index) if frame.pts is not None else index
                    if index in wanted:
                        decoded[index] = frame.to_ndarray(format="rgb24")
                    if index >= last:
                        break
                    index += 1
        except self._av.FFmpegError as error:
            raise ClipError(f"undecodable video: {error}") from error
        missing = wanted - decoded.keys()
        if missing:
            raise ClipError(f"undecodable video: frame {min(missing)} of the {self.count} its packets list "
                            "did not decode")
        return np.stack([decoded[index] for index in indices])


def read_clip(sample: dict[str, bytes]) -> FrameStack | VideoFile:
    """The clip member of a raw sample, opened (headers and packets read, no pixel decoded)."""
    if FRAMES_MEMBER in sample:
        return FrameStack(sample[FRAMES_MEMBER])
    for name in VIDEO_MEMBERS:
        if name in sample:
            return VideoFile(sample[name])
    raise ClipError(f"no clip member ({', '.join('.' + name for name in CLIP_MEMBERS)})")


def check_pixels(frames: int, height: int, width: int) -> None:
    """Refuse, before decoding, a clip whose frames x height x width exceeds `MAX_CLIP_PIXELS`."""
    if frames * height * width > MAX_CLIP_PIXELS:
        raise ClipError(f"{frames} frames of {width}x{height} pixels exceed the limit of {MAX_CLIP_PIXELS} pixels "
                        "(the image pipeline's)")


def clip_fps(meta: dict, clip: FrameStack | VideoFile) -> float:
    """Frames per second: the `.json` `fps`, else the container's."""
    fps = meta.get("fps", clip.fps)
    if fps is None:
        raise ClipError(f'no frame rate: a .{FRAMES_MEMBER} clip needs "fps" in its .json')
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ClipError(f".json fps {fps!r} is not a positive number")
    return float(fps)


def timeline(meta: dict, duration: float) -> list[tuple[float, float, str]]:
    """The `.json` timeline as (start, end, text), each segment checked to lie inside the clip [0, duration]."""
    segments = meta.get("timeline", [])
    if not isinstance(segments, list):
        raise ClipError(".json timeline is not a list of segments")
    checked = []
    for index, segment in enumerate(segments):
        start, end, text = (segment.get(name) for name in ("start", "end", "text")) if isinstance(
            segment, dict) else (None, None, None)
        if not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in (start, end)) or (
                not isinstance(text, str)):
            raise ClipError(f"timeline segment {index} is not {{start: seconds, end: seconds, text: str}}: {segment!r}")
        if start < 0 or end > duration + 1e-6 or start >= end:
            raise ClipError(f"timeline segment {index} [{start}, {end}) s is outside the clip of {duration:g} s "
                            "(it needs 0 <= start < end <= duration)")
        checked.append((float(start), float(end), text))
    return checked


def sampled_segments(segments: list[tuple[float, float, str]], times: list[float]
                     ) -> list[tuple[int, int, str]]:
    """Segments mapped onto the sampled frames: (first, last sampled position inside it, text); a segment that no
    sampled frame falls in is left out."""
    mapped = []
    for start, end, text in segments:
        inside = [position for position, time in enumerate(times) if start <= time < end]
        if inside:
            mapped.append((inside[0], inside[-1], text))
    return mapped


def describe_clip(sample: dict[str, bytes]) -> str:
    """"16 frames 64x64 at 8 fps" for a raw sample (`vlp-data inspect`); `ClipError` (a ValueError) when the clip,
    its fps or its timeline is unusable (frame 0 is decoded to check)."""
    clip = read_clip(sample)
    meta = json.loads(sample["json"]) if "json" in sample else {}
    if not isinstance(meta, dict):
        raise ClipError(".json is not an object")
    fps = clip_fps(meta, clip)
    timeline(meta, clip.count / fps)
    clip.frames([0])
    return f"{clip.count} frames {clip.width}x{clip.height} at {fps:g} fps"
