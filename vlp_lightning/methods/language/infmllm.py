"""InfMLLM (Zhou et al. 2023, "InfMLLM: A Unified Framework for Visual-Language Tasks"): a frozen ViT, the
pool-adapter, and an LLM, trained in three stages of growing memory (sec. 3):

1. **Alignment pre-training**: only the pool-adapter trains, on image-caption pairs (LM and ViT frozen).
2. **Multitask hybrid training**: captions, VQA and visual grounding (boxes written as text, normalised
   coordinates), the pool-adapter and the LM training (experiments/infmllm/*_multitask_*.yaml: `vlp-data
   instructions` tasks, and the scene shards' grounding questions where present).
3. **Instruction tuning**: the LM fine-tuned on conversations.

Each later stage starts from the previous one's checkpoint (`start_from`). The pool-adapter
(`modules.PoolAdapter`, official `infmllm/models/pooler.py`): the class token dropped, the patch grid average-pooled
to s x s cells (position kept: cell (i, j) summarises the same image region for every image), then
Linear -> GELU -> Linear; what the paper credits for its grounding results.
"""

from __future__ import annotations

from vlp_lightning.catalog import Paper
from vlp_lightning.methods.language.base import FrozenLMMethod
from vlp_lightning.modules.connectors import PoolAdapter


class InfMLLM(FrozenLMMethod):
    """Pool-adapter, three stages (module doc; arguments: `FrozenLMMethod`)."""

    paper = Paper("InfMLLM: A Unified Framework for Visual-Language Tasks", "Zhou et al.", 2023)
    connector_class = PoolAdapter
