"""Tiny-CLIP training throughput: `vlp fit` against open_clip's own training loop and a bare PyTorch loop.

One CLIP (ViT 64 px / patch 8, width 192, 6 layers, 3 heads; text width 192, 4 layers, 3 heads, context 32, vocab
49408; embedding 256: 14.09 M parameters, the same count and FLOPs in both implementations) is trained for the
same steps at the same batch size by

* `vlp_fit`: `VLPCLI` with experiments/clip/bench_tiny.yaml on WebDataset shards of generated 64 px images and
  captions, written by the suite's shard builder: the suite's real path, data loading and logging included;
* `open_clip`: `open_clip_train.main`, open_clip's own loop and its `--dataset-type synthetic` data, on the same
  architecture registered from a model config JSON with `open_clip.add_model_config`;
* `bare`: our CLIP module and the same AdamW in a plain loop over pre-made tensors, the floor a framework adds to;
* `vlp_fit_recommended`: `vlp fit` with the settings this CPU trains fastest with (`recommended_overrides`),

in fp32 and bf16 autocast, with the same `torch.set_num_threads` and DataLoader workers.

Lockstep: the contenders of one precision are processes forked from this one after the heavy imports, alive side
by side, but they compute one at a time, one step per turn (A, B, C, A, B, C, ...; `Lockstep`). Whatever else a
shared machine runs meanwhile therefore slows each contender alike, which back-to-back runs cannot promise (their
ratios moved by +-15 % from run to run on a 2-core box shared with other jobs).

Timing: a step lasts from the start of its turn to the end of its optimizer step, so getting its batch counts;
warm-up steps are dropped. Steps are timed on the process's CPU clock and on the wall clock (`common.Instant`);
`--clock cpu` (default) also leaves out the moments another job holds the core. Throughput is the batch size over
the median step. Data wait (wall) is the part of a step until its batch is in hand (a DataLoader worker can prepare
batches during the others' turns, as it would during a solo run's compute). MFU = FLOPs of one training step
(`torch.utils.flop_counter`, forward and backward, on step 0) / median step time / matmul ceiling
(`common.matmul_ceiling`: a 1024^2 matmul in the step's compute dtype on the same clock, measured by every
contender in its first turn; the best of the group is the machine's ceiling).

Causes: the CPU time of each optimizer update is clocked (optimizer step hooks; in Lightning from
`on_before_optimizer_step`, after the closure's forward and backward), so is the time Lightning's callbacks take
between backward and update (the suite's NaN guard runs there), and the last warm-up step is profiled with
torch.profiler: the share of matmul-like kernels (matmul, attention, convolution) and the top operators.

Usage: python bench/clip_vs_open_clip.py [--quick] [--threads 1] [--workers 1] [--clock cpu] [--only bare ...]
Prints a table and `target` lines, writes bench/results/clip_vs_open_clip.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    CLOCKS,
    REPO_ROOT,
    StepTime,
    Target,
    cpu_has_native_bf16,
    publish,
    step_summary,
)
from lockstep import Lockstep, TurnClock, TurnClockCallback, UpdateClock, run_in_lockstep
from PIL import Image, ImageDraw

BENCH_CONFIG = REPO_ROOT / "experiments" / "clip" / "bench_tiny.yaml"
OPEN_CLIP_MODEL = "vlp-bench-tiny-clip"
#: the open_clip twin of bench_tiny.yaml's model (open_clip's ViT has ln_pre; heads = width / head_width).
OPEN_CLIP_CONFIG = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "layers": 6, "width": 192, "head_width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 192, "heads": 3, "layers": 4},
}
#: bench_tiny.yaml's optimizer, as open_clip arguments.
OPEN_CLIP_OPTIMIZER = ["--lr", "5e-4", "--wd", "0.2", "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6"]
PRECISIONS = {  # ours -> (Lightning precision, open_clip --precision, autocast dtype or None)
    "fp32": ("32-true", "fp32", None),
    "bf16": ("bf16-mixed", "amp_bf16", torch.bfloat16),
}
BASE_CONTENDERS = ("open_clip", "vlp_fit", "bare")
RECOMMENDED = "vlp_fit_recommended"
CONTENDERS = (*BASE_CONTENDERS, RECOMMENDED)
#: issue 20's targets: vlp fit with its defaults >= 1.2x open_clip at equal precision, >= 0.97x the bare loop,
#: bf16 MFU >= 0.35 on a CPU with native bf16, data wait <= 2 % of a step.
GOALS = {"vs_open_clip": 1.2, "vs_bare": 0.97, "recommended_vs_open_clip_fp32": 1.5, "data_wait": 0.02,
         "bf16_mfu": 0.35}


def recommended_precision() -> str:
    """bf16 autocast pays off only where the CPU multiplies bf16 natively (AVX-512 BF16, AMX); elsewhere oneDNN
    converts to fp32 and bf16 matmuls run several times slower than fp32 ones."""
    return "bf16" if cpu_has_native_bf16() else "fp32"


def recommended_overrides() -> list[str]:
    """`vlp fit` arguments that make the tiny CLIP train fastest on a CPU (measured with this bench).

    Fused AdamW updates all parameters in one kernel per group; the default for-loop AdamW runs eight kernels for
    each of 134 tensors (the 9.5 M-entry token embedding among them) and took 11 % of a CPU step at batch 64 (20 % at
    batch 32), fused 1 %; since issue 20 it is `vlp fit`'s default (`fast_optimizer_options`), so the recommended
    run differs from the default one only in the precision where the recipe fixes fp32. torch.compile is not here: compiling took four minutes on 2 cores and gave no measurable
    gain on this model. Thread count and workers stay those of every contender (see `--threads`).
    """
    return ["--model.init_args.optimizer.init_args.fused=true"]


# ---------------------------------------------------------------------------------------------------- contenders
def run_bare(clock: TurnClock, precision: str, args: argparse.Namespace) -> None:
    """Our CLIP and the AdamW `vlp fit` builds from the config (fused by default, `fast_optimizer_options`) on
    pre-made tensors: forward_loss, backward, step; nothing else."""
    from vlp_lightning.cli import VLPCLI
    from vlp_lightning.methods.base import fast_optimizer_options

    model = VLPCLI(args=["--config", str(BENCH_CONFIG)], run=False).model
    groups = model.parameter_groups()
    optimizer = model.optimizer_factory(groups, **fast_optimizer_options(model.optimizer_factory, groups))
    generator = torch.Generator().manual_seed(0)
    captions = synthetic_captions(4 * args.batch_size)
    batches = [
        {
            "image": torch.randn(args.batch_size, 3, model.image_size, model.image_size, generator=generator),
            "text": model.tokenizer(captions[index * args.batch_size : (index + 1) * args.batch_size]),
        }
        for index in range(4)
    ]
    autocast = PRECISIONS[precision][2] is not None
    model.train()
    clock.begin()
    for index in range(clock.total_steps):
        batch = batches[index % len(batches)]
        clock.batch_ready()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model.forward_loss(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clock.step_done()


def run_vlp_fit(
    clock: TurnClock, precision: str, args: argparse.Namespace, overrides: list[str], updates: UpdateClock
) -> None:
    """`vlp fit --config bench_tiny.yaml` (the CLI's own parsing and instantiation) with a callback for the clock."""
    from vlp_lightning.callbacks import ThroughputMonitor
    from vlp_lightning.cli import VLPCLI

    cli = VLPCLI(
        args=[
            "--config", str(BENCH_CONFIG),
            f"--data.init_args.train_shards={args.shards}",
            f"--data.init_args.batch_size={args.batch_size}",
            f"--data.init_args.num_workers={args.workers}",
            f"--trainer.precision={PRECISIONS[precision][0]}",
            f"--trainer.max_steps={clock.total_steps}",
            *overrides,
        ],
        run=False,
    )
    cli.trainer.callbacks.append(TurnClockCallback(clock, updates))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    # The suite's ThroughputMonitor (in the YAML) counts the FLOPs of the first step itself.
    monitor = next(callback for callback in cli.trainer.callbacks if isinstance(callback, ThroughputMonitor))
    clock.probes.flops_per_step = monitor.flops_per_batch


class ClockedLoader:
    """open_clip's training DataLoader with the clock around it: its loop asks for batch i + 1 right after the
    optimizer step of batch i, so the requests mark the steps as Lightning's hooks do."""

    def __init__(self, loader: Any, clock: TurnClock) -> None:
        self.loader = loader
        self.num_batches = loader.num_batches
        self.num_samples = loader.num_samples
        self.clock = clock

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        self.clock.begin()
        batches = iter(self.loader)
        for _ in range(self.num_batches):
            batch = next(batches)
            self.clock.batch_ready()
            yield batch
            self.clock.step_done()  # the loop came back for the next batch: the step is done


def run_open_clip(clock: TurnClock, precision: str, args: argparse.Namespace, run_name: str) -> None:
    """`open_clip_train.main` on its synthetic dataset, its training DataLoader wrapped in a `ClockedLoader`."""
    import open_clip
    import open_clip_train.main as open_clip_main

    config_dir = args.workdir / f"open_clip_models-{run_name}"
    config_dir.mkdir()
    (config_dir / f"{OPEN_CLIP_MODEL}.json").write_text(json.dumps(OPEN_CLIP_CONFIG))
    open_clip.add_model_config(config_dir)
    get_data = open_clip_main.get_data

    def get_data_with_clock(*get_data_args: Any, **get_data_kwargs: Any) -> dict:
        data = get_data(*get_data_args, **get_data_kwargs)
        data["train"].dataloader = ClockedLoader(data["train"].dataloader, clock)
        return data

    open_clip_main.get_data = get_data_with_clock  # this process is a throw-away fork
    status = open_clip_main.main(
        [
            "--model", OPEN_CLIP_MODEL,
            "--dataset-type", "synthetic",
            "--train-num-samples", str(clock.total_steps * args.batch_size),
            "--batch-size", str(args.batch_size),
            "--epochs", "1",
            "--workers", str(args.workers),
            "--precision", PRECISIONS[precision][1],
            "--device", "cpu",
            "--logs", str(args.workdir / "open_clip_logs"),
            "--name", run_name,
            "--warmup", str(max(1, clock.total_steps // 10)),
            "--seed", "0",
            *OPEN_CLIP_OPTIMIZER,
        ]
    )
    if status is not None:
        raise RuntimeError(f"open_clip_train.main stopped early (returned {status!r})")


def contender_process(
    contender: str, precision: str, lockstep: Lockstep, index: int, args: argparse.Namespace
) -> None:
    """Body of one forked contender (its output already goes to its log): the thread count, its steps; its result
    as JSON."""
    run_name = f"{contender}-{precision}"
    os.chdir(args.workdir)  # run folders of Lightning and open_clip land in the temporary folder
    torch.set_num_threads(args.threads)
    updates = UpdateClock()
    clock = TurnClock(
        lockstep, args.warmup + args.steps_by_precision[precision], args.warmup,
        PRECISIONS[precision][2] or torch.float32, args.ceiling_seconds, count_flops=not contender.startswith("vlp_fit"),
    )
    if contender == "bare":
        run_bare(clock, precision, args)
    elif contender == "open_clip":
        run_open_clip(clock, precision, args, run_name)
    else:
        run_vlp_fit(clock, precision, args, recommended_overrides() if contender == RECOMMENDED else [], updates)
    if len(clock.steps) != clock.total_steps or len(updates.seconds) != clock.total_steps:
        raise RuntimeError(f"{run_name}: {len(clock.steps)} steps and {len(updates.seconds)} updates timed")
    result = {
        "contender": contender,
        "precision": precision,
        "threads": torch.get_num_threads(),
        "matmul_ceiling_flops": clock.ceiling,
        "flops_per_step": clock.probes.flops_per_step,
        "profile": clock.probes.profile,
        "steps": [vars(step) for step in clock.steps[args.warmup :]],
        "update_cpu_s": updates.seconds[args.warmup :],
        "pre_update_hooks_cpu_s": clock.pre_update_hooks[args.warmup :],
        "load_average_1min": os.getloadavg()[0],
    }
    (args.workdir / f"{run_name}.json").write_text(json.dumps(result))


def run_group(contenders: list[str], precision: str, args: argparse.Namespace) -> list[dict]:
    """The contenders of one precision in lockstep (`lockstep.run_in_lockstep`)."""
    return run_in_lockstep(
        [f"{contender}-{precision}" for contender in contenders],
        lambda name, lockstep, index: contender_process(contenders[index], precision, lockstep, index, args),
        args.workdir,
        args.turn_timeout,
    )


# ---------------------------------------------------------------------------------------------------- data
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40),
    "purple": (130, 50, 180), "orange": (240, 140, 20), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("square", "circle", "triangle", "bar")


def synthetic_captions(count: int) -> list[str]:
    rng = random.Random(1)
    return [
        f"a photo of a {rng.choice(list(COLOURS))} {rng.choice(SHAPES)} on a {rng.choice(list(COLOURS))} background"
        for _ in range(count)
    ]


def synthetic_image(caption: str, size: int, seed: int) -> Image.Image:
    """The captioned shape on its background, with pixel noise: a PNG of it compresses and decodes like a small
    photo (8-9 KB at 64 px) rather than like a flat colour or pure noise."""
    words = caption.split()
    colour, shape, background = COLOURS[words[4]], words[5], COLOURS[words[8]]
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    extent = rng.uniform(0.4, 0.8) * size
    left, top = rng.uniform(0, size - extent), rng.uniform(0, size - extent)
    box = (left, top, left + extent, top + extent)
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(left, top + extent), (left + extent / 2, top), (left + extent, top + extent)], fill=colour)
    else:
        draw.rectangle((left, top + extent / 3, left + extent, top + 2 * extent / 3), fill=colour)
    noise = np.random.default_rng(seed).integers(-12, 13, size=(size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def write_shards(out_dir: Path, samples: int, image_size: int) -> str:
    """`samples` image-caption pairs as vlp-data shards (the suite's builder); returns the `::`-joined shard list."""
    from data_modules.builder import build_shards
    from data_modules.sources import Record, SourceData

    records = [
        Record(
            key=f"sample{index:06d}",
            open_image=lambda caption=caption, index=index: synthetic_image(caption, image_size, index),
            origin="generated",
            caption=caption,
        )
        for index, caption in enumerate(synthetic_captions(samples))
    ]
    source = SourceData(name="clip_vs_open_clip synthetic", licence="CC0-1.0", records=records, inputs=[])
    manifest = build_shards(
        source, out_dir, maxcount=256, split_fractions={"train": 1.0}, seed=0, resize=None, force=True
    )
    return "::".join(str(out_dir / name) for name in sorted(manifest["shards"]))


# ---------------------------------------------------------------------------------------------------- report
def groups(only: list[str], precisions: list[str]) -> dict[str, list[str]]:
    """The contenders of each precision, which run in lockstep with each other."""
    return {
        precision: [
            contender
            for contender in CONTENDERS
            if contender in only and (contender != RECOMMENDED or precision == recommended_precision())
        ]
        for precision in precisions
    }


def timed_steps(steps: int) -> dict[str, int]:
    """Timed steps per precision: without native bf16 a bf16 step takes about 3.5x as long, so bf16 times half as
    many steps (at least 2) and the full run stays near 10 minutes."""
    slow = set() if cpu_has_native_bf16() else {"bf16"}
    return {precision: max(2, steps // 2) if precision in slow else steps for precision in PRECISIONS}


def summarise(runs: list[dict], batch_size: int, clock: str) -> dict[str, dict]:
    """Per run (contender and precision): throughput, data wait, MFU and the measured causes."""
    # The machine's ceiling in a precision: the best any run measured (each measures it in its first turn).
    ceilings = {
        precision: {
            clock_name: max(run["matmul_ceiling_flops"][clock_name] for run in runs if run["precision"] == precision)
            for clock_name in CLOCKS
        }
        for precision in dict.fromkeys(run["precision"] for run in runs)
    }
    summaries: dict[str, dict] = {}
    for run in runs:
        summary = step_summary([StepTime(**step) for step in run["steps"]], batch_size)
        ceiling = ceilings[run["precision"]]
        achieved = run["flops_per_step"] / summary[f"median_step_{clock}_s"] if run["flops_per_step"] else None
        update = statistics.median(run["update_cpu_s"])
        hooks = statistics.median(run["pre_update_hooks_cpu_s"]) if run["pre_update_hooks_cpu_s"] else 0.0
        summaries[f"{run['contender']}/{run['precision']}"] = {
            "contender": run["contender"],
            "precision": run["precision"],
            **summary,
            "flops_per_step": run["flops_per_step"],
            "matmul_ceiling_flops": ceiling,
            f"achieved_flops_{clock}": achieved,
            "mfu": achieved / ceiling[clock] if achieved else None,
            "median_update_cpu_s": update,
            "update_share_of_step_cpu": update / summary["median_step_cpu_s"],
            "median_pre_update_hooks_cpu_s": hooks,
            "pre_update_hooks_share_of_step_cpu": hooks / summary["median_step_cpu_s"],
            "profile": run["profile"],
            "load_average_1min": run["load_average_1min"],
        }
    return summaries


def find_targets(summaries: dict[str, dict], clock: str) -> list[Target]:
    def ratio(numerator: str, denominator: str) -> float | None:
        if numerator not in summaries or denominator not in summaries:
            return None
        return summaries[numerator][f"samples_per_s_{clock}"] / summaries[denominator][f"samples_per_s_{clock}"]

    found = [
        Target(f"vlp_fit_vs_open_clip_{precision}", ratio(f"vlp_fit/{precision}", f"open_clip/{precision}"),
               GOALS["vs_open_clip"])
        for precision in PRECISIONS
    ]
    found += [
        Target(f"vlp_fit_vs_bare_{precision}", ratio(f"vlp_fit/{precision}", f"bare/{precision}"), GOALS["vs_bare"])
        for precision in PRECISIONS
    ]
    found.append(
        Target("vlp_recommended_vs_open_clip_fp32", ratio(f"{RECOMMENDED}/{recommended_precision()}", "open_clip/fp32"),
               GOALS["recommended_vs_open_clip_fp32"])
    )
    if cpu_has_native_bf16() and "vlp_fit/bf16" in summaries:
        found.append(Target("vlp_fit_bf16_mfu", summaries["vlp_fit/bf16"]["mfu"], GOALS["bf16_mfu"]))
    waits = [summary["data_wait_fraction"] for summary in summaries.values() if summary["contender"].startswith("vlp")]
    found.append(Target("vlp_fit_data_wait_fraction", max(waits) if waits else None, GOALS["data_wait"], "<="))
    return found


def print_table(summaries: dict[str, dict], clock: str) -> None:
    print(
        f"\n{'contender':<20} {'prec':<5} {'samples/s':>9} {'wall':>6} {'vs open_clip':>12} {'data wait':>9} "
        f"{'GFLOP/s':>7} {'ceiling':>7} {'MFU':>5} {'update':>6} {'hooks':>5} {'matmul':>6}"
    )
    for summary in summaries.values():
        reference = summaries.get(f"open_clip/{summary['precision']}") or summaries.get("open_clip/fp32")
        vs_open_clip = (
            f"{summary[f'samples_per_s_{clock}'] / reference[f'samples_per_s_{clock}']:.2f}x" if reference else "-"
        )
        profile_info = summary["profile"] or {}
        matmul_share = profile_info.get("matmul_attention_conv_cpu_s", 0) / profile_info.get("operators_cpu_s", 1)
        print(
            f"{summary['contender']:<20} {summary['precision']:<5} {summary[f'samples_per_s_{clock}']:>9.1f} "
            f"{summary['samples_per_s_wall']:>6.1f} {vs_open_clip:>12} {summary['data_wait_fraction']:>9.1%} "
            f"{(summary[f'achieved_flops_{clock}'] or 0) / 1e9:>7.1f} "
            f"{summary['matmul_ceiling_flops'][clock] / 1e9:>7.1f} {summary['mfu'] or 0:>5.2f} "
            f"{summary['update_share_of_step_cpu']:>6.0%} {summary['pre_update_hooks_share_of_step_cpu']:>5.0%} "
            f"{matmul_share:>6.0%}"
        )
    print(
        f"samples/s, vs open_clip (same precision), GFLOP/s, ceiling and MFU on the {clock} clock; wall = samples/s "
        "on the wall clock; update = optimizer update / step (CPU); hooks = Lightning callbacks between backward "
        "and update / step (CPU); matmul = matmul-like kernels / profiled step"
    )


def run_benchmark(args: argparse.Namespace) -> None:
    import open_clip_train.main  # noqa: F401  the heavy imports, once, before the contenders fork from here
    import vlp_lightning.cli  # noqa: F401

    started = time.perf_counter()
    args.steps_by_precision = timed_steps(args.steps)
    runs = []
    with tempfile.TemporaryDirectory(prefix="clip_vs_open_clip-") as workdir:
        args.workdir = Path(workdir)
        # one batch more than the longest run, for Lightning's prefetch
        samples = (args.warmup + max(args.steps_by_precision.values()) + 1) * args.batch_size
        args.shards = write_shards(args.workdir / "shards", samples, image_size=64)
        for precision, contenders in groups(args.only, args.precisions).items():
            if not contenders:
                continue
            group_started = time.perf_counter()
            runs += run_group(contenders, precision, args)
            print(
                f"{precision}: {', '.join(contenders)} in lockstep, {args.steps_by_precision[precision]} timed steps "
                f"each ({time.perf_counter() - group_started:.0f} s)",
                flush=True,
            )
    summaries = summarise(runs, args.batch_size, args.clock)
    print_table(summaries, args.clock)
    targets = find_targets(summaries, args.clock)
    report = {
        "quick": args.quick,
        "config": {
            "batch_size": args.batch_size,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps_by_precision,
            "threads": args.threads,
            "dataloader_workers": args.workers,
            "clock": args.clock,
            "model": OPEN_CLIP_CONFIG,
            "recommended": {"precision": recommended_precision(), "overrides": recommended_overrides()},
        },
        "contenders": summaries,
        "runs": runs,
        "targets": [target.as_dict() for target in targets],
        "seconds": time.perf_counter() - started,
    }
    publish("clip_vs_open_clip", report, targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 32, 4 timed steps (under 3 minutes)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 (quick 32)")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed fp32 steps per contender (default 16, quick 4; see timed_steps)"
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed first steps (step 0 counts FLOPs, the last is profiled); >= 2"
    )
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads of every contender (default 1: on a shared 2-core box a second thread mostly waits "
        "for the other jobs)",
    )
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of vlp fit and open_clip")
    parser.add_argument("--clock", choices=CLOCKS, default="cpu", help="clock of the ratios, MFU and targets")
    parser.add_argument("--ceiling-seconds", type=float, default=None, help="matmul ceiling timing (1, quick 0.5)")
    parser.add_argument("--turn-timeout", type=float, default=900, help="seconds a contender waits for its turn")
    parser.add_argument("--only", nargs="+", choices=CONTENDERS, default=list(CONTENDERS), help="run only these")
    parser.add_argument("--precisions", nargs="+", choices=tuple(PRECISIONS), default=list(PRECISIONS))
    args = parser.parse_args()
    args.batch_size = args.batch_size or (32 if args.quick else 64)
    args.steps = args.steps or (4 if args.quick else 16)
    args.ceiling_seconds = args.ceiling_seconds or (0.5 if args.quick else 1.0)
    if args.warmup < 2:
        parser.error("--warmup must be at least 2 (step 0 counts FLOPs, the last warm-up step is profiled)")
    run_benchmark(args)


if __name__ == "__main__":
    main()
