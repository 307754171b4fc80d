"""Visual question answering on instruction shards: exact match of the method's answers, overall and per task, and
multiple-choice accuracy.

The instruction shards of `vlp-data instructions` (Vision-Flan-style tasks, Xu et al. 2024) hold one conversation
per sample; the question is the first user turn (as the data has it, `<image>` placeholder included where it stands)
and the reference the first assistant turn. Scoring follows the closed-form evaluation of instruction-tuned models
(Vision-Flan's held-out tasks; VQA-style exact match):

* exact match: the answer equals the reference after `captioning.normalize_caption` (lower case, punctuation
  replaced by spaces, white space collapsed), overall and per `.json` `task`;
* grounding accuracy: for samples with a `box` (the `grounding` task of scene shards), the share whose answer's
  first four numbers (`parse_box`) make a box of IoU >= 0.5 with it (acc@0.5, as RefCOCO is scored);
* multiple-choice accuracy: for samples with `options` and `answer` (the letter), the option the answer picks
  (`parse_choice`: an answer equal to an option's text, else the first standalone capital letter among the options'
  letters, else a lower-case letter opening the answer, "b) ...") is the right one. MMBench (Liu et al. 2023) scores
  choices in this spirit, with a language model as the last resort where this one gives up (counted wrong).

Distributed runs: as in `captioning`, every rank reads every sample, batch `i` is answered by rank `i % world_size`
(`generate_across_ranks`) and the answers exchanged, so every rank computes the same metrics.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Iterator

from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from vlp_lightning.callbacks.captioning import generate_across_ranks, normalize_caption
from vlp_lightning.callbacks.features import EvaluationCallback, method_eval_loader, module_device


def parse_choice(answer: str, options: list[str]) -> str | None:
    """The option letter ("A", "B", ...) an answer picks among `options` (module doc), None when it picks none."""
    letters = string.ascii_uppercase[: len(options)]
    normalized = normalize_caption(answer)
    for letter, option in zip(letters, options):
        if normalized and normalized == normalize_caption(option):
            return letter
    standalone = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", answer) if letters else None
    if standalone is not None:
        return standalone.group(1)
    opening = re.match(rf"\s*\(?([{letters.lower()}])(?![A-Za-z])", answer) if letters else None
    return opening.group(1).upper() if opening is not None else None


def first_exchange(conversation: list[dict[str, str]]) -> tuple[str, str]:
    """(first user turn, first assistant turn) of a parsed conversation (`data_modules.conversations`)."""
    question = next(turn["content"] for turn in conversation if turn["role"] == "user")
    reference = next(turn["content"] for turn in conversation if turn["role"] == "assistant")
    return question, reference


def instruction_metrics(answers: list[str], references: list[str], metas: list[dict], prefix: str
                        ) -> dict[str, float]:
    """`{prefix}/exact_match`, `{prefix}/<task>/exact_match` per `.json` task and, where samples have `options`
    and `answer`, `{prefix}/multiple_choice_accuracy` (module doc)."""
    matches = [normalize_caption(answer) == normalize_caption(reference)
               for answer, reference in zip(answers, references)]
    metrics = {f"{prefix}/exact_match": sum(matches) / len(matches)}
    per_task: dict[str, list[bool]] = defaultdict(list)
    chosen: list[bool] = []
    for answer, match, meta in zip(answers, matches, metas):
        if "task" in meta:
            per_task[str(meta["task"])].append(match)
        if "options" in meta and "answer" in meta:
            chosen.append(parse_choice(answer, list(meta["options"])) == meta["answer"])
    metrics.update({f"{prefix}/{task}/exact_match": sum(hits) / len(hits) for task, hits in sorted(per_task.items())})
    if chosen:
        metrics[f"{prefix}/multiple_choice_accuracy"] = sum(chosen) / len(chosen)
    boxes = [box_iou(parse_box(answer), meta["box"]) >= 0.5 for answer, meta in zip(answers, metas) if "box" in meta]
    if boxes:
        metrics[f"{prefix}/grounding_acc@0.5"] = sum(boxes) / len(boxes)
    return metrics


def parse_box(answer: str) -> list[float] | None:
    """The first four numbers of an answer as a box [x0, y0, x1, y1] (None when it has fewer)."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", answer)
    return [float(number) for number in numbers[:4]] if len(numbers) >= 4 else None


def box_iou(box: list[float] | None, reference: list[float]) -> float:
    """Intersection over union of two [x0, y0, x1, y1] boxes (0 for no box or an empty one)."""
    if box is None or box[2] <= box[0] or box[3] <= box[1]:
        return 0.0
    width = max(0.0, min(box[2], reference[2]) - max(box[0], reference[0]))
    height = max(0.0, min(box[3], reference[3]) - max(box[1], reference[1]))
    inter = width * height
    union = (box[2] - box[0]) * (box[3] - box[1]) + (reference[2] - reference[0]) * (reference[3] - reference[1])
    return inter / (union - inter) if union > inter else 0.0


class InstructionAccuracy(EvaluationCallback):
    """Exact match of the method's answers to instruction shards' questions, overall and per task, and
    multiple-choice accuracy (module doc), logged as `vqa/<name>/exact_match`, `vqa/<name>/<task>/exact_match` and
    `vqa/<name>/multiple_choice_accuracy`.

    Needs a method with `answer_questions(images [N, 3, H, W], questions: list[str], max_length: int) -> list[str]`
    (one answer per image, at most `max_length` tokens); other methods skip it with one warning. The images are the
    evaluation crops every evaluation reads (`method_eval_loader`); samples without a valid conversation are skipped.

    Args:
        shards: instruction shard pattern (`vlp-data instructions`: `.json` with `conversations`).
        name: metric prefix.
        max_samples: answer the first this many samples (None: all).
        max_length: longest answer in tokens.
        every_n_epochs, batch_size, num_workers: see `EvaluationCallback`.
    """

    def __init__(
        self,
        shards: str,
        name: str = "vqa",
        max_samples: int | None = None,
        max_length: int = 16,
        every_n_epochs: int = 1,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, batch_size=batch_size, num_workers=num_workers)
        if max_length < 1:
            raise ValueError(f"InstructionAccuracy max_length={max_length} must be at least 1 token")
        self.shards = shards
        self.name = name
        self.max_samples = max_samples
        self.max_length = max_length

    def evaluate(self, trainer: Trainer, method: LightningModule) -> dict[str, float]:
        if not callable(getattr(method, "answer_questions", None)):
            self.warn_once(f"InstructionAccuracy skipped: {type(method).__name__} has no "
                           "answer_questions(images, questions, max_length)")
            return {}
        device = module_device(method)
        loader, _ = method_eval_loader(method, self.shards, self.batch_size, self.num_workers, with_conversation=True)
        references: list[str] = []
        metas: list[dict] = []

        def batches() -> Iterator[tuple[tuple[Tensor, list[str]], int]]:
            for batch in loader:
                rows = len(batch["__key__"]) if self.max_samples is None else min(
                    len(batch["__key__"]), self.max_samples - len(references))
                if rows <= 0:
                    return
                exchanges = [first_exchange(conversation) for conversation in batch["conversation"][:rows]]
                references.extend(reference for _, reference in exchanges)
                metas.extend(batch.get("meta", [{}] * rows)[:rows])
                yield (batch["image"][:rows], [question for question, _ in exchanges]), rows

        def answer(inputs: tuple[Tensor, list[str]]) -> list[str]:
            images, questions = inputs
            return method.answer_questions(images.to(device), questions, self.max_length)

        answers = generate_across_ranks(answer, batches(), name="answer_questions")
        if not answers:
            raise ValueError(f"InstructionAccuracy {self.name!r}: the shards {self.shards} hold no sample with a valid "
                             "conversation; build them with `vlp-data instructions`")
        return instruction_metrics(answers, references, metas, f"vqa/{self.name}")
