"""A few-shot subset of an existing shard set: K samples of every class, drawn with a seed (`vlp-data shots`).

Few-shot adaptation (CoOp, Zhou et al. 2022, sec. 4.1: 1, 2, 4, 8 and 16 shots per class, three seeds) trains on K
labelled images per class; which K matters, so the draw is seeded and written out as shards of its own: every run
of a protocol reads the same samples, and the manifest records the source, the shots, the seed and the label field.
The draw per class is a shuffle of the class's samples with `random.Random(f"{seed}:{label}")`, so the K-shot set
of a seed is the first K of its (K + 1)-shot set: shot curves are nested, as Dassl's sampler is not. A class with
fewer than K samples gives all it has, and the build says which.

Members are copied as they are (image bytes, caption, label, json); the labels come from `.cls` or from an integer
field of `.json` (`--label-field subcategory_id` for the emoji's 99 subcategories).
"""

from __future__ import annotations

import io
import json
import random
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from PIL import Image

from data_modules.manifest import local_path, read_manifest
from data_modules.pipeline import IMAGE_MEMBERS, expand_shards
from data_modules.sources import Record, SourceData, SourceError


def _label(sample: dict[str, bytes], label_field: str, key: str) -> int:
    try:
        if label_field == "cls":
            return int(sample["cls"])
        return int(json.loads(sample["json"])[label_field])
    except (KeyError, ValueError) as error:
        where = ".cls member" if label_field == "cls" else f"{label_field!r} in its .json"
        raise SourceError(f"sample {key} has no integer label ({where}: {error!r}); pass --label-field with a "
                          "field every sample has") from None


def few_shot_source(shards: str, shots: int | None, seed: int, label_field: str, fraction: float | None = None
                    ) -> SourceData:
    """K = `shots` samples per class of `shards` (a shard pattern), drawn with `seed` (module doc); or, with
    `fraction`, round(fraction x n_c) (at least 1) of each class's n_c samples: a class-balanced subset of the pool
    (the data-scaling study's 1/8, 1/4, 1/2 of a pool), nested across fractions as the shots are across K."""
    if (shots is None) == (fraction is None):
        raise SourceError("give either --shots K or --fraction F")
    if fraction is not None and not 0 < fraction <= 1:
        raise SourceError(f"--fraction {fraction} is not in (0, 1]")
    from data_modules.builder import iterate_shard  # the builder imports the sources

    paths = [local_path(url) for url in expand_shards(shards)]
    if not paths or any(path is None or not path.is_file() for path in paths):
        raise SourceError(f"{shards!r} names no local shard files; give a pattern such as 'data/emoji/train-*.tar'")
    by_class: dict[int, list[tuple[str, dict[str, bytes], Path]]] = defaultdict(list)
    for path in paths:
        for key, sample in iterate_shard(path):
            by_class[_label(sample, label_field, key)].append((key, sample, path))
    records, short = [], []
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda item: item[0])
        random.Random(f"{seed}:{label}").shuffle(members)
        count = shots if fraction is None else max(1, round(fraction * len(members)))
        if len(members) < count:
            short.append(f"{label} ({len(members)})")
        for key, sample, path in members[:count]:
            records.append(shard_record(key, sample, path))
    if short:
        print(f"vlp-data shots: {len(short)} classes have fewer than {shots} samples and give all they have: "
              f"{', '.join(short[:10])}{' ...' if len(short) > 10 else ''}", file=sys.stderr)
    manifest = read_manifest(paths[0].parent) or {}
    return SourceData(
        name=f"{f'{shots}-shot' if fraction is None else f'{fraction:g}-of-each-class'} subset (seed {seed}, label "
             f"field {label_field}) of {shards} "
             f"({manifest.get('source', 'unknown source')})",
        licence=manifest.get("licence", "as the source shards"),
        records=records,
        inputs=paths,
        classnames=manifest.get("classnames", {}),
    )


def read_shard_records(shards: str) -> tuple[list[Path], dict, list[Record]]:
    """(shard paths, their manifest, every sample as a `Record` with the split its shard belongs to) of a local
    shard pattern: what the sources that rewrite existing shards read (`instructions`, `provision`)."""
    from data_modules.builder import iterate_shard  # the builder imports the sources

    paths = [local_path(url) for url in expand_shards(shards)]
    if not paths or any(path is None or not path.is_file() for path in paths):
        raise SourceError(f"{shards!r} names no local shard files; give a pattern such as 'data/emoji/*.tar'")
    manifest = read_manifest(paths[0].parent) or {}
    records: list[Record] = []
    for path in paths:
        split = manifest.get("shards", {}).get(path.name, {}).get("split") or path.name.rpartition("-")[0]
        records += [replace(shard_record(key, sample, path), split=split) for key, sample in iterate_shard(path)]
    return paths, manifest, records


def shard_record(key: str, sample: dict[str, bytes], path: Path) -> Record:
    """A sample read back from shard `path` as a `Record` with its members as they are (image bytes, caption,
    label, json)."""
    image = next((sample[name] for name in IMAGE_MEMBERS if name in sample), None)
    if image is None:
        raise SourceError(f"sample {key} of {path} has no image member")
    return Record(
        key=key,
        open_image=lambda data=image: Image.open(io.BytesIO(data)),
        origin=f"{path}:{key}",
        caption=sample["txt"].decode("utf-8") if "txt" in sample else None,
        label=int(sample["cls"]) if "cls" in sample else None,
        meta=json.loads(sample["json"]) if "json" in sample else None,
    )
