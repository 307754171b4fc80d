"""ARL: Align, Reason and Learn (Chen et al. 2022, "Align, Reason and Learn: Enhancing Medical Vision-and-Language
Pre-training with Knowledge"), with WordNet in place of UMLS.

The base is the authors' M3AE / METER co-attention model: an image encoder and a text encoder, each projected to
the fusion width and tagged with a modality embedding, then K co-attention layers in lock-step, a text layer (self-
attention, cross-attention to the image, MLP) next to an image layer (self-attention, cross-attention to the text,
MLP), each reading the other stream as it entered the layer (official `infer`). Knowledge enters three times
(sec. 3.2-3.4); the entities of every caption come from `vlp-data wordnet` (its `.json` `entities` and
`knowledge.json`: WordNet nouns linked to the captions, their hypernym / meronym relations and TransE
embeddings), so the training step does no WordNet work:

* **Align through knowledge** (sec. 3.2): the entity vectors E = GAT(TransE embeddings) [N, D]
  (`KnowledgeGraphEncoder`: two graph attention layers over the relations) are the weights of two multi-label
  classifiers, from the unimodal image [CLS] and the unimodal text [CLS] (each through Linear-ReLU-Linear-ReLU);
  L_align = BCE(σ(f_v(v) Eᵀ), y_image) + BCE(σ(f_t(t) Eᵀ), y_text), y_image the entities of all the image's
  captions, y_text those of the caption (official `compute_align`): both encoders must predict the same entities,
  so the knowledge space is where they meet.
* **Reason with knowledge** (sec. 3.3): the caption's entities (at most `max_entities`) become a knowledge stream
  of width D inside every fusion layer: entity self-attention, then cross-attention to the image tokens; the result,
  projected to the text width, is added to the text states at the entity's tokens (the position matrix P [E, L]:
  x += Pᵀ W z) between the text layer's attention and its MLP (official `BertCrossLayerWithKnowledge`); the stream
  has its own MLP and continues to the next layer. Pre-LN blocks here (`FusionBlock`), the official ones are BERT's
  post-LN (its injection goes through BertSelfOutput's dense + LayerNorm; here a residual add).
* **Learn with knowledge-induced pretext tasks** (sec. 3.4), L = L_MLM + L_MIM + 0.1 L_ITM + L_align (official
  `task_pretrain_arl` weights):
  - MLM with whole-entity masking (`losses.fusion.mask_spans`): words and entity spans are masked whole, entities
    first, 15 % of the real tokens; an entity whose tokens are masked is dropped from the knowledge stream (official
    `create_pos_matrix` with the MLM labels), so knowledge never leaks the answer; a BERT MLM head tied to the
    token embedding predicts the masked tokens from the fused text.
  - MIM (M3AE): 75 % of the patches removed before the image encoder (MAE), the fused image states entering fusion
    layer `mim_layer` (official 3 of 6; -1: after the last) decoded by a small MAE decoder into per-patch normalised
    pixels, MSE on the removed patches (`masked_reconstruction_loss`).
  - ITM: half of the pairs get another image of the batch (official: a random "false image"), a 2-way head on the
    concatenated text and image poolers (dense + tanh on each stream's first token).

Shards without `entities` still train: the knowledge stream is empty and L_align is 0 (said once). Official
pre-training: CLIP ViT-B/16 at 288 px, RoBERTa-base (64 tokens), 6 co-attention layers of width 768 / 12 heads,
knowledge width 256 / 4 heads (TransE dim 256), GAT 64 x 8 heads, dropout 0.2, 24 entities, AdamW lr 1e-5, wd 0.01,
x5 for the heads and the multimodal layers, 10 % warmup then linear decay to 0, 100k steps, batch 256; MIM decoder
384 wide, 4 (+1) layers, 6 heads. No pretrained CLIP / RoBERTa / METER weights exist here: everything starts random.
Representations: `probe_features` the image encoder's pooled output. ARL has no contrastive loss and so no joint
embedding space (`encode_image` is not defined): zero-shot and retrieval do not apply.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from data_modules.views import SingleCrop, Views
from vlp_lightning.catalog import Paper
from vlp_lightning.losses.fusion import itm_loss, mask_spans, mlm_loss
from vlp_lightning.losses.masked_modeling import masked_reconstruction_loss
from vlp_lightning.methods.base import VLPMethod, WarmupCosineLR
from vlp_lightning.methods.fusion.albef import mlm_head
from vlp_lightning.methods.fusion.common import sample_ids, text_specials
from vlp_lightning.modules.fusion import FusionBlock, FusionTextTransformer
from vlp_lightning.modules.knowledge import KnowledgeGraphEncoder
from vlp_lightning.modules.masking import PatchMask, gather_patches, patchify, random_masking, vit_tokens, \
    vit_transformer
from vlp_lightning.modules.tokenizers import ByteTokenizer, Tokenizer
from vlp_lightning.modules.vision import VisionEncoder, tiny_vit

log = logging.getLogger(__name__)
_WORD = re.compile(r"\S+")


@dataclass
class Entities:
    """The knowledge stream's input for a batch: entity ids [B, E] (0 where absent), which are present [B, E],
    and their token positions P [B, E, L] (1.0 at the entity's tokens)."""

    ids: Tensor
    present: Tensor
    positions: Tensor

    def without(self, dropped: Tensor) -> Entities:
        """The same entities less those marked in `dropped` [B, E]."""
        present = self.present & ~dropped
        return Entities(self.ids, present, self.positions * present[..., None])


def token_spans(tokenizer: Tokenizer, texts: list[str], spans: list[list[tuple[int, int]]]
                ) -> list[list[tuple[int, int]]]:
    """Character spans of each text -> token spans (end exclusive) for any suite tokenizer: a span's first token
    is the number of tokens of the text before it, less the end token (the start token is position 0); so spans must
    start and end at word boundaries, as words and entity mentions do. One tokenizer call for all of them."""
    prefixes = [text[:at] for text, text_spans in zip(texts, spans) for span in text_spans for at in span]
    if not prefixes:
        return [[] for _ in texts]
    counts = (tokenizer(prefixes)["attention_mask"].sum(-1) - 1).tolist()
    result, index = [], 0
    for text_spans in spans:
        result.append([(counts[index + 2 * i], counts[index + 2 * i + 1]) for i in range(len(text_spans))])
        index += 2 * len(text_spans)
    return result


def load_knowledge(path: str) -> tuple[Tensor, Tensor]:
    """(entity embeddings [N, D], edges [2, M] from the (head, tail) of every triple) of a knowledge.json."""
    knowledge = json.loads(Path(path).read_text(encoding="utf-8"))
    embeddings = torch.tensor(knowledge["embeddings"], dtype=torch.float32)
    triples = torch.tensor(knowledge["triples"], dtype=torch.long).reshape(-1, 3)
    return embeddings, triples[:, [0, 2]].T.contiguous()


class ARL(VLPMethod):
    """Co-attention fusion with a knowledge stream; MLM (whole-entity) + MIM + ITM + knowledge alignment (module doc).

    Args:
        vision: image encoder, a timm ViT (default: a tiny 2-block ViT at 32 px; CLIP ViT-B/16 at 288 px officially).
        tokenizer: text tokenizer (default: bytes, 32 tokens; RoBERTa BPE, 64 tokens officially).
        knowledge: a `vlp-data wordnet` knowledge.json (entities, triples, TransE embeddings); None: no entities (the
            knowledge stream stays empty and L_align is 0).
        width, text_layers, fusion_layers, heads: the text encoder and the co-attention layers (768, 12, 6, 12).
        knowledge_width, knowledge_heads: the knowledge stream (256 = the TransE dimension, 4 heads).
        graph_width, graph_heads: the first GAT layer (64 x 8 heads).
        max_entities: entities per caption in the knowledge stream (24).
        mask_probability: share of the real tokens MLM masks, in whole words and entities (0.15).
        mim_ratio: patches removed for MIM (0.75).
        mim_layer: MIM decodes the image states entering this fusion layer (official 3 of 6); -1: after the last.
        decoder_width, decoder_depth, decoder_heads: the MIM decoder (384, 4 + 1, 6).
        normalize_target: per-patch normalised pixel targets (official `norm_pix_loss` True).
        mlm_weight, mim_weight, itm_weight, align_weight: loss weights (1, 1, 0.1, 1).
        new_module_lr: learning rate of the co-attention layers, the knowledge stream, the projections and the heads
            (official: 5x the encoders'); None: the optimizer's for everything.
    """

    paper = Paper("Align, Reason and Learn: Enhancing Medical Vision-and-Language Pre-training with Knowledge",
                  "Chen et al.", 2022, note="WordNet in place of UMLS: `vlp-data wordnet`")
    family = "fusion and captioning"
    view_kind = "one crop"

    required_keys = ("image", "text")

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        tokenizer: Tokenizer | None = None,
        knowledge: str | None = None,
        width: int = 64,
        text_layers: int = 1,
        fusion_layers: int = 1,
        heads: int = 2,
        knowledge_width: int = 32,
        knowledge_heads: int = 2,
        graph_width: int = 16,
        graph_heads: int = 2,
        max_entities: int = 24,
        mask_probability: float = 0.15,
        mim_ratio: float = 0.75,
        mim_layer: int = -1,
        decoder_width: int = 32,
        decoder_depth: int = 1,
        decoder_heads: int = 2,
        normalize_target: bool = True,
        mlm_weight: float = 1.0,
        mim_weight: float = 1.0,
        itm_weight: float = 0.1,
        align_weight: float = 1.0,
        new_module_lr: float | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.save_hyperparameters(ignore=["vision", "tokenizer", "optimizer", "lr_scheduler"])
        self.tokenizer = tokenizer or ByteTokenizer(context_length=32)
        self.specials = text_specials(self.tokenizer)
        self.vision = vision or tiny_vit()
        if self.vision.patch_size is None or not hasattr(self.vision.model, "blocks"):
            raise ValueError(f"ARL's MIM removes patches before a timm ViT; {type(self.vision.model).__name__} is not"
                             " one: pick a vit_* model_name")
        if not -1 <= mim_layer < fusion_layers:
            raise ValueError(f"mim_layer={mim_layer} must be -1 (after the last layer) or a fusion layer index "
                             f"below fusion_layers={fusion_layers}")
        embeddings, edges = load_knowledge(knowledge) if knowledge else (torch.zeros(0, knowledge_width),
                                                                         torch.zeros(2, 0, dtype=torch.long))
        if embeddings.shape[1] != knowledge_width:
            raise ValueError(f"{knowledge} holds {embeddings.shape[1]}-d entity embeddings but knowledge_width is "
                             f"{knowledge_width}: set knowledge_width to {embeddings.shape[1]} (or rebuild it "
                             f"with `vlp-data wordnet --dim {knowledge_width}`)")
        image_width = self.vision.num_features
        self.image_projection = nn.Linear(image_width, width)
        self.modality = nn.Embedding(2, width)  # 0 text, 1 image
        self.text = FusionTextTransformer(
            self.specials.vocab_size, self.tokenizer.context_length, width, text_layers, fusion_layers, heads,
        )
        self.image_blocks = nn.ModuleList(FusionBlock(width, heads, cross_attention=True) for _ in range(fusion_layers))
        self.image_ln = nn.LayerNorm(width)
        self.graph = KnowledgeGraphEncoder(embeddings, edges, graph_width, graph_heads)
        self.knowledge_blocks = nn.ModuleList(
            FusionBlock(knowledge_width, knowledge_heads, cross_attention=True, memory_width=width)
            for _ in range(fusion_layers)
        )
        self.knowledge_to_text = nn.ModuleList(nn.Linear(knowledge_width, width) for _ in range(fusion_layers))
        self.text_pooler = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.image_pooler = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.mlm_head = mlm_head(width)
        self.itm_head = nn.Linear(2 * width, 2)
        self.align_image = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, knowledge_width),
                                         nn.ReLU())
        self.align_text = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, knowledge_width),
                                        nn.ReLU())
        grid = tuple(self.vision.model.patch_embed.grid_size)
        self.num_patches = grid[0] * grid[1]
        self.decoder_embed = nn.Linear(width, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("decoder_pos_embed", build_sincos2d_pos_embed(list(grid), decoder_width)[None],
                             persistent=False)
        self.decoder_blocks = nn.Sequential(
            *[Block(decoder_width, decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_width)
        self.decoder_pred = nn.Linear(decoder_width, self.vision.patch_size ** 2 * 3)
        self.max_entities, self.mask_probability = max_entities, mask_probability
        self.mim_ratio, self.mim_layer, self.normalize_target = mim_ratio, mim_layer, normalize_target
        self.mlm_weight, self.mim_weight = mlm_weight, mim_weight
        self.itm_weight, self.align_weight = itm_weight, align_weight
        self.new_module_lr = new_module_lr
        self._said_no_entities = False

    def on_fit_start(self) -> None:
        sampling = getattr(getattr(self.trainer, "datamodule", None), "caption_sampling", "all")
        if sampling != "all":
            raise ValueError(f"ARL reads its entities as character spans of the whole caption, but "
                             f"caption_sampling={sampling!r} trains on a part of it (the spans would land on other "
                             "words); set data.caption_sampling: all")

    def train_views(self) -> Views:
        """Random resized crops with flips (the official `clip_resizedcrop` family, without RandAugment)."""
        return SingleCrop(scale=(0.5, 1.0), hflip=True, mean=self.vision.mean, std=self.vision.std)

    def probe_features(self, images: Tensor) -> Tensor:
        return self.vision(images)

    def parameter_groups(self) -> list[dict]:
        """The co-attention layers, knowledge stream, projections and heads at `new_module_lr` (module doc)."""
        new = [self.image_projection, self.modality, self.text.fusion_blocks, self.image_blocks, self.image_ln,
               self.graph, self.knowledge_blocks, self.knowledge_to_text, self.text_pooler, self.image_pooler,
               self.mlm_head, self.itm_head, self.align_image, self.align_text, self.decoder_embed,
               self.decoder_blocks, self.decoder_norm, self.decoder_pred, nn.ParameterList([self.mask_token])]
        return self.parameter_groups_at(self.new_module_lr, new)

    # ------------------------------------------------------------------ knowledge of a batch
    def caption_entities(self, batch: dict
                         ) -> tuple[list[list[tuple[int, int, int]]], list[list[tuple[int, int, bool]]]]:
        """Per caption: its entity mentions as token spans (start, end, entity) and its masking units (start, end,
        is an entity): the mentions and every word outside them. From the `.json` `entities` [start, end, entity]
        (character offsets into the caption) that `vlp-data wordnet` wrote."""
        captions = batch.get("caption") or [""] * batch["text"]["input_ids"].shape[0]
        metas = batch.get("meta") or [{}] * len(captions)
        lengths = (batch["text"]["attention_mask"].sum(-1) - 1).tolist()  # the end token's position
        mentions = [[(s, e, i) for s, e, i in meta.get("entities", []) if 0 <= i < self.graph.num_entities
                     and e <= len(caption)] for meta, caption in zip(metas, captions)]
        if not any(mentions) and not self._said_no_entities:
            log.warning("ARL: no caption of this batch has WordNet entities (.json `entities` with a `knowledge`): "
                        "the knowledge stream is empty and L_align is 0; link the shards with `vlp-data wordnet` "
                        "and pass its knowledge.json as model.knowledge")
            self._said_no_entities = True
        words = [[(m.start(), m.end()) for m in _WORD.finditer(caption)
                  if not any(s < m.end() and m.start() < e for s, e, _ in sample)]
                 for caption, sample in zip(captions, mentions)]
        spans = [[(s, e) for s, e, _ in sample] + sample_words for sample, sample_words in zip(mentions, words)]
        tokens = token_spans(self.tokenizer, captions, spans)
        entities, units = [], []
        for sample, sample_tokens, length in zip(mentions, tokens, lengths):
            clipped = [(start, min(end, length)) for start, end in sample_tokens]
            entities.append([(start, end, entity) for (start, end), (_, _, entity) in zip(clipped, sample)
                             if start < end])
            units.append([(start, end, i < len(sample)) for i, (start, end) in enumerate(clipped) if start < end])
        return entities, units

    def entity_inputs(self, entities: list[list[tuple[int, int, int]]], length: int, device: torch.device
                      ) -> Entities:
        """The knowledge stream's input (`Entities`) of each caption's first `max_entities` mentions; one slot at
        least, so every fusion layer runs the stream (empty: no gradient-free parameters under DDP)."""
        count = max(1, min(self.max_entities, max(map(len, entities), default=0)))
        ids = torch.zeros(len(entities), count, dtype=torch.long)
        present = torch.zeros(len(entities), count, dtype=torch.bool)
        positions = torch.zeros(len(entities), count, length)
        for row, sample in enumerate(entities):
            for slot, (start, end, entity) in enumerate(sample[:count]):
                ids[row, slot], present[row, slot] = entity, True
                positions[row, slot, start:end] = 1.0
        return Entities(ids.to(device), present.to(device), positions.to(device))

    def entity_labels(self, entities: list[list[int]], device: torch.device) -> Tensor:
        """Multi-hot [B, N] of each sample's entities."""
        labels = torch.zeros(len(entities), self.graph.num_entities, device=device)
        for row, sample in enumerate(entities):
            labels[row, list(sample)] = 1.0
        return labels

    # ------------------------------------------------------------------ co-attention with knowledge
    def fuse(self, image_tokens: Tensor, text: dict[str, Tensor], entities: Entities, nodes: Tensor,
             stop_at: int | None = None) -> tuple[Tensor, Tensor]:
        """Image tokens [B, S, W_img] + tokens + entities -> (fused text [B, L, W], fused image [B, S, W]), both
        after their final LayerNorm; `stop_at` k: the image states entering layer k instead (and no text)."""
        _, x, text_mask = self.text.encode(text)
        x = x + self.modality.weight[0]
        y = self.image_projection(image_tokens) + self.modality.weight[1]
        text_padding = text["attention_mask"].bool()[:, None, None, :]
        batch, count = entities.ids.shape
        z = nodes.new_zeros(batch * count, nodes.shape[1]).index_copy(
            0, entities.present.flatten().nonzero().squeeze(1), nodes[entities.ids[entities.present]]
        ).view(batch, count, -1).to(x.dtype)  # [B, E, D]
        keys = entities.present[:, None, None, :].expand(-1, 1, count, -1)
        z_mask = keys | torch.eye(count, dtype=torch.bool, device=keys.device)  # absent slots read themselves only
        layers = zip(self.text.fusion_blocks, self.image_blocks, self.knowledge_blocks, self.knowledge_to_text)
        for k, (text_block, image_block, knowledge_block, to_text) in enumerate(layers):
            if k == stop_at:
                return x, self.image_ln(y)
            x_attended = text_block.attend(x, text_mask, y)
            z_attended = knowledge_block.attend(z, z_mask, y)
            x_attended = x_attended + entities.positions.transpose(1, 2).to(x.dtype) @ to_text(z_attended)
            y = image_block(y, None, x, text_padding)  # the image layer reads the text entering this layer
            x, z = text_block.feed_forward(x_attended), knowledge_block.feed_forward(z_attended)
        return self.text.ln_final(x), self.image_ln(y)

    def pooled(self, fused_text: Tensor, fused_image: Tensor) -> Tensor:
        return torch.cat([self.text_pooler(fused_text[:, 0]), self.image_pooler(fused_image[:, 0])], dim=-1)

    # ------------------------------------------------------------------ training
    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        images, text = batch["image"], batch["text"]
        device, length = images.device, text["input_ids"].shape[1]
        mentions, units = self.caption_entities(batch)
        entities = self.entity_inputs(mentions, length, device)
        nodes = self.graph()  # [N, D]
        image_tokens = self.vision.forward_sequence(images)  # [B, 1 + P, W_img]
        loss_align = self.alignment_loss(image_tokens, text, nodes, mentions, batch)
        loss_mlm, mlm_accuracy = self.masked_language_loss(text, units, image_tokens, entities, nodes)
        loss_itm, itm_accuracy = self.matching_loss(text, image_tokens, entities, nodes, batch)
        loss_mim = self.masked_image_loss(images, text, entities, nodes)
        loss = (self.mlm_weight * loss_mlm + self.mim_weight * loss_mim + self.itm_weight * loss_itm
                + self.align_weight * loss_align)
        return {"loss": loss, "mlm": loss_mlm.detach(), "mim": loss_mim.detach(), "itm": loss_itm.detach(),
                "align": loss_align.detach(), "mlm_accuracy": mlm_accuracy, "itm_accuracy": itm_accuracy}

    def alignment_loss(self, image_tokens: Tensor, text: dict[str, Tensor], nodes: Tensor,
                       mentions: list[list[tuple[int, int, int]]], batch: dict) -> Tensor:
        """L_align: both unimodal [CLS] features classify the entities through the entity vectors (module doc)."""
        image_cls = self.image_projection(image_tokens[:, 0]) + self.modality.weight[1]
        text_cls = self.text.encode(text)[1][:, 0] + self.modality.weight[0]
        image_features, text_features = self.align_image(image_cls).float(), self.align_text(text_cls).float()
        if nodes.shape[0] == 0:  # no knowledge, nothing to align; the heads stay in the graph (DDP)
            return 0.0 * (image_features.sum() + text_features.sum())
        metas = batch.get("meta") or [{}] * len(mentions)
        image_entities = [[i for i in meta.get("image_entities", []) if 0 <= i < nodes.shape[0]] for meta in metas]
        text_entities = [sorted({entity for _, _, entity in sample}) for sample in mentions]
        image_logits = image_features @ nodes.float().T  # [B, N]
        text_logits = text_features @ nodes.float().T
        return (F.binary_cross_entropy_with_logits(image_logits, self.entity_labels(image_entities, nodes.device))
                + F.binary_cross_entropy_with_logits(text_logits, self.entity_labels(text_entities, nodes.device)))

    def masked_language_loss(self, text: dict[str, Tensor], units: list[list[tuple[int, int, bool]]],
                             image_tokens: Tensor, entities: Entities, nodes: Tensor) -> tuple[Tensor, Tensor]:
        """MLM with whole-entity masking; masked entities leave the knowledge stream (module doc)."""
        masked_ids, labels = mask_spans(
            text["input_ids"], text["attention_mask"], units, mask_token_id=self.specials.mask_token_id,
            vocab_size=self.specials.vocab_size, special_token_ids=self.specials.special_token_ids,
            probability=self.mask_probability,
        )
        chosen = labels != -100
        dropped = (entities.positions * chosen[:, None, :].float()).sum(-1) > 0  # [B, E]: an entity with a mask
        masked = {"input_ids": masked_ids, "attention_mask": text["attention_mask"]}
        fused, _ = self.fuse(image_tokens, masked, entities.without(dropped), nodes)
        logits = self.text.token_logits(self.mlm_head(fused[chosen]))[None]  # [1, M, V]
        accuracy = (logits[0].argmax(-1) == labels[chosen]).float().mean() if chosen.any() else logits.new_zeros(())
        return mlm_loss(logits, labels[chosen][None]), accuracy.detach()

    def matching_loss(self, text: dict[str, Tensor], image_tokens: Tensor, entities: Entities, nodes: Tensor,
                      batch: dict) -> tuple[Tensor, Tensor]:
        """ITM: half of the texts with another image of the batch (official random "false image"), 2-way head."""
        count = image_tokens.shape[0]
        ids = sample_ids(batch).to(image_tokens.device)
        shift = torch.randint(1, max(2, count), (1,), device=ids.device)
        other = (torch.arange(count, device=ids.device) + shift) % count  # another row, never the row itself
        swap = torch.randperm(count, device=ids.device) < count // 2
        images = torch.where(swap[:, None, None], image_tokens[other], image_tokens)
        labels = (~swap | (ids[other] == ids)).long()
        logits = self.itm_head(self.pooled(*self.fuse(images, text, entities, nodes))).float()
        return itm_loss(logits, labels), (logits.argmax(-1) == labels).float().mean()

    def masked_image_loss(self, images: Tensor, text: dict[str, Tensor], entities: Entities, nodes: Tensor) -> Tensor:
        """MIM: MAE masking before the image encoder, the fused image states decoded into pixels (module doc)."""
        mask = random_masking(images.shape[0], self.num_patches, self.mim_ratio, device=images.device)
        prefix, patches = vit_tokens(self.vision.model, images)
        visible = vit_transformer(self.vision.model, torch.cat([prefix, gather_patches(patches, mask.ids_keep)], 1))
        stop_at = None if self.mim_layer == -1 else self.mim_layer
        _, fused_image = self.fuse(visible, text, entities, nodes, stop_at=stop_at)
        predicted = self.decode_patches(fused_image, mask)
        return masked_reconstruction_loss(predicted, patchify(images, self.vision.patch_size), mask.mask,
                                          normalize_target=self.normalize_target)

    def decode_patches(self, encoded: Tensor, mask: PatchMask) -> Tensor:
        """MAE's decoder: encoded [N, P + K, W] -> predicted pixels of every patch [N, L, p*p*3], grid order."""
        num_prefix = encoded.shape[1] - mask.ids_keep.shape[1]
        tokens = self.decoder_embed(encoded)
        prefix, visible = tokens[:, :num_prefix], tokens[:, num_prefix:]
        mask_tokens = self.mask_token.to(tokens.dtype).expand(visible.shape[0], mask.ids_masked.shape[1], -1)
        patches = gather_patches(torch.cat([visible, mask_tokens], dim=1), mask.ids_restore)
        patches = patches + self.decoder_pos_embed.to(patches.dtype)
        tokens = self.decoder_norm(self.decoder_blocks(torch.cat([prefix, patches], dim=1)))
        return self.decoder_pred(tokens[:, num_prefix:])
