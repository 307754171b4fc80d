"""DataModules: what they ask the method, the one-sentence configuration errors, exact resume through Lightning
checkpoints, bad-sample accounting."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.trainer.states import TrainerFn
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger
from torch import nn

from data_modules import DataConfigError, ImageDataModule, ImageTextDataModule
from data_modules.views import MultiCrop, SingleCrop
from vlp_lightning.modules.tokenizers import ByteTokenizer


class CLIP:
    """Stand-in with the attributes the data modules ask of a CLIP-family method."""

    required_keys = ("image", "text")
    image_size = 16

    def __init__(self) -> None:
        self.tokenizer = ByteTokenizer(context_length=20)

    def train_views(self) -> SingleCrop:
        return SingleCrop(scale=(0.9, 1.0))


class SwAV:
    required_keys = ("image",)
    image_size = 16
    tokenizer = None

    def train_views(self) -> MultiCrop:
        return MultiCrop(num_global=2, num_local=2, local_size=8)


def attach(datamodule, method, rank: int = 0, world_size: int = 1):
    """What a Trainer provides to a DataModule, without starting one."""
    datamodule.trainer = SimpleNamespace(
        lightning_module=method, global_rank=rank, world_size=world_size, current_epoch=0, training=True, loggers=[]
    )
    return datamodule


def test_image_text_batches_take_size_views_and_tokenizer_from_the_method(make_shards, tmp_path):
    shards = make_shards(tmp_path, n=12, per_shard=6)
    method = CLIP()
    datamodule = attach(ImageTextDataModule(train_shards=shards.pattern, batch_size=4, num_workers=0), method)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    # with a trainer the batch leaves the loader as uint8 crops and is finished on the device, after the transfer
    assert [(tuple(images.shape), images.dtype) for images in batch["image"]] == [((4, 1, 16, 16, 3), torch.uint8)]
    batch = datamodule.on_after_batch_transfer(datamodule.on_before_batch_transfer(batch, 0), 0)
    assert set(batch) == {"__key__", "image", "caption", "text", "label"}
    assert batch["image"].shape == (4, 3, 16, 16)
    assert torch.equal(batch["text"]["input_ids"], method.tokenizer(batch["caption"])["input_ids"])
    assert batch["label"].tolist() == [shards.labels[key] for key in batch["__key__"]]


def test_image_only_method_swaps_in_on_captioned_data(make_shards, tmp_path):
    shards = make_shards(tmp_path, n=12, per_shard=6)
    datamodule = attach(ImageTextDataModule(train_shards=shards.pattern, batch_size=4, num_workers=0), SwAV())
    datamodule.setup("fit")
    batch = datamodule.on_after_batch_transfer(next(iter(datamodule.train_dataloader())), 0)
    assert [view.shape[-1] for view in batch["image"]] == [16, 16, 8, 8]
    assert "text" not in batch and len(batch["caption"]) == 4


def test_missing_shards_name_the_argument_the_path_and_vlp_data(tmp_path):
    missing = tmp_path / "nowhere" / "train-000000.tar"
    datamodule = attach(ImageDataModule(train_shards=str(missing)), SwAV())
    with pytest.raises(DataConfigError,
                       match=rf"train_shards=.*shard {missing} does not exist; build shards with `vlp-data`"):
        datamodule.setup("fit")
    datamodule = attach(ImageDataModule(train_shards=str(tmp_path / "*.tar")), SwAV())
    with pytest.raises(DataConfigError, match=r"matches no shard file; build shards with `vlp-data`"):
        datamodule.setup("fit")
    with pytest.raises(DataConfigError, match=r"`vlp test` needs --data.test_shards, which the config does not set"):
        attach(ImageDataModule(), SwAV()).setup(TrainerFn.TESTING)  # what Lightning passes


def test_clip_on_image_data_module_says_what_to_do(make_shards, tmp_path):
    shards = make_shards(tmp_path, n=6, per_shard=6)
    datamodule = attach(ImageDataModule(train_shards=shards.pattern), CLIP())
    with pytest.raises(DataConfigError) as error:
        datamodule.setup("fit")
    assert str(error.value) == (
        "CLIP needs captions (`text`) but ImageDataModule does not provide them; use ImageTextDataModule with "
        "captioned shards or choose an image-only method such as vlp_lightning.methods.SwAV"
    )


def test_clip_on_shards_without_captions_says_what_to_do(make_shards, tmp_path):
    shards = make_shards(tmp_path, n=6, per_shard=6, with_text=False)
    datamodule = attach(ImageTextDataModule(train_shards=shards.pattern), CLIP())
    with pytest.raises(DataConfigError) as error:
        datamodule.setup("fit")
    assert str(error.value) == (
        f"CLIP needs captions (`text`) but train_shards={shards.pattern!r} has no .txt members; point it at "
        "captioned shards or use ImageDataModule and choose an image-only method such as vlp_lightning.methods.SwAV"
    )


def test_image_only_method_on_captionless_shards_points_to_image_data_module(make_shards, tmp_path):
    shards = make_shards(tmp_path, n=6, per_shard=6, with_text=False)
    with pytest.raises(DataConfigError) as error:
        attach(ImageTextDataModule(train_shards=shards.pattern), SwAV()).setup("fit")
    assert str(error.value) == (
        f"ImageTextDataModule needs captions but train_shards={shards.pattern!r} has no .txt members; use "
        "ImageDataModule for image-only data"
    )


def test_labels_required_but_absent_and_no_method_to_ask(make_shards, tmp_path):
    shards = make_shards(tmp_path, n=6, per_shard=6, with_label=False)
    classifier = SimpleNamespace(required_keys=("image", "label"), image_size=16, train_views=SingleCrop)
    with pytest.raises(DataConfigError, match=r"SimpleNamespace needs class labels \(`label`\) but train_shards="):
        attach(ImageDataModule(train_shards=shards.pattern), classifier).setup("fit")
    with pytest.raises(DataConfigError, match=r"image_size is not set and no method is attached to ask"):
        ImageDataModule(train_shards=shards.pattern, views=SingleCrop()).setup("fit")


def test_ranks_get_equal_batches_and_validation_is_deterministic(make_shards, tmp_path):
    shards = make_shards(tmp_path, n=30, per_shard=8)
    val = make_shards(tmp_path / "val", n=9, per_shard=4, split="val")
    keys = []
    for rank in range(2):
        datamodule = attach(
            ImageDataModule(train_shards=shards.pattern, val_shards=val.pattern, batch_size=4, num_workers=0),
            SwAV(), rank=rank, world_size=2,
        )
        datamodule.setup("fit")
        train = datamodule.train_dataloader()
        batches = list(train)
        assert len(batches) == len(train) == 4  # ceil(30 / 8) on both ranks
        keys += [key for batch in batches for key in batch["__key__"]]
        passes = [[batch["image"][0] for batch in datamodule.val_dataloader()] for _ in range(2)]
        assert all(torch.equal(a, b) for a, b in zip(*passes))
    assert set(keys) == set(shards.keys)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_state_dict_resume_mid_epoch_equals_uninterrupted(make_shards, tmp_path, num_workers):
    shards = make_shards(tmp_path, n=50, per_shard=9)

    def fresh() -> ImageDataModule:
        datamodule = ImageDataModule(
            train_shards=shards.pattern, batch_size=4, num_workers=num_workers, image_size=16, views=SingleCrop(),
            shuffle_buffer=5,
        )
        datamodule.setup("fit")
        return datamodule

    reference = fresh().train_dataloader()
    uninterrupted = [[batch["__key__"] for batch in reference] for _ in range(2)]  # epochs 0 and 1
    datamodule = fresh()
    loader = datamodule.train_dataloader()
    list(loader)  # epoch 0
    head = []
    for batch in loader:  # epoch 1, stopped after 7 batches
        head.append(datamodule.on_before_batch_transfer(batch, 0)["__key__"])
        if len(head) == 7:
            break
    state = datamodule.state_dict()
    resumed = fresh()
    resumed.load_state_dict(state)
    tail = [batch["__key__"] for batch in resumed.train_dataloader()]
    assert head + tail == uninterrupted[1]


class KeyRecorder(LightningModule):
    """A tiny image model that remembers the keys of every training batch."""

    required_keys = ("image",)
    image_size = 16

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)
        self.seen: list[list[str]] = []

    def train_views(self) -> SingleCrop:
        return SingleCrop()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["__key__"])
        return self.layer(batch["image"].mean((2, 3))).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class SaveAtStep(Callback):
    def __init__(self, step: int, path: Path) -> None:
        self.step = step
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


class MetricsRecorder(Logger):
    name = "recorder"
    version = 0

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[dict] = []

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.metrics.append(metrics)


def corrupt_one_image(shard: str, key: str) -> None:
    with tarfile.open(shard) as tar:
        members = [(member.name, tar.extractfile(member).read()) for member in tar]
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            data = b"corrupt" if name == f"{key}.png" else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_lightning_checkpoint_resume_mid_epoch_sees_exactly_the_rest(make_shards, tmp_path):
    shards = make_shards(tmp_path / "data", n=44, per_shard=10)
    corrupt_one_image(shards.urls[2], shards.keys[23])
    checkpoint = tmp_path / "mid-epoch.ckpt"

    def run(callbacks: list[Callback], ckpt_path: Path | None) -> tuple[KeyRecorder, ImageDataModule, MetricsRecorder]:
        model = KeyRecorder()
        datamodule = ImageDataModule(train_shards=shards.pattern, batch_size=4, num_workers=2, shuffle_buffer=6)
        logger = MetricsRecorder()
        trainer = Trainer(
            max_epochs=2, logger=logger, callbacks=callbacks, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        )
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        return model, datamodule, logger

    full, full_data, full_logger = run([SaveAtStep(7, checkpoint)], None)
    assert len(full.seen) == 2 * 11 and checkpoint.exists()
    resumed, resumed_data, _ = run([], checkpoint)
    assert resumed.seen == full.seen[7:]
    assert full_data.skipped_count() == 2  # the corrupt image, once per epoch
    assert resumed_data.skipped_count() == 2
    assert {"data/skipped": 2} in full_logger.metrics


def _ddp_rank(rank: int, port: int, pattern: str, results) -> None:
    """One rank of a 2-process gloo group: consume 3 batches, checkpoint (all ranks gather), resume, compare."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        def fresh() -> ImageDataModule:
            datamodule = attach(
                ImageDataModule(train_shards=pattern, batch_size=3, num_workers=0, image_size=16, views=SingleCrop()),
                SwAV(), rank=rank, world_size=2,
            )
            datamodule.setup("fit")
            return datamodule

        uninterrupted = [batch["__key__"] for batch in fresh().train_dataloader()]
        datamodule = fresh()
        head = []
        for batch in datamodule.train_dataloader():
            head.append(datamodule.on_before_batch_transfer(batch, 0)["__key__"])
            if len(head) == 3:
                break
        state = datamodule.state_dict()
        resumed = fresh()
        resumed.load_state_dict(state)
        tail = [batch["__key__"] for batch in resumed.train_dataloader()]
        results[rank] = (len(state["ranks"]), head + tail == uninterrupted, len(uninterrupted))
    finally:
        dist.destroy_process_group()


def test_checkpoint_state_gathers_every_rank_under_ddp(make_shards, tmp_path):
    import multiprocessing
    import socket

    shards = make_shards(tmp_path, n=31, per_shard=7)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("fork")
    results = context.Manager().dict()
    processes = [context.Process(target=_ddp_rank, args=(rank, port, shards.pattern, results)) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0, 0]
    assert dict(results) == {0: (2, True, 6), 1: (2, True, 6)}  # ceil(31 / 6) batches on both ranks


def report_shards(tmp_path, write_tar, n: int = 30, per_shard: int = 7) -> tuple[str, dict[str, str], dict]:
    """Shards whose captions are reports: two lines of three sentences each ("1.5 cm" must stay whole); returns
    the pattern, the reports and their sentences by key."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 60, 30)).save(buffer, format="PNG")
    reports, sentences, shards = {}, {}, []
    for start in range(0, n, per_shard):
        samples = []
        for index in range(start, min(n, start + per_shard)):
            key = f"s{index:03d}"
            sentences[key] = [f"Finding {index}-{line}-{part} is 1.5 cm." for line in range(2) for part in range(3)]
            reports[key] = "\n".join(" ".join(sentences[key][3 * line : 3 * line + 3]) for line in range(2))
            samples.append({"__key__": key, "png": buffer.getvalue(), "txt": reports[key].encode()})
        shards.append(str(write_tar(tmp_path / f"reports-{start // per_shard:06d}.tar", samples)))
    return "::".join(shards), reports, sentences


@pytest.mark.parametrize("num_workers", [0, 2])
def test_caption_sampling_draws_one_sentence_per_epoch_and_resumes_exactly(tmp_path, write_tar, num_workers):
    """ConVIRT's text transformation (Zhang et al. 2020, sec. 3): one uniformly drawn sentence of the report per
    step, a function of (seed, epoch, key): tokens match it, epochs differ, and a mid-epoch resume sees the same."""
    pattern, reports, sentences = report_shards(tmp_path, write_tar)
    method = CLIP()

    def fresh(sampling: str = "sentence", seed: int = 0) -> ImageTextDataModule:
        datamodule = ImageTextDataModule(
            train_shards=pattern, batch_size=4, num_workers=num_workers, shuffle_buffer=5, caption_sampling=sampling,
            seed=seed, image_size=16, views=method.train_views(), tokenizer=method.tokenizer,
        )
        datamodule.setup("fit")  # no trainer: the loader counts its passes as epochs
        datamodule.trainer = None
        return datamodule

    def captions(batches) -> dict[str, str]:
        return {key: caption for batch in batches for key, caption in zip(batch["__key__"], batch["caption"])}

    datamodule = attach(ImageTextDataModule(train_shards=pattern, batch_size=4, caption_sampling="sentence"), method)
    datamodule.setup("fit")
    batch = datamodule.on_before_batch_transfer(next(iter(datamodule.train_dataloader())), 0)
    assert torch.equal(batch["text"]["input_ids"], method.tokenizer(batch["caption"])["input_ids"])

    reference = fresh().train_dataloader()
    epochs = [list(reference) for _ in range(2)]
    first, second = captions(epochs[0]), captions(epochs[1])
    assert all(first[key] in sentences[key] and second[key] in sentences[key] for key in first)
    assert len(set(first.values())) > 10 and sum(first[key] != second[key] for key in first) > len(first) // 2
    assert captions(fresh().train_dataloader()) == first  # deterministic
    lines = captions(fresh("line").train_dataloader())
    assert all(caption in reports[key].splitlines() for key, caption in lines.items())
    assert captions(fresh("all").train_dataloader()) == {key: reports[key] for key in first}

    interrupted = fresh()
    loader = interrupted.train_dataloader()
    list(loader)  # epoch 0
    head = []
    for batch in loader:  # epoch 1, stopped after 3 batches
        head.append(interrupted.on_before_batch_transfer(batch, 0))
        if len(head) == 3:
            break
    resumed = fresh()
    resumed.load_state_dict(interrupted.state_dict())
    tail = list(resumed.train_dataloader())
    assert [b["caption"] for b in head + tail] == [b["caption"] for b in epochs[1]]


def test_caption_sampling_rejects_unknown_modes():
    with pytest.raises(DataConfigError, match="caption_sampling must be one of"):
        ImageTextDataModule(train_shards="x.tar", caption_sampling="paragraph")


def test_views_normalising_unlike_the_method_stop_at_setup(make_shards, tmp_path):
    """Evaluation normalises as the method's train_views() do, so explicit views must agree with them."""
    from data_modules.views import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    shards = make_shards(tmp_path, n=8, per_shard=8)
    views = SingleCrop(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    datamodule = attach(ImageTextDataModule(train_shards=shards.pattern, views=views), CLIP())
    with pytest.raises(DataConfigError, match=r"views normalise with .* but CLIP .* give data\.views the same mean"):
        datamodule.setup("fit")


def test_batch_transfer_moves_the_tensors_and_hands_plain_fields_on_untouched():
    """The JSON / text fields are passed on as the same objects (not walked); every tensor elsewhere moves."""
    data = ImageTextDataModule(train_shards="unused-{000000..000001}.tar")
    meta = [{"objects": [{"name": "apple", "box": [0, 0, 4, 4]}]} for _ in range(3)]
    batch = {"__key__": ["a", "b", "c"], "image": torch.zeros(3, 3, 8, 8), "caption": ["x", "y", "z"],
             "meta": meta, "text": {"input_ids": torch.ones(3, 5, dtype=torch.long)},
             "boxes": [torch.zeros(1, 4) for _ in range(3)]}
    moved = data.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert list(moved) == list(batch)
    assert moved["meta"] is meta and moved["__key__"] is batch["__key__"] and moved["caption"] is batch["caption"]
    assert moved["image"].device.type == "meta" and moved["text"]["input_ids"].device.type == "meta"
    assert all(box.device.type == "meta" for box in moved["boxes"])
    plain = data.transfer_batch_to_device([torch.zeros(2)], torch.device("meta"), 0)  # not a dict: Lightning's way
    assert plain[0].device.type == "meta"
