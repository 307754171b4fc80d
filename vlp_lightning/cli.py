"""`vlp`: the one entry point. `vlp fit|validate|test|predict --config experiments/<method>/<data>.yaml`.

A LightningCLI with the model and the data in subclass mode, so any method or data module is chosen by class path
(`--model vlp_lightning.methods.SwAV`). Defaults a user expects: TensorBoard logs under `runs/<method>/<experiment>/`,
checkpoints (with `last.ckpt`) in one folder per experiment so `--ckpt_path last` resumes, an LR monitor, a progress
bar and a fixed seed. Bad input ends with one sentence and exit code 2, never a traceback wall.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import re
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from data_modules import DataConfigError
from vlp_lightning import methods
from vlp_lightning.callbacks.embedding_writer import EmbeddingWriter
from vlp_lightning.callbacks.global_batch import GlobalBatchSize
from vlp_lightning.callbacks.model_summary import VLPModelSummary
from vlp_lightning.callbacks.non_finite_loss import NonFiniteLossError, NonFiniteLossGuard
from vlp_lightning.callbacks.progress import VLPProgressBar
from vlp_lightning.checkpoints import (
    AtomicModelCheckpoint,
    ExperimentLock,
    ExperimentLockedError,
    newest_complete_checkpoint,
    remove_partial_saves,
    switch_link,
)
from vlp_lightning.hardware import default_precision
from vlp_lightning.methods.base import CheckpointMismatchError, VLPMethod

log = logging.getLogger(__name__)

DESCRIPTION = (
    "vlp_lightning: train and evaluate vision / vision-language pretraining methods. "
    "Pick a recipe with --config experiments/<method>/<data>_<size>.yaml, swap the method with "
    "--model vlp_lightning.methods.<Name>, see every knob with --print_config, and follow runs with "
    "`tensorboard --logdir runs`. "
    "Other commands (each with --help): `vlp methods [NAME]` lists the methods and how to run them, "
    "`vlp compare` trains several methods on the same data for the same budget and prints one table, "
    "`vlp export CKPT OUT` writes a checkpoint's towers for timm / open_clip / transformers, "
    "`vlp fewshot` trains a recipe on K shots per class for several K and seeds and prints the curve, "
    "`vlp scaling` trains it on 1/8 ... all of a data pool and fits score against log data size, "
    "`vlp active` runs PCB's rounds of active prompt learning (train, score the pool, label a balanced budget), "
    "`vlp backbones CKPT ...` scores checkpoints on the same tasks (kNN, linear, few-shot, zero-shot, retrieval), "
    "`vlp benchx CKPT ...` fine-tunes them the same way with a learning-rate search (BenchX)."
)

#: `vlp <command>` outside Lightning's fit / validate / test / predict: command -> module with `main(argv) -> int`.
COMMANDS = {
    "methods": "vlp_lightning.commands.methods",
    "compare": "vlp_lightning.commands.compare",
    "export": "vlp_lightning.commands.export",
    "fewshot": "vlp_lightning.commands.fewshot",
    "active": "vlp_lightning.commands.active",
    "scaling": "vlp_lightning.commands.scaling",
    "backbones": "vlp_lightning.commands.backbones",
    "benchx": "vlp_lightning.commands.benchx",
}


def available_methods() -> list[str]:
    """Class paths of every method in the index, for error messages and --help."""
    return [f"vlp_lightning.methods.{name}" for name in methods.method_names()]


class VLPArgumentParser(LightningArgumentParser):
    """Turns jsonargparse's multi-paragraph errors into one sentence plus a hint, and exits with code 2."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # an inner parse that jsonargparse catches itself (e.g. trying Union members)
            return super().error(message, ex)
        sys.stderr.write(f"vlp: error: {concise_error(message)}\n")
        sys.exit(2)


def concise_error(message: str) -> str:
    """The useful sentence of a jsonargparse error: the full key path, what was expected, the list of methods for
    an unknown one."""
    given = re.search(r"Given value: (.+)$", message.strip())
    keys = re.findall(r'Parser key "([^"]+)"', message)
    nested = re.search(r"Given value: NestedArg\(key='([^']+)', val='(.*)'\)$", message.strip())
    if keys and nested:  # `--model.init_args.x v` / `--data.x v` under a class chosen by class_path
        return _nested_argument_error(message, f"{keys[0]}.init_args.{nested.group(1)}", nested.group(2))
    if keys[:1] == ["model"] and re.search(r"has no attribute|No module named|not accessible", message) and given:
        listing = ", ".join(available_methods())
        return f"unknown method '{given.group(1)}'; available methods: {listing}."
    details = re.findall(r'Parser key "[^"]+":\s*\n\s*(?:- )?(.+)', message)
    if keys:
        detail = details[-1].strip() if details else (given.group(0) if given else message.strip())
        return f"bad value for '{'.'.join(keys)}': {detail} (see --help or --print_config for the expected types)"
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return " ".join(lines[:2])


def _nested_argument_error(message: str, key: str, value: str) -> str:
    """An unknown or badly typed argument of the chosen method or data module, from jsonargparse's Union report."""
    key = key.replace(".init_args.init_args.", ".init_args.")
    chosen = re.search(r"Problem with given class_path '([^']+)'", message)
    owner = chosen.group(1) if chosen else key.split(".")[0]
    if re.search(r"Option '[^']+' is not accepted|No action for key", message):
        return f"unknown argument '{key}' for {owner}; `--print_config` lists the arguments it takes"
    innermost = message[message.rfind("Parser key"):]
    expected = [name for name in re.findall(r"Expected an? <class '([\w.]+)'>", innermost) if name != "NoneType"]
    detail = f"expected {' or '.join(expected)}" if expected else innermost.splitlines()[1].strip(" -")
    return f"bad value {value!r} for '{key}' of {owner}: {detail} (see --help or --print_config for the expected types)"


class VLPCLI(LightningCLI):
    """LightningCLI with the suite's defaults; see the module docstring."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        quiet_lightning_noise()
        self.experiment_lock: ExperimentLock | None = None
        try:
            super().__init__(
                model_class=VLPMethod,
                datamodule_class=LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                seed_everything_default=0,
                parser_class=VLPArgumentParser,
                parser_kwargs={"description": DESCRIPTION},
                save_config_kwargs={"overwrite": True},
                trainer_defaults={"callbacks": [LearningRateMonitor(logging_interval="step")]},
                auto_configure_optimizers=False,
                args=args,
                run=run,
            )
        finally:
            if self.experiment_lock is not None:
                self.experiment_lock.release()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--experiment",
            type=str | None,
            default=None,
            help="Run name under runs/<method>/ (default: the --config file's stem). Checkpoints of one experiment "
            "share runs/<method>/<experiment>/checkpoints so `--ckpt_path last` resumes it. "
            "--trainer.default_root_dir DIR puts the whole run in DIR instead (logs DIR/version_N, DIR/checkpoints).",
        )
        parser.add_argument(
            "--allow_fresh_start",
            type=bool,
            default=False,
            help="With --ckpt_path last: start from step 0 when the experiment has no complete checkpoint yet "
            "(without it, vlp stops and says so).",
        )
        parser.add_lightning_class_args(AtomicModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": "link", "checkpoint.save_top_k": 1})
        parser.add_lightning_class_args(NonFiniteLossGuard, "non_finite")
        parser.add_lightning_class_args(GlobalBatchSize, "global_batch")

    def before_instantiate_classes(self) -> None:
        """A config that sets no precision gets the fastest correct one for the hardware, said once: bf16 autocast
        on CPUs with native bf16 (AVX-512 BF16 / AMX) and on GPUs since Ampere, fp32 elsewhere
        (`hardware.default_precision`). A precision set in the recipe or on the command line is kept."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        if config.trainer.get("precision") is None:
            precision, reason = default_precision(config.trainer.get("accelerator"))
            config.trainer.precision = precision
            rank_zero_info(f"precision {precision}: the config sets none and {reason} "
                           "(set --trainer.precision to choose)")

    def instantiate_classes(self) -> None:
        """As LightningCLI, then hand the method its model config (JSON), which it stores in its checkpoints. A
        constructor's own one-sentence error (a missing `start_from`, a model that cannot be fetched) reaches the
        user as that sentence, not as jsonargparse's report of every type it then tried (`ConstructorError`)."""
        try:
            super().instantiate_classes()
        except Exception as error:
            sentence = constructor_sentence(error)
            if sentence is None:
                raise
            raise ConstructorError(sentence) from error
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        self.model.model_config = json.dumps(config.model.as_dict(), default=str)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        """`vlp predict` writes embeddings (`--predictions.path`) instead of collecting them in memory."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            parser.add_lightning_class_args(EmbeddingWriter, "predictions")
            parser.set_defaults({"return_predictions": False})
        return parser

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """The suite's progress bar and model summary, unless the config brings its own or turns them off."""
        configured = list(callbacks) + list(config.get("callbacks") or [])
        if config.get("enable_progress_bar") is not False and not any(
                isinstance(callback, ProgressBar) for callback in configured):
            callbacks = [*callbacks, VLPProgressBar()]
        if config.get("enable_model_summary") is not False and not any(
                isinstance(callback, ModelSummary) for callback in configured):
            callbacks = [*callbacks, VLPModelSummary()]
        return super()._instantiate_trainer(config, callbacks)

    def _parse_ckpt_path(self) -> None:
        """Runs before anything is instantiated: fill in the run's folders, take the experiment lock (fit), resolve
        `--ckpt_path last` to the newest complete checkpoint, and check an explicit checkpoint.

        Lightning would overlay a checkpoint's saved hyper-parameters on the config, silently replacing the method
        or arguments the user set. Here the config stays the truth and a checkpoint that contradicts it is refused
        in one sentence (weight shapes are checked again when it loads, in `VLPMethod.on_load_checkpoint`)."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        checkpoints = _set_run_folders(config)
        if subcommand == "fit" and _launched_as_rank_zero():
            self.experiment_lock = ExperimentLock(checkpoints)
            self.experiment_lock.acquire()
            for leftover in remove_partial_saves(checkpoints) if checkpoints.is_dir() else []:
                log.warning("removed %s, a checkpoint save that was interrupted", leftover)
        ckpt_path = config.get("ckpt_path") if subcommand else None
        if ckpt_path == "last":
            ckpt_path = config.ckpt_path = _resume_path(checkpoints, config.allow_fresh_start)
        if ckpt_path and subcommand == "fit":  # a resumed run writes into its own non-empty checkpoint folder
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        if not ckpt_path or ckpt_path.split(":")[0] in _LIGHTNING_CKPT_NAMES or Path(ckpt_path).is_dir():  # sharded
            return
        checkpoint = load_checkpoint_for_check(ckpt_path)
        conflict = _hyper_parameter_conflict(checkpoint.get("hyper_parameters", {}), config.model)
        if conflict:
            raise CheckpointMismatchError(
                f"{ckpt_path} {conflict}; resume with the method and arguments it was trained with, or start a new "
                "run with --experiment <name>"
            )


_LIGHTNING_CKPT_NAMES = ("best", "hpc", "registry")


def _set_run_folders(config: Namespace) -> Path:
    """Default logger and checkpoint folder of the run; returns the checkpoint folder.

    The run lives in `runs/<method>/<experiment>/`, or in `--trainer.default_root_dir` when that is given
    (Lightning's convention: the folder of one run's logs and checkpoints)."""
    method = config.model.class_path.rsplit(".", 1)[-1].lower()
    experiment = config.experiment or _config_stem(config) or "default"
    root = config.trainer.get("default_root_dir")
    run_dir = Path(root) if root else Path("runs") / method / experiment
    if config.trainer.logger in (None, True):
        config.trainer.logger = {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": str(run_dir), "name": ""},
        }
    if config.checkpoint.dirpath is None:
        config.checkpoint.dirpath = str(run_dir / "checkpoints")
    return Path(config.checkpoint.dirpath)


def _launched_as_rank_zero() -> bool:
    """This process is global rank 0 (or not distributed): launchers set these before the script starts."""
    return all(int(os.environ.get(name, 0)) == 0 for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _resume_path(checkpoints: Path, allow_fresh_start: bool) -> str | None:
    """`--ckpt_path last`: the newest complete checkpoint of the folder, reached through `last.ckpt` (re-pointed at
    it when a kill or a full disk left the link dangling or on an incomplete file); None (start fresh) or an error
    when there is none."""
    newest, passed_over = newest_complete_checkpoint(checkpoints)
    for path in passed_over:
        log.warning("--ckpt_path last: passing over %s, which is not a complete checkpoint", path)
    if newest is None:
        if allow_fresh_start:
            log.warning("--ckpt_path last: %s holds no complete checkpoint; starting from step 0", checkpoints)
            return None
        raise CheckpointError(
            f"--ckpt_path last: {checkpoints} holds no complete checkpoint to resume; drop --ckpt_path to start the "
            "experiment from step 0, or add --allow_fresh_start true to do so whenever there is nothing to resume"
        )
    link = checkpoints / "last.ckpt"
    if link.resolve() != newest and (link.is_symlink() or not link.exists()) and _launched_as_rank_zero():
        log.warning("--ckpt_path last: %s did not lead to the newest complete checkpoint; re-pointed it at %s",
                    link, newest.name)
        switch_link(newest, link)
    return str(link if link.resolve() == newest else newest)


class ConstructorError(ValueError):
    """A method, module or data module refused its arguments with a sentence of its own (`constructor_sentence`)."""


#: what the suite's constructors raise for a bad argument (each a one-sentence message naming the value and the fix).
_CONSTRUCTOR_ERRORS = (ValueError, RuntimeError, ImportError, FileNotFoundError)
_SUITE_SOURCES = (f"{os.sep}vlp_lightning{os.sep}", f"{os.sep}data_modules{os.sep}")


def constructor_sentence(error: BaseException) -> str | None:
    """The message of the innermost exception in `error`'s chain that suite code raised (its traceback ends in
    vlp_lightning/ or data_modules/) and that is a bad-argument kind (`_CONSTRUCTOR_ERRORS`); None otherwise, so
    a bug's traceback is never hidden."""
    found, seen = None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        frames = traceback.extract_tb(error.__traceback__)
        if isinstance(error, _CONSTRUCTOR_ERRORS) and frames and any(part in frames[-1].filename
                                                                     for part in _SUITE_SOURCES):
            found = str(error).strip().splitlines()[0] if str(error).strip() else None
        error = error.__cause__ or error.__context__
    return found


class CheckpointError(ValueError):
    """A checkpoint path that cannot be resumed: missing, incomplete, unsafe, or nothing to resume."""


#: errors of a run's input (data, checkpoint, experiment folder) that end in one sentence and exit status 2.
USER_ERRORS = (DataConfigError, CheckpointMismatchError, CheckpointError, ExperimentLockedError,
               ConstructorError)


def load_checkpoint_for_check(
    ckpt_path: str,
    name: str = "--ckpt_path",
    if_missing: str = "give the path of a checkpoint, or --ckpt_path last to resume the experiment's newest one",
    if_incomplete: str = "resume from another one (--ckpt_path last picks the newest complete checkpoint of the "
    "experiment)",
) -> dict:
    """The checkpoint's contents (weights only, memory-mapped), or a `CheckpointError` sentence saying what is wrong
    with the file and what to do. `name` is how the sentence calls the path (the option or argument that gave it);
    `if_missing` / `if_incomplete` are the fixes it proposes for a missing file and an unreadable one."""
    path = Path(ckpt_path)
    if not path.exists():
        raise CheckpointError(f"{name} {ckpt_path}: no such file; {if_missing}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0] if "Weights only load failed" not in str(error) else ""
        raise CheckpointError(
            f"{name} {ckpt_path} holds pickled Python objects{f' ({reason})' if reason else ''}, which vlp "
            "never loads (a checkpoint could run code); use a checkpoint written by vlp (tensors and plain values)"
        ) from None
    except Exception as error:
        raise CheckpointError(
            f"{name} {ckpt_path} is not a complete checkpoint ({type(error).__name__}: "
            f"{(str(error).strip().splitlines() or ['empty file'])[0]}); {if_incomplete}"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{name} {ckpt_path} is not a Lightning checkpoint (no state_dict); give a checkpoint written by vlp"
        )
    return checkpoint


def _hyper_parameter_conflict(saved: dict, model: Namespace) -> str | None:
    """What the checkpoint's saved hyper-parameters contradict in the model config, in words, or None.

    The saved class path is compared by name with the classes of the methods index and the configured one: a
    checkpoint never chooses what is imported."""
    saved_class = saved.get("_class_path")
    if saved_class and saved_class != model.class_path:
        known = _known_method_classes(model.class_path)
        if saved_class not in known:
            return (f"was written by {saved_class}, which is neither a method of vlp_lightning.methods nor the "
                    f"configured {model.class_path}")
        if known[saved_class] is not known[model.class_path]:
            return f"was written by {saved_class}, not {model.class_path}"
    for name, value in saved.items():
        configured = (model.init_args or {}).get(name, value)
        if not name.startswith("_") and _plain(configured) != _plain(value):
            return f"was trained with model.init_args.{name}={value!r}, but the config sets {configured!r}"
    return None


def _plain(value: Any) -> Any:
    """A value as YAML would write it: tuples as lists (a checkpoint and a parsed config may differ only there)."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _known_method_classes(configured: str) -> dict[str, type]:
    """Class path -> class for every class of the methods index (under both of its paths) and the configured one."""
    classes = [getattr(methods, name) for name in methods.__all__] + [_import_class(configured)]
    known = {f"vlp_lightning.methods.{cls.__name__}": cls for cls in classes if hasattr(methods, cls.__name__)}
    known.update({f"{cls.__module__}.{cls.__qualname__}": cls for cls in classes})
    known[configured] = classes[-1]
    return known


def _import_class(class_path: str) -> type:
    """The class of a path the user gave (on the command line or in YAML), never one read from a checkpoint."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _config_stem(config) -> str | None:
    paths = config.get("config") or []
    return Path(str(paths[0])).stem if paths else None


class _DropLightningNoise(logging.Filter):
    """Lightning's cloud-logger tip, and its note that the suite's own model summary replaces its default one."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "litlogger" not in message and "Skipping setting a default `ModelSummary`" not in message


def quiet_lightning_noise() -> None:
    """Drop start-up messages a user cannot act on: Lightning's cloud-logger advertisement, its model-summary note
    and the deprecation warning Lightning's own `_pytree` helper triggers in PyTorch (nothing in the suite uses
    `LeafSpec`)."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # where rank_zero_info logs
    if not any(isinstance(existing, _DropLightningNoise) for existing in logger.filters):
        logger.addFilter(_DropLightningNoise())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)


def main(args: list[str] | None = None) -> None:
    """Console entry point of `vlp`."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in COMMANDS:
        sys.exit(importlib.import_module(COMMANDS[argv[0]]).main(argv[1:]))
    try:
        VLPCLI(args=args)
    except USER_ERRORS as error:
        sys.stderr.write(f"vlp: error: {error}\n")
        sys.exit(2)
    except NonFiniteLossError as error:
        sys.stderr.write(f"vlp: stopped: {error}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
