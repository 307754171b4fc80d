"""Evaluation throughput: images/s of the zero-shot and retrieval callbacks next to a bare loop doing the same work.

The bare loop is the least any evaluation must do: read the shards with `make_eval_loader`, run the image encoder
over every image (and the text encoder over the class prompts / captions) in eval mode under the trainer's
precision, then one similarity matrix and its argmax. The callbacks do the same plus their bookkeeping (labels,
captions, thumbnails, cross-rank buffers, ranks of every query, torchmetrics, the confusion matrix). Both use the
same tiny CLIP (64 px ViT-Tiny, patch 8), the same 64 px shards and the same precision (`--precision`: bf16-mixed
on a GPU, 32-true on a CPU, where bf16 is only fast with AVX-512 BF16 / AMX); each measurement is the best of
`--repeats`, in wall time on a GPU and in this process's CPU time on a CPU (steady on a machine shared with other
jobs; the rates are then images per CPU-second).

Goal: each callback runs at >= 85% of the bare loop's images/s (the evaluation adds at most ~15% to the unavoidable
encoder and decoding work).

    python bench/eval_throughput.py [--quick] [--images N] [--device cpu|cuda] [--precision 32-true|bf16-mixed]

Ends with `target <name>: <measured> (goal >= <goal>) PASS|MISS` lines and writes bench/results/eval_throughput.json.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import Target, write_result  # noqa: E402

from data_modules.manifest import write_manifest  # noqa: E402
from data_modules.pipeline import make_eval_loader  # noqa: E402
from vlp_lightning.callbacks import Retrieval, ZeroShotClassification, ZeroShotDataset  # noqa: E402
from vlp_lightning.callbacks.features import evaluation_mode  # noqa: E402
from vlp_lightning.callbacks.zero_shot import TEMPLATE_SETS  # noqa: E402
from vlp_lightning.methods import CLIP  # noqa: E402

IMAGE_SIZE = 64
GOAL_FRACTION = 0.85
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40),
           "purple": (130, 40, 180)}
SHAPES = ("square", "circle")
CLASSNAMES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def shape_png(label: int, rng: random.Random) -> bytes:
    colour, shape = CLASSNAMES[label].split()
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    left, top = rng.randint(0, 24), rng.randint(0, 24)
    box = (left, top, left + rng.randint(24, 38), top + rng.randint(24, 38))
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour], outline=(40, 40, 40), width=2)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(directory: Path, count: int, per_shard: int = 500) -> str:
    """Labelled, captioned shape images as `val-*.tar` plus manifest; returns the brace pattern."""
    rng = random.Random(0)
    shards = {}
    for shard_index, first in enumerate(range(0, count, per_shard)):
        name = f"val-{shard_index:06d}.tar"
        keys = []
        with tarfile.open(directory / name, "w") as tar:
            for index in range(first, min(count, first + per_shard)):
                label = rng.randrange(len(CLASSNAMES))
                key = f"{index:07d}"
                caption = f"a {CLASSNAMES[label]}"
                members = {"png": shape_png(label, rng), "txt": caption.encode(), "cls": str(label).encode()}
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                keys.append(key)
        shards[name] = {"split": "val", "count": len(keys), "keys": keys}
    write_manifest(directory, {
        "format": 1, "source": "bench shapes", "licence": "CC0", "created": "2024-01-01", "seed": 0,
        "shards": shards, "splits": {"val": count}, "members": ["cls", "png", "txt"], "classnames": {"cls": CLASSNAMES},
    })
    return str(directory / f"val-{{000000..{len(shards) - 1:06d}}}.tar")


def bare_loop(method: CLIP, pattern: str, batch_size: int, texts: list[str] | None) -> None:
    """Decode + encode every image; encode the texts (prompts, or each image's caption when None); argmax."""
    device = method.device
    images, captions = [], []
    for batch in make_eval_loader(pattern, IMAGE_SIZE, batch_size):
        images.append(method.encode_image(batch["image"].to(device)).float())
        captions.extend(batch["caption"])
    texts = texts if texts is not None else captions
    text_features = []
    for start in range(0, len(texts), 256):
        tokens = method.tokenizer(texts[start : start + 256])
        text_features.append(method.encode_text({name: ids.to(device) for name, ids in tokens.items()}).float())
    text_features = torch.cat(text_features)
    (F.normalize(torch.cat(images), dim=-1) @ F.normalize(text_features, dim=-1).T).argmax(1).cpu()


def best_seconds(runs: dict[str, Callable[[], None]], repeats: int, clock: Callable[[], float]) -> dict[str, float]:
    """Best time of each run by `clock`; the runs alternate so that a shared machine's load hits them alike."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            start = clock()
            run()
            best[name] = min(best[name], clock() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="192 images, 3 repeats (about two minutes on 2 cores)")
    parser.add_argument("--images", type=int, default=None, help="evaluation images (default 2048, quick 192)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=None, help="best of this many runs (default 3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on cuda, 32-true on cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    count = args.images or (192 if args.quick else 2048)
    precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    # On a CPU shared with other jobs, this process's CPU time is far steadier than wall time (all work is on-CPU).
    clock = time.process_time if args.device == "cpu" else time.perf_counter
    unit = "images/CPU-s" if args.device == "cpu" else "images/s"
    repeats = args.repeats or 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    trainer = Trainer(accelerator=args.device, devices=1, precision=precision, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    method = CLIP(embed_dim=128).to(args.device)
    prompts = [template.format(name) for name in CLASSNAMES for template in TEMPLATE_SETS["simple"]]
    with tempfile.TemporaryDirectory() as directory:
        pattern = write_shards(Path(directory), count)
        zero_shot = ZeroShotClassification([ZeroShotDataset(name="shapes", shards=pattern)], batch_size=args.batch_size)
        retrieval = Retrieval(pattern, name="shapes", batch_size=args.batch_size)

        def callback_run(callback: ZeroShotClassification | Retrieval) -> Callable[[], None]:
            def run() -> None:
                callback.on_validation_epoch_start(trainer, method)  # a new evaluation pass: no cached features
                callback.evaluate(trainer, method)
            return run

        runs = {
            "zero_shot": (callback_run(zero_shot), lambda: bare_loop(method, pattern, args.batch_size, prompts)),
            "retrieval": (callback_run(retrieval), lambda: bare_loop(method, pattern, args.batch_size, None)),
        }
        rows, targets = {}, []
        with evaluation_mode(trainer, method):
            bare_loop(method, pattern, args.batch_size, prompts)  # warm-up: kernels, allocator, page cache
            for name, (callback, bare) in runs.items():
                seconds = best_seconds({"callback": callback, "bare": bare}, repeats, clock)
                callback_rate, bare_rate = count / seconds["callback"], count / seconds["bare"]
                fraction = callback_rate / bare_rate
                rows[name] = {"callback_images_per_sec": callback_rate, "bare_images_per_sec": bare_rate,
                              "fraction": fraction}
                print(f"{name:>10}: callback {callback_rate:8.1f} {unit}, bare loop {bare_rate:8.1f} {unit}, "
                      f"fraction {fraction:.2f}")
                targets.append(Target(f"{name}_vs_bare_loop", fraction, GOAL_FRACTION))

    path = write_result(
        "eval_throughput",
        {
            "quick": args.quick,
            "config": {"images": count, "image_size": IMAGE_SIZE, "batch_size": args.batch_size, "repeats": repeats,
                       "device": args.device, "clock": clock.__name__, "unit": unit, "threads": args.threads,
                       "precision": precision, "model": "CLIP tiny"},
            "results": rows,
            "targets": [target.as_dict() for target in targets],
        },
    )
    for target in targets:
        print(target.line())
    print(f"wrote {path}")

if __name__ == "__main__":
    main()
