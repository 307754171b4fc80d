"""The PEFT blocks (modules/peft.py) and the methods that use them (PEFTClassifier, PVP): LoRA equals Hugging Face
`peft`'s and merges exactly, zero-initialised blocks start as the frozen model, VPT places its prompts as the paper's
equations say, only the PEFT tensors and the head train, and PVP starts from another run's PEFT tensors exactly."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from vlp_lightning import methods
from vlp_lightning.modules import VisionEncoder
from vlp_lightning.modules.peft import (
    LoRALinear,
    PromptedBlocks,
    add_adapters,
    add_lora,
    add_visual_prompts,
    apply_peft,
    merge_lora,
    peft_modules,
)

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
CLASSES = ["red apple", "grinning face", "blue car", "green tree"]
DEFAULTS = dict(num_prompts=3, lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, lora_targets=["attn.qkv"],
                adapter_bottleneck=8, adapter_scale=0.1, adapter_dropout=0.0, adapter_position="parallel")


def tiny_vit(depth: int = 3) -> VisionEncoder:
    torch.manual_seed(0)
    return VisionEncoder("vit_tiny_patch16_224", img_size=32, patch_size=8, width=32, depth=depth, num_heads=2).eval()


def images(count: int = 2) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def randomise_lora_b(vision: VisionEncoder) -> None:
    """B starts at zero; a random B makes a parity or merge check see the update."""
    for module in vision.modules():
        if isinstance(module, LoRALinear):
            module.lora.b.data.normal_(std=0.1)


def test_lora_equals_hugging_face_peft_on_the_same_weights():
    peft = pytest.importorskip("peft")
    vision = tiny_vit()
    reference = peft.get_peft_model(copy.deepcopy(vision.model),
                                    peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["attn.qkv"]))
    add_lora(vision, rank=4, alpha=8.0, dropout=0.0, targets=["attn.qkv"])
    ours = {name.removeprefix("model."): module for name, module in vision.named_modules()
            if isinstance(module, LoRALinear)}
    theirs = {name.removeprefix("base_model.model."): module for name, module in reference.named_modules()
              if hasattr(module, "lora_A") and isinstance(getattr(module, "lora_A"), torch.nn.ModuleDict)}
    assert sorted(ours) == sorted(theirs) == [f"blocks.{i}.attn.qkv" for i in range(3)]
    for name, layer in ours.items():  # the same start: B zero, A within the Kaiming-uniform bound 1 / sqrt(fan_in)
        other = theirs[name]
        assert torch.equal(layer.lora.b, other.lora_B["default"].weight) and not layer.lora.b.any()
        bound = 1 / math.sqrt(layer.base.in_features)
        assert layer.lora.a.abs().max() <= bound and other.lora_A["default"].weight.abs().max() <= bound
        assert layer.lora.scaling == other.scaling["default"] == 2.0
    randomise_lora_b(vision)
    with torch.no_grad():
        for name, layer in ours.items():
            theirs[name].lora_A["default"].weight.copy_(layer.lora.a)
            theirs[name].lora_B["default"].weight.copy_(layer.lora.b)
        x = images()
        torch.testing.assert_close(vision(x), reference.eval()(x), rtol=0, atol=1e-6)
        assert not torch.allclose(vision(x), tiny_vit()(x), atol=1e-4)  # the update is in


def test_merged_lora_is_a_plain_linear_with_the_same_outputs():
    vision = tiny_vit()
    add_lora(vision, rank=4, alpha=16.0, dropout=0.0, targets=["attn.qkv", "mlp.fc2"])
    randomise_lora_b(vision)
    x = images()
    with torch.no_grad():
        adapted = vision(x)
        assert merge_lora(vision) == 6
        assert not any(isinstance(module, LoRALinear) for module in vision.modules())
        assert type(vision.model.blocks[0].attn.qkv) is torch.nn.Linear
        torch.testing.assert_close(vision(x), adapted, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "adapter", "sequential adapter"])
def test_zero_initialised_blocks_start_as_the_frozen_model(kind):
    vision = tiny_vit()
    x = images()
    with torch.no_grad():
        frozen = vision(x)
        if kind == "lora":
            added = add_lora(vision, rank=4, alpha=8.0, dropout=0.0, targets=["attn.qkv"])
        else:
            added = add_adapters(vision, bottleneck=8, scale=0.1, dropout=0.0,
                                 position="parallel" if kind == "adapter" else "sequential")
        assert added and all(param.requires_grad for param in added)
        assert torch.equal(vision(x), frozen)  # B = 0 / W_up = 0: exactly the frozen function


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_inserts_prompts_after_the_class_token_and_drops_them_before_pooling(deep):
    vision = tiny_vit(depth=3)
    x = images()
    with torch.no_grad():
        plain_features, plain_tokens = vision(x), vision.forward_tokens(x)
    (prompts,) = add_visual_prompts(vision, num_prompts=3, deep=deep)
    assert isinstance(vision.model.blocks, PromptedBlocks)
    assert prompts.shape == ((3 if deep else 1), 3, 32)
    assert prompts.abs().max() <= math.sqrt(6 / (3 * 8 * 8 + 32))  # the official xavier-style bound
    inputs, outputs = [], []

    def record(module, args, output):
        inputs.append(args[0])
        outputs.append(output)

    for block in vision.model.blocks:
        block.register_forward_hook(record)
    with torch.no_grad():
        features, tokens = vision(x), vision.forward_tokens(x)
    assert features.shape == plain_features.shape and tokens.shape == plain_tokens.shape  # prompts dropped
    assert not torch.allclose(features, plain_features, atol=1e-4)
    first = inputs[0]
    assert first.shape[1] == 1 + 3 + 16  # [x_0, P, E_0]: class token, prompts, 4x4 patches
    assert torch.equal(first[:, 1:4], prompts[0].expand(2, -1, -1))
    for layer in (1, 2):
        expected = prompts[layer] if deep else outputs[layer - 1][0, 1:4]  # deep: new P_i; shallow: Z_{i-1}
        assert torch.equal(inputs[layer][0, 1:4], expected)
        assert torch.equal(inputs[layer][:, 4:], outputs[layer - 1][:, 4:])  # the patch tokens carry on


def test_unknown_peft_kinds_and_cnn_towers_are_one_sentence():
    with pytest.raises(ValueError) as error:
        apply_peft(tiny_vit(), "prefix", **DEFAULTS)
    assert str(error.value) == ("peft='prefix' is not a PEFT kind; choose one of linear, vpt_shallow, vpt_deep, "
                                "lora, adapter")
    with pytest.raises(ValueError, match=r"^VPT prompts need a timm ViT image tower \(model_name vit_\*\), not "
                                         r"ResNet$"):
        apply_peft(VisionEncoder("resnet18"), "vpt_deep", **DEFAULTS)
    with pytest.raises(ValueError, match=r"^lora_targets=\['attn.proj_x'\] names no Linear layer"):
        apply_peft(tiny_vit(), "lora", **{**DEFAULTS, "lora_targets": ["attn.proj_x"]})


def test_a_wrong_peft_name_under_the_classifier_is_one_sentence(tiny_clip_checkpoint):
    with pytest.raises(ValueError) as error:
        methods.PEFTClassifier(pretrained=tiny_clip_checkpoint, classnames=CLASSES, peft="prompt")
    assert str(error.value).startswith("peft='prompt' is not a PEFT kind") and "\n" not in str(error.value)


@pytest.mark.parametrize("peft", ["vpt_deep", "lora", "adapter"])
def test_only_the_peft_tensors_and_the_head_train_and_the_backbone_stays_bit_identical(peft, tiny_clip_checkpoint,
                                                                                      tmp_path):
    method = methods.PEFTClassifier(pretrained=tiny_clip_checkpoint, classnames=CLASSES, peft=peft,
                                    lora_dropout=0.1)
    trainable = {name: param.detach().clone() for name, param in method.named_parameters() if param.requires_grad}
    assert set(trainable) == set(method.peft_parameters()) | {"head.weight", "head.bias"}
    frozen = {name: value.clone() for name, value in method.state_dict().items() if name not in trainable}
    method.train()
    owned = {child for module in peft_modules(method.pretrained) for child in module.modules()}  # VPT's have no mode
    assert bool(owned) == (peft != "vpt_deep") and all(module.training for module in owned)  # PEFT dropout trains...
    assert not any(module.training for module in method.pretrained.modules() if module not in owned)  # ...alone
    torch.manual_seed(1)
    batches = [{"image": torch.randn(8, 3, 32, 32), "label": torch.arange(8) % 4} for _ in range(3)]
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(method, train_dataloaders=DataLoader(batches, batch_size=None))
    after = method.state_dict()
    assert all(torch.equal(value, after[name]) for name, value in frozen.items())
    assert all(not torch.equal(value, after[name]) for name, value in trainable.items()), [
        name for name, value in trainable.items() if torch.equal(value, after[name])]


def test_pvp_starts_from_the_peft_tensors_of_an_upstream_run_and_nothing_else(tiny_clip_checkpoint, tmp_path):
    upstream = methods.PEFTClassifier(pretrained=tiny_clip_checkpoint, classnames=CLASSES, peft="lora")
    for param in upstream.peft_parameters().values():
        param.data.normal_()
    torch.nn.init.normal_(upstream.head.weight)
    checkpoint = tmp_path / "upstream.ckpt"
    torch.save({"state_dict": upstream.state_dict()}, checkpoint)

    downstream = methods.PVP(pretrained=tiny_clip_checkpoint, classnames=["cat", "dog", "cow"], peft="lora",
                             peft_checkpoint=str(checkpoint))
    fresh = methods.PVP(pretrained=tiny_clip_checkpoint, classnames=["cat", "dog", "cow"], peft="lora")
    loaded, expected = downstream.peft_parameters(), upstream.peft_parameters()
    assert len(loaded) == 18 and loaded.keys() == expected.keys()  # A and B of 9 qkv layers
    assert all(torch.equal(loaded[name], expected[name]) for name in loaded)
    assert downstream.head.weight.shape == (3, 64)  # a new head for the downstream classes
    untouched = {name: value for name, value in fresh.state_dict().items() if name not in loaded and "head" not in name}
    assert all(torch.equal(downstream.state_dict()[name], value) for name, value in untouched.items())

    with pytest.raises(ValueError, match=r"^peft_checkpoint=.* has no pretrained\.vision\.model\.blocks\.prompts of "
                                         r"shape \[9, 5, 64\] \(1 of 1 PEFT tensors missing"):
        methods.PVP(pretrained=tiny_clip_checkpoint, classnames=CLASSES, peft="vpt_deep",
                    peft_checkpoint=str(checkpoint))
    with pytest.raises(ValueError, match="peft='linear' has no PEFT parameters to start from"):
        methods.PVP(pretrained=tiny_clip_checkpoint, classnames=CLASSES, peft="linear", peft_checkpoint=str(checkpoint))
    state = upstream.state_dict()
    state["pretrained.vision.model.blocks.0.norm1.weight"] += 1  # a run on another backbone
    torch.save({"state_dict": state}, checkpoint)
    with pytest.raises(ValueError, match=r"adapted another backbone than pretrained="):
        methods.PVP(pretrained=tiny_clip_checkpoint, classnames=CLASSES, peft="lora", peft_checkpoint=str(checkpoint))
    with pytest.raises(Exception, match=r"^peft_checkpoint .*missing\.ckpt: no such file"):
        methods.PVP(pretrained=tiny_clip_checkpoint, classnames=CLASSES, peft_checkpoint=str(tmp_path / "missing.ckpt"))


def test_documented_path_upstream_peft_run_then_pvp_from_its_last_checkpoint(tiny_clip_checkpoint, make_shards,
                                                                            tmp_path, monkeypatch):
    """`vlp fit` of the PEFTClassifier recipe (upstream), then of the PVP recipe whose peft_checkpoint is that run's
    last.ckpt, as the PVP recipe's header says (the tests' tiny CLIP stands in for the DINO run, generated shapes for
    Fashion-MNIST): the downstream run starts from the upstream prompts."""
    from vlp_lightning.cli import main

    monkeypatch.setattr("sys.argv", ["vlp"])
    monkeypatch.chdir(tmp_path)
    shards = make_shards(tmp_path / "shards", n=16, per_shard=16, image_size=32)
    common = ["--model.init_args.pretrained", tiny_clip_checkpoint, "--model.init_args.classnames_from",
              shards.pattern, "--data.train_shards", shards.pattern, "--data.val_shards", "null",
              "--data.test_shards", "null", "--data.batch_size", "8", "--data.num_workers", "0",
              "--trainer.max_steps", "2", "--trainer.val_check_interval", "1.0",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    main(["fit", "--config", f"{EXPERIMENTS}/peftclassifier/fashion_mnist_tiny.yaml", *common])
    upstream = tmp_path / "runs/peftclassifier/fashion_mnist_tiny/checkpoints/last.ckpt"
    prompts = torch.load(upstream, weights_only=True)["state_dict"]["pretrained.vision.model.blocks.prompts"]
    loaded = []
    monkeypatch.setattr(methods.PVP, "on_fit_start", lambda self: loaded.append(self.vision.model.blocks.prompts
                                                                                .detach().clone()))
    main(["fit", "--config", f"{EXPERIMENTS}/pvp/fashion_mnist_tiny.yaml", *common])
    assert (tmp_path / "runs/pvp/fashion_mnist_tiny/checkpoints/last.ckpt").exists()
    assert torch.equal(loaded[0], prompts)  # the upstream run's trained prompts, not a new initialisation
