"""Rebuild a trained method from its checkpoint: what `vlp export` and the adaptation methods' pretrained starts use.

A vlp checkpoint's hyper-parameters do not hold its towers (they are modules, passed to the method, not saved as
arguments), so the method is rebuilt from its model config: the one `vlp fit` stores in every checkpoint it writes
(`checkpoint["vlp"]["model_config"]`), else the `config.yaml` that `vlp fit` writes next to the run's logs
(`<run>/version_N/config.yaml`, found from the checkpoint's `<run>/checkpoints/` folder), or a config file given
explicitly. The method's class must be one of `vlp_lightning.methods` and every class the model config names must
be vlp's or torch's: a file never chooses other code to import. The optimizer and schedule are not needed and not
built; the weights come from the checkpoint, loaded strictly with `weights_only=True`, never from
`pretrained_path` files.

A folder in open_clip's format (`open_clip_config.json` with `model_cfg` and `preprocess_cfg`, beside
`open_clip_model.safetensors` or `open_clip_pytorch_model.bin`: what the Hugging Face hub holds for open_clip models
and what `vlp export` writes to `OUT/open_clip/`) rebuilds as our `CLIP` through `modules.open_clip_import`, so
every start that takes a checkpoint (adaptation `pretrained:`, `pretrained_clip:`, `image_tower:`) also takes open_clip
weights already on disk. Configs the importer cannot express stop with its sentence.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace

from data_modules.views import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vlp_lightning import methods
from vlp_lightning.cli import (
    _hyper_parameter_conflict,
    available_methods,
    concise_error,
    constructor_sentence,
    load_checkpoint_for_check,
)
from vlp_lightning.methods.base import VLPMethod, _class_path, _state_dict_differences

#: class-path prefixes a model config may name (a config file never chooses other code to import).
TRUSTED_PREFIXES = ("vlp_lightning.", "torch.")
#: an open_clip model folder: its config, and its weights (either name).
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
#: model arguments a rebuild never builds: training only, and they may name classes from anywhere.
TRAINING_ONLY = ("optimizer", "lr_scheduler")
#: model arguments that only fill weights of a model already built (an earlier stage's checkpoint): a rebuild takes
#: every weight from its own checkpoint, so it never reads them (the earlier file may be gone).
WEIGHT_STARTS = ("start_from", "meta_prompt")


class PretrainedError(ValueError):
    """A checkpoint or config that does not rebuild a method, as one sentence naming the value and the fix."""


def load_method(
    checkpoint_path: str, config_path: str | None = None, name: str = "CKPT", config_option: str = "--config"
) -> tuple[VLPMethod, str]:
    """The method a checkpoint was trained as, in eval mode with the checkpoint's weights, and where its config came
    from (`config_path`, else the model config stored in the checkpoint, else the run's config.yaml); a
    `PretrainedError` / `CheckpointError` sentence otherwise. `name` is how sentences call the checkpoint path and
    `config_option` the option that gives a config."""
    if Path(checkpoint_path).is_dir():
        if (Path(checkpoint_path) / OPEN_CLIP_CONFIG).is_file():
            return load_open_clip_folder(Path(checkpoint_path), name)
        raise PretrainedError(
            f"{name} {checkpoint_path} is a folder without {OPEN_CLIP_CONFIG}; give a checkpoint file or an open_clip "
            f"model folder (a sharded checkpoint folder becomes one file with python -m "
            f"lightning.pytorch.utilities.consolidate_checkpoint {checkpoint_path})"
        )
    checkpoint = load_checkpoint_for_check(
        checkpoint_path,
        name=name,
        if_missing="give the path of a checkpoint written by vlp fit, e.g. runs/clip/emoji_tiny/checkpoints/last.ckpt",
        if_incomplete="use another checkpoint of the run",
    )
    redo = f"pass {config_option} with the config {checkpoint_path} was trained with"
    stored = checkpoint.get("vlp", {}).get("model_config")
    if config_path is None and isinstance(stored, str):
        source = f"the model config stored in {checkpoint_path}"
        model_config = model_section({"model": json.loads(stored)}, source)
    else:
        config = Path(config_path) if config_path else find_run_config(Path(checkpoint_path), config_option)
        source = str(config)
        model_config = read_model_config(config, config_option)
    method, parsed = build_method(model_config, source, redo)
    conflict = _hyper_parameter_conflict(checkpoint.get("hyper_parameters", {}), parsed)
    if conflict:
        raise PretrainedError(f"{checkpoint_path} {conflict} ({source}); {redo}")
    written_by = checkpoint.get("vlp", {}).get("method")
    if written_by is not None and written_by != _class_path(method):
        raise PretrainedError(
            f"{checkpoint_path} was written by {written_by}, but {source} builds {_class_path(method)}; {redo}"
        )
    differences = _state_dict_differences(checkpoint["state_dict"], method.state_dict(), strict=True)
    if differences:
        raise PretrainedError(
            f"{checkpoint_path} does not fit the {type(method).__name__} that {source} builds ({len(differences)} "
            f"tensors differ, e.g. {'; '.join(differences[:3])}); {redo}"
        )
    method.load_state_dict(checkpoint["state_dict"], strict=True)
    return method.eval(), source


def find_run_config(checkpoint_path: Path, config_option: str = "--config") -> Path:
    """The config.yaml `vlp fit` saved for the run of `<run>/checkpoints/<ckpt>`: the newest `<run>/version_N/` one
    (each resume writes another), provided they all configure the same model."""
    run = checkpoint_path.parent.parent
    found = sorted(run.glob("version_*/config.yaml"), key=lambda path: _version_number(path.parent.name))
    found += [run / "config.yaml"] if (run / "config.yaml").is_file() else []
    if not found:
        raise PretrainedError(
            f"found no config.yaml of the run of {checkpoint_path} (vlp fit writes {run}/version_N/config.yaml); "
            f"pass {config_option} with the config it was trained with"
        )
    models = {path: read_model_config(path, config_option) for path in found}
    differing = [path for path in found if models[path] != models[found[-1]]]
    if differing:
        raise PretrainedError(
            f"{differing[-1]} and {found[-1]} configure different models; pass {config_option} with the one "
            f"{checkpoint_path} was trained with"
        )
    return found[-1]


def _version_number(name: str) -> int:
    suffix = name.removeprefix("version_")
    return int(suffix) if suffix.isdigit() else -1


def read_model_config(config: Path, config_option: str = "--config") -> dict[str, Any]:
    """`model_section` of a vlp YAML file."""
    if not config.is_file():
        raise PretrainedError(
            f"{config_option} {config}: no such file; give the run's config.yaml or the recipe it was trained with"
        )
    try:
        document = yaml.safe_load(config.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise PretrainedError(
            f"{config_option} {config} is not YAML ({type(error).__name__}); give the run's config.yaml"
        ) from None
    return model_section(document, str(config))


def model_section(document: Any, source: str) -> dict[str, Any]:
    """The `model:` section of a vlp config, without its training-only arguments and with the weights taken from
    the checkpoint instead of pretrained files; its class paths checked."""
    model = document.get("model") if isinstance(document, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("class_path"), str):
        raise PretrainedError(
            f"{source} has no model.class_path; give the run's config.yaml (vlp fit writes it next to the logs) or "
            "the recipe it was trained with"
        )
    init_args = {name: value for name, value in (model.get("init_args") or {}).items()
                 if name not in TRAINING_ONLY + WEIGHT_STARTS}
    model = _weights_from_checkpoint({"class_path": model["class_path"], "init_args": init_args})
    _check_class_paths(model, source)
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


def _check_class_paths(model: dict[str, Any], source: str) -> None:
    """The method must be in the methods index (compared by name, before anything is imported), the other classes
    vlp's or torch's."""
    classes = [getattr(methods, path.rsplit(".", 1)[1]) for path in available_methods()]
    index = set(available_methods()) | {f"{cls.__module__}.{cls.__qualname__}" for cls in classes}
    if model["class_path"] not in index:
        raise PretrainedError(
            f"{source} configures the model {model['class_path']}, which is not a method of vlp_lightning.methods; "
            f"vlp rebuilds these only: {', '.join(available_methods())}"
        )
    for key, class_path in _class_paths(model["init_args"], "model.init_args"):
        if not class_path.startswith(TRUSTED_PREFIXES):
            raise PretrainedError(
                f"{source} sets {key} to {class_path}, and vlp rebuilds only vlp_lightning and torch classes (a "
                "config file never chooses other code to import); build the method in Python and call "
                "vlp_lightning.commands.export.write_exports(method, out)"
            )


def open_clip_model_config(folder: Path, name: str = "CKPT") -> dict[str, Any]:
    """The `model:` section (our CLIP, its towers, CLIP BPE, the preprocessing's mean and std) that reproduces the
    open_clip model of `folder`'s `open_clip_config.json`; a `PretrainedError` naming what the importer refuses."""
    from vlp_lightning.modules.open_clip_import import text_config_from_open_clip, vision_config_from_open_clip

    path = folder / OPEN_CLIP_CONFIG
    try:
        config = json.loads(path.read_text())
        model_cfg = config["model_cfg"]
        vision, text = vision_config_from_open_clip(model_cfg), text_config_from_open_clip(model_cfg)
    except (OSError, ValueError, KeyError, TypeError) as error:
        reason = f"no {error} entry" if isinstance(error, KeyError) else str(error).rstrip(".")
        raise PretrainedError(f"{name} {folder}: {path.name} is not an open_clip CLIP config our CLIP can load "
                              f"({reason}); give a vlp checkpoint or an open_clip ViT CLIP folder") from None
    preprocess = config.get("preprocess_cfg") or {}
    return {"class_path": "vlp_lightning.methods.CLIP", "init_args": {
        "embed_dim": model_cfg["embed_dim"],
        "vision": {"class_path": "vlp_lightning.modules.VisionEncoder", "init_args": {
            **vision, "mean": list(preprocess.get("mean", OPENAI_CLIP_MEAN)),  # open_clip's default preprocessing
            "std": list(preprocess.get("std", OPENAI_CLIP_STD))}},
        "text": {"class_path": "vlp_lightning.modules.TextTransformer", "init_args": text},
        "tokenizer": {"class_path": "vlp_lightning.modules.CLIPTokenizer",
                      "init_args": {"context_length": text["context_length"]}},
    }}


def load_open_clip_folder(folder: Path, name: str = "CKPT") -> tuple[VLPMethod, str]:
    """Our CLIP with the weights of an open_clip model folder (module doc), in eval mode, and its source."""
    import torch
    from safetensors.torch import load_file

    from vlp_lightning.modules.open_clip_import import open_clip_state_dict_to_vlp

    source = f"the open_clip model in {folder}"
    method, _ = build_method(open_clip_model_config(folder, name), source, "give an open_clip ViT CLIP folder")
    weights = next((folder / file for file in OPEN_CLIP_WEIGHTS if (folder / file).is_file()), None)
    if weights is None:
        raise PretrainedError(f"{name} {folder} has {OPEN_CLIP_CONFIG} but no weights; put "
                              f"{' or '.join(OPEN_CLIP_WEIGHTS)} beside it")
    state = load_file(weights) if weights.suffix == ".safetensors" else torch.load(weights, map_location="cpu",
                                                                                       weights_only=True)
    state = open_clip_state_dict_to_vlp(state)
    differences = _state_dict_differences(state, method.state_dict(), strict=True)
    if differences:
        raise PretrainedError(
            f"{weights} does not fit the CLIP its {OPEN_CLIP_CONFIG} describes ({len(differences)} tensors differ, "
            f"e.g. {'; '.join(differences[:3])}); give the weights and config of one open_clip model")
    method.load_state_dict(state, strict=True)
    return method.eval(), source


def build_method(model: dict[str, Any], source: str, redo: str) -> tuple[VLPMethod, Namespace]:
    """Instantiate the model section as LightningCLI does; -> (method, its parsed config for the hparams check)."""
    from lightning.pytorch.cli import LightningArgumentParser

    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(VLPMethod, "model", required=True)
    try:
        parsed = parser.parse_object({"model": model})
        method = parser.instantiate(parsed).model
    except Exception as error:  # any failure to build a user's config ends in one sentence, never a traceback
        reason = constructor_sentence(error) or concise_error(str(error)) or type(error).__name__
        raise PretrainedError(f"{source} does not build a method ({reason}); {redo}") from None
    return method, parsed.model


def save_checkpoint(method: VLPMethod, path: str | Path, model_config: dict[str, Any]) -> Path:
    """Write `method` as a checkpoint `load_method` (and so `vlp export` and every `pretrained:` start) rebuilds:
    its weights, class and `model_config` (the `model:` section that builds it: {"class_path": ..., "init_args":
    ...}). For methods built or trained in Python; `vlp fit` writes such checkpoints itself."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "state_dict": method.state_dict(),
        "hyper_parameters": {"_class_path": model_config["class_path"]},
        "vlp": {"method": _class_path(method), "model_config": json.dumps(model_config)},
    }, path)
    return path
