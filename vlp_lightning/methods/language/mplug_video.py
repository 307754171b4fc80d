"""mPLUG-video (Xu et al. 2023, "Youku-mPLUG: A 10 Million Large-scale Chinese Video-Language Dataset for
Pre-training and Benchmarks", the benchmark models of sec. 4), on mPLUG-Owl's modular design (Ye et al. 2023,
"mPLUG-Owl: Modularization Empowers Large Language Models with Multimodality", sec. 3.1).

A frozen image tower embeds each of T frames (patch tokens [N, width] each); mPLUG-Owl's **visual abstractor**
(`modules.connectors.VisualAbstractor`) summarises all of them at once into a fixed number of visual tokens: Q
learned queries and, in the video form, Q temporal queries cross-attend, layer after layer, to [queries ; the T x N
frame tokens flattened into one key set]; the queries' outputs are mapped into the LM and the temporal queries'
outputs, mapped by their own linear layer, are added to them, then a learned end-of-vision token follows
(X-PLUG/mPLUG-Owl `mplug_owl_video/modeling_mplug_owl.py`: `temporal_query_tokens`, `temporal_visual_fc`):

    Z = VisualAbstractor(concat_t (tower_tokens(x_t) + e_t))       [Q + 1, D]
    loss = - mean over answer tokens of log p_LM(y_t | y_<t, Z, prompt)     (the frozen LM's captioning loss)

Attention over a set of keys is blind to their order, and the tower's position embeddings are spatial only, so
time reaches the abstractor through e_t, a learned temporal embedding per frame slot added to every token of frame
t (zeros at the start, as TimeSformer's `temporal_embed` of the GPT-3 mPLUG-video, X-PLUG/Youku-mPLUG
`models/vision_transformer.py`), in place of mplug_owl_video's temporal convolution adapters inside the ViT layers;
`temporal_embedding: false` gives the release's abstractor alone, which cannot tell a clip from its reversal.

What trains (the paper: "mPLUG-video based on the frozen Bloomz with only 1.7 % trainable parameters"; the
Youku-mPLUG GPT-3 configs `freeze_text_decoder: true`): the abstractor; the LM stays frozen (LoRA possible through
`language_model`), and so does the tower here (`train_vision`); the temporal embedding trains with the abstractor.
Unlike PLLaVA the token count does not grow with T or the grid.

Data: clip batches with captions as caption instructions (`VideoLLaVA`); a still image is a one-frame clip (the
abstractor reads any number of tokens). Not built: mplug_owl_video's temporal convolution adapters inside every
ViT layer (the tower is the suite's frozen image tower), the release's pretrained abstractor weights, and the
GPT-3 variant's TimeSformer video encoder; the Youku-mPLUG data is not reachable here (moving-emoji clips stand
in, and `vlp-data youku-mplug` reads the release's CSVs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from vlp_lightning.catalog import Paper
from vlp_lightning.methods.base import WarmupCosineLR
from vlp_lightning.methods.language.base import ConnectorFactory
from vlp_lightning.methods.language.video import VIDEO_CAPTION_PROMPTS, VideoLLaVA
from vlp_lightning.modules.connectors import VisualAbstractor
from vlp_lightning.modules.language_model import LanguageModel


class MPLUGVideo(VideoLLaVA):
    """A frozen LM reading T frames through mPLUG-Owl's visual abstractor (module doc).

    Args:
        temporal_embedding: add a learned embedding per frame slot to the frames' tokens (module doc); False: the
            release's order-blind abstractor.
        (the rest: see `VideoLLaVA`; `connector` defaults to a tiny `VisualAbstractor` with temporal queries)
    """

    paper = Paper("Youku-mPLUG: A 10 Million Large-scale Chinese Video-Language Dataset for Pre-training and "
                  "Benchmarks", "Xu et al.", 2023,
                  note="Youku-mPLUG videos not reachable: moving-emoji clips; no ViT temporal adapters")
    connector_class = VisualAbstractor

    def __init__(
        self,
        language_model: LanguageModel | None = None,
        vision: nn.Module | None = None,
        image_tower: str | None = None,
        connector: ConnectorFactory | None = None,
        num_frames: int = 4,
        temporal_embedding: bool = True,
        train_vision: bool = False,
        caption_prompts: Sequence[str] = VIDEO_CAPTION_PROMPTS,
        max_length: int = 96,
        answer_length: int = 30,
        start_from: str | None = None,
        crop_scale: tuple[float, float] = (0.9, 1.0),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(language_model=language_model, vision=vision, image_tower=image_tower, connector=connector,
                         num_frames=num_frames, train_vision=train_vision, caption_prompts=caption_prompts,
                         max_length=max_length, answer_length=answer_length, start_from=start_from,
                         crop_scale=crop_scale, optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.temporal_embedding = (nn.Parameter(torch.zeros(num_frames, 1, self.vision.num_features))
                                   if temporal_embedding else None)

    def visual_tokens(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] (or images, one frame) -> [B, M, D]: the abstractor over all frames' tokens."""
        video = video if video.ndim == 5 else video.unsqueeze(1)
        tokens = self.tower_tokens(video)  # [B, T, N, width]
        if self.temporal_embedding is not None:
            if tokens.shape[1] > self.temporal_embedding.shape[0]:
                raise ValueError(f"MPLUGVideo has temporal embeddings for {self.temporal_embedding.shape[0]} frames "
                                 f"but got a clip of {tokens.shape[1]}; sample num_frames frames or build it with "
                                 f"num_frames: {tokens.shape[1]}")
            tokens = tokens + self.temporal_embedding[: tokens.shape[1]].to(tokens.dtype)
        return self.connector(tokens.flatten(1, 2))  # [B, T N, width] -> [B, M, D]
