"""Instruction data: conversations parsed in both formats and refused with one sentence per invalid case, `vlp-data
instructions` (valid conversations, seeded, the answer among the options once, keys and splits kept),
`InstructionDataModule` batches and their counted skips, the data modules' checks for conversation-needing methods,
and `InstructionAccuracy` (exact match overall and per task, multiple-choice parsing)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from torch import Tensor

from data_modules import DataConfigError, ImageDataModule, ImageTextDataModule, InstructionDataModule
from data_modules.builder import iterate_shard, main
from data_modules.conversations import IMAGE_PLACEHOLDER, caption_conversation, parse_conversation
from data_modules.manifest import read_manifest, write_manifest
from data_modules.sources.instructions import TASKS, TEMPLATES
from data_modules.views import SingleCrop
from test_callbacks import ColourMethod
from vlp_lightning.callbacks import InstructionAccuracy, parse_choice

CATEGORIES = ["Smileys & Emotion", "Food & Drink", "Animals & Nature", "Objects", "Flags"]
SUBCATEGORIES = ["face-smiling", "fruit", "animal-mammal", "tool", "flag", "drink"]


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def emoji_like_shards(directory: Path, write_tar, train: int = 36, val: int = 8) -> Path:
    """Shards shaped like `vlp-data emoji`'s: `.txt` the lower-cased name, `.cls` the category, `.json` name,
    category, subcategory and subcategory_id, manifest classnames for cls and subcategory_id; train in 2 shards."""
    directory.mkdir(parents=True)
    entries, index = {}, 0
    for split, count, shards in (("train", train, 2), ("val", val, 1)):
        per_shard = count // shards
        for shard in range(shards):
            samples = []
            for _ in range(per_shard):
                category, subcategory = index % len(CATEGORIES), index % len(SUBCATEGORIES)
                name = f"EMOJI NUMBER {index}"
                meta = {"name": name, "category": CATEGORIES[category], "subcategory": SUBCATEGORIES[subcategory],
                        "subcategory_id": subcategory}
                samples.append({"__key__": f"{split}{index:04d}", "png": png((index * 7 % 256, 90, 200)),
                                "txt": name.lower().encode(), "cls": str(category).encode(),
                                "json": json.dumps(meta).encode()})
                index += 1
            name = f"{split}-{shard:06d}.tar"
            write_tar(directory / name, samples)
            entries[name] = {"split": split, "count": len(samples), "keys": [s["__key__"] for s in samples]}
    write_manifest(directory, {
        "format": 1, "source": "emoji-like (tests)", "licence": "CC-BY 4.0", "created": "2024-01-01", "seed": 0,
        "shards": entries, "splits": {"train": train, "val": val}, "members": ["cls", "json", "png", "txt"],
        "classnames": {"cls": CATEGORIES, "subcategory_id": SUBCATEGORIES},
    })
    return directory


def read_samples(folder: Path) -> dict[str, tuple[str, dict]]:
    """key -> (split, decoded .json) of every sample of a shard folder, with the manifest's splits."""
    manifest = read_manifest(folder)
    return {key: (manifest["shards"][path.name]["split"], json.loads(sample["json"]))
            for path in sorted(folder.glob("*.tar")) for key, sample in iterate_shard(path)}


@pytest.fixture
def instruction_shards(tmp_path: Path, write_tar) -> tuple[Path, Path]:
    source = emoji_like_shards(tmp_path / "emoji", write_tar)
    assert main(["instructions", str(source / "*.tar"), str(tmp_path / "instructions"), "--seed", "3"]) == 0
    return source, tmp_path / "instructions"


# ---------------------------------------------------------------------------------------------- conversations


def test_parse_conversation_accepts_both_formats_and_normalises_them() -> None:
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nWhat is it?"},
            {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Colour?"},
            {"role": "assistant", "content": "Grey."}]
    llava = [{"from": {"user": "human", "assistant": "gpt"}.get(turn["role"], turn["role"]), "value": turn["content"]}
             for turn in chat]
    assert parse_conversation(chat) == chat
    assert parse_conversation(llava) == chat
    no_placeholder = [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A cat."}]
    assert parse_conversation(no_placeholder)[0] == {"role": "user", "content": "What is it?"}  # the method adds it
    assert parse_conversation(caption_conversation("a red square", "Describe the image.")) == [
        {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\nDescribe the image."},
        {"role": "assistant", "content": "a red square"}]


USER, ASSISTANT = {"role": "user", "content": "Hi <image>"}, {"role": "assistant", "content": "Hello."}


@pytest.mark.parametrize(("conversation", "message"), [
    ({"role": "user"}, "conversations is \"{'role': 'user'}\"; give a non-empty list of turns"),
    ([], "conversations is '[]'; give a non-empty list of turns"),
    (["hello", ASSISTANT], "conversation turn 0 is 'hello'; give each turn as {\"role\": ..., \"content\": ...} or "
     "LLaVA's {\"from\": ..., \"value\": ...}"),
    ([{"role": "bot", "content": "x"}], "conversation turn 0 has role 'bot'; use one of system, user, assistant"),
    ([{"from": "robot", "value": "x"}], "conversation turn 0 is from 'robot'; use one of system, human, gpt (LLaVA's "
     "names) or role/content turns"),
    ([USER, {"role": "assistant", "content": "  "}], "conversation turn 1 (assistant) has content '  '; give every "
     "turn a non-empty string"),
    ([USER, {"role": "assistant", "content": 3}], "conversation turn 1 (assistant) has content '3'; give every turn a "
     "non-empty string"),
    ([ASSISTANT, USER], "conversation turn 0 is a assistant turn where a user turn belongs; give an optional system "
     "turn first, then user and assistant turns alternating, starting with the user"),
    ([USER, USER, ASSISTANT], "conversation turn 1 is a user turn where a assistant turn belongs; give an optional "
     "system turn first, then user and assistant turns alternating, starting with the user"),
    ([USER, ASSISTANT, {"role": "system", "content": "x"}], "conversation turn 2 is a system turn where a user turn "
     "belongs; give an optional system turn first, then user and assistant turns alternating, starting with the "
     "user"),
    ([USER, ASSISTANT, USER], "the conversation ends with a user turn; end it with the assistant's answer"),
    ([{"role": "system", "content": "x"}], "the conversation ends with a system turn; end it with the assistant's "
     "answer"),
    ([{"role": "user", "content": "<image> and <image>"}, ASSISTANT], "the conversation holds <image> 2 times; put it "
     "at most once, in a user turn"),
    ([USER, ASSISTANT, {"role": "user", "content": "<image>?"}, ASSISTANT], "the conversation holds <image> 2 times; "
     "put it at most once, in a user turn"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "<image>"}], "conversation turn 1 "
     "(assistant) holds <image>; put it in a user turn"),
])
def test_parse_conversation_rejects_each_invalid_case_with_one_sentence(conversation: object, message: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_conversation(conversation)
    assert str(error.value) == message


# ---------------------------------------------------------------------------------------------- vlp-data instructions


def test_instructions_builder_writes_valid_seeded_conversations_keeping_keys_and_splits(
    instruction_shards, tmp_path
) -> None:
    source, out = instruction_shards
    before, after = read_samples(source), read_samples(out)
    assert {key: split for key, (split, _) in after.items()} == {key: split for key, (split, _) in before.items()}
    tasks = set()
    for key, (_, meta) in after.items():
        conversation = parse_conversation(meta["conversations"])
        assert [turn["role"] for turn in conversation] == ["user", "assistant"]
        assert conversation[0]["content"].startswith(f"{IMAGE_PLACEHOLDER}\n")
        assert {name: meta[name] for name in before[key][1]} == before[key][1]  # the old fields are kept
        tasks.add(meta["task"])
        answer = conversation[1]["content"]
        if meta["task"] == "caption":
            assert answer == before[key][1]["name"].lower()
            continue
        names = CATEGORIES if meta["label_field"] == "cls" else SUBCATEGORIES
        true = names[CATEGORIES.index(meta["category"]) if meta["label_field"] == "cls" else meta["subcategory_id"]]
        if meta["task"] == "classify":
            assert answer == true
        elif meta["task"] == "multiple_choice":
            options, letter = meta["options"], meta["answer"]
            assert len(options) == 4 and len(set(options)) == 4 and options.count(true) == 1
            assert letter == "ABCD"[options.index(true)] and answer == f"{letter}. {true}"
            assert all(f"{'ABCD'[index]}. {option}" in conversation[0]["content"] for index, option in enumerate(options))
        else:
            assert answer == ("Yes" if f"{true}" in conversation[0]["content"] else "No")
    assert tasks == set(TASKS) - {"grounding"}  # the generated shapes have no scene objects
    yes = [meta for _, meta in after.values() if meta["task"] == "yes_no"]
    assert 0 < sum(parse_conversation(meta["conversations"])[1]["content"] == "Yes" for meta in yes) < len(yes)

    manifest = read_manifest(out)
    served = [task for task in TASKS if task != "grounding"]  # the generated shapes have no scene objects
    assert manifest["instructions"]["tasks"] == served
    assert manifest["instructions"]["templates"] == {task: list(TEMPLATES[task]) for task in served}
    assert manifest["licence"].startswith("CC-BY 4.0") and manifest["instructions"]["input_licence"] == "CC-BY 4.0"
    assert manifest["classnames"] == read_manifest(source)["classnames"]

    again, other = tmp_path / "again", tmp_path / "other"
    assert main(["instructions", str(source / "*.tar"), str(again), "--seed", "3"]) == 0
    assert main(["instructions", str(source / "*.tar"), str(other), "--seed", "4"]) == 0
    assert read_samples(again) == after  # deterministic under the seed
    assert read_samples(other) != after


def test_instructions_builder_options_and_one_line_errors(make_shards, tmp_path, capsys, write_tar) -> None:
    shards = make_shards(tmp_path / "shapes", n=12, per_shard=6, with_json=True)
    out = tmp_path / "one-template"
    assert main(["instructions", shards.pattern, str(out), "--tasks", "caption,classify", "--templates-per-task",
                 "1"]) == 0
    for _, meta in read_samples(out).values():
        prompt = parse_conversation(meta["conversations"])[0]["content"].removeprefix(f"{IMAGE_PLACEHOLDER}\n")
        assert prompt == TEMPLATES[meta["task"]][0].format(kind="category")
    unlabelled = make_shards(tmp_path / "unlabelled", n=6, per_shard=6, with_label=False, with_text=False)
    for argv, start in (
        ([shards.pattern, str(tmp_path / "x"), "--templates-per-task", "9"], "--templates-per-task 9 is not one of"),
        ([shards.pattern, str(tmp_path / "x"), "--tasks", "caption,ocr"], "--tasks 'caption,ocr' names ocr; choose"),
        ([unlabelled.pattern, str(tmp_path / "x")], "no sample of"),
    ):
        assert main(["instructions", *argv]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith(f"vlp-data: error: {start}") and "\n" not in error
    captions_only = make_shards(tmp_path / "captions", n=6, per_shard=6, with_label=False)
    assert main(["instructions", captions_only.pattern, str(tmp_path / "x"), "--tasks", "caption,yes_no"]) == 2
    assert "can serve --tasks yes_no, which needs class labels" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- data modules


def conversational(**attributes) -> SimpleNamespace:
    """A stand-in for a frozen-language-model method: it needs images and conversations."""
    return SimpleNamespace(required_keys=("image", "conversation"), image_size=16, train_views=SingleCrop,
                           tokenizer=None, **attributes)


def attach(datamodule, method):
    datamodule.trainer = SimpleNamespace(lightning_module=method, global_rank=0, world_size=1, current_epoch=0,
                                         training=True, loggers=[])
    return datamodule


def test_instruction_batches_carry_the_conversations_of_their_keys(instruction_shards) -> None:
    _, out = instruction_shards
    datamodule = attach(InstructionDataModule(train_shards=str(out / "train-*.tar"), batch_size=8, num_workers=0),
                        conversational())
    datamodule.setup("fit")
    batch = datamodule.on_after_batch_transfer(datamodule.on_before_batch_transfer(
        next(iter(datamodule.train_dataloader())), 0), 0)
    assert set(batch) == {"__key__", "image", "conversation", "meta", "label"}
    assert batch["image"].shape == (8, 3, 16, 16)
    samples = read_samples(out)
    assert batch["conversation"] == [parse_conversation(samples[key][1]["conversations"]) for key in batch["__key__"]]
    assert [meta["name"] for meta in batch["meta"]] == [samples[key][1]["name"] for key in batch["__key__"]]
    assert batch["label"].tolist() == [CATEGORIES.index(samples[key][1]["category"]) for key in batch["__key__"]]


def test_samples_with_broken_conversations_are_counted_skips(tmp_path, write_tar) -> None:
    good = {"conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A dot."}]}
    broken = {"conversations": [{"from": "human", "value": "<image>\nWhat?"}]}
    samples = [{"__key__": f"s{index}", "png": png((index * 40, 0, 0)), "json": json.dumps(meta).encode()}
               for index, meta in enumerate([good, broken, {"name": "no conversation"}, good])]
    (tmp_path / "data").mkdir()
    write_tar(tmp_path / "data" / "train-000000.tar", samples)
    # one batch of 2 in file order (a shuffle buffer of 1): s0, then s1 and s2 dropped, then s3
    datamodule = attach(InstructionDataModule(train_shards=str(tmp_path / "data/train-000000.tar"), batch_size=2,
                                              samples_per_epoch=2, shuffle_buffer=1, num_workers=0), conversational())
    datamodule.setup("fit")
    (batch,) = [datamodule.on_before_batch_transfer(batch, 0) for batch in datamodule.train_dataloader()]
    assert batch["__key__"] == ["s0", "s3"] and [len(c) for c in batch["conversation"]] == [2, 2]
    assert datamodule.skipped_count() == 2


def test_data_modules_check_what_a_conversation_needing_method_can_get(make_shards, tmp_path) -> None:
    shards = make_shards(tmp_path / "plain", n=6, per_shard=6)
    with pytest.raises(DataConfigError) as error:
        attach(ImageDataModule(train_shards=shards.pattern), conversational()).setup("fit")
    assert str(error.value) == (
        "SimpleNamespace needs conversations or captions (`conversation`) but ImageDataModule provides neither; use "
        "InstructionDataModule with `vlp-data instructions` shards or ImageTextDataModule with captioned shards"
    )
    with pytest.raises(DataConfigError) as error:
        attach(InstructionDataModule(train_shards=shards.pattern), conversational()).setup("fit")
    assert str(error.value) == (
        f"InstructionDataModule needs conversations (.json \"conversations\") but train_shards={shards.pattern!r} has "
        "no .json members; build instruction shards with `vlp-data instructions SHARDS OUT` (e.g. `vlp-data "
        "instructions 'data/emoji/*.tar' data/emoji-instructions`)"
    )
    datamodule = attach(ImageTextDataModule(train_shards=shards.pattern, batch_size=3, num_workers=0),
                        conversational())
    datamodule.setup("fit")  # the method makes caption conversations itself
    assert len(next(iter(datamodule.train_dataloader()))["caption"]) == 3


# ---------------------------------------------------------------------------------------------- InstructionAccuracy


class Answerer(ColourMethod):
    """`answer_questions` answers right for every other sample (in loader order), and records the questions."""

    def __init__(self, references: list[str]) -> None:
        super().__init__(with_text=False)
        self.answers = [reference if index % 2 == 0 else "zebra stripes" for index, reference in enumerate(references)]
        self.questions: list[str] = []
        self.lengths: set[int] = set()

    def answer_questions(self, images: Tensor, questions: list[str], max_length: int) -> list[str]:
        assert images.shape[1:] == (3, 16, 16) and len(questions) == images.shape[0]
        answers = self.answers[len(self.questions) : len(self.questions) + len(questions)]
        self.questions += questions
        self.lengths.add(max_length)
        return answers


def test_instruction_accuracy_scores_exact_match_per_task_and_multiple_choice(instruction_shards) -> None:
    _, out = instruction_shards
    samples = list(read_samples(out).values())  # shard order: the loader's
    train = [meta for split, meta in samples if split == "train"]
    conversations = [parse_conversation(meta["conversations"]) for meta in train]
    method = Answerer([conversation[1]["content"] for conversation in conversations])
    callback = InstructionAccuracy(str(out / "train-*.tar"), name="emoji", max_length=8, batch_size=5)
    metrics = callback.evaluate(None, method)
    assert method.questions == [conversation[0]["content"] for conversation in conversations]
    assert method.lengths == {8}
    assert metrics["vqa/emoji/exact_match"] == 0.5
    for task in {meta["task"] for meta in train}:
        rows = [index for index, meta in enumerate(train) if meta["task"] == task]
        assert metrics[f"vqa/emoji/{task}/exact_match"] == pytest.approx(sum(i % 2 == 0 for i in rows) / len(rows))
    choices = [index for index, meta in enumerate(train) if meta["task"] == "multiple_choice"]
    assert metrics["vqa/emoji/multiple_choice_accuracy"] == pytest.approx(
        sum(index % 2 == 0 for index in choices) / len(choices))
    first = Answerer([conversation[1]["content"] for conversation in conversations])
    metrics = InstructionAccuracy(str(out / "train-*.tar"), max_samples=7, batch_size=5).evaluate(None, first)
    assert len(first.questions) == 7 and metrics["vqa/vqa/exact_match"] == pytest.approx(4 / 7)


def test_multiple_choice_answers_are_parsed_and_methods_without_answers_skip(instruction_shards) -> None:
    options = ["Smileys & Emotion", "Food & Drink", "Objects", "Flags"]
    for answer, letter in (("B", "B"), ("b) foo", "B"), ("The answer is C.", "C"), ("Food & Drink", "B"),
                           ("food and drink", None), ("(d)", "D"), ("D. Flags", "D"), ("none of them", None)):
        assert parse_choice(answer, options) == letter, answer
    _, out = instruction_shards
    callback = InstructionAccuracy(str(out / "val-*.tar"))
    method = ColourMethod()
    with pytest.warns(UserWarning, match="has no answer_questions") as warnings:
        assert callback.evaluate(None, method) == {} and callback.evaluate(None, method) == {}
    assert len([w for w in warnings if "answer_questions" in str(w.message)]) == 1
    with pytest.raises(ValueError, match="max_length=0 must be at least 1 token"):
        InstructionAccuracy(str(out / "val-*.tar"), max_length=0)


def test_grounding_instructions_of_scenes_write_the_box_and_are_scored_by_iou(scene_shards, tmp_path) -> None:
    from vlp_lightning.callbacks.vqa import box_iou, instruction_metrics, parse_box

    out = tmp_path / "grounding"
    assert main(["instructions", str(scene_shards / "train-*.tar"), str(out), "--tasks", "grounding"]) == 0
    metas = [json.loads(sample["json"]) for shard in sorted(out.glob("train-*.tar"))
             for _, sample in iterate_shard(shard)]
    assert metas and all(meta["task"] == "grounding" for meta in metas)
    for meta in metas:
        question, answer = meta["conversations"][0]["content"], meta["conversations"][1]["content"]
        width, height = meta["size"]
        boxes = [[item["box"][0] / width, item["box"][1] / height, item["box"][2] / width, item["box"][3] / height]
                 for item in meta["objects"] if f"the {item['name']}" in question]
        assert any(box == pytest.approx(meta["box"]) for box in boxes)  # the box of an object the question names
        assert parse_box(answer) == pytest.approx(meta["box"], abs=0.0051)  # two decimals
    answers = [meta["conversations"][1]["content"] for meta in metas]
    wrong = ["[0.0, 0.0, 0.01, 0.01]"] * len(metas)
    half = [answer if index % 2 == 0 else wrong[index] for index, answer in enumerate(answers)]
    references = answers
    assert instruction_metrics(answers, references, metas, "v")["v/grounding_acc@0.5"] == 1.0
    assert instruction_metrics(half, references, metas, "v")["v/grounding_acc@0.5"] == pytest.approx(
        len(range(0, len(metas), 2)) / len(metas))
    assert box_iou([0, 0, 1, 1], [0, 0, 1, 0.5]) == pytest.approx(0.5) and box_iou(None, [0, 0, 1, 1]) == 0.0
