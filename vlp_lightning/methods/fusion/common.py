"""What the fusion and captioning methods share: the special tokens of a tokenizer, sample identities, image-text
matching with hard negatives, the captioning loss and next-token logits of a decoder, and the caption protocol
(`CaptionGenerator`)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vlp_lightning.distributed import all_gather_no_grad, all_gather_with_grad, rank
from vlp_lightning.losses.fusion import caption_loss, itm_loss, sample_hard_negatives
from vlp_lightning.modules.fusion import FusionTextTransformer
from vlp_lightning.modules.generation import generate
from vlp_lightning.modules.tokenizers import Tokenizer


@dataclass(frozen=True)
class TextSpecials:
    """Token ids a fusion text model needs besides the tokenizer's: where a text starts and stops, the id of the
    [MASK] token (a tokenizer without one gets an extra id, `vocab_size - 1`, its own embedding row), and which ids
    masking must never choose."""

    vocab_size: int
    start_token_id: int
    stop_token_id: int
    mask_token_id: int

    @property
    def special_token_ids(self) -> tuple[int, int, int]:
        return (self.start_token_id, self.stop_token_id, self.mask_token_id)


def text_specials(tokenizer: Tokenizer) -> TextSpecials:
    """The `TextSpecials` of any suite tokenizer: its start / end tokens (`sot_token_id` / `eot_token_id`) and its
    own mask token when it has one (BERT's [MASK]), else one id past its vocabulary."""
    start, stop = getattr(tokenizer, "sot_token_id", None), getattr(tokenizer, "eot_token_id", None)
    if start is None or stop is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no sot_token_id / eot_token_id; fusion and captioning methods need a "
            "tokenizer that marks where a text starts and stops (ByteTokenizer, CLIPTokenizer, HFTokenizer)"
        )
    mask = getattr(tokenizer, "mask_token_id", None)
    if mask is None:
        return TextSpecials(tokenizer.vocab_size + 1, start, stop, tokenizer.vocab_size)
    return TextSpecials(tokenizer.vocab_size, start, stop, mask)


def sample_ids(batch: dict) -> Tensor:
    """One int64 per sample naming its image, equal for equal `__key__`s on every rank and in every process (a
    stable hash, not Python's salted `hash`): two rows of one image are never each other's negatives. Without keys
    every row is its own image (row index offset by the rank)."""
    keys = batch.get("__key__")
    if keys is None:
        count = batch["image"].shape[0]
        return torch.arange(count) + rank() * count
    digests = [hashlib.blake2b(str(key).encode(), digest_size=8).digest() for key in keys]
    return torch.tensor([int.from_bytes(digest, "little") >> 1 for digest in digests], dtype=torch.long)


def _gather(x: Tensor) -> Tensor:
    """Across ranks: floating tensors with gradient (negatives from other ranks train them too), masks without."""
    return all_gather_with_grad(x) if x.is_floating_point() else all_gather_no_grad(x)


def hard_negative_batch(
    image_side: Sequence[Tensor],
    text_side: Sequence[Tensor],
    similarity_i2t: Tensor,
    similarity_t2i: Tensor,
    ids: Tensor,
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """The 3B pairs image-text matching scores (ALBEF, Li et al. 2021, sec. 3.2): the B positive pairs, one negative
    image for every text and one negative text for every image, each drawn with probability softmax(similarity)
    among the other images / texts of the *global* batch (gathered from every rank with gradient; ALBEF draws from
    the local batch, BLIP from the gathered one), so the fusion must tell apart the pairs the contrastive space
    confuses. Returns (image-side tensors [3B, ...], text-side tensors [3B, ...], labels [3B]: 1 = match).

    Args:
        image_side, text_side: the local batch's per-sample tensors of each side ([B, ...] each: tokens, masks...).
        similarity_i2t: [B, G] local images against the gathered texts; similarity_t2i: [B, G] local texts against
            the gathered images (G = B x world, columns in rank order).
        ids: [B] sample identities (`sample_ids`): a column of the same image is never a negative.
    """
    batch = similarity_i2t.shape[0]
    device = similarity_i2t.device
    ids = ids.to(device)
    all_ids = all_gather_no_grad(ids)
    negative_text = sample_hard_negatives(similarity_i2t.detach(), ids, all_ids)  # [B] columns
    negative_image = sample_hard_negatives(similarity_t2i.detach(), ids, all_ids)
    images = [torch.cat([x, _gather(x)[negative_image], x]) for x in image_side]
    texts = [torch.cat([x, x, _gather(x)[negative_text]]) for x in text_side]
    labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(device)
    return images, texts, labels


def match_with_hard_negatives(
    fusion: FusionTextTransformer,
    head: nn.Module,
    image_tokens: Tensor,
    text_states: Tensor,
    text_mask: Tensor,
    similarity_i2t: Tensor,
    similarity_t2i: Tensor,
    ids: Tensor,
    memory: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """ALBEF's ITM: the `hard_negative_batch` pairs through the fusion layers, a 2-way head on the fused first
    token; (cross-entropy, accuracy). `text_states` / `text_mask` are `fusion.encode` outputs of the local texts.
    `memory(image tokens [3B, S, W_img], text states [3B, L, W])` gives the tokens the fusion layers attend to
    (default the image tokens themselves, ALBEF); BUS summarises each image under the pair's own text (its
    text-aware patch selector), negatives included."""
    (images,), (states, masks), labels = hard_negative_batch(
        [image_tokens], [text_states, text_mask], similarity_i2t, similarity_t2i, ids
    )
    attended = images if memory is None else memory(images, states)
    logits = head(fusion.fuse(states, masks, attended)[:, 0])  # the fused [CLS] / first token
    return itm_loss(logits, labels), (logits.argmax(-1) == labels).float().mean()


def captioning_loss(
    decoder: FusionTextTransformer, states: Tensor, mask: Tensor, memory: Tensor, text: dict[str, Tensor]
) -> Tensor:
    """Next-token cross-entropy of a causal decoder reading `memory` (CoCa's L_Cap, Yu et al. 2022, eq. 3; the
    language-modelling loss of captioners). `states`, `mask`: `decoder.encode(text)` outputs. Position t predicts
    token t + 1 (open_clip: logits[:, :-1] against text[:, 1:]); vocabulary logits only where the target is a real
    token (padding would be most of [B, L, V])."""
    fused = decoder.fuse(states, mask, memory)
    real = text["attention_mask"][:, 1:].bool()
    logits = decoder.token_logits(fused[:, :-1][real])[None]  # [1, M, V]
    return caption_loss(logits, text["input_ids"][:, 1:][real][None], ~real[real][None])


def next_token_logits(decoder: FusionTextTransformer, memory: Tensor, prefixes: Tensor) -> Tensor:
    """Logits [N, t, vocab] of a causal decoder reading `memory` [N, S, W_mem] for token prefixes [N, t] (no
    padding): what `CaptionGenerator.caption_logits` returns for a decoder built on `FusionTextTransformer`."""
    _, states, mask = decoder.encode({"input_ids": prefixes, "attention_mask": torch.ones_like(prefixes)})
    return decoder.token_logits(decoder.fuse(states, mask, memory))


class PairQueues:
    """The image and text feature queues of ALBEF-style ITC (`image_queue`, `text_queue`: `MemoryBank`s the method
    builds): a training step stores its features in `_to_enqueue`; they are enqueued, gathered from every rank, once
    the loss went backward (the queues are read by it; ALBEF's `_dequeue_and_enqueue` after the loss), so a
    checkpoint written at the batch's end holds them."""

    _to_enqueue: tuple[Tensor, Tensor] | None = None

    def on_after_backward(self) -> None:
        if self._to_enqueue is not None:
            self.image_queue.enqueue(self._to_enqueue[0])
            self.text_queue.enqueue(self._to_enqueue[1])
            self._to_enqueue = None


class CaptionGenerator:
    """The caption protocol of the suite's decoders (`callbacks.CaptionMetrics` calls `generate_captions`): a method
    mixing this in defines `caption_logits(image_memory, prefixes)` and `caption_memory(images)`, and keeps its
    tokenizer and `TextSpecials` as `self.tokenizer` / `self.specials`."""

    #: generated tokens when the caller does not say (the tokenizer's context, less the start token, at most).
    default_caption_length: int = 30

    def caption_memory(self, images: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define caption_memory(images)")

    def caption_logits(self, memory: Tensor, prefixes: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define caption_logits(memory, prefixes)")

    @torch.no_grad()
    def generate_captions(
        self,
        images: Tensor,
        max_length: int | None = None,
        beam_size: int = 1,
        length_penalty: float = 1.0,
        min_length: int = 1,
    ) -> list[str]:
        """Captions of images [N, 3, H, W]: greedy (beam_size 1) or beam search, at least `min_length` (never an
        empty caption) and at most `max_length` tokens; beams are ranked by mean log-probability per token
        (`length_penalty` 1, Hugging Face's default, which open_clip's CoCa decodes with): a raw sum favours
        stopping early."""
        memory = self.caption_memory(images)
        limit = min(max_length or self.default_caption_length, self.tokenizer.context_length - 1)

        def next_token_logits(prefixes: Tensor, rows: Tensor) -> Tensor:
            return self.caption_logits(memory[rows], prefixes)[:, -1]

        def never_special(prefixes: Tensor, logits: Tensor) -> Tensor:
            """No start token and no id past the tokenizer's vocabulary (an added [MASK]) in a caption."""
            logits[:, self.specials.start_token_id] = -torch.inf
            logits[:, self.tokenizer.vocab_size :] = -torch.inf
            return logits

        tokens = generate(
            next_token_logits,
            images.shape[0],
            start_token_id=self.specials.start_token_id,
            stop_token_id=self.specials.stop_token_id,
            max_length=limit,
            beam_size=beam_size,
            length_penalty=length_penalty,
            min_length=min_length,
            logits_processors=(never_special,),
            device=images.device,
        )
        return [self.tokenizer.decode(ids) for ids in tokens]
