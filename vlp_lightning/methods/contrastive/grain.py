"""GRAIN: Grounding Descriptions in Images (Halbe et al. 2024, "Grounding Descriptions in Images informs Zero-Shot
Visual Recognition"; official code github.com/shaunak27/grain-clip).

CLIP's towers and image-caption contrast, plus a DETR-style decoder of learned queries over the image tower's
tokens (paper sec. 3, "a DETR-inspired architecture"; official `model/tfm.py` `ObjDecoder`): Q region queries and one
global query. Each region query's output gives a box b̂_q (a 3-layer MLP, sigmoid, normalised cx, cy, w, h) and a
region embedding r_q (a linear map into the joint space); the global query's output, mapped into the same space, is
the image embedding of the caption contrast and of zero-shot recognition (official `img_embed = hs[:, -1] @
img_proj`, used for training and `evaluate.py`). Objective, L_total = L_ic + L_box + L_rd (equal weights):

* L_ic: CLIP's symmetric InfoNCE of global image embeddings and caption embeddings (`CLIP.contrastive_loss`);
* region queries are matched one-to-one to the image's true boxes by the Hungarian algorithm on the box cost alone,
  5·L1 − 2·GIoU (official `HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)` with `exclude_class=True`);
* L_box: L1 + GIoU of the matched boxes (official `--loss_bbox_all_boxes 1 --loss_giou_all_boxes 1`; its
  `compute_box_loss` divides the sum by len(weight_dict) / 3 = 2/3, a constant factor 1.5 left out here);
* L_rd: the cross-entropy of each matched region embedding against every region description of the batch, encoded
  by the text tower and scaled by CLIP's temperature, its own box's description the target (official
  `WordContrastiveLoss`, region -> description only, over the local batch).

Queries left unmatched get no loss at all: GRAIN has no "no object" class (the official `SetCriterion` computes only
the box terms; its cardinality error is logged, not trained). Decoder as officially configured: 6 pre-norm layers of
width 512, 8 heads, FFN 2048, dropout 0.1, memory = the ViT's every token (class token included) through a bias-free
linear map, 5 region queries. Simplifications: the learned queries are the decoder's input (torch's
`TransformerDecoderLayer`), where DETR starts from zeros and adds the query embeddings to queries and keys in every
layer; the official per-layer (auxiliary) box terms are computed but not weighted into its loss, so they are left out.
The paper's annotations (MLLM descriptions of regions, boxes from an open-vocabulary detector) are here the scene
shards' own: each kept object's box and region description (`object_phrases(meta, objects, "regions")`).

`ground(images, phrases)` gives each phrase the box of the region query whose embedding is most similar to the
phrase's embedding (the paper's region-description alignment read the other way round).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from data_modules.instances import PHRASE_FIELDS, object_phrases
from vlp_lightning.catalog import Paper
from vlp_lightning.losses.grounding import boxes_to_normalised, normalised_to_boxes, region_description_loss
from vlp_lightning.methods.base import WarmupCosineLR
from vlp_lightning.methods.clip import CLIP
from vlp_lightning.modules.heads import MLPHead
from vlp_lightning.modules.tokenizers import Tokenizer
from vlp_lightning.modules.vision import VisionEncoder


class RegionQueryDecoder(nn.Module):
    """Learned queries cross-attending to an image's tokens (module doc) -> [N, Q + 1, width]; the last row is the
    global query's output, the others the region queries'.

    Args:
        in_features: width of the image tower's tokens.
        width, layers, heads, mlp_ratio, dropout: the decoder's (official 512, 6, 8, 4, 0.1).
        num_queries: Q, the region queries (official 5).
    """

    def __init__(self, in_features: int, width: int, layers: int, heads: int, num_queries: int, mlp_ratio: float,
                 dropout: float) -> None:
        super().__init__()
        self.memory_projection = nn.Linear(in_features, width, bias=False)
        self.queries = nn.Parameter(torch.randn(num_queries + 1, width))  # nn.Embedding's N(0, 1), as officially
        layer = nn.TransformerDecoderLayer(width, heads, round(width * mlp_ratio), dropout, activation="relu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(width))

    def forward(self, tokens: Tensor) -> Tensor:
        memory = self.memory_projection(tokens)  # [N, L, width]
        return self.layers(self.queries.to(memory.dtype).expand(memory.shape[0], -1, -1), memory)


class GRAIN(CLIP):
    """CLIP with region queries grounded in region descriptions (module doc).

    Args:
        num_queries: region queries per image (official 5: at most 5 boxes per image in its data).
        decoder_width, decoder_layers, decoder_heads, decoder_mlp_ratio, decoder_dropout: the query decoder's
            (official 512, 6, 8, 4, 0.1).
        region_weight: weight of L_rd (official `word_loss_weight` 1).
        l1_weight, giou_weight: the weights of L_box's terms (official 1, 1).
        match_l1_weight, match_giou_weight: the matching cost's (official 5, 2).
        phrases: what a box is matched with: each object's region description (`regions`, the paper's) or name.
        See `CLIP` for the others.
    """

    paper = Paper("Grounding Descriptions in Images informs Zero-Shot Visual Recognition", "Halbe et al.", 2024,
                  note="MLLM / detector annotations stand-in: the scene shards' boxes and region descriptions")
    family = "contrastive image-text"
    view_kind = "one crop"

    required_keys = ("image", "text", "boxes")

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        text: nn.Module | None = None,
        tokenizer: Tokenizer | None = None,
        embed_dim: int = 256,
        num_queries: int = 4,
        decoder_width: int = 64,
        decoder_layers: int = 2,
        decoder_heads: int = 2,
        decoder_mlp_ratio: float = 4.0,
        decoder_dropout: float = 0.1,
        region_weight: float = 1.0,
        l1_weight: float = 1.0,
        giou_weight: float = 1.0,
        match_l1_weight: float = 5.0,
        match_giou_weight: float = 2.0,
        phrases: Literal["regions", "names"] = "regions",
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        learn_logit_scale: bool = True,
        local_loss: bool = False,
        gather_with_grad: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(vision=vision, text=text, tokenizer=tokenizer, embed_dim=embed_dim,
                         init_logit_scale=init_logit_scale, max_logit_scale=max_logit_scale,
                         learn_logit_scale=learn_logit_scale, local_loss=local_loss,
                         gather_with_grad=gather_with_grad, optimizer=optimizer, lr_scheduler=lr_scheduler,
                         compile=compile)
        if num_queries < 1:
            raise ValueError(f"GRAIN needs at least one region query, got num_queries={num_queries}")
        if phrases not in PHRASE_FIELDS:
            raise ValueError(f"GRAIN phrases={phrases!r} must be one of {PHRASE_FIELDS}")
        self.decoder = RegionQueryDecoder(self.vision.num_features, decoder_width, decoder_layers, decoder_heads,
                                          num_queries, decoder_mlp_ratio, decoder_dropout)
        self.image_projection = self.projection_head(decoder_width, embed_dim)  # the global query's (`img_proj`)
        self.region_projection = self.projection_head(decoder_width, embed_dim)  # official `obj_proj`
        self.box_head = MLPHead(decoder_width, decoder_width, 4, layers=3, norm="none")  # DETR's `bbox_embed`
        self.phrases, self.embed_dim = phrases, embed_dim
        self.region_weights = {"l1_weight": l1_weight, "giou_weight": giou_weight,
                               "match_l1_weight": match_l1_weight, "match_giou_weight": match_giou_weight}
        self.region_weight = region_weight

    def decode(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Images [N, 3, H, W] -> unit global embeddings [N, D], boxes [N, Q, 4] (normalised cxcywh) and unit region
        embeddings [N, Q, D]."""
        states = self.decoder(self.vision.forward_sequence(images))  # [N, Q + 1, width]
        regions = states[:, :-1]
        return (F.normalize(self.image_projection(states[:, -1]), dim=-1), self.box_head(regions).float().sigmoid(),
                F.normalize(self.region_projection(regions), dim=-1))

    def encode_image(self, images: Tensor) -> Tensor:
        """The global query's embedding (official zero-shot evaluation), not the image tower's pooled token."""
        return self.decode(images)[0]

    def encode_phrases(self, phrases: list[str], device: torch.device) -> Tensor:
        """Unit text embeddings [P, D] of `phrases` (the caption tower: GRAIN encodes descriptions as captions)."""
        if not phrases:
            return torch.zeros(0, self.embed_dim, device=device)
        return self.encode_text({name: ids.to(device) for name, ids in self.tokenizer(phrases).items()})

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        if not {"boxes", "objects", "meta"} <= set(batch):
            raise ValueError("GRAIN needs object boxes and region descriptions in its batches (`boxes`, `objects`, "
                             f"`meta`) but got only {sorted(batch)}; train it on scene shards (`vlp-data scenes "
                             "data/scenes`) with data_modules.ImageTextDataModule")
        images = batch["image"]
        height, width = images.shape[-2:]
        image_features, boxes, regions = self.decode(images)
        caption = self.contrastive_loss(image_features, self.encode_text(batch["text"]))
        phrases = [object_phrases(meta, objects, self.phrases) for meta, objects in zip(batch["meta"],
                                                                                       batch["objects"])]
        descriptions = self.encode_phrases([phrase for sample in phrases for phrase in sample], images.device)
        targets = [boxes_to_normalised(true.reshape(-1, 4).to(boxes), height, width) for true in batch["boxes"]]
        logit_scale = self.logit_scale.float().exp()
        terms = region_description_loss(boxes, regions, targets, descriptions, logit_scale, **self.region_weights)
        loss = caption + terms["box"] + self.region_weight * terms["region"]
        return {"loss": loss, "caption": caption.detach(), "box": terms["box"].detach(),
                "region": terms["region"].detach(), "l1": terms["l1"], "giou": terms["giou"],
                "region_accuracy": terms["region_accuracy"], "logit_scale": logit_scale.detach()}

    @torch.no_grad()
    def ground(self, images: Tensor, phrases: list[list[str]]) -> list[Tensor]:
        """For each image the box of each of its phrases [K_i, 4] (x0, y0, x1, y1 in pixels of `images`): that of
        the region query whose embedding has the highest cosine with the phrase's (module doc)."""
        height, width = images.shape[-2:]
        _, boxes, regions = self.decode(images)
        embedded = self.encode_phrases([phrase for sample in phrases for phrase in sample], images.device)
        grounded, start = [], 0
        for image, sample in enumerate(phrases):
            best = (embedded[start : start + len(sample)] @ regions[image].T).argmax(1)  # [K_i]
            grounded.append(normalised_to_boxes(boxes[image, best], height, width))
            start += len(sample)
        return grounded
