"""Knowledge-graph blocks: entity embeddings refined by graph attention over the graph's relations.

* `GraphAttention` — one graph attention layer (GAT, Veličković et al. 2018, eq. 1-5; the form of PyTorch
  Geometric's `GATConv`, which ARL's official code uses): every node attends to itself and to the sources of its
  incoming edges, α_ij = softmax_j LeakyReLU(aᵀ[W h_i ‖ W h_j]) (slope 0.2), with K heads concatenated or averaged.
* `KnowledgeGraphEncoder` — ARL's entity encoder (Chen et al. 2022, sec. 3.2; official `AlignHead.forward`):
  trainable entity embeddings (initialised from TransE) -> LayerNorm -> dropout -> GAT (K heads, concatenated) ->
  ELU -> dropout -> GAT (one head) back to the embedding width: one vector per entity, used both as the weights of
  the entity classifiers (alignment) and as the knowledge tokens of the fusion (reasoning).

Plain PyTorch (index_add / scatter_reduce), no graph library; an empty graph (no entities) gives an empty output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GraphAttention(nn.Module):
    """x [N, in_width], edges [2, M] (source row, target row) -> [N, heads * width] (concat) or [N, width]."""

    def __init__(self, in_width: int, width: int, heads: int = 1, concat: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.width, self.concat, self.dropout = heads, width, concat, dropout
        self.linear = nn.Linear(in_width, heads * width, bias=False)
        self.attention_source = nn.Parameter(torch.empty(heads, width))
        self.attention_target = nn.Parameter(torch.empty(heads, width))
        self.bias = nn.Parameter(torch.zeros(heads * width if concat else width))
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.xavier_uniform_(self.attention_source)
        nn.init.xavier_uniform_(self.attention_target)

    def forward(self, x: Tensor, edges: Tensor) -> Tensor:
        count = x.shape[0]
        loops = torch.arange(count, device=x.device)
        source, target = torch.cat([edges[0], loops]), torch.cat([edges[1], loops])  # every node reads itself too
        h = self.linear(x).view(count, self.heads, self.width)
        score = F.leaky_relu((h * self.attention_source).sum(-1)[source] + (h * self.attention_target).sum(-1)[target],
                             0.2)  # [M + N, heads]
        rows = target[:, None].expand_as(score)
        peak = score.new_full((count, self.heads), -torch.inf).scatter_reduce(0, rows, score.detach(), "amax")
        weight = (score - peak[target]).exp()
        weight = weight / weight.new_zeros(count, self.heads).index_add(0, target, weight)[target]
        weight = F.dropout(weight, self.dropout, self.training)
        out = h.new_zeros(count, self.heads, self.width).index_add(0, target, weight[..., None] * h[source])
        return (out.reshape(count, self.heads * self.width) if self.concat else out.mean(1)) + self.bias


class KnowledgeGraphEncoder(nn.Module):
    """Entity vectors [N, width] from trainable `embeddings` [N, width] and the graph's `edges` [2, M] (module doc).

    Args:
        embeddings: initial entity embeddings (TransE; `vlp-data wordnet`'s knowledge.json).
        edges: (head, tail) rows of the triples: messages flow from head to tail (official `edge_index`).
        hidden_width, heads: the first GAT layer (official: 64 x 8 heads).
        dropout: on the inputs of both layers and on their attention weights (official: 0.2).
    """

    def __init__(self, embeddings: Tensor, edges: Tensor, hidden_width: int = 64, heads: int = 8,
                 dropout: float = 0.2) -> None:
        super().__init__()
        width = embeddings.shape[1]
        self.embeddings = nn.Parameter(embeddings.clone().float())
        self.register_buffer("edges", edges.long().reshape(2, -1).clone())
        self.ln = nn.LayerNorm(width)
        self.first = GraphAttention(width, hidden_width, heads, concat=True, dropout=dropout)
        self.second = GraphAttention(hidden_width * heads, width, 1, concat=False, dropout=dropout)
        self.dropout = dropout

    @property
    def num_entities(self) -> int:
        return self.embeddings.shape[0]

    def forward(self) -> Tensor:
        x = F.dropout(self.ln(self.embeddings), self.dropout, self.training)
        x = F.dropout(F.elu(self.first(x, self.edges)), self.dropout, self.training)
        return self.second(x, self.edges)
