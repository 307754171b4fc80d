"""`vlp`: the one entry point. `vlp fit|validate|test|predict --config experiments/<method>/<data>.yaml`.

A LightningCLI with the model and the data in subclass mode, so any method or data module is chosen by class path
(`--model vlp_lightning.methods.SwAV`). Defaults a user expects: TensorBoard logs under `runs/<method>/<experiment>/`,
checkpoints (with `last.ckpt`) in one folder per experiment so `--ckpt_path last` resumes, an LR monitor, a progress
bar and a fixed seed. Bad input ends with one sentence and exit code 2, never a traceback wall.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from data_modules import DataConfigError
from vlp_lightning import methods
from vlp_lightning.callbacks.non_finite_loss import NonFiniteLossError, NonFiniteLossGuard
from vlp_lightning.methods.base import VLPMethod

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


def _config_stem(config) -> str | None:
    paths = config.get("config") or []
    return Path(str(paths[0])).stem if paths else None


def main(args: list[str] | None = None) -> None:
    """Console entry point of `vlp`."""
    try:
        VLPCLI(args=args)
    except DataConfigError as error:
        sys.stderr.write(f"vlp: error: {error}\n")
        sys.exit(2)
    except NonFiniteLossError as error:
        sys.stderr.write(f"vlp: stopped: {error}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
