"""The one streaming WebDataset pipeline behind every DataModule and `make_eval_loader`.

Stage order (open_clip's, with sample-exact splitting):

1. shard list: local paths, globs, brace patterns `a-{000000..000003}.tar`, `::`-joined lists and any URL
   webdataset opens (`pipe:`, `http:`...); per-shard sample counts from `manifest.json` (a shard without one is
   counted once by reading its tar headers);
2. shard order: shuffled per epoch with `(seed, epoch)` (or, with `resampled=True`, shards drawn with replacement,
   independently per rank and worker);
3. split by node, then by worker: the epoch's shards laid end to end form one sequence of sample positions; rank
   `r` takes the `r`-th contiguous run of `batches_per_rank * batch_size` positions and its DataLoader workers cut
   that run in the order the DataLoader visits them (worker `w` makes the rank's batches `w, w+W, w+2W, ...`).
   A stream therefore starts inside a shard when shard sizes do not divide evenly, and every rank gets exactly
   `batches_per_rank` batches: the sequence wraps around to the start of the epoch's order when the epoch needs
   more samples than there are (padding by repetition, at most `world_size * batch_size - 1` samples), so DDP
   never waits on a rank that ran dry;
4. tar reading with an error handler (a truncated or unreadable shard is counted and the stream goes on); only
   `.png/.jpg/.jpeg/.webp/.txt/.cls/.json` members are read at all, so a `.pyd`, `.pickle` or `.pth` member is
   never even loaded, let alone unpickled (masks: `.mask.png`, `.instances.png`; clips: `.mp4/.webm/.frames.npy`);
5. sample shuffle buffer seeded with `(seed, epoch, rank, worker)`;
6. safe decode (formats by their signatures: opaque PNG through libspng, JPEG through OpenCV, WebP and images
   with alpha through PIL; the pixel count checked from the header before decoding; text as UTF-8, labels as int,
   JSON) and the per-sample crop of the views;
7. batching inside the pipeline: crops packed as uint8 tensors, the tokenizer run once per batch;
8. `webdataset.WebLoader` (a DataLoader with `batch_size=None`), wrapped by `StreamingLoader` for the explicit
   length and epoch; batches leave the workers through shared-memory slots (`Handover`). The photometric half of
   the views (`finish_views`) runs on the batch after it leaves the worker: in training on the device, in the
   DataModule's `on_after_batch_transfer` (`finish=False`), else in `StreamingLoader`'s process.

Determinism and exact resume: a batch is a pure function of (seed, epoch, rank, worker, batch index), including its
augmentations. Every batch carries `batch["__stream__"] = {"pass", "epoch", "worker", "position", "skipped"}`:
the samples its worker has read this epoch and those it dropped as bad. A consumer that records the batches it
actually used (the DataModule does, in `on_before_batch_transfer`, because Lightning fetches one batch ahead)
can resume mid-epoch with `StreamingLoader.resume_from(ResumePoint)`: each worker fast-forwards over the samples it
had read (tar bytes only, nothing decoded) and continues, and the worker processes swap roles so that the one the
DataLoader asks first makes the next batch; the resumed run sees exactly the batches the uninterrupted run would
have produced (same world size and number of workers).

Bad data: an undecodable image, a missing image / caption / label, unreadable JSON, a missing or invalid conversation
(where one is required) or instances that do not fit their image (a box outside it, an instance mask of another size,
a relation naming a missing object) drop the sample and count it; `strict=True` raises `BadSampleError` naming the
shard and key instead.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import math
import random
import struct
import tarfile
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import TYPE_CHECKING, BinaryIO, ClassVar, NamedTuple

import cv2
import numpy as np
import pyspng
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset import WebLoader, gopen
from webdataset.shardlists import expand_urls

from data_modules.captions import (
    LONG_CAPTION_FIELD,
    CaptionSampling,
    CaptionSource,
    caption_from_source,
    sample_caption,
)
from data_modules.clips import CLIP_MEMBERS
from data_modules.conversations import parse_conversation
from data_modules.manifest import class_count, local_path, read_manifest, shard_counts
from data_modules.instances import (
    INSTANCES_MEMBER,
    batch_instances,
    block_tags,
    crop_instances,
    decode_instances,
    position_prompt,
)
from data_modules.masks import MASK_MEMBER, crop_mask, decode_mask
from data_modules.views import VIEWS_FIELD, EvalView, Views, ViewTransform, finish_views

if TYPE_CHECKING:  # the tokenizers module pulls in the model packages; workers need none of them
    from vlp_lightning.modules.tokenizers import Tokenizer

log = logging.getLogger(__name__)

IMAGE_MEMBERS = ("png", "jpg", "jpeg", "webp")
#: tar members the pipeline reads; anything else (.pyd, .pickle, .pth, ...) is passed over unread.
READ_MEMBERS = frozenset((*IMAGE_MEMBERS, "txt", "cls", "json", MASK_MEMBER, INSTANCES_MEMBER, *CLIP_MEMBERS))
#: formats PIL may decode; an allow-list so a shard cannot reach a rarely used (less audited) decoder.
PIL_FORMATS = ("PNG", "JPEG", "WEBP")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
# JPEG start-of-frame markers (every coding process); their segment holds the image size.
_JPEG_FRAME_MARKERS = frozenset((*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)))
# RGB out, and the stored pixel order kept (PIL ignores the EXIF orientation too, so both decoders agree).
_OPENCV_FLAGS = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # bad samples are counted and logged by us
STREAM_FIELD = "__stream__"
#: a raw sample that cannot be used carries the reason here (a link member, a sample missing from its shard).
ERROR_FIELD = "__error__"
#: a tar member takes at least one 512-byte header: a shard of S bytes holds at most S // 512 samples.
_MIN_SAMPLE_BYTES = 512
# What a missing, truncated or corrupt tar (or a failing `pipe:` command) raises.
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, zlib.error)


class DataConfigError(ValueError):
    """The data configuration cannot work (missing shards, a method needing keys the data lacks); raised at setup."""


class BadSampleError(RuntimeError):
    """A bad sample in `strict` mode."""


class _BadSample(Exception):
    """A sample to drop; the message says why."""


# ---------------------------------------------------------------------------------------------- shard lists


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """Shard URLs from a pattern (or several): `::` lists, `{000..009}` braces, then local globs (sorted)."""
    urls: list[str] = []
    for pattern in [shards] if isinstance(shards, str) else shards:
        for url in expand_urls(pattern):
            path = local_path(url)
            if path is not None and any(char in str(path) for char in "*?["):
                urls.extend(sorted(glob.glob(str(path))))
            else:
                urls.append(url)
    return urls


def resolve_counts(urls: list[str]) -> list[int]:
    """Samples per shard: from the manifests, else counted once from the tar headers (no member is read).

    A manifest count the shard's size cannot hold (a lying or stale manifest, an emptied shard) is replaced by
    the count read from the shard, with a warning naming both."""
    counts = shard_counts(urls)
    for index, (url, count) in enumerate(zip(urls, counts)):
        path = local_path(url)
        size = path.stat().st_size if count is not None and path is not None and path.is_file() else None
        if size is not None and count > size // _MIN_SAMPLE_BYTES:
            counts[index] = count_tar_samples(url)
            log.warning("shard %s cannot hold the %d samples manifest.json lists (%d bytes); it holds %d: %d samples "
                        "are missing (rebuild the shard set with vlp-data)", url, count, size,
                        counts[index], count - counts[index])
    missing = [url for url, count in zip(urls, counts) if count is None]
    if missing:
        log.warning("counting samples of %d shards without manifest.json (build shards with `vlp-data` to skip this)",
                    len(missing))
    return [count if count is not None else count_tar_samples(url) for url, count in zip(urls, counts)]


def count_tar_samples(url: str) -> int:
    """Number of samples (distinct consecutive keys) in one shard, reading headers only."""
    return sum(1 for _ in read_tar_samples(url, _warn_unreadable, members=frozenset()))


def shard_members(urls: list[str], manifest: dict | None) -> set[str]:
    """Member extensions the shards hold: the manifest's `members`, else those of the first sample."""
    if manifest is not None and "members" in manifest:
        return set(manifest["members"])
    for sample in read_tar_samples(urls[0], _raise_on_error):
        return {name for name in sample if not name.startswith("__")}
    return set()


def _warn_unreadable(url: str, key: str | None, reason: str) -> None:
    log.warning("shard %s is unreadable after key %r (%s); counting the samples before it", url, key, reason)


def _raise_on_error(url: str, key: str | None, reason: str) -> None:
    raise DataConfigError(f"cannot read shard {url} (at key {key!r}): {reason}")


def read_tar_samples(
    url: str,
    on_error: Callable[[str, str | None, str], None],
    skip: int = 0,
    members: frozenset[str] = READ_MEMBERS,
) -> Iterator[dict]:
    """Samples of one shard in file order, members grouped by key, `{"__key__", "__url__", ext: bytes...}`.

    Only `members` are read; the first `skip` samples are passed over without reading any. A read error
    (truncated or corrupt tar, failing `pipe:`) is reported to `on_error(url, key, reason)`, the sample being read
    is dropped and the shard ends there.
    """
    sample: dict | None = None
    seen = 0
    key = None
    try:
        with closing(gopen(url)) as stream:
            archive = gzip.GzipFile(fileobj=stream) if url.endswith((".gz", ".tgz")) else stream
            for name, read in tar_entries(archive):
                # webdataset's rule: `dir/key.ext.more` -> (`dir/key`, `ext.more`), the key at least one character
                start = name.rfind("/") + 1
                dot = name.find(".", start)
                if dot <= start:
                    continue
                key, extension = name[:dot], name[dot + 1 :].lower()
                if sample is None or key != sample["__key__"]:
                    if sample is not None and seen > skip:
                        yield sample
                    seen += 1
                    sample = {"__key__": key, "__url__": url}
                if seen > skip and read is None:
                    sample[ERROR_FIELD] = f"member {name!r} is a link or special file, not read"
                elif seen > skip and extension in members:
                    sample[extension] = read()
    except _READ_ERRORS as error:
        on_error(url, key, f"unreadable tar: {error!r}")
        return
    if sample is not None and seen > skip:
        yield sample


def tar_entries(stream: BinaryIO) -> Iterator[tuple[str, Callable[[], bytes] | None]]:
    """`(name, read)` for every regular file of a tar stream, the data read only if `read()` is called, and
    `(name, None)` for links and special files (never followed: a sample must not reach outside its shard).

    A minimal reader of the POSIX ustar format with GNU long names and pax `path` records: Python's `tarfile`
    spends about as long parsing a member header as PIL spends decoding a 64 px PNG. Raises `tarfile.ReadError`
    on a truncated archive or a header whose checksum does not match.
    """
    long_name = None
    seekable = getattr(stream, "seekable", lambda: False)()  # a `pipe:` stream is not
    read_bytes = stream.read
    while True:
        header = read_bytes(_BLOCK)
        if len(header) < _BLOCK or header == _ZERO_BLOCK:
            if 0 < len(header) < _BLOCK:
                raise tarfile.ReadError("truncated tar header")
            return
        if not _tar_checksum_matches(header):
            raise tarfile.ReadError("tar header checksum mismatch")
        size = _tar_number(header[124:136])
        padded = (size + _BLOCK - 1) & -_BLOCK
        kind = header[156]
        if kind in (_LONG_NAME, _PAX_HEADER):  # for the next member
            data = _read_exactly(stream, padded)[:size]
            long_name = data.rstrip(b"\0").decode("utf-8", "replace") if kind == _LONG_NAME else _pax_path(data)
            continue
        name, long_name = long_name or _tar_name(header), None
        consumed = False

        def read() -> bytes:
            nonlocal consumed
            consumed = True
            return _read_exactly(stream, padded)[:size]

        if kind in _REGULAR_FILES:
            yield name, read
        elif kind in _LINKS_AND_SPECIAL_FILES:
            yield name, None
        if not consumed and padded:
            if seekable:
                stream.seek(padded, io.SEEK_CUR)
            else:
                _read_exactly(stream, padded)


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR_FILES = frozenset(b"0\x007")  # type flags: regular file (and its old NUL form), contiguous file
_LINKS_AND_SPECIAL_FILES = frozenset(b"12346")  # hard link, symbolic link, character / block device, FIFO
_LONG_NAME, _PAX_HEADER = ord("L"), ord("x")  # GNU long name, pax extended header


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) < size:
        raise tarfile.ReadError(f"truncated tar member ({len(data)} of {size} bytes)")
    return data


def _tar_number(field: bytes) -> int:
    """Octal (NUL/space padded) or GNU base-256 header number."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    return int(field.rstrip(b"\0 ") or b"0", 8)


def _tar_checksum_matches(header: bytes) -> bool:
    """The stored checksum equals the sum of the header bytes with the checksum field counted as spaces.

    Compared modulo 65521 because the sum comes from zlib's Adler-32, whose low half is 1 + the byte sum mod 65521:
    twenty times faster than `sum(header)` and, for 512 bytes, as good a check.
    """
    field = header[148:156]
    computed = (zlib.adler32(header) & 0xFFFF) - 1 - sum(field) + 8 * 32
    return (computed - _tar_number(field)) % 65521 == 0


def _tar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[345] and header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "replace")


def _pax_path(records: bytes) -> str | None:
    """The `path` of a pax extended header (`"<length> <key>=<value>\\n"` records), None when it has none."""
    while records:
        length = int(records.split(b" ", 1)[0])
        key, _, value = records[:length].split(b" ", 1)[1].rstrip(b"\n").partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "replace")
        records = records[length:]
    return None


def buffer_shuffle(samples: Iterable[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle within a buffer of `size` samples (webdataset's `shuffle`, with an explicit RNG)."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        index = rng.randrange(size)
        buffer[index], sample = sample, buffer[index]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


# ---------------------------------------------------------------------------------------------- samples


def decode_image(data: bytes) -> np.ndarray:
    """PNG / JPEG / WebP bytes -> RGB uint8 array [H, W, 3]; transparency is flattened onto white (as `vlp-data`
    stores it).

    Opaque PNG goes through libspng (pyspng; 2.5x PIL's speed on small images, see bench/data_throughput.py),
    JPEG through OpenCV (libjpeg-turbo, as PIL), WebP and images with alpha through PIL. The format is taken from
    the signature and nothing else is decoded; the pixel count is read from the header and refused, before any
    decoding, above PIL's decompression-bomb limit. (16-bit PNGs keep their high byte; PIL would clip them.)
    """
    if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        _check_png_data_fits_header(data, width, height)
        decode = _decode_png if _png_is_opaque(data) else _decode_with_pil
    elif data.startswith(_JPEG_SIGNATURE):
        width, height = _jpeg_size(data)
        decode = _decode_jpeg
    else:
        return _decode_with_pil(data)
    if width * height > 2 * Image.MAX_IMAGE_PIXELS:
        raise Image.DecompressionBombError(
            f"image of {width}x{height} pixels exceeds the limit of {2 * Image.MAX_IMAGE_PIXELS} (PIL's)"
        )
    return decode(data)


def _decode_png(data: bytes) -> np.ndarray:
    return pyspng.load(data, "RGB")


def _decode_jpeg(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), _OPENCV_FLAGS)
    if image is None:
        raise ValueError("truncated or corrupt image data")
    return image


def _png_is_opaque(data: bytes) -> bool:
    """No alpha channel (colour types 4 and 6) and no tRNS chunk (a transparent colour) among the chunks before the
    image data; walked chunk by chunk, since the bytes `IDAT` / `tRNS` may occur inside other chunks' data."""
    if data[25] not in (0, 2, 3):
        return False
    position = 8
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        if kind == b"IDAT":
            return True
        if kind == b"tRNS":
            return False
        position += 12 + length
    return True  # no image data: the decoder will say so


def _check_png_data_fits_header(data: bytes, width: int, height: int) -> None:
    """Refuse a PNG whose compressed image data is larger than any encoding of the size its header claims (a
    1x1 header over 32x32 pixels decodes as 1x1 otherwise; the decoders stop reading once the header's rows are
    done). The bound is generous (stored or fixed-Huffman deflate of the filtered rows, Adam7 passes included),
    so data merely a little larger, or highly compressible, is not caught; no pixel is decompressed here."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(data[25], 4)
    row_bytes = 1 + math.ceil(width * channels * data[24] / 8)
    raw = height * row_bytes * (2 if data[28] else 1) + 16 * (height + 8)
    position, compressed = 8, 0
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        compressed += length if kind == b"IDAT" else 0
        position += 12 + length
    if compressed > raw * 9 // 8 + 256:
        raise ValueError(f"PNG image data ({compressed} bytes) is too large for its {width}x{height} header")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's start-of-frame segment, walking the marker segments before it (the markers
    without a length, TEM and RST0-7, as libjpeg does, so that no segment can hide a frame header from this walk)."""
    index = 2
    while index + 9 <= len(data):
        if data[index] != 0xFF:
            break
        marker = data[index + 1]
        if marker == 0xFF:  # fill byte
            index += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # TEM, RST0-7, SOI: no length field
            index += 2
            continue
        if marker == 0xD9:  # end of image before any frame
            break
        if marker in _JPEG_FRAME_MARKERS:
            height, width = struct.unpack(">HH", data[index + 5 : index + 9])
            return width, height
        index += 2 + int.from_bytes(data[index + 2 : index + 4], "big")
    raise ValueError("JPEG without a readable frame header")


def _decode_with_pil(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(image.convert("RGB"))


@dataclass
class SampleDecoder:
    """Raw tar sample -> decoded sample (per image), and decoded samples -> batch dict (per batch).

    `with_caption` / `with_label` make `.txt` / `.cls` required (a sample without them is dropped); a label must
    lie in `[0, num_classes)` (the manifest's class count; without one, only negative labels are refused); `.json`
    is decoded into `meta` when present. `with_mask` makes `.mask.png` required and returns it as `mask`, cropped as
    the image (deterministic views only, `data_modules.masks`). `with_instances` makes `.json` objects and
    `.instances.png` required and returns `boxes`, `masks` and `objects` in every view's pixels, following its crops
    and flips (`data_modules.instances`; not affine warps). Captions become `text` tokens when a tokenizer is given;
    `caption_sampling` picks the caption of each sample (`data_modules.captions`: all lines, one line, one
    sentence), with the seed `decode` gets, from the text `caption_source` names (`.txt` "short", the `.json`
    `long_caption` "long", or either, drawn per sample, "mixed"). `with_long_caption` adds the `.json` long caption
    as `long_caption` (raw str; DreamLIP samples its sub-captions from it). A long caption asked of a sample whose
    `.json` has none stops the run (`DataConfigError`), never a silent skip. `with_conversation` makes a valid `.json`
    `"conversations"` list required
    (`data_modules.conversations`; a sample without one is dropped and counted) and returns it as `conversation`,
    normalised to role / content turns.
    """

    transform: ViewTransform
    with_caption: bool = False
    with_label: bool = False
    with_mask: bool = False
    tokenizer: Tokenizer | None = None
    num_classes: int | None = None
    caption_sampling: CaptionSampling = "all"
    with_instances: bool = False
    position_prompts: bool = False
    with_conversation: bool = False
    caption_source: CaptionSource = "short"
    with_long_caption: bool = False
    #: the batch entry that holds the packed uint8 crops (what `Handover` passes through shared memory).
    packed_field: ClassVar[str] = "image"

    def __post_init__(self) -> None:
        if self.position_prompts and not (self.with_caption and self.with_instances):
            raise DataConfigError("position_prompts (PTP) are made from the instance masks of captioned scene shards "
                                  "(.txt and .instances.png, `vlp-data scenes`); these shards lack one of them")
        if self.with_instances and any(crop.affine is not None for crop in self.transform.crops):
            raise DataConfigError("boxes and instance masks follow crops and flips, not the views' RandomAffine warp; "
                                  "use views without `affine` for data with instances")

    @property
    def image_bytes(self) -> int:
        """Bytes of one sample's packed uint8 crops."""
        return sum(crop.size * crop.size * 3 for crop in self.transform.crops)

    def decode(self, raw: dict, rng: random.Random, caption_seed: str = "") -> dict:
        if ERROR_FIELD in raw:
            raise _BadSample(raw[ERROR_FIELD])
        image_member = next((raw[name] for name in IMAGE_MEMBERS if name in raw), None)
        if image_member is None:
            raise _BadSample("no image member (.png/.jpg/.jpeg/.webp)")
        try:
            image = decode_image(image_member)
            crops, regions = self.transform.crop_regions(image, rng)
        except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
            raise _BadSample(f"undecodable image: {error!r}") from error
        sample = {"__key__": raw["__key__"], "crops": crops}
        try:
            if "json" in raw:
                sample["meta"] = json.loads(raw["json"])
            if self.with_caption:
                sample["caption"] = read_caption(raw, self.caption_sampling, caption_seed, self.caption_source,
                                                 sample.get("meta"))
            if self.with_long_caption:
                sample["long_caption"] = read_long_caption(raw["__key__"], sample.get("meta"),
                                                           "a method needing `long_caption`")
            if self.with_label:
                sample["label"] = read_label(raw, self.num_classes)
            if self.with_conversation:
                sample["conversation"] = _conversation(sample.get("meta"))
            if self.with_mask:
                if MASK_MEMBER not in raw:
                    raise _BadSample("missing mask (.mask.png)")
                sample["mask"] = crop_mask(decode_mask(raw[MASK_MEMBER]), self.transform.crops[0])
            if self.with_instances:
                if INSTANCES_MEMBER not in raw or "meta" not in sample:
                    raise _BadSample("missing instances (.instances.png and .json objects)")
                instances = decode_instances(sample["meta"], raw[INSTANCES_MEMBER], image.shape[1], image.shape[0])
                sample["instances"] = [crop_instances(instances, region, crop.size)
                                       for region, crop in zip(regions, self.transform.crops)]
        except DataConfigError:
            raise
        except (UnicodeDecodeError, ValueError, OSError) as error:
            raise _BadSample(f"undecodable member: {error!r}") from error
        return sample

    @staticmethod
    def with_position_prompts(samples: list[dict], captions: list[str], flips: tuple[bool, ...], seed: int
                              ) -> list[str]:
        """Each caption followed by one PTP prompt "The block [P] has a [O]." of its first view (Wang et al. 2023,
        sec. 3.1: prompts are added to the captions in pretraining only), the blocks read from the view's instance
        mask after its crop and flip, so P is where the object is in the image the model sees; drawn from (seed,
        key), so a resumed run draws the same."""
        prompted = []
        for sample, caption, flipped in zip(samples, captions, flips):
            view = sample["instances"][0]
            labels = view.labels[:, ::-1] if flipped else view.labels
            names = [sample["meta"]["objects"][index]["name"] for index in view.objects]
            prompt = position_prompt(block_tags(labels, len(names)), names,
                                     random.Random(f"ptp:{seed}:{sample['__key__']}"))
            prompted.append(caption if prompt is None else f"{caption} {prompt}")
        return prompted

    def collate(self, samples: list[dict], seed: int) -> dict:
        """Decoded samples -> batch; `image` holds the packed uint8 crops until `finish_views` (module doc)."""
        images, recipe = self.transform.pack([sample["crops"] for sample in samples], seed)
        batch: dict = {"__key__": [sample["__key__"] for sample in samples], "image": images, VIEWS_FIELD: recipe}
        if self.with_caption:
            batch["caption"] = [sample["caption"] for sample in samples]
            if self.position_prompts:
                batch["caption"] = self.with_position_prompts(samples, batch["caption"], recipe.flips[0], seed)
            if self.tokenizer is not None:
                batch["text"] = self.tokenizer(batch["caption"])
        if self.with_label:
            batch["label"] = torch.tensor([sample["label"] for sample in samples], dtype=torch.long)
        if self.with_long_caption:
            batch["long_caption"] = [sample["long_caption"] for sample in samples]
        if any("meta" in sample for sample in samples):
            batch["meta"] = [sample.get("meta", {}) for sample in samples]
        if self.with_conversation:
            batch["conversation"] = [sample["conversation"] for sample in samples]
        if self.with_mask:
            batch["mask"] = torch.from_numpy(np.stack([sample["mask"] for sample in samples]))  # [N, S, S] bool
        if self.with_instances:
            batch.update(batch_instances([sample["instances"] for sample in samples], recipe.flips, recipe.single))
        return batch


def read_caption(raw: dict, sampling: CaptionSampling, seed: str, source: CaptionSource = "short",
                 meta: dict | None = None) -> str:
    """The caption of a raw sample: its `.txt` or its `.json` long caption as `source` says, then the part
    `sampling` picks (`data_modules.captions`); `_BadSample` when it has no `.txt`, `DataConfigError` when a long
    caption is asked and its `.json` has none."""
    short = raw["txt"].decode("utf-8").strip() if "txt" in raw else ""
    if not short:
        raise _BadSample("missing caption (.txt)")
    long = read_long_caption(raw["__key__"], meta, f"caption_source={source!r}") if source != "short" else None
    caption = caption_from_source(short, long, source, seed, raw["__key__"])
    return sample_caption(caption, sampling, seed, raw["__key__"])


def read_long_caption(key: str, meta: dict | None, asked_by: str) -> str:
    """The `.json` `long_caption` of the sample `key`; one `DataConfigError` naming who asked and the fix when there
    is none."""
    text = (meta or {}).get(LONG_CAPTION_FIELD)
    if not isinstance(text, str) or not text.strip():
        raise DataConfigError(
            f"{asked_by} reads the .json field {LONG_CAPTION_FIELD!r}, which sample {key!r} lacks; use shards with "
            "long captions (e.g. `vlp-data scenes`) or caption_source: short"
        )
    return text.strip()


def read_label(raw: dict, num_classes: int | None) -> int:
    """The `.cls` label of a raw sample, in `[0, num_classes)` (without a class count: not negative)."""
    if "cls" not in raw:
        raise _BadSample("missing label (.cls)")
    label = int(raw["cls"])
    if label < 0 or (num_classes is not None and label >= num_classes):
        classes = f"the {num_classes} classes of manifest.json" if num_classes else "0, 1, ..."
        raise _BadSample(f"label {label} (.cls) is not one of {classes}")
    return label


def _conversation(meta: object) -> list[dict[str, str]]:
    """The parsed `"conversations"` of a sample's decoded `.json`, or `_BadSample` saying why there is none."""
    if not isinstance(meta, dict) or "conversations" not in meta:
        raise _BadSample('missing conversations (.json "conversations"; `vlp-data instructions` writes them)')
    try:
        return parse_conversation(meta["conversations"])
    except ValueError as error:
        raise _BadSample(f"invalid conversations (.json): {error}") from error


def batch_labels(batch: dict, field: str) -> torch.Tensor:
    """A batch's integer labels [N]: `cls` is the `.cls` member (batch key `label`), any other name the integer field
    of that name in every sample's `.json` (batch key `meta`); one sentence naming the field when it is missing."""
    if field == "cls":
        if "label" not in batch:
            raise ValueError("label_field 'cls' needs .cls members in the shards (batch key `label`)")
        return batch["label"]
    metas = batch.get("meta")
    if metas is None or any(field not in meta for meta in metas):
        raise ValueError(
            f"label_field {field!r} is not a field of every sample's .json; name a field the shards have (the emoji "
            "shards have subcategory_id) or use cls"
        )
    return torch.tensor([int(meta[field]) for meta in metas], dtype=torch.long)


class SkipCounter:
    """Counts (and logs the first few) bad samples of one stream; in strict mode raises at the first."""

    log_first = 5

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.count = 0

    def __call__(self, url: str, key: str | None, reason: str, count: int = 1) -> None:
        if self.strict:
            raise BadSampleError(f"bad sample {key!r} in shard {url}: {reason} (strict=True stops at the first)")
        self.count += count
        if self.count <= self.log_first:
            log.warning("skipping sample %r of %s: %s", key, url, reason)


# ---------------------------------------------------------------------------------------------- streams


def worker_batches(batches: int, worker: int, num_workers: int) -> int:
    """How many of a rank's first `batches` batches worker `worker` makes (the DataLoader visits workers in turn)."""
    return len(range(worker, batches, num_workers))


@dataclass(frozen=True)
class ResumePoint:
    """Where one rank stopped inside an epoch: batches the trainer used, and per worker (samples read, skipped)."""

    epoch: int
    batches: int
    workers: dict[int, tuple[int, int]] = field(default_factory=dict)


class ShardStream(IterableDataset):
    """One rank's share of a shard set as a stream of batches; each DataLoader worker makes its slice (module doc).

    `pad=True` (training, validation): exactly `batches_per_rank` full batches per rank, the sample sequence wrapping
    around when needed and bad samples replaced by the next ones. `pad=False` (evaluation, one process): every
    sample once, the last batch of a worker may be short.
    """

    def __init__(
        self,
        urls: list[str],
        counts: list[int],
        decoder: SampleDecoder,
        batch_size: int,
        batches_per_rank: int,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        pad: bool = True,
        strict: bool = False,
    ) -> None:
        super().__init__()
        if sum(counts) == 0:
            raise DataConfigError(f"the shards {urls[:3]}{'...' if len(urls) > 3 else ''} hold no samples")
        self.urls = urls
        self.counts = counts
        self.decoder = decoder
        self.batch_size = batch_size
        self.batches_per_rank = batches_per_rank
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.pad = pad
        self.strict = strict
        # Set by StreamingLoader before each pass; DataLoader workers receive a copy when they start.
        self.epoch = 0
        self.pass_index = 0
        self.resume: ResumePoint | None = None
        self.handover: Handover | None = None

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        resume = self.resume if self.resume is not None and self.resume.epoch == self.epoch else None
        batch_index, position, skipped = 0, 0, 0
        if resume is not None:
            # The DataLoader asks worker 0 first, but the next batch belongs to stream `batches % num_workers`:
            # rotate which stream each worker process plays so the sequence continues unchanged.
            worker = (worker + resume.batches) % num_workers
            batch_index = worker_batches(resume.batches, worker, num_workers)
            position, skipped = resume.workers.get(worker, (batch_index * self.batch_size, 0))
        quota = worker_batches(self.batches_per_rank, worker, num_workers)
        batches_before = self.rank * self.batches_per_rank + sum(
            worker_batches(self.batches_per_rank, other, num_workers) for other in range(worker)
        )
        counter = SkipCounter(self.strict)
        raw = self._raw_samples(worker, batches_before * self.batch_size, quota * self.batch_size, counter)
        deque(islice(raw, position), maxlen=0)  # fast-forward: tar bytes only, nothing decoded
        counter.count = skipped  # read errors met while fast-forwarding were counted before the stop
        while batch_index < quota:
            rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}:{batch_index}")
            samples = []
            for raw_sample in raw:
                position += 1
                try:
                    samples.append(self.decoder.decode(raw_sample, rng, f"{self.seed}:{self.epoch}"))
                except _BadSample as error:
                    counter(raw_sample["__url__"], raw_sample["__key__"], str(error))
                if len(samples) == self.batch_size:
                    break
            if not samples:
                return
            batch = self.decoder.collate(samples, rng.getrandbits(63))
            batch[STREAM_FIELD] = {
                "pass": self.pass_index,
                "epoch": self.epoch,
                "worker": worker,
                "position": position,
                "skipped": counter.count,
            }
            yield batch if info is None or self.handover is None else self.handover.pack(info.id, batch)
            batch_index += 1

    def _raw_samples(self, worker: int, start: int, length: int, counter: SkipCounter) -> Iterator[dict]:
        """This stream's raw samples in order: its own run of the epoch (shuffled), then what follows it."""
        if self.resampled:
            rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}:resample")
            return buffer_shuffle(self._resampled(rng, counter), max(1, self.shuffle_buffer), rng)
        order = list(range(len(self.urls)))
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}:shards").shuffle(order)
        if not self.pad:
            length = max(0, min(length, sum(self.counts) - start))
        sequence = self._sequence(order, start, counter, own=length)
        own = islice(sequence, length)
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}:buffer")
            own = buffer_shuffle(own, self.shuffle_buffer, rng)
        return chain(own, sequence) if self.pad else own

    def _sequence(self, order: list[int], start: int, counter: SkipCounter, own: int) -> Iterator[dict]:
        """Samples from position `start` of the shards laid end to end in `order`; endless (wrapping) when padding.

        Every shard fills exactly the positions its count gives it: the samples a short shard lacks (empty,
        truncated, a manifest that claims too many) come as placeholders carrying the reason, dropped and counted
        like any bad sample, and a shard holding more samples than its manifest lists is read only that far, the
        rest counted. The stream whose first `own` positions end a shard reports its mismatch (once per pass).
        """
        total = sum(self.counts)
        position = start % total if self.pad else start
        index = 0
        while index < len(order) and position >= self.counts[order[index]]:
            position -= self.counts[order[index]]
            index += 1
        shards_without_samples = 0
        emitted = 0
        while True:
            if index == len(order):
                if not self.pad:
                    return
                index = 0
            url, count = self.urls[order[index]], self.counts[order[index]]
            errors: list[str] = []
            wanted, got = count - position, 0
            with closing(read_tar_samples(url, lambda _, __, reason: errors.append(reason), skip=position)) as samples:
                for sample in islice(samples, wanted):
                    got += 1
                    # before yielding the shard's last listed sample, at which the consumer may stop
                    if got == wanted and emitted < own and next(samples, None) is not None:
                        self._count_surplus(url, count, counter)
                    emitted += 1
                    yield sample
            missing = wanted - got
            if missing:
                reason = f"shard {url} ended after {position + got} of its {count} samples " + (
                    f"({', '.join(errors) or 'the tar ends there'})"
                )
                if emitted + missing <= own:
                    log.warning("%s; the %d missing samples are counted as skipped", reason, missing)
                for offset in range(missing):
                    emitted += 1
                    yield {"__key__": f"{url}#{position + got + offset}", "__url__": url, ERROR_FIELD: reason}
            shards_without_samples = 0 if got else shards_without_samples + 1
            if shards_without_samples > len(order):
                raise BadSampleError(f"no readable sample in any of the {len(order)} shards ({self.urls[0]}, ...)")
            position = 0
            index += 1

    @staticmethod
    def _count_surplus(url: str, count: int, counter: SkipCounter) -> None:
        """A shard holding more samples than its manifest lists: the rest is not read, and counted (headers only)."""
        extra = count_tar_samples(url) - count
        log.warning("shard %s holds %d samples more than the %d manifest.json lists; they are not read and counted as "
                    "skipped (rebuild the shard set with vlp-data)", url, extra, count)
        counter(url, None, f"beyond the {count} samples manifest.json lists", count=extra)

    def _resampled(self, rng: random.Random, counter: SkipCounter) -> Iterator[dict]:
        """Endless samples of whole shards drawn uniformly with replacement (open_clip's ResampledShards)."""
        shards_without_samples = 0
        while True:
            read_any = False
            for sample in read_tar_samples(self.urls[rng.randrange(len(self.urls))], counter):
                read_any = True
                yield sample
            shards_without_samples = 0 if read_any else shards_without_samples + 1
            if shards_without_samples > 10 * len(self.urls):
                raise BadSampleError(f"no readable sample in any of the {len(self.urls)} shards ({self.urls[0]}, ...)")


class _InSlot(NamedTuple):
    """Where a worker left a batch's packed images: its slot, the slot's sequence number and the tensor shapes."""

    worker: int
    slot: int
    sequence: int
    shapes: list[tuple[int, ...]]


class Handover:
    """Worker -> main process handover of batches through a ring of shared-memory slots per worker.

    PyTorch hands every tensor a worker yields over in a shared-memory segment of its own, created, filled, passed
    as a file descriptor through a socket and mapped again for each batch: about a millisecond of CPU per tensor on
    each side, plus a page fault per 4 kB, which for small images costs as much as decoding them. Here the main
    process maps `slots` slots per worker once, before the workers start; a worker copies the packed uint8 images
    into its next slot and yields only the slot's address, the other tensors travel as numpy arrays inside the
    pickled batch (a few hundred bytes), and the main process copies the images out and marks the slot free.

    Each slot keeps two sequence numbers (written, released): a worker writes a slot only when the batch it held was
    released, else (the consumer is further behind than the DataLoader's prefetching allows) it falls back to
    PyTorch's own handover for that batch, so a slot is never overwritten while in use. The slots take
    `num_workers * slots` batches of uint8 crops in /dev/shm (PyTorch's own handover needs about half that).
    `field` is the batch entry holding the packed list of uint8 tensors (the decoder's `packed_field`: `image`, or
    `video` for clips).
    """

    def __init__(self, num_workers: int, slots: int, slot_bytes: int, field: str = "image") -> None:
        self.field = field
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.data = torch.empty(num_workers, slots, slot_bytes, dtype=torch.uint8).share_memory_()
        self.state = torch.zeros(num_workers, slots, 2, dtype=torch.int64).share_memory_()
        self.sequence = 0  # per process: each worker counts its own batches

    def pack(self, worker: int, batch: dict) -> dict:
        """In the worker: the images into the next slot (when free), every other tensor to numpy."""
        images = batch[self.field]
        if isinstance(images, list):
            self.sequence += 1
            slot = self.sequence % self.slots
            written, released = self.state[worker, slot].tolist()
            if written == released and sum(tensor.numel() for tensor in images) <= self.slot_bytes:
                flat, offset = self.data[worker, slot], 0
                for tensor in images:
                    flat[offset : offset + tensor.numel()].view(tensor.shape).copy_(tensor)
                    offset += tensor.numel()
                self.state[worker, slot, 0] = self.sequence
                batch[self.field] = _InSlot(worker, slot, self.sequence, [tuple(tensor.shape) for tensor in images])
        return {name: value if name == self.field else _convert(value, torch.Tensor, torch.Tensor.numpy)
                for name, value in batch.items()}

    def unpack(self, batch: dict) -> dict:
        """In the main process: the images copied out of their slot (which is then free), numpy back to tensors."""
        batch = {name: _convert(value, np.ndarray, torch.from_numpy) for name, value in batch.items()}
        where = batch[self.field]
        if isinstance(where, _InSlot):
            flat, offset, images = self.data[where.worker, where.slot], 0, []
            for shape in where.shapes:
                count = math.prod(shape)
                images.append(flat[offset : offset + count].view(shape).clone())
                offset += count
            self.state[where.worker, where.slot, 1] = where.sequence
            batch[self.field] = images
        return batch


def _convert(value: object, kind: type, convert: Callable[[object], object]) -> object:
    """`convert` every `kind` in `value`, a batch entry (plain dicts, such as tokens, and lists, such as boxes, are
    walked)."""
    if isinstance(value, kind):
        return convert(value)
    if type(value) is dict:
        return {name: _convert(item, kind, convert) for name, item in value.items()}
    if type(value) is list:
        return [_convert(item, kind, convert) for item in value]
    return value


def _keep(batch: dict) -> dict:
    """The DataLoader's collate function: batches are made in the pipeline and must cross over as they are."""
    return batch


class StreamingLoader:
    """Iterable of batches with an explicit length: a `webdataset.WebLoader` over a `ShardStream`.

    The epoch of each pass comes from `epoch_source` (the trainer's current epoch in the DataModules) or, without
    one, counts the passes. `__iter__` is lazy: no worker starts before the first batch is asked for. With
    `finish=False` the batches keep their packed uint8 crops for the consumer to `finish_views` (on its device).
    """

    def __init__(
        self,
        stream: ShardStream,
        num_workers: int = 0,
        epoch_source: Callable[[], int] | None = None,
        finish: bool = True,
    ) -> None:
        self.stream = stream
        self.num_workers = num_workers
        self.epoch_source = epoch_source
        self.finish = finish
        self.passes = 0
        self.loader = WebLoader(
            stream, batch_size=None, shuffle=False, num_workers=num_workers, persistent_workers=False, collate_fn=_keep
        )

    def __len__(self) -> int:
        """Batches per pass; without padding the stream's last batch is short (bad samples may shorten it more)."""
        return self.stream.batches_per_rank

    def resume_from(self, point: ResumePoint) -> None:
        """Continue epoch `point.epoch` after the batches already used (applied when that epoch's pass starts;
        without an `epoch_source` the next pass is that epoch)."""
        self.stream.resume = point
        if self.epoch_source is None:
            self.passes = point.epoch

    def __iter__(self) -> Iterator[dict]:
        self.stream.epoch = self.epoch_source() if self.epoch_source is not None else self.passes
        self.passes += 1
        self.stream.pass_index = self.passes
        # A fresh set of slots each pass (the workers of a pass map it when they start), sized for the packed
        # images of one batch; the DataLoader keeps at most `prefetch_factor` (2) batches per worker in flight.
        decoder = self.stream.decoder
        handover = self.stream.handover = (
            Handover(self.num_workers, slots=4, slot_bytes=self.stream.batch_size * decoder.image_bytes,
                     field=decoder.packed_field)
            if self.num_workers > 0
            else None
        )
        try:
            for batch in self.loader:
                if handover is not None:
                    batch = handover.unpack(batch)
                yield finish_views(batch) if self.finish else batch
        finally:
            self.stream.handover = None
            if self.stream.resume is not None and self.stream.resume.epoch <= self.stream.epoch:
                self.stream.resume = None


def make_loader(
    shards: str | Sequence[str],
    decoder: SampleDecoder,
    batch_size: int,
    *,
    counts: list[int] | None = None,
    samples_per_epoch: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    seed: int = 0,
    shuffle: bool = True,
    shuffle_buffer: int = 1000,
    resampled: bool = False,
    pad: bool = True,
    strict: bool = False,
    epoch_source: Callable[[], int] | None = None,
    finish: bool = True,
) -> StreamingLoader:
    """Build the pipeline for one split; `samples_per_epoch` defaults to the shards' total; `finish=False` leaves
    the views' photometric half to the consumer (`finish_views`)."""
    urls = expand_shards(shards)
    counts = counts if counts is not None else resolve_counts(urls)
    samples = samples_per_epoch or sum(counts)
    global_batch = batch_size * (world_size if pad else 1)
    repeated = max(1, math.ceil(samples / global_batch)) * global_batch - sum(counts)
    if pad and not resampled and repeated > 0 and rank == 0:
        log.warning("the epoch takes %d samples (%d batches of %d on %d ranks) from %d in the shards: %d are repeated "
                    "to fill it (%s, ...)", repeated + sum(counts), max(1, math.ceil(samples / global_batch)),
                    batch_size, world_size, sum(counts), repeated, urls[0])
    stream = ShardStream(
        urls,
        counts,
        decoder,
        batch_size,
        batches_per_rank=max(1, math.ceil(samples / global_batch)),
        rank=rank,
        seed=seed,
        shuffle=shuffle,
        shuffle_buffer=shuffle_buffer,
        resampled=resampled,
        pad=pad,
        strict=strict,
    )
    return StreamingLoader(stream, num_workers=num_workers, epoch_source=epoch_source, finish=finish)


class _EvalBatches:
    """Batches of an unfinished loader without the bookkeeping field (evaluation has no resume), the images moved
    to `device` (when given) as uint8 and finished there."""

    def __init__(self, loader: StreamingLoader, device: torch.device | str | None) -> None:
        self.loader = loader
        self.device = device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            batch.pop(STREAM_FIELD)
            if self.device is not None:
                batch["image"] = [images.to(self.device, non_blocking=True) for images in batch["image"]]
            yield finish_views(batch)


def make_eval_loader(
    shards: str,
    image_size: int,
    batch_size: int,
    tokenizer: Tokenizer | None = None,
    num_workers: int = 0,
    view: Views | None = None,
    device: torch.device | str | None = None,
    with_conversation: bool = False,
) -> Iterable[dict]:
    """Evaluation batches: every sample exactly once, in shard order (per worker), one deterministic `EvalView`
    crop (or `view`); captions (tokenized when `tokenizer` is given), labels, foreground masks (`mask`
    [N, S, S] bool, from `.mask.png`) and instances (`boxes`, `masks`, `objects`, from `.instances.png`) when the
    shards hold them; with `with_conversation`, each sample's `.json` conversation (`conversation`, samples without a
    valid one skipped).
    With `device` the images arrive there (normalised on it), everything else stays on the CPU."""
    urls = expand_shards(shards)
    if not urls:
        raise DataConfigError(f"make_eval_loader: shards={shards!r} matches no shard")
    manifest = manifest_of(urls)
    members = shard_members(urls, manifest)
    decoder = SampleDecoder(
        (view or EvalView()).build(image_size),
        with_caption="txt" in members,
        with_label="cls" in members,
        with_mask=MASK_MEMBER in members,
        tokenizer=tokenizer,
        num_classes=class_count(manifest),
        with_instances=INSTANCES_MEMBER in members,
        with_conversation=with_conversation,
    )
    loader = make_loader(urls, decoder, batch_size, num_workers=num_workers, shuffle=False, pad=False, finish=False)
    return _EvalBatches(loader, device)


def manifest_of(urls: list[str]) -> dict | None:
    """The manifest of the first local shard's folder (members and class names are the same for a whole set)."""
    path = local_path(urls[0])
    return read_manifest(path.parent) if path is not None else None
