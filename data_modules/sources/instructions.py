"""Instruction shards from labelled or captioned ones: every sample becomes one visual instruction (`vlp-data
instructions`).

Vision-Flan (Xu et al. 2024, "Vision-Flan: Scaling Human-Labeled Tasks in Visual Instruction Tuning") builds its 187
tasks from the existing annotations of academic datasets: each task gets human-written instructions and templates
for its inputs and outputs, and one dataset's labels give several tasks (open classification, multiple choice,
yes / no questions, captions). The same is done here for whatever the input shards hold, so that the
frozen-language-model methods can be instruction-tuned on the suite's data:

* `caption`: describe the image -> the caption (the first line of `.txt`; the other lines are alternatives);
* `classify`: an open question about one labelled field -> the class name; a field is any one the manifest names
  classes for (`classnames["cls"]` for `.cls`, `classnames["subcategory_id"]` for that integer field of the emoji
  `.json`), drawn per sample among the fields it has;
* `multiple_choice`: the same question with K = 4 lettered options "A. ..." (fewer when the field has fewer
  classes), the true class at a drawn position and the distractors drawn from the field's other class names; the
  answer is the letter followed by the option ("B. Food & Drink"), and `.json` records `options` (the texts, in
  letter order) and `answer` (the letter);
* `grounding` (InfMLLM's visual grounding, Zhou et al. 2023, boxes written as text as in Shikra and Qwen-VL): for
  scene shards (`vlp-data scenes`: objects with boxes in `.json`), "where is the <name>?" about an object the name picks
  out (or "<name> in the <position>" where two share a name) -> its box "[x0, y0, x1, y1]" in fractions of the image, two decimals; `.json` records
  `box`. The whole image is the frame: train with views that keep it (the frozen-LM methods' default full crop);
* `yes_no`: "is this a <class>?" about the true class or, with probability 1/2, a drawn other class -> "Yes" /
  "No" (balanced in expectation, so that a model answering "Yes" to everything scores about 50 %: the "yes" bias
  Vision-Flan reports for GPT-4-made data cannot pay off).

Every task has four instruction templates, written by us for this suite in the spirit of Vision-Flan's
expert-written ones (not taken from its release); `--templates-per-task N` keeps the first N (1: one fixed instruction
per task, as Vision-Flan's paper describes it; more: the template diversity of FLAN, Wei et al. 2022, which uses
ten per dataset). Everything a sample gets is drawn from `random.Random(f"{seed}:{key}")`: the task (uniformly among
those the sample can serve), the field, the template, the options and the yes / no question, so the output depends
on the seed and the keys only, not on the order of the shards.

The output keeps the images, keys and splits of the input and all its members (a sample that can serve none of the
tasks is left out, counted in the manifest's `left_out` and said once); `.json` keeps its fields and gains
`conversations` (`[{"role": "user", "content": "<image>\\n..."}, {"role": "assistant", "content": ...}]`, the format
`data_modules.conversations` reads), `task` and, for the class tasks, `label_field`. The manifest records the tasks
and templates under `instructions`, and the input's licence.
"""

from __future__ import annotations

import random
import string
import sys
from dataclasses import replace

from data_modules.conversations import IMAGE_PLACEHOLDER
from data_modules.sources import Record, SourceData, SourceError
from data_modules.sources.shots import read_shard_records

TASKS = ("caption", "classify", "multiple_choice", "yes_no", "grounding")
#: options of a multiple-choice question (fewer when a field has fewer classes).
NUM_OPTIONS = 4
#: the instruction templates of every task, ours (module doc); `{kind}` is the field's noun ("category"), `{name}`
#: a class name, `{options}` the lettered options, one per line.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "caption": (
        "Describe the image in a few words.",
        "What does this picture show? Answer with a short caption.",
        "Write a brief caption for this image.",
        "Give a short description of what you see.",
    ),
    "classify": (
        "Which {kind} does this image belong to?",
        "What is the {kind} of what this picture shows?",
        "Name the {kind} of this image.",
        "Classify the image: which {kind} is it?",
    ),
    "multiple_choice": (
        "Which {kind} does this image belong to?\n{options}\nPick one of the options.",
        "What is the {kind} of what this picture shows?\n{options}",
        "Choose the {kind} that fits the image.\n{options}",
        "{options}\nWhich of these options is the {kind} of the image?",
    ),
    "grounding": (
        "Where is the {name}? Answer with its box [x0, y0, x1, y1] as fractions of the image.",
        "Give the bounding box of the {name} as [left, top, right, bottom], each between 0 and 1.",
        "Locate the {name} in the image: its box [x0, y0, x1, y1] in image fractions.",
        "Find the {name}. Reply with the box around it, [x0, y0, x1, y1], coordinates from 0 to 1.",
    ),
    "yes_no": (
        "Is this image of the {kind} \"{name}\"? Answer yes or no.",
        "Does the picture show something of the {kind} {name}?",
        "Would you put this image in the {kind} {name}? Yes or no?",
        "Is the {kind} of this image {name}?",
    ),
}
_CLASS_TASKS = ("classify", "multiple_choice", "yes_no")
_NEEDS = {"caption": ".txt captions", "classify": "class labels (.cls or an integer .json field) the manifest names "
          "classnames for", "multiple_choice": "class labels of a field with at least 2 classnames",
          "yes_no": "class labels of a field with at least 2 classnames",
          "grounding": "objects with boxes in .json (scene shards: vlp-data scenes)"}


def groundable(meta: dict | None) -> list[tuple[str, dict]]:
    """(phrase, object) for the objects of a scene `.json` (`vlp-data scenes`) a grounding question can name in one
    way: by name where no other object shares it, else "<name> in the <position>" where that is unique."""
    objects = [item for item in (meta or {}).get("objects", []) if "box" in item and "name" in item]
    if not (meta or {}).get("size"):
        return []
    names = [item["name"] for item in objects]
    phrases = [item["name"] if names.count(item["name"]) == 1 else f"{item['name']} in the {item.get('position')}"
               for item in objects]
    return [(phrase, item) for phrase, item in zip(phrases, objects)
            if phrases.count(phrase) == 1 and "None" not in phrase]


def box_text(box: list[float]) -> str:
    """A box in image fractions as the answer writes it: "[0.12, 0.30, 0.45, 0.66]" (two decimals)."""
    return "[" + ", ".join(f"{value:.2f}" for value in box) + "]"


def field_noun(field: str) -> str:
    """How a question names a label field: `cls` -> "category", `subcategory_id` -> "subcategory"."""
    return "category" if field == "cls" else field.removesuffix("_id").replace("_", " ")


def option_lines(options: list[str]) -> str:
    """`["x", "y"]` -> "A. x\\nB. y"."""
    return "\n".join(f"{letter}. {option}" for letter, option in zip(string.ascii_uppercase, options))


def _class_of(record: Record, field: str, names: list[str]) -> int | None:
    """The sample's class in `field` (`.cls` or an integer `.json` field) when it has one the manifest names."""
    value = record.label if field == "cls" else (record.meta or {}).get(field)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(names):
        return None
    return value


def instruction(record: Record, tasks: tuple[str, ...], classnames: dict[str, list[str]], templates: int, seed: int
                ) -> dict[str, object] | None:
    """The `.json` fields one sample gains (module doc), or None when it can serve none of `tasks`."""
    rng = random.Random(f"{seed}:{record.key}")
    caption = next((line.strip() for line in (record.caption or "").splitlines() if line.strip()), None)
    fields = {field: label for field, names in classnames.items()
              if (label := _class_of(record, field, names)) is not None}
    objects = groundable(record.meta)
    usable = [task for task in tasks if (task == "caption" and caption is not None) or (
        task == "grounding" and objects) or (
        task in _CLASS_TASKS and any(len(classnames[field]) >= (1 if task == "classify" else 2) for field in fields))]
    if not usable:
        return None
    task = rng.choice(usable)
    template = rng.choice(TEMPLATES[task][:templates])
    if task == "caption":
        return _fields(task, template, caption)
    if task == "grounding":
        phrase, item = rng.choice(objects)
        width, height = record.meta["size"]
        box = [item["box"][0] / width, item["box"][1] / height, item["box"][2] / width, item["box"][3] / height]
        return {**_fields(task, template.format(name=phrase), box_text(box)), "box": box}
    field = rng.choice(sorted(field for field in fields if len(classnames[field]) >= (1 if task == "classify" else 2)))
    names, label = classnames[field], fields[field]
    true, kind = names[label], field_noun(field)
    others = [name for name in dict.fromkeys(names) if name != true]
    extra: dict[str, object] = {"label_field": field}
    if task == "classify":
        return {**_fields(task, template.format(kind=kind), true), **extra}
    if task == "multiple_choice":
        options = rng.sample(others, min(NUM_OPTIONS - 1, len(others)))
        options.insert(rng.randrange(len(options) + 1), true)
        letter = string.ascii_uppercase[options.index(true)]
        prompt = template.format(kind=kind, options=option_lines(options))
        return {**_fields(task, prompt, f"{letter}. {true}"), **extra, "options": options, "answer": letter}
    positive = rng.random() < 0.5 or not others
    asked = true if positive else rng.choice(others)
    return {**_fields(task, template.format(kind=kind, name=asked), "Yes" if positive else "No"), **extra}


def _fields(task: str, prompt: str, answer: str) -> dict[str, object]:
    conversation = [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{prompt}"},
                    {"role": "assistant", "content": answer}]
    return {"conversations": conversation, "task": task}


def parse_tasks(text: str | None) -> tuple[str, ...] | None:
    """`--tasks caption,yes_no` -> ("caption", "yes_no"); None (every task the shards support) for None."""
    if text is None:
        return None
    tasks = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        raise SourceError(f"--tasks {text!r} names {', '.join(unknown) or 'no task'}; choose from {', '.join(TASKS)}")
    return tasks


def instructions_source(shards: str, tasks: tuple[str, ...] | None = None, templates_per_task: int = 4,
                        seed: int = 0) -> SourceData:
    """The samples of `shards` (a shard pattern) as instruction samples, one task each (module doc); `tasks` None
    takes every task the shards can serve, explicit tasks must each be served by some sample."""
    available = len(TEMPLATES["caption"])
    if not 1 <= templates_per_task <= available:
        raise SourceError(f"--templates-per-task {templates_per_task} is not one of the {available} templates per "
                          f"task; give 1 to {available}")
    paths, manifest, records = read_shard_records(shards)
    classnames = {field: list(names) for field, names in manifest.get("classnames", {}).items() if names}
    wanted = tasks if tasks is not None else TASKS
    fields = [instruction(record, wanted, classnames, templates_per_task, seed) for record in records]
    served = {entry["task"] for entry in fields if entry is not None}
    unserved = [task for task in (tasks or ()) if task not in served]
    if not served:
        raise SourceError(f"no sample of {shards!r} has a caption (.txt) or a class label the manifest names "
                          "classnames for; build instructions from captioned or labelled shards (`vlp-data emoji`)")
    if unserved:
        raise SourceError(f"no sample of {shards!r} can serve --tasks {unserved[0]}, which needs "
                          f"{_NEEDS[unserved[0]]}; leave it out of --tasks")
    left_out = [record.key for record, entry in zip(records, fields) if entry is None]
    if left_out:  # e.g. a scene whose objects no phrase picks out one by one, under --tasks grounding
        print(f"instructions: {len(left_out)} samples serve none of the tasks {','.join(wanted)} and are left out "
              f"(e.g. {left_out[0]})", file=sys.stderr)
    records, fields = zip(*[(record, entry) for record, entry in zip(records, fields) if entry is not None])
    used = tuple(task for task in wanted if task in served)
    return SourceData(
        name=f"instructions ({','.join(used)}; {templates_per_task} templates per task, seed {seed}) of {shards} "
             f"({manifest.get('source', 'unknown source')})",
        licence=f"{manifest.get('licence', 'as the source shards')}; instruction templates: vlp_lightning's own",
        records=[replace(record, meta={**(record.meta or {}), **entry}) for record, entry in zip(records, fields)],
        inputs=list(paths),
        classnames=manifest.get("classnames", {}),
        extra={"instructions": {
            "tasks": list(used), "templates": {task: list(TEMPLATES[task][:templates_per_task]) for task in used},
            "seed": seed, "input": shards, "input_licence": manifest.get("licence", "unknown"),
            "left_out": len(left_out),
        }},
    )

