"""tests/gpt_fast_moe.py sharded by hand across the ranks of the default process group, the way
gpt-fast's mixtral-moe/tp.py does it: every rank keeps its slice of the intermediate dimension
of every expert (w1, w3 along dim 1, w2 along dim 2), and a forward hook sums the ranks' partial
outputs with a functional all_reduce, which dynamo records as ``_c10d_functional.all_reduce``.

``placement``: where the hook goes. ``"after_combine"``: on the MoE layer (the sum of the k
weighted expert outputs is reduced). ``"before_combine"``: on ``cond_ffn``, as in gpt-fast, so
the per-slot expert outputs are reduced before the routing weights are applied.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from gpt_fast_moe import GptFastMoE
from torch import nn
from torch.distributed import _functional_collectives as funcol

PLACEMENTS = ("after_combine", "before_combine")


def _all_reduce_hook(module, inputs, output):
    return funcol.all_reduce(output, "sum", dist.group.WORLD)


def sharded_gpt_fast(placement: str, seed: int = 0) -> tuple[GptFastMoE, GptFastMoE]:
    """(the whole model, this rank's shard of it); every rank builds the same whole model."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    torch.manual_seed(seed)
    whole = GptFastMoE().eval()
    shard = copy.deepcopy(whole)
    rank, world = dist.get_rank(), dist.get_world_size()
    for layer in shard.layers:
        moe = layer.block_sparse_moe
        ffn = moe.cond_ffn
        for name, dim in (("w1", 1), ("w3", 1), ("w2", 2)):
            full = getattr(ffn, name)
            setattr(ffn, name, nn.Parameter(torch.tensor_split(full, world, dim=dim)[rank].clone(), requires_grad=False))
        (moe if placement == "after_combine" else ffn).register_forward_hook(_all_reduce_hook)
    return whole, shard
