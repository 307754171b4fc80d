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

* **grain** -- GRAIN (Halbe et al. 2024, "Grounding Descriptions in Images informs Zero-Shot Visual Recognition")
  adds to CLIP a decoder of region queries trained on each object's box and region description ("a medium pink tram
  car in the center"). Arms CLIP and GRAIN (same towers, batch, schedule, seed, precision), scored by
  - **Phrase grounding** (`callbacks.PhraseGrounding`, field `regions`): each object's region description gets a
    box; acc@0.5 and mean IoU against the true box. GRAIN answers with its best-matching region query's box. CLIP has
    no box head: its zero-shot box is that of the patches whose embedding (the tower's patch tokens through CLIP's
    image projection) is most similar to the description, thresholded half way between the map's lowest and
    highest cosine (`callbacks.PatchTextGrounding`). `constant_box_grounding` (a centred box of the mean true size)
    is the box prior.
  - **Zero-shot recognition with descriptions**: every object of a split's scenes, cropped from the 256 px scene (its
    box grown to a square 1.25x its longer side) and resized to the model's input, is classified among the concept
    names of those objects (val: seen concepts; unseen concepts: held-out ones) by cosine with the image
    embedding (GRAIN: its global query's, as the official evaluation). Two classifiers, as in the paper's
    comparison: the names alone ("a tram car") and the names with descriptions, the mean embedding of "a {colour}
    {name}" over the colours the concept is drawn in (class-level attributes, as Menon & Vondrick's descriptors
    are; the official evaluation's "{template} which has {descriptor}" averaged per class).
  Both score the first scenes of each split in shard order, whole batches of 64 until `GRAIN_OBJECTS` objects
  (128 of its 500 scenes), the same scenes for every arm.

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
import torch.nn.functional as F
from common import REPO_ROOT, Target, publish
from torchvision.ops import roi_align

from data_modules.builder import main as vlp_data
from data_modules.pipeline import make_eval_loader
from data_modules.views import EvalView
from vlp_lightning.callbacks import PatchTextGrounding, PhraseGrounding, Retrieval, constant_box_grounding
from vlp_lightning.callbacks.features import evaluation_mode, new_evaluation_pass
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
    "GRAIN": ("grain/scenes_tiny.yaml", ()),
}


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
        checkpoint = self.cache / f"{name.replace(' ', '').replace('+', '_')}-{self.steps}.ckpt"
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


# ----------------------------------------------------------------------------------------------------- grain
#: the side of the stored scenes, in pixels (`vlp-data scenes`), which the recognition crops are cut from.
SCENE_SIZE = 256
#: how much a recognition crop grows an object's box (a square of this times its longer side).
CROP_CONTEXT = 1.25
#: the objects (phrases) of each split the grain section scores, whole scenes in shard order (the CPU is shared).
GRAIN_OBJECTS = 400


def phrase_grounding(bench: Bench, method: VLPMethod, shards: str, split: str) -> dict[str, float]:
    """acc@0.5 and mean IoU of every region description of `shards` (module doc: GRAIN's own boxes, CLIP's
    `PatchTextGrounding`)."""
    grounder = method if callable(getattr(method, "ground", None)) else PatchTextGrounding(method)
    scored = PhraseGrounding(shards, name=split, field="regions", max_phrases=GRAIN_OBJECTS).evaluate(bench.trainer,
                                                                                                     grounder)
    return {name.rsplit("/", 1)[1]: value for name, value in scored.items()}


def object_crops(method: VLPMethod, shards: str) -> tuple[torch.Tensor, list[str], dict[str, set[str]]]:
    """The objects of `shards`' first scenes (whole batches, until `GRAIN_OBJECTS`), each as a crop at the method's
    input size [P, 3, S, S] (module doc), its concept name, and each concept's colours."""
    mean, std = method.train_views().normalization
    crops, names, colours = [], [], {}
    for batch in make_eval_loader(shards, SCENE_SIZE, batch_size=64, view=EvalView(mean=mean, std=std)):
        if len(names) >= GRAIN_OBJECTS:
            break
        regions = []
        for boxes, meta, objects in zip(batch["boxes"], batch["meta"], batch["objects"]):
            centre, side = (boxes[:, :2] + boxes[:, 2:]) / 2, CROP_CONTEXT * (boxes[:, 2:] - boxes[:, :2]).amax(1)
            regions.append(torch.cat([centre - side[:, None] / 2, centre + side[:, None] / 2], 1))
            for index in objects.tolist():
                item = meta["objects"][index]
                names.append(item["name"])
                colours.setdefault(item["name"], set()).add(item["colour"])
        crops.append(roi_align(batch["image"], regions, method.image_size, aligned=True))
    return torch.cat(crops), names, colours


def class_embeddings(method: VLPMethod, texts: list[list[str]]) -> torch.Tensor:
    """Per class the renormalised mean of its texts' unit embeddings [C, D] (CLIP's prompt ensembling)."""
    embedded = []
    for class_texts in texts:
        features = method.encode_text(method.tokenizer(class_texts)).mean(0)
        embedded.append(F.normalize(features, dim=-1))
    return torch.stack(embedded)


def described_recognition(method: VLPMethod, shards: str) -> dict[str, float]:
    """Top-1 accuracy of classifying the object crops of `shards` among their concepts by their names alone
    (`names`) and by their names with descriptions (`descriptions`), and `chance` (module doc)."""
    crops, names, colours = object_crops(method, shards)
    concepts = sorted(colours)
    truth = torch.tensor([concepts.index(name) for name in names])
    images = torch.cat([method.encode_image(chunk) for chunk in crops.split(128)])
    scores = {}
    for kind, texts in (("names", [[f"a {name}"] for name in concepts]),
                        ("descriptions", [[f"a {colour} {name}" for colour in sorted(colours[name])]
                                          for name in concepts])):
        predicted = (images @ class_embeddings(method, texts).T).argmax(1)
        scores[kind] = (predicted == truth).float().mean().item()
    return {**scores, "chance": 1 / len(concepts), "objects": len(names), "concepts": len(concepts)}


def grain(bench: Bench) -> dict:
    rows: dict[str, dict] = {}
    for arm in ("CLIP", "GRAIN"):
        method = bench.arm(arm)
        rows[arm] = {"steps": bench.steps, "seconds": bench.seconds[arm],
                     "boxes": "region queries" if callable(getattr(method, "ground", None)) else "patch-text map"}
        with bench.evaluate(method):
            for split, shards in SPLITS.items():
                rows[arm][split] = {"grounding": phrase_grounding(bench, method, shards, split),
                                    "recognition": described_recognition(method, shards)}
        print(f"{arm}: {json.dumps(rows[arm])}", flush=True)
    prior = {split: constant_box_grounding(shards, bench.arm("GRAIN").image_size, kind="centre")
             for split, shards in SPLITS.items()}
    return {"arms": rows, "box_prior": prior, "table": grain_table(rows, prior)}


def grain_targets(part: dict) -> list[Target]:
    rows = part["arms"]
    targets = []
    for split in SPLITS:
        grain_row, clip_row = rows["GRAIN"][split], rows["CLIP"][split]
        targets.append(Target(f"GRAIN - CLIP grounding acc@0.5, {split} (points)",
                              100 * (grain_row["grounding"]["acc@0.5"] - clip_row["grounding"]["acc@0.5"]), 0.1))
        targets.append(Target(f"GRAIN - CLIP zero-shot recognition with descriptions, {split} (points)",
                              100 * (grain_row["recognition"]["descriptions"]
                                     - clip_row["recognition"]["descriptions"]), 0.1))
    return targets


def grain_table(rows: dict[str, dict], prior: dict[str, dict]) -> str:
    lines = ["| arm | split | steps | boxes | grounding acc@0.5 | mean IoU | zero-shot: names | names + descriptions "
             "| chance |", "|---|---|---|---|---|---|---|---|---|"]
    for arm, row in rows.items():
        for split in SPLITS:
            grounding, recognition = row[split]["grounding"], row[split]["recognition"]
            lines.append(f"| {arm} | {split} | {row['steps']} | {row['boxes']} | {100 * grounding['acc@0.5']:.1f} | "
                         f"{grounding['mean_iou']:.3f} | {100 * recognition['names']:.1f} | "
                         f"{100 * recognition['descriptions']:.1f} | {100 * recognition['chance']:.1f} |")
    for split, scores in prior.items():
        lines.append(f"| box prior (centred mean-size box) | {split} | - | constant | {100 * scores['acc@0.5']:.1f} | "
                     f"{scores['mean_iou']:.3f} | - | - | - |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- sections
#: each section: (what it measures and returns as its part of the report, its targets from that part alone, so a
#: stored part's targets can be recomputed).
SECTIONS: dict[str, tuple[Callable[[Bench], dict], Callable[[dict], list[Target]]]] = {
    "ptp": (ptp, ptp_targets),
    "grain": (grain, grain_targets),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these sections; the others keep their stored results")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per arm (default 150)")
    parser.add_argument("--retrain", action="store_true", help="train every arm again instead of loading it")
    parser.add_argument("--quick", action="store_true", help="10 steps per arm: a smoke run of the bench")
    args = parser.parse_args()
    if not (REPO_ROOT / SCENES / "manifest.json").is_file():
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
