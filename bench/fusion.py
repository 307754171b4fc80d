"""Fusion and captioning on the demo's held-out split: ALBEF's ITM re-ranking against contrastive-only CLIP at equal
wall-clock, and CoCa's generated captions against a nearest-neighbour caption baseline.

Data (the README demo's split, `vlp-data emoji ... --split seen=0.8,unseen=0.2`): every method trains on Google's
drawings of the seen 80 % of the emoji concepts (1,529 images, the emoji's name as caption) and is scored on
Twitter's drawings: of the *unseen* concepts (382 images: a new style and names never trained on) and, for
captioning, of the seen concepts too (a new style only).

Runs: CLIP, ALBEF, FIBER, CoCa, BUS and UrbanCLIP each train their tiny recipe (`experiments/<method>/emoji_tiny.yaml`)
with the same image tower (the recipes' ViT-Tiny at 64 px, 6 blocks) for the same wall-clock budget (`--minutes`,
Lightning's max_time), fp32, one seed. A time budget leaves the LR schedule sized for the recipe's 1000 epochs (in
five minutes a 10 % warmup never ends), so the published run is a second pass, `--steps-from-last`: each method
trains for the steps it made in the first pass's minutes on the idle machine, its warmup and cosine spanning them.

* Retrieval (`callbacks.Retrieval`): image -> text and text -> image R@1 / R@5 among the 382 unseen names (and,
  for reference, among the 1,529 seen names in the new style). ALBEF, FIBER and BUS are scored twice: by their
  contrastive (ITC) space alone, and with the ITC top 16 of every query re-ranked by their ITM head
  (`rerank_top_k`, ALBEF's protocol with k 128/256 on Flickr/COCO).
* Captioning (`callbacks.CaptionMetrics`): CoCa's and BUS's greedy captions, BLEU-4 / ROUGE-L / CIDEr-D against
  the true name; the baseline gives each test image the caption of its nearest training image (cosine in the
  captioner's own contrastive image space, and in CLIP's; `nearest_neighbour_captions`). On unseen concepts the
  baseline can never be exactly right (no training image has the name), which is what generation is for.

Indicator probe (UrbanCLIP's protocol, `callbacks.RegressionProbe`): UrbanCLIP's frozen contrastive image
embedding -> an MLP regressing each emoji's `added_in` (the Emoji version that introduced it, 0.6 to 16.0) trained on
the seen Google drawings, scored on the unseen Twitter ones (R2, RMSE, MAE, and a ridge regression's R2), against
the same model at its random initialisation.

Reading (UNIT's protocol, word accuracy): UNIT trains on 50 words rendered in 14 DejaVu sans / mono faces
(`vlp-data words data/words-bench --vocabulary bench/words_50.txt`, 2,700 training images) mixed with the seen Google
drawings (its captioning and feature-reconstruction half), and reads, by greedy decoding, 500 renderings of the same
words in the DejaVu Serif faces it never saw (`CaptionMetrics` exact match = word accuracy; chance 1/50); the
baseline gives each test image the word of its nearest training rendering (cosine of standardised grey pixels).

Knowledge (ARL): ARL has no contrastive space (the official model has no ITC), so it is scored on its image encoder:
kNN (k 20) and linear-probe accuracy of the Unicode category of the unseen Twitter drawings, probes fitted on the
seen Google ones, against the same model at its random initialisation. It trains on the seen Google drawings whose
captions `vlp-data wordnet` linked to WordNet (`data/emoji-google-wordnet`, built when missing).

Grounding (FIBER's fine-grained stage): FIBER with `stage: fine` trains its recipe (`fiber/scenes_fine_tiny.yaml`,
from scratch) on the scenes of `vlp-data scenes data/scenes` (4,500 scenes of 1-K emoji cut-outs on real backgrounds)
and grounds every region description ("a large yellow grinning face in the top left") of the val scenes and of the
scenes of held-out concepts (`PhraseGrounding`: acc@0.5 = share of phrases whose best box has IoU >= 0.5), against
one constant box per phrase (the whole image; the true boxes' mean size, centred).

Usage: python bench/fusion.py [--minutes M | --steps-from-last | --steps N] [--quick] [--methods ...]
(writes bench/results/fusion.json)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import REPO_ROOT, Target, ensure_shards, publish

from data_modules.builder import main as vlp_data
from data_modules.pipeline import make_eval_loader
from vlp_lightning.callbacks import (
    CaptionMetrics,
    KNNClassifier,
    LinearProbe,
    PhraseGrounding,
    RegressionProbe,
    Retrieval,
)
from vlp_lightning.callbacks.captioning import caption_metrics, nearest_neighbour_captions
from vlp_lightning.callbacks.grounding import constant_box_grounding
from vlp_lightning.callbacks.features import evaluation_mode, extract_features, new_evaluation_pass
from vlp_lightning.callbacks.retrieval import split_captions
from vlp_lightning.cli import VLPCLI

TRAIN = "data/emoji-google/seen-{000000..000001}.tar"
UNSEEN = "data/emoji-twitter/unseen-000000.tar"
SEEN_STYLE = "data/emoji-twitter/seen-{000000..000001}.tar"
METHODS = ("CLIP", "ALBEF", "FIBER", "CoCa", "BUS", "UrbanCLIP", "UNIT", "ARL", "FIBER-fine")
RERANKS = {"ALBEF", "FIBER", "BUS"}  # methods with an ITM head: scored with and without re-ranking
CAPTIONERS = {"CoCa", "BUS"}
READERS = {"UNIT"}  # scored by reading rendered words in an unseen font, not by retrieval
GROUNDERS = {"FIBER-fine"}  # scored by phrase grounding on the scenes, not by retrieval
PROBED = {"ARL"}  # no joint space: scored by category probes on its image encoder, before and after training
REGRESSORS = {"UrbanCLIP"}  # scored by its indicator probe (RegressionProbe on `added_in`), before and after training
WORDS = "data/words-bench"
WORDS_TRAIN = f"{WORDS}/train-{{000000..000002}}.tar"
WORDS_UNSEEN_FONT = f"{WORDS}/unseen_font-000000.tar"
WORDNET = "data/emoji-google-wordnet"
RECIPES = {"UNIT": "unit/words_tiny.yaml", "FIBER-fine": "fiber/scenes_fine_tiny.yaml"}
SCENES = "data/scenes"
#: each method's training shards and extra arguments where they are not the seen Google drawings'
TRAINING = {
    "UNIT": [f"--data.train_shards={WORDS_TRAIN}::{TRAIN}", "--data.test_shards=null"],
    "FIBER-fine": [f"--data.train_shards={SCENES}/train-{{000000..000004}}.tar"],
    "ARL": [f"--data.train_shards={WORDNET}/seen-{{000000..000001}}.tar",
            f"--model.init_args.knowledge={WORDNET}/knowledge.json"],
}
DEMO_RECIPE = REPO_ROOT / "experiments" / "clip" / "emoji_heldout_tiny.yaml"
RESULTS = REPO_ROOT / "bench" / "results" / "fusion.json"


def build(method: str, minutes: float, root: Path, steps: int | None = None) -> VLPCLI:
    """The method's tiny recipe on the demo's seen Google drawings, 6-block ViT-Tiny, for `minutes` of training, or
    for `steps` optimizer steps (then the LR schedule spans exactly the run)."""
    vision = "--model.init_args.vision.init_args."
    seconds = int(minutes * 60)
    budget = ([f"--trainer.max_steps={steps}"] if steps else
              ["--trainer.max_steps=-1", f"--trainer.max_time=00:00:{seconds // 60:02d}:{seconds % 60:02d}"])
    return VLPCLI(args=[
        "--config", str(REPO_ROOT / "experiments" / RECIPES.get(method, f"{method.lower()}/emoji_tiny.yaml")),
        f"--data.train_shards={TRAIN}", "--data.val_shards=null", "--data.test_shards=null", *TRAINING.get(method, []),
        f"{vision}depth=6", f"{vision}img_size=64", *budget, "--trainer.max_epochs=1000", "--trainer.callbacks=[]",
        f"--trainer.default_root_dir={root / method}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--checkpoint.save_top_k=0", "--checkpoint.save_last=false",
    ], run=False)


def ensure_bench_data() -> None:
    """The rendered 50 words (UNIT), the scenes (FIBER-fine) and the WordNet-linked seen drawings (ARL), built
    once."""
    if not (REPO_ROOT / WORDS / "manifest.json").is_file():
        vlp_data(["words", WORDS, "--vocabulary", str(REPO_ROOT / "bench" / "words_50.txt")])
    if not (REPO_ROOT / SCENES / "manifest.json").is_file():
        vlp_data(["scenes", SCENES])
    if not (REPO_ROOT / WORDNET / "manifest.json").is_file():
        vlp_data(["wordnet", "data/emoji-google/seen-*.tar", WORDNET])


def category_probes(cli: VLPCLI) -> dict[str, float]:
    """kNN and linear-probe (standardised features) top-1 of the unseen drawings' Unicode category."""
    knn = evaluate(KNNClassifier(TRAIN, UNSEEN, name="category"), cli)
    linear = evaluate(LinearProbe(TRAIN, UNSEEN, name="category", standardize=True), cli)
    return {"knn_top1": knn["top1"], "linear_top1": linear["top1"]}


def nearest_rendering_accuracy(train: str, test: str, size: int = 64) -> float:
    """Word accuracy of the pixel baseline: each test image gets the word of the training rendering whose
    standardised grey pixels are the most cosine-similar."""
    def pixels(shards: str) -> tuple[torch.Tensor, list[str]]:
        images, words = [], []
        for batch in make_eval_loader(shards, image_size=size, batch_size=500):
            grey = batch["image"].mean(dim=1).flatten(1)
            images.append(torch.nn.functional.normalize(grey - grey.mean(dim=1, keepdim=True), dim=1))
            words += batch["caption"]
        return torch.cat(images), words

    (train_pixels, train_words), (test_pixels, test_words) = pixels(train), pixels(test)
    nearest = (test_pixels @ train_pixels.T).argmax(dim=1).tolist()
    return sum(train_words[j] == word for j, word in zip(nearest, test_words)) / len(test_words)


def evaluate(callback, cli: VLPCLI) -> dict[str, float]:
    """`callback`'s metrics for the model as it is now (a new evaluation pass: no features from before training)."""
    new_evaluation_pass()
    with evaluation_mode(cli.trainer, cli.model):
        metrics = callback.evaluate(cli.trainer, cli.model)
    return {name.rsplit("/", 1)[1]: value for name, value in metrics.items()}


def nearest_neighbour_baseline(cli: VLPCLI, shards: str) -> dict[str, float]:
    """The 1-NN caption baseline in `cli.model`'s joint image space: training captions for `shards`' images."""
    method = cli.model
    with evaluation_mode(cli.trainer, method):
        train = extract_features(method, TRAIN, representation="joint")
        queries = extract_features(method, shards, representation="joint")
    captions = nearest_neighbour_captions(train.image, [split_captions(c)[0] for c in train.captions], queries.image)
    return caption_metrics(captions, [split_captions(caption) for caption in queries.captions])


def targets(report: dict) -> list[Target]:
    """The goals, from the report alone (so a stored run's targets can be recomputed)."""
    retrieval, captions, regression = report["retrieval"], report["captions"], report["regression"]
    reading, probes, grounding = report["reading"], report["probes"], report["grounding"]
    unseen = retrieval.get("unseen", {})
    goals = [
        Target(f"{method} ITM-reranked i2t R@1 - CLIP i2t R@1, unseen (points)",
               100 * (unseen[f"{method} (ITM re-ranked top 16)"]["i2t_R@1"] - unseen["CLIP"]["i2t_R@1"]), 0.0)
        for method in sorted(RERANKS) if f"{method} (ITM re-ranked top 16)" in unseen and "CLIP" in unseen
    ]
    for method in sorted(CAPTIONERS):
        if f"{method} (greedy)" in captions.get("unseen", {}):
            goals.append(Target(f"{method} CIDEr - 1-NN CIDEr in its space, unseen concepts",
                                  captions["unseen"][f"{method} (greedy)"]["CIDEr"]
                                  - captions["unseen"][f"1-NN caption ({method} space)"]["CIDEr"], 0.0))
    if "UrbanCLIP" in regression:
        goals.append(Target("UrbanCLIP R2 - its random-init R2, Emoji version of unseen concepts",
                              regression["UrbanCLIP"]["R2"] - regression["UrbanCLIP (random init)"]["R2"], 0.0))
    if "UNIT (greedy)" in reading:
        goals.append(Target("UNIT word accuracy - nearest-rendering accuracy, unseen font (points)",
                              100 * (reading["UNIT (greedy)"]["exact_match"]
                                     - reading["nearest training rendering (pixels)"]["exact_match"]), 0.0))
    if "FIBER-fine" in grounding.get("unseen", {}):
        unseen_grounding = grounding["unseen"]
        goals.append(Target("FIBER fine acc@0.5 - centre-box acc@0.5, unseen concepts (points)",
                              100 * (unseen_grounding["FIBER-fine"]["acc@0.5"]
                                     - unseen_grounding["constant box (centre)"]["acc@0.5"]), 0.0))
    if "ARL" in probes:
        goals.append(Target("ARL linear probe - its random-init probe, unseen concepts' category (points)",
                              100 * (probes["ARL"]["linear_top1"] - probes["ARL (random init)"]["linear_top1"]), 0.0))
    return goals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="training wall-clock per method (default 4)")
    parser.add_argument("--quick", action="store_true", help="20 seconds per method: a smoke run of the bench")
    parser.add_argument("--steps-from-last", action="store_true",
                        help="train each method for the steps it made in the last run's minutes (an idle machine), "
                             "so its LR schedule (warmup, cosine) spans the budget instead of a 1000-epoch run")
    parser.add_argument("--steps", type=int, default=None,
                        help="train each method for this many optimizer steps instead (its schedule spans them)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="train and score only these; the others keep their rows from the last run")
    args = parser.parse_args()
    minutes = 1 / 3 if args.quick else args.minutes
    ensure_shards({"demo": DEMO_RECIPE})
    if set(args.methods) & (READERS | PROBED | GROUNDERS):
        ensure_bench_data()
    started = time.perf_counter()
    kept = json.loads(RESULTS.read_text()) if RESULTS.is_file() and not args.quick else {}
    runs, retrieval, captions = kept.get("runs", {}), kept.get("retrieval", {}), kept.get("captions", {})
    regression, reading, probes = kept.get("regression", {}), kept.get("reading", {}), kept.get("probes", {})
    grounding = kept.get("grounding", {})
    with tempfile.TemporaryDirectory(prefix="vlp-fusion-") as folder:
        for method in args.methods:
            torch.manual_seed(0)
            steps = args.steps or (kept["runs"][method]["steps"] if args.steps_from_last else None)
            cli = build(method, minutes, Path(folder), steps)
            probe = RegressionProbe(TRAIN, UNSEEN, "added_in", name="added_in")
            if method in PROBED:
                probes[f"{method} (random init)"] = category_probes(cli)
            if method in REGRESSORS:
                regression[f"{method} (random init)"] = evaluate(probe, cli)
                print(f"{method} random-init regression: {regression[f'{method} (random init)']}", flush=True)
            start = time.perf_counter()
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            runs[method] = {"seconds": time.perf_counter() - start, "steps": cli.trainer.global_step}
            print(f"{method}: {runs[method]['steps']} steps in {runs[method]['seconds']:.0f} s", flush=True)
            if method in REGRESSORS:
                regression[method] = evaluate(probe, cli)
                print(f"{method} regression: {regression[method]}", flush=True)
            if method in PROBED:
                probes[method] = category_probes(cli)
                print(f"{method} category probes: {probes}", flush=True)
            if method in READERS:
                reading[f"{method} (greedy)"] = evaluate(
                    CaptionMetrics(WORDS_UNSEEN_FONT, name="unseen_font", max_length=12, num_examples=0), cli)
                reading["nearest training rendering (pixels)"] = {
                    "exact_match": nearest_rendering_accuracy(WORDS_TRAIN, WORDS_UNSEEN_FONT)}
                print(f"{method} reading: {reading}", flush=True)
            if method in GROUNDERS:
                for split in ("val", "unseen"):
                    shards = f"{SCENES}/{split}-000000.tar"
                    rows = grounding.setdefault(split, {})
                    rows[method] = evaluate(PhraseGrounding(shards, name=split), cli)
                    for kind in ("whole", "centre"):
                        rows[f"constant box ({kind})"] = constant_box_grounding(shards, cli.model.image_size, kind)
                print(f"{method} grounding: {grounding}", flush=True)
            if method in READERS | PROBED | GROUNDERS:
                continue
            for split, shards in (("unseen", UNSEEN), ("seen style", SEEN_STYLE)):
                scored = evaluate(Retrieval(shards, name=split, rerank_top_k=16 if method in RERANKS else 0,
                                            num_examples=0), cli)
                rows = retrieval.setdefault(split, {})
                if method in RERANKS:
                    rows[f"{method} (ITC only)"] = {k.removeprefix("itc_"): v for k, v in scored.items()
                                                    if k.startswith("itc_")}
                    rows[f"{method} (ITM re-ranked top 16)"] = {k: v for k, v in scored.items()
                                                                if not k.startswith("itc_")}
                else:
                    rows[method] = scored
                print(f"{method} retrieval, {split}: {scored}", flush=True)
            for split, shards in (("unseen", UNSEEN), ("seen style", SEEN_STYLE)):
                if method in CAPTIONERS:
                    captions.setdefault(split, {})[f"{method} (greedy)"] = evaluate(
                        CaptionMetrics(shards, name=split, num_examples=0), cli)
                if method in CAPTIONERS or method == "CLIP":
                    captions.setdefault(split, {})[f"1-NN caption ({method} space)"] = nearest_neighbour_baseline(
                        cli, shards)
            print(f"{method} captions: {json.dumps(captions, indent=1)}", flush=True)
    order = [f"{m}{suffix}" for m in METHODS for suffix in ("", " (ITC only)", " (ITM re-ranked top 16)")]
    retrieval = {split: {row: rows[row] for row in order if row in rows} for split, rows in retrieval.items()}
    report = {"seconds": time.perf_counter() - started, "minutes_per_method": minutes, "runs": runs,
              "retrieval": retrieval, "captions": captions, "regression": regression, "reading": reading,
              "probes": probes, "grounding": grounding}
    report["table"] = tables(report)
    print("\n" + report["table"])
    publish("fusion", report, targets(report))


def tables(report: dict) -> str:
    lines = ["| retrieval (Twitter drawings) | split | steps | i2t R@1 | i2t R@5 | t2i R@1 | t2i R@5 |",
             "|---|---|---|---|---|---|---|"]
    for split, rows in report["retrieval"].items():
        for row, metrics in rows.items():
            steps = report["runs"][row.split(" ")[0]]["steps"]
            lines.append(f"| {row} | {split} | {steps} | " + " | ".join(
                f"{100 * metrics[name]:.1f}" for name in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5")) + " |")
    lines += ["", "| captioning | split | BLEU-4 | ROUGE-L | CIDEr |", "|---|---|---|---|---|"]
    for split, rows in report["captions"].items():
        for row, metrics in rows.items():
            lines.append(f"| {row} | {split} | {100 * metrics['BLEU-4']:.1f} | {100 * metrics['ROUGE-L']:.1f} "
                         f"| {metrics['CIDEr']:.3f} |")
    if report.get("regression"):
        lines += ["", "| indicator probe: Emoji version (`added_in`) of unseen concepts | R2 | RMSE | MAE | ridge R2 |",
                  "|---|---|---|---|---|"]
        for row, metrics in report["regression"].items():
            lines.append(f"| {row} | {metrics['R2']:.3f} | {metrics['RMSE']:.2f} | {metrics['MAE']:.2f} "
                         f"| {metrics['ridge_R2']:.3f} |")
    if report.get("reading"):
        lines += ["", "| reading 50 rendered words in an unseen font (DejaVu Serif) | word accuracy | CIDEr |",
                  "|---|---|---|"]
        for row, metrics in report["reading"].items():
            cider = f"{metrics['CIDEr']:.3f}" if "CIDEr" in metrics else "-"
            lines.append(f"| {row} | {100 * metrics['exact_match']:.1f} | {cider} |")
    if report.get("grounding"):
        lines += ["", "| phrase grounding on the scenes (region descriptions) | split | acc@0.5 | mean IoU |",
                  "|---|---|---|---|"]
        for split, rows in report["grounding"].items():
            for row, metrics in rows.items():
                lines.append(f"| {row} | {split} | {100 * metrics['acc@0.5']:.1f} | {metrics['mean_iou']:.3f} |")
    if report.get("probes"):
        lines += ["", "| image encoder: category of unseen concepts (Twitter) | kNN top-1 | linear top-1 |",
                  "|---|---|---|"]
        for row, metrics in report["probes"].items():
            lines.append(f"| {row} | {100 * metrics['knn_top1']:.1f} | {100 * metrics['linear_top1']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
