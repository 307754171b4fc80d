"""UNIT: one vision encoder that recognises images and reads text (Zhu et al. 2024, "UNIT: Unifying Image and Text
Recognition in One Vision Encoder", NeurIPS).

Starting from an image-recognition ViT f_π, UNIT trains the same architecture f_θ (initialised as f_π, so nothing
changes at inference) with two lightweight heads that are thrown away after training:

* a language decoder reading the encoder's tokens z through an input embedding layer (LayerNorm + Linear) and
  predicting text token by token, L_lan = -Σ_t log P(y_t | y_<t, z) (the paper's language-modelling loss): optical
  character recognition on text images (documents; here rendered words, `vlp-data words`) and captioning on natural
  images. The paper's decoder is OPT-125M fed the projected tokens as a prefix; here the suite's causal
  `FusionTextTransformer` cross-attends to them (`common.captioning_loss`), trained from scratch;
* a vision decoder, a two-layer MLP on every token, reconstructing the *original* encoder's tokens on the natural
  images C: L_vis = Σ_{i∈C} L_cos(f_π(x_i), x̂_i) + μ L_1(f_π(x_i), x̂_i) (`feature_reconstruction_loss`, averaged
  here over images and tokens), so learning to read does not make the encoder forget what it saw. f_π is a frozen
  copy of the starting encoder (`momentum_copy`, never updated, always in eval mode): its weights are the
  starting point's, bit for bit, for the whole run.

L = L_ocr + λ_cap L_cap + λ_vis L_vis, where L_ocr and L_cap are L_lan on the text images and on the natural images of
the batch. Which rows are text images: `"ocr": true` in the sample's `.json` (what `vlp-data words` writes); a batch
without `.json` is all natural images. A recipe mixes the two kinds by listing both shard sets,
`--data.train_shards 'words/train-*.tar::emoji/train-*.tar'`: the shuffle buffer mixes them in every batch (the words
first, so the manifest the data module reads has no `.cls` labels the words would lack).

Stages (the paper's sec. on training): intra-scale pretraining shows images and documents at their usual resolutions
(images at 1x, documents at a higher one; "D_I×1" and "D_T×4" in its notation); inter-scale finetuning adds
scale-exchanged data (documents at low, images at high resolution) for scale robustness. Here `document_scale` and
`image_scale` resize each kind of row by that factor before the encoder (a ViT built with `dynamic_img_size`
interpolates its position embeddings), so stage 1 is e.g. `document_scale: 2` and stage 2 a run that starts from
stage 1's checkpoint (`start_from`: f_θ, both decoders and the *original* f_π, not stage 1's encoder) with the scales
exchanged. Not reachable here: the data module crops every sample to one
size, so a larger document scale upsamples the rendered words rather than reading more detailed pages; the paper's
scale-exchanged data are added to the original mix, here one stage has one pair of scales.

What was read and what is inferred: read were the abstract and summaries of the paper (the two decoders, L_lan and
L_vis with μ, the OCR / captioning / reconstruction tasks, OPT-125M as language decoder, the MLP vision decoder, the
two stages and the 1x / 4x resolutions); the official repository holds only the inference model. Inferred: the loss
weights (λ_cap = λ_vis = μ = 1), the MLP's hidden width (4x the encoder's), reconstructing every output token
(class token included), and cross-attention in place of the OPT prefix. Representations: `probe_features` the
encoder's pooled features (what the paper evaluates on natural images); `generate_captions` reads the text of an
image (greedy or beam search), which `CaptionMetrics` scores, exact match being word accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from data_modules.views import SingleCrop, Views
from vlp_lightning.catalog import Paper
from vlp_lightning.losses.self_distillation import feature_reconstruction_loss
from vlp_lightning.methods.base import VLPMethod, WarmupCosineLR, load_earlier_stage
from vlp_lightning.methods.fusion.common import CaptionGenerator, captioning_loss, next_token_logits, text_specials
from vlp_lightning.methods.momentum import momentum_copy
from vlp_lightning.modules.fusion import FusionTextTransformer
from vlp_lightning.modules.tokenizers import ByteTokenizer, Tokenizer
from vlp_lightning.modules.vision import VisionEncoder, takes_any_input_size, tiny_vit


def text_image_rows(batch: dict, device: torch.device) -> Tensor:
    """[N] bool: the rows whose `.json` says `"ocr": true` (text images); all False without `.json`."""
    meta = batch.get("meta")
    count = len(batch["__key__"]) if "__key__" in batch else batch["image"].shape[0]
    return torch.tensor([bool(entry.get("ocr")) for entry in meta] if meta is not None else [False] * count,
                        dtype=torch.bool, device=device)


class UNIT(CaptionGenerator, VLPMethod):
    """A ViT learning to read (language decoder, L_lan) without forgetting (vision decoder, L_vis) (module doc).

    Args:
        vision: the encoder f_θ, its starting weights also the frozen target f_π (default: a tiny 2-block ViT at
            32 px; the paper starts from a pretrained ViT: give `pretrained_path`, e.g. a `vlp export` tower).
        tokenizer: text tokenizer (default: bytes, 32 tokens: characters, what OCR reads).
        width, decoder_layers, heads: the language decoder (OPT-125M in the paper: 768, 12, 12).
        vision_decoder_hidden: hidden width of the vision decoder's MLP (default: 4x the encoder's width).
        caption_weight: λ_cap, L_lan on natural images.
        reconstruction_weight: λ_vis.
        l1_weight: μ, the L1 term of L_vis.
        document_scale, image_scale: resize factor of text images / natural images before the encoder (stages in
            the module doc); other than 1 needs a ViT with `dynamic_img_size: true`.
        start_from: a checkpoint of the previous UNIT stage whose every weight (f_θ, f_π, both decoders) this run
            starts from (inter-scale finetuning after intra-scale pretraining); the model arguments must match.
    """

    paper = Paper("UNIT: Unifying Image and Text Recognition in One Vision Encoder", "Zhu et al.", 2024,
                  note="from the abstract and summaries; loss weights inferred: see its docstring")
    family = "fusion and captioning"
    view_kind = "one crop"

    required_keys = ("image", "text")

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        tokenizer: Tokenizer | None = None,
        width: int = 64,
        decoder_layers: int = 1,
        heads: int = 2,
        vision_decoder_hidden: int | None = None,
        caption_weight: float = 1.0,
        reconstruction_weight: float = 1.0,
        l1_weight: float = 1.0,
        document_scale: float = 1.0,
        image_scale: float = 1.0,
        start_from: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.save_hyperparameters(ignore=["vision", "tokenizer", "optimizer", "lr_scheduler"])
        self.tokenizer = tokenizer or ByteTokenizer(context_length=32)
        self.specials = text_specials(self.tokenizer)
        self.vision = vision or tiny_vit()
        if min(document_scale, image_scale) <= 0:
            raise ValueError(f"document_scale and image_scale resize images and must be positive, got "
                             f"{document_scale} and {image_scale}; e.g. 2.0 and 1.0")
        if (document_scale, image_scale) != (1.0, 1.0) and not takes_any_input_size(self.vision):
            raise ValueError(f"document_scale {document_scale} / image_scale {image_scale} feed the ViT other sizes "
                             "than its img_size; build it with dynamic_img_size: true, or keep both scales at 1")
        self.teacher = momentum_copy(self.vision).eval()  # f_π: the starting encoder, frozen
        image_width = self.vision.num_features
        self.input_embedding = nn.Sequential(nn.LayerNorm(image_width), nn.Linear(image_width, width))
        self.decoder = FusionTextTransformer(
            self.tokenizer.vocab_size, self.tokenizer.context_length, width, 0, decoder_layers, heads, causal=True,
        )
        self.decoder.ln_text.requires_grad_(False)  # it pools no text feature: an unused LayerNorm (DDP)
        hidden = vision_decoder_hidden or 4 * image_width
        self.vision_decoder = nn.Sequential(
            nn.Linear(image_width, hidden), nn.GELU(), nn.Linear(hidden, self.teacher.num_features)
        )
        self.caption_weight, self.reconstruction_weight = caption_weight, reconstruction_weight
        self.l1_weight = l1_weight
        self.document_scale, self.image_scale = document_scale, image_scale
        self.default_caption_length = self.tokenizer.context_length - 1
        if start_from is not None:
            load_earlier_stage(self, start_from, "runs/unit/<recipe>/checkpoints/last.ckpt")


    def train(self, mode: bool = True) -> UNIT:
        super().train(mode)
        self.teacher.eval()
        return self

    def train_views(self) -> Views:
        """Crops that keep the whole text (at least 90 % of the area, near-square) and no flips (mirrored text is
        not text)."""
        return SingleCrop(scale=(0.9, 1.0), ratio=(0.9, 1.1), hflip=False, mean=self.vision.mean, std=self.vision.std)

    # ------------------------------------------------------------------ representations
    def rescale(self, images: Tensor, scale: float) -> Tensor:
        """images [N, 3, S, S] -> [N, 3, s, s], s = S x scale rounded to whole patches."""
        if scale == 1.0:
            return images
        patch = self.vision.patch_size or 1
        side = max(patch, round(images.shape[-1] * scale / patch) * patch)
        return F.interpolate(images, size=(side, side), mode="bilinear", antialias=scale < 1, align_corners=False)

    def caption_memory(self, images: Tensor) -> Tensor:
        """What the language decoder reads: the encoder's tokens of the images seen as text images, embedded
        [N, S, width]."""
        return self.input_embedding(self.vision.forward_sequence(self.rescale(images, self.document_scale)))

    def caption_logits(self, memory: Tensor, prefixes: Tensor) -> Tensor:
        return next_token_logits(self.decoder, memory, prefixes)

    # ------------------------------------------------------------------ training
    def language_loss(self, tokens: Tensor, text: dict[str, Tensor], rows: Tensor) -> Tensor:
        """L_lan of the `rows` [N] bool of the batch, whose encoder tokens are `tokens` [rows, S, W_img]."""
        text = {name: value[rows] for name, value in text.items()}
        _, states, mask = self.decoder.encode(text)
        return captioning_loss(self.decoder, states, mask, self.input_embedding(tokens), text)

    def reconstruction_loss(self, tokens: Tensor, images: Tensor) -> Tensor:
        """L_vis: the vision decoder's reconstruction of the frozen f_π's tokens of the same (resized) images."""
        with torch.no_grad():
            target = self.teacher.forward_sequence(images.to(next(self.teacher.parameters()).dtype))
        return feature_reconstruction_loss(self.vision_decoder(tokens), target, self.l1_weight)

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        images, text = batch["image"], batch["text"]
        documents = text_image_rows(batch, images.device)
        terms: dict[str, Tensor] = {}
        loss = images.new_zeros(())
        if documents.any():
            tokens = self.vision.forward_sequence(self.rescale(images[documents], self.document_scale))
            terms["ocr"] = self.language_loss(tokens, text, documents)
            loss = loss + terms["ocr"]
        if not documents.all():
            natural = self.rescale(images[~documents], self.image_scale)
            tokens = self.vision.forward_sequence(natural)
            terms["caption"] = self.language_loss(tokens, text, ~documents)
            terms["reconstruction"] = self.reconstruction_loss(tokens, natural)
            loss = loss + self.caption_weight * terms["caption"] + self.reconstruction_weight * terms["reconstruction"]
        return {"loss": loss, **{name: value.detach() for name, value in terms.items()}}
