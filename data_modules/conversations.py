"""Conversations: the sample format of visual instruction tuning (LLaVA, Liu et al. 2023, "Visual Instruction
Tuning"; Vision-Flan, Xu et al. 2024), parsed and checked once where samples are decoded.

A conversation lives in a sample's `.json` under `"conversations"`: a list of turns, each either
`{"role": "system" | "user" | "assistant", "content": str}` (the chat-template format of Hugging Face and OpenAI) or
LLaVA's `{"from": "system" | "human" | "gpt", "value": str}`. `parse_conversation` normalises both to role / content
with the roles system / user / assistant, and refuses what a frozen-language-model method could not train on:

* an optional leading system turn, then user and assistant turns alternating, starting with the user and ending with
  the assistant (every user turn has its answer, the targets of the language-modelling loss);
* every content a non-empty string;
* the image placeholder `<image>` (LLaVA's `DEFAULT_IMAGE_TOKEN`) at most once, and only in a user turn: it marks
  where the image's tokens go. A conversation without it is valid: the method then puts the image before the first
  user turn's text (LLaVA's `preprocess_multimodal` moves the placeholder there too), which is where
  `caption_conversation` puts it explicitly.
"""

from __future__ import annotations

#: where the image's tokens go in a user turn (LLaVA's `DEFAULT_IMAGE_TOKEN`).
IMAGE_PLACEHOLDER = "<image>"
#: the normalised roles.
ROLES = ("system", "user", "assistant")
#: LLaVA's `from` names -> roles.
LLAVA_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


def _turn(turn: object, index: int) -> dict[str, str]:
    """One turn in either format -> {"role", "content"}; one ValueError sentence naming what is wrong."""
    if isinstance(turn, dict) and "role" in turn and "content" in turn:
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            raise ValueError(f"conversation turn {index} has role {role!r}; use one of {', '.join(ROLES)}")
    elif isinstance(turn, dict) and "from" in turn and "value" in turn:
        role, content = LLAVA_ROLES.get(turn["from"]), turn["value"]
        if role is None:
            raise ValueError(f"conversation turn {index} is from {turn['from']!r}; use one of "
                             f"{', '.join(LLAVA_ROLES)} (LLaVA's names) or role/content turns")
    else:
        raise ValueError(f"conversation turn {index} is {str(turn)[:60]!r}; give each turn as "
                         '{"role": ..., "content": ...} or LLaVA\'s {"from": ..., "value": ...}')
    if not isinstance(content, str) or not content.strip():
        raise ValueError(f"conversation turn {index} ({role}) has content {str(content)[:60]!r}; give every turn a "
                         "non-empty string")
    return {"role": role, "content": content}


def parse_conversation(obj: object) -> list[dict[str, str]]:
    """A `.json` `"conversations"` value -> its turns as `[{"role", "content"}, ...]` (module doc); raises ValueError
    with one sentence naming the bad value and the fix."""
    if not isinstance(obj, list) or not obj:
        raise ValueError(f"conversations is {str(obj)[:60]!r}; give a non-empty list of turns")
    turns = [_turn(turn, index) for index, turn in enumerate(obj)]
    start = 1 if turns[0]["role"] == "system" else 0
    for index, turn in enumerate(turns[start:], start):
        expected = ("user", "assistant")[(index - start) % 2]
        if turn["role"] != expected:
            raise ValueError(f"conversation turn {index} is a {turn['role']} turn where a {expected} turn belongs; "
                             "give an optional system turn first, then user and assistant turns alternating, starting "
                             "with the user")
    if len(turns) == start or turns[-1]["role"] != "assistant":
        raise ValueError(f"the conversation ends with a {turns[-1]['role']} turn; end it with the assistant's answer")
    placeholders = [(index, turn["role"], turn["content"].count(IMAGE_PLACEHOLDER)) for index, turn in enumerate(turns)
                    if IMAGE_PLACEHOLDER in turn["content"]]
    if sum(count for _, _, count in placeholders) > 1:
        raise ValueError(f"the conversation holds {IMAGE_PLACEHOLDER} {sum(c for _, _, c in placeholders)} times; "
                         "put it at most once, in a user turn")
    if placeholders and placeholders[0][1] != "user":
        index, role, _ = placeholders[0]
        raise ValueError(f"conversation turn {index} ({role}) holds {IMAGE_PLACEHOLDER}; put it in a user turn")
    return turns


def caption_conversation(caption: str, prompt: str) -> list[dict[str, str]]:
    """A captioned image as a one-exchange conversation: the user asks `prompt` about the image, the assistant
    answers with `caption` (LLaVA's stage-1 feature-alignment data: a brief-description instruction, sec. 5)."""
    return [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{prompt}"}, {"role": "assistant", "content": caption}]
