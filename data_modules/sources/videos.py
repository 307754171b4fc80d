"""Your own videos (`vlp-data videos`): `.mp4` / `.webm` files with captions, stored as their original bytes.

`--folder DIR`: every `.mp4` / `.webm` under DIR (hidden files and folders left out) with a same-name `.txt`
caption and, optionally, a same-name `.json` (`{"timeline": [{"start", "end", "text"}, ...], "fps": ...}`, anything
else passed through as `meta`); videos inside first-level subfolders get the subfolder as their class. `--csv FILE`:
a header with `path` and `caption` and optionally `label` (integers, or names that become sorted classnames) and
`timeline` (a JSON list of segments); paths are relative to the CSV's folder and must stay inside it.

A video is not re-encoded: its bytes become the `<key>.mp4` / `<key>.webm` member. It is validated when written by
opening it with PyAV and decoding its first frame, and its timeline is checked against its duration (a segment must
satisfy 0 <= start < end <= duration); one that fails is reported and skipped (listed under `skipped` in the
manifest), as undecodable images are.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from functools import partial
from pathlib import Path

from data_modules.clips import VIDEO_MEMBERS, clip_fps, read_clip, timeline
from data_modules.sources import Record, SourceData, SourceError, safe_key
from data_modules.sources.local import _label_indices, _open_table, _read_text

_SUFFIXES = tuple(f".{name}" for name in VIDEO_MEMBERS)


def _members(path: Path, caption: str | None, label: int | None, meta: dict) -> dict[str, bytes]:
    """The sample's members, the video checked (a ValueError or OSError makes the builder skip and report it)."""
    data = path.read_bytes()
    member = path.suffix.lower()[1:]
    clip = read_clip({member: data})
    timeline(meta, clip.count / clip_fps(meta, clip))
    clip.frames([0])
    members = {member: data}
    if caption is not None:
        members["txt"] = caption.encode("utf-8")
    if label is not None:
        members["cls"] = str(label).encode("ascii")
    if meta:
        members["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return members


def _record(path: Path, key: str, caption: str | None, label: int | None, meta: dict) -> Record:
    return Record(key=safe_key(key), open_image=None, origin=str(path), caption=caption, label=label,
                  meta=meta or None, members=partial(_members, path, caption, label, meta))


def _folder_records(root: Path) -> tuple[list[Record], list[Path], list[str]]:
    if not root.is_dir():
        raise SourceError(f"--folder {root} is not a folder; give the folder holding your .mp4 / .webm files")
    paths = sorted(path for path in root.rglob("*") if path.suffix.lower() in _SUFFIXES and path.is_file()
                   and not any(part.startswith(".") for part in path.relative_to(root).parts))
    if not paths:
        raise SourceError(f"no .mp4 or .webm files under {root}; convert other formats first "
                          "(ffmpeg -i in.mov out.mp4)")
    relative = [path.relative_to(root) for path in paths]
    has_classes = all(len(parts.parts) > 1 for parts in relative)
    classnames = sorted({parts.parts[0] for parts in relative}) if has_classes else []
    records, inputs = [], list(paths)
    for path, parts in zip(paths, relative):
        caption_file, meta_file = path.with_suffix(".txt"), path.with_suffix(".json")
        caption = (caption_file.read_text(encoding="utf-8").strip() or None) if caption_file.is_file() else None
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise SourceError(f"{meta_file} is not JSON ({error}); fix or remove it") from None
        if not isinstance(meta, dict):
            raise SourceError(f"{meta_file} is not a JSON object; write {{\"timeline\": [...]}}")
        inputs += [file for file in (caption_file, meta_file) if file.is_file()]
        label = classnames.index(parts.parts[0]) if has_classes else None
        records.append(_record(path, parts.with_suffix("").as_posix(), caption, label, meta))
    return records, inputs, classnames


def _csv_records(table: Path) -> tuple[list[Record], list[Path], list[str]]:
    with _open_table(table) as handle:
        reader = csv.DictReader(handle)
        rows = _read_text(table, lambda: [dict(row) for row in reader])
        columns = reader.fieldnames or []
    missing = [name for name in ("path", "caption") if name not in columns]
    if missing:
        raise SourceError(f"{table} has no column {missing[0]!r}; its header must name path and caption (and "
                          f"optionally label and timeline), it has {', '.join(columns) or 'none'}")
    root = table.parent.resolve()
    labels = [row["label"].strip() for row in rows if (row.get("label") or "").strip()]
    label_of, classnames = _label_indices(labels)
    records, inputs = [], [table]
    for number, row in enumerate(rows, start=1):
        name = (row["path"] or "").strip()
        path = (root / name).resolve()
        if not name or not path.is_relative_to(root) or path.suffix.lower() not in _SUFFIXES:
            raise SourceError(f"{table}: row {number} names {name!r}; give a .mp4 or .webm path inside {root} "
                              "(convert other formats first: ffmpeg -i in.mov out.mp4)")
        meta = {}
        if (row.get("timeline") or "").strip():
            try:
                meta["timeline"] = json.loads(row["timeline"])
            except json.JSONDecodeError as error:
                raise SourceError(f"{table}: row {number}'s timeline is not JSON ({error.msg}); write a list "
                                  'such as [{"start": 0, "end": 1.5, "text": "..."}]') from None
        label = (row.get("label") or "").strip()
        inputs.append(path)
        records.append(_record(path, Path(name).with_suffix("").as_posix(), (row["caption"] or "").strip() or None,
                               label_of[label] if label else None, meta))
    if not records:
        raise SourceError(f"{table} has no rows")
    return records, inputs, classnames


def videos_source(folder: Path | None, table: Path | None, licence: str) -> SourceData:
    """The videos of `folder` or of the CSV `table` (module doc)."""
    if (folder is None) == (table is None):
        raise SourceError("give either --folder DIR or --csv FILE")
    if importlib.util.find_spec("av") is None:
        raise SourceError("checking videos needs PyAV; install the video extra: pip install -e '.[video]'")
    records, inputs, classnames = _folder_records(folder) if folder is not None else _csv_records(table)
    return SourceData(
        name=f"videos:{(folder or table).resolve()}",
        licence=licence,
        records=records,
        inputs=inputs,
        classnames={"cls": classnames} if classnames else {},
    )
