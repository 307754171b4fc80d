"""The shared base of the frozen-language-model family: an image tower, a connector, a causal LM (LLaVA, LiMBeR,
SimVLG, InfMLLM, PA-LLaVA, Vision-Flan are thin files on it).

`FrozenLMMethod` computes, for a batch of images and conversations,

    Z = connector(tower_tokens(image))                      [B, M, D_lm]  the visual tokens
    loss = - mean over answer tokens of log p_LM(y_t | y_<t, Z, prompt)   (LLaVA, Liu et al. 2023, eq. 3)

with the LM's own chat template and the image's M tokens at the "<image>" placeholder (`modules.language_model`).
The tower's tokens are its patch tokens after the final norm (`VisionEncoder.forward_tokens`; LLaVA reads the
penultimate layer of CLIP ViT-L/14, LiMBeR the grid before CLIP's attention pool). What trains is each stage's
choice: the connector always; the LM when `language_model.train` is "lora" or "full"; the tower with
`train_vision`. Frozen parts stay in eval mode.

Data: batches of `InstructionDataModule` carry `conversation` (lists of {"role", "content"} turns); batches of
`ImageTextDataModule` carry captions, each of which becomes a caption instruction: a user turn with one of
`caption_prompts` (drawn per sample) and the caption as the answer (LLaVA stage 1's "brief description" prompts).

Staged training, as the papers run it, is two (or three) `vlp fit` runs: the later stage's recipe sets `start_from`
to the earlier stage's `last.ckpt` (its connector, and any LM / tower weights it trained; weights the earlier stage
did not have, such as LoRA, start fresh) and its own `language_model.train`. The earlier stage may be another
method of the family with the same modules (Vision-Flan starts from LLaVA's stage-1 projector).

Evaluation protocol: `generate_captions(images)` (`callbacks.CaptionMetrics`), `answer_questions(images,
questions)` (`callbacks.InstructionAccuracy`) and, for `vlp predict`, the generated captions (or the answers to the
batch's first questions) per sample.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from data_modules.views import SingleCrop, Views
from vlp_lightning.methods.base import VLPMethod, WarmupCosineLR, load_earlier_stage
from vlp_lightning.modules.connectors import Connector, MLPConnector
from vlp_lightning.modules.language_model import LanguageModel
from vlp_lightning.modules.vision import VisionEncoder, tiny_vit

ConnectorFactory = Callable[[int, int], Connector]

#: LLaVA's brief-description instructions for captions (stage 1; a sample of the list in its paper, Table 8).
BRIEF_CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
)


def _family() -> tuple[type, ...]:
    """Every method of the family: an earlier stage may be another member's run with the same modules."""
    from vlp_lightning import methods

    return tuple(kind for kind in map(lambda name: getattr(methods, name), methods.method_names())
                 if isinstance(kind, type) and issubclass(kind, FrozenLMMethod))


class FrozenLMMethod(VLPMethod):
    """Image tower -> connector -> causal LM, trained on the answers of conversations (module doc).

    Args:
        language_model: the LM (default: the tiny random Llama; recipes name "smollm2").
        vision: the image tower (default: the tiny ViT); ignored when `image_tower` is given.
        image_tower: checkpoint of a suite method (written by `vlp fit`) whose image tower to use, rebuilt from the
            model config it stores (`vlp_lightning.pretrained.load_method`).
        connector: callable building the connector from (tower width, LM width), in YAML a `class_path` of
            `vlp_lightning.modules.connectors` with its `init_args` but the two widths; None: the method's own
            (`connector_class` with its defaults).
        train_vision: train the tower too (frozen, in eval mode, by default).
        caption_prompts: the instructions captions become (one drawn per sample; the first one when generating).
        max_length: tokens per training conversation (longer ones are cut; the image tokens must fit).
        answer_length: most tokens generated per caption / answer.
        start_from: checkpoint of an earlier stage of the same method.
        crop_scale: area range of the training crop (1, 1: the whole image, as LLaVA).
        optimizer, lr_scheduler, compile: see `VLPMethod`.
    """

    family = "language"
    view_kind = "one crop"
    required_keys = ("image", "conversation")
    #: the method's connector when `connector` is not given, built with its defaults (LLaVA-1.5's MLP here).
    connector_class: type[Connector] = MLPConnector

    def __init__(
        self,
        language_model: LanguageModel | None = None,
        vision: nn.Module | None = None,
        image_tower: str | None = None,
        connector: ConnectorFactory | None = None,
        train_vision: bool = False,
        caption_prompts: Sequence[str] = BRIEF_CAPTION_PROMPTS,
        max_length: int = 96,
        answer_length: int = 30,
        start_from: str | None = None,
        crop_scale: tuple[float, float] = (1.0, 1.0),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.save_hyperparameters(ignore=["language_model", "vision", "connector", "optimizer", "lr_scheduler"])
        if not caption_prompts:
            raise ValueError("caption_prompts is empty; give at least one instruction, e.g. 'Describe the image.'")
        self.language_model = language_model or LanguageModel()
        self.vision = self._tower(vision, image_tower)
        self.train_vision = train_vision
        self.vision.requires_grad_(train_vision)
        self.vision.train(train_vision)  # a frozen tower is in eval mode from the start (the model summary says so)
        width = self.vision.num_features
        self.connector = (connector or self.connector_class)(width, self.language_model.hidden_size)
        self.caption_prompts = list(caption_prompts)
        self.max_length = max_length
        self.answer_length = answer_length
        self.crop_scale = tuple(crop_scale)
        if start_from is not None:
            load_earlier_stage(self, start_from, "runs/<method>/<stage-1 experiment>/checkpoints/last.ckpt",
                               may_lack="language_model.", writers=_family())

    @staticmethod
    def _tower(vision: nn.Module | None, image_tower: str | None) -> nn.Module:
        if image_tower is None:
            return vision if vision is not None else tiny_vit()
        from vlp_lightning.pretrained import load_method  # here: it imports the CLI, which imports this index

        method, _ = load_method(image_tower, name="image_tower", config_option="image_tower_config")
        tower = getattr(method, "vision", None)
        if not isinstance(tower, VisionEncoder):
            raise ValueError(f"image_tower={image_tower} holds a {type(method).__name__} without a VisionEncoder "
                             "image tower; give a checkpoint of an image or image-text method (CLIP, MAE, ...)")
        return tower


    # ------------------------------------------------------------------ protocol
    def train_views(self) -> Views:
        return SingleCrop(scale=self.crop_scale, ratio=(1.0, 1.0), hflip=False, mean=self.vision.mean,
                          std=self.vision.std)

    def train(self, mode: bool = True) -> FrozenLMMethod:
        super().train(mode)
        if not self.train_vision:
            self.vision.eval()
        return self

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        """Connectors with a schedule (SimVLG's token merging) follow the fraction of optimizer steps done."""
        total = max(1, int(self.trainer.estimated_stepping_batches))
        self.connector.set_progress(min(1.0, self.trainer.global_step / total))

    def visual_tokens(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] -> visual tokens [B, M, D_lm] in the LM's input space."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_vision):
            tokens = self.vision.forward_tokens(images)
        return self.connector(tokens)

    def conversations(self, batch: dict) -> list[list[dict]]:
        """The batch's conversations, or its captions as caption instructions (module doc)."""
        if "conversation" in batch:
            return batch["conversation"]
        if "caption" not in batch:
            raise ValueError(f"{type(self).__name__} trains on conversations or captions, but the batch has neither; "
                             "use InstructionDataModule (vlp-data instructions) or ImageTextDataModule")
        return [[{"role": "user", "content": random.choice(self.caption_prompts)},
                 {"role": "assistant", "content": caption}] for caption in batch["caption"]]

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        visual = self.visual_tokens(batch["image"])
        inputs = self.language_model.training_inputs(self.conversations(batch), visual.shape[1], self.max_length)
        inputs = {name: value.to(visual.device) for name, value in inputs.items()}
        return {"loss": self.language_model.loss(inputs, visual)}

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def answer_questions(self, images: Tensor, questions: Sequence[str], max_length: int | None = None,
                         beam_size: int = 1, logits_processors: Sequence = ()) -> list[str]:
        """The LM's answers to one question per image (a user turn each), greedy or by beam search."""
        visual = self.visual_tokens(images)
        prompts = [[{"role": "user", "content": question}] for question in questions]
        inputs = self.language_model.prompt_inputs(prompts, visual.shape[1])
        inputs = {name: value.to(visual.device) for name, value in inputs.items()}
        return self.language_model.generate(inputs, visual, max_new_tokens=max_length or self.answer_length,
                                            beam_size=beam_size, logits_processors=logits_processors)

    def generate_captions(self, images: Tensor, max_length: int | None = None, beam_size: int = 1) -> list[str]:
        """Captions: the answers to the first caption prompt (`callbacks.CaptionMetrics`)."""
        return self.answer_questions(images, [self.caption_prompts[0]] * images.shape[0], max_length, beam_size)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """`vlp predict`: per sample its key, the base's features and the generated text: the answer to the first
        user turn of its conversation, or its caption (`generated`), with the reference where the data has one."""
        outputs = super().predict_step(batch, batch_idx)
        if "conversation" in batch:
            questions = [next(turn["content"] for turn in turns if turn["role"] == "user")
                         for turns in batch["conversation"]]
            outputs["generated"] = self.answer_questions(batch["image"], questions)
            outputs["question"] = questions
            outputs["reference"] = [next((turn["content"] for turn in turns if turn["role"] == "assistant"), "")
                                    for turns in batch["conversation"]]
        else:
            outputs["generated"] = self.generate_captions(batch["image"])
        return outputs
