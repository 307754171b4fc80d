"""What `vlp fit` costs next to a bare loop, for every method of the index, at its tiny recipe.

For each method (read from `vlp_lightning.catalog`, so a method added later appears without edits) two contenders
train the same model with the same optimizer from its tiny recipe (`experiments/<method>/emoji_tiny.yaml`, at the
recipe's precision and DataLoader workers, on the recipe's real emoji shards):

* `vlp_fit`: `VLPCLI` with the recipe, the suite's whole path: data streaming from the shards, Lightning's loop,
  the recipe's callbacks, logging, the non-finite guard;
* `bare`: the model and optimizer `vlp fit` builds (`configure_optimizers`, so the same fused AdamW and schedule),
  in a plain loop over batches the recipe's data module made beforehand: the method's own per-step hooks
  (`on_train_batch_start`, `on_after_backward`, `after_optimizer_step`: queues, frozen prototypes, EMA teachers)
  and nothing else.

They run in lockstep (`lockstep.py`: forked after the heavy imports, one step per turn), so a shared machine slows
both alike. A step is timed from the start of its turn (getting the batch counts) on the CPU clock (`--clock`);
warm-up steps are dropped; every step stays in the first epoch (no evaluation at an epoch end). Reported per
method: samples/s of each, their ratio (target >= 0.97), the data-wait share of a `vlp fit` step (wall clock,
target <= 2 %), the optimizer update's share of a step, and two parts of a `vlp fit` step the bare loop does not
have: the views' photometric finish in the training process ("finish": jitter, blur, normalisation of the uint8
crops, `on_after_batch_transfer`) and the callbacks between backward and update ("hooks": the non-finite guard),
peak resident memory (`ru_maxrss`) of each process, and MFU (FLOPs of one bare step by `torch.utils.flop_counter`
/ median step / the matmul ceiling of the step's dtype).

A method's tiny recipe is its `emoji_tiny.yaml`, else the `*_tiny.yaml` that needs the fewest earlier runs (SIGMA's
pixel-target `moving_tiny`, not the DINO-target one; stage 1, not stage 2). Earlier runs a recipe names (a frozen
CLIP tower: `pretrained_clip`, `image_tower`, `target_tower`) are replaced by one 1-step CLIP run of
`experiments/clip/emoji_tiny.yaml` made here (the same architecture; speed does not depend on the weights), and a
`start_from` by none (it only loads weights). Frozen-LM recipes run their real SmolLM2-135M (fetched into the cache
on first use).

Usage: python bench/method_overhead.py [--quick] [--methods CLIP DINO ...] [--merge] [--steps 8] [--threads 1]
(`--quick`: CLIP, SimCLR and DINO, 4 timed steps each; `--merge`: keep the stored rows of the methods not run, and
those of other CPU kinds: one row per method and kind)
Prints a table and `target` lines, writes bench/results/method_overhead.json. The shards are built with the
command each recipe names (`vlp-data emoji data/emoji ...`, npm cache) when missing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml
from common import CLOCKS, REPO_ROOT, RESULTS_DIR, StepTime, Target, cpu_model, ensure_shards, publish, step_summary
from lockstep import Lockstep, TurnClock, TurnClockCallback, UpdateClock, run_in_lockstep

from data_modules.pipeline import STREAM_FIELD
from vlp_lightning import catalog
from vlp_lightning.cli import VLPCLI

CONTENDERS = ("vlp_fit", "bare")
GOALS = {"vs_bare": 0.97, "data_wait": 0.02}
#: `--quick` (under 3 minutes): one method per view kind, the contrastive image-text one among them.
QUICK_METHODS = ("CLIP", "SimCLR", "DINO")
#: CPU autocast dtype of each Lightning precision a tiny recipe may set.
AUTOCAST = {"bf16-mixed": torch.bfloat16}


#: arguments naming a frozen CLIP tower from an earlier run (replaced by the bench's start CLIP), and the one that
#: only loads a whole earlier run's weights (dropped).
TOWER_STARTS = ("pretrained_clip", "image_tower", "target_tower")
WEIGHTS_START = "start_from"


def model_arguments(recipe: Path) -> dict:
    return yaml.safe_load(recipe.read_text())["model"].get("init_args") or {}


def earlier_runs(recipe: Path) -> int:
    return sum(name in model_arguments(recipe) for name in (*TOWER_STARTS, WEIGHTS_START))


def tiny_recipe(entry: catalog.Entry) -> Path:
    """The method's `emoji_tiny.yaml`, else its `*_tiny.yaml` needing the fewest earlier runs (then the shortest)."""
    recipes = [recipe for recipe in entry.recipes() if recipe.stem.endswith("_tiny")]
    return min(recipes, key=lambda recipe: (recipe.stem != "emoji_tiny", earlier_runs(recipe), len(recipe.stem),
                                            recipe.stem))


def start_arguments(recipe: Path, start_clip: str | None) -> list[str]:
    """The overrides that stand the bench's start CLIP in for the recipe's earlier runs (module doc)."""
    arguments = model_arguments(recipe)
    overrides = [f"--model.init_args.{name}={start_clip}" for name in TOWER_STARTS if name in arguments]
    return overrides + (["--model.init_args.start_from=null"] if WEIGHTS_START in arguments else [])


def make_start_clip(workdir: Path) -> str:
    """One optimizer step of the CLIP tiny recipe in `workdir`: the frozen tower the recipes' earlier runs name."""
    root = workdir / "start-clip"
    subprocess.run([sys.executable, "-m", "vlp_lightning.cli", "fit", "--config",
                    str(REPO_ROOT / "experiments" / "clip" / "emoji_tiny.yaml"), "--trainer.max_steps=1",
                    "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
                    "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={root}",
                    "--trainer.callbacks=[]"], check=True, cwd=REPO_ROOT)
    checkpoints = sorted(root.glob("**/last.ckpt"))
    if not checkpoints:
        raise RuntimeError(f"the start CLIP run wrote no last.ckpt under {root}")
    return str(checkpoints[0])


def methods_to_run(names: list[str] | None) -> dict[str, Path]:
    """{method name: its tiny recipe} of the index (presets are the same code as their method, and adaptation methods,
    which need a pretrained run first, are left out)."""
    entries = [entry for entry in catalog.entries() if entry.preset_of is None and entry.family != "adaptation"]
    if names:
        entries = [catalog.find(name) for name in names]
    return {entry.name: tiny_recipe(entry) for entry in entries}


def cli_for(recipe: Path, total_steps: int, run_dir: Path, start: list[str]) -> VLPCLI:
    """The recipe as `vlp fit` builds it (with the `start` overrides), for `total_steps` steps, not validated (its
    logs and checkpoint go to `run_dir`, in the temporary folder)."""
    return VLPCLI(args=["--config", str(recipe), *start, f"--trainer.max_steps={total_steps}",
                        "--trainer.enable_progress_bar=false",
                        "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=0",
                        f"--trainer.default_root_dir={run_dir}"], run=False)


def run_vlp_fit(clock: TurnClock, updates: UpdateClock, recipe: Path, run_dir: Path, start: list[str]) -> dict:
    cli = cli_for(recipe, clock.total_steps, run_dir, start)
    clock.ceiling_dtype = AUTOCAST.get(str(cli.trainer.precision), torch.float32)  # MFU against the step's dtype
    cli.trainer.callbacks.append(TurnClockCallback(clock, updates))
    # Clock the photometric half of the views (jitter, blur, normalisation of the uint8 crops), which `vlp fit`
    # runs in the training process after the transfer and the bare loop's pre-made batches already hold.
    finish_seconds: list[float] = []
    finish = cli.datamodule.on_after_batch_transfer

    def clocked_finish(batch: dict, dataloader_idx: int) -> dict:
        started = time.process_time()
        batch = finish(batch, dataloader_idx)
        finish_seconds.append(time.process_time() - started)
        return batch

    cli.datamodule.on_after_batch_transfer = clocked_finish
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if cli.trainer.num_training_batches < clock.total_steps:  # an epoch end would have run evaluations
        raise RuntimeError(f"{clock.total_steps} steps overran the first epoch of {recipe}; time fewer steps")
    return {"batch_size": cli.datamodule.batch_size, "precision": str(cli.trainer.precision),
            "workers": cli.datamodule.num_workers, "finish_views_cpu_s": finish_seconds[clock.probes.warmup:],
            "pre_update_hooks_cpu_s": clock.pre_update_hooks[clock.probes.warmup:]}


def premade_batches(cli: VLPCLI, count: int) -> list[dict]:
    """`count` finished batches from the recipe's data module, in this process: the data module asks the attached
    model for its views, crop size, tokenizer and required keys (a DreamLIP's long captions), as under `vlp fit`."""
    cli.trainer.strategy.connect(cli.model)  # the trainer's `lightning_module`, which `setup` asks
    datamodule = cli.datamodule
    datamodule.trainer = cli.trainer
    datamodule.num_workers = 0
    datamodule.setup("fit")
    batches = []
    for batch in datamodule.train_dataloader():
        batch.pop(STREAM_FIELD, None)
        batches.append(datamodule.on_after_batch_transfer(batch, 0))  # the views' photometric half, done here
        if len(batches) == count:
            return batches
    raise RuntimeError(f"the recipe's shards hold fewer than {count} batches")


def run_bare(clock: TurnClock, updates: UpdateClock, recipe: Path, run_dir: Path, start: list[str]) -> dict:
    """The model and optimizer of `vlp fit`, the method's own hooks, on pre-made batches; nothing else."""
    cli = cli_for(recipe, clock.total_steps, run_dir, start)
    model = cli.model
    precision = str(cli.trainer.precision)
    clock.ceiling_dtype = AUTOCAST.get(precision, torch.float32)
    batches = premade_batches(cli, 4)
    # What the method reads of its trainer: the step counters and the schedule's length; logging is dropped.
    trainer = SimpleNamespace(global_step=0, current_epoch=0, estimated_stepping_batches=clock.total_steps,
                              max_steps=clock.total_steps, world_size=1, is_global_zero=True, training=True)
    model._trainer = trainer
    model.log = model.log_dict = lambda *args, **kwargs: None
    model.configure_model()
    configured = model.configure_optimizers()
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    scheduler = configured["lr_scheduler"]["scheduler"] if isinstance(configured, dict) else None
    autocast = AUTOCAST.get(precision)
    model.train()
    clock.begin()
    for index in range(clock.total_steps):
        batch = batches[index % len(batches)]
        clock.batch_ready()
        model.on_train_batch_start(batch, index)
        with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = model.forward_loss(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        model.on_after_backward()
        optimizer.step()
        model.after_optimizer_step()
        if scheduler is not None:
            scheduler.step()
        trainer.global_step += 1
        clock.step_done()
    return {"batch_size": len(batches[0]["__key__"]), "precision": precision}


def contender_body(contender: str, recipe: Path, start: list[str], args: argparse.Namespace):
    def body(name: str, lockstep: Lockstep, index: int) -> None:
        torch.set_num_threads(args.threads)
        updates = UpdateClock()
        clock = TurnClock(lockstep, args.warmup + args.steps, args.warmup, torch.float32, args.ceiling_seconds,
                          count_flops=contender == "bare")
        run = run_bare if contender == "bare" else run_vlp_fit
        details = run(clock, updates, recipe, args.workdir / name, start)
        if len(clock.steps) != clock.total_steps:
            raise RuntimeError(f"{name}: {len(clock.steps)} of {clock.total_steps} steps timed")
        result = {
            "contender": contender,
            **details,
            "matmul_ceiling_flops": clock.ceiling,
            "flops_per_step": clock.probes.flops_per_step,
            "steps": [vars(step) for step in clock.steps[args.warmup:]],
            "update_cpu_s": updates.seconds[args.warmup:],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        (args.workdir / f"{name}.json").write_text(json.dumps(result))

    return body


def summarise(method: str, runs: list[dict], clock: str) -> dict:
    by_contender = {run["contender"]: run for run in runs}
    row: dict = {"method": method, "precision": by_contender["vlp_fit"]["precision"],
                 "batch_size": by_contender["vlp_fit"]["batch_size"], "workers": by_contender["vlp_fit"]["workers"]}
    flops = by_contender["bare"]["flops_per_step"]
    ceiling = max(run["matmul_ceiling_flops"][clock] for run in runs)
    for contender, run in by_contender.items():
        summary = step_summary([StepTime(**step) for step in run["steps"]], run["batch_size"])
        update = statistics.median(run["update_cpu_s"]) if run["update_cpu_s"] else 0.0
        row[contender] = {
            f"samples_per_s_{clock}": summary[f"samples_per_s_{clock}"],
            "median_step_cpu_s": summary["median_step_cpu_s"],
            "data_wait_fraction": summary["data_wait_fraction"],
            "update_share_of_step_cpu": update / summary["median_step_cpu_s"],
            "peak_rss_mib": run["peak_rss_mib"],
            "mfu": flops / summary[f"median_step_{clock}_s"] / ceiling if flops else None,
        }
        for part in ("finish_views", "pre_update_hooks"):  # vlp fit only: work the bare loop does not do
            if run.get(f"{part}_cpu_s"):
                row[contender][f"{part}_share_of_step_cpu"] = (
                    statistics.median(run[f"{part}_cpu_s"]) / summary["median_step_cpu_s"])
    row["vs_bare"] = row["vlp_fit"][f"samples_per_s_{clock}"] / row["bare"][f"samples_per_s_{clock}"]
    row["flops_per_step"] = flops
    return row


def print_table(rows: list[dict], clock: str) -> None:
    print(f"\n{'method':<12} {'prec':<10} {'vlp fit/s':>9} {'bare/s':>8} {'ratio':>6} {'data wait':>9} "
          f"{'update':>7} {'finish':>7} {'hooks':>6} {'MFU':>5} {'RSS fit':>8} {'RSS bare':>8}  run")
    for row in rows:
        fit, bare = row["vlp_fit"], row["bare"]
        mfu = f"{bare['mfu']:.2f}" if bare["mfu"] else "-"
        print(f"{row['method']:<12} {row['precision']:<10} {fit[f'samples_per_s_{clock}']:>9.1f} "
              f"{bare[f'samples_per_s_{clock}']:>8.1f} {row['vs_bare']:>6.2f} {fit['data_wait_fraction']:>9.1%} "
              f"{fit['update_share_of_step_cpu']:>7.1%} {fit.get('finish_views_share_of_step_cpu', 0):>7.1%} "
              f"{fit.get('pre_update_hooks_share_of_step_cpu', 0):>6.1%} {mfu:>5} {fit['peak_rss_mib']:>7.0f}M "
              f"{bare['peak_rss_mib']:>7.0f}M  {row.get('date', '')} {row.get('cpu', '')}")


def cpu_kind(cpu: str) -> str:
    """The short name of a CPU model a row was measured on: "Intel Xeon", "AMD EPYC", else the model itself."""
    for vendor, family in (("Intel", "Xeon"), ("AMD", "EPYC")):
        if vendor in cpu and family in cpu:
            return f"{vendor} {family}"
    return cpu


def merge_rows(previous: dict, run_now: list[dict], order: list[str]) -> list[dict]:
    """The stored rows of `previous` (the last results file) merged with the rows run now: one row per (method, CPU
    kind), so a second machine's figures join the first's instead of replacing them; a row run now replaces the
    stored one of its method and kind. Sorted by the index's `order`, then the CPU kind."""
    made = {"cpu": previous["config"]["cpu"], "date": previous["machine"]["date"][:16].replace("T", " ")}
    merged = {(row["method"], cpu_kind(row["cpu"])): row for row in ({**made, **row} for row in previous["methods"])}
    merged.update({(row["method"], cpu_kind(row["cpu"])): row for row in run_now})
    return sorted(merged.values(), key=lambda row: (
        order.index(row["method"]) if row["method"] in order else len(order), cpu_kind(row["cpu"])))


def find_targets(rows: list[dict]) -> list[Target]:
    """Per row, its ratio and data wait; the CPU kind is named in the target where the method has rows of several."""
    kinds: dict[str, set[str]] = {}
    for row in rows:
        kinds.setdefault(row["method"], set()).add(cpu_kind(row.get("cpu", "")))
    targets = []
    for row in rows:
        on = f", {cpu_kind(row['cpu'])}" if len(kinds[row["method"]]) > 1 else ""
        targets.append(Target(f"{row['method']} vlp fit / bare ({row['precision']}{on})", row["vs_bare"],
                              GOALS["vs_bare"]))
        targets.append(Target(f"{row['method']} data wait share of a vlp fit step{on.replace(',', ' on', 1)}",
                              row["vlp_fit"]["data_wait_fraction"], GOALS["data_wait"], "<="))
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"4 timed steps per contender (default 8), methods {' '.join(QUICK_METHODS)} only")
    parser.add_argument("--methods", nargs="+", help="only these methods (names of `vlp methods`)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the stored rows (results/method_overhead.json) of the methods not run now, and "
                        "of the other CPU kinds (one row per method and kind)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (step 0 counts FLOPs); >= 1")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each contender")
    parser.add_argument("--clock", choices=CLOCKS, default="cpu")
    parser.add_argument("--ceiling-seconds", type=float, default=0.5)
    parser.add_argument("--turn-timeout", type=float, default=600)
    args = parser.parse_args()
    args.steps = args.steps or (4 if args.quick else 8)
    recipes = methods_to_run(args.methods or (list(QUICK_METHODS) if args.quick else None))
    os.chdir(REPO_ROOT)  # the recipes name their shards relative to the checkout
    ensure_shards(recipes)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="method_overhead-") as workdir:
        args.workdir = Path(workdir)
        start_clip = (make_start_clip(args.workdir)
                      if any(start_arguments(recipe, "") for recipe in recipes.values()) else None)
        for number, (method, recipe) in enumerate(recipes.items(), 1):
            method_started = time.perf_counter()
            names = [f"{method}-{contender}" for contender in CONTENDERS]
            start = start_arguments(recipe, start_clip)
            bodies = [contender_body(contender, recipe.resolve(), start, args) for contender in CONTENDERS]
            runs = run_in_lockstep(names, lambda name, lockstep, index: bodies[index](name, lockstep, index),
                                   args.workdir, args.turn_timeout)
            rows.append({**summarise(method, runs, args.clock), "cpu": cpu_model(),
                         "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime())})
            print(f"[{number}/{len(recipes)}] {method}: vlp fit / bare {rows[-1]['vs_bare']:.2f} "
                  f"({time.perf_counter() - method_started:.0f} s)", flush=True)
    stored = RESULTS_DIR / "method_overhead.json"
    if args.merge and stored.is_file():
        rows = merge_rows(json.loads(stored.read_text()), rows, list(methods_to_run(None)))
    print_table(rows, args.clock)
    targets = find_targets(rows)
    report = {
        "quick": args.quick,
        "config": {"timed_steps": args.steps, "warmup_steps": args.warmup, "threads": args.threads,
                   "clock": args.clock, "cpu": cpu_model()},
        "methods": rows,
        "targets": [target.as_dict() for target in targets],
        "seconds": time.perf_counter() - started,
    }
    publish("method_overhead", report, targets)


if __name__ == "__main__":
    main()
