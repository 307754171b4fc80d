"""BabyAI episodes solved by minigrid's expert bot, one clip sample per episode (`vlp-data babyai`).

Each episode is a BabyAI level (PyPI `minigrid` 3.x, the `sim` extra) reset with its own seed and rolled out by
`minigrid.utils.baby_ai_bot.BabyAIBot`; the sample is:

- `<key>.frames.npy`: uint8 [T, H, W, 3] (`numpy.save`, no pickle): the first observation and the state after every
  action, so T = actions + 1. `--view full` (default) renders the whole grid with the agent's field of view
  highlighted: the objects a mission names are in sight from the first frame, which the agent's own 7x7 view
  (`--view agent`, always 7 tiles square) often misses. A level's tiles are `--tile-size` pixels (default 8) unless
  its frame would then be larger than `--max-side` (default 96): small, because a clip holds T frames uncompressed,
  and 8 px tiles still show every object, its colour and the agent's heading. The single-room levels (8x8 cells
  with the walls) are 64 px square, UnlockPickup's two rooms (11x6 cells) 88x48; the 3x3-room levels (22x22 cells,
  OpenDoor, GoTo) get 4 px tiles, 88 px, at which a closed door (minigrid draws it black in a thin coloured frame)
  all but disappears: give them `--max-side 176`;
- `<key>.txt`: the mission ("put the green key next to the red box"), except in a silent episode (`--silent-fraction`:
  that share of the trained levels' episodes, drawn by each episode's seed, have no `.txt` and `"silent": true` in
  their `.json`: OphCLIP's clips without narration);
- `<key>.json`: `fps` (frame i is at i / fps), `timeline` (the bot's sub-goals, below), `actions` (one name per
  action: left, right, forward, pickup, drop, toggle, done), `level`, `env_id`, `seed` (of `env.reset`), `mission`,
  `view`, `tile_size`, `minigrid` (its version);
- `<key>.cls`: the index of the level in the manifest's `classnames["cls"]` (`--levels`, then `--heldout-levels`).

Sub-goals: the bot keeps a stack of them and acts for the one on top; the text of the top one when an action is
chosen labels that action, and consecutive actions with the same text merge into one segment: actions a..b-1 give
{"start": a / fps, "end": b / fps, "text": ...}, covering frames a..b-1 (the frames those actions were chosen on;
the last frame, the outcome, is in no segment). The texts (`subgoal_text`):

- GoNextTo an object description or object: "go next to the red ball" ("... the ball" when the mission leaves the
  colour open); to a door it will open: "go to the yellow door"; to put something down: "bring the green key next
  to the red box"; to a cell: "go next to the <object>" when one is there, else "go to an empty cell" (where the
  bot drops what it carries, or steps back to); exploring unseen cells: "explore";
- Open: "open the yellow door" ("unlock ..." when it is locked); Close: "close the yellow door";
- Pickup: "pick up the blue key" (the object in front); Drop: "drop the blue key" (the object carried);
- an empty stack (the bot thinks the mission is done and says `done`): "stop".

An episode the bot does not solve (it raises, the level ends without success, or it needs more than `--max-steps`
actions) is a counted skip, listed under `skipped` in the manifest like an image that does not decode.

Held-out levels: the episodes of `--heldout-levels` all go to the fixed split `unseen`, the others are divided by
`--split`. Reproducible: episode i of a level is reset with a seed hashed from (--seed, level, i), the bot is
deterministic and so is the rendering, so the same options and minigrid give byte-identical shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import random
from functools import partial

import numpy as np

from data_modules.clips import FRAMES_MEMBER
from data_modules.sources import Record, SourceData, SourceError

HELDOUT_SPLIT = "unseen"
FPS = 4.0
VIEWS = ("full", "agent")
#: small levels (at most 11 cells a side) the bot solves in 1-25 actions (minigrid 3.2, every one of 10 seeds
#: tried), UnlockPickup for the doors and keys; held-out GoToLocal's missions use only words and sub-goals of the
#: others ("go to the X"): it tests new layouts with distractors, not new vocabulary.
DEFAULT_LEVELS = ("GoToRedBall", "GoToObj", "PickupLoc", "PutNextLocal", "UnlockPickup")
DEFAULT_HELDOUT_LEVELS = ("GoToLocal",)
#: bumped whenever the rollout or the sample format changes, so existing shard sets are rebuilt (it is in the name).
ROLLOUT_VERSION = 1


def _env_ids() -> dict[str, str]:
    """Level name ("GoToObj") -> gymnasium id ("BabyAI-GoToObj-v0") of every BabyAI level minigrid registers (on
    import), or a SourceError naming the extra when it is not installed."""
    try:
        import gymnasium

        importlib.import_module("minigrid")  # importing it registers the levels
    except ImportError:
        raise SourceError("vlp-data babyai needs minigrid and gymnasium: pip install -e '.[sim]'") from None
    return {env_id[len("BabyAI-"):].rpartition("-v")[0]: env_id for env_id in sorted(gymnasium.registry)
            if env_id.startswith("BabyAI-")}


def episode_seed(seed: int, level: str, index: int) -> int:
    """The `env.reset` seed of episode `index` of `level`: a hash, so levels and episodes never share a layout."""
    return int(hashlib.sha256(f"babyai:{seed}:{level}:{index}".encode()).hexdigest()[:8], 16) % 2**31


def babyai_source(
    levels: tuple[str, ...] = DEFAULT_LEVELS,
    heldout_levels: tuple[str, ...] = DEFAULT_HELDOUT_LEVELS,
    episodes: int = 100,
    tile_size: int = 8,
    max_side: int = 96,
    view: str = "full",
    max_steps: int = 128,
    seed: int = 0,
    silent_fraction: float = 0.0,
) -> SourceData:
    """`episodes` episodes of every level in `levels` (left to `--split`) and of `heldout_levels` (split `unseen`);
    nothing is rolled out here: each Record's `members` runs its episode when the builder writes it (module doc).
    `silent_fraction` of the episodes of `levels` (drawn by each episode's seed) are silent: no `.txt`, and
    `"silent": true` in the `.json` (OphCLIP's silent clips; the held-out level keeps every mission)."""
    env_ids = _env_ids()
    import gymnasium
    import minigrid

    classnames = [*levels, *heldout_levels]
    unknown = [name for name in classnames if name not in env_ids]
    if unknown:
        raise SourceError(f"unknown BabyAI level {unknown[0]!r}; minigrid {minigrid.__version__} has "
                          f"{', '.join(sorted(env_ids))}")
    if not levels or len(set(classnames)) < len(classnames):
        raise SourceError(f"--levels {','.join(levels)} and --heldout-levels {','.join(heldout_levels)}: need at least "
                          "one level and each level once, in one of the two lists")
    if not 0.0 <= silent_fraction < 1.0:
        raise SourceError(f"--silent-fraction {silent_fraction}: must lie in [0, 1) (some episodes keep their "
                          "mission); e.g. --silent-fraction 0.25")
    if view not in VIEWS or min(tile_size, max_side, max_steps) < 1:
        raise SourceError(f"--view {view}, --tile-size {tile_size}, --max-side {max_side}, --max-steps {max_steps}: "
                          f"need a view of {', '.join(VIEWS)}, at least 1 pixel and at least 1 step")
    records = []
    for label, level in enumerate(classnames):
        split = HELDOUT_SPLIT if level in heldout_levels else None
        env = gymnasium.make(env_ids[level]).unwrapped
        cells = env.agent_view_size if view == "agent" else max(env.width, env.height)
        tile = min(tile_size, max(1, max_side // cells))
        for index in range(episodes):
            layout_seed = episode_seed(seed, level, index)
            meta = {"level": level, "env_id": env_ids[level], "seed": layout_seed,
                    "tile_size": tile, "view": view, "max_steps": max_steps, "fps": FPS,
                    "minigrid": minigrid.__version__, "gymnasium": gymnasium.__version__}
            if split is None and silent_fraction and random.Random(layout_seed).random() < silent_fraction:
                meta["silent"] = True
            key = f"{level}_{index:05d}"
            records.append(Record(key=key, open_image=None, origin=f"{meta['env_id']} seed {meta['seed']}",
                                  label=label, meta=meta, split=split, members=partial(roll_out, meta, label)))
    held = f", {','.join(heldout_levels)} held out" if heldout_levels else ""
    return SourceData(
        name=f"babyai v{ROLLOUT_VERSION}: minigrid {minigrid.__version__} BabyAIBot, {','.join(levels)}{held}, "
             f"{episodes} episodes each, {view} view, {tile_size} px tiles up to {max_side} px",
        licence="Apache-2.0 (minigrid, Farama Foundation; rendered by its code)",
        records=records,
        inputs=[],
        classnames={"cls": classnames},
    )


def roll_out(meta: dict, label: int) -> dict[str, bytes]:
    """Run the bot on one episode and return its members (module doc); ValueError when the bot does not solve it."""
    import gymnasium
    from minigrid.utils.baby_ai_bot import BabyAIBot

    env = gymnasium.make(meta["env_id"]).unwrapped
    with contextlib.redirect_stdout(io.StringIO()):  # the levels print every rejected layout while sampling one
        env.reset(seed=meta["seed"])
    bot = BabyAIBot(env)
    frames = [_frame(env, meta)]
    actions: list[str] = []
    texts: list[str] = []
    reward, terminated = 0.0, False
    while not terminated:
        if len(actions) == meta["max_steps"]:
            raise ValueError(f"the bot did not solve {env.mission!r} within --max-steps {meta['max_steps']}")
        try:
            action = bot.replan()
        except Exception as error:  # the bot's own asserts and DisappearedBoxError: an episode it cannot solve
            raise ValueError(f"the bot failed on {env.mission!r}: {type(error).__name__}: {error}") from error
        texts.append(subgoal_text(bot.stack[-1]) if bot.stack else "stop")
        actions.append(env.actions(action).name)
        _, reward, terminated, truncated, _ = env.step(action)
        frames.append(_frame(env, meta))
        if truncated and not terminated:
            raise ValueError(f"{env.mission!r} ran out of the level's {env.max_steps} steps")
    if reward <= 0:
        raise ValueError(f"the bot ended {env.mission!r} without success")
    buffer = io.BytesIO()
    np.save(buffer, np.stack(frames), allow_pickle=False)
    described = {key: meta[key] for key in ("level", "env_id", "seed", "view", "tile_size", "minigrid")}
    described.update(fps=FPS, mission=env.mission, actions=actions, timeline=timeline(texts, FPS))
    members = {FRAMES_MEMBER: buffer.getvalue(), "txt": env.mission.encode("utf-8")}
    if meta.get("silent"):  # a silent episode: no mission text, marked in the .json
        described["silent"] = True
        del members["txt"]
    return {
        **members,
        "json": json.dumps(described, sort_keys=True).encode("utf-8"),
        "cls": str(label).encode("ascii"),
    }


def _frame(env, meta: dict) -> np.ndarray:
    """uint8 [H, W, 3] of the current state."""
    return env.get_frame(highlight=True, tile_size=meta["tile_size"], agent_pov=meta["view"] == "agent")


def timeline(texts: list[str], fps: float) -> list[dict[str, object]]:
    """Segments of equal consecutive texts: texts[a:b] all equal -> {"start": a / fps, "end": b / fps, "text"}."""
    segments: list[dict[str, object]] = []
    start = 0
    for index, text in enumerate(texts):
        if index + 1 == len(texts) or texts[index + 1] != text:
            segments.append({"start": start / fps, "end": (index + 1) / fps, "text": text})
            start = index + 1
    return segments


def _name(thing) -> str:
    """"the red ball" for an object or an object description (whose colour and type may be open: "the ball")."""
    return "the " + " ".join(part for part in (thing.color, thing.type) if part) if thing.type else "the object"


def subgoal_text(subgoal) -> str:
    """A sub-goal of the bot's stack in words (the mapping is in the module doc)."""
    from minigrid.core.world_object import WorldObj
    from minigrid.envs.babyai.core.verifier import ObjDesc

    kind = type(subgoal).__name__
    if kind == "GoNextToSubgoal":
        if subgoal.reason == "Explore":
            return "explore"
        if isinstance(subgoal.datum, (ObjDesc, WorldObj)):
            target = _name(subgoal.datum)
        else:
            cell = subgoal.bot.mission.unwrapped.grid.get(*subgoal.datum)
            target = _name(cell) if cell is not None else None
        if subgoal.reason == "PutNext" and subgoal.carrying is not None:
            return f"bring {_name(subgoal.carrying)} next to {target}"
        if target is None:
            return "go to an empty cell"
        return f"go to {target}" if subgoal.reason == "Open" else f"go next to {target}"
    if kind in ("OpenSubgoal", "CloseSubgoal") and subgoal.fwd_cell is not None:
        verb = "close" if kind == "CloseSubgoal" else "unlock" if subgoal.fwd_cell.is_locked else "open"
        return f"{verb} {_name(subgoal.fwd_cell)}"
    if kind == "PickupSubgoal" and subgoal.fwd_cell is not None:
        return f"pick up {_name(subgoal.fwd_cell)}"
    if kind == "DropSubgoal" and subgoal.carrying is not None:
        return f"drop {_name(subgoal.carrying)}"
    return kind.removesuffix("Subgoal").lower()
