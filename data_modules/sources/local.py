"""Your own data: a folder of images, or a CSV / JSONL table of image paths with captions and labels.

Folder: `photo.jpg` + `photo.txt` (caption, several lines = several captions); images inside first-level
subfolders get the subfolder as their class (`.cls`, with the folder names as manifest classnames). Tables: one
row per (image, caption); several rows naming the same image become one sample whose `.txt` has one caption per
line (COCO-style), the other columns of its first row go to `.json`. Labels that are all integers are stored as
they are; otherwise the distinct values, sorted, become the classnames and each label its index.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TextIO

from PIL import Image

from data_modules.sources import Record, SourceData, SourceError, image_files, safe_key


def folder_source(
    root: Path, caption_template: str | None, licence: str, follow_symlinks: bool = False
) -> SourceData:
    """Images under `root` with same-name `.txt` captions and/or class subfolders.

    `caption_template` (e.g. "a photo of a {}.") writes a caption from the class name for images without a `.txt`.
    An image or caption that is a symbolic link (it could name any file of the system), or a caption that is not
    UTF-8, makes its sample fail like an undecodable image: skipped and listed, unless `follow_symlinks`.
    """
    if not root.is_dir():
        raise SourceError(f"{root} is not a folder")
    paths = image_files(root)
    if not paths:
        raise SourceError(f"no images under {root} (looked for files ending in .png, .jpg, .jpeg, .webp, ...)")
    relative_paths = [path.relative_to(root) for path in paths]
    has_classes = all(len(relative.parts) > 1 for relative in relative_paths)
    if not has_classes and any(len(relative.parts) > 1 for relative in relative_paths):
        print(f"note: some images sit directly in {root}, so its subfolders are not used as classes", file=sys.stderr)
    classnames = sorted({relative.parts[0] for relative in relative_paths}) if has_classes else []
    records = []
    for path, relative in zip(paths, relative_paths):
        classname = relative.parts[0] if has_classes else None
        caption_file = path.with_suffix(".txt")
        caption, problem = None, None
        links = [file for file in (path, caption_file) if file.is_symlink()]
        if links and not follow_symlinks:
            problem = f"{links[0]} is a symbolic link (pass --follow-symlinks to read what it points at)"
        elif caption_file.is_file():
            try:
                caption = caption_file.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError as error:
                problem = f"caption {caption_file} is not UTF-8 ({error.reason} at byte {error.start})"
        if caption is None and classname is not None and caption_template is not None:
            caption = caption_template.format(classname)
        records.append(
            Record(
                key=safe_key(relative.with_suffix("").as_posix()),
                open_image=partial(_refuse, problem) if problem else partial(Image.open, path),
                origin=str(path),
                caption=caption or None,
                label=classnames.index(classname) if classname is not None else None,
            )
        )
    return SourceData(
        name=f"folder:{root.resolve()}",
        licence=licence,
        records=records,
        inputs=paths + [path.with_suffix(".txt") for path in paths if path.with_suffix(".txt").is_file()],
        classnames={"cls": classnames} if classnames else {},
    )


def _refuse(problem: str) -> Image.Image:
    raise ValueError(problem)


def csv_source(
    table: Path,
    image_column: str,
    caption_column: str,
    label_column: str | None,
    image_root: Path | None,
    licence: str,
    allow_outside_root: bool = False,
) -> SourceData:
    """Rows of a CSV file with a header; image paths are relative to `image_root` (default: the CSV's folder)."""
    with _open_table(table) as handle:
        reader = csv.DictReader(handle)
        rows: list[dict[str, object]] = _read_text(table, lambda: [dict(row) for row in reader])
        columns = reader.fieldnames or []
    for name, option in (
        (image_column, "--image-col"),
        (caption_column, "--caption-col"),
        (label_column, "--label-col"),
    ):
        if name is not None and name not in columns:
            raise SourceError(f"{table} has no column {name!r} ({option}); its columns are {', '.join(columns)}")
    return _table_source(
        rows, table, image_column, caption_column, label_column, image_root, licence, "csv", allow_outside_root
    )


def jsonl_source(
    table: Path,
    image_field: str,
    caption_field: str,
    label_field: str | None,
    image_root: Path | None,
    licence: str,
    allow_outside_root: bool = False,
) -> SourceData:
    """One JSON object per line; a caption may be a string or a list of strings."""
    rows: list[dict[str, object]] = []
    with _open_table(table) as handle:
        for line_number, line in enumerate(_read_text(table, handle.readlines), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise SourceError(f"{table}:{line_number} is not valid JSON ({error.msg})") from error
            if not isinstance(row, dict) or image_field not in row:
                raise SourceError(f"{table}:{line_number} has no field {image_field!r} (--image-field)")
            rows.append(row)
    return _table_source(
        rows, table, image_field, caption_field, label_field, image_root, licence, "jsonl", allow_outside_root
    )


def _read_text(table: Path, read: Callable[[], list]) -> list:
    try:
        return read()
    except UnicodeDecodeError as error:
        raise SourceError(
            f"{table} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8 and run again"
        ) from None


def _open_table(table: Path) -> TextIO:
    if not table.is_file():
        raise SourceError(f"{table} does not exist")
    return table.open(encoding="utf-8", newline="")


def _table_source(
    rows: list[dict[str, object]],
    table: Path,
    image_field: str,
    caption_field: str,
    label_field: str | None,
    image_root: Path | None,
    licence: str,
    kind: str,
    allow_outside_root: bool = False,
) -> SourceData:
    """Group rows by image (several captions per image), turn labels into integers and build the records.

    Image paths must stay inside the root (no `../x`, no absolute path) unless `allow_outside_root`."""
    root = image_root if image_root is not None else table.parent
    grouped: dict[str, list[dict[str, object]]] = {}
    for number, row in enumerate(rows, start=1):
        image = str(row[image_field] if row[image_field] is not None else "").strip()
        if not image:
            raise SourceError(f"{table}: row {number} has an empty {image_field!r} cell; give every row an image "
                              "path or remove the row")
        if not allow_outside_root and not (root / image).resolve().is_relative_to(root.resolve()):
            raise SourceError(f"{table}: row {number} names {image!r}, outside {root}; keep the images under the "
                              "table's folder (or --image-root), or pass --allow-outside-root")
        grouped.setdefault(image, []).append(row)
    if not grouped:
        raise SourceError(f"{table} has no rows")
    raw_labels = {image: _one_label(image, group, label_field) for image, group in grouped.items()}
    label_of, classnames = _label_indices([label for label in raw_labels.values() if label is not None])
    records = []
    for image, group in grouped.items():
        path = root / image
        captions = [caption for row in group for caption in _captions(row.get(caption_field))]
        extra = {
            name: value for name, value in group[0].items() if name not in (image_field, caption_field, label_field)
        }
        raw_label = raw_labels[image]
        records.append(
            Record(
                key=safe_key(Path(image).with_suffix("").as_posix()),
                open_image=partial(Image.open, path),
                origin=str(path),
                caption="\n".join(captions) or None,
                label=label_of[raw_label] if raw_label is not None else None,
                meta=extra or None,
            )
        )
    image_paths = [root / image for image in grouped]
    return SourceData(
        name=f"{kind}:{table.resolve()}",
        licence=licence,
        records=records,
        inputs=[table, *image_paths],
        classnames={"cls": classnames} if classnames else {},
    )


def _captions(value: object) -> list[str]:
    if value is None:
        return []
    texts = value if isinstance(value, list) else [value]
    return [str(text).strip() for text in texts if str(text).strip()]


def _one_label(image: str, rows: list[dict[str, object]], label_field: str | None) -> object | None:
    if label_field is None:
        return None
    labels = {row[label_field] for row in rows if row.get(label_field) not in (None, "")}
    if len(labels) > 1:
        raise SourceError(f"rows for {image} disagree on {label_field!r}: {sorted(map(str, labels))}")
    return labels.pop() if labels else None


def _label_indices(labels: list[object]) -> tuple[dict[object, int], list[str]]:
    """Integer labels stay as they are (no classnames); any other labels become indices into sorted names."""
    if all(isinstance(label, int) or (isinstance(label, str) and label.strip().isdigit()) for label in labels):
        return {label: int(label) for label in labels}, []
    classnames = sorted({str(label) for label in labels})
    return {label: classnames.index(str(label)) for label in labels}, classnames
