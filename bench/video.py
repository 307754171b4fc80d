"""Video-language: does a method read time? HecVL's levels on BabyAI levels never trained on, X-CLIP's cross-frame
communication on moving-emoji clips, each next to the frame model it extends.

* **BabyAI, zero-shot sub-goal recognition** (`vlp-data babyai data/babyai`: the expert bot's episodes; the level
  GoToLocal is held out as the split `unseen`). Three arms train the same towers (`experiments/hecvl/
  babyai_tiny.yaml`'s) for the same steps on the seen levels: **HecVL** (narration level on the bot's sub-goal
  segments + abstract level on the missions); **OphCLIP** (its recipe: the same levels, a quarter of the clips
  silent and given retrieved narrations); the **frame-averaged CLIP** (`VideoTextMethod`, 4 frames, missions
  only); an **image CLIP** (the same with one frame per clip: a frame and its episode's mission, what an image-text
  corpus of frames would hold). Every sub-goal segment of the unseen episodes (all of an episode's frames, each
  segment the frames its timeline span covers) is matched against every distinct sub-goal text of the split in
  the joint space (HecVL's narration space): HecVL and the frame-averaged CLIP embed the segment's frames, the
  image CLIP its middle frame. Chance is 1 / (number of distinct texts); the most frequent sub-goal, always
  answered, is the floor a model that ignores the frames reaches.
* **Moving emoji, zero-shot motion** (`vlp-data moving data/moving` of the demo's Google drawings). A tiny image
  CLIP is trained on the drawings (`experiments/clip/emoji_tiny.yaml`, 64 a step, a 4-block tower); **X-CLIP**
  (`experiments/xclip/moving_tiny.yaml`), **TemAdapter** (frozen CLIP, its aligners train) and the
  **frame-averaged CLIP** start from it and train for the same steps
  (16 clips of 4 frames a step: `MOVING_FRAMES`, `MOVING_BATCH`) on the clips' motion captions ("a grinning face
  emoji moving left, then up"). On the val clips: the first leg's direction among the 8 captions that differ only
  there (chance 1/8), and the order of two legs: the caption against its legs swapped ("moving up, then left";
  chance 1/2). Mean pooling is blind to frame order, so the swapped caption differs for it only as text.
* **Masked video modelling** (the same moving clips, no text): **SIGMA** (`experiments/sigma/moving_tiny.yaml`)
  and its **VideoMAE** pixel-target twin (`moving_videomae_tiny.yaml`: the same encoder, masks and budget) train
  for the same steps; a logistic regression on each encoder's clip features (train clips) predicts the direction of
  the leg at the clip's middle (val clips; 8-way, a motion a single frame does not show), next to the same encoder
  untrained. **VEDIT** (flow-matching predictor on the emoji CLIP's frozen tower, its supervised probes off) is
  probed alike, next to that frozen tower's frame mean.
* **VideoPhy pair accuracy** (`callbacks.videophy`): every clip of BabyAI's unseen level and of the moving val set
  (4 uniform frames) against its time-reversed and its teleporting twin (the middle third moved to the end), with
  its own caption, scored by each multi-frame video-text model above; a tie counts half, so a model blind to frame
  order scores exactly 0.5.

Usage: python bench/video.py [--steps N] [--quick]   (writes bench/results/video.json)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import REPO_ROOT, RESULTS_DIR, Target, machine, publish  # noqa: E402

from data_modules.builder import main as vlp_data  # noqa: E402
from data_modules.clip_views import ClipViews  # noqa: E402
from data_modules.clips import clip_fps, read_clip, sampled_segments, timeline  # noqa: E402
from data_modules.pipeline import STREAM_FIELD, make_loader  # noqa: E402
from data_modules.sources.moving import DIRECTIONS  # noqa: E402
from data_modules.video import ClipDecoder  # noqa: E402
from data_modules.views import finish_views  # noqa: E402
from vlp_lightning.callbacks.captioning import caption_metrics  # noqa: E402
from vlp_lightning.callbacks.linear_probe import linear_probe_scores  # noqa: E402
from vlp_lightning.callbacks.videophy import pair_outcomes  # noqa: E402
from vlp_lightning.cli import VLPCLI  # noqa: E402
from vlp_lightning.methods.video.base import VideoTextMethod  # noqa: E402

BABYAI, EMOJI, MOVING = "data/babyai", "data/emoji", "data/moving"
EXPERIMENTS = REPO_ROOT / "experiments"
FRAME_CLIP = "vlp_lightning.methods.video.base.VideoTextMethod"
#: the moving arms at a CPU's budget: 4 of a clip's 16 frames, 16 clips a step (the recipe: 8 frames, 32 clips); the
#: image CLIP at 64 drawings a step (the recipe: 128) with the BabyAI arms' tower size (4 blocks of width 128 at
#: 64 px; the recipe: ViT-Tiny's 12 blocks of 192), which the video arms inherit
MOVING_FRAMES, MOVING_BATCH, CLIP_BATCH = 4, 16, 64
CLIP_TOWER = {"width": 128, "depth": 4, "num_heads": 4}


# ---------------------------------------------------------------------------------------------------- data, runs
def ensure_data(episodes: int, clips: int) -> None:
    """BabyAI episodes, the emoji drawings and their moving clips, built once into data/ when missing."""
    if not (REPO_ROOT / BABYAI / "manifest.json").is_file():
        assert vlp_data(["babyai", str(REPO_ROOT / BABYAI), "--episodes", str(episodes)]) == 0
    if not (REPO_ROOT / EMOJI / "manifest.json").is_file():
        assert vlp_data(["emoji", str(REPO_ROOT / EMOJI), "--style", "google", "--split",
                         "train=0.8,val=0.1,test=0.1"]) == 0
    if not (REPO_ROOT / MOVING / "manifest.json").is_file():
        assert vlp_data(["moving", str(REPO_ROOT / MOVING), "--images", str(REPO_ROOT / EMOJI / "train-*.tar"),
                         "--count", str(clips), "--split", "train=0.9,val=0.1"]) == 0


def variant(recipe: Path, folder: Path, class_path: str | None = None, drop: tuple[str, ...] = (),
            **init_args) -> Path:
    """`recipe` with another method class, some of its model arguments dropped or set: a temporary YAML."""
    config = yaml.safe_load(recipe.read_text())
    model = config["model"]
    model["class_path"] = class_path or model["class_path"]
    for name in drop:
        model["init_args"].pop(name, None)
    model["init_args"].update(init_args)
    path = folder / f"{recipe.parent.name}-{len(list(folder.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(recipe: Path, steps: int, root: Path, name: str, *extra: str) -> tuple[VLPCLI, float]:
    """`vlp fit` of `recipe` for `steps` (no validation, no callbacks), in-process: the CLI and seconds per step."""
    cli = VLPCLI(args=[
        "--config", str(recipe), f"--trainer.max_steps={steps}", "--data.val_shards=null",
        "--trainer.callbacks=[]", f"--trainer.default_root_dir={root / name}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--checkpoint.save_top_k=0", "--checkpoint.save_last=true", *extra,
    ], run=False)
    timer = StepTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.model.eval()
    print(f"{name}: {steps} steps, {timer.per_step():.2f} s/step", flush=True)
    return cli, timer.per_step()


class StepTimer(Callback):
    """Seconds per optimizer step after the first (start-up, worker spawn and the first batch left out)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.ends.append(time.perf_counter())

    def per_step(self) -> float:
        return (self.ends[-1] - self.ends[0]) / max(1, len(self.ends) - 1) if self.ends else float("nan")


def clip_batches(shards: str, method, num_frames: int, batch_size: int = 32, views: ClipViews | None = None):
    """Every clip of `shards` once, `num_frames` frames sampled uniformly without jitter (or `views`), the centred
    square, with its caption and meta (finished: float [B, T, 3, S, S])."""
    views = views or ClipViews(num_frames=num_frames, sampling="uniform", temporal_jitter=False, scale=None,
                               hflip=False, mean=method.vision.mean, std=method.vision.std)
    decoder = ClipDecoder(views.build(method.image_size), with_caption=True)
    for batch in make_loader(str(REPO_ROOT / shards), decoder, batch_size, shuffle=False, pad=False, finish=False):
        batch.pop(STREAM_FIELD)
        yield finish_views(batch)


# ---------------------------------------------------------------------------------------------------- BabyAI
def episodes(shards: str, method) -> list[tuple[torch.Tensor, list[tuple[int, int, str]]]]:
    """Every episode of `shards` with ALL its frames (the centred square at the method's size, normalised as its
    views do) and its timeline as (first frame, last frame, text) spans: no sampler drops a short episode."""
    from data_modules.builder import iterate_shard

    mean, std = (torch.tensor(values).view(1, 3, 1, 1) for values in (method.vision.mean, method.vision.std))
    found = []
    for shard in sorted((REPO_ROOT / shards).parent.glob(Path(shards).name)):
        for _, sample in iterate_shard(shard):
            meta = json.loads(sample["json"])
            clip = read_clip(sample)
            fps = clip_fps(meta, clip)
            frames = torch.from_numpy(clip.frames(list(range(clip.count)))).permute(0, 3, 1, 2).float() / 255
            side = min(frames.shape[-2:])
            top, left = (frames.shape[-2] - side) // 2, (frames.shape[-1] - side) // 2
            frames = F.interpolate(frames[..., top:top + side, left:left + side], size=method.image_size,
                                   mode="bilinear", antialias=True, align_corners=False)
            times = [index / fps for index in range(clip.count)]
            found.append(((frames - mean) / std, sampled_segments(timeline(meta, clip.count / fps), times)))
    return found


def sub_goal_recognition(methods: dict, split: str) -> dict[str, dict]:
    """Accuracy of each method naming the sub-goal of every segment of `split` among its distinct texts."""
    reference = next(iter(methods.values()))[0]
    spans = [(video, first, last, text) for video, segments in episodes(f"{BABYAI}/{split}-*.tar", reference)
             for first, last, text in segments]
    texts = sorted({text for *_, text in spans})
    rows = {}
    with torch.no_grad():
        for name, (method, middle_frame) in methods.items():
            candidates = method.encode_text(method.tokenizer(texts))
            clips = [video[(first + last) // 2:(first + last) // 2 + 1] if middle_frame else video[first:last + 1]
                     for video, first, last, _ in spans]
            right = 0
            for length in sorted({len(clip) for clip in clips}):  # spans of one length: one batched forward
                chosen = [index for index, clip in enumerate(clips) if len(clip) == length]
                for start in range(0, len(chosen), 64):
                    part = chosen[start:start + 64]
                    best = (method.encode_video(torch.stack([clips[i] for i in part])) @ candidates.T).argmax(1)
                    right += sum(texts[int(b)] == spans[i][3] for b, i in zip(best, part))
            rows[name] = {"accuracy": right / len(spans)}
    rows["chance"] = {"accuracy": 1 / len(texts)}
    counts = [sum(span[3] == text for span in spans) for text in texts]
    rows["most frequent sub-goal, always"] = {"accuracy": max(counts) / len(spans),
                                             "text": texts[counts.index(max(counts))]}
    for row in rows.values():
        row.update(segments=len(spans), texts=len(texts))
    return rows


def babyai_arms(steps: int, root: Path, runs: dict) -> dict:
    recipe = EXPERIMENTS / "hecvl" / "babyai_tiny.yaml"
    hecvl_only = ("narration_weight", "summary_weight", "abstract_weight")
    arms = {"HecVL": (recipe, False), "OphCLIP (25 % silent)": (EXPERIMENTS / "ophclip" / "babyai_tiny.yaml", False),
            "frame-averaged CLIP (4 frames)": (variant(recipe, root, FRAME_CLIP, hecvl_only), False),
            "image CLIP (middle frame)": (variant(recipe, root, FRAME_CLIP, hecvl_only, num_frames=1), True)}
    trained = {}
    for name, (config, middle_frame) in arms.items():
        torch.manual_seed(0)
        cli, per_step = train(config, steps, root, name.split(" ")[0] + str(len(trained)),
                              f"--data.train_shards={REPO_ROOT / BABYAI}/train-*.tar")
        runs[name] = {"steps": steps, "seconds_per_step": per_step}
        trained[name] = (cli.model, middle_frame)
    rows = {split: sub_goal_recognition(trained, split) for split in ("unseen", "val")}
    multi_frame = {name: method for name, (method, middle_frame) in trained.items() if not middle_frame}
    rows["videophy"] = videophy(multi_frame, f"{BABYAI}/unseen-*.tar", num_frames=4)
    return rows


# ---------------------------------------------------------------------------------------------------- moving emoji
def motion_queries(methods: dict) -> dict[str, dict]:
    """First-leg direction among 8 captions and two-leg order against the swapped caption, on the val clips."""
    rows = {name: {"direction": 0, "order": 0} for name in methods}
    clips = orders = 0
    reference = next(iter(methods.values()))
    with torch.no_grad():
        for batch in clip_batches(f"{MOVING}/val-*.tar", reference, reference.num_frames, batch_size=16):
            texts, swapped_at = [], []  # 8 direction captions per clip, then the clip's caption and its swap
            for caption, meta in zip(batch["caption"], batch["meta"]):
                prefix = caption.split(" moving ")[0] + " moving "
                legs = [leg["direction"] for leg in meta["legs"]]
                texts += [prefix + ", then ".join([direction, *legs[1:]]) for direction in DIRECTIONS]
                swap = prefix + ", then ".join([legs[1], legs[0], *legs[2:]]) if len(legs) > 1 else caption
                texts += [caption, swap]
                swapped_at.append(len(legs) > 1)
            truth = [list(DIRECTIONS).index(meta["legs"][0]["direction"]) for meta in batch["meta"]]
            clips += len(truth)
            orders += sum(swapped_at)
            for name, method in methods.items():  # every clip against every text, each clip's own 10 read out
                logits = method.video_text_logits(batch["video"], method.tokenizer(texts))
                for index, (first, two_legs) in enumerate(zip(truth, swapped_at)):
                    own = logits[index, 10 * index:10 * index + 10]
                    rows[name]["direction"] += int(own[:8].argmax()) == first
                    rows[name]["order"] += two_legs and bool(own[8] > own[9])
    for row in rows.values():
        row.update(direction=row["direction"] / clips, order=row["order"] / max(1, orders), clips=clips,
                   two_leg_clips=orders)
    rows["chance"] = {"direction": 1 / len(DIRECTIONS), "order": 0.5, "clips": clips, "two_leg_clips": orders}
    return rows


def moving_arms(steps: int, clip_steps: int, root: Path, runs: dict) -> dict:
    torch.manual_seed(0)
    clip, per_step = train(EXPERIMENTS / "clip" / "emoji_tiny.yaml", clip_steps, root, "clip",
                           f"--data.train_shards={REPO_ROOT / EMOJI}/train-*.tar", "--data.test_shards=null",
                           f"--data.batch_size={CLIP_BATCH}", *(f"--model.init_args.vision.init_args.{name}={value}"
                                                                for name, value in CLIP_TOWER.items()))
    runs["image CLIP (emoji drawings)"] = {"steps": clip_steps, "seconds_per_step": per_step}
    start = str(next((root / "clip").glob("**/last.ckpt")))
    recipe = EXPERIMENTS / "xclip" / "moving_tiny.yaml"
    xclip_only = ("mit_layers", "prompt_layers", "prompt_alpha", "new_layers_lr")
    arms = {"X-CLIP": recipe, "frame-averaged CLIP": variant(recipe, root, FRAME_CLIP, xclip_only),
            "TemAdapter": EXPERIMENTS / "temadapter" / "moving_tiny.yaml"}
    trained = {}
    for name, config in arms.items():
        torch.manual_seed(0)
        cli, per_step = train(config, steps, root, name.replace(" ", "")[:8] + str(len(trained)),
                              f"--data.train_shards={REPO_ROOT / MOVING}/train-*.tar",
                              f"--model.init_args.pretrained_clip={start}",
                              f"--model.init_args.num_frames={MOVING_FRAMES}", f"--data.batch_size={MOVING_BATCH}")
        runs[name] = {"steps": steps, "seconds_per_step": per_step}
        trained[name] = cli.model
    rows = {"queries": motion_queries(trained), "videophy": videophy(trained, f"{MOVING}/val-*.tar", MOVING_FRAMES)}
    torch.manual_seed(0)  # VEDIT on the same frozen tower, its probes off (self-supervised, as SIGMA below)
    cli, per_step = train(EXPERIMENTS / "vedit" / "moving_tiny.yaml", steps, root, "vedit",
                          f"--data.train_shards={REPO_ROOT / MOVING}/train-*.tar",
                          f"--model.init_args.pretrained_clip={start}",
                          f"--model.init_args.num_frames={MOVING_FRAMES}", f"--data.batch_size={MOVING_BATCH}",
                          "--model.init_args.probe_weight=0.0", "--model.init_args.num_future=1")
    runs["VEDIT (probes off)"] = {"steps": steps, "seconds_per_step": per_step}
    frozen = VideoTextMethod(pretrained_clip=start).eval()  # the start's tower, untouched

    def uniform(method) -> ClipViews:
        return ClipViews(num_frames=MOVING_FRAMES, sampling="uniform", temporal_jitter=False, scale=None,
                         hflip=False, mean=method.vision.mean, std=method.vision.std)

    rows["probe"] = {"VEDIT (frozen emoji-CLIP tower + predictor)": clip_probe(cli.model, uniform(cli.model)),
                     "frozen emoji-CLIP tower, frame mean": clip_probe(frozen, uniform(frozen))}
    return rows


# ---------------------------------------------------------------------------------------------------- VideoPhy
def videophy(models: dict, shards: str, num_frames: int) -> dict[str, dict]:
    """VideoPhy pair accuracy of each video-text model (`callbacks.videophy.pair_outcomes`): every clip of
    `shards` (`num_frames` uniform frames) against its reversed and teleporting twins, with its own caption."""
    totals = {name: {} for name in models}
    reference = next(iter(models.values()))
    for batch in clip_batches(shards, reference, num_frames, batch_size=32):
        for name, method in models.items():
            for kind, outcomes in pair_outcomes(method, batch["video"], method.tokenizer(batch["caption"])).items():
                totals[name].setdefault(kind, []).append(outcomes)
    rows = {name: {kind: torch.cat(parts).mean().item() for kind, parts in kinds.items()}
            for name, kinds in totals.items()}
    rows["chance"] = {kind: 0.5 for kind in next(iter(rows.values()))}
    return rows


# ---------------------------------------------------------------------------------------------------- SIGMA
def middle_direction(meta: dict) -> int:
    """The direction (index into DIRECTIONS) of the leg holding the clip's middle frame."""
    middle = (meta["legs"][-1]["last_frame"] + 1) // 2
    leg = next((leg for leg in meta["legs"] if leg["first_frame"] <= middle <= leg["last_frame"]), meta["legs"][-1])
    return list(DIRECTIONS).index(leg["direction"])


def clip_probe(method, views: ClipViews | None = None) -> dict[str, float]:
    """Linear probe (logistic regression on `probe_features`, standardised) of the direction at the clip's middle,
    fitted on the train clips, scored on the val clips; `views`, by default SIGMA's training window (`frame_stride`
    apart), centred, no jitter."""
    views = views or ClipViews(num_frames=method.num_frames, sampling="stride", strides=(method.frame_stride,),
                               temporal_jitter=False, scale=None, hflip=False, mean=method.vision.mean,
                               std=method.vision.std)
    split_features = {}
    with torch.no_grad():
        for split in ("train", "val"):
            features, labels = [], []
            for batch in clip_batches(f"{MOVING}/{split}-*.tar", method, views.sampler.num_frames, 64, views):
                features.append(method.probe_features(batch["video"]))
                labels += [middle_direction(meta) for meta in batch["meta"]]
            split_features[split] = torch.cat(features), torch.tensor(labels)
    (train_x, train_y), (val_x, val_y) = split_features["train"], split_features["val"]
    scores = linear_probe_scores(train_x, train_y, val_x, len(DIRECTIONS), standardize=True)
    return {"linear_top1": (scores.argmax(1) == val_y).double().mean().item(), "train_clips": len(train_y),
            "val_clips": len(val_y)}


def sigma_arms(steps: int, root: Path, runs: dict) -> dict:
    recipes = {"SIGMA": EXPERIMENTS / "sigma" / "moving_tiny.yaml",
               "VideoMAE pixel targets": EXPERIMENTS / "sigma" / "moving_videomae_tiny.yaml"}
    rows = {}
    for name, recipe in recipes.items():
        torch.manual_seed(0)
        cli, per_step = train(recipe, steps, root, name.split(" ")[0] + "-masked",
                              f"--data.train_shards={REPO_ROOT / MOVING}/train-*.tar")
        runs[name] = {"steps": steps, "seconds_per_step": per_step}
        rows[name] = clip_probe(cli.model)
        print(f"{name}: {rows[name]}", flush=True)
    # SIGMA (DINO): the frozen targets of a DINO run's EMA teacher, DINO's tiny recipe on the emoji images
    torch.manual_seed(0)
    train(EXPERIMENTS / "dino" / "emoji_tiny.yaml", steps, root, "sigma-dino-tower",
          f"--data.train_shards={REPO_ROOT / EMOJI}/train-*.tar")
    runs["DINO tower (emoji images)"] = {"steps": steps, "seconds_per_step": None}
    tower = str(next((root / "sigma-dino-tower").glob("**/last.ckpt")))
    torch.manual_seed(0)
    cli, per_step = train(EXPERIMENTS / "sigma" / "moving_dino_tiny.yaml", steps, root, "SIGMA-dino",
                          f"--data.train_shards={REPO_ROOT / MOVING}/train-*.tar",
                          f"--model.init_args.target_tower={tower}")
    runs["SIGMA (DINO targets)"] = {"steps": steps, "seconds_per_step": per_step}
    rows["SIGMA (DINO targets)"] = clip_probe(cli.model)
    print(f"SIGMA (DINO targets): {rows['SIGMA (DINO targets)']}", flush=True)
    torch.manual_seed(0)
    untrained = VLPCLI(args=["--config", str(recipes["SIGMA"]), "--trainer.callbacks=[]"], run=False).model.eval()
    rows["random init (same encoder)"] = clip_probe(untrained)
    return rows


# ---------------------------------------------------------------------------------------------------- VIOLET
def violet_arms(steps: int, root: Path, runs: dict) -> dict:
    """VIOLET (`experiments/violet/moving_tiny.yaml`, from scratch: it has no image-CLIP start) on the moving
    clips' motion captions at the moving arms' budget, scored by its matching head (`video_text_logits`)."""
    torch.manual_seed(0)
    cli, per_step = train(EXPERIMENTS / "violet" / "moving_tiny.yaml", steps, root, "violet",
                          f"--data.train_shards={REPO_ROOT / MOVING}/train-*.tar",
                          f"--model.init_args.num_frames={MOVING_FRAMES}", f"--data.batch_size={MOVING_BATCH}")
    runs["VIOLET (from scratch)"] = {"steps": steps, "seconds_per_step": per_step}
    models = {"VIOLET (VTM head)": cli.model}
    return {"queries": motion_queries(models), "videophy": videophy(models, f"{MOVING}/val-*.tar", MOVING_FRAMES)}


# ---------------------------------------------------------------------------------------------------- GFSLT-VLP
def translations(method, split: str) -> dict[str, float]:
    """BLEU of the greedy translation of every `split` BabyAI episode (8 uniform frames) against its mission."""
    generated, missions = [], []
    with torch.no_grad():
        for batch in clip_batches(f"{BABYAI}/{split}-*.tar", method, method.num_frames, batch_size=32):
            generated += method.generate_captions(batch["video"])
            missions += batch["caption"]
    metrics = caption_metrics(generated, [[mission] for mission in missions])
    return {**{name: metrics[name] for name in ("BLEU-1", "BLEU-4", "exact_match")}, "episodes": len(missions),
            "example": f"{missions[0]!r} -> {generated[0]!r}"}


def most_frequent_mission(split: str, method) -> dict[str, float]:
    """The floor: the split's most frequent mission answered for every episode."""
    missions = [caption for batch in clip_batches(f"{BABYAI}/{split}-*.tar", method, method.num_frames, 32)
                for caption in batch["caption"]]
    common = max(set(missions), key=missions.count)
    metrics = caption_metrics([common] * len(missions), [[mission] for mission in missions])
    return {**{name: metrics[name] for name in ("BLEU-1", "BLEU-4", "exact_match")}, "episodes": len(missions),
            "example": common}


def gfslt_arms(steps: int, root: Path, runs: dict) -> dict:
    """GFSLT-VLP stage 1 then stage 2 (translation from the inherited encoder and decoder) against stage 2 from
    scratch for the same steps (the paper's no-pretraining baseline), BabyAI episode -> mission."""
    stage1, stage2 = (EXPERIMENTS / "gfsltvlp" / f"babyai_stage{stage}_tiny.yaml" for stage in (1, 2))
    shards = f"--data.train_shards={REPO_ROOT / BABYAI}/train-*.tar"
    torch.manual_seed(0)
    train(stage1, steps, root, "gfslt-stage1", shards)
    runs["GFSLT-VLP stage 1"] = {"steps": steps, "seconds_per_step": None}
    start = str(next((root / "gfslt-stage1").glob("**/last.ckpt")))
    rows = {}
    for name, extra in (("GFSLT-VLP stage 1 + 2", (f"--model.init_args.start_from={start}",)),
                        ("stage 2 from scratch (no VLP)", ())):
        torch.manual_seed(0)
        cli, per_step = train(stage2, steps, root, "gfslt-" + str(len(rows)), shards, *extra)
        runs[name] = {"steps": steps, "seconds_per_step": per_step}
        rows[name] = {split: translations(cli.model, split) for split in ("unseen", "val")}
        print(f"{name}: {rows[name]}", flush=True)
    rows["most frequent mission, always"] = {split: most_frequent_mission(split, cli.model)
                                             for split in ("unseen", "val")}
    return rows


# ---------------------------------------------------------------------------------------------------- PLLaVA
#: the PLLaVA chain's tower and image-LLaVA budgets (the language bench's: a 32 px CLIP for 200 steps, LLaVA stage 1
#: for 60) and PLLaVA's own (its tiny recipe: 150)
PLLAVA_TOWER_STEPS, LLAVA_STEPS, PLLAVA_STEPS = 200, 60, 150


def pllava_arms(steps: int, root: Path, runs: dict) -> dict:
    """An image LLaVA (stage 1 on the emoji drawings' captions, our 32 px CLIP tower, SmolLM2 frozen) extended to
    video by **PLLaVA** (its recipe: 4 frames pooled to 4 x 4 x 4 tokens, projector + LoRA train on the moving clips'
    motion captions), against the image LLaVA it starts from reading the clip's middle frame. Teacher-forced NLL
    (nats per caption token) of every moving val clip's caption given its own frames, another clip's (a fixed
    permutation) and its frames reversed (whose true caption runs the legs backwards): the video must lower it, and
    reading time must make the reversed clip a worse fit. **mPLUG-video** (its recipe: the same tower and LM, frozen,
    the visual abstractor and temporal embedding trained from scratch for PLLaVA's steps) is scored alike."""
    from language import LM, caption_nll

    quick = steps < 10
    tower_steps, llava_steps, pllava_steps = (steps, steps, steps) if quick else (PLLAVA_TOWER_STEPS, LLAVA_STEPS,
                                                                                  PLLAVA_STEPS)
    torch.manual_seed(0)
    train(EXPERIMENTS / "clip" / "emoji_heldout_tiny.yaml", tower_steps, root, "pllava-tower",
          f"--data.train_shards={REPO_ROOT / EMOJI}/train-*.tar", "--data.test_shards=null",
          "--model.init_args.vision.init_args.img_size=32")
    runs["CLIP tower (32 px, drawings)"] = {"steps": tower_steps, "seconds_per_step": None}
    tower = str(next((root / "pllava-tower").glob("**/last.ckpt")))
    torch.manual_seed(0)
    llava, per_step = train(EXPERIMENTS / "llava" / "emoji_stage1_tiny.yaml", llava_steps, root, "pllava-llava",
                            f"--data.train_shards={REPO_ROOT / EMOJI}/train-*.tar", "--data.test_shards=null",
                            f"--model.init_args.image_tower={tower}", *LM)
    runs["LLaVA stage 1 (drawings)"] = {"steps": llava_steps, "seconds_per_step": per_step}
    start = str(next((root / "pllava-llava").glob("**/last.ckpt")))
    torch.manual_seed(0)
    pllava, per_step = train(EXPERIMENTS / "pllava" / "moving_tiny.yaml", pllava_steps, root, "pllava",
                             f"--data.train_shards={REPO_ROOT / MOVING}/train-*.tar",
                             f"--model.init_args.image_tower={tower}", f"--model.init_args.start_from={start}", *LM)
    runs["PLLaVA (moving clips)"] = {"steps": pllava_steps, "seconds_per_step": per_step}
    torch.manual_seed(0)
    mplug, per_step = train(EXPERIMENTS / "mplugvideo" / "moving_tiny.yaml", pllava_steps, root, "mplug-video",
                            f"--data.train_shards={REPO_ROOT / MOVING}/train-*.tar",
                            f"--model.init_args.image_tower={tower}", *LM)
    runs["mPLUG-video (moving clips)"] = {"steps": pllava_steps, "seconds_per_step": per_step}
    video_model, image_model = pllava.model, llava.model
    frames, captions = [], []
    for batch in clip_batches(f"{MOVING}/val-*.tar", video_model, video_model.num_frames, batch_size=32):
        frames.append(batch["video"])
        captions += batch["caption"]
        if quick:
            break
    video = torch.cat(frames)
    permutation = torch.randperm(len(video), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rows = {name: {condition: caption_nll(model.language_model, model.caption_prompts[0], captions,
                                              model.visual_tokens(clips))
                       for condition, clips in (("own clip", video), ("another clip's frames", video[permutation]),
                                                ("own clip reversed", video.flip(1)))}
                for name, model in (("PLLaVA", video_model), ("mPLUG-video (abstractor)", mplug.model))}
        middle = video[:, video.shape[1] // 2]
        image_tokens = {"own clip": image_model.visual_tokens(middle),
                        "another clip's frames": image_model.visual_tokens(middle[permutation])}
        rows["image LLaVA stage 1, middle frame"] = {
            condition: caption_nll(image_model.language_model, image_model.caption_prompts[0], captions, visual)
            for condition, visual in image_tokens.items()}
    for row in rows.values():
        row["clips"] = len(captions)
    print(f"PLLaVA, mPLUG-video: {rows}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------- report
def tables(report: dict) -> str:
    lines = []
    if "babyai" in report:
        babyai = report["babyai"]
        lines += ["BabyAI zero-shot sub-goal recognition (accuracy among the split's distinct sub-goal texts)", "",
                  "| model | unseen level (GoToLocal) | seen levels, val | segments (unseen) | texts (unseen) |",
                  "|---|---|---|---|---|"]
        for name, row in babyai["unseen"].items():
            lines.append(f"| {name} | {row['accuracy']:.3f} | {babyai['val'][name]['accuracy']:.3f} "
                         f"| {row['segments']} | {row['texts']} |")
        lines.append("")
    queries = {**report.get("moving", {}).get("queries", {}), **report.get("violet", {}).get("queries", {})}
    if queries:
        lines += ["Moving emoji, zero-shot motion on the val clips", "",
                  "| model | first-leg direction (8-way) | two-leg order (pairs) |", "|---|---|---|"]
        lines += [f"| {name} | {row['direction']:.3f} | {row['order']:.3f} |" for name, row in queries.items()]
        lines.append("")
    videophy_rows = {**({f"{name}, BabyAI unseen": row for name, row in report["babyai"]["videophy"].items()
                         if name != "chance"} if "babyai" in report else {}),
                     **({f"{name}, moving val": row for name, row in report["moving"]["videophy"].items()
                         if name != "chance"} if "moving" in report else {}),
                     **({f"{name}, moving val": row for name, row in report["violet"]["videophy"].items()
                         if name != "chance"} if "violet" in report else {})}
    if videophy_rows:
        lines += ["VideoPhy pair accuracy: each clip against its reversed / teleporting twin, with its caption "
                  "(chance 0.5)", "", "| model, clips | reversed | teleport |", "|---|---|---|"]
        lines += [f"| {name} | {row['reversed']:.3f} | {row['teleport']:.3f} |" for name, row in videophy_rows.items()]
        lines.append("")
    probes = {**report.get("sigma", {}), **report.get("moving", {}).get("probe", {})}
    if probes:
        lines += ["Linear probe of the direction at the clip's middle (8-way, moving val; chance 0.125)", "",
                  "| encoder | linear top-1 |", "|---|---|"]
        lines += [f"| {name} | {row['linear_top1']:.3f} |" for name, row in probes.items()]
        lines.append("")
    if "gfslt" in report:
        lines += ["GFSLT-VLP, BabyAI episode -> mission (greedy; BLEU-4 / exact match of the translation)", "",
                  "| model | unseen level BLEU-4 | unseen exact | seen levels, val BLEU-4 | val exact |",
                  "|---|---|---|---|---|"]
        lines += [f"| {name} | {row['unseen']['BLEU-4']:.3f} | {row['unseen']['exact_match']:.3f} "
                  f"| {row['val']['BLEU-4']:.3f} | {row['val']['exact_match']:.3f} |"
                  for name, row in report["gfslt"].items()]
        lines.append("")
    if "pllava" in report:
        lines += ["PLLaVA: NLL of the moving val clips' captions (nats per token, lower is better)", "",
                  "| model | own clip | another clip's frames | own clip reversed |", "|---|---|---|---|"]
        other = "another clip's frames"
        lines += [f"| {name} | {row['own clip']:.3f} | {row[other]:.3f} | "
                  + (f"{row['own clip reversed']:.3f}" if "own clip reversed" in row else "-") + " |"
                  for name, row in report["pllava"].items()]
        lines.append("")
    lines += ["| run | steps | s / step |", "|---|---|---|"]
    lines += [f"| {name} | {run['steps']} | "
              + (f"{run['seconds_per_step']:.2f}" if run["seconds_per_step"] is not None else "-") + " |"
              for name, run in report["runs"].items()]
    return "\n".join(lines)


def targets(report: dict) -> list[Target]:
    """The goals, from the report alone (so a stored run's targets can be recomputed); a section not run has
    none. Each is a difference in points that must exceed `MARGIN`: a tie (two order-blind scores of 0.5, the same
    probe accuracy) is not a win."""
    goals = []
    if "babyai" in report:
        unseen = report["babyai"]["unseen"]
        goals += [
            Target("HecVL - image CLIP (middle frame) sub-goal accuracy, unseen level (points)",
                   100 * (unseen["HecVL"]["accuracy"] - unseen["image CLIP (middle frame)"]["accuracy"]), MARGIN),
            Target("HecVL - most frequent sub-goal accuracy, unseen level (points)",
                   100 * (unseen["HecVL"]["accuracy"] - unseen["most frequent sub-goal, always"]["accuracy"]), MARGIN),
            Target("OphCLIP - image CLIP (middle frame) sub-goal accuracy, unseen level (points)",
                   100 * (unseen["OphCLIP (25 % silent)"]["accuracy"]
                          - unseen["image CLIP (middle frame)"]["accuracy"]), MARGIN),
        ]
    if "moving" in report:
        moving = report["moving"]["queries"]
        goals += [
            Target("X-CLIP - frame-averaged CLIP first-leg direction accuracy, moving val (points)",
                   100 * (moving["X-CLIP"]["direction"] - moving["frame-averaged CLIP"]["direction"]), MARGIN),
            Target("X-CLIP - frame-averaged CLIP two-leg order accuracy, moving val (points)",
                   100 * (moving["X-CLIP"]["order"] - moving["frame-averaged CLIP"]["order"]), MARGIN),
            Target("X-CLIP VideoPhy reversed-twin pair accuracy - chance, moving val (points)",
                   100 * (report["moving"]["videophy"]["X-CLIP"]["reversed"] - 0.5), MARGIN),
            Target("TemAdapter - frame-averaged CLIP two-leg order accuracy, moving val (points)",
                   100 * (moving["TemAdapter"]["order"] - moving["frame-averaged CLIP"]["order"]), MARGIN),
            Target("VEDIT - its frozen tower's frame-mean linear probe, moving val (points)",
                   100 * (report["moving"]["probe"]["VEDIT (frozen emoji-CLIP tower + predictor)"]["linear_top1"]
                          - report["moving"]["probe"]["frozen emoji-CLIP tower, frame mean"]["linear_top1"]), MARGIN),
        ]
    if "sigma" in report:
        sigma = report["sigma"]
        goals += [
            Target("SIGMA - VideoMAE pixel targets linear probe, moving val (points)",
                   100 * (sigma["SIGMA"]["linear_top1"] - sigma["VideoMAE pixel targets"]["linear_top1"]), MARGIN),
            Target("SIGMA - random-init linear probe, moving val (points)",
                   100 * (sigma["SIGMA"]["linear_top1"] - sigma["random init (same encoder)"]["linear_top1"]), MARGIN),
        ]
        if "SIGMA (DINO targets)" in sigma:
            goals.append(Target("SIGMA (DINO targets) - VideoMAE pixel targets linear probe, moving val (points)",
                                100 * (sigma["SIGMA (DINO targets)"]["linear_top1"]
                                       - sigma["VideoMAE pixel targets"]["linear_top1"]), MARGIN))
    if "violet" in report:
        violet, chance = report["violet"]["queries"]["VIOLET (VTM head)"], report["violet"]["queries"]["chance"]
        goals += [
            Target("VIOLET - chance first-leg direction accuracy, moving val (points)",
                   100 * (violet["direction"] - chance["direction"]), MARGIN),
            Target("VIOLET - chance two-leg order accuracy, moving val (points)",
                   100 * (violet["order"] - chance["order"]), MARGIN),
            Target("VIOLET VideoPhy reversed-twin pair accuracy - chance, moving val (points)",
                   100 * (report["violet"]["videophy"]["VIOLET (VTM head)"]["reversed"] - 0.5), MARGIN),
        ]
    if "gfslt" in report:
        gfslt = report["gfslt"]
        goals += [
            Target("GFSLT-VLP stage 1 + 2 - stage 2 from scratch BLEU-4, unseen level (points)",
                   100 * (gfslt["GFSLT-VLP stage 1 + 2"]["unseen"]["BLEU-4"]
                          - gfslt["stage 2 from scratch (no VLP)"]["unseen"]["BLEU-4"]), MARGIN),
            Target("GFSLT-VLP stage 1 + 2 - most frequent mission BLEU-4, seen levels val (points)",
                   100 * (gfslt["GFSLT-VLP stage 1 + 2"]["val"]["BLEU-4"]
                          - gfslt["most frequent mission, always"]["val"]["BLEU-4"]), MARGIN),
        ]
    if "pllava" in report:
        pllava, image = report["pllava"]["PLLaVA"], report["pllava"]["image LLaVA stage 1, middle frame"]
        goals += [
            Target("PLLaVA caption NLL: another clip's frames - own clip, moving val (nats/token)",
                   pllava["another clip's frames"] - pllava["own clip"], 0.01),
            Target("PLLaVA caption NLL: image LLaVA on the middle frame - PLLaVA, moving val (nats/token)",
                   image["own clip"] - pllava["own clip"], 0.01),
            Target("PLLaVA caption NLL: own clip reversed - own clip, moving val (nats/token)",
                   pllava["own clip reversed"] - pllava["own clip"], 0.01),
        ]
        if "mPLUG-video (abstractor)" in report["pllava"]:
            mplug = report["pllava"]["mPLUG-video (abstractor)"]
            goals += [Target("mPLUG-video caption NLL: another clip's frames - own clip, moving val (nats/token)",
                             mplug["another clip's frames"] - mplug["own clip"], 0.01),
                      Target("mPLUG-video caption NLL: own clip reversed - own clip, moving val (nats/token)",
                             mplug["own clip reversed"] - mplug["own clip"], 0.01)]
    return goals


#: points a method must gain over its baseline (a tie is not a win)
MARGIN = 0.1

SECTIONS = ("babyai", "moving", "sigma", "violet", "gfslt", "pllava")
RUNNERS = {"babyai": babyai_arms, "moving": moving_arms, "sigma": sigma_arms, "violet": violet_arms,
           "gfslt": gfslt_arms, "pllava": pllava_arms}


def merged_start(report: dict, sections: list[str]) -> dict:
    """The stored report (bench/results/video.json) without the sections about to run: its other sections, their
    runs and dates kept; a stored run of another step budget or a quick one cannot be merged (one clear error)."""
    path = RESULTS_DIR / "video.json"
    if not path.is_file():
        raise SystemExit(f"--merge: no stored results at {path}; run without --merge first")
    stored = json.loads(path.read_text())
    if stored.get("quick") != report["quick"] or stored.get("steps") != report["steps"]:
        raise SystemExit(f"--merge: the stored run has steps={stored.get('steps')} quick={stored.get('quick')}, this "
                         f"one steps={report['steps']} quick={report['quick']}; rerun with the same --steps (and "
                         "--quick) or without --merge")
    kept = [section for section in SECTIONS if section in stored and section not in sections]
    dated = stored.get("sections") or {section: {"date": stored["machine"].get("date"), "cpu": stored["machine"]["cpu"]}
                                       for section in kept}  # a run from before sections were dated: its own date
    section_runs = stored.get("section_runs") or {section: list(stored["runs"]) for section in kept}
    report.update({section: stored[section] for section in kept})
    report["sections"] = {section: dated[section] for section in kept}
    report["section_runs"] = {section: section_runs.get(section, []) for section in kept}
    report["runs"] = {name: run for name, run in stored["runs"].items()
                      if any(name in section_runs.get(section, []) for section in kept)}
    report["stored_seconds"] = stored.get("seconds", 0.0) - sum(
        stored.get("sections", {}).get(section, {}).get("seconds", 0.0) for section in sections)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per video arm (default 300)")
    parser.add_argument("--clip-steps", type=int, default=200, help="steps of the emoji image CLIP (default 200)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="the parts to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="5 steps per arm: a smoke run of the bench")
    parser.add_argument("--merge", action="store_true",
                        help="keep the stored results' other sections (bench/results/video.json, the same --steps) "
                             "and replace only the sections run now; each section records its own date and CPU")
    args = parser.parse_args()
    steps, clip_steps = (5, 5) if args.quick else (args.steps, args.clip_steps)
    ensure_data(episodes=200, clips=2000)
    started = time.perf_counter()
    report: dict = {"quick": args.quick, "steps": steps, "clip_steps": clip_steps, "runs": {}, "sections": {},
                    "section_runs": {}}
    if args.merge:
        report = merged_start(report, args.sections)
    with tempfile.TemporaryDirectory(prefix="vlp-video-") as folder:
        root = Path(folder)
        for section in args.sections:
            section_started, before = time.perf_counter(), set(report["runs"])
            arguments = (steps, clip_steps) if section == "moving" else (steps,)
            report[section] = RUNNERS[section](*arguments, root, report["runs"])
            report["sections"][section] = {"date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                                           "cpu": machine()["cpu"], "native_bf16": machine()["native_bf16"],
                                           "seconds": time.perf_counter() - section_started}
            report["section_runs"][section] = [name for name in report["runs"] if name not in before]
            print(json.dumps(report[section], indent=1), flush=True)
    report["seconds"] = time.perf_counter() - started + report.pop("stored_seconds", 0.0)
    report["table"] = tables(report)
    print("\n" + report["table"])
    publish("video", report, targets(report))


if __name__ == "__main__":
    main()
