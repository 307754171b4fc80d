"""Data pipeline throughput: samples/s of tar reading + decode + augment + batching for 64 px PNG shards with
0, 1 and 2 DataLoader workers, next to the raw PIL decode rate (`Image.open(...).convert("RGB")` of the same PNG
bytes in memory, one process) measured in the same run right before each pipeline measurement.

Goal: per worker (the main process when num_workers=0) the pipeline delivers >= 80% of the raw decode rate, i.e.
tar reading, cropping, augmentation and collation cost at most a quarter of what PIL spends decoding. Rates are per
CPU second (this process's, or the workers' once they are reaped) so that other jobs on a shared machine do not
move them; the wall-clock rate of the whole loader is printed next to them.

    python bench/data_throughput.py [--quick] [--samples N] [--views single|two|multi]

Prints a table, ends with `target <name>: <measured> (goal <goal>) PASS|MISS` lines and writes
bench/results/data_throughput.json.
"""

from __future__ import annotations

import argparse
import io
import random
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import Target, write_result  # noqa: E402

from data_modules.manifest import write_manifest  # noqa: E402
from data_modules.pipeline import SampleDecoder, make_loader  # noqa: E402
from data_modules.views import MultiCrop, SingleCrop, TwoCrops  # noqa: E402

IMAGE_SIZE = 64
GOAL_FRACTION = 0.8
VIEWS = {"single": SingleCrop, "two": TwoCrops, "multi": MultiCrop}


def emoji_like_png(rng: random.Random) -> bytes:
    """A 64 px icon like the emoji sets (as `vlp-data` stores them: RGB on white): a few flat-coloured outlined
    shapes drawn at 4x and downsampled, so edges are antialiased as in the real artwork."""
    scale = 4
    image = Image.new("RGB", (IMAGE_SIZE * scale, IMAGE_SIZE * scale), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(2, 5)):
        x0, y0 = rng.randint(0, 40 * scale), rng.randint(0, 40 * scale)
        box = (x0, y0, x0 + rng.randint(10, 24) * scale, y0 + rng.randint(10, 24) * scale)
        colour = tuple(rng.randrange(256) for _ in range(3))
        shape = rng.choice((draw.ellipse, draw.rectangle))
        shape(box, fill=colour, outline=(40, 40, 40), width=2 * scale)
    buffer = io.BytesIO()
    image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(directory: Path, count: int, per_shard: int = 500) -> tuple[str, list[bytes]]:
    """Shards of `count` captioned, labelled icons plus manifest; returns the brace pattern and the PNG bytes."""
    rng = random.Random(0)
    pngs, shards = [], {}
    for shard_index, first in enumerate(range(0, count, per_shard)):
        name = f"train-{shard_index:06d}.tar"
        keys = []
        with tarfile.open(directory / name, "w") as tar:
            for index in range(first, min(count, first + per_shard)):
                key = f"{index:08d}"
                png = emoji_like_png(rng)
                pngs.append(png)
                keys.append(key)
                for extension, data in (("png", png), ("txt", f"icon number {index}".encode()), ("cls", b"3")):
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards[name] = {"split": "train", "count": len(keys), "keys": keys}
    write_manifest(directory, {
        "format": 1, "source": "bench icons", "licence": "CC0", "created": "2024-01-01", "seed": 0,
        "shards": shards, "splits": {"train": count}, "members": ["cls", "png", "txt"],
    })
    return str(directory / f"train-{{000000..{len(shards) - 1:06d}}}.tar"), pngs


def raw_decode_rate(pngs: list[bytes]) -> float:
    """PNG bytes -> RGB images per CPU second of this process."""
    start = time.process_time()
    for png in pngs:
        Image.open(io.BytesIO(png)).convert("RGB")
    return len(pngs) / (time.process_time() - start)


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pipeline_rates(pattern: str, views: str, num_workers: int, batch_size: int) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second of the process(es) doing the work) for one epoch.

    The CPU clock is this process's with num_workers=0, else the workers' (reaped when the epoch ends, so they
    show up in RUSAGE_CHILDREN): on a shared machine it gives what one worker does on a core of its own.
    """
    decoder = SampleDecoder(VIEWS[views]().build(IMAGE_SIZE), with_caption=True, with_label=True)
    loader = make_loader(pattern, decoder, batch_size, num_workers=num_workers, shuffle_buffer=1000)
    wall, cpu, children = time.perf_counter(), time.process_time(), children_cpu_seconds()
    samples = sum(len(batch["__key__"]) for batch in loader)
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu if num_workers == 0 else children_cpu_seconds() - children
    return samples / wall, samples / cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, under a minute")
    parser.add_argument("--samples", type=int, default=None, help="samples per epoch (default 3000, quick 1500)")
    parser.add_argument("--views", choices=sorted(VIEWS), default="single")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    count = args.samples or (1500 if args.quick else 3000)

    rows = []
    with tempfile.TemporaryDirectory() as directory:
        pattern, pngs = write_shards(Path(directory), count)
        raw_decode_rate(pngs[:200])  # warm-up
        print(f"{count} samples of {IMAGE_SIZE}px PNG ({sum(map(len, pngs)) / len(pngs):.0f} bytes), "
              f"views={args.views}, batch {args.batch_size}; rates per CPU second unless marked wall")
        print(f"{'workers':>8} {'raw decode/s':>13} {'pipeline wall/s':>16} {'per worker/s':>13} {'per worker/raw':>15}")
        for num_workers in (0, 1, 2):
            raw = raw_decode_rate(pngs)
            # samples / CPU seconds of all workers = what one worker makes per second on a core of its own
            wall_rate, worker_rate = pipeline_rates(pattern, args.views, num_workers, args.batch_size)
            rows.append({"num_workers": num_workers, "raw_decode_per_cpu_s": raw, "pipeline_per_wall_s": wall_rate,
                         "per_worker_per_cpu_s": worker_rate, "per_worker_fraction_of_raw": worker_rate / raw})
            print(f"{num_workers:>8} {raw:>13.0f} {wall_rate:>16.0f} {worker_rate:>13.0f} {worker_rate / raw:>15.2f}")

    targets = [
        Target(f"decode+augment per worker / raw decode, {row['num_workers']} workers",
               row["per_worker_fraction_of_raw"], GOAL_FRACTION)
        for row in rows
    ]
    path = write_result(
        "data_throughput",
        {
            "quick": args.quick,
            "samples": count,
            "image_size": IMAGE_SIZE,
            "views": args.views,
            "batch_size": args.batch_size,
            "clock": "process_time (num_workers=0) / RUSAGE_CHILDREN (workers)",
            "rows": rows,
            "targets": [target.as_dict() for target in targets],
        },
    )
    print(f"wrote {path}")
    for target in targets:
        print(target.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
