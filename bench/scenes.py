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

* **captions** -- the captions study: does CLIP profit from quality (long) captions, and does DreamLIP (Zheng et al.
  2024, "DreamLIP: Language-Image Pre-training with Long Captions") use them better? Arms CLIP (short `.txt`
  captions), CLIP long (the `.json` long caption: one sentence per object with colour, size, position, relations),
  CLIP mixed (short or long per sample), all `clip/scenes_tiny.yaml` with only `data.caption_source` changed, and
  DreamLIP (`dreamlip/scenes_tiny.yaml`: short caption + K = 3 sentences of the long one per step). Scored by
  - **long-caption retrieval** (`callbacks.Retrieval(caption_source="long")`): image <-> its long caption among the
    split's 500, R@1 / R@5 both ways (the text tower reads the first 48 tokens, as in training);
  - **short-caption retrieval**: the same with the `.txt` captions;
  - **objects by name**: zero-shot recognition of a scene's objects. Every concept name of the scenes (seen and
    held-out, 1,411) becomes the prompt "a photo of a <name>"; for an image with m distinct object names, the m most
    similar prompts are its prediction, and the score is the share of the distinct objects among them (multi-label
    top-m hits; chance m / 1,411 averaged the same way, printed as a column).

Usage: python bench/scenes.py [--sections ptp ...] [--steps N] [--retrain] [--quick] [--cached-only]
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
import torch.nn.functional as F
from common import REPO_ROOT, Target, publish

from data_modules.builder import main as vlp_data
from data_modules.pipeline import make_eval_loader
from vlp_lightning.callbacks import Retrieval
from vlp_lightning.callbacks.features import encode_texts, evaluation_mode, method_eval_loader, new_evaluation_pass
from vlp_lightning.cli import VLPCLI
from vlp_lightning.hardware import cpu_model
from vlp_lightning.methods.base import VLPMethod
from vlp_lightning.pretrained import load_method

SCENES = "data/scenes"
SPLITS = {"val": f"{SCENES}/val-000000.tar", "unseen concepts": f"{SCENES}/unseen-000000.tar"}
RESULTS = REPO_ROOT / "bench" / "results" / "scenes.json"
ARM_CACHE = REPO_ROOT / "runs" / "bench" / "scenes"

#: every arm: its recipe (under experiments/) and the extra `vlp fit` options it trains with.
ARMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "CLIP": ("clip/scenes_tiny.yaml", ()),
    "CLIP + PTP": ("clip/scenes_ptp_tiny.yaml", ()),
    "CLIP long": ("clip/scenes_long_tiny.yaml", ()),
    "CLIP mixed": ("clip/scenes_mixed_tiny.yaml", ()),
    "DreamLIP": ("dreamlip/scenes_tiny.yaml", ()),
}


@dataclass
class Bench:
    """One run of the bench: the budget, where arms are kept, and the arms trained or loaded so far."""

    steps: int
    cache: Path
    retrain: bool = False
    cached_only: bool = False
    trainer: pl.Trainer = field(default_factory=lambda: pl.Trainer(accelerator="cpu", devices=1, logger=False,
                                                                   enable_progress_bar=False))
    methods: dict[str, VLPMethod] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def checkpoint(self, name: str) -> Path:
        """Where the arm `name` at `steps` steps is cached."""
        return self.cache / f"{name.replace(' ', '').replace('+', '_')}-{self.steps}.ckpt"

    def available(self, name: str) -> bool:
        """Whether a section may score the arm `name` now: always, unless `cached_only` and it is not cached."""
        return not self.cached_only or name in self.methods or self.checkpoint(name).is_file()

    def arm(self, name: str) -> VLPMethod:
        """The arm `name` of `ARMS` trained for `steps` optimizer steps (trained now, or loaded from the cache), in
        eval mode; its training time is `seconds[name]` (the stored time when loaded)."""
        if name in self.methods:
            return self.methods[name]
        checkpoint = self.checkpoint(name)
        timing = checkpoint.with_suffix(".json")
        if self.retrain or not checkpoint.is_file():
            recipe, options = ARMS[name]
            torch.manual_seed(0)
            start = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="vlp-scenes-") as root:
                cli = VLPCLI(args=[
                    "--config", str(REPO_ROOT / "experiments" / recipe), f"--trainer.max_steps={self.steps}",
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


def retrieval(bench: Bench, method: VLPMethod, shards: str, split: str, caption_source: str = "short"
              ) -> dict[str, float]:
    """Image <-> caption retrieval of `shards` (`callbacks.Retrieval`; the `.txt` short captions, or the `.json` long
    ones with caption_source="long"), keyed `i2t_R@1` ... `t2i_R@10`."""
    scored = Retrieval(shards, name=split, num_examples=0, caption_source=caption_source).evaluate(bench.trainer,
                                                                                                    method)
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


# -------------------------------------------------------------------------------------------------- captions
CAPTION_ARMS = ("CLIP", "CLIP long", "CLIP mixed", "DreamLIP")
PROMPT = "a photo of a {}"


def concept_names() -> list[str]:
    """Every object name of the scenes (the manifest's seen and held-out concepts), the zero-shot label set."""
    classnames = json.loads((REPO_ROOT / SCENES / "manifest.json").read_text())["classnames"]
    return sorted({name for names in classnames.values() for name in names})


def object_recognition(method: VLPMethod, shards: str, names: list[str]) -> dict[str, float]:
    """Zero-shot recognition of a scene's objects by name (module doc): for an image with m distinct object names,
    the m names whose prompt "a photo of a <name>" is most similar to it, among all `names`; `accuracy` is the share
    of the distinct objects found (multi-label top-m hits), `chance` its value for a random ranking (m / C)."""
    prompts = F.normalize(encode_texts(method, method.tokenizer, [PROMPT.format(name) for name in names], 256),
                          dim=-1)
    index = {name: position for position, name in enumerate(names)}
    loader, _ = method_eval_loader(method, shards, batch_size=64)
    found = total = 0
    chance = 0.0
    for batch in loader:
        scores = method.encode_image(batch["image"]).float().cpu() @ prompts.T  # [N, C]
        for row, meta in zip(scores, batch["meta"]):
            wanted = {index[item["name"]] for item in meta["objects"]}
            top = set(row.topk(len(wanted)).indices.tolist())
            found += len(wanted & top)
            total += len(wanted)
            chance += len(wanted) ** 2 / len(names)
    return {"accuracy": found / total, "chance": chance / total, "objects": total}


def captions(bench: Bench) -> dict:
    names = concept_names()
    rows: dict[str, dict] = {}
    skipped = [arm for arm in CAPTION_ARMS if not bench.available(arm)]
    for arm in (arm for arm in CAPTION_ARMS if arm not in skipped):
        method = bench.arm(arm)
        rows[arm] = {"steps": bench.steps, "seconds": bench.seconds[arm]}
        with bench.evaluate(method):
            for split, shards in SPLITS.items():
                rows[arm][split] = {
                    "long": retrieval(bench, method, shards, split, caption_source="long"),
                    "short": retrieval(bench, method, shards, split),
                    "objects": object_recognition(method, shards, names),
                }
        print(f"{arm}: {json.dumps(rows[arm])}", flush=True)
    return {"arms": rows, "not_trained": skipped, "classes": len(names), "prompt": PROMPT,
            "table": captions_table(rows) + (f"\n\nNot trained in this run (`--cached-only`): {', '.join(skipped)}."
                                             if skipped else "")}


def mean_recall_at_1(scores: dict[str, float]) -> float:
    """The mean of image -> text and text -> image R@1."""
    return 0.5 * (scores["i2t_R@1"] + scores["t2i_R@1"])


def captions_targets(part: dict) -> list[Target]:
    rows = part["arms"]
    both = "DreamLIP" in rows and "CLIP" in rows  # an arm left untrained (`--cached-only`): no measurement, a miss
    return [Target(f"DreamLIP - CLIP long-caption R@1 (mean of both directions), {split} (points; 0.1 = one hit)",
                   100 * (mean_recall_at_1(rows["DreamLIP"][split]["long"])
                          - mean_recall_at_1(rows["CLIP"][split]["long"])) if both else None, 0.1)
            for split in SPLITS]


def captions_table(rows: dict[str, dict]) -> str:
    lines = ["| arm | split | long i2t R@1 | long i2t R@5 | long t2i R@1 | long t2i R@5 | short i2t R@1 "
             "| short i2t R@5 | short t2i R@1 | short t2i R@5 | objects by name | chance |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, row in rows.items():
        for split in SPLITS:
            long, short, objects = row[split]["long"], row[split]["short"], row[split]["objects"]
            recalls = [scores[f"{direction}_R@{k}"] for scores in (long, short) for direction in ("i2t", "t2i")
                       for k in (1, 5)]
            lines.append(f"| {arm} | {split} | " + " | ".join(f"{100 * value:.1f}" for value in recalls)
                         + f" | {100 * objects['accuracy']:.1f} | {100 * objects['chance']:.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- sections
#: each section: (what it measures and returns as its part of the report, its targets from that part alone, so a
#: stored part's targets can be recomputed).
SECTIONS: dict[str, tuple[Callable[[Bench], dict], Callable[[dict], list[Target]]]] = {
    "ptp": (ptp, ptp_targets),
    "captions": (captions, captions_targets),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these sections; the others keep their stored results")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per arm (default 150)")
    parser.add_argument("--retrain", action="store_true", help="train every arm again instead of loading it")
    parser.add_argument("--quick", action="store_true", help="10 steps per arm: a smoke run of the bench")
    parser.add_argument("--cached-only", action="store_true",
                        help="score only the arms already cached (sections that support it list the others)")
    args = parser.parse_args()
    if not (REPO_ROOT / SCENES / "manifest.json").is_file():
        vlp_data(["scenes", SCENES])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vlp-scenes-arms-") as scratch:
        bench = Bench(steps=10 if args.quick else args.steps, cache=Path(scratch) if args.quick else ARM_CACHE,
                      retrain=args.retrain, cached_only=args.cached_only)
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
