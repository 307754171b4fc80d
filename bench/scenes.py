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
* **probes** -- dense and compositional probes of every CLIP-family arm of `ARMS` whose checkpoint is cached
  (`Bench.trained_arms`; no arm is trained here), on val and unseen concepts:
  - **dense probe** (`callbacks.DenseProbe`): a linear classifier of background + the 7 emoji categories on the
    frozen patch features of 256 training scenes (L-BFGS, 100 iterations), mIoU at pixel resolution (bilinear
    logits) on 256 scenes of the split;
  - **patch-prompt segmentation** (`callbacks.ZeroShotSegmentation`, MMC): each object instance of 256 scenes
    prompted by one of its patches, the best mIoU over the thresholds 0.2 ... 0.8;
  - **SNARE** (`callbacks.CompositionalProbe`): true caption vs attribute swap, relation exchange, word shuffle,
    negation, all built from the scene graph, on the 500 scenes (chance 0.5);
  - **MMVP** (`callbacks.MMVPPairs`): pair accuracy (chance 0.25) on CLIP-blind pairs of `vlp-data
    emoji-contrasts` (skin tones; Google vs Twitter drawings), mined once with the CLIP arm and a MoCo v3 emoji
    checkpoint (`SSL_CHECKPOINT`) and kept in bench/results/mmvp_pairs.json.
  Reference rows: raw pixels (each 8 x 8 patch's pixels as its feature) and the untrained CLIP recipe (random
  init) for the dense probes; the random-init CLIP for SNARE and MMVP, beside their chance.

Usage: python bench/scenes.py [--sections ptp ...] [--steps N] [--retrain] [--quick]
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
import importlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import yaml
from common import REPO_ROOT, Target, publish
from torchvision.ops import roi_align

from data_modules.builder import main as vlp_data
from data_modules.pipeline import make_eval_loader
from data_modules.views import EvalView
from vlp_lightning.callbacks import (
    CompositionalProbe,
    DenseProbe,
    GroupAccuracy,
    MMVPPairs,
    PatchTextGrounding,
    PhraseGrounding,
    Retrieval,
    ZeroShotSegmentation,
    constant_box_grounding,
    mine_clip_blind_pairs,
    write_clip_blind_pairs,
)
from vlp_lightning.callbacks.features import (
    encode_texts,
    evaluation_mode,
    has_joint_space,
    has_text_tower,
    method_eval_loader,
    new_evaluation_pass,
)
from vlp_lightning.callbacks.snare import PERTURBATIONS
from vlp_lightning.cli import VLPCLI
from vlp_lightning.hardware import cpu_model
from vlp_lightning.methods.base import VLPMethod
from vlp_lightning.modules.masking import patchify
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
    "GRAIN": ("grain/scenes_tiny.yaml", ()),
    "CLIP long": ("clip/scenes_long_tiny.yaml", ()),
    "CLIP mixed": ("clip/scenes_mixed_tiny.yaml", ()),
    "DreamLIP": ("dreamlip/scenes_tiny.yaml", ()),
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

    def trained_arms(self) -> list[str]:
        """The arms of `ARMS` (in its order) already trained for `steps` steps: cached, or trained in this run."""
        return [name for name in ARMS if name in self.methods or self.checkpoint(name).is_file()]

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


# --------------------------------------------------------------------------------------------------- probes
PROBE_FIT = f"{SCENES}/train-000000.tar"
PROBE_SCENES = 256  # fit and test scenes of the dense probes (per split)
CONTRASTS = "data/emoji-contrasts"
CONTRAST_SHARDS = f"{CONTRASTS}/test-{{000000..000003}}.tar"
MMVP_PAIRS = REPO_ROOT / "bench" / "results" / "mmvp_pairs.json"
#: the self-supervised encoder of the MMVP mining: MoCo v3 on Google's emoji (`experiments/mocov3/emoji_tiny.yaml`).
SSL_CHECKPOINT = ARM_CACHE / "mocov3_emoji" / "checkpoints" / "last.ckpt"
#: the arm whose image tower mines the CLIP-blind pairs.
MINING_ARM = "CLIP"
MIN_PAIRS = 100


class RawPixels(VLPMethod):
    """Reference: each patch's feature is its pixels (8 x 8 x 3), normalised as `like`'s training views."""

    def __init__(self, like: VLPMethod, patch_size: int = 8) -> None:
        super().__init__()
        self.like_views, self.size, self.patch_size = like.train_views(), like.image_size, patch_size
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @property
    def image_size(self) -> int:
        return self.size

    def train_views(self):
        return self.like_views

    def patch_features(self, images):
        return patchify(images, self.patch_size)


def untrained_arm(name: str) -> VLPMethod:
    """The recipe of arm `name` at its random initialisation (seed 0), in eval mode."""
    torch.manual_seed(0)
    cli = VLPCLI(args=["--config", str(REPO_ROOT / "experiments" / ARMS[name][0]), "--trainer.callbacks=[]",
                       "--trainer.logger=false", *ARMS[name][1]], run=False)
    return cli.model.eval()


def mine_pairs(bench: Bench) -> dict:
    """The CLIP-blind pairs of the contrasts, mined with `MINING_ARM` and `SSL_CHECKPOINT`: MMVP's thresholds
    (CLIP cosine > 0.95, SSL cosine < 0.6) when at least `MIN_PAIRS` pairs pass them; else, since tiny models do not
    share OpenAI CLIP's and DINOv2's scales, CLIP cosine above its (1 - q) quantile over the candidates and SSL
    cosine below its q quantile, for the first q of 0.25, 0.375, 0.5 that keeps `MIN_PAIRS` (the medians at most:
    more alike than CLIP's typical candidate pair, less alike than the SSL encoder's); written to `MMVP_PAIRS`, which
    later runs with the same two checkpoints reuse (`--retrain` mines again), so every arm meets the same pairs."""
    keys = ("clip", "ssl", "clip_threshold", "ssl_threshold", "candidates", "candidate_cosines")
    source = {"clip": f"{MINING_ARM} ({bench.checkpoint(MINING_ARM).name})",
              "ssl": str(SSL_CHECKPOINT.relative_to(REPO_ROOT))}
    stored = json.loads(MMVP_PAIRS.read_text()) if MMVP_PAIRS.is_file() else {}
    if all(stored.get(name) == value for name, value in source.items()) and not bench.retrain:
        print(f"mmvp: {len(stored['pairs'])} CLIP-blind pairs kept from {MMVP_PAIRS.name}", flush=True)
        return {key: stored[key] for key in keys} | {"pairs": len(stored["pairs"])}
    if not (REPO_ROOT / CONTRASTS / "manifest.json").is_file():
        vlp_data(["emoji-contrasts", CONTRASTS])
    ssl, _ = load_method(str(SSL_CHECKPOINT))
    every = mine_clip_blind_pairs(bench.arm(MINING_ARM), ssl, CONTRAST_SHARDS, clip_threshold=-2.0, ssl_threshold=2.0)
    clip_cosines = torch.tensor([pair["clip_cosine"] for pair in every["pairs"]])
    ssl_cosines = torch.tensor([pair["ssl_cosine"] for pair in every["pairs"]])
    def passing(thresholds: tuple[float, float]) -> int:
        return int(((clip_cosines > thresholds[0]) & (ssl_cosines < thresholds[1])).sum())

    thresholds = (0.95, 0.6)
    for level in (0.25, 0.375, 0.5):
        if passing(thresholds) >= MIN_PAIRS:
            break
        thresholds = (clip_cosines.quantile(1 - level).item(), ssl_cosines.quantile(level).item())
    kept = [pair for pair in every["pairs"]
            if pair["clip_cosine"] > thresholds[0] and pair["ssl_cosine"] < thresholds[1]]
    document = {**every, "clip_threshold": round(thresholds[0], 6), "ssl_threshold": round(thresholds[1], 6),
                **source, "pairs": kept,
                "candidate_cosines": {"clip_median": clip_cosines.median().item(),
                                      "ssl_median": ssl_cosines.median().item()}}
    write_clip_blind_pairs(MMVP_PAIRS, document)
    print(f"mmvp: {len(kept)} CLIP-blind pairs of {every['candidates']} candidates (CLIP cosine > {thresholds[0]:.3f}, "
          f"SSL cosine < {thresholds[1]:.3f})", flush=True)
    return {key: document[key] for key in keys} | {"pairs": len(kept)}


def probe_scores(bench: Bench, method: VLPMethod, joint: bool) -> dict[str, dict[str, float]]:
    """Per split the dense probe and prompt-segmentation mIoU, and for a CLIP-family method SNARE and MMVP."""
    scores: dict[str, dict[str, float]] = {}
    with bench.evaluate(method):
        for split, shards in SPLITS.items():
            dense = DenseProbe(PROBE_FIT, shards, name=split, max_train_samples=PROBE_SCENES,
                               max_test_samples=PROBE_SCENES).evaluate(bench.trainer, method)
            prompt = ZeroShotSegmentation(shards, name=split, max_samples=PROBE_SCENES,
                                          targets="instances").evaluate(bench.trainer, method)
            row = {"dense_miou": dense[f"dense_probe/{split}/miou"],
                   "dense_pixel_accuracy": dense[f"dense_probe/{split}/pixel_accuracy"],
                   "promptseg_miou": prompt[f"promptseg/{split}/miou_best"]}
            if joint:
                snare = CompositionalProbe(shards, name=split).evaluate(bench.trainer, method)
                row |= {f"snare_{name.rsplit('/', 1)[1]}": value for name, value in snare.items()}
            scores[split] = row
        if joint and json.loads(MMVP_PAIRS.read_text())["pairs"]:
            mmvp = MMVPPairs(CONTRAST_SHARDS, str(MMVP_PAIRS), name="emoji").evaluate(bench.trainer, method)
            scores["mmvp"] = {name.rsplit("/", 1)[1]: value for name, value in mmvp.items()}
    return scores


def recipe_class(name: str) -> type:
    """The method class the arm `name`'s recipe trains (read from the recipe, nothing loaded)."""
    model = yaml.safe_load((REPO_ROOT / "experiments" / ARMS[name][0]).read_text())["model"]
    module, _, attribute = model["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), attribute)


def clip_family_arms(bench: Bench) -> list[str]:
    """The trained arms (`Bench.trained_arms`) with a joint image-text space and a text tower; arms whose method
    has no text encoder (FFR's classifiers) are passed over without loading them."""
    return [name for name in bench.trained_arms() if recipe_class(name).encode_text is not VLPMethod.encode_text
            and has_joint_space(bench.arm(name)) and has_text_tower(bench.arm(name))]


def probes(bench: Bench) -> dict:
    if MINING_ARM not in clip_family_arms(bench):
        raise SystemExit(f"probes: the {MINING_ARM} arm is not trained yet ({bench.checkpoint(MINING_ARM)}); "
                         "run the ptp section (or wait for it) first")
    if not SSL_CHECKPOINT.is_file():
        raise SystemExit(f"probes: no self-supervised checkpoint at {SSL_CHECKPOINT}; train one with vlp fit "
                         "--config experiments/mocov3/emoji_tiny.yaml --trainer.default_root_dir "
                         f"{SSL_CHECKPOINT.parent.parent}")
    mining = mine_pairs(bench)
    scored: dict[str, dict] = {}

    def score(name: str, method: VLPMethod, joint: bool, steps: int) -> None:
        started = time.perf_counter()
        scored[name] = {"steps": steps, **probe_scores(bench, method, joint), "seconds": time.perf_counter() - started}
        print(f"{name}: {json.dumps(scored[name])}", flush=True)

    score(MINING_ARM, bench.arm(MINING_ARM), True, bench.steps)
    score("random init", untrained_arm(MINING_ARM), True, 0)
    score("raw pixels", RawPixels(bench.arm(MINING_ARM)), False, 0)
    for arm in clip_family_arms(bench):  # asked only now: an arm trained meanwhile elsewhere joins
        if arm not in scored:
            score(arm, bench.arm(arm), True, bench.steps)
    order = [*clip_family_arms(bench), "random init", "raw pixels"]
    rows = {name: scored[name] for name in order if name in scored}
    return {"arms": rows, "mmvp_mining": mining, "table": probes_table(rows)}


def probes_targets(part: dict) -> list[Target]:
    rows, reference = part["arms"], part["arms"]["random init"]
    trained = [arm for arm in rows if arm not in ("random init", "raw pixels")]
    return [
        *(Target(f"{arm} dense-probe mIoU - random init, {split} (points)",
                 100 * (rows[arm][split]["dense_miou"] - reference[split]["dense_miou"]), 0.0)
          for arm in trained for split in SPLITS),
        *(Target(f"{arm} SNARE mean accuracy, {split}", rows[arm][split]["snare_mean"], 0.5)
          for arm in trained for split in SPLITS),
    ]


def probes_table(rows: dict[str, dict]) -> str:
    kinds = " | ".join(f"SNARE {kind}" for kind in PERTURBATIONS)
    lines = [f"| arm | split | dense mIoU | prompt-seg mIoU | {kinds} | SNARE mean | MMVP pair acc (all / tone / "
             "style) |", "|---|---|---|---|" + "---|" * len(PERTURBATIONS) + "---|---|"]

    def cell(scores: dict, name: str) -> str:
        return f"{100 * scores[name]:.1f}" if name in scores else "--"

    for arm, row in rows.items():
        for split in SPLITS:
            scores = row[split]
            mmvp = row.get("mmvp", {})
            snare = " | ".join(cell(scores, f"snare_{kind}") for kind in PERTURBATIONS)
            pairs = (f"{cell(mmvp, 'pair_accuracy')} / {cell(mmvp, 'skin_tone')} / {cell(mmvp, 'style')}"
                     if mmvp and split == "val" else "--")
            lines.append(f"| {arm} | {split} | {cell(scores, 'dense_miou')} | {cell(scores, 'promptseg_miou')} | "
                         f"{snare} | {cell(scores, 'snare_mean')} | {pairs} |")
    chance = " | ".join("50.0" for _ in PERTURBATIONS)
    lines.append(f"| chance | both | -- | -- | {chance} | 50.0 | 25.0 |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- sections
#: each section: (what it measures and returns as its part of the report, its targets from that part alone, so a
#: stored part's targets can be recomputed).
SECTIONS: dict[str, tuple[Callable[[Bench], dict], Callable[[dict], list[Target]]]] = {
    "ptp": (ptp, ptp_targets),
    "ffr": (ffr, ffr_targets),
    "grain": (grain, grain_targets),
    "captions": (captions, captions_targets),
    "probes": (probes, probes_targets),
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
    if "ptp" in args.sections and not (REPO_ROOT / SCENES / "manifest.json").is_file():
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
