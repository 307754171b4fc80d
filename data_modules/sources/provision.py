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
its fields and gains `conversations` and `provision` (the generator, question and answer of each turn). Not built:
ProVision's multi-image generators (the suite's conversations hold one image) and its scene-graph generation
pipeline for unannotated images (the scenes' graphs are exact already).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

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


def provision_questions(meta: dict, questions: int, seed: int, key: str, vocabulary: list[str],
                        generators: tuple[str, ...] = tuple(GENERATORS)) -> list[dict[str, str]]:
    """Up to `questions` (generator, question, answer) of one scene graph, distinct generators drawn per key."""
    rng = random.Random(f"{seed}:{key}")
    order = list(generators)
    rng.shuffle(order)
    asked = []
    for name in order:
        pair = GENERATORS[name](meta, rng, vocabulary)
        if pair is not None:
            asked.append({"generator": name, "question": pair[0], "answer": pair[1]})
        if len(asked) == questions:
            break
    return asked


def provision_source(shards: str, questions: int = 3, seed: int = 0,
                     generators: tuple[str, ...] | None = None) -> SourceData:
    """The scenes of `shards` with ProVision conversations (module doc)."""
    if questions < 1:
        raise SourceError(f"--questions {questions} asks nothing; give at least 1")
    chosen = generators or tuple(GENERATORS)
    unknown = [name for name in chosen if name not in GENERATORS]
    if unknown:
        raise SourceError(f"--generators names {', '.join(unknown)}; choose from {', '.join(GENERATORS)}")
    paths, manifest, records = read_shard_records(shards)
    if not any((record.meta or {}).get("objects") for record in records):
        raise SourceError(f"no sample of {shards!r} has a scene graph (.json objects); build scenes with "
                          "`vlp-data scenes data/scenes` and give 'data/scenes/*.tar'")
    vocabulary = sorted({item["name"] for record in records for item in (record.meta or {}).get("objects", [])})
    kept: list[Record] = []
    for record in records:
        asked = provision_questions(record.meta or {}, questions, seed, record.key, vocabulary, chosen)
        if not asked:
            continue
        turns = []
        for index, qa in enumerate(asked):
            question = f"{IMAGE_PLACEHOLDER}\n{qa['question']}" if index == 0 else qa["question"]
            turns += [{"role": "user", "content": question}, {"role": "assistant", "content": qa["answer"]}]
        kept.append(replace(record, meta={**(record.meta or {}), "conversations": turns, "provision": asked}))
    return SourceData(
        name=f"ProVision questions ({questions} per scene, seed {seed}) of {shards} "
             f"({manifest.get('source', 'unknown source')})",
        licence=f"{manifest.get('licence', 'as the source shards')}; question programs: vlp_lightning's own",
        records=kept,
        inputs=list(paths),
        classnames=manifest.get("classnames", {}),
        extra={"provision": {"generators": list(chosen), "questions": questions, "seed": seed, "input": shards,
                             "left_out": len(records) - len(kept)}},
    )
