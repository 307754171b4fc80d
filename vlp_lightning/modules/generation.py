"""Autoregressive generation for any decoder: greedy and beam search, a length limit, a stop token, pluggable logits
processors.

The decoder is a function `next_token_logits(prefixes [M, t], rows [M]) -> logits [M, V]`: the logits of the token
after each prefix, where `rows[m]` is the batch element prefix m belongs to (so the caller can pick that element's
image tokens; with beams, M = batch x beams). Nothing here knows about images or a particular model, so the fusion
decoders (CoCa) and the frozen language models share it.

* Greedy: the most likely token each step (beam_size 1).
* `min_length`: the stop token is forbidden before that many generated tokens (open_clip's CoCa decodes with
  `min_seq_len` 5); an undertrained decoder's most likely first token is often the stop token itself, the one token
  every caption has.
* Beam search (Sutskever et al. 2014; the decoding CoCa and ALBEF/BLIP captioners report): `beam_size` hypotheses
  per element, extended by their top continuations each step and pruned to the best `beam_size` by summed
  log-probability. A hypothesis that emitted the stop token is finished: it keeps its score and only pads from then
  on, competing with the open ones. The winner maximises score / length ** length_penalty (length counted up to and
  including the stop token; penalty 0 = raw sum, 1 = mean log-probability per token).
* `logits_processors`: callables `(prefixes [M, t], logits [M, V]) -> logits` applied in order before the
  softmax each step (repetition penalties, bad-word masks, contrastive decoding...).

Returns the generated tokens of each element without the start token, cut before the stop token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

NextTokenLogits = Callable[[Tensor, Tensor], Tensor]
LogitsProcessor = Callable[[Tensor, Tensor], Tensor]


@torch.no_grad()
def generate(
    next_token_logits: NextTokenLogits,
    batch_size: int,
    *,
    start_token_id: int,
    stop_token_id: int,
    max_length: int,
    beam_size: int = 1,
    min_length: int = 0,
    length_penalty: float = 0.0,
    logits_processors: Sequence[LogitsProcessor] = (),
    device: torch.device | str = "cpu",
) -> list[list[int]]:
    """Token ids generated for each of `batch_size` elements (module doc). `max_length` counts generated tokens
    (the start token excluded)."""
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1 generated token, got {max_length}")
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1 (1 = greedy), got {beam_size}")
    beams = beam_size
    rows = torch.arange(batch_size, device=device).repeat_interleave(beams)  # [B*K]
    prefixes = torch.full((batch_size * beams, 1), start_token_id, dtype=torch.long, device=device)
    scores = torch.zeros(batch_size, beams, device=device)
    scores[:, 1:] = -torch.inf  # every beam starts as the same prefix: expand only the first one at step 1
    finished = torch.zeros(batch_size * beams, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch_size * beams, device=device)
    for step in range(max_length):
        logits = next_token_logits(prefixes, rows).float()
        if step < min_length:
            logits[:, stop_token_id] = -torch.inf
        for processor in logits_processors:
            logits = processor(prefixes, logits)
        log_probs = torch.log_softmax(logits, dim=-1)  # [B*K, V]
        vocab = log_probs.shape[-1]
        # a finished hypothesis continues only with the stop token, at no cost: it keeps its score
        stay = torch.full_like(log_probs, -torch.inf)
        stay[:, stop_token_id] = 0.0
        log_probs = torch.where(finished[:, None], stay, log_probs)
        candidates = (scores.view(-1, 1) + log_probs).view(batch_size, beams * vocab)
        scores, chosen = candidates.topk(beams, dim=1)  # [B, K]
        parent = (chosen // vocab + torch.arange(batch_size, device=device)[:, None] * beams).view(-1)
        tokens = (chosen % vocab).view(-1, 1)
        prefixes = torch.cat([prefixes[parent], tokens], dim=1)
        lengths = lengths[parent] + (~finished[parent]).float()
        finished = finished[parent] | (tokens[:, 0] == stop_token_id)
        if bool(finished.all()):
            break
    normalised = scores.view(-1) / lengths.clamp(min=1) ** length_penalty
    best = normalised.view(batch_size, beams).argmax(dim=1) + torch.arange(batch_size, device=device) * beams
    outputs = []
    for sequence in prefixes[best, 1:].tolist():
        outputs.append(sequence[: sequence.index(stop_token_id)] if stop_token_id in sequence else sequence)
    return outputs
