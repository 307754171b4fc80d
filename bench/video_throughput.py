"""Clip pipeline throughput: clips/s of tar reading + clip decode + frame sampling + one crop per clip + batching,
for `.mp4` (H.264) and `.frames.npy` clips, with 0, 1 and 2 DataLoader workers, next to the raw decoder alone.

The raw decoder is what a plain loader does with the same member bytes in memory: for `.mp4`, PyAV decoding every
frame to RGB (`frame.to_ndarray("rgb24")` for each) and keeping the sampled 8; for `.frames.npy`, `numpy.load(...,
allow_pickle=False)` of the whole stack and indexing the sampled 8. The pipeline's clip decoder
(`data_modules.clips`) seeks to the keyframe before the first sampled frame and converts only the sampled frames to
RGB, and copies only the sampled frames out of a stack, so per worker it may beat the raw rate.

Goal (`.mp4`): per worker (the main process when num_workers=0) the pipeline delivers >= 80% of the raw decoder's
rate (tar reading, cropping and batching cost at most a quarter of the decode). `.frames.npy` has no target: a
stack needs no decoding (the raw rate is a memory copy), so its rate is that of cropping and batching, shown for
scale. Rates are per CPU second of the process(es) making the batches (RUSAGE_CHILDREN for workers), so other jobs
on a shared machine do not move them.

    python bench/video_throughput.py [--quick] [--clips N] [--frames T] [--size S]

Prints a table, ends with `target <name>: <measured> (goal <goal>) PASS|MISS` lines and writes
bench/results/video_throughput.json.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import random
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import Target, publish  # noqa: E402

from data_modules.clip_views import ClipViews  # noqa: E402
from data_modules.clips import FrameSampler  # noqa: E402
from data_modules.manifest import write_manifest  # noqa: E402
from data_modules.pipeline import make_loader  # noqa: E402
from data_modules.video import ClipDecoder  # noqa: E402

SAMPLED_FRAMES = 8
CROP_SIZE = 64
GOAL_FRACTION = 0.8


def moving_square(frames: int, size: int, rng: random.Random) -> np.ndarray:
    """uint8 [T, S, S, 3]: a coloured square crossing a noisy background (so the codec has motion to code)."""
    clip = np.empty((frames, size, size, 3), np.uint8)
    background = np.random.default_rng(rng.randrange(2**32)).integers(0, 80, (size, size, 3), dtype=np.uint8)
    side, colour = size // 4, [rng.randrange(256) for _ in range(3)]
    for index in range(frames):
        clip[index] = background
        left = (index * 2) % (size - side)
        clip[index, size // 3 : size // 3 + side, left : left + side] = colour
    return clip


def encode(clip: np.ndarray, member: str, fps: int = 16) -> bytes:
    buffer = io.BytesIO()
    if member == "frames.npy":
        np.save(buffer, clip, allow_pickle=False)
        return buffer.getvalue()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"g": "16"})
        stream.width, stream.height, stream.pix_fmt = clip.shape[2], clip.shape[1], "yuv420p"
        for frame in clip:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def write_shards(directory: Path, member: str, count: int, frames: int, size: int) -> tuple[str, list[bytes]]:
    rng = random.Random(0)
    data = [encode(moving_square(frames, size, rng), member) for _ in range(count)]
    meta = b'{"fps": 16.0, "timeline": []}'
    with tarfile.open(directory / f"{member}-000000.tar", "w") as tar:
        for index, clip in enumerate(data):
            for extension, payload in ((member, clip), ("txt", b"a moving square"), ("json", meta)):
                info = tarfile.TarInfo(f"clip{index:06d}.{extension}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    write_manifest(directory, {"format": 1, "source": "bench clips", "licence": "CC0",
                               "shards": {f"{member}-000000.tar": {"split": "train", "count": count}},
                               "members": [member, "txt", "json"]})
    return str(directory / f"{member}-000000.tar"), data


def raw_decode(data: bytes, member: str, indices: list[int]) -> np.ndarray:
    """The plain loader's decode (module doc)."""
    if member == "frames.npy":
        return np.load(io.BytesIO(data), allow_pickle=False)[indices]
    with av.open(io.BytesIO(data)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return np.stack([frames[index] for index in indices])


def _raw_rate(clips: list[bytes], member: str, frames: int) -> float:
    sampler, rng = FrameSampler("segments", SAMPLED_FRAMES), random.Random(0)
    start = time.process_time()
    for data in clips:
        raw_decode(data, member, sampler.indices(frames, rng))
    return len(clips) / (time.process_time() - start)


def raw_rate(clips: list[bytes], member: str, frames: int, processes: int) -> float:
    """Clips per CPU second of one process, averaged over `processes` running at once."""
    if processes <= 1:
        return _raw_rate(clips, member, frames)
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        rates = pool.starmap(_raw_rate, [(clips, member, frames)] * processes)
    return sum(rates) / len(rates)


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pipeline_rate(pattern: str, num_workers: int, batch_size: int) -> tuple[float, float]:
    """(clips per wall second, clips per CPU second of the process(es) making the batches) over one epoch."""
    views = ClipViews(num_frames=SAMPLED_FRAMES, sampling="segments", scale=(0.5, 1.0))
    decoder = ClipDecoder(views.build(CROP_SIZE), with_caption=True)
    loader = make_loader(pattern, decoder, batch_size, num_workers=num_workers, shuffle_buffer=50, finish=False)
    wall, cpu, children = time.perf_counter(), time.process_time(), children_cpu_seconds()
    clips = sum(len(batch["__key__"]) for batch in loader)
    wall = time.perf_counter() - wall
    workers_cpu = time.process_time() - cpu if num_workers == 0 else children_cpu_seconds() - children
    return clips / wall, clips / workers_cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer clips, well under a minute")
    parser.add_argument("--clips", type=int, default=None, help="clips per member kind (default 400, quick 96)")
    parser.add_argument("--frames", type=int, default=64, help="frames per stored clip (default: %(default)s)")
    parser.add_argument("--size", type=int, default=96, help="stored frame side in pixels (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(1)
    count = args.clips or (96 if args.quick else 400)
    rows = []
    print(f"{count} clips of {args.frames} frames at {args.size} px, {SAMPLED_FRAMES} sampled (segments), "
          f"crop {CROP_SIZE}, batch {args.batch_size}; rates per CPU second unless marked wall")
    print(f"{'member':>11} {'workers':>8} {'raw decode/s':>13} {'pipeline wall/s':>16} {'per worker/s':>13} "
          f"{'per worker/raw':>15}")
    with tempfile.TemporaryDirectory() as directory:
        for member in ("mp4", "frames.npy"):
            folder = Path(directory) / member
            folder.mkdir()
            pattern, clips = write_shards(folder, member, count, args.frames, args.size)
            for num_workers in ((0,) if args.quick else (0, 1, 2)):
                raw = raw_rate(clips, member, args.frames, num_workers)
                wall, per_worker = pipeline_rate(pattern, num_workers, args.batch_size)
                row = {"member": member, "num_workers": num_workers, "raw_decode_per_cpu_s": raw,
                       "pipeline_per_wall_s": wall, "per_worker_per_cpu_s": per_worker,
                       "per_worker_fraction_of_raw": per_worker / raw,
                       "stored_bytes_per_clip": sum(map(len, clips)) / len(clips)}
                rows.append(row)
                print(f"{member:>11} {num_workers:>8} {raw:>13.1f} {wall:>16.1f} {per_worker:>13.1f} "
                      f"{per_worker / raw:>15.2f}")
    targets = [Target(f"clip pipeline per worker / raw decode, mp4, {row['num_workers']} workers",
                      row["per_worker_fraction_of_raw"], GOAL_FRACTION) for row in rows if row["member"] == "mp4"]
    publish("video_throughput", {
        "seconds": time.perf_counter() - started,
        "quick": args.quick, "clips": count, "frames": args.frames, "size": args.size,
        "sampled_frames": SAMPLED_FRAMES, "crop_size": CROP_SIZE, "batch_size": args.batch_size,
        "clock": "process_time (num_workers=0) / RUSAGE_CHILDREN (workers); raw decode in num_workers processes",
        "rows": rows, "targets": [target.as_dict() for target in targets],
    }, targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
