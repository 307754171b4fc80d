"""Peak memory and time of the CLIP loss forward+backward on one rank: naive all-gather vs local loss.

One rank's work is simulated in one process: its N local pairs plus G - N stand-ins for the other ranks' features
as `all_gather_with_grad` would return them (they carry gradient, so the backward materialises the [G, D] gradient
that the reduce-scatter would send). Each point runs in a forked child; its peak memory is the rise of the peak
resident set (ru_maxrss) over the resident set just before the forward, after the inputs exist.

Two sweeps over the global batch G:
* fixed local batch (N = --local-batch, world = G / N, i.e. more devices): the scaling the design promises —
  local loss grows as N·G (slope 1), naive as G² (slope 2). The targets are read here.
* two processes (N = G / 2): both grow as G²; the local loss needs about half the naive memory.

Naive points whose estimated peak exceeds --max-gib are skipped (and listed), so the full run fits a shared box.
Usage: python bench/loss_memory.py [--quick]   (writes bench/results/loss_memory.json)
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import resource
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from common import Target, write_result

from vlp_lightning.losses.contrastive import weighted_two_way_infonce

MODES = ("naive", "local")
#: measured peak / `logits_bytes` (4.1 naive, 3.3 local: the logits, the two log-softmaxes saved for backward and
#: the logits gradient), rounded up; used only to skip points that would not fit in --max-gib.
PEAK_PER_LOGITS = 4.5
SLOPE_GOALS = {"local": (1.3, "<="), "naive": (1.7, ">=")}


def logits_bytes(mode: str, global_batch: int, local_batch: int) -> int:
    """Bytes of the fp32 logits one rank holds: [G, G] naive, two [N, G] blocks with the local loss."""
    rows = global_batch if mode == "naive" else 2 * local_batch
    return 4 * rows * global_batch


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def one_rank_step(mode: str, global_batch: int, local_batch: int, dim: int) -> tuple[int, float]:
    """Forward + backward of rank 0's loss with fake gathered features: (resident bytes before, seconds)."""
    generator = torch.Generator().manual_seed(0)

    def features(rows: int, requires_grad: bool) -> torch.Tensor:
        return F.normalize(torch.randn(rows, dim, generator=generator), dim=-1).requires_grad_(requires_grad)

    images, texts = features(local_batch, True), features(local_batch, True)
    other_images = features(global_batch - local_batch, True)
    other_texts = features(global_batch - local_batch, True)
    baseline = resident_bytes()
    start = time.perf_counter()
    all_images, all_texts = torch.cat([images, other_images]), torch.cat([texts, other_texts])
    loss = weighted_two_way_infonce(
        images,
        texts,
        all_images,
        all_texts,
        torch.tensor(1 / 0.07),
        first_label=0,
        local_loss=mode == "local",
        image_to_text_weight=0.5,
    )
    loss.backward()
    return baseline, time.perf_counter() - start


def measure(mode: str, global_batch: int, local_batch: int, dim: int, threads: int, queue: multiprocessing.Queue) -> None:
    """Child process body: warm up tiny (kernels, thread pool), then measure one point."""
    torch.set_num_threads(threads)
    one_rank_step(mode, 64, 32, dim)
    baseline, seconds = one_rank_step(mode, global_batch, local_batch, dim)
    queue.put({"peak_mib": (peak_resident_bytes() - baseline) / 2**20, "seconds": seconds})


def run_point(mode: str, global_batch: int, local_batch: int, dim: int, threads: int) -> dict:
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=measure, args=(mode, global_batch, local_batch, dim, threads, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def log_log_slope(sizes: list[int], values: list[float]) -> float:
    return float(np.polyfit(np.log(sizes), np.log(values), 1)[0])


def sweep(
    name: str, sizes: list[int], local_batch_of: Callable[[int], int], dim: int, threads: int, max_bytes: float
) -> dict:
    print(f"\n== {name} ==")
    print(f"{'mode':>6} {'G':>6} {'N':>6} {'world':>5} {'logits MiB':>10} {'peak MiB':>9} {'seconds':>8}")
    rows, skipped = [], []
    for mode in MODES:
        for global_batch in sizes:
            local_batch = local_batch_of(global_batch)
            estimate = PEAK_PER_LOGITS * logits_bytes(mode, global_batch, local_batch)
            if estimate > max_bytes:
                skipped.append({"mode": mode, "global_batch": global_batch, "estimated_peak_gib": estimate / 2**30})
                print(f"{mode:>6} {global_batch:>6} {local_batch:>6}  skipped: ~{estimate / 2**30:.1f} GiB > --max-gib")
                continue
            result = run_point(mode, global_batch, local_batch, dim, threads)
            row = {
                "mode": mode,
                "global_batch": global_batch,
                "local_batch": local_batch,
                "world_size": global_batch // local_batch,
                "logits_mib": logits_bytes(mode, global_batch, local_batch) / 2**20,
                **result,
            }
            rows.append(row)
            print(
                f"{mode:>6} {global_batch:>6} {local_batch:>6} {row['world_size']:>5} {row['logits_mib']:>10.1f} "
                f"{row['peak_mib']:>9.1f} {row['seconds']:>8.3f}"
            )
    slopes = {}
    for mode in MODES:
        points = [row for row in rows if row["mode"] == mode]
        if len(points) >= 2:
            sizes_measured = [row["global_batch"] for row in points]
            slopes[mode] = {
                "memory": log_log_slope(sizes_measured, [row["peak_mib"] for row in points]),
                "time": log_log_slope(sizes_measured, [row["seconds"] for row in points]),
            }
            print(f"{mode:>6} growth exponent: memory {slopes[mode]['memory']:.2f}, time {slopes[mode]['time']:.2f}")
    return {"rows": rows, "skipped": skipped, "slopes": slopes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="global batch 1k..8k (under 2 minutes)")
    parser.add_argument("--local-batch", type=int, default=512, help="per-rank batch of the fixed-local sweep")
    parser.add_argument("--dim", type=int, default=256, help="embedding width")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--max-gib", type=float, default=6.0, help="skip points whose estimated peak exceeds this")
    args = parser.parse_args()

    largest = 8 * 1024 if args.quick else 32 * 1024
    sizes = [2**k for k in range(10, int(math.log2(largest)) + 1)]
    max_bytes = args.max_gib * 2**30
    fixed_local = sweep(
        f"fixed local batch N={args.local_batch}, world = G/N",
        sizes,
        lambda global_batch: args.local_batch,
        args.dim,
        args.threads,
        max_bytes,
    )
    two_processes = sweep(
        "two processes, N = G/2", sizes, lambda global_batch: global_batch // 2, args.dim, args.threads, max_bytes
    )

    print()
    targets = [
        Target(f"{mode}_memory_slope", fixed_local["slopes"].get(mode, {}).get("memory"), goal, comparison)
        for mode, (goal, comparison) in SLOPE_GOALS.items()
    ]
    path = write_result(
        "loss_memory",
        {
            "quick": args.quick,
            "config": {"local_batch": args.local_batch, "dim": args.dim, "threads": args.threads,
                       "max_gib": args.max_gib},
            "fixed_local_batch": fixed_local,
            "two_processes": two_processes,
            "targets": [target.as_dict() for target in targets],
        },
    )
    print(f"wrote {path}")
    for target in targets:
        print(target.line())

if __name__ == "__main__":
    main()
