"""PLLaVA: per-frame LLaVA tokens average-pooled over (time, height, width), a still image as a repeated clip, the
post-training LoRA fusion at evaluation, and the start from an image LLaVA (tiny random LM, 2-block ViT)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlp_lightning import methods
from vlp_lightning.modules.language_model import LanguageModel
from vlp_lightning.modules.peft import LowRankUpdate


def test_visual_tokens_are_window_means_of_the_per_frame_tokens():
    torch.manual_seed(0)
    method = methods.PLLaVA(num_frames=4, pooling_shape=(2, 2, 2)).eval()
    video = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        frames = method.frame_tokens(video)  # [B, T=4, h=4, w=4, D]
        pooled = method.visual_tokens(video)
    assert frames.shape[1:4] == (4, 4, 4) and pooled.shape == (2, 8, frames.shape[-1])
    # token 0 of the pooled grid: frames 0-1, rows 0-1, columns 0-1; the last: frames 2-3, rows 2-3, columns 2-3
    assert torch.allclose(pooled[:, 0], frames[:, :2, :2, :2].mean(dim=(1, 2, 3)), atol=1e-5)
    assert torch.allclose(pooled[:, -1], frames[:, 2:, 2:, 2:].mean(dim=(1, 2, 3)), atol=1e-5)
    # frames in another order: the same spatial pooling, a different temporal one (time is kept, not averaged away)
    with torch.no_grad():
        reversed_tokens = method.visual_tokens(video.flip(1))
    assert not torch.allclose(reversed_tokens, pooled, atol=1e-4)
    assert torch.allclose(reversed_tokens.view(2, 2, 4, -1).flip(1), pooled.view(2, 2, 4, -1), atol=1e-5)


def test_a_still_image_is_its_clip_of_repeated_frames():
    torch.manual_seed(0)
    method = methods.PLLaVA().eval()
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(method.visual_tokens(image),
                              method.visual_tokens(image.unsqueeze(1).repeat(1, method.num_frames, 1, 1, 1)))


def test_lora_is_fused_with_the_evaluation_alpha_and_trained_with_its_own():
    method = methods.PLLaVA(language_model=LanguageModel(train="lora", lora_rank=8, lora_alpha=32),
                            eval_lora_alpha=4.0)
    updates = [module for module in method.modules() if isinstance(module, LowRankUpdate)]
    assert updates and all(module.scaling == 32 / 8 for module in updates)
    method.eval()
    assert all(module.scaling == 4 / 8 for module in updates)
    method.train()
    assert all(module.scaling == 32 / 8 for module in updates)
    with pytest.raises(ValueError, match="eval_lora_alpha=4.0 fuses LoRA weights, but the language model has no LoRA"):
        methods.PLLaVA(eval_lora_alpha=4.0)
    with pytest.raises(ValueError, match=r"pooling_shape=\(4, 2\) is not three positive sizes"):
        methods.PLLaVA(pooling_shape=(4, 2))


def test_pllava_starts_from_an_image_llava_run(tmp_path):
    """PLLaVA adds no parameters: an image LLaVA's projector (stage 1) is its start, bit for bit."""
    torch.manual_seed(0)
    llava = methods.LLaVA()
    with torch.no_grad():
        for param in llava.connector.parameters():
            param.add_(1.0)
    path = tmp_path / "llava.ckpt"
    torch.save({"state_dict": llava.state_dict(), "vlp": {"method": "vlp_lightning.methods.language.llava.LLaVA"}},
               path)
    video = methods.PLLaVA(language_model=LanguageModel(train="lora"), start_from=str(path))
    assert all(torch.equal(a, b) for a, b in zip(llava.connector.parameters(), video.connector.parameters()))
    assert set(llava.state_dict()) <= set(video.state_dict())


def test_vlp_predict_writes_a_caption_per_clip(make_shards, tmp_path, monkeypatch):
    """`vlp predict` of clip shards (VideoDataModule's predict loader: every clip once, in shard order, no
    randomness): PLLaVA's generated caption of each clip next to its reference."""
    import numpy as np

    from data_modules.builder import iterate_shard
    from data_modules.builder import main as vlp_data
    from vlp_lightning.cli import main

    shards = make_shards(tmp_path / "shards", n=8, per_shard=8, image_size=32)
    assert vlp_data(["moving", str(tmp_path / "clips"), "--images", shards.pattern, "--source", "images",
                     "--count", "5", "--frames", "8", "--size", "32"]) == 0
    clips = str(tmp_path / "clips" / "train-000000.tar")
    keys = [key for key, _ in iterate_shard(tmp_path / "clips" / "train-000000.tar")]
    monkeypatch.chdir(tmp_path)
    main(["predict", "--config", str(Path(__file__).parents[1] / "experiments/pllava/moving_tiny.yaml"),
          "--model.init_args.language_model.init_args.name", "tiny", "--model.init_args.image_tower", "null",
          "--model.init_args.start_from", "null", "--model.init_args.eval_lora_alpha", "null",
          "--model.init_args.language_model.init_args.train", "frozen", "--model.init_args.answer_length", "3",
          "--model.init_args.max_length", "512", "--data.predict_shards", clips, "--data.num_workers", "0",
          "--data.batch_size", "2", "--trainer.callbacks", "[]", "--predictions.path", str(tmp_path / "clips.npz"),
          "--trainer.enable_progress_bar", "false"])
    written = np.load(tmp_path / "clips.npz")
    assert list(written["key"]) == keys and len(written["generated"]) == 5
    assert all(caption.startswith("a ") and " moving " in caption for caption in written["caption"])
