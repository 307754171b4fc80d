"""`vlp export CKPT OUT`: a trained checkpoint's towers in the formats timm, open_clip and transformers load.

The method is rebuilt from its model config (stored in every checkpoint `vlp fit` writes, else the run's
`config.yaml`, or `--config`; `vlp_lightning.pretrained`) and the checkpoint's weights are loaded into it strictly.

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
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import Tensor, nn

from vlp_lightning.cli import CheckpointError
from vlp_lightning.methods.base import VLPMethod, _class_path
from vlp_lightning.modules.open_clip_import import open_clip_config_from_vlp, vlp_state_dict_to_open_clip
from vlp_lightning.modules.text import HFTextEncoder, TextTransformer
from vlp_lightning.modules.tokenizers import HFTokenizer
from vlp_lightning.modules.vision import VisionEncoder
from vlp_lightning.pretrained import PretrainedError, load_method

DESCRIPTION = (
    "Write the towers of a vlp checkpoint CKPT into the folder OUT, as safetensors weights with JSON configs (no "
    "pickle), for timm, open_clip and transformers. The model is rebuilt from the model config vlp fit stores in "
    "every checkpoint (older checkpoints: the run's config.yaml, <run>/version_N/config.yaml, found from CKPT in "
    "<run>/checkpoints/), or from --config; then CKPT's weights are loaded into it strictly."
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
#: `vlp fit` trains; its eval view takes the centred square of the whole image, resized bilinearly.
EVAL_PREPROCESSING = {"interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}
#: pretrained_cfg entries timm needs to rebuild and feed the model (the rest describe timm's own released weights).
TIMM_PRETRAINED_KEYS = ("input_size", "fixed_input_size", "mean", "std", "num_classes", "pool_size", "first_conv",
                        "classifier", *EVAL_PREPROCESSING)


class ExportError(PretrainedError):
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
        help="the config CKPT was trained with (default: the model config stored in CKPT, else the run's config.yaml "
        "that vlp fit wrote, found from CKPT)",
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
    except (PretrainedError, CheckpointError) as error:
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
