"""UNIT and its data: rendered words (`vlp-data words`), the frozen reconstruction target, reading words back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_modules.builder import iterate_shard, main
from data_modules.sources.words import HELDOUT_SPLIT, words_source
from data_modules.views import EvalView
from vlp_lightning.losses.self_distillation import feature_reconstruction_loss
from vlp_lightning.methods import UNIT
from vlp_lightning.modules import VisionEncoder


def build_words(out: Path, *options: str) -> int:
    return main(["words", str(out), "--count", "24", "--heldout-count", "8", "--pages", "3", "--size", "32",
                 "--split", "train=0.75,val=0.25", *options])


def test_words_build_reproducibly_and_the_heldout_fonts_stay_out_of_train_and_val(tmp_path, capsys):
    assert build_words(tmp_path / "a") == 0 and build_words(tmp_path / "b") == 0
    assert build_words(tmp_path / "c", "--seed", "1") == 0
    shards = sorted(path.name for path in (tmp_path / "a").glob("*.tar"))
    assert shards == ["train-000000.tar", f"{HELDOUT_SPLIT}-000000.tar", "val-000000.tar"]
    for name in shards:  # same seed, same bytes; another seed draws other samples
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    fonts, kinds = {}, set()
    for name in shards:
        for _, sample in iterate_shard(tmp_path / "a" / name):
            meta = json.loads(sample["json"])
            assert sample["txt"].decode() == meta["text"] and meta["ocr"] is True
            fonts.setdefault(name.rpartition("-")[0], set()).add(meta["font"])
            kinds.add(meta["kind"])
    assert kinds == {"word", "page"}
    assert fonts[HELDOUT_SPLIT] and all(font.startswith("DejaVuSerif") for font in fonts[HELDOUT_SPLIT])
    assert not any(font.startswith("DejaVuSerif") for font in fonts["train"] | fonts["val"])


@pytest.mark.parametrize(("options", "says"), [
    (["--fonts-dir", "/nonexistent/fonts"], "apt-get install fonts-dejavu-core"),
    (["--heldout-font", "Helvetica"], "--heldout-font 'Helvetica' matches 0 of the"),
    (["--split", f"train=0.5,{HELDOUT_SPLIT}=0.5"], f"--split may not name {HELDOUT_SPLIT}"),
])
def test_words_bad_input_is_one_sentence_naming_the_fix(tmp_path, capsys, options, says):
    assert build_words(tmp_path / "out", *options) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and says in error[0]


def test_unit_bad_arguments_are_one_sentence():
    with pytest.raises(ValueError, match="build it with dynamic_img_size: true"):
        UNIT(document_scale=2.0)
    with pytest.raises(ValueError, match="must be positive"):
        UNIT(image_scale=0.0)


def test_feature_reconstruction_loss_is_cosine_plus_l1_and_falls_when_optimised():
    target = torch.randn(2, 5, 8)
    assert feature_reconstruction_loss(target.clone(), target).item() == pytest.approx(0.0, abs=1e-6)
    opposite = feature_reconstruction_loss(-target, target, l1_weight=0.5)  # cos = -1: 2 + 0.5 * mean |2 t|
    assert opposite.item() == pytest.approx(2 + 0.5 * (2 * target).abs().mean().item(), rel=1e-5)
    prediction = torch.randn(2, 5, 8, requires_grad=True)
    optimizer = torch.optim.Adam([prediction], lr=0.1)
    losses = []
    for _ in range(20):
        loss = feature_reconstruction_loss(prediction, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2


def mixed_batch(method: UNIT, ocr: list[bool]) -> dict:
    texts = [f"word{index}" for index in range(len(ocr))]
    return {"image": torch.randn(len(ocr), 3, 32, 32), "text": method.tokenizer(texts), "caption": texts,
            "__key__": [str(index) for index in range(len(ocr))], "meta": [{"ocr": flag} for flag in ocr]}


def test_the_reconstruction_target_is_the_frozen_starting_encoder():
    torch.manual_seed(0)
    method = UNIT().train()
    start = {name: value.clone() for name, value in method.vision.state_dict().items()}
    assert not method.teacher.training and not any(param.requires_grad for param in method.teacher.parameters())
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-2)  # even handed every parameter, f_π cannot move
    for _ in range(3):
        outputs = method.forward_loss(mixed_batch(method, [True, False, True, False]))
        optimizer.zero_grad()
        outputs["loss"].backward()
        assert all(param.grad is None for param in method.teacher.parameters())
        optimizer.step()
    assert set(outputs) == {"loss", "ocr", "caption", "reconstruction"}
    assert all(torch.equal(method.teacher.state_dict()[name], value) for name, value in start.items())
    assert any(not torch.equal(method.vision.state_dict()[name], value) for name, value in start.items())
    assert set(method.forward_loss(mixed_batch(method, [True, True]))) == {"loss", "ocr"}  # no natural image: no L_vis


def test_unit_overfits_two_rendered_words_and_reads_them_back(tmp_path):
    """Two words in one font (the held-out font never seen), greedy decoding reads them back exactly."""
    vocabulary = tmp_path / "two.txt"
    vocabulary.write_text("cat\nsun\n")
    records = words_source(count=2, heldout_count=1, size=32, vocabulary=vocabulary).records[:2]
    torch.manual_seed(0)
    method = UNIT(vision=VisionEncoder("vit_tiny_patch16_224", img_size=32, patch_size=4, width=64, depth=2,
                                       num_heads=2))
    transform = EvalView(mean=method.vision.mean, std=method.vision.std).build(32)
    images = torch.stack([transform(record.open_image()) for record in records])
    words = [record.caption for record in records]
    assert sorted(words) == ["cat", "sun"]
    batch = {"image": images, "text": method.tokenizer(words), "meta": [record.meta for record in records],
             "__key__": [record.key for record in records]}
    optimizer = torch.optim.AdamW([param for param in method.parameters() if param.requires_grad], lr=2e-3)
    method.train()
    for _ in range(60):
        loss = method.forward_loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    method.eval()
    assert method.generate_captions(images, max_length=6) == words


def test_a_second_stage_starts_from_the_first_with_its_original_target(tmp_path):
    """Inter-scale finetuning continues f_θ and the decoders of stage 1, and f_π stays the starting encoder."""
    torch.manual_seed(0)
    first = UNIT()
    original = {name: value.clone() for name, value in first.teacher.state_dict().items()}
    with torch.no_grad():
        for param in first.vision.parameters():
            param.add_(0.1)  # stage 1 moved the encoder
    path = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": first.state_dict(), "vlp": {"method": "vlp_lightning.methods.fusion.unit.UNIT"}}, path)
    second = UNIT(start_from=str(path))
    moved = first.vision.state_dict()
    assert all(torch.equal(second.vision.state_dict()[name], value) for name, value in moved.items())
    assert all(torch.equal(second.teacher.state_dict()[name], value) for name, value in original.items())
    with pytest.raises(ValueError, match="does not fit this UNIT"):
        UNIT(width=32, start_from=str(path))
    with pytest.raises(ValueError, match="is not a file"):
        UNIT(start_from=str(tmp_path / "missing.ckpt"))

