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
from vlp_lightning.callbacks import (
    CompositionalProbe,
    DenseProbe,
    MMVPPairs,
    Retrieval,
    ZeroShotSegmentation,
    mine_clip_blind_pairs,
    write_clip_blind_pairs,
)
from vlp_lightning.callbacks.features import (
    evaluation_mode,
    has_joint_space,
    has_text_tower,
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
RESULTS = REPO_ROOT / "bench" / "results" / "scenes.json"
ARM_CACHE = REPO_ROOT / "runs" / "bench" / "scenes"

#: every arm: its recipe (under experiments/) and the extra `vlp fit` options it trains with.
ARMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "CLIP": ("clip/scenes_tiny.yaml", ()),
    "CLIP + PTP": ("clip/scenes_ptp_tiny.yaml", ()),
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

    def checkpoint(self, name: str) -> Path:
        """Where the arm `name` is kept once trained for `steps` steps."""
        return self.cache / f"{name.replace(' ', '').replace('+', '_')}-{self.steps}.ckpt"

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


def clip_family_arms(bench: Bench) -> list[str]:
    """The trained arms (`Bench.trained_arms`) with a joint image-text space and a text tower."""
    return [name for name in bench.trained_arms()
            if has_joint_space(bench.arm(name)) and has_text_tower(bench.arm(name))]


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
    "probes": (probes, probes_targets),
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
