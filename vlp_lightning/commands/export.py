"""`vlp export CKPT OUT`: a trained checkpoint's towers in the formats timm, open_clip and transformers load.

A vlp checkpoint's hyper-parameters do not hold its towers (they are modules, passed to the method, not saved as
arguments), so the method is rebuilt from the run's config: the `config.yaml` that `vlp fit` writes next to the run's
logs (`<run>/version_N/config.yaml`, found from the checkpoint's `<run>/checkpoints/` folder) or the file given with
`--config`. The method's class must be one of `vlp_lightning.methods` and every class the model config names must be
vlp's or torch's: a file never chooses other code to import. The optimizer and schedule are not needed and not built;
the weights come from the checkpoint, loaded strictly with `weights_only=True`, never from `pretrained_path` files.

Every method's image tower goes to `OUT/vision/` (timm); a CLIP-family method whose towers open_clip's CLIP can
express goes to `OUT/open_clip/` as well, and a Hugging Face text tower to `OUT/text/`. Weights are safetensors and
configs JSON: nothing written is pickled. `write_exports(method, out)` does the same for a method built in Python.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import safetensors.torch
import yaml
from jsonargparse import Namespace
from torch import Tensor, nn

from vlp_lightning import methods
from vlp_lightning.cli import (
    CheckpointError,
    _hyper_parameter_conflict,
    available_methods,
    concise_error,
    load_checkpoint_for_check,
)
from vlp_lightning.methods.base import VLPMethod, _class_path, _state_dict_differences
from vlp_lightning.modules.open_clip_import import open_clip_config_from_vlp, vlp_state_dict_to_open_clip
from vlp_lightning.modules.text import HFTextEncoder, TextTransformer
from vlp_lightning.modules.tokenizers import HFTokenizer
from vlp_lightning.modules.vision import VisionEncoder

DESCRIPTION = (
    "Write the towers of a vlp checkpoint CKPT into the folder OUT, as safetensors weights with JSON configs (no "
    "pickle), for timm, open_clip and transformers. The model is rebuilt from the run's config.yaml, which `vlp fit` "
    "saves next to the run's logs (<run>/version_N/config.yaml, found from CKPT in <run>/checkpoints/), or from "
    "--config; then CKPT's weights are loaded into it strictly."
)
EPILOG = """\
what is written, and how to load it:
  OUT/vision/     every method's image tower as a timm model (pooled features, no classifier):
                  config.json (architecture, model_args, pretrained_cfg with input_size, mean, std) + model.safetensors
                    model = timm.create_model("local-dir:OUT/vision", pretrained=True)
                  or, equivalently:
                    cfg = json.load(open("OUT/vision/config.json"))
                    model = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"])
                    model.load_state_dict(safetensors.torch.load_file("OUT/vision/model.safetensors"))
                  (a tower trained without its head convolution lists the modules to set to torch.nn.Identity()
                  before load_state_dict in cfg["identity_modules"])
  OUT/open_clip/  CLIP-family methods with a timm ViT, the built-in text tower, CLIP BPE and linear projections,
                  as open_clip's CLIP: open_clip_config.json (model_cfg, preprocess_cfg) + open_clip_model.safetensors
                    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:OUT/open_clip")
                    tokenizer = open_clip.get_tokenizer("local-dir:OUT/open_clip")
  OUT/text/       a Hugging Face text tower (HFTextEncoder) with save_pretrained, its tokenizer, and
                  vlp_pooling.json (how vlp pools last_hidden_state over the attention mask: mean, max or cls)
                    model = transformers.AutoModel.from_pretrained("OUT/text")
                    tokenizer = transformers.AutoTokenizer.from_pretrained("OUT/text")
                  (BERT-like models report their pooler as newly initialised: vlp never trained or used it;
                  add_pooling_layer=False leaves it out)
methods without a joint image-text space (SwAV, MAE, DINO, ...) export the vision tower only; each output that is
not written gets one line saying why.

example:
  vlp export runs/clip/emoji_tiny/checkpoints/last.ckpt exported/clip_emoji_tiny
"""

#: the subfolders `vlp export` writes (and `--overwrite` replaces).
OUTPUTS = ("vision", "open_clip", "text")
#: class-path prefixes a model config may name (a config file never chooses other code to import).
TRUSTED_PREFIXES = ("vlp_lightning.", "torch.")
#: model arguments export never builds: training only, and they may name classes from anywhere.
TRAINING_ONLY = ("optimizer", "lr_scheduler")
#: `vlp fit` trains; its eval view takes the centred square of the whole image, resized bilinearly.
EVAL_PREPROCESSING = {"interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}
#: pretrained_cfg entries timm needs to rebuild and feed the model (the rest describe timm's own released weights).
TIMM_PRETRAINED_KEYS = ("input_size", "fixed_input_size", "mean", "std", "num_classes", "pool_size", "first_conv",
                        "classifier", *EVAL_PREPROCESSING)


class ExportError(ValueError):
    """Bad input to `vlp export`, as one sentence naming the value and the fix."""


class ExportArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (the vlp convention) instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"vlp export: error: {message} (see vlp export --help)\n")


def parser() -> ExportArgumentParser:
    """The `vlp export` command line."""
    parser = ExportArgumentParser(
        prog="vlp export",
        description=textwrap.fill(DESCRIPTION, width=100),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="a checkpoint of vlp fit, e.g. .../checkpoints/last.ckpt")
    parser.add_argument("out", metavar="OUT", help="folder to write vision/, open_clip/ and text/ into")
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="the config CKPT was trained with (default: the run's config.yaml that vlp fit wrote, found from CKPT)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the vision/, open_clip/, text/ of an earlier export in OUT"
    )
    return parser


def main(argv: list[str]) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as stop:  # --help (0), or a usage error already printed in one line (2)
        return int(stop.code or 0)
    out = Path(args.out)
    try:
        check_output(out, args.overwrite)
        method, config = load_method(args.checkpoint, args.config)
        for name in OUTPUTS:  # only an earlier export's folders: OUT was empty or --overwrite was given
            if (out / name).is_dir():
                shutil.rmtree(out / name)
        lines = write_exports(method, out)
    except (ExportError, CheckpointError) as error:
        sys.stderr.write(f"vlp export: error: {error}\n")
        return 2
    except OSError as error:
        sys.stderr.write(f"vlp export: error: cannot write into OUT {out} ({error}); give a folder you can write to\n")
        return 2
    print(f"vlp export: {args.checkpoint} ({_class_path(method)}, built from {config}) -> {out}")
    print("\n".join(f"  {line}" for line in lines))
    return 0


def check_output(out: Path, overwrite: bool) -> None:
    """OUT, checked before the (slow) model build: a folder that is new, empty, or given to `--overwrite`."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"OUT {out} is a file; give a folder to write the exported towers into")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(
            f"OUT {out} already holds files; pass --overwrite to replace an earlier export there, or give another "
            "folder"
        )


# ---------------------------------------------------------------------------------------------- rebuild the method
def load_method(checkpoint_path: str, config_path: str | None = None) -> tuple[VLPMethod, Path]:
    """The method a checkpoint was trained as, in eval mode with the checkpoint's weights, and the config it was
    built from (`config_path`, or the run's config.yaml); an `ExportError` / `CheckpointError` sentence otherwise."""
    if Path(checkpoint_path).is_dir():
        raise ExportError(
            f"CKPT {checkpoint_path} is a folder; give a checkpoint file (a sharded checkpoint folder becomes one with "
            f"python -m lightning.pytorch.utilities.consolidate_checkpoint {checkpoint_path})"
        )
    checkpoint = load_checkpoint_for_check(
        checkpoint_path,
        name="CKPT",
        if_missing="give the path of a checkpoint written by vlp fit, e.g. runs/clip/emoji_tiny/checkpoints/last.ckpt",
        if_incomplete="export another checkpoint of the run",
    )
    config = Path(config_path) if config_path else find_run_config(Path(checkpoint_path))
    model_config = read_model_config(config)
    method, parsed = build_method(model_config, config)
    redo = f"pass --config with the config {checkpoint_path} was trained with"
    conflict = _hyper_parameter_conflict(checkpoint.get("hyper_parameters", {}), parsed)
    if conflict:
        raise ExportError(f"{checkpoint_path} {conflict} ({config}); {redo}")
    written_by = checkpoint.get("vlp", {}).get("method")
    if written_by is not None and written_by != _class_path(method):
        raise ExportError(f"{checkpoint_path} was written by {written_by}, but {config} builds {_class_path(method)}; "
                          f"{redo}")
    differences = _state_dict_differences(checkpoint["state_dict"], method.state_dict(), strict=True)
    if differences:
        raise ExportError(
            f"{checkpoint_path} does not fit the {type(method).__name__} that {config} builds ({len(differences)} "
            f"tensors differ, e.g. {'; '.join(differences[:3])}); {redo}"
        )
    method.load_state_dict(checkpoint["state_dict"], strict=True)
    return method.eval(), config


def find_run_config(checkpoint_path: Path) -> Path:
    """The config.yaml `vlp fit` saved for the run of `<run>/checkpoints/<ckpt>`: the newest `<run>/version_N/` one
    (each resume writes another), provided they all configure the same model."""
    run = checkpoint_path.parent.parent
    found = sorted(run.glob("version_*/config.yaml"), key=lambda path: _version_number(path.parent.name))
    found += [run / "config.yaml"] if (run / "config.yaml").is_file() else []
    if not found:
        raise ExportError(
            f"found no config.yaml of the run of {checkpoint_path} (vlp fit writes {run}/version_N/config.yaml); "
            "pass --config with the config it was trained with"
        )
    models = {path: read_model_config(path) for path in found}
    differing = [path for path in found if models[path] != models[found[-1]]]
    if differing:
        raise ExportError(
            f"{differing[-1]} and {found[-1]} configure different models; pass --config with the one "
            f"{checkpoint_path} was trained with"
        )
    return found[-1]


def _version_number(name: str) -> int:
    suffix = name.removeprefix("version_")
    return int(suffix) if suffix.isdigit() else -1


def read_model_config(config: Path) -> dict[str, Any]:
    """The `model:` section of a vlp YAML, without its training-only arguments and with the weights taken from the
    checkpoint instead of pretrained files; its class paths checked."""
    if not config.is_file():
        raise ExportError(
            f"--config {config}: no such file; give the run's config.yaml or the recipe it was trained with"
        )
    try:
        document = yaml.safe_load(config.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ExportError(
            f"--config {config} is not YAML ({type(error).__name__}); give the run's config.yaml"
        ) from None
    model = document.get("model") if isinstance(document, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("class_path"), str):
        raise ExportError(
            f"{config} has no model.class_path; give the run's config.yaml (vlp fit writes it next to the logs) or "
            "the recipe it was trained with"
        )
    init_args = {name: value for name, value in (model.get("init_args") or {}).items() if name not in TRAINING_ONLY}
    model = _weights_from_checkpoint({"class_path": model["class_path"], "init_args": init_args})
    _check_class_paths(model, config)
    return model


def _weights_from_checkpoint(node: Any) -> Any:
    """Towers built without reading pretrained weights (the checkpoint holds them): no `pretrained_path`, and a
    Hugging Face tower from its config alone."""
    if isinstance(node, list):
        return [_weights_from_checkpoint(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {name: _weights_from_checkpoint(value) for name, value in node.items()}
    init_args = node.get("init_args")
    if isinstance(init_args, dict):
        if "pretrained_path" in init_args:
            init_args["pretrained_path"] = None
        if str(node.get("class_path", "")).endswith("HFTextEncoder"):
            init_args["from_config"] = True
    return node


def _class_paths(node: Any, key: str) -> Iterator[tuple[str, str]]:
    """(key, class path) of every class a config section names, e.g. ("model.init_args.text", "...TextTransformer")."""
    if isinstance(node, dict):
        if isinstance(node.get("class_path"), str):
            yield key, node["class_path"]
        for name, value in node.items():
            yield from _class_paths(value, f"{key}.{name}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _class_paths(value, f"{key}.{index}")


def _check_class_paths(model: dict[str, Any], config: Path) -> None:
    """The method must be in the methods index (compared by name, before anything is imported), the other classes
    vlp's or torch's."""
    classes = [getattr(methods, path.rsplit(".", 1)[1]) for path in available_methods()]
    index = set(available_methods()) | {f"{cls.__module__}.{cls.__qualname__}" for cls in classes}
    if model["class_path"] not in index:
        raise ExportError(
            f"{config} configures the model {model['class_path']}, which is not a method of vlp_lightning.methods; "
            f"vlp export rebuilds these only: {', '.join(available_methods())}"
        )
    for key, class_path in _class_paths(model["init_args"], "model.init_args"):
        if not class_path.startswith(TRUSTED_PREFIXES):
            raise ExportError(
                f"{config} sets {key} to {class_path}, and vlp export builds only vlp_lightning and torch classes (a "
                "config file never chooses other code to import); build the method in Python and call "
                "vlp_lightning.commands.export.write_exports(method, out)"
            )


def build_method(model: dict[str, Any], config: Path) -> tuple[VLPMethod, Namespace]:
    """Instantiate the model section as LightningCLI does; -> (method, its parsed config for the hparams check)."""
    from lightning.pytorch.cli import LightningArgumentParser

    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(VLPMethod, "model", required=True)
    try:
        parsed = parser.parse_object({"model": model})
        method = parser.instantiate(parsed).model
    except Exception as error:  # any failure to build a user's config ends in one sentence, never a traceback
        raise ExportError(
            f"{config} does not build a method ({concise_error(str(error)) or type(error).__name__}); pass --config "
            "with the config the checkpoint was trained with"
        ) from None
    return method, parsed.model


# ---------------------------------------------------------------------------------------------- writers
def write_exports(method: VLPMethod, out: Path) -> list[str]:
    """Write every output `method` has into `out`; one line per output: what was written and how to load it, or
    why it was not."""
    out = Path(out)
    lines = [_line("vision/", export_vision(getattr(method, "vision", None), out / "vision"))]
    if type(method).encode_text is VLPMethod.encode_text:
        return lines + [_line("open_clip/", f"not written: {type(method).__name__} has no joint image-text space (no "
                                            "text tower); vision/ holds its model")]
    try:
        lines.append(_line("open_clip/", export_open_clip(method, out / "open_clip")))
        open_clip_written = True
    except ValueError as reason:
        not_written = f"not written (the joint space's projections stay in the checkpoint): {reason}"
        lines.append(_line("open_clip/", not_written))
        open_clip_written = False
    text = getattr(method, "text", None)
    if isinstance(text, HFTextEncoder):
        lines.append(_line("text/", export_hf_text(text, method.tokenizer, out / "text")))
    elif isinstance(text, TextTransformer):
        where = "it is part of open_clip/" if open_clip_written else "it has no format of its own outside open_clip/"
        lines.append(_line("text/", f"not written: the text tower is the built-in TextTransformer ({where})"))
    else:
        lines.append(_line("text/", f"not written: the text tower is {type(text).__name__}, not a Hugging Face model"))
    return lines


def _line(output: str, text: str) -> str:
    return f"{output:<11}{text}"


def export_vision(vision: nn.Module | None, folder: Path) -> str:
    """The image tower as a timm model folder (timm's own Hub format: config.json + model.safetensors)."""
    if not isinstance(vision, VisionEncoder):
        return f"not written: the image tower is {type(vision).__name__}, not a timm VisionEncoder"
    from timm.models import save_for_hf

    save_for_hf(vision.model, str(folder), safe_serialization=True)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    pretrained_cfg = {**config["pretrained_cfg"], "mean": list(vision.mean), "std": list(vision.std),
                      **EVAL_PREPROCESSING}
    config["pretrained_cfg"] = {key: pretrained_cfg[key] for key in TIMM_PRETRAINED_KEYS if key in pretrained_cfg}
    if not vision.head_conv:  # VisionEncoder(head_conv=False) replaced them; timm has no argument for that
        config["identity_modules"] = ["conv_head", "bn2"]
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    size = "x".join(str(side) for side in config["pretrained_cfg"]["input_size"][1:])
    described = f"timm {config['architecture']}, {vision.num_features} features at {size} px"
    if not vision.head_conv:
        return (f"{described}: timm.create_model(cfg['architecture'], pretrained=False, **cfg['model_args']) with cfg "
                f"from {config_file}, conv_head and bn2 set to torch.nn.Identity(), then load_state_dict("
                f"safetensors.torch.load_file('{folder / 'model.safetensors'}'))")
    return f"{described}: timm.create_model('local-dir:{folder}', pretrained=True)"


def export_open_clip(method: VLPMethod, folder: Path) -> str:
    """The whole CLIP in open_clip's Hub format (open_clip_config.json + open_clip_model.safetensors); ValueError
    naming what open_clip's CLIP cannot express."""
    model_cfg = open_clip_config_from_vlp(method)
    state_dict = vlp_state_dict_to_open_clip(method.state_dict())
    preprocess_cfg = {
        "size": method.vision.img_size,
        "mode": "RGB",
        "mean": list(method.vision.mean),
        "std": list(method.vision.std),
        "interpolation": EVAL_PREPROCESSING["interpolation"],
        "resize_mode": "shortest",
        "fill_color": 0,
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(state_dict, folder / "open_clip_model.safetensors")
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return (f"open_clip CLIP, {model_cfg['embed_dim']}-d joint space: open_clip.create_model_and_transforms("
            f"'local-dir:{folder}') and open_clip.get_tokenizer('local-dir:{folder}')")


def export_hf_text(text: HFTextEncoder, tokenizer: Any, folder: Path) -> str:
    """A transformers text tower with `save_pretrained` (safetensors), its tokenizer when it has one, and how vlp
    pools its outputs."""
    text.model.save_pretrained(str(folder))
    pooling: dict[str, Any] = {"pooling": text.pooling}
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.tokenizer.save_pretrained(str(folder))
        pooling["max_length"] = tokenizer.context_length
    (folder / "vlp_pooling.json").write_text(json.dumps(pooling, indent=2) + "\n")
    with_tokenizer = " and its tokenizer" if isinstance(tokenizer, HFTokenizer) else " (its tokenizer is not HF's)"
    return (f"transformers {type(text.model).__name__}{with_tokenizer}, {text.pooling}-pooled as vlp_pooling.json "
            f"says: transformers.AutoModel.from_pretrained('{folder}')")


def save_safetensors(state_dict: dict[str, Tensor], path: Path) -> None:
    """safetensors wants contiguous tensors that share no memory."""
    tensors = {name: value.detach().to(device="cpu").contiguous().clone() for name, value in state_dict.items()}
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
