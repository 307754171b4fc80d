"""`vlp-data provision`: ProVision's programmatic questions over the scene graphs, every answer true by the graph."""

from __future__ import annotations

import json
import re

import pytest

from data_modules.builder import iterate_shard, main
from data_modules.conversations import parse_conversation
from data_modules.sources.provision import GENERATORS


def scenes_with_questions(folder) -> list[dict]:
    return [json.loads(sample["json"]) for shard in sorted(folder.glob("*.tar")) for _, sample in iterate_shard(shard)]


def named(meta: dict, phrase: str) -> dict:
    """The object a question's phrase names (its name, or "<name> in the <position>")."""
    matches = [item for item in meta["objects"]
               if phrase in (item["name"], f"{item['name']} in the {item['position']}")]
    assert len(matches) == 1, (phrase, meta["objects"])
    return matches[0]


def check(meta: dict, generator: str, question: str, answer: str) -> None:
    """The answer, recomputed from the scene graph."""
    objects = meta["objects"]
    if generator == "count":
        name = re.match(r"How many (.+) are there in the image\?", question).group(1)
        assert int(answer) == sum(_plural(item["name"]) == name for item in objects)
    elif generator == "total":
        assert int(answer) == len(objects)
    elif generator == "exists":
        name = re.match(r"Is there a (.+) in the image\?", question).group(1)
        assert answer == ("Yes" if any(item["name"] == name for item in objects) else "No")
    elif generator in ("colour", "size", "position"):
        phrase = re.search(r"(?:is|Is) the (.+?)(?: small, medium or large)?\?$", question).group(1)
        assert answer == named(meta, phrase)[generator]
    elif generator == "relation_verify":
        first, predicate, second = re.match(
            r"Is the (.+) (left of|right of|above|below|bigger than) the (.+)\?", question).groups()
        a, b = objects.index(named(meta, first)), objects.index(named(meta, second))
        assert answer == ("Yes" if [a, predicate, b] in meta["relations"] else "No")
    elif generator == "relation_query":
        predicate, phrase = re.match(r"What is (left of|right of|above|below|bigger than) the (.+)\?",
                                     question).groups()
        other = objects.index(named(meta, phrase))
        holders = [objects[s]["name"] for s, p, o in meta["relations"] if p == predicate and o == other]
        assert holders == [answer]
    elif generator == "bigger":
        first, second = re.match(r"Which is bigger, the (.+) or the (.+)\?", question).groups()
        a, b = objects.index(named(meta, first)), objects.index(named(meta, second))
        bigger = a if [a, "bigger than", b] in meta["relations"] else b
        assert [bigger, "bigger than", a + b - bigger] in meta["relations"]
        assert answer in (first, second) and named(meta, answer) is objects[bigger]
    elif generator == "grounding":
        item = named(meta, re.match(r"Where is the (.+)\? Answer", question).group(1))
        width, height = meta["size"]
        box = [float(value) for value in re.findall(r"\d+(?:\.\d+)?", answer)]
        truth = [item["box"][0] / width, item["box"][1] / height, item["box"][2] / width, item["box"][3] / height]
        assert box == pytest.approx(truth, abs=0.0051)
    elif generator == "region":
        box = [float(value) for value in re.findall(r"\d+(?:\.\d+)?", question)]
        width, height = meta["size"]
        index = min(range(len(objects)), key=lambda i: sum(abs(b - o / s) for b, o, s in zip(
            box, objects[i]["box"], (width, height, width, height))))
        assert answer == meta["regions"][index]


def _plural(name: str) -> str:
    return name if name.endswith("s") else f"{name}s"


def test_every_answer_is_what_the_scene_graph_says(scene_shards, tmp_path):
    out = tmp_path / "provision"
    assert main(["provision", str(scene_shards / "*.tar"), str(out), "--questions", "4"]) == 0
    metas = scenes_with_questions(out)
    seen = set()
    for meta in metas:
        conversation = parse_conversation(meta["conversations"])
        asked = meta["provision"]
        assert 1 <= len(asked) <= 4 and len({qa["generator"] for qa in asked}) == len(asked)
        assert [turn["content"] for turn in conversation[1::2]] == [qa["answer"] for qa in asked]
        for qa in asked:
            check(meta, qa["generator"], qa["question"], qa["answer"])
            seen.add(qa["generator"])
    assert seen == set(GENERATORS)  # every generator served some scene of the tiny set
    again = tmp_path / "again"
    assert main(["provision", str(scene_shards / "*.tar"), str(again), "--questions", "4"]) == 0
    assert scenes_with_questions(again) == metas  # seeded: the same questions


def test_shards_without_scene_graphs_and_unknown_generators_are_one_sentence(make_shards, scene_shards, tmp_path,
                                                                             capsys):
    shards = make_shards(tmp_path / "shapes", n=4, per_shard=4, with_json=True)
    assert main(["provision", shards.pattern, str(tmp_path / "out")]) == 2
    assert "has a scene graph (.json objects); build scenes with" in capsys.readouterr().err
    assert main(["provision", str(scene_shards / "*.tar"), str(tmp_path / "out2"), "--generators", "count,nope"]) == 2
    assert "--generators names nope" in capsys.readouterr().err


def test_multi_image_questions_over_side_by_side_pairs_are_what_both_graphs_say(scene_shards, tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from data_modules.sources.provision import MULTI_IMAGE_GENERATORS

    out = tmp_path / "pairs"
    assert main(["provision", str(scene_shards / "*.tar"), str(out), "--multi-image", "--questions", "5"]) == 0
    scenes = {key: sample for shard in sorted(scene_shards.glob("*.tar")) for key, sample in iterate_shard(shard)}
    seen, paired = set(), []
    for shard in sorted(out.glob("*.tar")):
        for key, sample in iterate_shard(shard):
            meta = json.loads(sample["json"])
            left, right = meta["images"]
            paired += meta["keys"]
            assert shard.name.rpartition("-")[0] == next(  # a pair never mixes splits
                path.name.rpartition("-")[0] for path in scene_shards.glob("*.tar")
                if meta["keys"][0] in dict(iterate_shard(path)))
            assert [json.loads(scenes[k]["json"]) for k in meta["keys"]] == [left, right]
            picture = np.asarray(Image.open(io.BytesIO(sample["jpg" if "jpg" in sample else "png"])).convert("RGB"))
            first = np.asarray(Image.open(io.BytesIO(scenes[meta["keys"][0]]["jpg"])).convert("RGB"))
            side = first.shape[0]
            assert picture.shape == (2 * side, 2 * side, 3)  # square: a square crop keeps both scenes
            panel = picture[side // 2 : side // 2 + side, :side].astype(int)
            assert np.abs(panel - first.astype(int)).mean() < 8  # the left image is the first scene (JPEG noise)
            counts = [{name: [o["name"] for o in graph["objects"]].count(name)
                       for name in {o["name"] for o in graph["objects"]}} for graph in (left, right)]
            for qa in meta["provision"]:
                generator, question, answer = qa["generator"], qa["question"], qa["answer"]
                seen.add(generator)
                if generator == "compare_count":
                    name = next(n for n in set(counts[0]) | set(counts[1]) if question.startswith(
                        f"Which image has more {_plural(n)},"))
                    assert answer == ("left" if counts[0].get(name, 0) > counts[1].get(name, 0) else "right")
                    assert counts[0].get(name, 0) != counts[1].get(name, 0)
                elif generator == "common":
                    assert set(counts[0]) & set(counts[1]) == {answer}
                elif generator == "both_exist":
                    name = re.match(r"Is there a (.+) in both images\?", question).group(1)
                    assert answer == ("Yes" if name in counts[0] and name in counts[1] else "No")
                elif generator == "total_both":
                    name = next(n for n in set(counts[0]) | set(counts[1]) if question == (
                        f"How many {_plural(n)} are there in the two images together?"))
                    assert int(answer) == counts[0].get(name, 0) + counts[1].get(name, 0)
                elif generator == "which_has":
                    colour_name = re.match(r"Which image shows a (.+), the left", question).group(1)
                    things = [{f"{o['colour']} {o['name']}" for o in graph["objects"]} for graph in (left, right)]
                    assert answer in ("left", "right") and (colour_name in things[0]) != (colour_name in things[1])
                    assert colour_name in things[answer == "right"]
    assert seen == set(MULTI_IMAGE_GENERATORS) and len(paired) == len(set(paired))  # each scene in one pair at most
    assert main(["provision", str(scene_shards / "*.tar"), str(tmp_path / "x"), "--multi-image",
                 "--generators", "count"]) == 2  # a single-image generator is not a multi-image one
