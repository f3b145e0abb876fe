"""A gpt-fast style MoE language model (pytorch-labs/gpt-fast, mixtral-moe/model.py): the
experts are three [E, ., .] parameters indexed by the expert ids and applied with einsum."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConditionalFeedForward(nn.Module):
    def __init__(self, num_experts: int, dim: int, intermediate: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(num_experts, intermediate, dim) / dim**0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, dim, intermediate) / intermediate**0.5)
        self.w3 = nn.Parameter(torch.randn(num_experts, intermediate, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, expert_indices: torch.Tensor) -> torch.Tensor:
        w1_weights = self.w1[expert_indices]  # [T, A, I, D]
        w3_weights = self.w3[expert_indices]
        w2_weights = self.w2[expert_indices]  # [T, A, D, I]
        x1 = F.silu(torch.einsum("ti,taoi -> tao", x, w1_weights))
        x3 = torch.einsum("ti, taoi -> tao", x, w3_weights)
        return torch.einsum("tao, taio -> tai", (x1 * x3), w2_weights)


class MOEFeedForward(nn.Module):
    def __init__(self, num_experts: int, top_k: int, dim: int, intermediate: int):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.cond_ffn = ConditionalFeedForward(num_experts, dim, intermediate)
        self.dim = dim
        self.num_activated_experts = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, self.dim)
        scores = self.gate(x)
        expert_weights = F.softmax(scores, dim=-1)
        expert_weights, expert_indices = torch.topk(expert_weights, self.num_activated_experts, dim=-1)
        expert_weights /= expert_weights.sum(dim=-1, keepdim=True)
        expert_outs = self.cond_ffn(x, expert_indices)
        return torch.einsum("tai,ta -> ti", expert_outs, expert_weights)


class Block(nn.Module):
    def __init__(self, **moe):
        super().__init__()
        self.norm = nn.RMSNorm(moe["dim"])
        self.block_sparse_moe = MOEFeedForward(**moe)

    def forward(self, x):
        batch, seq, dim = x.shape
        return x + self.block_sparse_moe(self.norm(x)).view(batch, seq, dim)


class GptFastMoE(nn.Module):
    def __init__(self, vocab=96, dim=48, intermediate=40, num_experts=8, top_k=2, layers=2, router_scale=20.0,
                 seq_first=False):
        super().__init__()
        self.seq_first = seq_first  # Megatron-style activations [seq, batch, dim] between the layers
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            Block(num_experts=num_experts, top_k=top_k, dim=dim, intermediate=intermediate) for _ in range(layers)
        )
        self.output = nn.Linear(dim, vocab, bias=False)
        with torch.no_grad():
            for layer in self.layers:
                layer.block_sparse_moe.gate.weight.mul_(router_scale)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(idx)
        x = x.transpose(0, 1) if self.seq_first else x
        for layer in self.layers:
            x = layer(x)
        return self.output(x.transpose(0, 1) if self.seq_first else x)
