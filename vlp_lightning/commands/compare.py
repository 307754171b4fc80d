"""`vlp compare`: train several methods on the same shards for the same budget, score each the same way, one table.

    vlp compare --config experiments/clip/emoji_tiny.yaml --methods SimCLR MAE --own-recipes --steps 100 \\
        --probe-train 'data/emoji/train-{000000..000001}.tar' --probe-test data/emoji/test-000000.tar \\
        --random-init --raw-pixels

Recipes. Every method trains from the base recipe (`--config`, repeatable as for `vlp fit`) with `--model <its class
path>`, so it keeps the recipe's data, tower, optimizer and trainer and takes its own constructor defaults. With
`--own-recipes`, a method that has a recipe of its own for the same data, `experiments/<its folder>/<the first
--config's file name>` (e.g. `experiments/byol/emoji_tiny.yaml`), trains from that recipe instead (the other
--config files still stack on it). Every method reads the same training shards: `--train-shards`, by default those
of the base recipe; validation is off and the recipes' in-run evaluation callbacks are dropped, so the budget is
spent on training and every method is scored after it, the same way. Further `vlp fit` options
(`--trainer.precision bf16-mixed`, `--data.init_args.batch_size 32`, `--model.init_args...`) apply to every method.

Budget. `--steps N`: N optimizer steps each. `--minutes M`: a 12-step calibration run measures the method's step
time, then `max_steps` is set so the run fills M minutes, so the warm-up + cosine schedule runs to its end; a
callback stops a run that overshoots by more than 10 %.

Scores, on each encoder's frozen `probe_features` (`vlp_lightning.comparison`): weighted kNN (k 20, cosine, T 0.07)
and a linear probe (logistic regression, L-BFGS, C 1, standardised features) fitted on `--probe-train` and scored
on `--probe-test` (`.cls` labels), as the `KNNClassifier` and `LinearProbe` callbacks compute them. References:
`--random-init` adds each method's encoder with the weights it started from (same config, same seed, no training);
`--raw-pixels` adds the flattened pixels (`--raw-pixels-size`, `--raw-pixels-channels`).

Isolation and resuming. Each method runs in a subprocess (`python -m vlp_lightning.commands.compare --one SPEC`),
its output in `<out>/logs/<method>.log`. A crash, an exception or a non-finite loss (the NaN guard's stop) is
recorded as the method's status, `failed: <reason>`, and the next method runs. The results are written after every
method; a re-run with the same `--out` skips each method already finished with the same settings (method, recipe
files, overrides, budget, probes) and re-runs the failed, missing or changed ones (`--force` re-runs all).

Outputs in `--out` (default `runs/compare/<name>`, the name the first --config's stem or `--name`):
`results.json` (every method's status, run, scores; methods of earlier runs that this one did not name are kept),
`results.csv` (one row per encoder), `hparams/` (TensorBoard's HParams view: one session per encoder), and each
method's training logs and checkpoint in `<out>/<method>/` (`tensorboard --logdir <out>` shows both).
The printed table has one row per method (and per reference): status, steps x batch, training seconds, final
loss, kNN and linear top-1, and the linear probe's gain over the method's random-init encoder in points.
Exit status: 0 when every method finished, 1 when one failed, 2 for bad input, 130 when interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

import vlp_lightning
from data_modules.manifest import local_path
from data_modules.pipeline import DataConfigError, expand_shards, manifest_of, shard_members
from vlp_lightning import methods as method_index
from vlp_lightning.callbacks.non_finite_loss import NonFiniteLossError
from vlp_lightning.cli import USER_ERRORS
from vlp_lightning.comparison import Budget, Probe, raw_pixel_scores, run_method
from vlp_lightning.methods.adaptation.base import AdaptationMethod
from vlp_lightning.methods.base import VLPMethod

PROG = "vlp compare"
#: `--methods` shortcut for every method of the index that learns from images alone (no captions, no labels).
ALL_IMAGE = "all-image"
#: top-level `vlp fit` option groups passed through to every method.
PASSED_THROUGH = ("trainer", "model", "data", "seed_everything", "checkpoint", "non_finite", "global_batch")
#: `vlp fit` options `vlp compare` sets itself, with the option to use instead.
RESERVED = {
    "model": "--methods",
    "trainer.max_steps": "--steps or --minutes",
    "trainer.max_epochs": "--steps or --minutes",
    "trainer.max_time": "--steps or --minutes",
    "trainer.default_root_dir": "--out",
    "data.train_shards": "--train-shards",
    "data.init_args.train_shards": "--train-shards",
}
_BUILD_HINT = "build shards with `vlp-data` (e.g. `vlp-data emoji data/emoji-google --style google --split " \
              "train=0.9,val=0.1`)"
RESULTS_FORMAT = 1


class CompareError(ValueError):
    """Bad input to `vlp compare`: one sentence naming the bad value and the fix."""


@dataclass(frozen=True)
class Method:
    """A method to compare: its name in the table and the class path `--model` gets."""

    name: str
    class_path: str


@dataclass
class Comparison:
    """Everything one `vlp compare` run needs (what the command line or a caller such as bench/ssl_probe.py gives)."""

    configs: list[Path]
    methods: list[Method]
    budget: Budget
    probe: Probe
    out: Path
    train_shards: str
    own_recipes: bool = False
    random_init: bool = False
    raw_pixels: tuple[int, int] | None = None  # (size, channels)
    overrides: list[str] = field(default_factory=list)
    force: bool = False
    command: str = ""


# ------------------------------------------------------------------------------------------------ methods
def index_methods() -> list[str]:
    """Class names of every method of the index."""
    return method_index.method_names()


def image_only_methods() -> list[str]:
    """Class names of the index's pretraining methods that learn from images alone, in index order (adaptation
    methods start from another run's checkpoint and are left out)."""
    return [name for name in index_methods()
            if set(getattr(method_index, name).required_keys) <= {"image"}
            and not issubclass(getattr(method_index, name), AdaptationMethod)]


def resolve_methods(names: Iterable[str]) -> list[Method]:
    """`--methods` entries -> methods, in order, each once: index names (any case), `all-image`, or class paths."""
    known = {name.lower(): name for name in index_methods()}
    chosen: dict[str, Method] = {}
    for given in names:
        if given.lower() == ALL_IMAGE:
            for name in image_only_methods():
                chosen.setdefault(name, Method(name, f"vlp_lightning.methods.{name}"))
        elif given.lower() in known:
            name = known[given.lower()]
            chosen.setdefault(name, Method(name, f"vlp_lightning.methods.{name}"))
        else:
            method = _method_of_class_path(given)
            if chosen.get(method.name, method).class_path != method.class_path:  # two classes of one name
                method = Method(method.class_path, method.class_path)
            chosen.setdefault(method.name, method)
    return list(chosen.values())


def _method_of_class_path(class_path: str) -> Method:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, VLPMethod)):
        raise CompareError(
            f"unknown method '{class_path}'; give names of the methods index ({', '.join(index_methods())}), "
            f"{ALL_IMAGE} for every image-only one, or the class path of a VLPMethod subclass"
        )
    if module == "vlp_lightning.methods" or getattr(method_index, name, None) is cls:
        return Method(name, f"vlp_lightning.methods.{name}")
    return Method(name, class_path)


def recipe_folder(experiments: Path, class_path: str) -> str | None:
    """The folder of `experiments` whose recipes train `class_path` (the one named after the class first)."""
    pattern = re.compile(rf"class_path:\s*{re.escape(class_path)}\s")
    own_name = class_path.rsplit(".", 1)[-1].lower()
    folders = sorted((path for path in experiments.iterdir() if path.is_dir()), key=lambda p: (p.name != own_name,
                                                                                             p.name))
    for folder in folders:
        if any(pattern.search(recipe.read_text()) for recipe in folder.glob("*.yaml")):
            return folder.name
    return None


def own_recipe(base: Path, method: Method) -> Path | None:
    """`experiments/<method's folder>/<base's file name>` when it exists and trains the method."""
    experiments = base.resolve().parent.parent
    folder = recipe_folder(experiments, method.class_path) if experiments.is_dir() else None
    candidate = experiments / folder / base.name if folder else None
    if candidate is None or not candidate.is_file():
        return None
    if not re.search(rf"class_path:\s*{re.escape(method.class_path)}\s", candidate.read_text()):
        return None
    return base.parent.parent / folder / base.name  # as the user wrote the base: relative stays relative


def method_arguments(comparison: Comparison, method: Method) -> tuple[str, list[str]]:
    """(the recipe in words, the `vlp fit` arguments) of one method; `max_steps` and the run folder come later."""
    configs = list(comparison.configs)
    swap = [f"--model={method.class_path}"]
    own = own_recipe(configs[0], method) if comparison.own_recipes else None
    if own is not None:
        configs[0], swap = own, []
    recipe = " ".join(_shown(config) for config in configs) + (f" {swap[0]}" if swap else "")
    arguments = [
        *(argument for config in configs for argument in ("--config", str(config))),
        *swap,
        f"--data.init_args.train_shards={comparison.train_shards}",
        "--data.init_args.val_shards=null",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--checkpoint.save_last=false",
        *comparison.overrides,
    ]
    return recipe, arguments


def _shown(path: Path) -> str:
    """A path as the table shows it: relative to the working directory when it lies below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def fingerprint(comparison: Comparison, method: Method, arguments: list[str]) -> str:
    """What a method's result depends on: its arguments, the text of its recipe files, the budget, the probes."""
    recipes = [arguments[index + 1] for index, argument in enumerate(arguments) if argument == "--config"]
    settings = {
        "class_path": method.class_path,
        "arguments": arguments,
        "recipes": {recipe: hashlib.sha256(Path(recipe).read_bytes()).hexdigest() for recipe in recipes},
        "budget": asdict(comparison.budget),
        "probe": asdict(comparison.probe),
        "random_init": comparison.random_init,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ running
def say(message: str) -> None:
    print(f"{PROG}: {message}", flush=True)


def run_comparison(comparison: Comparison, on_update: Callable[[dict], None] | None = None) -> tuple[dict, int]:
    """Run (or skip) every method, writing the results after each; returns (results, exit status)."""
    comparison.out.mkdir(parents=True, exist_ok=True)
    results = load_results(comparison.out)
    results["command"] = comparison.command
    names = [method.name for method in comparison.methods]

    def save() -> None:
        write_outputs(comparison.out, results, names)
        if on_update is not None:
            on_update(results)

    try:
        if comparison.raw_pixels is not None:
            measure_raw_pixels(comparison, results)
            save()
        for index, method in enumerate(comparison.methods, 1):
            if run_or_skip(comparison, method, f"[{index}/{len(names)}] {method.name}", results):
                save()
    except KeyboardInterrupt:
        say(f"interrupted; what finished is in {comparison.out / 'results.json'}: run the same command again to "
            "continue (finished methods are skipped)")
        return results, 130
    save()  # once more: the outputs list exactly this run's methods even when every one was skipped
    rows = result_rows(results, names)
    print(f"\n{format_table(rows)}\n", flush=True)
    say(f"results in {comparison.out / 'results.json'}, {comparison.out / 'results.csv'}; "
        f"`tensorboard --logdir {comparison.out}` shows the HParams view and the training curves")
    failed = [name for name in names if results["methods"][name]["status"] != "ok"]
    return results, 1 if failed else 0


def run_or_skip(comparison: Comparison, method: Method, label: str, results: dict) -> bool:
    """Run one method in its subprocess and record its entry, unless it finished with the same settings before;
    returns whether it ran."""
    recipe, arguments = method_arguments(comparison, method)
    key = fingerprint(comparison, method, arguments)
    previous = results["methods"].get(method.name)
    if previous and previous.get("fingerprint") == key and previous.get("status") == "ok" and not comparison.force:
        say(f"{label}: already finished with these settings ({previous['run']['measured_at']}); skipped "
            "(--force re-runs it)")
        return False
    why = ""
    if previous and previous.get("fingerprint") != key:
        why = " (its settings changed since the last run)"
    elif previous and previous.get("status") != "ok":
        why = " (again: it failed last time)"
    log_path = comparison.out / "logs" / f"{method.name}.log"
    calibrated = " (step time calibrated first)" if comparison.budget.minutes is not None else ""
    say(f"{label}: training for {comparison.budget.describe()}{calibrated}{why}, from {recipe}; log {log_path}")
    started = time.perf_counter()
    outcome = run_isolated(comparison, method, arguments, log_path)
    entry = {"class_path": method.class_path, "recipe": recipe, "fingerprint": key,
             "budget": comparison.budget.describe(), "log": str(log_path), "seconds": time.perf_counter() - started,
             **outcome}
    if entry["status"] == "ok":
        entry["run"]["recipe"] = recipe
        scores = entry["scores"]
        say(f"{label}: done in {entry['seconds']:.0f} s, {entry['run']['steps']} steps: kNN {scores['knn_top1']:.3f}, "
            f"linear {scores['linear_top1']:.3f}")
    else:
        say(f"{label}: {entry['status']} (log {log_path})")
    results["methods"][method.name] = entry
    return True


def measure_raw_pixels(comparison: Comparison, results: dict) -> None:
    """The raw-pixel reference row (measured once per probe setting)."""
    size, channels = comparison.raw_pixels
    key = hashlib.sha256(json.dumps([asdict(comparison.probe), size, channels]).encode()).hexdigest()[:16]
    previous = results["references"].get("raw_pixels")
    if previous and previous.get("fingerprint") == key and not comparison.force:
        say("raw pixels: already measured with these settings; skipped")
        return
    scores = raw_pixel_scores(comparison.probe, size, channels)
    results["references"]["raw_pixels"] = {"fingerprint": key, "status": "ok", "size": size, "channels": channels,
                                           "scores": scores}
    say(f"raw pixels ({size} px, {channels} channels): kNN {scores['knn_top1']:.3f}, "
        f"linear {scores['linear_top1']:.3f}")


def run_isolated(comparison: Comparison, method: Method, arguments: list[str], log_path: Path) -> dict:
    """Run one method in a subprocess: {"status": "ok", "run", "scores", "random_init"} or {"status": "failed: ..."}.

    The child's output goes to `log_path`; its `compare: ...` progress lines are shown as well."""
    root = comparison.out / method.name
    root.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    spec = {"arguments": arguments, "budget": asdict(comparison.budget), "probe": asdict(comparison.probe),
            "random_init": comparison.random_init, "root": str(root), "result": str(root / "result.json")}
    result_path = Path(spec["result"])
    result_path.unlink(missing_ok=True)
    spec_path = root / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    package_root = str(Path(vlp_lightning.__file__).resolve().parents[1])  # the child imports the parent's code
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "vlp_lightning.commands.compare", "--one", str(spec_path)]
    output = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    with open(log_path, "w", buffering=1) as log, subprocess.Popen(command, env=env, **output) as child:
        try:
            lines: list[str] = []
            for line in child.stdout:
                log.write(line)
                lines.append(line.rstrip())
                del lines[:-50]
                if line.startswith("compare: ") and not line.startswith(FAILED):
                    print(f"    {line[len('compare: '):].rstrip()}", flush=True)
            status = child.wait()
        except KeyboardInterrupt:
            child.kill()
            raise
    if status == 0 and result_path.is_file():
        return {"status": "ok", **json.loads(result_path.read_text())}
    return {"status": f"failed: {failure_reason(lines, status)}"}


FAILED = "compare: failed: "


def failure_reason(lines: list[str], status: int) -> str:
    """One line on why a method's subprocess failed, from the last lines of its output and its exit status."""
    for line in reversed(lines):
        if line.startswith(FAILED):
            return line[len(FAILED):]
        if line.startswith(("vlp: error: ", "vlp: stopped: ")):
            return line[len("vlp: "):]
    last = next((line.strip() for line in reversed(lines) if line.strip()), "no output")
    if status < 0:
        return f"killed by signal {-status} (out of memory?); last output: {last}"
    return f"exit status {status}; last output: {last}"


def run_one(spec_path: str) -> int:
    """The subprocess of one method: train, score, write the result file; on failure print `compare: failed:`."""
    spec = json.loads(Path(spec_path).read_text())
    try:
        result, is_global_zero = run_method(spec["arguments"], Budget(**spec["budget"]), Probe(**spec["probe"]),
                                            Path(spec["root"]), spec["random_init"])
    except NonFiniteLossError as error:
        print(f"{FAILED}stopped: {error}", flush=True)
        return 1
    except USER_ERRORS as error:
        print(f"{FAILED}error: {error}", flush=True)
        return 2
    except Exception as error:  # any crash of one method is its row's status; the comparison goes on
        traceback.print_exc()
        lines = str(error).strip().splitlines()
        print(f"{FAILED}{type(error).__name__}{': ' + lines[0] if lines else ''}", flush=True)
        return 1
    if is_global_zero:
        Path(spec["result"]).write_text(json.dumps(result, indent=2) + "\n")
    return 0


# ------------------------------------------------------------------------------------------------ results
def load_results(out: Path) -> dict:
    path = out / "results.json"
    empty = {"format": RESULTS_FORMAT, "command": "", "references": {}, "methods": {}}
    if not path.exists():
        return empty
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CompareError(f"{path} is not readable JSON ({error}); remove it or give another --out") from None
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT:
        raise CompareError(f"{path} is not a results file of vlp compare; remove it or give another --out")
    return results


def result_rows(results: dict, names: list[str]) -> list[dict]:
    """One row per encoder: the raw-pixel reference, then each method and its random-init encoder."""
    rows = []
    raw = results["references"].get("raw_pixels")
    if raw is not None:
        rows.append({"encoder": "raw pixels", "method": "", "kind": "raw_pixels", "status": "reference",
                     **_score_cells(raw["scores"]), "recipe": f"{raw['size']} px, {raw['channels']} channels"})
    for name in names:
        entry = results["methods"][name]
        common = {"method": name, "recipe": entry["recipe"]}
        if entry["status"] != "ok":
            rows.append({"encoder": name, "kind": "pretrained", "status": entry["status"], **common})
            continue
        run, random = entry["run"], entry.get("random_init")
        losses = run["final_losses"]
        rows.append({
            "encoder": name, "kind": "pretrained", "status": "ok", **common, "steps": run["steps"],
            "batch_size": run["batch_size"], "train_seconds": round(run["train_seconds"], 1),
            "final_loss": losses.get("train/loss", next(iter(losses.values()), None)),
            **_score_cells(entry["scores"]),
            "linear_gain": None if random is None else entry["scores"]["linear_top1"] - random["linear_top1"],
        })
        if random is not None:
            rows.append({"encoder": f"{name} random init", "kind": "random_init", "status": "reference", **common,
                         **_score_cells(random)})
    return rows


def _score_cells(scores: dict) -> dict:
    return {"knn_top1": scores["knn_top1"], "linear_top1": scores["linear_top1"], "feature_dim": scores["feature_dim"]}


CSV_COLUMNS = ("encoder", "method", "kind", "status", "steps", "batch_size", "train_seconds", "final_loss",
               "knn_top1", "linear_top1", "linear_gain", "feature_dim", "recipe")


def format_table(rows: list[dict], status_width: int = 64) -> str:
    """The rows as an aligned Markdown table (a long status cut to `status_width`; results.json has it whole)."""
    header = ["encoder", "status", "steps x batch", "train s", "final loss", "kNN top-1", "linear top-1",
              "linear vs random init"]

    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    cells = []
    for row in rows:
        status = row["status"] if len(row["status"]) <= status_width else row["status"][: status_width - 3] + "..."
        cells.append([
            row["encoder"], status,
            f"{row['steps']} x {row['batch_size']}" if row.get("steps") is not None else "-",
            number(row.get("train_seconds"), ".0f"), number(row.get("final_loss"), ".4g"),
            number(row.get("knn_top1"), ".3f"), number(row.get("linear_top1"), ".3f"),
            "-" if row.get("linear_gain") is None else f"{100 * row['linear_gain']:+.1f} pts",
        ])
    widths = [max(len(line[column]) for line in [header, *cells]) for column in range(len(header))]
    lines = [header, ["-" * width for width in widths], *cells]
    return "\n".join("| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |"
                     for line in lines)


def write_outputs(out: Path, results: dict, names: list[str]) -> None:
    """results.json (atomically), results.csv and the HParams view of the methods `names` finished or failed."""
    results["updated_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    temporary = out / "results.json.tmp"
    temporary.write_text(json.dumps(results, indent=2) + "\n")
    temporary.replace(out / "results.json")
    rows = result_rows(results, [name for name in names if name in results["methods"]])
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    write_hparams(out / "hparams", rows)


def write_hparams(directory: Path, rows: list[dict]) -> None:
    """One TensorBoard HParams session per encoder, rewritten from the rows (a re-run shows no duplicates). Every
    session carries the same hyper-parameter and metric names (0 / "" / NaN where a row has no value), because
    TensorBoard reads the list of columns from one session's summary."""
    from torch.utils.tensorboard import SummaryWriter  # here: loads tensorboard, which nothing else needs

    shutil.rmtree(directory, ignore_errors=True)
    with SummaryWriter(str(directory)) as writer:
        for row in rows:
            hparams = {name: row.get(name) or "" for name in ("encoder", "method", "kind", "status", "recipe")}
            hparams |= {name: int(row.get(name) or 0) for name in ("steps", "batch_size")}
            metrics = {f"compare/{name}": float("nan") if row.get(name) is None else float(row[name])
                       for name in HPARAMS_METRICS}
            writer.add_hparams(hparams, metrics, run_name=re.sub(r"[^\w.-]+", "_", row["encoder"]))


HPARAMS_METRICS = ("knn_top1", "linear_top1", "linear_gain", "final_loss", "train_seconds")


# ------------------------------------------------------------------------------------------------ input
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise CompareError(f"{message} (see `vlp compare --help`)")


EPILOG = ("Any other --trainer.*, --model.*, --data.*, --seed_everything, --checkpoint.*, --non_finite.* or "
          "--global_batch.* option is a `vlp fit` option and applies to every method (e.g. --trainer.precision "
          "bf16-mixed). `vlp compare` sets --model, --trainer.max_steps and --trainer.default_root_dir itself.")


def parser() -> argparse.ArgumentParser:
    summary, _, details = __doc__.partition("\n\n")
    parser = _Parser(prog=PROG, description=f"{summary}\n\n{details}", allow_abbrev=False, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     usage=f"{PROG} --config RECIPE --methods NAME [NAME ...] (--steps N | --minutes M) "
                           "--probe-train SHARDS --probe-test SHARDS [options] [vlp fit options]")
    parser.add_argument("--config", action="append", type=Path, required=True, metavar="RECIPE",
                        help="base recipe, e.g. experiments/clip/emoji_tiny.yaml (repeat to stack fragments)")
    parser.add_argument("--methods", nargs="+", required=True, metavar="NAME",
                        help=f"methods of the index (SimCLR BYOL ..., any case), {ALL_IMAGE} for every image-only "
                             "one, or class paths of VLPMethod subclasses")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="optimizer steps per method")
    budget.add_argument("--minutes", type=float, help="wall-clock training minutes per method (step time calibrated)")
    parser.add_argument("--probe-train", required=True, metavar="SHARDS",
                        help="labelled shards (.cls) the kNN and the linear probe fit on")
    parser.add_argument("--probe-test", required=True, metavar="SHARDS", help="labelled shards they are scored on")
    parser.add_argument("--probe-train-samples", type=int, metavar="N", help="fit on the first N (default: all)")
    parser.add_argument("--probe-test-samples", type=int, metavar="N", help="score on the first N (default: all)")
    parser.add_argument("--train-shards", metavar="SHARDS",
                        help="shards every method trains on (default: the base recipe's data.train_shards)")
    parser.add_argument("--own-recipes", action="store_true",
                        help="train a method from experiments/<its folder>/<the base recipe's file name> when "
                             "that exists, instead of swapping it into the base recipe")
    parser.add_argument("--random-init", action="store_true",
                        help="add each method's encoder with its initial random weights as a reference row")
    parser.add_argument("--raw-pixels", action="store_true", help="add the raw pixels as a reference row")
    parser.add_argument("--raw-pixels-size", type=int, default=32, metavar="PX", help="side of the raw pixels (32)")
    parser.add_argument("--raw-pixels-channels", type=int, default=3, choices=(1, 3),
                        help="channels of the raw pixels (3; 1 for grey images)")
    parser.add_argument("--name", help="comparison name: the output folder runs/compare/<name> (default: the first "
                                       "--config's stem)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: runs/compare/<name>)")
    parser.add_argument("--force", action="store_true", help="re-run the methods that already finished")
    return parser


def parse_comparison(argv: list[str]) -> Comparison:
    """The command line -> a checked `Comparison`, or a `CompareError` sentence."""
    args, extra = parser().parse_known_args(argv)
    if args.steps is None and args.minutes is None:
        raise CompareError("no budget: give --steps N (optimizer steps per method) or --minutes M (wall-clock "
                           "minutes per method)")
    if (args.steps is not None and args.steps < 1) or (args.minutes is not None and not args.minutes > 0):
        given = f"--steps {args.steps}" if args.steps is not None else f"--minutes {args.minutes}"
        raise CompareError(f"{given}: the budget must be positive")
    for option in ("probe_train_samples", "probe_test_samples"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise CompareError(f"--{option.replace('_', '-')} {getattr(args, option)}: give a positive count")
    for config in args.config:
        if not config.is_file():
            raise CompareError(f"--config {config}: no such file; give a recipe such as "
                               "experiments/clip/emoji_tiny.yaml")
    overrides = checked_overrides(extra)
    methods = resolve_methods(args.methods)
    train_shards = args.train_shards or recipe_train_shards(args.config)
    check_shards("--train-shards" if args.train_shards else f"data.train_shards of {args.config[-1]}", train_shards)
    check_shards("--probe-train", args.probe_train, labelled=True)
    check_shards("--probe-test", args.probe_test, labelled=True)
    name = args.name or args.config[0].stem
    return Comparison(
        configs=args.config, methods=methods,
        budget=Budget(steps=args.steps, minutes=args.minutes),
        probe=Probe(args.probe_train, args.probe_test, args.probe_train_samples, args.probe_test_samples),
        out=args.out or Path("runs") / "compare" / name, train_shards=train_shards, own_recipes=args.own_recipes,
        random_init=args.random_init,
        raw_pixels=(args.raw_pixels_size, args.raw_pixels_channels) if args.raw_pixels else None,
        overrides=overrides, force=args.force, command=" ".join([PROG, *argv]),
    )


def checked_overrides(extra: list[str]) -> list[str]:
    """The `vlp fit` options passed through to every method; one sentence for anything else."""
    if extra and not extra[0].startswith("--"):
        raise CompareError(f"unexpected argument '{extra[0]}' (see `vlp compare --help`)")
    for argument in extra:
        if not argument.startswith("--"):
            continue
        key = argument[2:].split("=", 1)[0]
        if key in RESERVED:
            raise CompareError(f"--{key} is set by vlp compare; use {RESERVED[key]}")
        if key.split(".", 1)[0] not in PASSED_THROUGH:
            raise CompareError(f"unknown option '--{key}'; vlp compare passes only vlp fit options "
                               f"(--trainer.*, --model.*, --data.*, ...) to the methods (see `vlp compare --help`)")
    return extra


def recipe_train_shards(configs: list[Path]) -> str:
    """`data.train_shards` of the recipes (the last one that sets it, as `vlp fit` stacks them)."""
    found = None
    for config in configs:
        data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
        value = (data.get("init_args") or {}).get("train_shards", data.get("train_shards"))
        found = value if value is not None else found
    if not found:
        raise CompareError(f"{configs[-1]} sets no data.init_args.train_shards; give the shards every method trains "
                           "on with --train-shards SHARDS")
    return found


def check_shards(option: str, shards: str, labelled: bool = False) -> None:
    """One sentence when a shard pattern matches nothing, names missing files, or (probes) has no `.cls` labels."""
    urls = expand_shards(shards)
    if not urls:
        raise CompareError(f"{option} {shards!r} matches no shard file; {_BUILD_HINT}")
    for url in urls:
        path = local_path(url)
        if path is not None and not path.is_file():
            raise CompareError(f"{option} {shards!r}: shard {path} does not exist; {_BUILD_HINT}")
    if labelled and all(local_path(url) is not None for url in urls):
        members = shard_members(urls, manifest_of(urls))
        if "cls" not in members:
            raise CompareError(f"{option} {shards!r} has no .cls labels for the probes; give labelled shards "
                               "(vlp-data emoji writes the 10 emoji categories as .cls)")


def main(argv: list[str] | None = None) -> int:
    """`vlp compare ...` (and, with `--one SPEC`, the subprocess of one method)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--one"] and len(argv) == 2:
        return run_one(argv[1])
    try:
        comparison = parse_comparison(argv)
        _, status = run_comparison(comparison)
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    except (CompareError, DataConfigError) as error:
        sys.stderr.write(f"{PROG}: error: {error}\n")
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
