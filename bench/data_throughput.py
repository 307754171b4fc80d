"""Data pipeline throughput: samples/s of tar reading + decode + random resized crop + batching for 64 px PNG
shards with 0, 1 and 2 DataLoader workers, next to the raw PIL decode rate (`Image.open(...).convert("RGB")` of the
same PNG bytes in memory) measured in the same run right before each pipeline measurement.

Goal: per worker (the main process when num_workers=0) the pipeline delivers >= 80% of the raw decode rate, i.e.
tar reading, cropping and batching cost at most a quarter of what PIL spends decoding. Rates are per CPU second
(this process's, or the workers' once they are reaped) so that other jobs on a shared machine do not move them; with
2 workers the raw decode runs in 2 processes at once too, so both sides share the cores alike. The wall-clock rate
of the whole loader is printed next to them.

What a worker does: read the tar, decode (opaque PNG with libspng, JPEG with OpenCV, see
`data_modules.pipeline.decode_image`), crop and resize (OpenCV), pack the uint8 crops of a batch into a shared-memory
slot. What it leaves to the batch's device (`finish_views`, in `on_after_batch_transfer` in training): flip, colour
ops and normalisation, vectorised per batch; its CPU cost is printed separately (`finish on CPU`), as is the main
process's own share (unpickling, copying the images out of the slot) per sample.

    python bench/data_throughput.py [--quick] [--samples N] [--views single|two|multi] [--repeats R]

Each worker count is measured `--repeats` times (raw decode, then the pipeline), the median pair is reported, with
all the ratios in the JSON.

Prints a table, ends with `target <name>: <measured> (goal <goal>) PASS|MISS` lines and writes
bench/results/data_throughput.json.
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
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import Target, write_result  # noqa: E402

from data_modules.manifest import write_manifest  # noqa: E402
from data_modules.pipeline import SampleDecoder, decode_image, make_loader  # noqa: E402
from data_modules.views import MultiCrop, SingleCrop, TwoCrops, finish_views  # noqa: E402

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


def pil_decode(png: bytes) -> Image.Image:
    """The reference: what a PIL-based loader does with an image member."""
    return Image.open(io.BytesIO(png)).convert("RGB")


def raw_decode_rate(pngs: list[bytes], processes: int = 1, decode: Callable[[bytes], object] = pil_decode) -> float:
    """PNG bytes -> RGB images per CPU second of one process, averaged over `processes` running at once."""
    if processes <= 1:
        return _decode_rate(pngs, decode)
    context = multiprocessing.get_context("fork")
    with context.Pool(processes) as pool:
        rates = pool.starmap(_decode_rate, [(pngs, decode)] * processes)
    return sum(rates) / len(rates)


def _decode_rate(pngs: list[bytes], decode: Callable[[bytes], object]) -> float:
    start = time.process_time()
    for png in pngs:
        decode(png)
    return len(pngs) / (time.process_time() - start)


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pipeline_rates(pattern: str, views: str, num_workers: int, batch_size: int) -> dict:
    """One epoch: samples per wall second, per CPU second of the process(es) making the batches, the main
    process's CPU per sample (with workers) and the CPU cost per sample of finishing the batches on the CPU.

    The workers' CPU clock is RUSAGE_CHILDREN (they are reaped when the epoch ends): on a shared machine it gives
    what one worker does on a core of its own. Their start-up (fork, first shard) is in it, once per epoch.
    """
    decoder = SampleDecoder(VIEWS[views]().build(IMAGE_SIZE), with_caption=True, with_label=True)
    loader = make_loader(pattern, decoder, batch_size, num_workers=num_workers, shuffle_buffer=1000, finish=False)
    kept = []
    wall, cpu, children = time.perf_counter(), time.process_time(), children_cpu_seconds()
    samples = 0
    for batch in loader:
        samples += len(batch["__key__"])
        if len(kept) < 10:
            kept.append(batch)
    wall = time.perf_counter() - wall
    main_cpu = time.process_time() - cpu
    workers_cpu = main_cpu if num_workers == 0 else children_cpu_seconds() - children
    finish_views(kept.pop())  # warm-up: the first float batch faults its memory in
    start = time.process_time()
    finished = sum(len(finish_views(batch)["__key__"]) for batch in kept)
    return {
        "pipeline_per_wall_s": samples / wall,
        "per_worker_per_cpu_s": samples / workers_cpu,
        "main_process_us_per_sample": 0.0 if num_workers == 0 else 1e6 * main_cpu / samples,
        "finish_on_cpu_us_per_sample": 1e6 * (time.process_time() - start) / finished,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, under a minute")
    parser.add_argument("--samples", type=int, default=None, help="samples per epoch (default 8000, quick 3000)")
    parser.add_argument("--views", choices=sorted(VIEWS), default="single")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None,
                        help="raw/pipeline measurement pairs per worker count, the median ratio reported "
                             "(default 3, quick 1)")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(1)
    count = args.samples or (3000 if args.quick else 8000)

    rows = []
    with tempfile.TemporaryDirectory() as directory:
        pattern, pngs = write_shards(Path(directory), count)
        raw_decode_rate(pngs[:200])  # warm-up
        ours = raw_decode_rate(pngs, decode=decode_image)
        print(f"{count} samples of {IMAGE_SIZE}px PNG ({sum(map(len, pngs)) / len(pngs):.0f} bytes), "
              f"views={args.views}, batch {args.batch_size}; rates per CPU second unless marked wall")
        print(f"{'workers':>8} {'raw decode/s':>13} {'pipeline wall/s':>16} {'per worker/s':>13} "
              f"{'per worker/raw':>15} {'main us/sample':>15} {'finish on CPU us/sample':>24}")
        for num_workers in (0, 1, 2):
            pairs = []
            for _ in range(repeats):  # a shared machine's load drifts: interleave, keep the median pair
                raw = raw_decode_rate(pngs, processes=num_workers)
                pair = {"num_workers": num_workers, "raw_decode_per_cpu_s": raw,
                        **pipeline_rates(pattern, args.views, num_workers, args.batch_size)}
                pair["per_worker_fraction_of_raw"] = pair["per_worker_per_cpu_s"] / raw
                pairs.append(pair)
            pairs.sort(key=lambda pair: pair["per_worker_fraction_of_raw"])
            row = {**pairs[len(pairs) // 2], "repeats": repeats,
                   "fractions_of_raw": [pair["per_worker_fraction_of_raw"] for pair in pairs]}
            rows.append(row)
            print(f"{num_workers:>8} {row['raw_decode_per_cpu_s']:>13.0f} {row['pipeline_per_wall_s']:>16.0f} "
                  f"{row['per_worker_per_cpu_s']:>13.0f} "
                  f"{row['per_worker_fraction_of_raw']:>15.2f} {row['main_process_us_per_sample']:>15.0f} "
                  f"{row['finish_on_cpu_us_per_sample']:>24.0f}")
        print(f"decoders alone, one process: PIL {rows[0]['raw_decode_per_cpu_s']:.0f}/s, the pipeline's "
              f"decode_image (libspng for PNG) {ours:.0f}/s")

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
            "clock": "process_time (num_workers=0) / RUSAGE_CHILDREN (workers); "
                     "raw decode in num_workers processes at once",
            "decode_image_per_cpu_s": ours,
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
