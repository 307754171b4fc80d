"""Every shell command of the README's fenced `bash` blocks still works as written.

`vlp fit|validate|test|predict` commands must parse (`--print_config`: recipes exist, class paths import, keys are
known); `vlp methods` runs; `vlp compare` / `vlp export` parse their arguments; `vlp-data` commands that need no
download run on tiny generated inputs (in README order, in one folder, so `inspect` reads what the commands before
it wrote); `make` targets exist. A program this test does not know fails it, so a new kind of command gets checked.
"""

from __future__ import annotations

import csv
import importlib
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_modules.builder import main as vlp_data
from data_modules.builder import make_parser as vlp_data_parser
from vlp_lightning.cli import COMMANDS
from vlp_lightning.cli import main as vlp

REPO = Path(__file__).parents[1]
README = REPO / "README.md"
#: programs the README may show that this test does not run: environment set-up and cluster launchers' own flags.
NOT_CHECKED = {"source", "tensorboard"}
#: `vlp-data` sources that download (from npm / Debian) or read what those wrote; they are parsed, not run.
DOWNLOADING_SOURCES = {"emoji", "openclipart", "fashion-mnist", "wordnet", "instructions", "moving", "youku-mplug",
                       "ffr"}
#: `vlp-data` sources that need no download but take too long for the suite (babyai rolls out ~1,000 episodes:
#: tests/test_babyai.py runs it on two levels); parsed, not run.
SLOW_SOURCES = {"babyai"}


def readme_commands() -> list[str]:
    """The shell commands of the README's ```bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()  # a comment after the command (two-space separated)
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def vlp_arguments(command: str) -> list[str] | None:
    """The arguments of `vlp` in a command (also under `srun` or `torchrun -m vlp_lightning.cli`), else None."""
    words = shlex.split(command)
    if words[0] == "srun":
        words = words[1:]
    if words[0] == "vlp":
        return words[1:]
    if words[0] == "torchrun" and "vlp_lightning.cli" in words:
        return words[words.index("vlp_lightning.cli") + 1:]
    return None


COMMAND_LINES = readme_commands()


def test_the_readme_shows_commands():
    assert len(COMMAND_LINES) > 20 and any(line.startswith("vlp fit") for line in COMMAND_LINES)


@pytest.mark.parametrize("command", [c for c in COMMAND_LINES if vlp_arguments(c) is not None])
def test_vlp_command_parses(command, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes are given relative to the checkout
    monkeypatch.setattr("sys.argv", ["vlp"])
    arguments = vlp_arguments(command)
    if arguments[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[arguments[0]])
        if arguments[0] == "methods":
            assert module.main(arguments[1:]) == 0
        else:
            try:
                module.parser().parse_known_args(arguments[1:])  # vlp compare passes vlp fit options on
            except SystemExit as stop:  # --help
                assert stop.code in (0, None), command
        return
    assert arguments[0] in {"fit", "validate", "test", "predict"}, command
    with pytest.raises(SystemExit) as exit_info:
        vlp([*arguments, "--print_config"])
    printed = capsys.readouterr()
    assert exit_info.value.code in (0, None), printed.err
    assert "class_path" in printed.out


@pytest.mark.parametrize("command", [c for c in COMMAND_LINES if shlex.split(c)[0] == "make"])
def test_make_target_exists(command):
    targets = set(re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))
    for word in shlex.split(command)[1:]:
        if "=" not in word:
            assert word in targets, f"`{command}`: the Makefile has no target {word!r}"


def test_every_command_is_of_a_checked_kind():
    for command in COMMAND_LINES:
        program = shlex.split(command)[0]
        known = {"vlp-data", "make"} | NOT_CHECKED
        assert vlp_arguments(command) is not None or program in known, f"README command of unknown kind: {command}"


def write_tiny_inputs(root: Path) -> None:
    """What the README's `vlp-data` commands read: photos/ (captions and class folders), captions.csv,
    pairs.jsonl, clips.csv (one 8-frame .mp4 per class, written with PyAV)."""
    colours = {"cat": (200, 30, 30), "dog": (30, 30, 200)}
    rows = []
    for name, colour in colours.items():
        (root / "photos" / name).mkdir(parents=True)
        for index in range(3):
            path = root / "photos" / name / f"{index:03d}.png"
            Image.new("RGB", (12, 10), colour).save(path)
            if index == 0:
                path.with_suffix(".txt").write_text(f"a {name} sitting")
            rows.append({"filepath": f"photos/{name}/{index:03d}.png", "title": f"a {name} number {index}",
                         "label": name})
    with open(root / "captions.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["filepath", "title", "label"])
        writer.writeheader()
        writer.writerows(rows)
    with open(root / "pairs.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps({"image": row["filepath"], "caption": row["title"], "label": row["label"]}) + "\n")
    with open(root / "clips.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "caption", "label"])
        writer.writeheader()
        for name, colour in colours.items():
            write_mp4(root / f"{name}.mp4", colour)
            writer.writerow({"path": f"{name}.mp4", "caption": f"a {name} walking", "label": name})


def write_mp4(path: Path, colour: tuple[int, int, int]) -> None:
    """8 frames of 16x16 in `colour`, fading, as an H.264 .mp4 (PyAV, the video extra)."""
    import av

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for index in range(8):
            pixels = np.full((16, 16, 3), colour, np.uint8) // (index + 1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_vlp_data_commands_run_on_tiny_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_tiny_inputs(tmp_path)
    ran = 0
    for command in COMMAND_LINES:
        words = shlex.split(command)
        if words[0] != "vlp-data":
            continue
        arguments = [word.strip("[]") for word in words[1:]]  # `[--label-col label]`: the optional part, given
        if arguments[0] in DOWNLOADING_SOURCES | SLOW_SOURCES:
            vlp_data_parser().parse_args(arguments)
            continue
        assert vlp_data(arguments) == 0, command
        ran += 1
    assert ran >= 5  # folder (twice), csv, jsonl, inspect
