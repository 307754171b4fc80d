"""Side-by-side timing of training loops: contenders forked from one process compute one step at a time, in turns
(`Lockstep`), so whatever else a shared machine runs slows each of them alike; `TurnClock` times their steps
(`common.StepTime`: from the start of a turn, so getting the batch counts), `UpdateClock` the optimizer updates
and `StepProbes` counts one step's FLOPs and profiles another. Used by `clip_vs_open_clip.py` and
`method_overhead.py`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import Instant, StepTime, matmul_ceiling
from lightning.pytorch import Callback
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

#: profiler operators counted as matrix work (matmul, attention, convolution).
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product", "convolution")


class StepProbes:
    """Counts FLOPs during step 0 and profiles the last warm-up step; both steps stay out of the timing."""

    def __init__(self, warmup: int, count_flops: bool) -> None:
        self.warmup = warmup
        self.count_flops = count_flops
        self.flops_per_step: int | None = None
        self.profile: dict | None = None
        self._counter: FlopCounterMode | None = None
        self._profiler: profile | None = None

    def start(self, index: int) -> None:
        if index == 0 and self.count_flops:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        elif index == self.warmup - 1:
            self._profiler = profile(activities=[ProfilerActivity.CPU])
            self._profiler.__enter__()

    def stop(self) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops_per_step = self._counter.get_total_flops()
            self._counter = None
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            self.profile = cpu_time_profile(self._profiler)
            self._profiler = None


def cpu_time_profile(profiler: profile) -> dict:
    """CPU seconds of one profiled step: all operators, the matmul-like ones, and the eight largest."""
    events = profiler.key_averages()
    total = sum(event.self_cpu_time_total for event in events) / 1e6
    matmul = sum(event.self_cpu_time_total for event in events if any(op in event.key for op in MATMUL_OPS)) / 1e6
    top = sorted(events, key=lambda event: event.self_cpu_time_total, reverse=True)[:8]
    return {
        "operators_cpu_s": total,
        "matmul_attention_conv_cpu_s": matmul,
        "top_operators_cpu_s": {event.key: event.self_cpu_time_total / 1e6 for event in top},
    }


class UpdateClock:
    """CPU seconds of every optimizer update (the parameter update alone).

    Starts at the optimizer's step pre-hook and stops at its post-hook. Lightning passes a closure that runs
    forward and backward inside `optimizer.step`, so there `on_before_optimizer_step` (after the closure) restarts
    the clock through `start`.
    """

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._started = 0.0
        register_optimizer_step_pre_hook(self.start)
        register_optimizer_step_post_hook(self.stop)

    def start(self, *hook_arguments: object) -> None:
        self._started = time.process_time()

    def stop(self, *hook_arguments: object) -> None:
        self.seconds.append(time.process_time() - self._started)


class Lockstep:
    """The contenders of one precision run side by side, one process each, but compute one at a time, in turns
    (A, B, C, A, B, C, ...): whatever else a shared machine runs meanwhile slows each of them alike.

    Every contender takes the same number of turns (one for the matmul ceiling, one per step). A start barrier
    keeps set-up work (imports are shared, but model building, Lightning's and open_clip's set-up) out of the turns,
    and a finish barrier keeps teardown (checkpoint saving) out of the others' last steps.
    """

    def __init__(self, size: int, timeout: float) -> None:
        context = multiprocessing.get_context("fork")
        self.turns = [context.Semaphore(1 if index == 0 else 0) for index in range(size)]
        self.started = context.Barrier(size, timeout=timeout)
        self.finished = context.Barrier(size, timeout=timeout)
        self.timeout = timeout
        self.index = 0  # each forked contender sets its own

    def take_turn(self) -> None:
        if not self.turns[self.index].acquire(timeout=self.timeout):
            raise TimeoutError(f"contender {self.index} waited {self.timeout:.0f} s for its turn")

    def pass_turn(self) -> None:
        self.turns[(self.index + 1) % len(self.turns)].release()


class TurnClock:
    """Runs one contender's steps in its turns and times them; the harnesses call it at three moments.

    `begin` once everything is set up; `batch_ready` when the step has its batch; `step_done` after the optimizer
    step. A step is timed from the start of its turn, so getting the batch counts (`StepTime`).
    """

    def __init__(self, lockstep: Lockstep, total_steps: int, warmup: int, ceiling_dtype: torch.dtype,
                 ceiling_seconds: float, count_flops: bool) -> None:
        self.lockstep = lockstep
        self.total_steps = total_steps
        self.ceiling_dtype = ceiling_dtype
        self.ceiling_seconds = ceiling_seconds
        self.probes = StepProbes(warmup, count_flops)
        self.ceiling: dict[str, float] = {}
        self.steps: list[StepTime] = []
        #: Lightning only: CPU seconds from the end of backward to the optimizer update (other callbacks' hooks).
        self.pre_update_hooks: list[float] = []
        self._turn_start = self._ready = Instant.now()

    def begin(self) -> None:
        """Wait for the group, measure the matmul ceiling in the first turn, then take the turn of step 0."""
        self.lockstep.started.wait()
        self.lockstep.take_turn()
        self.ceiling = matmul_ceiling(self.ceiling_dtype, min_seconds=self.ceiling_seconds)
        self.lockstep.pass_turn()
        self._take_turn()

    def batch_ready(self) -> None:
        self._ready = Instant.now()
        self.probes.start(len(self.steps))

    def step_done(self) -> None:
        self.probes.stop()
        end = Instant.now()
        self.steps.append(StepTime.between(self._turn_start, self._ready, end))
        self.lockstep.pass_turn()
        if len(self.steps) < self.total_steps:
            self._take_turn()
        else:
            self.lockstep.finished.wait()

    def _take_turn(self) -> None:
        self.lockstep.take_turn()
        self._turn_start = Instant.now()


class TurnClockCallback(Callback):
    """Drives a `TurnClock` from inside `Trainer.fit`: Lightning fetches the next batch between `on_train_batch_end`
    and `on_train_batch_start`. Appended last, its `on_before_optimizer_step` runs after every other callback's (the
    suite's NaN guard), so `pre_update_hooks` holds their time and `updates` clocks the update alone."""

    def __init__(self, clock: TurnClock, updates: UpdateClock) -> None:
        self.clock = clock
        self.updates = updates
        self._backward_done = 0.0

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if not self.clock.steps:
            self.clock.begin()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.clock.batch_ready()

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        self._backward_done = time.process_time()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.clock.pre_update_hooks.append(time.process_time() - self._backward_done)
        self.updates.start()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.clock.step_done()


def run_in_lockstep(
    names: list[str], body: Callable[[str, Lockstep, int], None], workdir: Path, timeout: float
) -> list[dict]:
    """Fork one process per name running `body(name, lockstep, index)`, in lockstep, and collect the JSON result
    each writes to `workdir/<name>.json`. When one fails (or this process is interrupted) the others are stopped,
    since they would wait for its turns, and the end of its log (`workdir/<name>.log`) is shown."""
    lockstep = Lockstep(len(names), timeout=timeout)
    context = multiprocessing.get_context("fork")

    def child_body(name: str, index: int) -> None:
        with (workdir / f"{name}.log").open("w") as log_file:
            os.dup2(log_file.fileno(), 1)
            os.dup2(log_file.fileno(), 2)
        lockstep.index = index
        body(name, lockstep, index)

    children = {name: context.Process(target=child_body, args=(name, index)) for index, name in enumerate(names)}
    for child in children.values():
        child.start()
    try:
        running = True
        while running:
            time.sleep(0.5)
            running = any(child.is_alive() for child in children.values())
            for name, child in children.items():
                if child.exitcode:
                    sys.stdout.write((workdir / f"{name}.log").read_text()[-4000:])
                    raise RuntimeError(f"{name} failed with exit code {child.exitcode} (log above)")
    finally:
        for child in children.values():
            if child.is_alive():
                child.terminate()
                child.join()
    return [json.loads((workdir / f"{name}.json").read_text()) for name in names]
