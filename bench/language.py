"""A frozen language model in the loop: does the image reach SmolLM2 through each connector?

Data (the README demo's split): every run trains on Google's drawings of the seen 80 % of the emoji concepts and is
scored on Twitter's drawings of the 382 *unseen* concepts (a new style and names never trained on).

* **LiMBeR's comparison** (Merullo et al. 2023): the same linear map (one soft prompt per patch token) from three
  frozen towers into frozen SmolLM2-135M-Instruct: our CLIP's (trained here with the demo recipe, language
  supervision), our MAE's (no language), and a random ViT's (never trained); each trained for `--steps` at two seeds.
  Every trained map captions the unseen drawings three ways: with its image, with a **shuffled** image (the visual
  tokens of another test image, a fixed permutation) and with **no image** (the prompt alone): CIDEr-D and
  names-the-object rate (`callbacks.captioning.names_object`: the caption contains a content word of the name), and
  the teacher-forced NLL of the true name (nats per answer token: what the prefix lets the LM predict, without the
  decoding's all-or-nothing). A map carries the image when its margin over the shuffled prefix (paired: the same
  trained map both ways, per seed) is larger than that margin's seed spread.
* **LLaVA stage 1 vs stage 1 + 2** (Liu et al. 2023): stage 1 trains the MLP projector on captions (our CLIP tower,
  LM frozen); stage 2 starts from it and trains the projector and LoRA on SmolLM2 on `vlp-data instructions` of the
  seen Google drawings; both answer the instructions of the unseen Twitter drawings (`InstructionAccuracy`: exact
  match per task, multiple-choice accuracy; chance 25 %).
* **Cost**: seconds per optimizer step of each run, and what the backward stores: the bytes autograd saves for the
  backward of one LiMBeR step (`torch.autograd.graph.saved_tensors_hooks`, unique storages) with the LM frozen, with
  every LM weight requiring gradients, and frozen with gradient checkpointing.
* With `--family`, the family's other methods from their tiny recipes with our CLIP tower, one seed each: SimVLG,
  InfMLLM's alignment stage and PA-LLaVA's captioned like LiMBeR's arms, Vision-Flan's two stages in LLaVA's table
  (its stage 1 is LLaVA's stage 2 here: the same recipe; its stage 2 trains from there).

Towers: ViT-Tiny at 32 px with 8 px patches (16 visual tokens; the recipes' 64 px towers give 64 and cost 4x the
LM tokens), trained for `--tower-steps`. Precision: the CPU's default (bf16 autocast with AVX-512 BF16, else fp32).

Every LM run replaces SmolLM2's default system turn by a short one (`SYSTEM_PROMPT`).

Usage: python bench/language.py [--steps N] [--llava-steps N] [--tower-steps N] [--family] [--quick]
       (writes bench/results/language.json)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import REPO_ROOT, Target, ensure_shards, publish

from data_modules.builder import main as vlp_data
from vlp_lightning.callbacks import InstructionAccuracy
from vlp_lightning.callbacks.captioning import caption_metrics
from vlp_lightning.callbacks.features import evaluation_mode, method_eval_loader, new_evaluation_pass
from vlp_lightning.callbacks.retrieval import split_captions
from vlp_lightning.cli import VLPCLI
from vlp_lightning.hardware import cpu_has_native_bf16

TRAIN = "data/emoji-google/seen-{000000..000001}.tar"
UNSEEN = "data/emoji-twitter/unseen-000000.tar"
INSTRUCTIONS_TRAIN = "data/emoji-google-instructions/seen-{000000..000001}.tar"
INSTRUCTIONS_UNSEEN = "data/emoji-twitter-instructions/unseen-000000.tar"
DEMO_RECIPE = REPO_ROOT / "experiments" / "clip" / "emoji_heldout_tiny.yaml"
TOWERS = ("CLIP", "MAE", "random")
#: replaces SmolLM2's default system turn (17 tokens: a quarter of a caption sample's 69) in every LM run here: 1.4x
#: faster steps on this CPU, the same for every arm
SYSTEM_PROMPT = "You are a helpful assistant."
LM = (f"--model.init_args.language_model.init_args.system_prompt={SYSTEM_PROMPT}",)
SEEDS = (0, 1)
CONDITIONS = ("image", "shuffled image", "no image")
EXPERIMENTS = REPO_ROOT / "experiments"


def cli(recipe: str, root: Path, steps: int, *extra: str) -> VLPCLI:
    """`recipe` on the seen Google drawings for `steps` optimizer steps (its schedule spans them), no callbacks."""
    return VLPCLI(args=[
        "--config", str(EXPERIMENTS / recipe), f"--data.train_shards={TRAIN}", "--data.val_shards=null",
        "--data.test_shards=null", f"--trainer.max_steps={steps}", "--trainer.max_epochs=1000",
        "--trainer.callbacks=[]", f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--checkpoint.save_top_k=0", "--checkpoint.save_last=false", *extra,
    ], run=False)


def fit(run: VLPCLI, name: str, runs: dict) -> None:
    start = time.perf_counter()
    run.trainer.fit(run.model, datamodule=run.datamodule)
    seconds = time.perf_counter() - start
    runs[name] = {"steps": run.trainer.global_step, "seconds": seconds,
                  "seconds_per_step": seconds / max(1, run.trainer.global_step)}
    print(f"{name}: {runs[name]}", flush=True)


def train_towers(root: Path, steps: int, runs: dict) -> dict[str, str]:
    """Our CLIP (the demo recipe) and our MAE at 32 px on the seen drawings -> their checkpoints."""
    vision = "--model.init_args.vision.init_args."
    towers = {}
    for name, recipe in (("CLIP", "clip/emoji_heldout_tiny.yaml"), ("MAE", "mae/emoji_tiny.yaml")):
        run = cli(recipe, root / name, steps, f"{vision}img_size=32")
        fit(run, f"{name} tower", runs)
        towers[name] = str(root / f"{name}.ckpt")
        run.trainer.save_checkpoint(towers[name])
    return towers


@torch.no_grad()
def caption_conditions(method, shards: str, max_new_tokens: int = 12) -> dict[str, dict[str, float]]:
    """Caption metrics of `shards` with each image's visual tokens, another image's (a fixed permutation) and none
    (`--quick`: the first 64 images only)."""
    loader, _ = method_eval_loader(method, shards, 64, 0)
    visual, references = [], []
    for batch in loader:
        if QUICK and visual:
            break
        visual.append(method.visual_tokens(batch["image"]))
        references.extend(split_captions(caption) for caption in batch["caption"])
    visual = torch.cat(visual)
    permutation = torch.randperm(len(visual), generator=torch.Generator().manual_seed(0))
    lm, prompt = method.language_model, [{"role": "user", "content": method.caption_prompts[0]}]
    results = {}
    for condition, tokens in (("image", visual), ("shuffled image", visual[permutation]),
                              ("no image", visual[:, :0])):
        captions = []
        for start in range(0, len(tokens), 64):
            chunk = tokens[start: start + 64]
            inputs = lm.prompt_inputs([prompt] * len(chunk), chunk.shape[1])
            captions += lm.generate(inputs, chunk, max_new_tokens=max_new_tokens)
        results[condition] = caption_metrics(captions, references)
        results[condition]["nll"] = caption_nll(lm, prompt[0]["content"], [refs[0] for refs in references], tokens)
        results[condition]["examples"] = captions[:5]
        print(f"  {condition}: CIDEr {results[condition]['CIDEr']:.3f}, names the object "
              f"{results[condition]['names_object']:.3f}, NLL {results[condition]['nll']:.3f}, e.g. {captions[:3]}",
              flush=True)
    return results


def caption_nll(lm, prompt: str, captions: list[str], tokens: torch.Tensor) -> float:
    """Teacher-forced negative log-likelihood (nats per answer token) of each image's true name after the prompt
    and `tokens` as its visual tokens: how much of the name the prefix lets the LM predict, without decoding."""
    total, count = 0.0, 0
    for start in range(0, len(tokens), 64):
        chunk = tokens[start: start + 64]
        conversations = [[{"role": "user", "content": prompt}, {"role": "assistant", "content": caption}]
                         for caption in captions[start: start + 64]]
        inputs = lm.training_inputs(conversations, chunk.shape[1], 512)
        labelled = int((inputs["labels"][:, 1:] != -100).sum())
        total += float(lm.loss(inputs, chunk)) * labelled
        count += labelled
    return total / count


def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_has_native_bf16())


def evaluate(callback, run: VLPCLI) -> dict[str, float]:
    new_evaluation_pass()
    with evaluation_mode(run.trainer, run.model), autocast():
        metrics = callback.evaluate(run.trainer, run.model)
    return {name.split("/", 2)[2]: value for name, value in metrics.items()}


def saved_for_backward(method, batch: dict) -> int:
    """Bytes of the unique storages autograd saves for the backward of one forward_loss."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    method.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast():
        loss = method.forward_loss(batch)["loss"]
    loss.backward()
    method.zero_grad(set_to_none=True)
    return sum(storages.values())


def memory_rows(run: VLPCLI) -> dict[str, float]:
    """What the backward of one LiMBeR step (batch 16) stores: LM frozen, LM weights trainable, frozen + gradient
    checkpointing (MiB)."""
    method = run.model
    batch = next(iter(run.datamodule.train_dataloader()))
    batch = run.datamodule.on_after_batch_transfer(batch, 0)
    lm = method.language_model
    rows = {"LM frozen": saved_for_backward(method, batch)}
    lm.model.requires_grad_(True)
    rows["LM weights requiring grad"] = saved_for_backward(method, batch)
    lm.model.requires_grad_(False)
    lm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.gradient_checkpointing = True
    rows["LM frozen, gradient checkpointing"] = saved_for_backward(method, batch)
    lm.model.gradient_checkpointing_disable()
    lm.gradient_checkpointing = False
    return {name: value / 2**20 for name, value in rows.items()}


def ensure_data() -> None:
    ensure_shards({"demo": DEMO_RECIPE})
    for source, target in (("data/emoji-google/seen-*.tar", "data/emoji-google-instructions"),
                           ("data/emoji-twitter/*.tar", "data/emoji-twitter-instructions")):
        if not (REPO_ROOT / target / "manifest.json").is_file():
            vlp_data(["instructions", source, target])


def limber_arms(root: Path, towers: dict[str, str], steps: int, seeds: tuple[int, ...], runs: dict,
                captions: dict) -> dict[str, float]:
    """LiMBeR's tower comparison: each tower x seed trained and captioned three ways; the memory rows (MiB)."""
    memory = {}
    for tower in TOWERS:
        for seed in seeds:
            start = ([f"--model.init_args.image_tower={towers[tower]}"] if tower in towers
                     else ["--model.init_args.vision.init_args.img_size=32"])
            recipe = "limber/emoji_tiny.yaml" if tower == "random" else "limber/emoji_clip_tiny.yaml"
            run = cli(recipe, root / f"limber-{tower}-{seed}", steps, f"--seed_everything={seed}", *LM, *start)
            name = f"LiMBeR, {tower} tower, seed {seed}"
            fit(run, name, runs)
            with evaluation_mode(run.trainer, run.model), autocast():
                captions[name] = caption_conditions(run.model, UNSEEN)
            if tower == "CLIP" and seed == seeds[0]:
                memory = memory_rows(run)
                print(f"saved for backward (MiB): {memory}", flush=True)
    return memory


#: the family's other methods, each from its tiny recipe with our CLIP tower, one seed (name, recipe)
FAMILY = (("SimVLG", "simvlg/emoji_tiny.yaml"), ("InfMLLM stage 1", "infmllm/emoji_stage1_tiny.yaml"),
          ("PA-LLaVA stage 1", "pa-llava/emoji_align_tiny.yaml"))


def family_rows(root: Path, clip_tower: str, steps: int, runs: dict, captions: dict) -> None:
    """SimVLG, InfMLLM's alignment stage and PA-LLaVA's captioned like LiMBeR's arms (one seed)."""
    for name, recipe in FAMILY:
        run = cli(recipe, root / slug(name), steps, *LM, f"--model.init_args.image_tower={clip_tower}")
        fit(run, name, runs)
        with evaluation_mode(run.trainer, run.model), autocast():
            captions[name] = caption_conditions(run.model, UNSEEN)


def llava_stages(root: Path, clip_tower: str, steps: int, runs: dict, instructions: dict, family: bool) -> float:
    """LLaVA stage 1 (captions) and stage 1 + 2 (instructions, from stage 1); with `family`, Vision-Flan's stage 2
    (the small chat-style stage at a lower lr) from LLaVA's stage 2: Vision-Flan's stage-1 recipe is LLaVA's stage-2
    recipe here (the same architecture, templated tasks, LoRA and lr: the same numbers), so it is not run twice.
    Returns the seconds Vision-Flan's stage took (trained and scored)."""
    tower = [*LM, f"--model.init_args.image_tower={clip_tower}"]
    accuracy = InstructionAccuracy(INSTRUCTIONS_UNSEEN, name="unseen", max_length=12,
                                   max_samples=64 if QUICK else None)
    stages = [("LLaVA stage 1", "llava/emoji_stage1_tiny.yaml", None),
              ("LLaVA stage 1 + 2", "llava/emoji_stage2_tiny.yaml", "LLaVA stage 1")]
    if family:
        stages.append(("Vision-Flan stages 1 + 2", "visionflan/emoji_stage2_tiny.yaml", "LLaVA stage 1 + 2"))
    family_seconds = 0.0
    for name, recipe, start in stages:
        started = time.perf_counter()
        extra = [] if start is None else [f"--model.init_args.start_from={root / slug(start)}.ckpt",
                                          f"--data.train_shards={INSTRUCTIONS_TRAIN}"]
        run = cli(recipe, root / slug(name), steps, *tower, *extra)
        fit(run, name, runs)
        instructions[name] = evaluate(accuracy, run)
        print(f"{name}: {instructions[name]}", flush=True)
        run.trainer.save_checkpoint(root / f"{slug(name)}.ckpt")
        if name.startswith("Vision-Flan"):
            family_seconds += time.perf_counter() - started
    return family_seconds


def slug(name: str) -> str:
    """A run's name as a file name: "LLaVA stage 1 + 2" -> "LLaVA-stage-1-plus-2"."""
    return name.replace(" + ", " plus ").replace(" ", "-")


def margin_target(name: str, rows: list[dict], metric: str, lower_is_better: bool = False) -> Target:
    """Image prefix minus shuffled prefix, paired per seed (the same trained map both ways), less the seed spread of
    that margin: positive when the map carries the image by more than the seeds disagree."""
    sign = -1.0 if lower_is_better else 1.0
    margins = [sign * (row["image"][metric] - row["shuffled image"][metric]) for row in rows]
    spread = max(margins) - min(margins)
    return Target(f"{name}: {metric}(image) beats {metric}(shuffled) by more than the seed spread, unseen",
                  statistics.mean(margins) - spread, MARGIN_GOAL)


def targets(report: dict, seeds: tuple[int, ...], family: bool) -> list[Target]:
    """The goals, from the report alone (so a stored run's targets can be recomputed)."""
    captions, instructions = report["captions"], report["instructions"]
    goals = []
    for tower in TOWERS:
        rows = [captions[f"LiMBeR, {tower} tower, seed {seed}"] for seed in seeds]
        goals.append(margin_target(f"LiMBeR {tower} tower", rows, "CIDEr"))
        goals.append(margin_target(f"LiMBeR {tower} tower", rows, "nll", lower_is_better=True))
    for name, _ in FAMILY if family else ():
        goals.append(margin_target(f"{name} (one seed)", [captions[name]], "nll", lower_is_better=True))
    goals.append(Target("LLaVA stage 1+2 - stage 1 multiple-choice accuracy, unseen (points)",
                        100 * (instructions["LLaVA stage 1 + 2"]["multiple_choice_accuracy"]
                               - instructions["LLaVA stage 1"]["multiple_choice_accuracy"]), 0.0))
    if family:
        goals.append(Target("Vision-Flan stages 1+2 - LLaVA stage 1 multiple-choice accuracy, unseen (points)",
                            100 * (instructions["Vision-Flan stages 1 + 2"]["multiple_choice_accuracy"]
                                   - instructions["LLaVA stage 1"]["multiple_choice_accuracy"]), 0.0))
    goals.append(Target("minutes without --family (issue 17: within 45)", report["seconds_without_family"] / 60,
                        45.0, "<="))
    return goals


#: `--quick`: every evaluation on 64 samples (a smoke run of the code, its numbers mean nothing)
QUICK = False
#: "larger than its seed spread" with a floor, so two equal zeros (no caption names anything) do not pass
MARGIN_GOAL = 0.001


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per connector run (default 150)")
    parser.add_argument("--llava-steps", type=int, default=60, help="optimizer steps per LLaVA stage (default 60)")
    parser.add_argument("--tower-steps", type=int, default=200, help="steps of the CLIP and MAE towers (200)")
    parser.add_argument("--family", action="store_true",
                        help="also SimVLG, InfMLLM, PA-LLaVA (captions) and Vision-Flan (instructions), one seed each "
                        "(~20 more minutes)")
    parser.add_argument("--quick", action="store_true", help="5 steps each, one seed: a smoke run of the bench")
    args = parser.parse_args()
    global QUICK
    QUICK = args.quick
    steps, llava_steps, tower_steps, seeds = ((5, 5, 5, SEEDS[:1]) if args.quick
                                              else (args.steps, args.llava_steps, args.tower_steps, SEEDS))
    ensure_data()
    started = time.perf_counter()
    runs, captions, instructions = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="vlp-language-") as folder:
        root = Path(folder)
        torch.manual_seed(0)
        towers = train_towers(root, tower_steps, runs)
        memory = limber_arms(root, towers, steps, seeds, runs, captions)
        family_seconds = llava_stages(root, towers["CLIP"], llava_steps, runs, instructions, args.family)
        main_seconds = time.perf_counter() - started - family_seconds
        if args.family:
            family_rows(root, towers["CLIP"], steps, runs, captions)
    report = {"seconds": time.perf_counter() - started, "seconds_without_family": main_seconds, "steps": steps,
              "llava_steps": llava_steps, "tower_steps": tower_steps, "runs": runs, "captions": captions,
              "instructions": instructions, "saved_for_backward_mib": memory, "system_prompt": SYSTEM_PROMPT}
    report["table"] = tables(report, seeds)
    print("\n" + report["table"])
    publish("language", report, targets(report, seeds, args.family))


def tables(report: dict, seeds: tuple[int, ...]) -> str:
    captions = report["captions"]
    lines = ["LiMBeR, unseen concepts in the unseen style (mean over seeds; spread = max - min; margin: image prefix "
             "minus shuffled, paired per seed, NLL sign flipped so that positive is better)", "",
             "| tower | prefix | CIDEr | spread | names the object | BLEU-1 | NLL of the name | spread |",
             "|---|---|---|---|---|---|---|---|"]
    for tower in TOWERS:
        rows = [captions[f"LiMBeR, {tower} tower, seed {seed}"] for seed in seeds]
        for condition in CONDITIONS:
            cider, nll = [row[condition]["CIDEr"] for row in rows], [row[condition]["nll"] for row in rows]
            lines.append(f"| {tower} | {condition} | {statistics.mean(cider):.3f} | {max(cider) - min(cider):.3f} | "
                         f"{statistics.mean(row[condition]['names_object'] for row in rows):.3f} | "
                         f"{statistics.mean(row[condition]['BLEU-1'] for row in rows):.3f} | "
                         f"{statistics.mean(nll):.3f} | {max(nll) - min(nll):.3f} |")
        cider = [row["image"]["CIDEr"] - row["shuffled image"]["CIDEr"] for row in rows]
        nll = [row["shuffled image"]["nll"] - row["image"]["nll"] for row in rows]
        lines.append(f"| {tower} | **margin** | {statistics.mean(cider):.3f} | {max(cider) - min(cider):.3f} | | | "
                     f"{statistics.mean(nll):.3f} | {max(nll) - min(nll):.3f} |")
    family = [name for name, _ in FAMILY if name in captions]
    if family:
        lines += ["", "The family's other connectors, our CLIP tower, one seed, the same unseen drawings", "",
                  "| method | prefix | CIDEr | names the object | BLEU-1 | NLL of the name |",
                  "|---|---|---|---|---|---|"]
        for name in family:
            for condition in CONDITIONS:
                row = captions[name][condition]
                lines.append(f"| {name} | {condition} | {row['CIDEr']:.3f} | {row['names_object']:.3f} | "
                             f"{row['BLEU-1']:.3f} | {row['nll']:.3f} |")
    lines += ["", "LLaVA on the unseen drawings' templated instructions (exact match; multiple choice: chance 0.25)",
              "",
              "| model | multiple choice | exact match | " + " | ".join(TASKS) + " |",
              "|---|---|---|" + "---|" * len(TASKS)]
    for name, row in report["instructions"].items():
        lines.append(f"| {name} | {row.get('multiple_choice_accuracy', float('nan')):.3f} | "
                     f"{row['exact_match']:.3f} | "
                     + " | ".join(f"{row.get(f'{task}/exact_match', float('nan')):.3f}" for task in TASKS) + " |")
    lines += ["", "| run | steps | s / step |", "|---|---|---|"]
    lines += [f"| {name} | {run['steps']} | {run['seconds_per_step']:.2f} |" for name, run in report["runs"].items()]
    lines += ["", "| backward of one LiMBeR step (batch 16) | saved tensors (MiB) |", "|---|---|"]
    lines += [f"| {name} | {mib:.0f} |" for name, mib in report["saved_for_backward_mib"].items()]
    return "\n".join(lines)


TASKS = ("caption", "classify", "multiple_choice", "yes_no")

if __name__ == "__main__":
    main()
