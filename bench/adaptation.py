"""Adapting the suite's own emoji CLIP: base-to-novel prompt learning (CoOp, CoCoOp, MaPLe, PRE vs the frozen CLIP's
zero-shot classifier), the 10 emoji categories (DAMVP's pixel prompts, vanilla fine-tuning and DRTune vs zero-shot
and a linear probe of the frozen tower), and CoCoOp's memory against CoOp's as the batch grows.

Protocol (CoCoOp, Zhou et al. 2022, sec. 5.1; `callbacks.BaseToNovel`): the 99 emoji subcategories sorted by id; the
first 50 are base, the other 49 novel. Each method trains its tiny recipe (`experiments/<method>/emoji_tiny.yaml`) on
the base classes of the training split, from the same CLIP checkpoint, for the same number of steps; then it is
scored on the validation + test splits: base images among the base classes, novel images among the novel classes,
and the harmonic mean H of the two. The zero-shot row is the pretrained CLIP with the prompt "a photo of a {}.".
Every method runs with `--seeds` seeds; the table shows the mean and the spread (max - min).

Categories: each method trains its tiny recipe on the training split's `.cls` labels (10 categories) for the same
steps; the score is top-1 on the validation + test splits: DAMVP through CLIP's text head ("a photo of a {}",
`ZeroShotClassification` of the prompted images), vanilla fine-tuning (`DRTune` with `regularize: false`) and DRTune
through their own linear heads, the linear probe a logistic regression on the frozen tower's features.

PEFT: PVP's two stages on the emoji categories. Upstream, PEFTClassifier (VPT-deep, 5 prompts per block) learns
its prompts and head on the Twitter drawings of the demo's seen emoji; downstream, on 4 shots per category of the
Google training split, PVP starts its prompts from the upstream run (new head) and PEFTClassifier from random
prompts, the same steps; both against a logistic-regression probe of the frozen tower on the same 4 shots.

Active learning (PCB, `vlp active`): from the same CLIP, rounds of CoOp training on the labelled set, each round
labelling one sample per category (10) of the Google training split, 5 rounds: random selection (the paper's
baseline), entropy's top candidates without balancing, and PCB (entropy's candidates rebalanced by the
pseudo-labels); top-1 on the validation + test splits and the labelled set's class balance (smallest / largest
count) per round, one seed (`--seeds` is for the prompt-learning rows).

Memory: the bytes autograd saves for the backward of one training step (`saved_tensors_hooks`, exact and
independent of the allocator) for CoOp and CoCoOp at batch 1, 4, 16, with the 50 base classes: CoOp's prompts are the
same for every image (C sequences through the text tower), CoCoOp's are per image (N x C sequences).

Robust: RobustMAE's claim (Huang et al. 2023: frequency prompts raise MAE's PGD accuracy and keep its clean
accuracy) on the emoji categories. A linear head is trained on the frozen emoji MAE (PEFTClassifier, `peft: linear`:
"MAE + head", no prompts); then RobustMAE's tiny recipe trains only the frequency prompts of that frozen classifier
(`head: pretrained`). Both score clean and ℓ∞ PGD top-1 (ε 4/255, 10 steps of 1/255, the recipe's
`AdversarialRobustness`) on the validation + test splits, the attack seeing the whole prompted pipeline. Two prompt
rows: `combine: add` (the recipes') and `combine: replace` (the image's medium / high frequencies overwritten by
the prompt, so the attack's perturbation there is removed: the literal reading of "narrowing the optimization space").
Needs runs/mae/emoji_tiny (`vlp fit --config experiments/mae/emoji_tiny.yaml`; --mae gives another MAE checkpoint).

Few-shot curves (`vlp fewshot`) on Fashion-MNIST from the suite's own Fashion MoCo v3 (a self-supervised ViT-tiny/8,
`experiments/mocov3/fashion_mnist_tiny.yaml`): K = 1, 2, 4, 8, 16 shots per class drawn from the first 10,000
training images, 3 seeds (draw, global and data seed), the same steps, optimizer and batch for every arm, scored on
5,000 official test images: the linear probe (PEFTClassifier `peft: linear`: the head alone, trained as the others
are), VPT-deep from random
prompts, LoRA (rank 8 on attn.qkv) and PVP (VPT-deep started from prompts pretrained upstream on another dataset:
the 10 emoji categories, PEFTClassifier on the same frozen tower; Song et al. 2023's ImageNet -> FGVC in small).
`--sections fewshot_probe` adds the reference row: a logistic regression of the frozen features on the same draws.

Meta prompt (DAMVPMeta, DAM-VP sec. 3.4): Reptile over two upstream tasks (Twitter emoji categories, Fashion-MNIST;
`experiments/damvpmeta/emoji_tiny.yaml`, 50 meta steps) from the same CLIP; then DAMVP on the Google emoji
categories for 100 steps from that meta prompt and from the N(0, 1) start, the same seed; top-1 by CLIP's text head
on the validation + test splits (the paper's claim: the meta-learned start adapts faster and better).

BenchX (`vlp benchx`, `methods.FineTune`): the same Fashion MoCo v3 against its randomly initialised tower (the same
recipe for one step at learning rate 0, so the same architecture untouched), each fine-tuned on 1 % and 10 % of
the training split with the learning rate chosen from 3 on a fixed validation split, seeds 42, 0, 1; test top-1 on
the official test split.

Adapts runs/clip/emoji_tiny (`vlp fit --config experiments/clip/emoji_tiny.yaml` on the `data/emoji` shards of the
README's quick start), training it first when it is missing (--quick: a 20-step stand-in).
Usage: python bench/adaptation.py [--quick] [--steps N] [--seeds K] [--pretrained CKPT] [--mae CKPT] [--ssl CKPT]
(writes bench/results/adaptation.json)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import REPO_ROOT, Target, cpu_model, ensure_shards, publish
from lightning.pytorch import Trainer

from vlp_lightning.callbacks import BaseToNovel, LinearProbe, ZeroShotClassification
from vlp_lightning.callbacks.features import EvaluationCallback, evaluation_mode, new_evaluation_pass
from vlp_lightning.cli import VLPCLI
from vlp_lightning.pretrained import load_method

METHODS = ("CoOp", "CoCoOp", "MaPLe", "PRE")
#: the category rows: (row name, method whose tiny recipe trains, extra vlp arguments).
CATEGORY_RUNS = (("DAMVP", "DAMVP", []), ("vanilla fine-tune", "DRTune", ["--model.init_args.regularize=false"]),
                 ("DRTune", "DRTune", []))
DEFAULT_PRETRAINED = "runs/clip/emoji_tiny/checkpoints/last.ckpt"
MEMORY_BATCHES = (1, 4, 16)


CLIP_RECIPE = REPO_ROOT / "experiments" / "clip" / "emoji_tiny.yaml"


def ensure_checkpoint(path: str, quick: bool, default: str, recipe_path: Path, option: str,
                      extra: tuple[str, ...] = ()) -> str:
    """The checkpoint `path`, or for the `default` one trained now with `recipe_path` on its shards (built when
    missing); --quick trains a 20-step stand-in under `<recipe stem>_bench_quick` instead."""
    stem = recipe_path.stem
    quick_path = default.replace(f"/{stem}/", f"/{stem}_bench_quick/")
    if quick and path == default and not Path(path).is_file():
        path = quick_path
    if Path(path).is_file():
        return path
    if path not in (default, quick_path):
        sys.exit(f"adaptation bench: {option} {path}: no such file; give a checkpoint written by vlp fit")
    ensure_shards({recipe_path.parent.name: recipe_path})
    quick_args = ["--trainer.max_steps=20", f"--experiment={stem}_bench_quick"] if path == quick_path else []
    print(f"adaptation bench: no checkpoint at {path}: training it (vlp fit --config {recipe_path})", flush=True)
    subprocess.run([sys.executable, "-m", "vlp_lightning.cli", "fit", "--config", str(recipe_path),
                    "--trainer.enable_progress_bar=false", *extra, *quick_args], check=True, cwd=REPO_ROOT)
    return path


def ensure_pretrained(path: str, quick: bool) -> str:
    """The CLIP checkpoint to adapt (`ensure_checkpoint` with the CLIP tiny recipe)."""
    return ensure_checkpoint(path, quick, DEFAULT_PRETRAINED, CLIP_RECIPE, "--pretrained")


def recipe(method: str) -> Path:
    return REPO_ROOT / "experiments" / method.lower() / "emoji_tiny.yaml"


def base_to_novel_callback(cli: VLPCLI) -> BaseToNovel:
    return next(callback for callback in cli.trainer.callbacks if isinstance(callback, BaseToNovel))


def build(method: str, pretrained: str, steps: int | None, seed: int, root: Path,
          extra: tuple[str, ...] = (), config: Path | None = None) -> VLPCLI:
    """The method's tiny recipe from `pretrained`, for `steps` steps (None: the recipe's). The seed is the global one
    and the data's (sample order and augmentations: with a deterministic start such as CoOp's "a photo of a", a
    global seed alone gives identical runs)."""
    return VLPCLI(args=[
        "--config", str(config or recipe(method)), f"--model.init_args.pretrained={pretrained}",
        f"--seed_everything={seed}",
        f"--data.seed={seed}", *([f"--trainer.max_steps={steps}"] if steps else []),
        f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--checkpoint.save_top_k=0", "--checkpoint.save_last=false", *extra,
    ], run=False)


def fit(cli: VLPCLI) -> float:
    """Train without the recipe's evaluation callbacks; the seconds it took."""
    cli.trainer.callbacks[:] = [c for c in cli.trainer.callbacks if not isinstance(c, EvaluationCallback)]
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return time.perf_counter() - start


def scores(callback: BaseToNovel, trainer: Trainer, method) -> dict[str, float]:
    """base / novel / hm of one method."""
    return {name.rsplit("/", 1)[1]: value for name, value in scores_of(callback, trainer, method).items()}


def zero_shot(pretrained: str, callback: BaseToNovel) -> dict[str, float]:
    clip, _ = load_method(pretrained, name="--pretrained")
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return scores(callback, trainer, clip)


def train_and_score(method: str, pretrained: str, steps: int | None, seed: int, root: Path) -> dict:
    cli = build(method, pretrained, steps, seed, root / f"{method}-{seed}")
    callback = base_to_novel_callback(cli)
    seconds = fit(cli)
    result = scores(callback, cli.trainer, cli.model)
    trainable = sum(param.numel() for param in cli.model.parameters() if param.requires_grad)
    print(f"{method} seed {seed}: {cli.trainer.global_step} steps in {seconds:.0f} s, {result}", flush=True)
    return {**result, "seconds": seconds, "steps": cli.trainer.global_step, "trainable_parameters": trainable}


def top1(metrics: dict[str, float]) -> float:
    return next(value for name, value in metrics.items() if name.endswith("/top1"))


def categories(pretrained: str, steps: int | None, root: Path) -> dict[str, dict]:
    """The category rows (module doc): each trained run, then the frozen references scored by the recipes' own
    callbacks (DAMVP's zero-shot classifier, DRTune's linear probe), taken from those runs (no extra builds)."""
    trained, evaluations = {}, {}
    for name, method, extra in CATEGORY_RUNS:
        cli = build(method, pretrained, steps, 0, root / f"categories-{name}", tuple(extra))
        evaluations.update({type(c): c for c in cli.trainer.callbacks if isinstance(c, EvaluationCallback)})
        seconds = fit(cli)
        if method == "DAMVP":
            accuracy = top1(scores_of(evaluations[ZeroShotClassification], cli.trainer, cli.model))
        else:
            accuracy = test_accuracy(cli)
        trainable = sum(param.numel() for param in cli.model.parameters() if param.requires_grad)
        trained[name] = {"top1": accuracy, "seconds": seconds, "trainable_parameters": trainable}
        print(f"{name}: top-1 {accuracy:.3f} in {seconds:.0f} s", flush=True)
    clip, _ = load_method(pretrained, name="--pretrained")
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    references = {name: {"top1": top1(scores_of(evaluations[kind], trainer, clip))}
                  for name, kind in (("zero-shot CLIP", ZeroShotClassification),
                                     ("linear probe (frozen)", LinearProbe))}
    return {**references, **trained}


def scores_of(callback: EvaluationCallback, trainer: Trainer, method) -> dict[str, float]:
    new_evaluation_pass()  # nothing cached from another model or from before training
    with evaluation_mode(trainer, method):
        return callback.evaluate(trainer, method)


def test_accuracy(cli: VLPCLI) -> float:
    return cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]["test/accuracy"]


PEFT_RECIPE = REPO_ROOT / "experiments" / "peftclassifier" / "fashion_mnist_tiny.yaml"
#: PVP's upstream data: the Twitter drawings of the demo's seen emoji; downstream: K shots of the Google training split.
UPSTREAM_SHARDS = "data/emoji-twitter/seen-{000000..000001}.tar"
DOWNSTREAM_POOL = "data/emoji/train-{000000..000001}.tar"
EVAL_SHARDS = "data/emoji/val-000000.tar::data/emoji/test-000000.tar"
PEFT_SHOTS = 4


def peft_run(pretrained: str, train: str, steps: int, root: Path, extra: tuple[str, ...] = ()) -> VLPCLI:
    """The PEFTClassifier recipe (VPT-deep) re-aimed at the emoji categories: trained on `train`, tested on the
    Google validation + test splits."""
    cli = build("PEFTClassifier", pretrained, steps, 0, root, (
        "--model.init_args.classnames_from=data/emoji/train-000000.tar", "--model.init_args.label_field=cls",
        f"--data.train_shards={train}", "--data.val_shards=null", f"--data.test_shards={EVAL_SHARDS}",
        "--data.batch_size=32", "--trainer.val_check_interval=1.0", *extra), config=PEFT_RECIPE)
    fit(cli)
    return cli


def peft(pretrained: str, steps: int | None, root: Path) -> dict[str, dict]:
    """PVP's two stages vs its baselines on K shots per category (module doc)."""
    from data_modules.builder import main as vlp_data
    from vlp_lightning.callbacks.features import extract_features
    from vlp_lightning.callbacks.linear_probe import linear_probe_scores

    if not (REPO_ROOT / "data/emoji-twitter/manifest.json").is_file():
        raise SystemExit("adaptation bench: PVP's upstream needs data/emoji-twitter; build it with `make demo` (or "
                         "vlp-data emoji data/emoji-twitter --style twitter --split seen=0.8,unseen=0.2)")
    shots = root / f"emoji-{PEFT_SHOTS}shot"
    if vlp_data(["shots", DOWNSTREAM_POOL, str(shots), "--shots", str(PEFT_SHOTS), "--seed", "1"]) != 0:
        raise SystemExit("adaptation bench: could not draw the few-shot emoji set")
    few = f"{shots}/train-*.tar"
    rows = {}
    clip, _ = load_method(pretrained, name="--pretrained")
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with evaluation_mode(trainer, clip):
        train, test = extract_features(clip, few), extract_features(clip, EVAL_SHARDS)
    scores = linear_probe_scores(train.image, train.labels, test.image, 10, standardize=True)
    rows[f"linear probe ({PEFT_SHOTS}-shot)"] = {"top1": (scores.argmax(1) == test.labels).float().mean().item()}
    upstream = peft_run(pretrained, UPSTREAM_SHARDS, steps or 150, root / "upstream")
    rows["PEFTClassifier upstream (Twitter drawings, all)"] = {"top1": test_accuracy(upstream)}
    checkpoint = root / "upstream.ckpt"
    upstream.trainer.save_checkpoint(checkpoint)
    for name, extra in ((f"PEFTClassifier ({PEFT_SHOTS}-shot, random prompts)", ()),
                        (f"PVP ({PEFT_SHOTS}-shot, prompts from upstream)",
                         ("--model.init_args.peft_checkpoint=" + str(checkpoint),))):
        cli = peft_run(pretrained, few, steps or 100, root / name.split()[0], extra)
        trainable = sum(param.numel() for param in cli.model.parameters() if param.requires_grad)
        rows[name] = {"top1": test_accuracy(cli), "trainable_parameters": trainable}
        print(f"{name}: top-1 {rows[name]['top1']:.3f}", flush=True)
    return rows


#: the active-learning arms: (row name, `vlp active` options); rounds and the labelling budget per round.
ACTIVE_ARMS = (("random", ["--acquisition", "random"]),
               ("entropy (no PCB balance)", ["--acquisition", "entropy", "--no-balance"]),
               ("PCB (entropy + balance)", ["--acquisition", "entropy"]))
ACTIVE_ROUNDS = 5


def active(pretrained: str, steps: int | None, root: Path, rounds: int = ACTIVE_ROUNDS) -> dict[str, list[dict]]:
    """PCB vs random selection at equal labels (module doc): each arm's rounds from `vlp active`'s results.json."""
    from vlp_lightning.commands.active import main as vlp_active

    rows = {}
    for name, options in ACTIVE_ARMS:
        out = root / f"active-{options[1]}-{len(options)}"
        argv = ["--config", str(REPO_ROOT / "experiments" / "pcb" / "emoji_tiny.yaml"), "--pool", DOWNSTREAM_POOL,
                "--rounds", str(rounds), "--seed", "1", "--out", str(out), *options,
                *(["--steps", str(steps)] if steps else []), f"--model.init_args.pretrained={pretrained}"]
        if vlp_active(argv) != 0:
            raise SystemExit(f"adaptation bench: vlp active {' '.join(options)} failed")
        rows[name] = json.loads((out / "results.json").read_text())["rounds"]
        print(f"{name}: " + ", ".join(f"{row['labelled']} labels {100 * row['score']:.1f}" for row in rows[name]),
              flush=True)
    return rows


def active_table(rows: dict[str, list[dict]]) -> str:
    """Test top-1 (and the labelled set's smallest / largest class count) per round and arm."""
    arms = list(rows)
    lines = ["| labels | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for index, first in enumerate(rows[arms[0]]):
        cells = [f"{100 * rows[arm][index]['score']:.1f} ({rows[arm][index]['smallest']}-"
                 f"{rows[arm][index]['largest']})" for arm in arms]
        lines.append(f"| {first['labelled']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


DEFAULT_MAE = "runs/mae/emoji_tiny/checkpoints/last.ckpt"
ROBUST_PLAIN = "MAE + head, no prompts"
ROBUST_LONGER = "MAE + head trained as long as head + prompts, no prompts"
#: RobustMAE's two readings of "occupy the medium / high frequencies": add the prompt to them, or replace them by it.
ROBUST_COMBINES = ("add", "replace")


def robust(mae: str, steps: int | None, root: Path, train: str = DOWNSTREAM_POOL, evaluation: str = EVAL_SHARDS,
           classes_from: str = "data/emoji/train-000000.tar", pgd_steps: int | None = None) -> dict[str, dict]:
    """The MAE + linear head without prompts, then RobustMAE's prompts on that frozen classifier (module doc):
    {row: {clean, pgd}}. `pgd_steps` shortens the attack (tests)."""
    from vlp_lightning.callbacks import AdversarialRobustness

    if not Path(mae).is_file():
        raise SystemExit(f"adaptation bench: --mae {mae}: no such file; train it with vlp fit --config "
                         "experiments/mae/emoji_tiny.yaml or give an MAE checkpoint written by vlp fit")
    classes = (f"--model.init_args.classnames_from={classes_from}", "--model.init_args.label_field=cls")

    def linear_head(head_steps: int, name: str) -> VLPCLI:
        cli = build("PEFTClassifier", mae, head_steps, 0, root / name, (
            *classes, "--model.init_args.peft=linear", f"--data.train_shards={train}", "--data.val_shards=null",
            "--data.batch_size=32", "--trainer.val_check_interval=1.0"), config=PEFT_RECIPE)
        fit(cli)
        return cli

    head = linear_head(steps or 150, "robust-head")
    checkpoint = root / "robust-head.ckpt"
    head.trainer.save_checkpoint(checkpoint)
    plain = None
    rows = {}
    for combine in ROBUST_COMBINES:  # the additive prompt (the recipes') and the replacing one (module doc)
        prompts = build("RobustMAE", str(checkpoint), steps, 0, root / f"robust-prompts-{combine}", (
            *classes, "--model.init_args.head=pretrained", f"--model.init_args.cluster_shards={train}",
            f"--model.init_args.combine={combine}", f"--data.train_shards={train}", "--data.test_shards=null"))
        attack = next(c for c in prompts.trainer.callbacks if isinstance(c, AdversarialRobustness))
        attack.shards, attack.steps = evaluation, pgd_steps or attack.steps
        seconds = fit(prompts)
        scored = scores_of(attack, prompts.trainer, prompts.model)
        if plain is None:
            plain = scores_of(attack, head.trainer, head.model)
            rows[ROBUST_PLAIN] = {"clean": plain[f"robustness/{attack.name}/clean"],
                                  "pgd": plain[f"robustness/{attack.name}/pgd"]}
        rows[robust_row(combine)] = {"clean": scored[f"robustness/{attack.name}/clean"],
                                     "pgd": scored[f"robustness/{attack.name}/pgd"], "seconds": seconds,
                                     "clusters": len(prompts.model.cluster_prompts.prompts)}
    # The prompts add parameters and steps on top of the head: the same head trained for the steps of both stages,
    # without prompts, is the baseline that has had as much training.
    longer = linear_head(head.trainer.max_steps + prompts.trainer.max_steps, "robust-head-longer")
    scored = scores_of(attack, longer.trainer, longer.model)
    rows[ROBUST_LONGER] = {"clean": scored[f"robustness/{attack.name}/clean"],
                           "pgd": scored[f"robustness/{attack.name}/pgd"], "steps": longer.trainer.max_steps}
    for name, row in rows.items():
        print(f"{name}: clean {row['clean']:.3f}, PGD {row['pgd']:.3f}", flush=True)
    return rows


def robust_row(combine: str) -> str:
    return f"MAE + head + RobustMAE prompts ({combine})"


def robust_targets(rows: dict[str, dict]) -> list[Target]:
    plain, targets = rows[ROBUST_PLAIN], []
    for combine in ROBUST_COMBINES:
        prompted = rows.get(robust_row(combine))
        if prompted is None:
            continue
        targets += [Target(f"RobustMAE ({combine}) PGD - no-prompt PGD top-1 (points)",
                           100 * (prompted["pgd"] - plain["pgd"]), 0.0, ">="),
                    Target(f"RobustMAE ({combine}) clean - no-prompt clean top-1 (points)",
                           100 * (prompted["clean"] - plain["clean"]), -2.0, ">=")]
        if ROBUST_LONGER in rows:  # the same training length: robustness beyond what the extra steps buy
            targets.append(Target(f"RobustMAE ({combine}) PGD - equally long no-prompt head's PGD top-1 (points)",
                                  100 * (prompted["pgd"] - rows[ROBUST_LONGER]["pgd"]), 0.0, ">="))
    return targets


def robust_table(rows: dict[str, dict]) -> str:
    lines = ["| model | clean top-1 | PGD top-1 |", "|---|---|---|"]
    return "\n".join(lines + [f"| {name} | {100 * row['clean']:.1f} | {100 * row['pgd']:.1f} |"
                               for name, row in rows.items()])


FASHION_SSL = "runs/mocov3/fashion_mnist_tiny/checkpoints/last.ckpt"
FASHION_SSL_RECIPE = REPO_ROOT / "experiments" / "mocov3" / "fashion_mnist_tiny.yaml"
FASHION_POOL = "data/fashion-mnist/train-{000000..000009}.tar"
FASHION_TRAIN = "data/fashion-mnist/train-{000000..000059}.tar"
FASHION_TEST = "data/fashion-mnist/test-{000000..000004}.tar"
FASHION_CLASSES = "data/fashion-mnist/train-000000.tar"
FEWSHOT_SHOTS = (1, 2, 4, 8, 16)
FEWSHOT_SEEDS = (1, 2, 3)
#: the few-shot arms: (name, recipe, extra vlp options; "{upstream}" is the upstream prompts' checkpoint).
FEWSHOT_ARMS = (("linear probe", PEFT_RECIPE, ("--model.init_args.peft=linear",)),
                ("VPT-deep (random prompts)", PEFT_RECIPE, ("--model.init_args.peft=vpt_deep",)),
                ("LoRA", PEFT_RECIPE, ("--model.init_args.peft=lora",)),
                ("PVP (prompts from upstream)", PEFT_RECIPE,
                 ("--model.init_args.peft=vpt_deep", "--model.init_args.peft_checkpoint={upstream}")))


def ensure_fashion_ssl(path: str, quick: bool) -> str:
    """The Fashion-MNIST SSL checkpoint (`ensure_checkpoint` with the MoCo v3 tiny recipe, without its probes)."""
    return ensure_checkpoint(path, quick, FASHION_SSL, FASHION_SSL_RECIPE, "--ssl", ("--trainer.callbacks=[]",))


def fewshot_curves(ssl: str, steps: int | None, root: Path, shots=FEWSHOT_SHOTS, seeds=FEWSHOT_SEEDS
                   ) -> dict[str, dict]:
    """Every arm's `vlp fewshot` curve (module doc): {arm: {shots: {mean, std, scores}}}."""
    from vlp_lightning.commands.fewshot import main as vlp_fewshot

    upstream = peft_run(ssl, DOWNSTREAM_POOL, steps or 300, root / "fewshot-upstream")
    checkpoint = root / "fewshot-upstream.ckpt"
    upstream.trainer.save_checkpoint(checkpoint)
    print(f"fewshot: upstream prompts on the emoji categories: top-1 {test_accuracy(upstream):.3f}", flush=True)
    curves = {}
    for name, config, extra in FEWSHOT_ARMS:
        out = root / "fewshot"  # one folder: the arms share the drawn subsets
        argv = ["--config", str(config), "--pool", FASHION_POOL, "--shots", *map(str, shots),
                "--seeds", *map(str, seeds), "--steps", str(steps or 100), "--out", str(out),
                f"--model.init_args.pretrained={ssl}", f"--model.init_args.classnames_from={FASHION_CLASSES}",
                "--model.init_args.label_field=cls", f"--data.test_shards={FASHION_TEST}", "--data.batch_size=32",
                *(option.format(upstream=checkpoint) for option in extra)]
        if vlp_fewshot(argv) != 0:
            raise SystemExit(f"adaptation bench: vlp fewshot for {name} failed")
        summary_rows = json.loads((out / "results.json").read_text())["summary"]
        curves[name] = {str(k): {key: row[key] for key in ("mean", "std", "scores")}
                        for k, row in zip(shots, summary_rows)}
        print(f"fewshot {name}: " + ", ".join(f"{k}-shot {100 * curves[name][str(k)]['mean']:.1f}" for k in shots),
              flush=True)
    return curves


FEWSHOT_PROBE = "logistic regression on frozen features"


def fewshot_probe(ssl: str, root: Path, shots=FEWSHOT_SHOTS, seeds=FEWSHOT_SEEDS) -> dict[str, dict]:
    """The reference the trained arms are read against: a logistic regression (standardised features, the
    `LinearProbe` code) fitted on the same K-shot draws (`vlp-data shots` of the same pool and seed) of the frozen
    tower's features, scored on the same test images: {shots: {mean, std, scores}}."""
    from data_modules.builder import main as vlp_data
    from vlp_lightning.callbacks.features import extract_features
    from vlp_lightning.callbacks.linear_probe import linear_probe_scores

    method, _ = load_method(ssl, name="--ssl")
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    curve = {}
    with evaluation_mode(trainer, method):
        test = extract_features(method, FASHION_TEST)
        for k in shots:
            scores = []
            for seed in seeds:
                folder = root / "fewshot-probe" / f"k{k}-seed{seed}"
                if vlp_data(["shots", FASHION_POOL, str(folder), "--shots", str(k), "--seed", str(seed)]) != 0:
                    raise SystemExit("adaptation bench: could not draw the few-shot Fashion-MNIST set")
                train = extract_features(method, f"{folder}/train-*.tar")
                logits = linear_probe_scores(train.image, train.labels, test.image, 10, standardize=True)
                scores.append((logits.argmax(1) == test.labels).float().mean().item())
            curve[str(k)] = {"mean": statistics.fmean(scores), "std": statistics.stdev(scores) if len(scores) > 1
                             else 0.0, "scores": scores}
    print(f"fewshot {FEWSHOT_PROBE}: " + ", ".join(f"{k}-shot {100 * curve[str(k)]['mean']:.1f}" for k in shots),
          flush=True)
    return curve


def fewshot_table(curves: dict[str, dict]) -> str:
    shots = list(next(iter(curves.values())))
    lines = ["| arm | " + " | ".join(f"{k}-shot" for k in shots) + " |", "|---" * (len(shots) + 1) + "|"]
    lines += [f"| {arm} | " + " | ".join(f"{100 * curve[k]['mean']:.1f} ± {100 * curve[k]['std']:.1f}" for k in shots)
              + " |" for arm, curve in curves.items()]
    return "\n".join(lines)


def fewshot_targets(curves: dict[str, dict]) -> list[Target]:
    def mean_over_shots(arm: str) -> float:
        return statistics.fmean(point["mean"] for point in curves[arm].values())

    largest = list(curves["linear probe"])[-1]
    return [
        Target("PVP - VPT-deep from random prompts, top-1 averaged over K (points)",
               100 * (mean_over_shots("PVP (prompts from upstream)") - mean_over_shots("VPT-deep (random prompts)")),
               0.0, ">="),
        *(Target(f"{arm} - linear probe top-1 at {largest} shots (points)",
                 100 * (curves[arm][largest]["mean"] - curves["linear probe"][largest]["mean"]), 0.0, ">=")
          for arm in ("VPT-deep (random prompts)", "LoRA")),
    ]


BENCHX_FRACTIONS = (0.01, 0.1)
BENCHX_LRS = (1e-4, 5e-4, 2e-3)
BENCHX_SEEDS = (42, 0, 1)
BENCHX_RANDOM = "random-init tower (same architecture)"


def benchx(ssl: str, steps: int | None, root: Path, fractions=BENCHX_FRACTIONS, lrs=BENCHX_LRS,
           seeds=BENCHX_SEEDS) -> dict[str, dict]:
    """`vlp benchx` of the SSL checkpoint and its randomly initialised tower (module doc):
    {row: {fraction: {mean, std, scores, lr, samples, validation}}}."""
    from vlp_lightning.commands.benchx import main as vlp_benchx

    random_root = root / "benchx-random"
    subprocess.run([sys.executable, "-m", "vlp_lightning.cli", "fit", "--config", str(FASHION_SSL_RECIPE),
                    "--trainer.max_steps=1", "--model.init_args.optimizer.init_args.lr=0.0",
                    "--trainer.callbacks=[]", "--trainer.enable_progress_bar=false",
                    f"--trainer.default_root_dir={random_root}", "--checkpoint.dirpath=" + str(random_root)],
                   check=True, cwd=REPO_ROOT)
    random_checkpoint = str(random_root / "last.ckpt")
    out = root / "benchx"
    argv = [ssl, random_checkpoint, "--pool", FASHION_TRAIN, "--test", FASHION_TEST,
            "--fractions", *map(str, fractions), "--lrs", *map(str, lrs), "--seeds", *map(str, seeds),
            "--out", str(out), f"--model.init_args.classnames_from={FASHION_CLASSES}",
            *(["--steps", str(steps)] if steps else [])]
    if vlp_benchx(argv) != 0:
        raise SystemExit("adaptation bench: vlp benchx failed")
    names = {ssl: f"MoCo v3 ({Path(ssl).parent.parent.name})", random_checkpoint: BENCHX_RANDOM}
    rows: dict[str, dict] = {}
    for row in json.loads((out / "results.json").read_text())["summary"]:
        rows.setdefault(names[row["checkpoint"]], {})[f"{row['fraction']:g}"] = {
            key: row[key] for key in ("mean", "std", "scores", "lr", "samples", "validation")}
    return rows


def benchx_table(rows: dict[str, dict]) -> str:
    fractions = list(next(iter(rows.values())))
    first = next(iter(rows.values()))
    lines = ["| checkpoint | " + " | ".join(f"{100 * float(f):g} % ({first[f]['samples']} images): top-1, lr"
                                           for f in fractions) + " |", "|---" * (len(fractions) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{100 * row[f]['mean']:.1f} ± {100 * row[f]['std']:.1f} ({row[f]['lr']:g})"
                                         for f in fractions) + " |" for name, row in rows.items()]
    return "\n".join(lines)


def benchx_targets(rows: dict[str, dict]) -> list[Target]:
    pretrained = next(name for name in rows if name != BENCHX_RANDOM)
    return [Target(f"BenchX fine-tuned {pretrained} - random init at {100 * float(f):g} % (points)",
                   100 * (rows[pretrained][f]["mean"] - rows[BENCHX_RANDOM][f]["mean"]), 0.0, ">=")
            for f in rows[pretrained]]


META_STEPS = 50
META_DAMVP_STEPS = 100
META_ROWS = ("DAMVP from N(0, 1) prompts", "DAMVP from the DAMVPMeta prompt")


def meta_prompt(pretrained: str, steps: int | None, root: Path) -> dict[str, dict]:
    """DAMVPMeta's Reptile start against DAMVP's random one (module doc): {row: {top1, ...}}."""
    meta = build("DAMVPMeta", pretrained, META_STEPS if steps is None else min(steps, META_STEPS), 0, root / "meta")
    seconds = fit(meta)
    checkpoint = root / "meta.ckpt"
    meta.trainer.save_checkpoint(checkpoint)
    rows, trained = {}, {"meta_steps": meta.trainer.global_step, "meta_seconds": seconds}
    for name, extra in zip(META_ROWS, ((), (f"--model.init_args.meta_prompt={checkpoint}",))):
        cli = build("DAMVP", pretrained, steps or META_DAMVP_STEPS, 0, root / f"meta-{len(extra)}", extra)
        evaluation = next(c for c in cli.trainer.callbacks if isinstance(c, ZeroShotClassification))
        seconds = fit(cli)
        trainable = sum(param.numel() for param in cli.model.parameters() if param.requires_grad)
        rows[name] = {"top1": top1(scores_of(evaluation, cli.trainer, cli.model)), "seconds": seconds,
                      "trainable_parameters": trainable, "steps": cli.trainer.global_step,
                      **(trained if extra else {})}
        print(f"{name}: top-1 {rows[name]['top1']:.3f} in {seconds:.0f} s", flush=True)
    return rows


def category_table(rows: dict[str, dict]) -> str:
    lines = ["| method | top-1 | trainable params | train s |", "|---|---|---|---|"]
    lines += [f"| {name} | {100 * row['top1']:.1f} | {row.get('trainable_parameters', 0):,} | "
              f"{row.get('seconds', 0):.0f} |" for name, row in rows.items()]
    return "\n".join(lines)


def saved_bytes(method, batch_size: int) -> int:
    """Bytes autograd keeps for the backward of one training step of `method` at `batch_size`."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    size = method.image_size
    labels = torch.arange(batch_size) % len(method.classes.trained)
    batch = {"image": torch.randn(batch_size, 3, size, size), "label": labels,
             "meta": [{method.classes.label_field: int(label)} for label in labels]}
    method.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = method.forward_loss(batch)["loss"]
    loss.backward()
    return total


def memory(pretrained: str, root: Path) -> dict:
    rows = {}
    for method in ("CoOp", "CoCoOp"):
        model = build(method, pretrained, 1, 0, root / f"memory-{method}").model
        rows[method] = {str(batch): saved_bytes(model, batch) for batch in MEMORY_BATCHES}
        print(f"{method} saved activations: " + ", ".join(
            f"batch {batch}: {value / 2**20:.1f} MiB" for batch, value in rows[method].items()), flush=True)
    return rows


def summary(runs: list[dict]) -> dict:
    out = {}
    for metric in ("base", "novel", "hm"):
        values = [run[metric] for run in runs]
        out[metric] = statistics.fmean(values)
        out[f"{metric}_spread"] = max(values) - min(values)
    out["seconds"] = statistics.fmean(run["seconds"] for run in runs)
    out["trainable_parameters"] = runs[0]["trainable_parameters"]
    return out


def table(rows: dict[str, dict]) -> str:
    lines = ["| method | base | novel | H | trainable params | train s |", "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        def cell(metric: str) -> str:
            spread = row.get(f"{metric}_spread")
            return f"{100 * row[metric]:.1f}" + (f" ± {100 * spread / 2:.1f}" if spread else "")
        lines.append(f"| {name} | {cell('base')} | {cell('novel')} | {cell('hm')} | "
                     f"{row.get('trainable_parameters', 0):,} | {row.get('seconds', 0):.0f} |")
    return "\n".join(lines)


SECTIONS = ("base2novel", "categories", "peft", "active", "memory", "robust", "fewshot", "fewshot_probe", "benchx",
            "meta")
#: the report keys each section writes (base2novel writes "runs" too)
SECTION_KEYS = {"base2novel": "rows", "runs": "runs", "categories": "categories", "peft": "peft", "active": "active",
                "memory": "saved_activation_bytes", "robust": "robust", "fewshot": "fewshot", "benchx": "benchx",
                "fewshot_probe": "fewshot_probe", "meta": "meta"}
RESULTS = REPO_ROOT / "bench" / "results" / "adaptation.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="30 steps, one seed: a smoke run of the whole bench")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default: the recipes')")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per method (default 2)")
    parser.add_argument("--pretrained", default=DEFAULT_PRETRAINED,
                        help=f"CLIP checkpoint (default {DEFAULT_PRETRAINED}, trained first when missing)")
    parser.add_argument("--mae", default=DEFAULT_MAE, help=f"MAE checkpoint of the robust section ({DEFAULT_MAE})")
    parser.add_argument("--ssl", default=FASHION_SSL,
                        help=f"Fashion-MNIST SSL checkpoint of the fewshot and benchx sections ({FASHION_SSL})")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these parts; the others keep their results from the last run")
    args = parser.parse_args()
    args.pretrained = ensure_pretrained(args.pretrained, args.quick)
    seeds = 1 if args.quick else args.seeds
    steps = 30 if args.quick else args.steps
    started = time.perf_counter()
    report: dict = {}  # the sections run now; the stored ones are merged in when this run ends (below)
    with tempfile.TemporaryDirectory(prefix="vlp-adaptation-") as folder:
        root = Path(folder)
        if "base2novel" in args.sections:
            probe = build("CoOp", args.pretrained, 1, 0, root / "probe")
            rows = {"zero-shot CLIP": zero_shot(args.pretrained, base_to_novel_callback(probe))}
            print(f"zero-shot: {rows['zero-shot CLIP']}", flush=True)
            runs = {}
            for method in METHODS:
                runs[method] = [train_and_score(method, args.pretrained, steps, seed, root) for seed in range(seeds)]
                rows[method] = summary(runs[method])
            report.update(rows=rows, runs=runs)
        if "categories" in args.sections:
            report["categories"] = categories(args.pretrained, steps, root)
        if "peft" in args.sections:
            report["peft"] = peft(args.pretrained, steps, root)
        if "active" in args.sections:
            report["active"] = active(args.pretrained, steps, root, rounds=2 if args.quick else ACTIVE_ROUNDS)
        if "memory" in args.sections:
            report["saved_activation_bytes"] = memory(args.pretrained, root)
        if "robust" in args.sections:
            report["robust"] = robust(args.mae, steps, root)
        if "meta" in args.sections:
            report["meta"] = meta_prompt(args.pretrained, steps, root)
        if {"fewshot", "fewshot_probe", "benchx"} & set(args.sections):
            ssl = ensure_fashion_ssl(args.ssl, args.quick)
            if "fewshot_probe" in args.sections:
                report["fewshot_probe"] = fewshot_probe(ssl, root, shots=(1, 4) if args.quick else FEWSHOT_SHOTS,
                                                        seeds=(1, 2) if args.quick else FEWSHOT_SEEDS)
            if "fewshot" in args.sections:
                report["fewshot"] = fewshot_curves(ssl, steps, root, shots=(1, 4) if args.quick else FEWSHOT_SHOTS,
                                                   seeds=(1, 2) if args.quick else FEWSHOT_SEEDS)
            if "benchx" in args.sections:
                report["benchx"] = benchx(ssl, steps, root, fractions=(0.01,) if args.quick else BENCHX_FRACTIONS,
                                          lrs=BENCHX_LRS[:2] if args.quick else BENCHX_LRS,
                                          seeds=BENCHX_SEEDS[:2] if args.quick else BENCHX_SEEDS)
    # Read the stored results only now, so two runs of different sections at once both keep their sections.
    kept = json.loads(RESULTS.read_text()) if RESULTS.is_file() and not args.quick else {}
    when = {"date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "cpu": cpu_model(),
            "steps": steps or "the recipes'"}
    report = {**{name: kept[name] for name in SECTION_KEYS.values() if name in kept and name not in report},
              **report, "section_runs": {**kept.get("section_runs", {}),
                                         **{section: when for section in args.sections}}}
    targets = []
    if "rows" in report:
        rows = report["rows"]
        print("\n" + table(rows))
        coop_hm = rows["CoOp"]["hm"]
        targets += [
            Target("MaPLe H - CoOp H (points)", 100 * (rows["MaPLe"]["hm"] - coop_hm), 0.0, ">="),
            Target("PRE H - CoOp H (points)", 100 * (rows["PRE"]["hm"] - coop_hm), 0.0, ">="),
            *(Target(f"{method} base - zero-shot base (points)",
                     100 * (rows[method]["base"] - rows["zero-shot CLIP"]["base"]), 0.0, ">=") for method in METHODS),
        ]
        report["table"] = table(rows)
    if "categories" in report:
        category_rows = report["categories"]
        print("\n" + category_table(category_rows))
        targets += [
            Target("DRTune - vanilla fine-tune top-1 (points)",
                   100 * (category_rows["DRTune"]["top1"] - category_rows["vanilla fine-tune"]["top1"]), 0.0, ">="),
            Target("DAMVP - zero-shot top-1 (points)",
                   100 * (category_rows["DAMVP"]["top1"] - category_rows["zero-shot CLIP"]["top1"]), 0.0, ">="),
        ]
        report["category_table"] = category_table(category_rows)
    if "peft" in report:
        peft_rows = report["peft"]
        print("\n" + category_table(peft_rows))
        random_start = peft_rows[f"PEFTClassifier ({PEFT_SHOTS}-shot, random prompts)"]["top1"]
        targets += [
            Target("PVP - random-prompt PEFT top-1 (points)",
                   100 * (peft_rows[f"PVP ({PEFT_SHOTS}-shot, prompts from upstream)"]["top1"] - random_start),
                   0.0, ">="),
            Target(f"random-prompt PEFT - {PEFT_SHOTS}-shot linear probe top-1 (points)",
                   100 * (random_start - peft_rows[f"linear probe ({PEFT_SHOTS}-shot)"]["top1"]), 0.0, ">="),
        ]
        report["peft_table"] = category_table(peft_rows)
    if "active" in report:
        active_rows = report["active"]
        print("\n" + active_table(active_rows))
        final = {name: arm[-1] for name, arm in active_rows.items()}
        targets += [
            Target(f"PCB - random test top-1 at {final['random']['labelled']} labels (points)",
                   100 * (final["PCB (entropy + balance)"]["score"] - final["random"]["score"]), 0.0, ">="),
            Target(f"PCB - entropy without balance test top-1 at {final['random']['labelled']} labels (points)",
                   100 * (final["PCB (entropy + balance)"]["score"]
                          - final["entropy (no PCB balance)"]["score"]), 0.0, ">="),
        ]
        report["active_table"] = active_table(active_rows)
    if "robust" in report:
        print("\n" + robust_table(report["robust"]))
        targets += robust_targets(report["robust"])
        report["robust_table"] = robust_table(report["robust"])
    if "fewshot" in report:
        curves = {**report["fewshot"], **({FEWSHOT_PROBE: report["fewshot_probe"]} if "fewshot_probe" in report
                                          else {})}
        print("\n" + fewshot_table(curves))
        targets += fewshot_targets(report["fewshot"])
        report["fewshot_table"] = fewshot_table(curves)
    if "benchx" in report:
        print("\n" + benchx_table(report["benchx"]))
        targets += benchx_targets(report["benchx"])
        report["benchx_table"] = benchx_table(report["benchx"])
    if "meta" in report:
        meta_rows = report["meta"]
        print("\n" + category_table(meta_rows))
        targets.append(Target("DAMVP from the meta prompt - from N(0, 1) top-1 (points)",
                              100 * (meta_rows[META_ROWS[1]]["top1"] - meta_rows[META_ROWS[0]]["top1"]), 0.0, ">="))
        report["meta_table"] = category_table(meta_rows)
    report.update(quick=args.quick, seconds=time.perf_counter() - started, pretrained=args.pretrained,
                  steps=steps or "the recipes'", seeds=seeds, sections=args.sections,
                  targets=[target.as_dict() for target in targets])
    publish("adaptation", report, targets)

if __name__ == "__main__":
    main()
