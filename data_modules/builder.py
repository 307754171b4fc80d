"""`vlp-data`: turn a folder, a CSV / JSONL table or one of the real sources into WebDataset shards.

Every sub-command lists its samples through a source (`data_modules.sources`) and hands them to `build_shards`,
which does the rest the same way for all of them:

- splits: `--split train=0.9,val=0.1` ranks samples by a hash of (seed, key), so the assignment depends on
  neither the input order nor the machine, and cuts the ranking at the exact fractions; within a split samples
  are written in that hashed order, so a class-sorted folder still gives shards that mix classes;
- validation: every image is fully decoded before it is written; one that fails is reported and skipped (and
  listed under `skipped` in the manifest) instead of failing at training time;
- storage: `<key>.png` re-encoded at its own size (or `--resize N`: shorter side at most N), transparency
  flattened onto white, plus `<key>.txt` (caption), `<key>.cls` (integer label) and `<key>.json` (anything
  else). Members are written as bytes, never through an encoder that could pickle;
- shards `OUT/{split}-{index:06d}.tar` of `--maxcount` samples and `OUT/manifest.json` (counts and keys per
  shard, source, licence, classnames);
- re-runs: the manifest records a fingerprint of the options and inputs (keys, captions, labels, and each input
  file's size and modification time); an unchanged input is reported as up to date, a changed one is rebuilt in
  a hidden sibling folder whose shards replace those of OUT only once complete (the manifest last). Only the files
  the previous manifest lists (and the manifest) are replaced or removed: anything else in OUT is left alone.
  Tar headers carry a fixed time, so the same input always gives byte-identical shards;
- containment: table image paths stay under the table's folder (or `--image-root`) unless
  `--allow-outside-root`, and `folder` reads no symbolic link unless `--follow-symlinks`.

Clips (`data_modules.clips`): `vlp-data moving` draws moving-object clips from real images (`.frames.npy`),
`vlp-data videos` stores your own `.mp4` / `.webm` files as they are; both write `.txt`, `.cls` and a `.json` timeline.

`vlp-data inspect OUT` reads every sample back and reports counts, members, examples (clips: frames, size, fps,
caption and timeline segments) and undecodable samples.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import platformdirs
import webdataset
from PIL import Image
from tqdm import tqdm

from data_modules.clips import CLIP_MEMBERS, describe_clip
from data_modules.instances import INSTANCES_MEMBER, decode_instances
from data_modules.manifest import MANIFEST_NAME, read_manifest, write_manifest
from data_modules.masks import MASK_MEMBER, decode_mask, encode_alpha_mask
from data_modules.sources import IMAGE_ERRORS, Record, SourceData, SourceError
from data_modules.sources.babyai import DEFAULT_HELDOUT_LEVELS as BABYAI_HELDOUT_LEVELS
from data_modules.sources.babyai import DEFAULT_LEVELS as BABYAI_LEVELS
from data_modules.sources.babyai import VIEWS, babyai_source
from data_modules.sources.babyai import HELDOUT_SPLIT as BABYAI_HELDOUT_SPLIT
from data_modules.sources.emoji import STYLES, emoji_source
from data_modules.sources.emoji import VERSION as EMOJI_VERSION
from data_modules.sources.emoji_contrasts import emoji_contrasts_source
from data_modules.sources.fashion_mnist import DEFAULT_ROOT as FASHION_MNIST_ROOT
from data_modules.sources.fashion_mnist import fashion_mnist_source
from data_modules.sources.ffr import DEFAULT_BACKGROUNDS as FFR_BACKGROUNDS
from data_modules.sources.ffr import DEFAULT_CLASSES as FFR_CLASSES
from data_modules.sources.ffr import DEFAULT_SYNTHETIC as FFR_SYNTHETIC
from data_modules.sources.ffr import SYNTHETIC_SPLIT as FFR_SYNTHETIC_SPLIT
from data_modules.sources.ffr import ffr_source
from data_modules.sources.fluent import STYLES as FLUENT_STYLES
from data_modules.sources.fluent import fluent_source
from data_modules.sources.instructions import TASKS as INSTRUCTION_TASKS
from data_modules.sources.instructions import TEMPLATES as INSTRUCTION_TEMPLATES
from data_modules.sources.instructions import instructions_source, parse_tasks
from data_modules.sources.provision import GENERATORS as PROVISION_GENERATORS
from data_modules.sources.provision import MULTI_IMAGE_GENERATORS as PROVISION_MULTI_IMAGE_GENERATORS
from data_modules.sources.provision import provision_source
from data_modules.sources.local import csv_source, folder_source, jsonl_source
from data_modules.sources.moving import DIRECTIONS as MOVING_DIRECTIONS
from data_modules.sources.moving import SOURCES as MOVING_SOURCES
from data_modules.sources.moving import moving_source
from data_modules.sources.openclipart import DEFAULT_ROOT as OPENCLIPART_ROOT
from data_modules.sources.openclipart import openclipart_source
from data_modules.sources.openmoji import DEFAULT_SIZE as OPENMOJI_SIZE
from data_modules.sources.openmoji import openmoji_source
from data_modules.sources.scenes import HELDOUT_SPLIT as SCENES_HELDOUT_SPLIT
from data_modules.sources.scenes import scenes_source
from data_modules.sources.shots import few_shot_source
from data_modules.sources.tuxpaint import DEFAULT_SVG_SIZE as TUXPAINT_SVG_SIZE
from data_modules.sources.tuxpaint import tuxpaint_source
from data_modules.sources.videos import videos_source
from data_modules.sources.youku_mplug import youku_mplug_source
from data_modules.sources.wordnet import wordnet_source
from data_modules.sources.words import DEFAULT_FONTS_DIR, DEFAULT_VOCABULARY, HELDOUT_SPLIT, words_source

MANIFEST_FORMAT = 1
BUILDER_VERSION = 1
IMAGE_MEMBERS = ("png", "jpg", "jpeg", "webp")
_SPLIT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_NPM_CACHE = Path(platformdirs.user_cache_dir("vlp-lightning")) / "npm"
_DEBIAN_CACHE = Path(platformdirs.user_cache_dir("vlp-lightning")) / "debian"
_LANGUAGE_HELP = ("CLDR locale of the captions and keywords (de, fr, ja, pt-PT, zh-Hant; npm cldr-annotations-full); "
                  "emoji it does not name keep English, marked \"name_language\": \"en\" (default: English names)")
_TAR_MTIME = 0  # an int: a float mtime makes tarfile add a PAX header to every member


def parse_split(text: str) -> dict[str, float]:
    """`train=0.9,val=0.1` -> {"train": 0.9, "val": 0.1}; names become file names, fractions must sum to 1."""
    fractions: dict[str, float] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        try:
            fraction = float(value)
        except ValueError:
            raise SourceError(f"--split {text!r}: {part!r} is not NAME=FRACTION") from None
        if not _SPLIT_NAME.match(name) or name in fractions or not 0 < fraction <= 1:
            raise SourceError(f"--split {text!r}: {part!r} needs a new lower-case name and a fraction in (0, 1]")
        fractions[name] = fraction
    if abs(sum(fractions.values()) - 1) > 1e-6:
        raise SourceError(f"--split {text!r}: the fractions add up to {sum(fractions.values()):g}, not 1")
    return fractions


def assign_splits(records: list[Record], fractions: dict[str, float], seed: int) -> dict[str, list[Record]]:
    """Deal records into splits: official splits stay, the rest are cut from a (seed, key)-hash ranking.

    Hashing keys instead of shuffling the list makes the result independent of the order the source lists its
    samples in; cutting the ranking (rather than thresholding each hash) gives exactly the requested sizes.
    """

    def rank(record: Record) -> str:
        return hashlib.sha256(f"{seed}:{record.key}".encode()).hexdigest()

    fixed = {record.split for record in records if record.split is not None}
    if fixed & fractions.keys():
        raise SourceError(f"--split may not name {', '.join(sorted(fixed & fractions.keys()))}: the source fixes it")
    free = sorted((record for record in records if record.split is None), key=rank)
    splits: dict[str, list[Record]] = {}
    start, cumulative = 0, 0.0
    for name, fraction in fractions.items():
        cumulative += fraction
        end = round(cumulative * len(free))
        splits[name] = free[start:end]
        start = end
    for record in sorted((record for record in records if record.split is not None), key=rank):
        splits.setdefault(record.split, []).append(record)
    return splits


def encode_png(image: Image.Image, resize: int | None) -> bytes:
    """Decode `image` completely and re-encode it as PNG (grayscale stays L, everything else becomes RGB).

    Transparent pixels are composited onto white: emoji and clip art are drawn on transparency, and dropping the
    alpha channel later would show whatever colour the transparent pixels happen to store (often black).
    """
    image.load()
    if image.mode not in ("L", "RGB"):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if resize is not None and min(image.size) > resize:
        scale = resize / min(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _fingerprint(source: SourceData, fractions: dict[str, float], seed: int, resize: int | None, maxcount: int) -> str:
    digest = hashlib.sha256()
    options = [BUILDER_VERSION, source.name, source.licence, source.classnames, fractions, seed, resize, maxcount]
    options += [source.extra] if source.extra else []  # the fingerprints of sets built before `extra` stay valid
    digest.update(json.dumps(options, sort_keys=True).encode("utf-8"))
    for record in source.records:
        fields = [record.key, record.origin, record.caption, record.label, record.meta, record.split]
        fields += ["alpha_mask"] if record.alpha_mask else []  # fingerprints of sets built before masks stay valid
        digest.update(json.dumps(fields, sort_keys=True).encode("utf-8"))
    for path in source.inputs:
        stat = path.stat() if path.exists() else None
        digest.update(f"{path}\0{stat and stat.st_size}\0{stat and stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _up_to_date_manifest(out_dir: Path, fingerprint: str) -> dict | None:
    """The manifest of `out_dir` when it was built from the same fingerprint and all its shards are there."""
    manifest = read_manifest(out_dir) if out_dir.is_dir() else None
    if manifest is None or manifest.get("build", {}).get("fingerprint") != fingerprint:
        return None
    return manifest if all((out_dir / shard).is_file() for shard in manifest["shards"]) else None


def build_shards(
    source: SourceData,
    out_dir: Path,
    *,
    maxcount: int,
    split_fractions: dict[str, float],
    seed: int,
    resize: int | None,
    force: bool,
) -> dict[str, object]:
    """Write `source` as shards plus manifest.json into `out_dir` and return the manifest (see module docstring)."""
    out_dir = out_dir.resolve()
    splits = assign_splits(unique_keys(source.records), split_fractions, seed)
    fingerprint = _fingerprint(source, split_fractions, seed, resize, maxcount)
    manifest = None if force else _up_to_date_manifest(out_dir, fingerprint)
    if manifest is not None:
        print(f"{out_dir} is up to date ({sum(manifest['splits'].values())} samples); --force rebuilds it")
        return manifest
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir()) and read_manifest(out_dir) is None):
        raise SourceError(f"{out_dir} exists and is not a vlp-data shard set; choose a new or empty folder")
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        shards, members, skipped = _write_splits(splits, staging, maxcount, resize, progress_name=out_dir.name)
        if not shards:
            raise SourceError(f"none of the {len(source.records)} samples could be written (all failed to decode)")
        for name, data in source.files.items():
            (staging / name).write_bytes(data)
        split_counts: Counter[str] = Counter()
        for shard in shards.values():
            split_counts[shard["split"]] += shard["count"]
        manifest = {
            "format": MANIFEST_FORMAT,
            "source": source.name,
            "licence": source.licence,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seed": seed,
            "shards": shards,
            "splits": dict(sorted(split_counts.items())),
            "members": sorted(members),
            "classnames": source.classnames,
            "files": sorted(source.files),
            "skipped": skipped,
            "build": {"fingerprint": fingerprint, "maxcount": maxcount, "split": split_fractions, "resize": resize},
        }
        clash = sorted(set(source.extra) & set(manifest))
        if clash:
            raise SourceError(f"the source's manifest entry {clash[0]!r} would replace the builder's own; rename it")
        manifest.update(source.extra)
        write_manifest(staging, manifest)
        _replace_shards(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _print_summary(out_dir, manifest, splits)
    return manifest


def unique_keys(records: list[Record]) -> list[Record]:
    """Give records whose keys collide a short hash of their origin as a suffix.

    Keys are made from file names, and names that differ only in characters a key cannot hold (openclipart has
    `viewmag+.png` next to `viewmag.png`) would otherwise overwrite each other; every other key stays readable.
    """
    counts = Counter(record.key for record in records)
    unique = [
        replace(record, key=f"{record.key}_{hashlib.sha1(record.origin.encode('utf-8')).hexdigest()[:8]}")
        if counts[record.key] > 1
        else record
        for record in records
    ]
    duplicates = [key for key, count in Counter(record.key for record in unique).items() if count > 1]
    if duplicates:
        raise SourceError(f"several samples have the key {duplicates[0]!r} and the same origin")
    return unique


def _write_splits(
    splits: dict[str, list[Record]], staging: Path, maxcount: int, resize: int | None, progress_name: str
) -> tuple[dict[str, dict], set[str], dict[str, str]]:
    """Write every split's records in order; returns {shard: {split, count, keys}}, the members, skipped keys."""
    shards: dict[str, dict] = {}
    members: set[str] = set()
    skipped: dict[str, str] = {}
    for split, records in sorted(splits.items()):
        writer = None
        for record in tqdm(records, desc=f"{progress_name}/{split}", unit="img", disable=None):
            try:
                sample = _sample(record, resize)
            except IMAGE_ERRORS as error:
                skipped[record.key] = f"{record.origin}: {type(error).__name__}: {error}"
                continue
            if writer is None:
                writer = webdataset.ShardWriter(
                    str(staging / f"{split}-%06d.tar"),
                    maxcount=maxcount,
                    maxsize=float("inf"),
                    verbose=0,
                    encoder=False,
                    mtime=_TAR_MTIME,
                    user="vlp",
                    group="vlp",
                )
            writer.write(sample)
            shard = shards.setdefault(Path(writer.fname).name, {"split": split, "count": 0, "keys": []})
            shard["count"] += 1
            shard["keys"].append(record.key)
            members.update(name for name in sample if name != "__key__")
        if writer is not None:
            writer.close()
    return shards, members, skipped


def _sample(record: Record, resize: int | None) -> dict[str, str | bytes]:
    """The members of `record` (raising one of IMAGE_ERRORS when its image does not decode)."""
    if record.members is not None:
        return {"__key__": record.key, **record.members()}
    with record.open_image() as image:
        png = encode_png(image, resize)
        if record.alpha_mask:
            with Image.open(io.BytesIO(png)) as written:
                mask = encode_alpha_mask(image, written.size)
    sample: dict[str, str | bytes] = {"__key__": record.key, "png": png}
    if record.alpha_mask:
        sample[MASK_MEMBER] = mask
    if record.caption is not None:
        sample["txt"] = record.caption.encode("utf-8")
    if record.label is not None:
        sample["cls"] = str(record.label).encode("ascii")
    if record.meta is not None:
        sample["json"] = json.dumps(record.meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return sample


def _replace_shards(staging: Path, out_dir: Path) -> None:
    """Move the finished shards and manifest in; of the old set only the files its manifest lists are removed.

    The old manifest goes first and the new one comes last, so a reader finds either no manifest or one whose
    shards are all in place."""
    old = (read_manifest(out_dir) or {}) if out_dir.is_dir() else {}
    previous = set(old.get("shards", {})) | set(old.get("files", []))
    shards = sorted(path.name for path in staging.iterdir() if path.name != MANIFEST_NAME)
    foreign = [name for name in shards if (out_dir / name).exists() and name not in previous]
    if foreign:
        raise SourceError(f"{out_dir / foreign[0]} was not written by vlp-data (its manifest does not list it); move "
                          "it away or choose another output folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for name in sorted(previous - set(shards)):
        (out_dir / name).unlink(missing_ok=True)
    for name in shards:
        os.replace(staging / name, out_dir / name)
    os.replace(staging / MANIFEST_NAME, out_dir / MANIFEST_NAME)


def _print_summary(out_dir: Path, manifest: dict, splits: dict[str, list[Record]]) -> None:
    per_split = ", ".join(
        f"{name} {count} ({sum(s['split'] == name for s in manifest['shards'].values())} shards)"
        for name, count in manifest["splits"].items()
    )
    print(f"wrote {sum(manifest['splits'].values())} samples to {out_dir}: {per_split}")
    for name in sorted(set(splits) - set(manifest["splits"])):
        print(f"warning: split {name!r} got no samples", file=sys.stderr)
    skipped = manifest["skipped"]
    if skipped:
        print(f"skipped {len(skipped)} images that failed to decode:", file=sys.stderr)
        for key, reason in list(skipped.items())[:10]:
            print(f"  {key}: {reason}", file=sys.stderr)
        if len(skipped) > 10:
            print(f"  ... and {len(skipped) - 10} more, all listed under 'skipped' in manifest.json", file=sys.stderr)


def iterate_shard(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {member: bytes}) for each sample of a tar shard, grouped the way WebDataset groups members."""
    key, sample = None, {}
    with tarfile.open(shard) as archive:
        for member in archive:
            member_key, extension = webdataset.tariterators.base_plus_ext(member.name)
            if (
                not member.isfile()
                or member_key is None
                or member.name.startswith("/")
                or ".." in member.name.split("/")
            ):
                raise SourceError(f"{shard} has a member that is not a sample file: {member.name!r}")
            if member_key != key and sample:
                yield key, sample
                sample = {}
            key = member_key
            sample[extension.lower()] = archive.extractfile(member).read()
    if sample:
        yield key, sample


def _check_sample(sample: dict[str, bytes]) -> str:
    """A one-line description of the sample ("64x64 RGB", "16 frames 64x64 at 8 fps"), raising ValueError for
    anything unreadable."""
    if any(name in sample for name in CLIP_MEMBERS):
        if "txt" in sample:
            sample["txt"].decode("utf-8")
        if "cls" in sample:
            int(sample["cls"])
        return describe_clip(sample)
    image_members = [name for name in IMAGE_MEMBERS if name in sample]
    if not image_members:
        raise ValueError("no image member")
    try:
        with Image.open(io.BytesIO(sample[image_members[0]])) as image:
            image.load()
            width, height = image.size
            description = f"{width}x{height} {image.mode}"
    except IMAGE_ERRORS as error:
        raise ValueError(f"{image_members[0]} does not decode: {error}") from error
    if "txt" in sample:
        sample["txt"].decode("utf-8")
    if "cls" in sample:
        int(sample["cls"])
    if "json" in sample:
        json.loads(sample["json"])
    if MASK_MEMBER in sample:
        mask = decode_mask(sample[MASK_MEMBER])
        if mask.shape != (height, width):
            raise ValueError(f"its mask is {mask.shape[1]}x{mask.shape[0]}, not the image's {description.split()[0]}")
    if INSTANCES_MEMBER in sample:
        decode_instances(json.loads(sample.get("json", b"{}")), sample[INSTANCES_MEMBER], width, height)
    return description


def inspect_shards(out_dir: Path, show: int) -> int:
    """Print what a shard set holds and check every sample; returns the number of problems found."""
    manifest = read_manifest(out_dir) or {}
    shard_names = sorted(manifest.get("shards", {})) or sorted(path.name for path in out_dir.glob("*.tar"))
    if not shard_names:
        raise SourceError(f"{out_dir} has no manifest.json and no .tar shards")
    classnames = manifest.get("classnames", {}).get("cls", [])
    print(f"shard set {out_dir}")
    for field in ("source", "licence", "created"):
        if field in manifest:
            print(f"  {field}: {manifest[field]}")
    problems: list[str] = []
    members: Counter[str] = Counter()
    split_counts: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    print(f"  {'shard':<24} {'split':<8} {'samples':>8} {'manifest':>9}")
    for name in shard_names:
        expected = manifest.get("shards", {}).get(name)
        split = expected["split"] if expected else name.rpartition("-")[0]
        found_keys = []
        try:
            for key, sample in iterate_shard(out_dir / name):
                found_keys.append(key)
                members.update(sample.keys())
                try:
                    description = _check_sample(sample)
                except ValueError as error:
                    problems.append(f"{name} {key}: {error}")
                    continue
                if len(examples.setdefault(split, [])) < show:
                    examples[split].append(_describe_example(key, sample, description, classnames))
        except (OSError, tarfile.TarError, SourceError) as error:
            problems.append(f"{name}: cannot be read ({error})")
        split_counts[split] += len(found_keys)
        print(f"  {name:<24} {split:<8} {len(found_keys):>8} {expected['count'] if expected else '-':>9}")
        if expected and found_keys != expected.get("keys", found_keys):
            problems.append(f"{name}: its {len(found_keys)} keys differ from the {expected['count']} in manifest.json")
        elif expected and len(found_keys) != expected["count"]:
            problems.append(f"{name}: holds {len(found_keys)} samples, but manifest.json lists {expected['count']}")
    print("  splits: " + ", ".join(f"{split} {count}" for split, count in sorted(split_counts.items())))
    print("  members: " + ", ".join(f"{member} {count}" for member, count in sorted(members.items())))
    for split, lines in sorted(examples.items()):
        print(f"  examples from {split}:")
        for line in lines:
            print(f"    {line}")
    if manifest.get("skipped"):
        print(f"  skipped while building: {len(manifest['skipped'])} (listed under 'skipped' in manifest.json)")
    print(f"  bad samples: {len(problems)}" + "".join(f"\n    {problem}" for problem in problems))
    return len(problems)


def _describe_example(key: str, sample: dict[str, bytes], description: str, classnames: list[str]) -> str:
    parts = [key, description]
    if "cls" in sample:
        label = int(sample["cls"])
        parts.append(f"cls {label}" + (f" ({classnames[label]})" if 0 <= label < len(classnames) else ""))
    if "txt" in sample:
        caption = sample["txt"].decode("utf-8").replace("\n", " | ")
        parts.append(repr(caption if len(caption) <= 80 else caption[:77] + "..."))
    scene = _describe_scene(json.loads(sample["json"])) if INSTANCES_MEMBER in sample else ""
    clip = any(name in sample for name in CLIP_MEMBERS) and "json" in sample
    timeline = _describe_timeline(json.loads(sample["json"])) if clip else ""
    return "  ".join(parts) + scene + timeline


def _describe_timeline(meta: dict) -> str:
    """A clip's timeline segments (checked by `describe_clip`), one line each."""
    segments = meta.get("timeline", [])
    lines = [f"segment {index}: {item['start']:g}-{item['end']:g} s: {item['text']}" for index, item in
             enumerate(segments[:8])]
    lines += [f"(+{len(segments) - 8} more segments)"] if len(segments) > 8 else []
    return "".join(f"\n        {line}" for line in lines) or "\n        no timeline segments"


def _describe_scene(meta: dict) -> str:
    """The objects (name and box), relations and long caption of a scene sample, on lines of their own."""
    objects = meta["objects"]
    lines = [f"{index}: {item['name']} {item['box']}" for index, item in enumerate(objects)]
    relations = [f"{subject} {predicate} {other}" for subject, predicate, other in meta.get("relations", [])[:8]]
    more = len(meta.get("relations", [])) - len(relations)
    lines.append("relations: " + ("; ".join(relations) or "none") + (f" (+{more} more)" if more > 0 else ""))
    if meta.get("long_caption"):
        lines.append(f"long caption: {meta['long_caption']}")
    lines += [f"region {index}: {region}" for index, region in enumerate(meta.get("regions", [])[:3])]
    return "".join(f"\n        {line}" for line in lines)


def _names(text: str) -> tuple[str, ...]:
    """`a, b,` -> ("a", "b")."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _build_command(
    commands: argparse._SubParsersAction,
    name: str,
    summary: str,
    input_help: str | None = None,
    resize: int | None = None,
    splits: bool = True,
    resizable: bool = True,
    seed_help: str = "seed of the split assignment",
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """A build sub-command: its input (when it takes one), OUT, and the options every build shares (`--split`
    only where the source does not keep the splits of its input: `splits`; `--resize` only where the source does
    not draw its images at a size of its own, nor copies them: `resizable`)."""
    layout = {"epilog": epilog, "formatter_class": argparse.RawDescriptionHelpFormatter} if epilog else {}
    command = commands.add_parser(name, help=summary, description=summary, **layout)
    if input_help is not None:
        metavar = {"folder": "SRC", "shots": "SHARDS", "wordnet": "SHARDS", "instructions": "SHARDS",
                   "provision": "SHARDS"}.get(name, "FILE")
        command.add_argument("input", type=Path, metavar=metavar, help=input_help)
    command.add_argument("out", type=Path, metavar="OUT", help="output folder for the shards and manifest.json")
    command.add_argument(
        "--maxcount", type=_positive_int, default=1000, help="samples per shard (default: %(default)s)"
    )
    if splits:
        command.add_argument(
            "--split", default="train=1", help="fractions per split, e.g. train=0.9,val=0.1 (default: %(default)s)"
        )
    else:
        command.set_defaults(split=None)
    command.add_argument("--seed", type=int, default=0, help=f"{seed_help} (default: %(default)s)")
    if resizable:
        command.add_argument(
            "--resize",
            type=_positive_int,
            default=resize,
            metavar="N",
            help=f"scale images down so the shorter side is at most N (default: {resize or 'keep their size'})",
        )
    else:
        command.set_defaults(resize=None)
    command.add_argument("--force", action="store_true", help="rebuild even when OUT is up to date")
    return command


def make_parser() -> argparse.ArgumentParser:
    """The `vlp-data` command line: one sub-command per source, plus `inspect`."""
    parser = argparse.ArgumentParser(
        prog="vlp-data",
        description="Build WebDataset shards (png + txt caption + cls label + json) with a manifest for vlp_lightning.",
        epilog=(
            "examples:\n"
            "  vlp-data folder photos/ shards/ --split train=0.9,val=0.1\n"
            "  vlp-data csv captions.csv shards/ --image-col filepath --caption-col title\n"
            "  vlp-data emoji shards/emoji-twitter --style twitter\n"
            "  vlp-data emoji-contrasts shards/emoji-contrasts\n"
            "  vlp-data openmoji shards/openmoji --size 72\n"
            "  vlp-data tuxpaint shards/tuxpaint --language de\n"
            "  vlp-data words shards/words --split train=0.9,val=0.1\n"
            "  vlp-data scenes shards/scenes --count 5000 --max-objects 6\n"
            "  vlp-data ffr shards/ffr --bias 0.95\n"
            "  vlp-data babyai shards/babyai --episodes 200\n"
            "  vlp-data shots 'shards/emoji/train-*.tar' shards/emoji-16shot --shots 16 --seed 1\n"
            "  vlp-data wordnet 'shards/emoji/*.tar' shards/emoji-wordnet\n"
            "  vlp-data provision 'shards/scenes/*.tar' shards/scenes-provision --questions 3\n"
            "  vlp-data instructions 'shards/emoji/*.tar' shards/emoji-instructions --seed 0\n"
            "  vlp-data moving shards/moving --images 'shards/emoji/train-*.tar' --count 2000\n"
            "  vlp-data videos shards/videos --csv clips.csv\n"
            "  vlp-data inspect shards/\n"
            "then train on them:\n"
            "  vlp fit --config experiments/clip/emoji_tiny.yaml \\\n"
            "    --data.train_shards 'shards/train-{000000..000003}.tar' --data.val_shards shards/val-000000.tar\n"
            "`vlp-data COMMAND --help` lists the options of a command."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    folder = _build_command(
        commands, "folder", "images with same-name .txt captions and/or class subfolders", "folder of images"
    )
    folder.add_argument(
        "--caption-template",
        default=None,
        help='caption from the class folder for images without .txt, e.g. "a photo of a {}."',
    )
    folder.add_argument("--licence", default="unknown", help="licence recorded in the manifest (default: %(default)s)")
    folder.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="read images and captions that are symbolic links (default: skip and list them)",
    )
    folder.set_defaults(
        make_source=lambda a: folder_source(a.input, a.caption_template, a.licence, a.follow_symlinks)
    )

    for kind, column, make in (("csv", "col", csv_source), ("jsonl", "field", jsonl_source)):
        table = _build_command(
            commands, kind, f"a {kind.upper()} table of image paths, captions and labels", f"{kind.upper()} file"
        )
        table.add_argument(
            f"--image-{column}",
            dest="image_name",
            default="image",
            metavar="NAME",
            help="image path (default: %(default)s)",
        )
        table.add_argument(
            f"--caption-{column}",
            dest="caption_name",
            default="caption",
            metavar="NAME",
            help="caption (default: %(default)s)",
        )
        table.add_argument(
            f"--label-{column}",
            dest="label_name",
            default=None,
            metavar="NAME",
            help="class label, integers or names (default: no labels)",
        )
        table.add_argument(
            "--image-root",
            type=Path,
            default=None,
            metavar="DIR",
            help="folder the image paths are relative to (default: the file's folder)",
        )
        table.add_argument(
            "--licence", default="unknown", help="licence recorded in the manifest (default: %(default)s)"
        )
        table.add_argument(
            "--allow-outside-root",
            action="store_true",
            help="accept image paths outside the image root (../x, absolute paths; default: refuse them)",
        )
        table.set_defaults(
            make_source=lambda a, make=make: make(
                a.input, a.image_name, a.caption_name, a.label_name, a.image_root, a.licence, a.allow_outside_root
            )
        )

    emoji = _build_command(
        commands, "emoji", f"emoji images and names from npm emoji-datasource-<style>@{EMOJI_VERSION}"
    )
    emoji.add_argument(
        "--style",
        choices=STYLES,
        default="twitter",
        help="drawing style; twitter is CC-BY 4.0, google Apache-2.0 (default: %(default)s)",
    )
    emoji.add_argument(
        "--package-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="an unpacked emoji-datasource-<style> package instead of fetching one",
    )
    emoji.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(platformdirs.user_cache_dir("vlp-lightning")) / "npm",
        metavar="DIR",
        help="where fetched packages are kept (default: %(default)s)",
    )
    emoji.add_argument("--language", default=None, metavar="CODE", help=_LANGUAGE_HELP)
    emoji.set_defaults(make_source=lambda a: emoji_source(a.style, a.package_dir, a.cache_dir, a.language))

    contrasts = _build_command(
        commands, "emoji-contrasts",
        "minimal emoji contrasts for MMVP-style CLIP-blind pairs: the five skin tones of each emoji that has them and "
        "the two drawing styles of one code point where their colours differ, each with a text naming its side",
        splits=False, resizable=False,
    )
    contrasts.add_argument("--styles", default="google,twitter",
                           help="the two drawing styles to contrast (default: %(default)s)")
    contrasts.add_argument("--tone-style", choices=STYLES, default="google",
                           help="the style of the skin-tone variants (default: %(default)s)")
    contrasts.add_argument(
        "--cache-dir", type=Path, default=Path(platformdirs.user_cache_dir("vlp-lightning")) / "npm",
        metavar="DIR", help="where the emoji packages are kept (default: %(default)s)",
    )
    contrasts.set_defaults(make_source=lambda a: emoji_contrasts_source(
        tuple(a.styles.split(",")), a.tone_style, a.cache_dir))

    openmoji = _build_command(
        commands, "openmoji", "OpenMoji's 4,495 SVG emoji (CC-BY-SA 4.0) rendered with their annotations, tags and "
        "groups, alpha as .mask.png", resizable=False,
        epilog="example:\n  vlp-data openmoji data/openmoji --split train=0.9,val=0.1 --size 72\n"
        "  vlp-data openmoji data/openmoji-de --language de",
    )
    openmoji.add_argument("--size", type=_positive_int, default=OPENMOJI_SIZE,
                          help="side of the rendered images in pixels (default: %(default)s, OpenMoji's PNG export)")
    openmoji.add_argument("--language", default=None, metavar="CODE", help=_LANGUAGE_HELP)
    openmoji.add_argument("--cache-dir", type=Path, default=_NPM_CACHE, metavar="DIR",
                          help="where fetched packages are kept (default: %(default)s)")
    openmoji.set_defaults(make_source=lambda a: openmoji_source(a.size, a.language, a.cache_dir))

    fluent = _build_command(
        commands, "fluent", "Microsoft's Fluent UI emoji (MIT, npm fluentui-emoji) rendered from SVG, groups matched "
        "in OpenMoji's metadata, alpha as .mask.png", resizable=False,
        epilog="example:\n  vlp-data fluent data/fluent-flat --style flat --split train=0.9,val=0.1",
    )
    fluent.add_argument("--style", choices=tuple(FLUENT_STYLES), default="color",
                        help="drawing style (default: %(default)s; the package has no 3D PNGs)")
    fluent.add_argument("--size", type=_positive_int, default=OPENMOJI_SIZE,
                        help="side of the rendered images in pixels (default: %(default)s)")
    fluent.add_argument("--language", default=None, metavar="CODE", help=_LANGUAGE_HELP)
    fluent.add_argument("--cache-dir", type=Path, default=_NPM_CACHE, metavar="DIR",
                        help="where fetched packages are kept (default: %(default)s)")
    fluent.set_defaults(make_source=lambda a: fluent_source(a.style, a.size, a.language, a.cache_dir))

    tuxpaint = _build_command(
        commands, "tuxpaint", "Tux Paint's ~960 stamps (GPL-2.0-or-later, Debian tuxpaint-stamps-default) with their "
        "descriptions, category labels and alpha as .mask.png", resize=512,
        epilog="example:\n  vlp-data tuxpaint data/tuxpaint --split train=0.9,val=0.1\n"
        "  vlp-data tuxpaint data/tuxpaint-fr --language fr",
    )
    tuxpaint.add_argument("--language", default="en", metavar="CODE",
                          help="locale of the descriptions as the stamps' .txt files name them (de, pt_BR, "
                          "ca@valencia); English where a stamp has none (default: %(default)s)")
    tuxpaint.add_argument("--svg-size", type=_positive_int, default=TUXPAINT_SVG_SIZE, metavar="N",
                          help="longer side of the stamps drawn only as SVG (default: %(default)s)")
    tuxpaint.add_argument("--stamps-dir", type=Path, default=None, metavar="DIR",
                          help="a stamps folder (e.g. an installed /usr/share/tuxpaint/stamps) instead of fetching")
    tuxpaint.add_argument("--cache-dir", type=Path, default=_DEBIAN_CACHE, metavar="DIR",
                          help="where the fetched package is kept (default: %(default)s)")
    tuxpaint.set_defaults(make_source=lambda a: tuxpaint_source(a.language, a.svg_size, a.stamps_dir, a.cache_dir))

    fashion = _build_command(commands, "fashion-mnist", "Fashion-MNIST from the Debian package dataset-fashion-mnist")
    fashion.add_argument(
        "--root",
        type=Path,
        default=FASHION_MNIST_ROOT,
        metavar="DIR",
        help="folder with the IDX files (default: %(default)s)",
    )
    fashion.add_argument(
        "--caption-template", default="a photo of a {}.", help="caption made from the class name (default: %(default)s)"
    )
    fashion.set_defaults(make_source=lambda a: fashion_mnist_source(a.root, a.caption_template))

    clipart = _build_command(
        commands, "openclipart", "clip art with titles and keywords from Debian openclipart-png / -svg", resize=512
    )
    clipart.add_argument(
        "--root",
        type=Path,
        default=OPENCLIPART_ROOT,
        metavar="DIR",
        help="folder holding png/ and svg/ (default: %(default)s)",
    )
    clipart.set_defaults(make_source=lambda a: openclipart_source(a.root))

    words = _build_command(
        commands, "words",
        f"words (and pages) rendered in the machine's fonts, for text recognition; the --heldout-font fonts only in "
        f"the split {HELDOUT_SPLIT}",
    )
    words.add_argument("--fonts-dir", type=Path, default=DEFAULT_FONTS_DIR, metavar="DIR",
                       help="folder of .ttf fonts (default: %(default)s)")
    words.add_argument("--heldout-font", default="DejaVuSerif", metavar="PREFIX",
                       help=f"fonts whose file name starts with this are used only for the split {HELDOUT_SPLIT} "
                       "(default: %(default)s)")
    words.add_argument("--count", type=_positive_int, default=3000,
                       help="words in the other fonts, divided by --split (default: %(default)s)")
    words.add_argument("--heldout-count", type=_positive_int, default=500,
                       help=f"words in the held-out fonts, all in {HELDOUT_SPLIT} (default: %(default)s)")
    words.add_argument("--pages", type=int, default=0,
                       help="pages of 2-4 lines of words, in proportion in both font groups (default: %(default)s)")
    words.add_argument("--size", type=int, default=64, help="side of a word image in pixels (default: %(default)s)")
    words.add_argument("--vocabulary", type=Path, default=DEFAULT_VOCABULARY, metavar="FILE",
                       help="one word per line (default: the built-in list of 799 English words)")
    words.set_defaults(
        split="train=0.9,val=0.1",
        make_source=lambda a: words_source(
            a.fonts_dir, a.heldout_font, a.count, a.heldout_count, a.pages, a.size, a.vocabulary, a.seed
        ),
    )

    scenes = _build_command(
        commands, "scenes",
        "scenes of 1-K emoji / stamp cut-outs on real backgrounds with exact boxes, instance masks, attributes, "
        f"relations and captions; --heldout-concepts of the concepts only in the split {SCENES_HELDOUT_SPLIT}",
        resizable=False,
    )
    scenes.add_argument("--count", type=_positive_int, default=5000,
                        help="scenes of the concepts not held out, divided by --split (default: %(default)s)")
    scenes.add_argument("--heldout-count", type=_positive_int, default=500,
                        help=f"scenes of the held-out concepts, all in {SCENES_HELDOUT_SPLIT} (default: %(default)s)")
    scenes.add_argument("--heldout-concepts", type=float, default=0.1, metavar="FRACTION",
                        help="fraction of the concepts held out, chosen by a stable hash of the name "
                        "(default: %(default)s)")
    scenes.add_argument("--max-objects", type=_positive_int, default=6, metavar="K",
                        help="objects per scene at most (default: %(default)s)")
    scenes.add_argument("--size", type=_positive_int, default=256, help="image side in pixels (default: %(default)s)")
    scenes.add_argument("--styles", default="twitter,google",
                        help="cut-out sources, comma-separated: emoji PNG styles (twitter, google), SVG emoji "
                             "(openmoji, fluent-color, fluent-flat, fluent-high-contrast) and tuxpaint (photographs "
                             "and drawings), each fetched once like its own vlp-data command (default: %(default)s)")
    scenes.add_argument("--backgrounds", default="skimage", metavar="KINDS",
                        help="skimage (scikit-image's sample photos and textures: the `scenes` extra, left out when "
                        "it is missing), openclipart (its tileable patterns: apt-get install openclipart-png), both "
                        "joined by a comma, or plain (plain colours and gradients) (default: %(default)s)")
    scenes.add_argument(
        "--cache-dir", type=Path, default=Path(platformdirs.user_cache_dir("vlp-lightning")) / "npm",
        metavar="DIR", help="where the emoji packages are kept (default: %(default)s)",
    )
    scenes.add_argument("--openclipart-root", type=Path, default=OPENCLIPART_ROOT, metavar="DIR",
                        help="openclipart's folder, for --backgrounds openclipart (default: %(default)s)")
    scenes.set_defaults(split="train=0.9,val=0.1", make_source=lambda a: scenes_source(
        a.count, a.heldout_count, a.heldout_concepts, a.max_objects, a.size, tuple(a.styles.split(",")),
        a.backgrounds, a.cache_dir, a.seed, a.openclipart_root,
    ))

    ffr = _build_command(
        commands, "ffr",
        "a spurious-correlation benchmark: Tux Paint photographs of --classes pasted on --backgrounds, each class on "
        "its own kind in --bias of train and balanced over (class, background) groups in val / test, plus the same "
        f"classes as emoji, balanced over the groups, in the split {FFR_SYNTHETIC_SPLIT} (FFR's synthetic data)",
        splits=False, resizable=False, seed_help="seed of every sample's cut-out, background square and placement",
        epilog=(
            "Each sample: <key>.png, <key>.cls (the class) and <key>.json (class, background, group, group_name,\n"
            "domain, majority, cutout); the manifest's classnames name the classes, groups and backgrounds.\n"
            "example:\n"
            "  vlp-data ffr data/ffr --bias 0.95 --size 64\n"
            "then pretrain on the synthetic split and fine-tune on the real one: experiments/ffr/"
        ),
    )
    ffr.add_argument("--classes", default=FFR_CLASSES, metavar="SPEC",
                     help="NAME=FOLDER[+FOLDER],... Tux Paint stamp folders per class (default: %(default)s)")
    ffr.add_argument("--synthetic", default=FFR_SYNTHETIC, metavar="SPEC",
                     help="NAME=SUBCATEGORY[+...],... emoji subcategories per class, same names and order "
                     "(default: %(default)s)")
    ffr.add_argument("--backgrounds", default=FFR_BACKGROUNDS, metavar="LIST",
                     help="background kinds (scikit-image sample images); class c is biased toward the c-th "
                     "(default: %(default)s)")
    ffr.add_argument("--bias", type=float, default=0.95,
                     help="share of a class's train samples on its own background kind (default: %(default)s)")
    ffr.add_argument("--train-count", type=_positive_int, default=2000, metavar="N",
                     help="real training samples, split evenly over the classes (default: %(default)s)")
    ffr.add_argument("--eval-count", type=_positive_int, default=100, metavar="N",
                     help="real samples per group in val and in test (default: %(default)s)")
    ffr.add_argument("--synthetic-count", type=_positive_int, default=2000, metavar="N",
                     help="synthetic samples, split evenly over the groups (default: %(default)s)")
    ffr.add_argument("--size", type=_positive_int, default=64, help="image side in pixels (default: %(default)s)")
    ffr.add_argument("--styles", default="twitter,google",
                     help="emoji styles of the synthetic cut-outs (default: %(default)s)")
    ffr.add_argument("--stamps-dir", type=Path, default=None, metavar="DIR",
                     help="a Tux Paint stamps folder instead of fetching tuxpaint-stamps-default")
    ffr.add_argument("--deb-cache", type=Path, default=_DEBIAN_CACHE, metavar="DIR",
                     help="where the fetched Debian package is kept (default: %(default)s)")
    ffr.add_argument("--npm-cache", type=Path, default=_NPM_CACHE, metavar="DIR",
                     help="where the emoji packages are kept (default: %(default)s)")
    ffr.set_defaults(make_source=lambda a: ffr_source(
        a.classes, a.synthetic, a.backgrounds, a.bias, a.train_count, a.eval_count, a.synthetic_count, a.size,
        _names(a.styles), a.stamps_dir, a.deb_cache, a.npm_cache, a.seed))

    babyai = _build_command(
        commands, "babyai",
        "BabyAI episodes (PyPI minigrid, the sim extra) solved by its expert bot, one clip per episode: frames, the "
        f"mission as .txt, the bot's sub-goals as a timeline, actions; --heldout-levels only in the split "
        f"{BABYAI_HELDOUT_SPLIT}", resizable=False, seed_help="seed of the episodes' layouts and of the split",
        epilog=(
            "Each sample: <key>.frames.npy (uint8 [T, H, W, 3], numpy.save, no pickle; the first observation and the\n"
            "state after every action), <key>.txt (the mission), <key>.cls (the level's index in the manifest's\n"
            "classnames) and <key>.json: fps (frame i at i / fps), timeline [{start, end, text}] (the sub-goal the\n"
            "bot acted for, e.g. \"go next to the red ball\", \"pick up the blue key\", \"open the yellow door\";\n"
            "equal consecutive ones merged; a segment covers the frames with start <= i / fps < end), actions,\n"
            "level, seed, mission. An episode the bot does not solve within --max-steps is a counted skip.\n"
            "example:\n"
            "  pip install -e '.[sim]'\n"
            "  vlp-data babyai data/babyai --episodes 200 --split train=0.9,val=0.1\n"
            "  vlp-data babyai data/babyai-pov --levels GoToObj,PickupLoc --heldout-levels GoToLocal --view agent"
        ),
    )
    babyai.add_argument("--levels", default=",".join(BABYAI_LEVELS), metavar="LIST",
                        help="comma-separated BabyAI levels divided by --split, names without BabyAI- and -v0 "
                        "(default: %(default)s)")
    babyai.add_argument("--heldout-levels", default=",".join(BABYAI_HELDOUT_LEVELS), metavar="LIST",
                        help=f"comma-separated levels whose episodes all go to the split {BABYAI_HELDOUT_SPLIT}, never "
                        "trained on; '' for none (default: %(default)s)")
    babyai.add_argument("--episodes", type=_positive_int, default=100, metavar="N",
                        help="episodes per level (default: %(default)s)")
    babyai.add_argument("--view", choices=VIEWS, default="full",
                        help="the whole grid with the agent's field of view highlighted, or the agent's 7x7 view "
                        "(default: %(default)s)")
    babyai.add_argument("--tile-size", type=_positive_int, default=8, metavar="PX",
                        help="pixels per grid cell (default: %(default)s)")
    babyai.add_argument("--max-side", type=_positive_int, default=96, metavar="PX",
                        help="smaller tiles for levels whose frames would be larger than this (default: %(default)s)")
    babyai.add_argument("--max-steps", type=_positive_int, default=128, metavar="N",
                        help="actions an episode may take; longer ones are skipped (default: %(default)s)")
    babyai.add_argument("--silent-fraction", type=float, default=0.0, metavar="F",
                        help="share of the trained levels' episodes written silent: no .txt, \"silent\": true in the "
                        ".json (OphCLIP retrieves narrations for them; default: %(default)s)")
    babyai.set_defaults(split="train=0.9,val=0.1", make_source=lambda a: babyai_source(
        _names(a.levels), _names(a.heldout_levels), a.episodes, a.tile_size, a.max_side, a.view, a.max_steps, a.seed,
        a.silent_fraction))

    shots = _build_command(
        commands, "shots",
        "K samples per class of existing shards, drawn with --seed (few-shot adaptation: 1, 2, 4, 8, 16 shots)",
        "shard pattern to draw from, e.g. 'data/emoji/train-{000000..000001}.tar'",
    )
    amount = shots.add_mutually_exclusive_group(required=True)
    amount.add_argument("--shots", type=_positive_int, metavar="K", help="samples per class")
    amount.add_argument("--fraction", type=float, metavar="F",
                        help="instead of K: this fraction of every class (the data-scaling study's 1/8, 1/4, ...)")
    shots.add_argument(
        "--label-field", default="cls", metavar="FIELD",
        help="the label: cls (the .cls member) or an integer field of the .json member, e.g. subcategory_id "
        "(default: %(default)s)",
    )
    shots.set_defaults(
        make_source=lambda a: few_shot_source(str(a.input), a.shots, a.seed, a.label_field, a.fraction)
    )

    linked = _build_command(
        commands, "wordnet",
        "existing shards with their captions linked to WordNet nouns (.json entities) and knowledge.json (the "
        "entities, their relations and TransE embeddings; ARL's knowledge)",
        "shard pattern to link, e.g. 'data/emoji/*.tar' (its splits are kept)", splits=False,
    )
    linked.add_argument(
        "--wordnet-dir", type=Path, default=None, metavar="DIR",
        help="a folder of WordNet WNdb files (index.noun, data.noun, noun.exc) instead of fetching Debian wordnet-base",
    )
    linked.add_argument(
        "--cache-dir", type=Path, default=Path(platformdirs.user_cache_dir("vlp-lightning")) / "debian",
        metavar="DIR", help="where the fetched package is kept (default: %(default)s)",
    )
    linked.add_argument("--dim", type=_positive_int, default=256, help="TransE dimension (default: %(default)s)")
    linked.add_argument("--transe-epochs", type=_positive_int, default=50,
                        help="TransE epochs of 100 batches (default: %(default)s; the official run: 1000)")
    linked.set_defaults(make_source=lambda a: wordnet_source(
        str(a.input), a.wordnet_dir, a.cache_dir, a.dim, a.transe_epochs, a.seed))

    instructions = _build_command(
        commands, "instructions",
        "labelled or captioned shards as visual instructions: one Vision-Flan-style conversation per sample",
        "shard pattern to turn into instructions, e.g. 'data/emoji/*.tar' (its splits are kept)", splits=False,
        resizable=False, seed_help="seed of every draw: task, template, options and yes / no question per sample",
        epilog=(
            "Each sample's .json gains \"conversations\" (user: <image> + an instruction, assistant: the answer),\n"
            "\"task\" and, for multiple_choice, \"options\" and \"answer\" (grounding: \"box\"); images, keys,\n"
            "splits and members are kept.\n"
            "tasks (each with 4 instruction templates of ours, one drawn per sample with --seed):\n"
            + "".join(f"  {task:<16} e.g. {INSTRUCTION_TEMPLATES[task][0].replace(chr(10), ' / ')!r}\n"
                      for task in INSTRUCTION_TASKS)
            + "example:\n"
            "  vlp-data emoji data/emoji --split train=0.8,val=0.1,test=0.1\n"
            "  vlp-data instructions 'data/emoji/*.tar' data/emoji-instructions --tasks classify,multiple_choice,yes_no"
            "\nthen train with data.class_path: data_modules.InstructionDataModule and\n"
            "  data.init_args.train_shards: 'data/emoji-instructions/train-*.tar'"
        ),
    )
    instructions.add_argument(
        "--tasks", default=None, metavar="LIST",
        help=f"comma-separated tasks out of {','.join(INSTRUCTION_TASKS)} (default: every one the shards support: "
        "caption needs .txt, grounding scene objects with boxes, the others labels with manifest classnames)",
    )
    instructions.add_argument(
        "--templates-per-task", type=_positive_int, default=len(INSTRUCTION_TEMPLATES["caption"]), metavar="N",
        help="use the first N instruction templates of every task (default: all %(default)s)",
    )
    instructions.set_defaults(make_source=lambda a: instructions_source(
        str(a.input), parse_tasks(a.tasks), a.templates_per_task, a.seed))
    provision = _build_command(
        commands, "provision",
        "scene shards as ProVision instruction data: questions programmed over each scene graph, answers exact",
        "scene shard pattern (vlp-data scenes), e.g. 'data/scenes/*.tar' (its splits are kept)", splits=False,
        resizable=False, seed_help="seed of the generators and their draws per scene",
        epilog=(
            "Each scene's .json gains \"conversations\" (one user / assistant turn per question, the image with the\n"
            "first) and \"provision\" (generator, question, answer). generators:\n  "
            + ", ".join(PROVISION_GENERATORS) + "\n"
            "example:\n"
            "  vlp-data scenes data/scenes\n"
            "  vlp-data provision 'data/scenes/*.tar' data/scenes-provision --questions 3\n"
            "then train a language-model method with data.class_path: data_modules.InstructionDataModule"
        ),
    )
    provision.add_argument("--questions", type=_positive_int, default=3, metavar="N",
                           help="questions per scene, each from another generator (default: %(default)s)")
    provision.add_argument("--generators", default=None, metavar="LIST",
                           help="comma-separated generators to draw from (default: all)")
    provision.add_argument("--multi-image", action="store_true",
                           help="ProVision's multi-image questions over pairs of scenes of one split, drawn side by "
                                "side as one picture: " + ", ".join(PROVISION_MULTI_IMAGE_GENERATORS))
    provision.set_defaults(make_source=lambda a: provision_source(
        str(a.input), a.questions, a.seed,
        tuple(part.strip() for part in a.generators.split(",") if part.strip()) if a.generators else None,
        a.multi_image))

    moving = _build_command(
        commands, "moving",
        "moving-object clips from real images (emoji shards or Fashion-MNIST): an object moved in 1-3 legs of 8 "
        "directions, the motion as caption (\"a grinning face emoji moving left, then up\") and one timeline "
        "segment per leg", resizable=False, seed_help="seed of every clip's object, legs, start and background",
        epilog=(
            "Members: .frames.npy (uint8 [T, S, S, 3]), .txt (the motion caption), .cls (the direction of the first\n"
            "leg, the manifest's classnames: " + ", ".join(MOVING_DIRECTIONS) + ") and .json (fps, timeline,\n"
            "legs, per-frame centres, object name and its source label as object_label).\n"
            "example:\n"
            "  vlp-data emoji data/emoji\n"
            "  vlp-data moving data/moving --images 'data/emoji/train-*.tar' --count 2000 --split train=0.9,val=0.1\n"
            "then train with data.class_path: data_modules.VideoDataModule and\n"
            "  data.init_args.train_shards: 'data/moving/train-*.tar'"
        ),
    )
    moving.add_argument("--source", choices=MOVING_SOURCES, default="emoji",
                        help="emoji: the images of --images, named \"a <.txt> emoji\"; images: any captioned image "
                        "shards (--images), named by their .txt; fashion-mnist: its training images from --root "
                        "(default: %(default)s)")
    moving.add_argument("--images", default="data/emoji/train-*.tar", metavar="SHARDS",
                        help="image shard pattern the objects come from (default: %(default)s)")
    moving.add_argument("--root", type=Path, default=FASHION_MNIST_ROOT, metavar="DIR",
                        help="Fashion-MNIST's IDX files, for --source fashion-mnist (default: %(default)s)")
    moving.add_argument("--count", type=_positive_int, default=1000, help="clips (default: %(default)s)")
    moving.add_argument("--frames", type=_positive_int, default=16, help="frames per clip (default: %(default)s)")
    moving.add_argument("--fps", type=float, default=8.0, help="frame rate (default: %(default)s)")
    moving.add_argument("--size", type=_positive_int, default=64, help="canvas side in pixels (default: %(default)s)")
    moving.add_argument("--object-size", type=_positive_int, default=None, metavar="N",
                        help="longer side of the object in pixels (default: 3/8 of --size)")
    moving.set_defaults(make_source=lambda a: moving_source(
        a.source, a.images, a.root, a.count, a.frames, a.fps, a.size, a.object_size, a.seed))

    videos = _build_command(
        commands, "videos",
        "your own .mp4 / .webm videos with captions (a folder with same-name .txt / .json, or a CSV), stored as "
        "their original bytes, each checked by decoding its first frame", resizable=False,
        epilog=(
            "--folder DIR: clip.mp4 + clip.txt (caption) + optional clip.json ({\"timeline\": [{\"start\": 0,\n"
            "  \"end\": 1.5, \"text\": \"...\"}], ...}); videos in first-level subfolders get the folder as class.\n"
            "--csv FILE: columns path, caption, optional label (integers or names) and timeline (a JSON list);\n"
            "  paths relative to the CSV's folder. Undecodable videos are reported and skipped.\n"
            "example:\n"
            "  vlp-data videos data/my-videos --csv clips.csv --split train=0.9,val=0.1"
        ),
    )
    where = videos.add_mutually_exclusive_group(required=True)
    where.add_argument("--folder", type=Path, default=None, metavar="DIR", help="folder of .mp4 / .webm files")
    where.add_argument("--csv", type=Path, default=None, metavar="FILE", help="CSV table: path, caption[, label, "
                       "timeline]")
    videos.add_argument("--licence", default="unknown", help="licence recorded in the manifest (default: %(default)s)")
    videos.set_defaults(make_source=lambda a: videos_source(a.folder, a.csv, a.licence))

    youku = _build_command(
        commands, "youku-mplug",
        "one CSV of the Youku-mPLUG release (Chinese video titles, captions, categories) as clip shards, the videos "
        "stored as their original bytes", resizable=False,
        epilog=(
            "Reads the release's columns: video_id:FILE or clip_name:FILE (the video's path under --video-root),\n"
            "title, caption or golden_caption (a list of references in the val / test captioning CSVs) and label\n"
            "(a category name; --classnames classname.json keeps the release's indices).\n"
            "example:\n"
            "  vlp-data youku-mplug data/youku-cls --csv youku/cls_train.csv --video-root youku/videos \\\n"
            "      --classnames youku/classname.json --split train=0.95,val=0.05"
        ),
    )
    youku.add_argument("--csv", type=Path, required=True, metavar="FILE", help="one CSV of the release")
    youku.add_argument("--video-root", type=Path, default=None, metavar="DIR",
                       help="folder the CSV's video paths are relative to (default: the CSV's folder)")
    youku.add_argument("--classnames", type=Path, default=None, metavar="FILE",
                       help="the release's classname.json ({name: index}; default: indices of the sorted names)")
    youku.add_argument("--licence", default="Youku-mPLUG release terms (see its ModelScope page)",
                       help="licence recorded in the manifest (default: %(default)s)")
    youku.set_defaults(make_source=lambda a: youku_mplug_source(a.csv, a.video_root, a.classnames, a.licence))

    inspect_summary = "counts, members, examples and a decode check of every sample"
    inspect = commands.add_parser("inspect", help=inspect_summary, description=inspect_summary)
    inspect.add_argument("out", type=Path, metavar="OUT", help="shard folder")
    inspect.add_argument("--show", type=int, default=3, help="example samples printed per split (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vlp-data` console script; returns the exit status."""
    args = make_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            return 1 if inspect_shards(args.out, args.show) else 0
        build_shards(
            args.make_source(args),
            args.out,
            maxcount=args.maxcount,
            split_fractions=parse_split(args.split) if args.split is not None else {},
            seed=args.seed,
            resize=args.resize,
            force=args.force,
        )
    except SourceError as error:
        print(f"vlp-data: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
