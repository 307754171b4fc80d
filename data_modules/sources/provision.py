"""ProVision's programmatic instruction data over scene graphs (`vlp-data provision`).

ProVision (Zhang et al. 2024, "ProVision: Programmatically Scaling Vision-centric Instruction Data for Multimodal
Language Models") writes instruction data without an LLM: a scene graph (objects, their attributes, their relations)
is the symbolic form of an image, and human-written generator programs turn it into question-answer pairs whose
answers are true by construction (24 single-image and 14 multi-image generators over Visual Genome and DataComp).

Here the scene graphs are exact: the `.json` of `vlp-data scenes` (objects with name, category, colour, size,
position and box; relations left of / right of / above / below / bigger than / overlaps; counts). The single-image
generators below, each a program and a question template of ours, are ProVision's kinds (object counting,
existence, attributes, relations, spatial position, size comparison, grounding, region description); every answer
is read from the graph:

* `count`: "How many <name> are there?" -> a number; `total`: how many objects in all;
* `exists`: "Is there a <name>?" about one present or (half the time) one of another scene -> Yes / No;
* `colour`, `size`, `position`: of an object the question names one way (its name, or "<name> in the <position>"
  where two share a name; `instructions.groundable`) -> the attribute;
* `relation_query`: "What is <predicate> the <object>?" -> the one object for which that holds (asked only when it
  is one); `relation_verify`: "Is the <A> <predicate> the <B>?" -> Yes (a relation of the graph) / No (one that
  does not hold), half each;
* `bigger`: "Which is bigger, the <A> or the <B>?" where "bigger than" holds one way -> its name;
* `grounding`: "Where is the <object>?" -> its box as text in image fractions (as `vlp-data instructions`);
* `region`: "Describe the object in <box>." -> the region description of the scene ("a large red apple in the
  top left").

Each scene becomes one sample whose conversation asks `--questions` of them (distinct generators, drawn with
`random.Random(f"{seed}:{key}")` among those the graph can serve; one user / assistant turn each, the image with the
first), so the frozen-language-model methods (`InstructionDataModule`) train on them as they are. The `.json` keeps
its fields and gains `conversations` and `provision` (the generator, question and answer of each turn).

`--multi-image` writes ProVision's multi-image kind instead, over pairs of scenes of one split (consecutive scenes
after a seeded shuffle, each scene in one pair): `compare_count` ("Which image has more <name>s, the left or the
right one?"), `common` ("Which object is in both images?", asked when exactly one name is), `both_exist` ("Is there
a <name> in both images?"), `total_both` ("How many <name>s are there in the two images together?") and
`which_has` ("Which image shows a <colour> <name>, the left or the right one?", asked of a thing only one side
shows). The suite's conversations hold one image (`data_modules.conversations`), so the pair is one picture: the
two scenes side by side, centred on a square grey canvas twice a scene's side, "the left image" and "the right
image" in every question; ProVision feeds the images separately. The `.json` holds `images` (both scene graphs,
left first), `keys` and the conversation.

Not built: the scene-graph generation pipeline for unannotated images (the scenes' graphs are exact already).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

from PIL import Image

from data_modules.conversations import IMAGE_PLACEHOLDER
from data_modules.sources import Record, SourceData, SourceError
from data_modules.sources.instructions import box_text, groundable
from data_modules.sources.shots import read_shard_records

QA = tuple[str, str]
Generator = Callable[[dict, random.Random, list[str]], "QA | None"]


def _plural(name: str) -> str:
    return name if name.endswith("s") else f"{name}s"


def _named(meta: dict) -> list[tuple[str, dict]]:
    return groundable(meta)


def _count(meta: dict, rng: random.Random, vocabulary: list[str]) -> QA | None:
    name, count = rng.choice(sorted(meta.get("counts", {}).items())) if meta.get("counts") else (None, 0)
    return (f"How many {_plural(name)} are there in the image?", str(count)) if name else None


def _total(meta: dict, rng: random.Random, vocabulary: list[str]) -> QA | None:
    objects = meta.get("objects", [])
    return ("How many objects are there in the image in total?", str(len(objects))) if objects else None


def _exists(meta: dict, rng: random.Random, vocabulary: list[str]) -> QA | None:
    present = sorted({item["name"] for item in meta.get("objects", [])})
    absent = [name for name in vocabulary if name not in present]
    if not present:
        return None
    if absent and rng.random() < 0.5:
        return f"Is there a {rng.choice(absent)} in the image?", "No"
    return f"Is there a {rng.choice(present)} in the image?", "Yes"


def _attribute(field: str, question: str) -> Generator:
    def generate(meta: dict, rng: random.Random, vocabulary: list[str]) -> QA | None:
        named = [(phrase, item) for phrase, item in _named(meta) if item.get(field)]
        if not named:
            return None
        phrase, item = rng.choice(named)
        return question.format(phrase), str(item[field])
    return generate


def _relations(meta: dict) -> list[tuple[dict, str, dict]]:
    objects = meta.get("objects", [])
    return [(objects[first], predicate, objects[second]) for first, predicate, second in meta.get("relations", [])
            if first < len(objects) and second < len(objects)]


def _relation_query(meta: dict, rng: random.Random, vocabulary: list[str]) -> QA | None:
    phrases = {id(item): phrase for phrase, item in _named(meta)}
    candidates = []
    for subject, predicate, other in _relations(meta):
        if id(other) not in phrases or predicate == "overlaps":
            continue
        holders = {id(first) for first, p, second in _relations(meta) if p == predicate and second is other}
        if len(holders) == 1:
            candidates.append((f"What is {predicate} the {phrases[id(other)]}?", subject["name"]))
    return rng.choice(sorted(set(candidates))) if candidates else None


def _relation_verify(meta: dict, rng: random.Random, vocabulary: list[str]) -> QA | None:
    phrases = {id(item): phrase for phrase, item in _named(meta)}
    pairs = [(a, b) for a in meta.get("objects", []) for b in meta.get("objects", [])
             if a is not b and id(a) in phrases and id(b) in phrases]
    if not pairs:
        return None
    holds = {(id(a), predicate, id(b)) for a, predicate, b in _relations(meta)}
    predicates = ("left of", "right of", "above", "below", "bigger than")
    true = [(a, p, b) for a, b in pairs for p in predicates if (id(a), p, id(b)) in holds]
    false = [(a, p, b) for a, b in pairs for p in predicates if (id(a), p, id(b)) not in holds]
    positive = bool(true) and (not false or rng.random() < 0.5)
    a, predicate, b = rng.choice(true if positive else false)
    return f"Is the {phrases[id(a)]} {predicate} the {phrases[id(b)]}?", "Yes" if positive else "No"


def _bigger(meta: dict, rng: random.Random, vocabulary: list[str]) -> QA | None:
    phrases = {id(item): phrase for phrase, item in _named(meta)}
    options = [(a, b) for a, predicate, b in _relations(meta)
               if predicate == "bigger than" and id(a) in phrases and id(b) in phrases]
    if not options:
        return None
    big, small = rng.choice(options)
    first, second = (big, small) if rng.random() < 0.5 else (small, big)
    return f"Which is bigger, the {phrases[id(first)]} or the {phrases[id(second)]}?", phrases[id(big)]


def _frame(meta: dict, item: dict) -> list[float]:
    width, height = meta["size"]
    return [item["box"][0] / width, item["box"][1] / height, item["box"][2] / width, item["box"][3] / height]


def _grounding(meta: dict, rng: random.Random, vocabulary: list[str]) -> QA | None:
    named = _named(meta)
    if not named:
        return None
    phrase, item = rng.choice(named)
    return f"Where is the {phrase}? Answer with its box [x0, y0, x1, y1] as fractions of the image.", box_text(
        _frame(meta, item))


def _region(meta: dict, rng: random.Random, vocabulary: list[str]) -> QA | None:
    objects, regions = meta.get("objects", []), meta.get("regions", [])
    if not objects or len(regions) != len(objects) or not meta.get("size"):
        return None
    index = rng.randrange(len(objects))
    return f"Describe the object in the box {box_text(_frame(meta, objects[index]))}.", regions[index]


GENERATORS: dict[str, Generator] = {
    "count": _count,
    "total": _total,
    "exists": _exists,
    "colour": _attribute("colour", "What colour is the {}?"),
    "size": _attribute("size", "Is the {} small, medium or large?"),
    "position": _attribute("position", "In which part of the image is the {}?"),
    "relation_query": _relation_query,
    "relation_verify": _relation_verify,
    "bigger": _bigger,
    "grounding": _grounding,
    "region": _region,
}


def _names(meta: dict) -> set[str]:
    return {item["name"] for item in meta.get("objects", [])}


def _count_of(meta: dict, name: str) -> int:
    return sum(item["name"] == name for item in meta.get("objects", []))


def _compare_count(pair: tuple[dict, dict], rng: random.Random, vocabulary: list[str]) -> QA | None:
    names = sorted(name for name in _names(pair[0]) | _names(pair[1])
                   if _count_of(pair[0], name) != _count_of(pair[1], name))
    if not names:
        return None
    name = rng.choice(names)
    more = "left" if _count_of(pair[0], name) > _count_of(pair[1], name) else "right"
    return f"Which image has more {_plural(name)}, the left or the right one?", more


def _common(pair: tuple[dict, dict], rng: random.Random, vocabulary: list[str]) -> QA | None:
    shared = sorted(_names(pair[0]) & _names(pair[1]))
    return ("Which object is in both images?", shared[0]) if len(shared) == 1 else None


def _both_exist(pair: tuple[dict, dict], rng: random.Random, vocabulary: list[str]) -> QA | None:
    either = sorted(_names(pair[0]) | _names(pair[1]))
    if not either:
        return None
    shared = sorted(_names(pair[0]) & _names(pair[1]))
    name = rng.choice(shared) if shared and rng.random() < 0.5 else rng.choice(either)
    return f"Is there a {name} in both images?", "Yes" if name in shared else "No"


def _total_both(pair: tuple[dict, dict], rng: random.Random, vocabulary: list[str]) -> QA | None:
    either = sorted(_names(pair[0]) | _names(pair[1]))
    if not either:
        return None
    name = rng.choice(either)
    return (f"How many {_plural(name)} are there in the two images together?",
            str(_count_of(pair[0], name) + _count_of(pair[1], name)))


def _which_has(pair: tuple[dict, dict], rng: random.Random, vocabulary: list[str]) -> QA | None:
    shown = [{(item["colour"], item["name"]) for item in meta.get("objects", []) if item.get("colour")}
             for meta in pair]
    only = sorted((thing, side) for side, things in zip(("left", "right"), shown) for thing in things
                  if thing not in shown[side == "left"])
    if not only:
        return None
    (colour, name), side = rng.choice(only)
    return f"Which image shows a {colour} {name}, the left or the right one?", side


MultiGenerator = Callable[[tuple[dict, dict], random.Random, list[str]], "QA | None"]
MULTI_IMAGE_GENERATORS: dict[str, MultiGenerator] = {
    "compare_count": _compare_count,
    "common": _common,
    "both_exist": _both_exist,
    "total_both": _total_both,
    "which_has": _which_has,
}


def side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    """Two scenes of one size S next to each other, centred on a 2S x 2S grey square (module doc)."""
    side = max(*left.size, *right.size)
    canvas = Image.new("RGB", (2 * side, 2 * side), (128, 128, 128))
    for index, image in enumerate((left, right)):
        image = image.convert("RGB")
        canvas.paste(image, (index * side + (side - image.width) // 2, (2 * side - image.height) // 2))
    return canvas


def provision_questions(meta: dict | tuple[dict, dict], questions: int, seed: int, key: str, vocabulary: list[str],
                        generators: tuple[str, ...] = tuple(GENERATORS),
                        table: dict[str, Callable] = GENERATORS) -> list[dict[str, str]]:
    """Up to `questions` (generator, question, answer) of one scene graph (or, with `table` the
    `MULTI_IMAGE_GENERATORS`, of a pair of graphs), distinct generators drawn per key."""
    rng = random.Random(f"{seed}:{key}")
    order = list(generators)
    rng.shuffle(order)
    asked = []
    for name in order:
        pair = table[name](meta, rng, vocabulary)
        if pair is not None:
            asked.append({"generator": name, "question": pair[0], "answer": pair[1]})
        if len(asked) == questions:
            break
    return asked


def _conversation(asked: list[dict[str, str]]) -> list[dict[str, str]]:
    turns = []
    for index, qa in enumerate(asked):
        question = f"{IMAGE_PLACEHOLDER}\n{qa['question']}" if index == 0 else qa["question"]
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": qa["answer"]}]
    return turns


def _pairs(records: list[Record], seed: int) -> list[tuple[Record, Record]]:
    """Consecutive scenes of each split after a seeded shuffle, each scene in one pair (an odd one out is left)."""
    by_split: dict[str | None, list[Record]] = {}
    for record in records:
        if (record.meta or {}).get("objects"):
            by_split.setdefault(record.split, []).append(record)
    pairs = []
    for split, members in sorted(by_split.items(), key=lambda item: str(item[0])):
        random.Random(f"{seed}:pairs:{split}").shuffle(members)
        pairs += list(zip(members[0::2], members[1::2]))
    return pairs


def _multi_image_records(records: list[Record], questions: int, seed: int, vocabulary: list[str],
                         chosen: tuple[str, ...]) -> list[Record]:
    kept = []
    for left, right in _pairs(records, seed):
        key = f"pair_{left.key}_{right.key}"
        graphs = (left.meta or {}, right.meta or {})
        asked = provision_questions(graphs, questions, seed, key, vocabulary, chosen, MULTI_IMAGE_GENERATORS)
        if not asked:
            continue
        kept.append(Record(
            key=key, origin=f"{left.origin} + {right.origin}", split=left.split,
            open_image=lambda a=left.open_image, b=right.open_image: side_by_side(a(), b()),
            meta={"images": list(graphs), "keys": [left.key, right.key], "layout": "side by side",
                  "conversations": _conversation(asked), "provision": asked},
        ))
    return kept


def provision_source(shards: str, questions: int = 3, seed: int = 0,
                     generators: tuple[str, ...] | None = None, multi_image: bool = False) -> SourceData:
    """The scenes of `shards` with ProVision conversations, or (`multi_image`) pairs of them (module doc)."""
    if questions < 1:
        raise SourceError(f"--questions {questions} asks nothing; give at least 1")
    known = MULTI_IMAGE_GENERATORS if multi_image else GENERATORS
    chosen = generators or tuple(known)
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise SourceError(f"--generators names {', '.join(unknown)}; choose from {', '.join(known)}"
                          + (" (the --multi-image ones)" if multi_image else ""))
    paths, manifest, records = read_shard_records(shards)
    if not any((record.meta or {}).get("objects") for record in records):
        raise SourceError(f"no sample of {shards!r} has a scene graph (.json objects); build scenes with "
                          "`vlp-data scenes data/scenes` and give 'data/scenes/*.tar'")
    vocabulary = sorted({item["name"] for record in records for item in (record.meta or {}).get("objects", [])})
    if multi_image:
        kept = _multi_image_records(records, questions, seed, vocabulary, chosen)
    else:
        kept = []
        for record in records:
            asked = provision_questions(record.meta or {}, questions, seed, record.key, vocabulary, chosen)
            if asked:
                kept.append(replace(record, meta={**(record.meta or {}), "conversations": _conversation(asked),
                                                  "provision": asked}))
    return SourceData(
        name=f"ProVision {'multi-image ' if multi_image else ''}questions ({questions} per "
             f"{'pair' if multi_image else 'scene'}, seed {seed}) of {shards} "
             f"({manifest.get('source', 'unknown source')})",
        licence=f"{manifest.get('licence', 'as the source shards')}; question programs: vlp_lightning's own",
        records=kept,
        inputs=list(paths),
        classnames=manifest.get("classnames", {}),
        extra={"provision": {"generators": list(chosen), "questions": questions, "seed": seed, "input": shards,
                             "multi_image": multi_image,
                             "left_out": len(records) - len(kept) * (2 if multi_image else 1)}},
    )
