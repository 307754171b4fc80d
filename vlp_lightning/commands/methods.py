"""`vlp methods [NAME]`: every method of the suite, or one method in full (see `--help`)."""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

from vlp_lightning import catalog

DESCRIPTION = """\
List the pretraining methods of vlp_lightning: name, family, paper, the batch keys it needs from the data
(image, text, label, ...), the views one sample becomes (one crop, two crops, multi-crop), its class path (what
`--model` takes to swap it into any recipe) and its recipes (experiments/<name>/*.yaml; *_tiny.yaml run on a CPU
in minutes). With NAME: that method's documentation (objective and paper equations), its constructor arguments
with their defaults (set them under model.init_args in YAML or as --model.init_args.<name> on the command line),
and the commands that train its tiny recipe."""

EXAMPLES = """\
examples:
  vlp methods                 # the table
  vlp methods dino            # one method (any case; a class path works too)
  vlp methods --markdown      # the README's table
"""


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlp methods", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="a method (e.g. DINO, clip, vlp_lightning.methods.SwAV)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (the README's)")
    parser.add_argument("--update-readme", metavar="README", nargs="?", const="README.md", default=None,
                        help="rewrite the generated methods table of README (default README.md) in place")
    return parser


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        if args.update_readme:
            return update_readme(Path(args.update_readme))
        if args.markdown:
            print(catalog.markdown_table())
        elif args.name:
            print(describe(catalog.find(args.name)))
        else:
            print(table())
    except ValueError as error:
        sys.stderr.write(f"vlp methods: error: {error}\n")
        return 2
    except OSError as error:
        sys.stderr.write(f"vlp methods: error: cannot rewrite {error.filename}: {error.strerror}; "
                         "give the README's path\n")
        return 2
    return 0


def table() -> str:
    rows = [("Method", "Family", "Paper", "Data", "Views", "Class path", "Recipes")]
    for entry in catalog.entries():
        recipes = ", ".join(recipe.stem for recipe in entry.recipes()) or "-"
        class_path = f"{entry.class_path} (preset)" if entry.preset_of else entry.class_path
        rows.append((entry.name, entry.family, f"{entry.paper.authors} {entry.paper.year}",
                     ", ".join(entry.required_keys), entry.view_kind, class_path, recipes))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("")
    lines.append("`vlp methods NAME` shows one method: its documentation, arguments and how to run its tiny recipe.")
    return "\n".join(lines)


def describe(entry: catalog.Entry) -> str:
    method = entry.method
    paper = entry.paper
    lines = [f"{entry.name}: {entry.family}", f"paper: {paper.cite()}" + (f" ({paper.note})" if paper.note else "")]
    if entry.preset_of:
        lines.append(f"a preset of {entry.preset_of}: experiments/{entry.folder}/ sets the paper's choices")
    lines += [
        f"class path: {entry.class_path} (swap it into any recipe with --model {entry.class_path})",
        f"data: {', '.join(entry.required_keys)}; views: {entry.view_kind}",
        "",
        inspect.getdoc(sys.modules[method.__module__]) or "",
        "",
        inspect.getdoc(method) or "",
        "",
        "constructor arguments (model.init_args.<name>), with defaults:",
    ]
    lines += [f"  {name} = {default}" for name, default in catalog.constructor_arguments(method)]
    recipes = entry.recipes()
    lines += ["", "recipes:"] + [f"  {_relative(recipe)}" for recipe in recipes]
    tiny = [recipe for recipe in recipes if recipe.stem.endswith("_tiny")]
    if tiny:
        lines += ["", "train the tiny recipe on CPU:"]
        lines += [f"  {build}" for build in catalog.shard_commands(tiny[0])]
        lines.append(f"  vlp fit --config {_relative(tiny[0])}")
    return "\n".join(lines).replace("\n\n\n", "\n\n")


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def update_readme(readme: Path) -> int:
    text = readme.read_text()
    updated = catalog.readme_with_table(text)
    if updated == text:
        print(f"{readme}: the methods table is up to date")
    else:
        readme.write_text(updated)
        print(f"{readme}: methods table rewritten ({len(catalog.entries())} methods)")
    return 0
