"""Scenes: what region-, position- and long-caption-aware pretraining teaches, on the scenes of `vlp-data scenes`.

Every arm trains a tiny model from its recipe (`experiments/<method>/scenes_*.yaml`: the same ViT-Tiny 64 px tower,
text tower, batch, schedule and seed as `clip/scenes_tiny.yaml` unless the method needs otherwise) for the same
optimizer steps on the 4,500 training scenes, and is scored on the 500 val scenes and the 500 scenes of held-out
concepts. An arm is trained once and kept as `runs/bench/scenes/<arm>-<steps>.ckpt`, so every section that scores
it (and a later run of other sections) reuses it; `--retrain` trains again.

Sections (`--sections`; each keeps its own part of bench/results/scenes.json, the others stay as stored):

* **ptp** -- PTP (Wang et al. 2023, "Position-guided Text Prompt for Vision-Language Pre-training") adds "The block
  [P] has a [O]." to each training caption (P one of the 3 x 3 blocks, O the object covering most of it) and
  nothing at inference. Arms CLIP and CLIP + PTP (only `data.position_prompts` differs), scored by
  - **which block has the X?** For every object of a scene, the nine texts "The block P has a X." (P = 1..9, X its
    name) are ranked by cosine with the image in the joint space; correct when the best block is one the object
    covers (at least 2 % of the block, the scenes' `blocks` tags). Chance is the mean share of blocks an object
    covers (printed as a row).
  - **Retrieval** (`callbacks.Retrieval`): image -> text R@1 / R@5 among the scenes' own short captions, which
    carry no position words: the prompts must not cost ordinary retrieval.

* **ffr** -- FFR (Qraitem et al. 2024, "From Fake to Real"): on `vlp-data ffr` (Tux Paint photographs of birds and
  mammals, 95 % of the birds on grass and of the mammals on brick in the real training split; val / test balanced
  over the four (class, background) groups; a synthetic split of emoji birds and mammals balanced over the groups),
  one `experiments/ffr/` classifier (ViT 3 x 64 at 32 px, from scratch) per arm: no pretraining | FFR step 1 on the
  balanced synthetic split | pretraining on the real biased split (ERM), each x fine-tuning on the real biased split
  with ERM | GroupDRO (step 2, `start_from` the step 1 arm). Same budget per arm: `--steps` of pretraining plus
  `--steps` of fine-tuning (no pretraining: 2 x `--steps` of fine-tuning), seeds `FFR_SEEDS`. Scored by
  `callbacks.GroupAccuracy` on the balanced test split: worst-group and average accuracy (and on val).

Usage: python bench/scenes.py [--sections ptp ...] [--steps N] [--retrain] [--quick]
(writes bench/results/scenes.json; `--quick` is a 10-step smoke run into a temporary folder, results not kept)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
from common import REPO_ROOT, Target, publish

from data_modules.builder import main as vlp_data
from data_modules.pipeline import make_eval_loader
from vlp_lightning.callbacks import GroupAccuracy, Retrieval
from vlp_lightning.callbacks.features import evaluation_mode, new_evaluation_pass
from vlp_lightning.cli import VLPCLI
from vlp_lightning.hardware import cpu_model
from vlp_lightning.methods.base import VLPMethod
from vlp_lightning.pretrained import load_method

SCENES = "data/scenes"
SPLITS = {"val": f"{SCENES}/val-000000.tar", "unseen concepts": f"{SCENES}/unseen-000000.tar"}
FFR_DATA = "data/ffr"
#: the seeds every ffr arm trains with (seed 0 keeps the arm's plain name).
FFR_SEEDS = (0, 1)


def _seed(seed: int) -> str:
    return "" if seed == 0 else f" seed {seed}"


RESULTS = REPO_ROOT / "bench" / "results" / "scenes.json"
ARM_CACHE = REPO_ROOT / "runs" / "bench" / "scenes"

#: every arm: its recipe (under experiments/) and the extra `vlp fit` options it trains with.
ARMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "CLIP": ("clip/scenes_tiny.yaml", ()),
    "CLIP + PTP": ("clip/scenes_ptp_tiny.yaml", ()),
    **{f"FFR {start}{objective}{_seed(seed)}": (f"ffr/{recipe}", options + (
        f"--model.init_args.objective={objective.lower()}", "--data.num_workers=0", f"--seed_everything={seed}"))
       for start, recipe, options in (
           ("none ", "tuxpaint_baseline_tiny.yaml", ("--trainer.max_steps=double",)),
           ("synthetic ", "tuxpaint_step2_erm_tiny.yaml", ()),
           ("real ", "tuxpaint_step2_erm_tiny.yaml", ()))
       for objective in ("ERM", "GroupDRO") for seed in FFR_SEEDS},
    **{f"FFR step 1 synthetic{_seed(seed)}": ("ffr/tuxpaint_step1_tiny.yaml", (
        "--data.num_workers=0", f"--seed_everything={seed}")) for seed in FFR_SEEDS},
    **{f"FFR step 1 real{_seed(seed)}": ("ffr/tuxpaint_step1_tiny.yaml", (
        "--data.num_workers=0", f"--seed_everything={seed}",
        f"--data.train_shards={FFR_DATA}/train-{{000000..000001}}.tar",
        f"--model.init_args.classnames_from={FFR_DATA}/train-000000.tar")) for seed in FFR_SEEDS},
}
#: arms that start from another arm's checkpoint (`start_from`): FFR's step 2 after its step 1 of the same seed.
STARTS = {f"FFR {start} {objective}{_seed(seed)}": f"FFR step 1 {start}{_seed(seed)}" for start in ("synthetic", "real")
          for objective in ("ERM", "GroupDRO") for seed in FFR_SEEDS}


@dataclass
class Bench:
    """One run of the bench: the budget, where arms are kept, and the arms trained or loaded so far."""

    steps: int
    cache: Path
    retrain: bool = False
    trainer: pl.Trainer = field(default_factory=lambda: pl.Trainer(accelerator="cpu", devices=1, logger=False,
                                                                   enable_progress_bar=False))
    methods: dict[str, VLPMethod] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def arm(self, name: str) -> VLPMethod:
        """The arm `name` of `ARMS` trained for `steps` optimizer steps (trained now, or loaded from the cache), in
        eval mode; its training time is `seconds[name]` (the stored time when loaded)."""
        if name in self.methods:
            return self.methods[name]
        checkpoint = self.checkpoint(name)
        timing = checkpoint.with_suffix(".json")
        if self.retrain or not checkpoint.is_file():
            recipe, options = ARMS[name]
            if name in STARTS:
                self.arm(STARTS[name])
                options += (f"--model.init_args.start_from={self.checkpoint(STARTS[name])}",)
            steps = 2 * self.steps if "--trainer.max_steps=double" in options else self.steps
            options = tuple(option for option in options if option != "--trainer.max_steps=double")
            torch.manual_seed(0)
            start = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="vlp-scenes-") as root:
                cli = VLPCLI(args=[
                    "--config", str(REPO_ROOT / "experiments" / recipe), f"--trainer.max_steps={steps}",
                    "--data.val_shards=null", "--data.test_shards=null", "--trainer.callbacks=[]",
                    f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
                    "--trainer.enable_model_summary=false", "--checkpoint.save_top_k=0",
                    "--checkpoint.save_last=false", *options,
                ], run=False)
                cli.trainer.fit(cli.model, datamodule=cli.datamodule)
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                partial = checkpoint.with_suffix(".partial")  # renamed when whole: a reader never sees half a file
                cli.trainer.save_checkpoint(partial)
                timing.write_text(json.dumps({"seconds": time.perf_counter() - start,
                                              "steps": cli.trainer.global_step, "cpu": cpu_model(),
                                              "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}))
                partial.replace(checkpoint)
        method, _ = load_method(str(checkpoint))
        self.methods[name] = method.eval()
        self.seconds[name] = json.loads(timing.read_text())["seconds"] if timing.is_file() else float("nan")
        return method

    def checkpoint(self, name: str) -> Path:
        """Where the arm `name` trained for `steps` is kept."""
        return self.cache / f"{name.replace(' ', '').replace('+', '_')}-{self.steps}.ckpt"

    def evaluate(self, method: VLPMethod) -> evaluation_mode:
        """The context every score is taken in (eval mode, no gradient), after a fresh evaluation pass."""
        new_evaluation_pass()
        return evaluation_mode(self.trainer, method)


# ------------------------------------------------------------------------------------------------------ ptp
def block_query(method, shards: str) -> dict[str, float]:
    """`accuracy` of "which block has the X?" over every object of `shards`' scenes, and `chance` (module doc)."""
    right = total = 0
    covered_share = 0.0
    for batch in make_eval_loader(shards, image_size=method.image_size, batch_size=64):
        images = method.encode_image(batch["image"])
        for image, meta in zip(images, batch["meta"]):
            tags = meta["blocks"]["objects"]
            cells = len(tags)
            for index, item in enumerate(meta["objects"]):
                texts = [f"The block {cell + 1} has a {item['name']}." for cell in range(cells)]
                best = int((method.encode_text(method.tokenizer(texts)) @ image).argmax())
                covers = {cell for cell, objects in enumerate(tags) if index in objects}
                right += best in covers
                covered_share += len(covers) / cells
                total += 1
    return {"accuracy": right / total, "chance": covered_share / total, "objects": total}


def retrieval(bench: Bench, method: VLPMethod, shards: str, split: str) -> dict[str, float]:
    """Image <-> short-caption retrieval of `shards` (`callbacks.Retrieval`), keyed `i2t_R@1` ... `t2i_R@10`."""
    scored = Retrieval(shards, name=split, num_examples=0).evaluate(bench.trainer, method)
    return {name.rsplit("/", 1)[1]: value for name, value in scored.items()}


def ptp(bench: Bench) -> dict:
    rows: dict[str, dict] = {}
    for arm in ("CLIP", "CLIP + PTP"):
        method = bench.arm(arm)
        rows[arm] = {"steps": bench.steps, "seconds": bench.seconds[arm]}
        with bench.evaluate(method):
            for split, shards in SPLITS.items():
                rows[arm][split] = {**block_query(method, shards), **retrieval(bench, method, shards, split)}
        print(f"{arm}: {json.dumps(rows[arm])}", flush=True)
    return {"arms": rows, "table": ptp_table(rows)}


def ptp_targets(part: dict) -> list[Target]:
    rows = part["arms"]
    return [Target(f"PTP - CLIP block accuracy, {split} (points)",
                   100 * (rows["CLIP + PTP"][split]["accuracy"] - rows["CLIP"][split]["accuracy"]), 0.0)
            for split in SPLITS]


def ptp_table(rows: dict[str, dict]) -> str:
    lines = ["| arm | split | steps | which block has the X? | chance | i2t R@1 | i2t R@5 |",
             "|---|---|---|---|---|---|---|"]
    for arm, row in rows.items():
        for split in SPLITS:
            scores = row[split]
            lines.append(f"| {arm} | {split} | {row['steps']} | {100 * scores['accuracy']:.1f} | "
                         f"{100 * scores['chance']:.1f} | {100 * scores['i2t_R@1']:.1f} | "
                         f"{100 * scores['i2t_R@5']:.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ ffr
FFR_STARTS = {"none": "no pretraining", "synthetic": "FFR: balanced synthetic", "real": "real biased"}


def ffr(bench: Bench) -> dict:
    if not (REPO_ROOT / FFR_DATA / "manifest.json").is_file():
        vlp_data(["ffr", str(REPO_ROOT / FFR_DATA)])
    rows: dict[str, dict] = {}
    for start, objective, seed in ((start, objective, seed) for seed in FFR_SEEDS for start in FFR_STARTS
                                   for objective in ("ERM", "GroupDRO")):
        arm = f"FFR {start} {objective}{_seed(seed)}"
        if arm in STARTS:  # step 1 (loaded when cached): its time counts toward the arm's
            bench.arm(STARTS[arm])
        method = bench.arm(arm)
        seconds = bench.seconds[arm] + (bench.seconds[STARTS[arm]] if arm in STARTS else 0.0)
        rows[arm] = {"start": start, "objective": objective, "seed": seed, "steps": 2 * bench.steps,
                     "seconds": seconds}
        with bench.evaluate(method):
            for split in ("val", "test"):
                callback = GroupAccuracy(f"{REPO_ROOT / FFR_DATA}/{split}-000000.tar", name=split)
                scores = callback.evaluate(bench.trainer, method)
                rows[arm][split] = {name.split("/", 2)[2]: value for name, value in scores.items()}
        print(f"{arm}: {json.dumps(rows[arm])}", flush=True)
    return {"arms": rows, "table": ffr_table(rows)}


def ffr_mean(rows: dict[str, dict], start: str, objective: str, metric: str) -> float:
    """The mean over the seeds of an arm's test `metric`."""
    scores = [row["test"][metric] for row in rows.values() if (row["start"], row["objective"]) == (start, objective)]
    return sum(scores) / len(scores)


def ffr_targets(part: dict) -> list[Target]:
    rows = part["arms"]
    return [Target(f"FFR - real-data pretraining, test worst-group accuracy, {objective}, seed mean (points)",
                   100 * (ffr_mean(rows, "synthetic", objective, "worst") - ffr_mean(rows, "real", objective, "worst")),
                   0.0)
            for objective in ("ERM", "GroupDRO")]


def ffr_table(rows: dict[str, dict]) -> str:
    lines = ["| pretraining | fine-tuning | seed | steps | test worst-group | test average | val worst-group | "
             "test per group |", "|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows.values(), key=lambda row: (list(FFR_STARTS).index(row["start"]), row["objective"],
                                                       row.get("seed", 0))):
        test = row["test"]
        groups = ", ".join(f"{name.split('/', 1)[1]} {100 * value:.0f}" for name, value in test.items()
                           if name.startswith("group/"))
        lines.append(f"| {FFR_STARTS[row['start']]} | {row['objective']} | {row.get('seed', 0)} | {row['steps']} | "
                     f"{100 * test['worst']:.1f} | {100 * test['average']:.1f} | {100 * row['val']['worst']:.1f} | "
                     f"{groups} |")
    for start in FFR_STARTS:
        for objective in ("ERM", "GroupDRO"):
            lines.append(f"| {FFR_STARTS[start]} | {objective} | mean | | "
                         f"{100 * ffr_mean(rows, start, objective, 'worst'):.1f} | "
                         f"{100 * ffr_mean(rows, start, objective, 'average'):.1f} | | |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- sections
#: each section: (what it measures and returns as its part of the report, its targets from that part alone, so a
#: stored part's targets can be recomputed).
SECTIONS: dict[str, tuple[Callable[[Bench], dict], Callable[[dict], list[Target]]]] = {
    "ptp": (ptp, ptp_targets),
    "ffr": (ffr, ffr_targets),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these sections; the others keep their stored results")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per arm (default 150)")
    parser.add_argument("--retrain", action="store_true", help="train every arm again instead of loading it")
    parser.add_argument("--quick", action="store_true", help="10 steps per arm: a smoke run of the bench")
    args = parser.parse_args()
    if "ptp" in args.sections and not (REPO_ROOT / SCENES / "manifest.json").is_file():
        vlp_data(["scenes", SCENES])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vlp-scenes-arms-") as scratch:
        bench = Bench(steps=10 if args.quick else args.steps, cache=Path(scratch) if args.quick else ARM_CACHE,
                      retrain=args.retrain)
        parts = {name: SECTIONS[name][0](bench) for name in args.sections}
    # Read the stored results only now, so two runs of different sections at once both keep their sections.
    kept = json.loads(RESULTS.read_text()) if RESULTS.is_file() and not args.quick else {}
    when = {"date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "cpu": cpu_model(), "steps": bench.steps}
    sections = {**{name: part for name, part in kept.get("sections", {}).items() if name in SECTIONS}, **parts}
    report = {"seconds": time.perf_counter() - started, "sections": sections,
              "section_runs": {**kept.get("section_runs", {}), **{name: when for name in parts}}}
    for name, part in parts.items():
        print(f"\n{name}:\n{part['table']}")
    targets = [target for name, part in sections.items() for target in SECTIONS[name][1](part)]
    if args.quick:
        for target in targets:
            print(target.line())
        return
    publish("scenes", report, targets)


if __name__ == "__main__":
    main()
