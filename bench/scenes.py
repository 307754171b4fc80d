"""Scenes: what position prompts (PTP) teach a contrastive model, on the scenes of `vlp-data scenes data/scenes`.

PTP (Wang et al. 2023, "Position-guided Text Prompt for Vision-Language Pre-training") adds "The block [P] has a
[O]." to each training caption (P one of the 3 x 3 blocks, O the object covering most of it) and nothing at
inference. Two arms train the same tiny CLIP (`experiments/clip/scenes_tiny.yaml` and `scenes_ptp_tiny.yaml`: the
same model, data, schedule and seed; only `data.position_prompts` differs) for the same optimizer steps on the 4,500
training scenes, fp32, and are scored on the 500 val scenes and the 500 scenes of held-out concepts:

* **Which block has the X?** For every object of a scene, the nine texts "The block P has a X." (P = 1..9, X its
  name) are ranked by cosine with the image in the joint space; correct when the best block is one the object
  covers (at least 2 % of the block, the scenes' `blocks` tags). Chance is the mean share of blocks an object
  covers (printed as a row).
* **Retrieval** (`callbacks.Retrieval`): image -> text R@1 / R@5 among the scenes' own short captions, which carry
  no position words: the prompts must not cost ordinary retrieval.

Usage: python bench/scenes.py [--steps N] [--quick]   (writes bench/results/scenes.json)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import REPO_ROOT, Target, publish

from data_modules.builder import main as vlp_data
from data_modules.pipeline import make_eval_loader
from vlp_lightning.callbacks import Retrieval
from vlp_lightning.callbacks.features import evaluation_mode, new_evaluation_pass
from vlp_lightning.cli import VLPCLI

SCENES = "data/scenes"
ARMS = {"CLIP": "scenes_tiny.yaml", "CLIP + PTP": "scenes_ptp_tiny.yaml"}
SPLITS = {"val": f"{SCENES}/val-000000.tar", "unseen concepts": f"{SCENES}/unseen-000000.tar"}


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


def train(arm: str, steps: int, root: Path) -> VLPCLI:
    cli = VLPCLI(args=[
        "--config", str(REPO_ROOT / "experiments" / "clip" / ARMS[arm]), f"--trainer.max_steps={steps}",
        "--data.val_shards=null", "--data.test_shards=null", "--trainer.callbacks=[]",
        f"--trainer.default_root_dir={root / arm.replace(' ', '')}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--checkpoint.save_top_k=0", "--checkpoint.save_last=false",
    ], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def targets(report: dict) -> list[Target]:
    """The goals, from the report alone (so a stored run's targets can be recomputed)."""
    rows = report["arms"]
    return [Target(f"PTP - CLIP block accuracy, {split} (points)",
                   100 * (rows["CLIP + PTP"][split]["accuracy"] - rows["CLIP"][split]["accuracy"]), 0.0)
            for split in SPLITS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per arm (default 400)")
    parser.add_argument("--quick", action="store_true", help="10 steps per arm: a smoke run of the bench")
    args = parser.parse_args()
    steps = 10 if args.quick else args.steps
    if not (REPO_ROOT / SCENES / "manifest.json").is_file():
        vlp_data(["scenes", SCENES])
    started = time.perf_counter()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="vlp-scenes-") as folder:
        for arm in ARMS:
            torch.manual_seed(0)
            start = time.perf_counter()
            cli = train(arm, steps, Path(folder))
            rows[arm] = {"steps": cli.trainer.global_step, "seconds": time.perf_counter() - start}
            new_evaluation_pass()
            with evaluation_mode(cli.trainer, cli.model), torch.no_grad():
                for split, shards in SPLITS.items():
                    rows[arm][split] = block_query(cli.model, shards)
                    scored = Retrieval(shards, name=split, num_examples=0).evaluate(cli.trainer, cli.model)
                    rows[arm][split].update({name.rsplit("/", 1)[1]: value for name, value in scored.items()})
            print(f"{arm}: {json.dumps(rows[arm])}", flush=True)
    report = {"seconds": time.perf_counter() - started, "steps": steps, "arms": rows, "table": table(rows)}
    print("\n" + report["table"])
    publish("scenes", report, targets(report))


def table(rows: dict[str, dict]) -> str:
    lines = ["| arm | split | steps | which block has the X? | chance | i2t R@1 | i2t R@5 |",
             "|---|---|---|---|---|---|---|"]
    for arm, row in rows.items():
        for split in SPLITS:
            scores = row[split]
            lines.append(f"| {arm} | {split} | {row['steps']} | {100 * scores['accuracy']:.1f} | "
                         f"{100 * scores['chance']:.1f} | {100 * scores['i2t_R@1']:.1f} | "
                         f"{100 * scores['i2t_R@5']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
