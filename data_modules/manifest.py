"""`manifest.json`: what a shard set holds, written next to the shards by `vlp-data`, read by the DataModules.

The pipeline needs the sample count of every shard before it reads any (explicit epoch length, equal batches on
every rank, sample-exact splitting across ranks and workers), and the DataModules need the members (`png`, `txt`,
`cls`, ...) to check that the data can feed the chosen method. Format 1::

    {"format": 1, "source": str, "licence": str, "created": iso-date, "seed": int,
     "shards": {"train-000000.tar": {"split": "train", "count": 1000, "keys": ["__key__", ...]}, ...},
     "splits": {"train": 1700, "val": 190}, "members": ["cls", "json", "png", "txt"],
     "classnames": {"cls": ["name of class 0", ...], "<json field>": [...]}}   # classnames optional
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MANIFEST_NAME = "manifest.json"


def write_manifest(out_dir: str | Path, manifest: dict) -> Path:
    """Write `manifest` as `out_dir/manifest.json` atomically (a reader never sees half a file)."""
    path = Path(out_dir) / MANIFEST_NAME
    partial = path.with_name(f".{MANIFEST_NAME}.partial")
    partial.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(partial, path)
    return path


def read_manifest(directory: str | Path) -> dict | None:
    """The manifest of a shard folder, or None when it has none."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def local_path(url: str) -> Path | None:
    """The file behind a shard URL when it is local (`/x/a.tar`, `file:/x/a.tar`), else None (`pipe:`, `http:`...)."""
    if url.startswith("file:"):
        return Path(url[len("file:") :])
    if "://" in url or url.startswith("pipe:"):
        return None
    return Path(url)


def manifests_for(shard_urls: list[str]) -> dict[Path, dict | None]:
    """The manifest of every folder holding one of the local shards, read once per folder."""
    manifests: dict[Path, dict | None] = {}
    for url in shard_urls:
        path = local_path(url)
        if path is not None and path.parent not in manifests:
            manifests[path.parent] = read_manifest(path.parent)
    return manifests


def shard_counts(shard_urls: list[str]) -> list[int | None]:
    """Samples per shard from the manifests next to local shards; None where a shard is not listed."""
    manifests = manifests_for(shard_urls)
    counts: list[int | None] = []
    for url in shard_urls:
        path = local_path(url)
        manifest = manifests.get(path.parent) if path is not None else None
        entry = (manifest or {}).get("shards", {}).get(path.name) if path is not None else None
        counts.append(int(entry["count"]) if entry is not None else None)
    return counts


def count_samples(shard_urls: list[str]) -> int | None:
    """Total samples of the shards according to their manifests; None when any shard's count is unknown."""
    counts = shard_counts(shard_urls)
    return None if any(count is None for count in counts) else sum(counts)


def class_count(manifest: dict | None) -> int | None:
    """Number of `.cls` classes the manifest names, None when it names none."""
    names = (manifest or {}).get("classnames", {}).get("cls")
    return len(names) if names else None
