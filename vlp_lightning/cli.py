"""`vlp`: the one entry point. `vlp fit|validate|test|predict --config experiments/<method>/<data>.yaml`.

A LightningCLI with the model and the data in subclass mode, so any method or data module is chosen by class path
(`--model vlp_lightning.methods.SwAV`). Defaults a user expects: TensorBoard logs under `runs/<method>/<experiment>/`,
checkpoints (with `last.ckpt`) in one folder per experiment so `--ckpt_path last` resumes, an LR monitor, a progress
bar and a fixed seed. Bad input ends with one sentence and exit code 2, never a traceback wall.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from data_modules import DataConfigError
from vlp_lightning import methods
from vlp_lightning.callbacks.global_batch import GlobalBatchSize
from vlp_lightning.callbacks.non_finite_loss import NonFiniteLossError, NonFiniteLossGuard
from vlp_lightning.methods.base import CheckpointMismatchError, VLPMethod

DESCRIPTION = (
    "vlp_lightning: train and evaluate vision / vision-language pretraining methods. "
    "Pick a recipe with --config experiments/<method>/<data>_<size>.yaml, swap the method with "
    "--model vlp_lightning.methods.<Name>, see every knob with --print_config, and follow runs with "
    "`tensorboard --logdir runs`."
)


def available_methods() -> list[str]:
    """Class paths of every method in the index, for error messages and --help."""
    names = [name for name in methods.__all__ if name not in {"VLPMethod", "WarmupCosineLR"}]
    return [f"vlp_lightning.methods.{name}" for name in names]


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
    if keys[:1] == ["model"] and re.search(r"has no attribute|No module named|not accessible", message) and given:
        listing = ", ".join(available_methods())
        return f"unknown method '{given.group(1)}'; available methods: {listing}."
    details = re.findall(r'Parser key "[^"]+":\s*\n\s*(?:- )?(.+)', message)
    if keys:
        detail = details[-1].strip() if details else (given.group(0) if given else message.strip())
        return f"bad value for '{'.'.join(keys)}': {detail} (see --help or --print_config for the expected types)"
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return " ".join(lines[:2])


class VLPCLI(LightningCLI):
    """LightningCLI with the suite's defaults; see the module docstring."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
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

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--experiment",
            type=str | None,
            default=None,
            help="Run name under runs/<method>/ (default: the --config file's stem). Checkpoints of one experiment "
            "share runs/<method>/<experiment>/checkpoints so `--ckpt_path last` resumes it.",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": "link", "checkpoint.save_top_k": 1})
        parser.add_lightning_class_args(NonFiniteLossGuard, "non_finite")
        parser.add_lightning_class_args(GlobalBatchSize, "global_batch")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        method = config.model.class_path.rsplit(".", 1)[-1].lower()
        experiment = config.experiment or _config_stem(config) or "default"
        run_dir = Path("runs") / method / experiment
        if config.trainer.logger in (None, True):
            config.trainer.logger = {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": f"{method}/{experiment}"},
            }
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(run_dir / "checkpoints")

    def _parse_ckpt_path(self) -> None:
        """Lightning would overlay a checkpoint's saved hyper-parameters on the config, silently replacing the method
        or arguments the user set. Here the config stays the truth and a checkpoint that contradicts it is refused
        in one sentence (weight shapes are checked again when it loads, in `VLPMethod.on_load_checkpoint`)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():  # "last", or a sharded checkpoint folder
            return
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        conflict = _hyper_parameter_conflict(checkpoint.get("hyper_parameters", {}), self.config[subcommand].model)
        if conflict:
            raise CheckpointMismatchError(
                f"{ckpt_path} {conflict}; resume with the method and arguments it was trained with, or start a new "
                "run with --experiment <name>"
            )


def _hyper_parameter_conflict(saved: dict, model: Namespace) -> str | None:
    """What the checkpoint's saved hyper-parameters contradict in the model config, in words, or None."""
    saved_class = saved.get("_class_path")
    if saved_class and _import_class(saved_class) is not _import_class(model.class_path):
        return f"was written by {saved_class}, not {model.class_path}"
    for name, value in saved.items():
        configured = (model.init_args or {}).get(name, value)
        if not name.startswith("_") and configured != value:
            return f"was trained with model.init_args.{name}={value!r}, but the config sets {configured!r}"
    return None


def _import_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _config_stem(config) -> str | None:
    paths = config.get("config") or []
    return Path(str(paths[0])).stem if paths else None


def main(args: list[str] | None = None) -> None:
    """Console entry point of `vlp`."""
    try:
        VLPCLI(args=args)
    except (DataConfigError, CheckpointMismatchError) as error:
        sys.stderr.write(f"vlp: error: {error}\n")
        sys.exit(2)
    except NonFiniteLossError as error:
        sys.stderr.write(f"vlp: stopped: {error}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
