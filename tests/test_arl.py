"""ARL and its knowledge: WordNet linking on a hand-written WNdb fixture, the graph, whole-entity masking, knowledge
tokens reaching the fused text, captions without entities, and `vlp-data wordnet` end to end (no real WordNet)."""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from data_modules.builder import iterate_shard, main as vlp_data
from data_modules.manifest import read_manifest
from data_modules.sources.wordnet import WordNet, build_graph, link_caption, train_transe
from vlp_lightning.losses.fusion import mask_spans
from vlp_lightning.methods import ARL
from vlp_lightning.methods.fusion.common import text_specials
from vlp_lightning.modules.tokenizers import ByteTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from conftest import draw_sample, png_bytes  # noqa: E402

#: (key, lemmas, pointers as (symbol, target key), gloss) of the fixture's noun synsets.
SYNSETS = [
    ("entity", ["entity"], [("~", "body_part"), ("~", "animal"), ("~", "food"), ("~", "surface")], "that which is"),
    ("body_part", ["body_part"], [("@", "entity"), ("~", "face")], "any part of an organism"),
    ("face", ["face", "human_face"], [("@", "body_part"), ("%p", "mouth")], "the front of the human head"),
    ("mouth", ["mouth"], [("@", "body_part"), ("#p", "face")], "the opening through which food is taken in"),
    ("surface", ["surface", "face"], [("@", "entity")], "a side of a solid object such as a cube"),
    ("animal", ["animal"], [("@", "entity"), ("~", "dog")], "a living organism"),
    ("dog", ["dog"], [("@", "animal")], "a domestic animal that barks"),
    ("food", ["food"], [("@", "entity"), ("~", "ice_cream")], "any substance eaten"),
    ("ice_cream", ["ice_cream"], [("@", "food")], "frozen dessert made of cream"),
    ("ice", ["ice"], [("@", "entity")], "water frozen in the solid state"),
    ("cream", ["cream"], [("@", "food")], "the fat part of milk"),
    ("large_size", ["large"], [("@", "entity")], "a garment size for a large person"),
]
SENSES = {"entity": ["entity"], "body_part": ["body_part"], "face": ["face", "surface"], "human_face": ["face"],
          "mouth": ["mouth"], "surface": ["surface"], "animal": ["animal"], "dog": ["dog"], "food": ["food"],
          "ice_cream": ["ice_cream"], "ice": ["ice"], "cream": ["cream"], "large": ["large_size"]}


def write_wndb(folder: Path) -> dict[str, int]:
    """A WNdb folder (index.noun, data.noun, noun.exc, index.adj) in the real format; returns key -> offset."""
    folder.mkdir(parents=True, exist_ok=True)
    header = "  1 This is a hand-written WordNet fixture for tests.  \n"
    width = 8
    offsets, position = {}, len(header.encode())
    lines = {}
    for _ in range(2):  # the second pass knows every offset
        position = len(header.encode())
        for key, lemmas, pointers, gloss in SYNSETS:
            offsets[key] = position
            words = " ".join(f"{lemma} 0" for lemma in lemmas)
            refs = " ".join(f"{symbol} {offsets.get(target, 0):0{width}d} n 0000" for symbol, target in pointers)
            line = (f"{position:0{width}d} 03 n {len(lemmas):02x} {words} {len(pointers):03d} {refs} | {gloss}  \n")
            lines[key] = line
            position += len(line.encode())
    (folder / "data.noun").write_text(header + "".join(lines[key] for key, *_ in SYNSETS), encoding="utf-8")
    index = [f"{lemma} n {len(keys)} 0 {len(keys)} 0 " + " ".join(f"{offsets[k]:08d}" for k in keys) + "  \n"
             for lemma, keys in sorted(SENSES.items())]
    (folder / "index.noun").write_text(header + "".join(index), encoding="utf-8")
    (folder / "noun.exc").write_text("mice mouse\n", encoding="utf-8")
    (folder / "index.adj").write_text(header + "large a 1 0 1 0 00000001  \n", encoding="utf-8")
    return offsets


@pytest.fixture
def wordnet(tmp_path) -> tuple[WordNet, dict[str, int]]:
    offsets = write_wndb(tmp_path / "dict")
    return WordNet(tmp_path / "dict"), offsets


def test_linking_finds_the_expected_synsets(wordnet):
    wn, offsets = wordnet
    assert wn.synset(offsets["face"]).gloss == "the front of the human head"
    assert [(s, e, o) for s, e, o in link_caption("a drawing of a grinning face", wn)] == [(24, 28, offsets["face"])]
    # plurals undone, longest match first ("ice cream", not "ice" + "cream"), adjective modifiers not linked alone
    assert [o for *_, o in link_caption("two dogs eating ice cream", wn)] == [offsets["dog"], offsets["ice_cream"]]
    assert [o for *_, o in link_caption("large dog", wn)] == [offsets["dog"]]
    assert [o for *_, o in link_caption("size large", wn)] == [offsets["large_size"]]  # a noun at the end
    # gloss overlap picks the second sense of "face" next to "cube"; ties keep the first (most frequent)
    assert [o for *_, o in link_caption("face of a cube", wn)] == [offsets["surface"]]
    assert [o for *_, o in link_caption("smiling face with open mouth", wn)] == [offsets["face"], offsets["mouth"]]


def test_graph_holds_linked_entities_ancestors_and_relations(wordnet):
    wn, offsets = wordnet
    graph = build_graph(wn, Counter({offsets["dog"]: 2, offsets["face"]: 1, offsets["mouth"]: 1}))
    names = [synset.offset for synset in graph.synsets]
    assert names[:3] == [offsets["dog"], offsets["face"], offsets["mouth"]]  # by mention count, then offset
    assert {offsets["animal"], offsets["body_part"], offsets["entity"]} <= set(names)
    assert offsets["ice_cream"] not in names
    index = graph.index_of()
    triples = set(graph.triples)
    assert (index[offsets["dog"]], graph.relations.index("hypernym"), index[offsets["animal"]]) in triples
    assert (index[offsets["face"]], graph.relations.index("part_meronym"), index[offsets["mouth"]]) in triples
    embeddings = train_transe(graph.triples, len(names), len(graph.relations), dim=8, epochs=3, batches=2)
    assert embeddings.shape == (len(names), 8) and torch.isfinite(embeddings).all()


def test_whole_entity_masking_masks_whole_spans_and_never_padding_or_specials():
    tokenizer = ByteTokenizer(context_length=24)
    text = tokenizer(["grinning face", "a dog"])
    ids, attention = text["input_ids"], text["attention_mask"]
    specials = text_specials(tokenizer)
    # tokens: 0 = start, "grinning" 1..9, "face" 10..14, end 14; "a" 1..2, "dog" 3..6
    spans = [[(10, 14, True), (1, 9, False)], [(3, 6, True), (1, 2, False)]]
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        masked, labels = mask_spans(ids, attention, spans, mask_token_id=specials.mask_token_id,
                                    vocab_size=specials.vocab_size, special_token_ids=specials.special_token_ids,
                                    probability=0.15, generator=generator)
        chosen = labels != -100
        assert chosen[0, 10:14].all() and not chosen[0, :10].any() and not chosen[0, 14:].any()  # the entity, whole
        assert chosen[1, 3:6].all() and not chosen[1, :3].any() and not chosen[1, 6:].any()
        assert not (chosen & ~attention.bool()).any()
        assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])


def knowledge_file(path: Path, entities: int = 4, dim: int = 32) -> str:
    torch.manual_seed(0)
    path.write_text(json.dumps({"format": 1, "entities": [{"synset": f"{i:08d}-n"} for i in range(entities)],
                                "relations": ["hypernym"], "triples": [[0, 0, 3], [1, 0, 3], [2, 0, 3]],
                                "embeddings": torch.randn(entities, dim).tolist()}))
    return str(path)


def arl_batch(method: ARL, metas: list[dict]) -> dict:
    captions = ["grinning face", "a dog", "red apple", "ice cream"][: len(metas)]
    images = torch.randn(len(captions), 3, method.image_size, method.image_size)
    return {"image": images, "caption": captions, "text": method.tokenizer(captions), "meta": metas,
            "__key__": [str(i) for i in range(len(captions))]}


def test_knowledge_tokens_reach_the_fused_text_and_train_the_entity_embeddings(tmp_path):
    torch.manual_seed(0)
    method = ARL(knowledge=knowledge_file(tmp_path / "knowledge.json"))
    metas = [{"entities": [[9, 13, 1]], "image_entities": [1]}, {"entities": [[2, 5, 0]], "image_entities": [0]}]
    batch = arl_batch(method, metas)
    mentions, units = method.caption_entities(batch)
    assert mentions == [[(10, 14, 1)], [(3, 6, 0)]]  # bytes after the start token
    assert units[0][0] == (10, 14, True) and (1, 9, False) in units[0]
    entities = method.entity_inputs(mentions, batch["text"]["input_ids"].shape[1], torch.device("cpu"))
    nodes = method.graph()
    tokens = method.vision.forward_sequence(batch["image"])
    fused, _ = method.fuse(tokens, batch["text"], entities, nodes)
    without, _ = method.fuse(tokens, batch["text"], entities.without(entities.present), nodes)
    assert not torch.allclose(fused, without)  # the knowledge changes the fused text
    (fused * torch.randn_like(fused)).sum().backward()
    grad = method.graph.embeddings.grad.abs().sum(-1)
    assert grad[0] > 0 and grad[1] > 0  # the gradient reaches the embeddings of both captions' entities
    method.zero_grad()
    outputs = method.forward_loss(batch)
    assert outputs["align"] > 0 and all(torch.isfinite(value) for value in outputs.values())
    outputs["loss"].backward()
    assert method.graph.embeddings.grad.abs().sum() > 0


def test_captions_without_entities_train_with_an_empty_knowledge_stream(tmp_path, caplog):
    torch.manual_seed(0)
    method = ARL(knowledge=knowledge_file(tmp_path / "knowledge.json"))
    mixed = method.forward_loss(arl_batch(method, [{"entities": [[9, 13, 1]], "image_entities": [1]}, {}, {}]))
    assert all(torch.isfinite(value) for value in mixed.values())
    none = arl_batch(method, [{}, {}])
    del none["meta"]
    for _ in range(2):
        outputs = method.forward_loss(none)
        assert all(torch.isfinite(value) for value in outputs.values())
    assert sum("no caption of this batch has WordNet entities" in r.message for r in caplog.records) == 1  # once


def test_vlp_data_wordnet_links_shards_and_keeps_their_splits(tmp_path, wordnet, write_tar):
    _, offsets = wordnet
    source = tmp_path / "shards"
    source.mkdir()
    rng = random.Random(0)
    for split, captions in (("train", ["grinning face", "two dogs"]), ("val", ["ice cream\nface of a cube"])):
        write_tar(source / f"{split}-000000.tar", [
            {"__key__": f"{split}{i}", "png": png_bytes(draw_sample(i, 16, rng)), "txt": caption.encode()}
            for i, caption in enumerate(captions)])
    out = tmp_path / "linked"
    assert vlp_data(["wordnet", str(source / "*.tar"), str(out), "--wordnet-dir", str(tmp_path / "dict"),
                     "--dim", "8", "--transe-epochs", "2"]) == 0
    manifest = read_manifest(out)
    assert manifest["splits"] == {"train": 2, "val": 1} and manifest["files"] == ["knowledge.json"]
    knowledge = json.loads((out / "knowledge.json").read_text())
    synsets = [entity["synset"] for entity in knowledge["entities"]]
    assert len(knowledge["embeddings"]) == len(synsets) and len(knowledge["embeddings"][0]) == 8
    metas = {key: json.loads(sample["json"]) for shard in sorted(out.glob("*.tar"))
             for key, sample in iterate_shard(shard)}
    face = synsets.index(f"{offsets['face']:08d}-n")
    assert metas["train0"]["entities"] == [[9, 13, face]] and metas["train0"]["image_entities"] == [face]
    cream, surface = synsets.index(f"{offsets['ice_cream']:08d}-n"), synsets.index(f"{offsets['surface']:08d}-n")
    assert metas["val0"]["entities"] == [[0, 9, cream], [10, 14, surface]]  # offsets into the whole two-line text
    assert vlp_data(["wordnet", str(source / "*.tar"), str(out), "--wordnet-dir", str(tmp_path / "dict"),
                     "--dim", "4", "--transe-epochs", "2"]) == 0  # a rebuild replaces its own knowledge.json
    assert len(json.loads((out / "knowledge.json").read_text())["embeddings"][0]) == 4


def test_caption_sampling_other_than_all_is_one_sentence():
    """Entity spans are character offsets into the whole caption: a datamodule training on one line of it would put
    them on other words, so ARL refuses it before the first step."""
    from types import SimpleNamespace

    method = ARL()
    method._trainer = SimpleNamespace(datamodule=SimpleNamespace(caption_sampling="line"))
    with pytest.raises(ValueError, match="caption_sampling='line' .* set data.caption_sampling: all"):
        method.on_fit_start()
    method._trainer = SimpleNamespace(datamodule=SimpleNamespace(caption_sampling="all"))
    method.on_fit_start()
