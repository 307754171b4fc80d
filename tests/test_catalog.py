"""`vlp methods` and the README's method table come from one catalogue, and they agree with the methods index."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlp_lightning import catalog, methods
from vlp_lightning.commands.methods import main

README = Path(__file__).parents[1] / "README.md"
INDEX = methods.method_names()


def test_readme_method_table_is_the_generated_one():
    """Fails when a method is added, renamed or re-described without `vlp methods --update-readme`."""
    readme = README.read_text()
    assert catalog.readme_with_table(readme) == readme, "run `vlp methods --update-readme` and commit README.md"


def test_every_index_method_is_catalogued_with_paper_family_and_recipes():
    entries = {entry.name: entry for entry in catalog.entries()}
    assert set(INDEX) <= set(entries)
    for name in INDEX:
        entry = entries[name]
        assert entry.paper.title and 2000 < entry.paper.year < 2100 and entry.family
        assert entry.view_kind in catalog.VIEW_KINDS.values()
        recipes = entry.recipes()
        assert any(recipe.stem.endswith("_tiny") for recipe in recipes), f"{name} has no tiny recipe"
        assert any(not recipe.stem.endswith("_tiny") for recipe in recipes), f"{name} has no paper-size recipe"
    for entry in entries.values():  # presets too: a folder of recipes each
        assert entry.recipes(), f"experiments/{entry.folder}/ has no recipe"


def test_vlp_methods_lists_every_method(capsys):
    assert main([]) == 0
    listing = capsys.readouterr().out
    for name in INDEX:
        assert f"vlp_lightning.methods.{name}" in listing


def test_vlp_methods_name_shows_arguments_and_the_commands_to_run(capsys):
    assert main(["dino"]) == 0
    shown = capsys.readouterr().out
    assert "Caron et al. 2021" in shown and "eq. 3" in shown  # the paper and the module's equations
    assert "  norm_last_layer = True" in shown and "  base_momentum = 0.996" in shown
    assert "vlp-data emoji data/emoji" in shown and "vlp fit --config experiments/dino/emoji_tiny.yaml" in shown


def test_a_recipe_needing_two_datasets_shows_both_commands(capsys, tmp_path):
    recipe = tmp_path / "two_tiny.yaml"
    recipe.write_text("# Tiny.\n# Shards: `vlp-data emoji data/a --style twitter`,\n"
                      "# `vlp-data fashion-mnist data/b`.\nseed_everything: 0\n")
    assert catalog.shard_commands(recipe) == ["vlp-data emoji data/a --style twitter", "vlp-data fashion-mnist data/b"]
    recipe.write_text("# Shards: as moving_tiny.yaml (`vlp-data moving data/moving ...`).\n")
    assert catalog.shard_commands(recipe) == []  # a reference to another recipe is not a command
    assert main(["damvpmeta"]) == 0
    shown = capsys.readouterr().out
    assert "vlp-data emoji data/emoji-twitter" in shown and "vlp-data fashion-mnist data/fashion-mnist" in shown


@pytest.mark.parametrize(("argv", "says"), [(["nope"], "no method called 'nope'"),
                                             (["--update-readme", "/nonexistent/README.md"], "cannot rewrite")])
def test_vlp_methods_bad_input_is_one_sentence(capsys, argv, says):
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and says in error[0]
