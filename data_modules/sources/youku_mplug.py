"""Youku-mPLUG's released layout (`vlp-data youku-mplug`): Xu et al. 2023, "Youku-mPLUG: A 10 Million Large-scale
Chinese Video-Language Dataset for Pre-training and Benchmarks" (github X-PLUG/Youku-mPLUG; the videos and CSVs are
downloaded from ModelScope, `modelscope/Youku-AliceMind`).

The release is one CSV per task and split, read by the official `dataset/video_*_dataset.py` as:

* pre-training (`pretrain.csv`) and category prediction (`cls_*.csv`): `video_id:FILE` (the video's path under
  the video root), `title` (the Chinese title, the clip's text) and, for categories, `label` (a category *name*,
  mapped to an index by the release's `classname.json`, 45 categories);
* retrieval (`ret_*.csv`): `clip_name:FILE` and `caption`;
* captioning (`cap_*.csv`): `video_id:FILE` and `golden_caption`, one string in the training CSV and a Python list
  of reference captions (`['...', '...']`) in the validation / test CSVs.

Each row becomes one clip sample: the video's bytes (not re-encoded; checked by decoding its first frame, as
`vlp-data videos` does), `.txt` (the title, caption or first reference, UTF-8), `.cls` (the category index of
`classname.json` when `--classnames` is given, else of the sorted names) and, for lists of references, `.json`
`{"references": [...]}`. A path without an extension is tried as `.mp4` (the official `has_extension: False`).
Captions stay as written (Chinese, no lower-casing or segmentation); what the model sees is its tokenizer's: a
byte-level one (`ByteTokenizer`, `CLIPTokenizer`'s byte-level BPE) round-trips Chinese exactly, a WordPiece
vocabulary without CJK characters does not (tests/test_youku_mplug.py checks the suite's tokenizers).
"""

from __future__ import annotations

import ast
import csv
import importlib.util
import json
from pathlib import Path

from data_modules.sources import SourceData, SourceError
from data_modules.sources.local import _open_table, _read_text
from data_modules.sources.videos import _SUFFIXES, _record

PATH_COLUMNS = ("video_id:FILE", "clip_name:FILE")
TEXT_COLUMNS = ("title", "caption", "golden_caption")


def _references(value: str, table: Path, number: int) -> list[str]:
    """A text cell: one caption, or the validation CSVs' Python list of reference captions."""
    text = value.strip()
    if not text.startswith("["):
        return [text] if text else []
    try:
        references = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise SourceError(f"{table}: row {number}'s caption list is not a Python list of strings ({text[:40]}...); "
                          "fix the row or remove it") from None
    if not isinstance(references, list) or not all(isinstance(item, str) for item in references):
        raise SourceError(f"{table}: row {number}'s caption list holds something other than strings; fix the row")
    return [item.strip() for item in references if item.strip()]


def _category_indices(classnames_file: Path | None, labels: list[str], table: Path) -> tuple[dict[str, int], list[str]]:
    """Category name -> index: the release's classname.json ({name: index}) when given, else the sorted names."""
    if classnames_file is None:
        names = sorted(set(labels))
        return {name: index for index, name in enumerate(names)}, names
    try:
        mapping = json.loads(classnames_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SourceError(f"--classnames {classnames_file} is not readable JSON ({error}); give the release's "
                          "classname.json") from None
    if not isinstance(mapping, dict) or sorted(mapping.values()) != list(range(len(mapping))):
        raise SourceError(f"--classnames {classnames_file} is not a {{name: index}} object with indices 0..N-1; "
                          "give the release's classname.json")
    unknown = sorted(set(labels) - set(mapping))
    if unknown:
        raise SourceError(f"{table} has category {unknown[0]!r}, which {classnames_file} does not name; give the "
                          "classname.json of the same release")
    names = [name for name, _ in sorted(mapping.items(), key=lambda item: item[1])]
    return dict(mapping), names


def youku_mplug_source(table: Path, video_root: Path | None, classnames_file: Path | None,
                       licence: str) -> SourceData:
    """The clips of one Youku-mPLUG CSV (module doc)."""
    if importlib.util.find_spec("av") is None:
        raise SourceError("checking videos needs PyAV; install the video extra: pip install -e '.[video]'")
    with _open_table(table) as handle:
        reader = csv.DictReader(handle)
        rows = _read_text(table, lambda: [dict(row) for row in reader])
        columns = reader.fieldnames or []
    path_column = next((name for name in PATH_COLUMNS if name in columns), None)
    text_column = next((name for name in TEXT_COLUMNS if name in columns), None)
    if path_column is None or text_column is None:
        raise SourceError(f"{table} is not a Youku-mPLUG CSV: it needs a path column ({' or '.join(PATH_COLUMNS)}) "
                          f"and a text column ({', '.join(TEXT_COLUMNS)}); it has {', '.join(columns) or 'none'}")
    root = (video_root or table.parent).resolve()
    if not root.is_dir():
        raise SourceError(f"--video-root {root} is not a folder; give the folder the CSV's paths are relative to")
    labels = [row["label"].strip() for row in rows if (row.get("label") or "").strip()]
    category_of, classnames = _category_indices(classnames_file, labels, table) if labels else ({}, [])
    records, inputs = [], [table]
    for number, row in enumerate(rows, start=1):
        name = (row[path_column] or "").strip()
        path = (root / name).resolve()
        if name and not path.suffix:
            path = path.with_suffix(".mp4")
        if not name or not path.is_relative_to(root) or path.suffix.lower() not in _SUFFIXES:
            raise SourceError(f"{table}: row {number} names {name!r}; give a .mp4 or .webm path inside {root}")
        references = _references(row[text_column] or "", table, number)
        label = (row.get("label") or "").strip()
        inputs.append(path)
        meta = {"references": references} if len(references) > 1 else {}
        records.append(_record(path, Path(name).with_suffix("").as_posix(), references[0] if references else None,
                               category_of[label] if label else None, meta))
    if not records:
        raise SourceError(f"{table} has no rows")
    return SourceData(name=f"youku-mplug:{table.resolve()}", licence=licence, records=records, inputs=inputs,
                      classnames={"cls": classnames} if classnames else {})
