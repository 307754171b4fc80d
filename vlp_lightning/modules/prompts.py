"""Text prompts with learnable context vectors: the block CoOp, CoCoOp, PRE and MaPLe share.

CoOp (Zhou et al. 2022, "Learning to Prompt for Vision-Language Models", eq. 2) feeds the text encoder
`t = [SOS] [V]_1 ... [V]_M [CLASS] . [EOS]`, where the M context vectors [V]_m are learned (one set for every class,
or one per class: "class-specific context") and the class name stays the frozen token embeddings of its words. The
class tokens may also sit in the middle (`[V]_1..[V]_{M/2} [CLASS] [V]_{M/2+1}..[V]_M .`) or at the front.

The prompt is assembled from token ids, so it works with every tokenizer of the suite: the start and end tokens are
whatever the tokenizer brackets a text with (found by tokenising an empty text), the class name is the tokenizer's
tokens of the name, and the feature is read at the end-of-text token *by its id*, not by the argmax of the ids
(CoOp's `tokenized_prompts.argmax(-1)` holds only for CLIP BPE, whose end token has the largest id).

`ctx_init` starts the context from the embeddings of a phrase ("a photo of a", CoOp sec. 4.1, CoCoOp, PRE); with an
explicit `n_ctx` shorter than the phrase, only its first `n_ctx` tokens are learned and the rest stay fixed words
before the class name (MaPLe: `[SOS] [P_1] [P_2] of a [CLASS] . [EOS]`, official code's 2-token "a photo" start).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from vlp_lightning.modules.text import TextTransformer
from vlp_lightning.modules.tokenizers import Tokenizer

ClassTokenPosition = Literal["end", "middle", "front"]
#: id written at the context slots of a prompt's token ids (their embeddings are replaced by the context vectors).
PLACEHOLDER_ID = 0


def inner_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    """The tokenizer's ids of `text` without the start and end tokens it brackets every text with."""
    encoded = tokenizer([text])
    ids = encoded["input_ids"][0][encoded["attention_mask"][0].bool()].tolist()
    return ids[1:-1]


def continuation_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids `text` adds after a preceding word: the tokens of "x" + text after those of "x". For CLIP BPE and
    WordPiece these are the tokens of `text` alone; for bytes they keep the space that separates it from the word
    before, so a prompt reads "a photo of a red apple." and not "a photo of ared apple."."""
    before = inner_tokens(tokenizer, "x")
    full = inner_tokens(tokenizer, "x" + text)
    return full[len(before):] if full[: len(before)] == before else inner_tokens(tokenizer, text.strip())


def special_tokens(tokenizer: Tokenizer) -> tuple[int, int]:
    """(start id, end id): the two real tokens of an empty text (SOS/EOS for CLIP and bytes, [CLS]/[SEP] for BERT)."""
    encoded = tokenizer([""])
    ids = encoded["input_ids"][0][encoded["attention_mask"][0].bool()].tolist()
    if len(ids) != 2:
        raise ValueError(f"{type(tokenizer).__name__} does not bracket a text with one start and one end token")
    return ids[0], ids[1]


def class_name_text(name: str) -> str:
    """A class name as prompts spell it: underscores and hyphens become spaces (CoOp's `name.replace("_", " ")`;
    the emoji subcategories are hyphenated, `face-smiling`)."""
    return name.replace("_", " ").replace("-", " ")


@dataclass
class PromptLayout:
    """Token ids of one prompt per class, where their context vectors go and where they end.

    input_ids: [C, L], PLACEHOLDER_ID at the context slots; context_slots: [C, M] positions of [V]_1..[V]_M;
    end_of_text: [C] position of the end token (found by its id)."""

    input_ids: Tensor
    context_slots: Tensor
    end_of_text: Tensor


def prompt_layout(
    tokenizer: Tokenizer,
    classnames: list[str],
    n_ctx: int,
    position: ClassTokenPosition = "end",
    fixed_words: list[int] | None = None,
    context_length: int | None = None,
) -> PromptLayout:
    """Assemble `[SOS] ctx (fixed words) [CLASS] . [EOS]` (or the middle / front order) as ids for every class."""
    if position not in ("end", "middle", "front"):
        raise ValueError(f"class_token_position must be 'end', 'middle' or 'front', got {position!r}")
    sot, eot = special_tokens(tokenizer)
    fixed = list(fixed_words or [])
    limit = context_length or tokenizer.context_length
    rows, slots = [], []
    for name in classnames:
        readable = " " + class_name_text(name)
        name_ids = continuation_tokens(tokenizer, readable)
        with_period = continuation_tokens(tokenizer, readable + ".")
        period = with_period[len(name_ids):] if with_period[: len(name_ids)] == name_ids else []
        room = limit - 2 - n_ctx - len(fixed) - len(period)
        if room < 1:
            raise ValueError(
                f"{n_ctx} context tokens leave no room for a class name in the text tower's {limit} tokens; lower n_ctx"
            )
        name_ids = name_ids[:room]
        ctx = [PLACEHOLDER_ID] * n_ctx
        if position == "end":
            body, first_slot = ctx + fixed + name_ids, [1 + m for m in range(n_ctx)]
        elif position == "front":
            body = name_ids + ctx + fixed
            first_slot = [1 + len(name_ids) + m for m in range(n_ctx)]
        else:
            half = n_ctx // 2
            body = ctx[:half] + fixed + name_ids + ctx[half:]
            first_slot = [1 + m for m in range(half)] + [1 + half + len(fixed) + len(name_ids) + m
                                                         for m in range(n_ctx - half)]
        rows.append([sot, *body, *period, eot])
        slots.append(first_slot)
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), PLACEHOLDER_ID, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = torch.tensor(row)
    end_of_text = (input_ids == eot).int().argmax(dim=1)  # the end token, found by its id
    return PromptLayout(input_ids, torch.tensor(slots, dtype=torch.long).reshape(len(rows), n_ctx), end_of_text)


class ContextPrompts(nn.Module):
    """CoOp's learnable context and the text features of prompts built with it.

    Args:
        text: the (frozen) built-in text tower, `TextTransformer`.
        tokenizer: its tokenizer.
        n_ctx: context vectors M (CoOp: 16; None with `ctx_init`: one per token of the phrase).
        ctx_init: a phrase whose token embeddings start the context ("a photo of a"); None: N(0, 0.02^2) (CoOp).
        class_specific: one context per class (CoOp's CSC); needs `num_classes`, and cannot prompt unseen classes.
        num_classes: classes of the class-specific context.
        position: where the class tokens sit: "end", "middle" or "front" (CoOp sec. 3.2).
    """

    def __init__(
        self,
        text: TextTransformer,
        tokenizer: Tokenizer,
        n_ctx: int | None = 16,
        ctx_init: str | None = None,
        class_specific: bool = False,
        num_classes: int | None = None,
        position: ClassTokenPosition = "end",
    ) -> None:
        super().__init__()
        if not isinstance(text, TextTransformer):
            raise ValueError(
                f"prompt learning feeds token embeddings to the built-in TextTransformer; this text tower is "
                f"{type(text).__name__}: pretrain with vlp_lightning.modules.TextTransformer as `text`"
            )
        if class_specific and not num_classes:
            raise ValueError("class_specific context needs num_classes (one context per class)")
        self.tokenizer = tokenizer
        self.position = position
        self.class_specific = class_specific
        width = text.num_features
        init_ids = inner_tokens(tokenizer, ctx_init) if ctx_init else []
        if ctx_init and not init_ids:
            raise ValueError(f"ctx_init={ctx_init!r} has no tokens; give a phrase such as 'a photo of a' or null")
        self.n_ctx = n_ctx if n_ctx is not None else len(init_ids)
        if self.n_ctx < 1:
            raise ValueError(f"n_ctx must be at least 1, got {n_ctx} (or give ctx_init)")
        if init_ids and self.n_ctx > len(init_ids):
            raise ValueError(
                f"n_ctx={self.n_ctx} is longer than ctx_init={ctx_init!r} ({len(init_ids)} tokens); lower n_ctx or "
                "set it to null to learn one vector per token of the phrase"
            )
        #: tokens of ctx_init after the learned ones, kept as fixed words before the class name (MaPLe).
        self.fixed_words = init_ids[self.n_ctx:]
        shape = (num_classes, self.n_ctx, width) if class_specific else (self.n_ctx, width)
        if init_ids:
            with torch.no_grad():
                start = text.token_embedding(torch.tensor(init_ids[: self.n_ctx])).float()
            self.ctx = nn.Parameter(start.expand(shape).clone())
        else:
            self.ctx = nn.Parameter(torch.empty(shape).normal_(std=0.02))
        self._layouts: dict[tuple[str, ...], PromptLayout] = {}

    def layout(self, classnames: list[str], context_length: int) -> PromptLayout:
        key = tuple(classnames)
        if key not in self._layouts:
            self._layouts[key] = prompt_layout(
                self.tokenizer, classnames, self.n_ctx, self.position, self.fixed_words, context_length
            )
        return self._layouts[key]

    def context(self) -> Tensor:
        """The context vectors as [1, C or 1, M, width]."""
        return self.ctx[None] if self.class_specific else self.ctx[None, None]

    def embeddings(self, text: TextTransformer, classnames: list[str], ctx: Tensor) -> tuple[Tensor, Tensor]:
        """Prompt embeddings [B*C, L, width] and end positions [B*C] for context vectors `ctx` [B, C or 1, M,
        width] (B = 1 for a context shared by all images, N for CoCoOp's image-conditioned one)."""
        if ctx.shape[1] not in (1, len(classnames)):
            raise ValueError(
                f"the class-specific context was learned for {ctx.shape[1]} classes and cannot prompt "
                f"{len(classnames)} others (unseen classes need a shared context: class_specific false)"
            )
        layout = self.layout(classnames, text.context_length)
        ids = layout.input_ids.to(ctx.device)
        with torch.no_grad():
            words = text.token_embedding(ids)  # [C, L, width], frozen word embeddings
        batch, classes = ctx.shape[0], len(classnames)
        index = layout.context_slots.to(ctx.device)[None, :, :, None].expand(batch, classes, -1, words.shape[-1])
        prompts = words[None].expand(batch, -1, -1, -1).to(ctx.dtype).scatter(
            2, index, ctx.expand(batch, classes, -1, -1)
        )
        end = layout.end_of_text.to(ctx.device).repeat(batch)
        return prompts.reshape(batch * classes, *words.shape[1:]), end
