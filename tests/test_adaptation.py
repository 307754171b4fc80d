"""Adaptation from a pretrained checkpoint: the frozen part stays bit-identical, a wrong start is one sentence, the
prompt-learning block assembles and pools prompts right, and the methods agree with CLIP where their equations say so.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
import torch.nn.functional as F
from torch.utils.data import DataLoader

from tests.conftest import TINY_CLIP_CONFIG
from vlp_lightning import methods
from vlp_lightning.callbacks import BaseToNovel, ZeroShotDataset, harmonic_mean
from vlp_lightning.callbacks.features import evaluation_mode
from vlp_lightning.callbacks.zero_shot import build_zero_shot_classifier
from vlp_lightning.methods.adaptation.base import base_class_count
from vlp_lightning.modules.prompts import prompt_layout
from vlp_lightning.modules.tokenizers import ByteTokenizer
from vlp_lightning.pretrained import build_method, save_checkpoint

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
CLASSES = ["red apple", "grinning face", "blue car", "green tree"]


def batches(method, count: int = 3, size: int = 8) -> list[dict]:
    torch.manual_seed(1)
    return [{"image": torch.randn(size, 3, method.image_size, method.image_size),
             "label": torch.arange(size) % len(CLASSES), "__key__": [str(i) for i in range(size)]}
            for _ in range(count)]


@pytest.mark.parametrize("name", ["CoOp", "MaPLe"])
def test_only_the_adapted_parameters_change_and_the_pretrained_stay_bit_identical(name, tiny_clip_checkpoint,
                                                                                   tmp_path):
    method = getattr(methods, name)(pretrained=tiny_clip_checkpoint, classnames=CLASSES)
    frozen = {key: value.clone() for key, value in method.pretrained.state_dict().items()}
    adapted = {key: value.clone() for key, value in method.named_parameters() if value.requires_grad}
    assert adapted and not any(key.startswith("pretrained.") for key in adapted)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(method, train_dataloaders=DataLoader(batches(method), batch_size=None))
    assert all(torch.equal(frozen[key], value) for key, value in method.pretrained.state_dict().items())
    assert not any(module.training for module in method.pretrained.modules())  # eval mode throughout
    after = dict(method.named_parameters())
    assert not torch.equal(adapted["prompts.ctx"], after["prompts.ctx"])
    assert any(not torch.equal(adapted[key], after[key]) for key in adapted if key != "prompts.ctx") or name == "CoOp"


def test_an_image_only_checkpoint_under_prompt_learning_is_one_sentence(tmp_path):
    config = {"class_path": "vlp_lightning.methods.SwAV"}
    swav, _ = build_method(config, "test", "")
    checkpoint = save_checkpoint(swav, tmp_path / "swav.ckpt", config)
    with pytest.raises(ValueError) as error:
        methods.CoOp(pretrained=str(checkpoint), classnames=CLASSES)
    message = str(error.value)
    assert message.startswith(f"CoOp adapts a method with an image-text space, but pretrained={checkpoint} holds a "
                              "SwAV") and "\n" not in message
    with pytest.raises(Exception, match=r"pretrained .*missing.ckpt: no such file"):
        methods.CoOp(pretrained=str(tmp_path / "missing.ckpt"), classnames=CLASSES)


def test_class_names_are_required_and_a_class_specific_context_refuses_novel_classes(tiny_clip_checkpoint):
    with pytest.raises(ValueError, match="CoOp needs the class names: set classnames"):
        methods.CoOp(pretrained=tiny_clip_checkpoint)
    method = methods.CoOp(pretrained=tiny_clip_checkpoint, classnames=CLASSES, class_specific=True)
    features = F.normalize(torch.randn(2, method.embed_dim), dim=-1)
    assert method.class_logits(features, CLASSES).shape == (2, 4)
    with pytest.raises(ValueError, match="learned for 4 classes and cannot prompt 2 others"):
        method.class_logits(features, ["cat", "dog"])


class EndIsSmallest(ByteTokenizer):
    """Bytes with the end token at id 1 (below every byte in use): argmax of the ids would miss it."""

    eot_token_id = 1


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_prompt_layout_places_context_and_finds_the_end_token_by_its_id(position):
    tokenizer = EndIsSmallest(context_length=40)
    layout = prompt_layout(tokenizer, ["cat", "red fox"], n_ctx=4, position=position)
    for row, name in enumerate(["cat", "red fox"]):
        ids = layout.input_ids[row]
        end = int(layout.end_of_text[row])
        assert ids[end] == 1 and ids[0] == 256 and int(ids.argmax()) != end
        slots = layout.context_slots[row].tolist()
        text = bytes(int(i) for i in ids[: end + 1] if 1 < i < 256 and i != 0).decode()
        assert text == f" {name}."  # the class name follows the context with its space, then the period
        first_name = ids.tolist().index(ord(" "))
        if position == "end":
            assert slots == [1, 2, 3, 4]
        elif position == "front":
            assert slots[0] > first_name and slots == list(range(slots[0], slots[0] + 4))
        else:
            assert slots[:2] == [1, 2] and slots[2] > first_name


def test_coop_started_from_the_template_words_is_clips_zero_shot_classifier(tiny_clip_checkpoint):
    """CoOp's prompt `[SOS] a photo of a [CLASS] . [EOS]` with the context at the words' embeddings is exactly the
    zero-shot prompt "a photo of a {}." (eq. 2 vs CLIP sec. 3.1.2): the same class embeddings."""
    method = methods.CoOp(pretrained=tiny_clip_checkpoint, classnames=CLASSES, n_ctx=None, ctx_init="a photo of a")
    with torch.no_grad():
        prompted = method.class_embeddings(CLASSES, torch.zeros(1, method.embed_dim))[0]
        zero_shot = build_zero_shot_classifier(method.pretrained, method.tokenizer, CLASSES, ["a photo of a {}."])
    assert torch.allclose(prompted, zero_shot, atol=1e-5)


def test_pre_with_a_silent_encoder_is_coop(tiny_clip_checkpoint):
    """V' = BiLSTM(V) + V: with the LSTM's weights at zero its output is 0 and PRE's prompts are CoOp's."""
    torch.manual_seed(0)
    pre = methods.PRE(pretrained=tiny_clip_checkpoint, classnames=CLASSES)
    coop = methods.CoOp(pretrained=tiny_clip_checkpoint, classnames=CLASSES, n_ctx=None, ctx_init="a photo of a")
    coop.prompts.ctx.data.copy_(pre.prompts.ctx.data)
    for param in pre.prompt_encoder.parameters():
        param.data.zero_()
    features = F.normalize(torch.randn(3, pre.embed_dim), dim=-1)
    with torch.no_grad():
        assert torch.allclose(pre.class_logits(features, CLASSES), coop.class_logits(features, CLASSES), atol=1e-5)


def test_cocoop_conditions_the_context_on_each_image(tiny_clip_checkpoint):
    method = methods.CoCoOp(pretrained=tiny_clip_checkpoint, classnames=CLASSES)
    assert method.prompts.n_ctx == 12  # "a photo of a" in bytes
    features = F.normalize(torch.randn(3, method.embed_dim), dim=-1)
    context = method.context(features)
    assert context.shape == (3, 1, 12, 64) and not torch.allclose(context[0], context[1])
    assert method.class_logits(features, CLASSES).shape == (3, 4)


def test_maple_couples_vision_prompts_to_the_text_prompts(tiny_clip_checkpoint):
    method = methods.MaPLe(pretrained=tiny_clip_checkpoint, classnames=CLASSES, prompt_depth=3)
    assert len(method.vision_prompts()) == 3 and method.vision_prompts()[0].shape == (2, 64)
    images = torch.randn(2, 3, 32, 32)
    method.encode_image(images).sum().backward()  # the image side trains the language prompts through F_i
    assert method.prompts.ctx.grad is not None and method.deep_text_prompts[0].grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"prompt_depth=10 must be in 1\.\.9"):
        methods.MaPLe(pretrained=tiny_clip_checkpoint, classnames=CLASSES, prompt_depth=10)


def test_base_to_novel_scores_halves_among_their_own_classes(tiny_clip_checkpoint, make_shards, tmp_path):
    shards = make_shards(tmp_path / "shards", n=24, per_shard=24, image_size=32, num_classes=4, with_text=False)
    dataset = ZeroShotDataset(name="shapes", shards=shards.pattern, templates=["a photo of a {}."])
    callback = BaseToNovel([dataset], batch_size=8)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    clip, _ = build_method(TINY_CLIP_CONFIG, "test", "")
    clip.load_state_dict(torch.load(tiny_clip_checkpoint, weights_only=True)["state_dict"])
    coop = methods.CoOp(pretrained=tiny_clip_checkpoint, classnames_from=shards.pattern, n_ctx=None,
                        ctx_init="a photo of a")
    results = {}
    for name, method in (("clip", clip), ("coop", coop)):
        with evaluation_mode(trainer, method):
            results[name] = callback.evaluate(trainer, method)
    assert set(results["clip"]) == {"base2novel/shapes/base", "base2novel/shapes/novel", "base2novel/shapes/hm"}
    assert results["coop"] == pytest.approx(results["clip"])  # the template's words: CLIP's zero-shot, both halves
    metrics = results["clip"]
    assert metrics["base2novel/shapes/hm"] == pytest.approx(
        harmonic_mean(metrics["base2novel/shapes/base"], metrics["base2novel/shapes/novel"]))
    maple = methods.MaPLe(pretrained=tiny_clip_checkpoint, classnames_from=shards.pattern, prompt_depth=2)
    with evaluation_mode(trainer, maple):  # one pass, two methods: each gets its own image features
        prompted = callback.features(maple, shards.pattern, representation="joint").image
        frozen = callback.features(clip, shards.pattern, representation="joint").image
    assert not torch.allclose(prompted, frozen)
    assert base_class_count(99) == 50 and base_class_count(4) == 2
    assert harmonic_mean(0.8, 0.4) == pytest.approx(2 * 0.32 / 1.2) and harmonic_mean(0, 0) == 0


def test_documented_path_pretrain_then_adapt_then_test(make_shards, tmp_path, monkeypatch, capsys):
    """`vlp fit` of the CLIP recipe, `vlp fit` of the CoOp recipe from its last.ckpt, `vlp test` printing the
    base-to-novel table, as the recipe's header says (generated shards stand in for the emoji)."""
    from vlp_lightning.cli import main

    monkeypatch.setattr("sys.argv", ["vlp"])
    monkeypatch.chdir(tmp_path)
    shards = make_shards(tmp_path / "shards", n=16, per_shard=16, image_size=32)
    quiet = ["--data.batch_size", "8", "--data.num_workers", "0", "--trainer.max_steps", "2",
             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    main(["fit", "--config", f"{EXPERIMENTS}/clip/emoji_tiny.yaml", "--data.train_shards", shards.pattern,
          "--data.val_shards", "null", *quiet])
    assert (tmp_path / "runs/clip/emoji_tiny/checkpoints/last.ckpt").exists()
    evaluation = tmp_path / "evaluation.yaml"
    evaluation.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "vlp_lightning.callbacks.BaseToNovel",
        "init_args": {"every_n_epochs": 0, "datasets": [{"name": "shapes", "shards": shards.pattern,
                                                          "label_field": "cls", "templates": "photo"}]}}]}}))
    adapt = ["--config", f"{EXPERIMENTS}/coop/emoji_tiny.yaml", "--config", str(evaluation),
             "--model.init_args.label_field", "cls", "--model.init_args.classnames_from", shards.pattern,
             "--data.train_shards", shards.pattern, "--data.test_shards", shards.pattern, *quiet]
    main(["fit", *adapt])
    capsys.readouterr()
    main(["test", *adapt, "--ckpt_path", "last"])
    table = capsys.readouterr()
    assert "base2novel/shapes/hm" in table.out + table.err


def test_procrustes_recovers_a_rotation_and_calibration_moves_class_means():
    from vlp_lightning.methods.adaptation.drtune import procrustes_rotation, semantic_calibration

    torch.manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6))
    if torch.det(rotation) < 0:
        rotation[:, 0] = -rotation[:, 0]
    source = torch.randn(50, 6)
    assert torch.allclose(procrustes_rotation(source, source @ rotation.T), rotation, atol=1e-4)
    labels = torch.arange(40) % 2
    downstream = F.normalize(torch.randn(40, 6) + 3 * F.one_hot(labels, 6).float(), dim=1)
    pretrained = F.normalize(torch.randn(40, 6), dim=1)
    head = torch.eye(6)[:2]
    calibrated = semantic_calibration(pretrained, downstream, labels, head, rotate=False, scale=torch.tensor(2.0))
    assert torch.allclose(calibrated.norm(dim=1), torch.full((40,), 2.0), atol=1e-5)
    for label in (0, 1):  # each class of the pretrained queue now sits on its downstream class
        rows = labels == label
        before = F.cosine_similarity(pretrained[rows].mean(0), downstream[rows].mean(0), dim=0)
        after = F.cosine_similarity(calibrated[rows].mean(0), downstream[rows].mean(0), dim=0)
        assert after > 0.95 > before


def test_drtune_regularises_through_the_head_only_and_the_baseline_has_no_queue(tiny_clip_checkpoint):
    torch.manual_seed(0)
    method = methods.DRTune(pretrained=tiny_clip_checkpoint, classnames=CLASSES, queue_size=16)
    batch = batches(method, count=1)[0]
    method.train()
    method.forward_loss(batch)  # fills half the queue
    assert int(method.queue_filled) == 8
    queue = method.queue.bank.clone()
    encoder = list(method.encoder.parameters())
    regularised = torch.autograd.grad(method.forward_loss(batch)["loss"], encoder, allow_unused=True)
    method.queue.bank.copy_(queue)
    method.queue.pointer.fill_(8)
    method.queue_filled.fill_(8)
    method.regularize = False
    plain = torch.autograd.grad(method.forward_loss(batch)["loss"], encoder, allow_unused=True)
    # one CE over batch (8) + calibrated queue (8): the queue's terms carry no encoder gradient, so the encoder's
    # gradient is the plain batch loss's, weighted 8 / 16
    pairs = [(r, q) for r, q in zip(regularised, plain) if q is not None]
    assert pairs and all(torch.allclose(r * 16, q * 8, atol=1e-6) for r, q in pairs)
    assert method.encoder is not method.pretrained.vision and not any(
        p.requires_grad for p in method.pretrained.parameters())
    baseline = methods.DRTune(pretrained=tiny_clip_checkpoint, classnames=CLASSES, regularize=False)
    baseline.train()
    assert "queue_filled" not in baseline.forward_loss(batch) and int(baseline.queue_filled) == 0


def test_pad_prompt_frames_the_image_and_clusters_follow_the_threshold():
    from vlp_lightning.modules.visual_prompts import ClusterPrompts, PadPrompt, cluster_prototypes

    prompt = PadPrompt(16, 3)
    frame = prompt.pattern()
    assert frame.shape == (3, 16, 16) and torch.count_nonzero(frame[:, 3:13, 3:13]) == 0
    assert sum(p.numel() for p in prompt.parameters()) == 4 * 3 * (16 - 3) * 3
    torch.manual_seed(0)
    features = torch.cat([torch.randn(10, 4) * 0.1 + 5, torch.randn(10, 4) * 0.1 - 5])  # two tight groups
    assert len(cluster_prototypes(features, distance_threshold=1.0)) == 2
    assert len(cluster_prototypes(features, distance_threshold=100.0)) == 1
    assert len(cluster_prototypes(features, None)) == 1
    prompts = ClusterPrompts(cluster_prototypes(features, 1.0), lambda: PadPrompt(16, 3))
    assert prompts.nearest(torch.tensor([[5.0] * 4, [-5.0] * 4])).unique().numel() == 2
    images = torch.zeros(2, 3, 16, 16)
    prompted = prompts(images, torch.tensor([[5.0] * 4, [-5.0] * 4]))
    chosen = prompts.nearest(torch.tensor([[5.0] * 4, [-5.0] * 4]))
    assert torch.equal(prompted[0], prompts.prompts[int(chosen[0])].pattern())


def test_damvp_clusters_its_training_shards_and_starts_from_a_meta_prompt(tiny_clip_checkpoint, make_shards,
                                                                           tmp_path):
    shards = make_shards(tmp_path / "shards", n=24, per_shard=24, image_size=32, num_classes=4)
    method = methods.DAMVP(pretrained=tiny_clip_checkpoint, classnames_from=shards.pattern,
                           cluster_shards=shards.pattern, distance_threshold=0.5)
    clusters = len(method.cluster_prompts.prompts)
    assert clusters > 1 and method.cluster_prompts.prototypes.shape == (clusters, 32)
    trainable = {name for name, param in method.named_parameters() if param.requires_grad}
    assert trainable and all(name.startswith("cluster_prompts.prompts.") for name in trainable)
    checkpoint = tmp_path / "damvp.ckpt"
    torch.save({"state_dict": method.state_dict()}, checkpoint)
    started = methods.DAMVP(pretrained=tiny_clip_checkpoint, classnames_from=shards.pattern,
                            meta_prompt=str(checkpoint))
    mean_top = torch.stack([prompt.top for prompt in method.cluster_prompts.prompts]).mean(0)
    assert torch.allclose(started.cluster_prompts.prompts[0].top, mean_top)
    with pytest.raises(ValueError, match="text head needs an image-text space"):
        config = {"class_path": "vlp_lightning.methods.SwAV"}
        swav, _ = build_method(config, "test", "")
        methods.DAMVP(pretrained=str(save_checkpoint(swav, tmp_path / "swav.ckpt", config)), classnames=CLASSES)


def test_vlp_fewshot_trains_each_shot_count_and_seed_and_reruns_nothing(tiny_clip_checkpoint, make_shards, tmp_path,
                                                                        monkeypatch, capsys):
    from vlp_lightning.commands import fewshot

    monkeypatch.setattr("sys.argv", ["vlp"])
    monkeypatch.chdir(tmp_path)
    pool = make_shards(tmp_path / "pool", n=24, per_shard=24, image_size=32, num_classes=4)
    argv = ["--config", f"{EXPERIMENTS}/peftclassifier/fashion_mnist_tiny.yaml", "--pool", pool.pattern,
            "--shots", "1", "2", "--seeds", "0", "1", "--steps", "2", "--out", str(tmp_path / "out"),
            "--model.init_args.pretrained", tiny_clip_checkpoint, "--model.init_args.classnames_from", pool.pattern,
            "--data.test_shards", pool.pattern, "--data.batch_size", "4", "--data.num_workers", "0",
            "--trainer.callbacks", "[]"]
    assert fewshot.main(argv) == 0
    results = json.loads((tmp_path / "out/results.json").read_text())
    assert [row["point"] for row in results["summary"]] == ["k1", "k2"]
    assert all(len(row["scores"]) == 2 and 0 <= row["mean"] <= 1 for row in results["summary"])
    assert len(fewshot.drawn_keys(tmp_path / "out/subsets/k1-seed0")) == 4  # one per class
    draws = [fewshot.drawn_keys(tmp_path / f"out/subsets/k1-seed{seed}") for seed in (0, 1)]
    assert draws[0] != draws[1]
    capsys.readouterr()
    assert fewshot.main(argv) == 0  # everything done before: no run repeats
    assert capsys.readouterr().out.count("done before") == 4


def test_vlp_scaling_fits_a_line_against_log_data_size(tiny_clip_checkpoint, make_shards, tmp_path, monkeypatch,
                                                       capsys):
    from vlp_lightning.commands import scaling

    assert scaling.log_fit([10, 100, 1000], [0.2, 0.3, 0.4]) == pytest.approx(
        {"intercept": 0.1, "slope_per_decade": 0.1, "r2": 1.0})
    monkeypatch.setattr("sys.argv", ["vlp"])
    monkeypatch.chdir(tmp_path)
    pool = make_shards(tmp_path / "pool", n=32, per_shard=32, image_size=32, num_classes=4)
    argv = ["--config", f"{EXPERIMENTS}/peftclassifier/fashion_mnist_tiny.yaml", "--pool", pool.pattern,
            "--fractions", "0.25", "1", "--seeds", "0", "--steps", "2", "--out", str(tmp_path / "out"),
            "--model.init_args.pretrained", tiny_clip_checkpoint, "--model.init_args.classnames_from", pool.pattern,
            "--data.test_shards", pool.pattern, "--data.batch_size", "4", "--data.num_workers", "0",
            "--trainer.callbacks", "[]"]
    assert scaling.main(argv) == 0
    out = capsys.readouterr().out
    assert "| 0.25 | 8 |" in out and "| 1.0 | 32 |" in out and "log10(samples)" in out
    assert scaling.main([*argv[:6], "--fractions", "2"]) == 2


def test_vlp_backbones_scores_every_checkpoint_on_the_tasks_it_can_do(tiny_clip_checkpoint, make_shards, tmp_path,
                                                                      capsys):
    from vlp_lightning.commands import backbones

    shards = make_shards(tmp_path / "shards", n=24, per_shard=24, image_size=32, num_classes=4)
    config = {"class_path": "vlp_lightning.methods.SwAV"}
    swav, _ = build_method(config, "test", "")
    swav_checkpoint = str(save_checkpoint(swav, tmp_path / "swav.ckpt", config))
    argv = [tiny_clip_checkpoint, swav_checkpoint, "--train", shards.pattern, "--test", shards.pattern,
            "--shots", "1", "2", "--seeds", "0", "1", "--out", str(tmp_path / "out")]
    assert backbones.main(argv) == 0
    rows = json.loads((tmp_path / "out/results.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["CLIP", "SwAV"]
    assert {"knn_top1", "linear_top1", "fewshot_1", "fewshot_2", "zeroshot_top1", "i2t_R@1"} <= set(rows[0])
    assert "zeroshot_top1" not in rows[1] and all(0 <= rows[1][key] <= 1 for key in ("knn_top1", "fewshot_2"))
    assert "| SwAV |" in capsys.readouterr().out
    assert backbones.main([str(tmp_path / "missing.ckpt"), "--train", shards.pattern, "--test", shards.pattern]) == 2
    assert len(backbones.few_shot_indices(torch.tensor([0, 0, 0, 1, 1, 2]), 2, seed=0)) == 5
