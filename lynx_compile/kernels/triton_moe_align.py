"""Routing metadata for the grouped-experts kernels, built on the device in one launch.

From ``topk_ids [T, k]`` (S = T*k (token, slot) pairs) one program computes:
  sorted_pairs [S]      pair indices ``t*k + j`` grouped by expert (ascending expert, then
                        ascending pair): row r of the grouped GEMMs is pair sorted_pairs[r];
  tile_expert  [tiles]  expert of each work tile, -1 for the unused tail (programs exit);
  tile_start/tile_end   the tile's rows [start, end) in sorted order, at most BLOCK_M rows.

An expert with c rows gets ceil(c / BLOCK_M) tiles. A token picks an expert at most once, so
c <= T, and ``max_tiles`` below is a bound from shapes alone: the grids of the GEMM kernels
are static and nothing is read back to the host. Every output element is written exactly
once by one program, so there are no races and no memset launches.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class Routing(NamedTuple):
    sorted_pairs: torch.Tensor
    tile_expert: torch.Tensor
    tile_start: torch.Tensor
    tile_end: torch.Tensor
    block_m: int


def max_tiles(num_tokens: int, top_k: int, num_experts: int, block_m: int) -> int:
    """Upper bound on sum_e ceil(c_e / block_m) over experts e, with sum_e c_e = T*k, c_e <= T."""
    pairs = num_tokens * top_k
    active = min(num_experts, pairs)
    by_rows = (pairs + active * (block_m - 1)) // block_m  # ceil(c/m) <= (c + m - 1) / m
    by_experts = active * triton.cdiv(num_tokens, block_m)
    return max(1, min(by_rows, by_experts))


@triton.jit
def _align_kernel(ids_ptr, sorted_pairs_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
                  num_pairs, num_experts, num_tiles, BLOCK_M: tl.constexpr,
                  BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_TILES: tl.constexpr):
    e = tl.arange(0, BLOCK_E)

    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for p0 in range(0, num_pairs, BLOCK_S):
        p = p0 + tl.arange(0, BLOCK_S)
        ids = tl.load(ids_ptr + p, mask=p < num_pairs, other=-1).to(tl.int32)
        counts += tl.sum((ids[:, None] == e[None, :]).to(tl.int32), axis=0)
    counts = tl.where(e < num_experts, counts, 0)
    row_start = tl.cumsum(counts, axis=0) - counts  # exclusive prefix sums
    row_end = row_start + counts
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    first_tile = tl.cumsum(tiles, axis=0) - tiles

    for i0 in range(0, num_tiles, BLOCK_TILES):
        i = i0 + tl.arange(0, BLOCK_TILES)
        # owner[i, e]: tile i belongs to expert e (at most one e per row).
        owner = (i[:, None] >= first_tile[None, :]) & (i[:, None] < (first_tile + tiles)[None, :])
        found = tl.sum(owner.to(tl.int32), axis=1) > 0
        expert = tl.sum(tl.where(owner, e[None, :], 0), axis=1)
        start = tl.sum(tl.where(owner, row_start[None, :] + (i[:, None] - first_tile[None, :]) * BLOCK_M, 0), axis=1)
        end = tl.minimum(start + BLOCK_M, tl.sum(tl.where(owner, row_end[None, :], 0), axis=1))
        inside = i < num_tiles
        tl.store(tile_expert_ptr + i, tl.where(found, expert, -1), mask=inside)
        tl.store(tile_start_ptr + i, start, mask=inside)
        tl.store(tile_end_ptr + i, end, mask=inside)

    seen = tl.zeros([BLOCK_E], dtype=tl.int32)  # rows already placed per expert
    for p0 in range(0, num_pairs, BLOCK_S):
        p = p0 + tl.arange(0, BLOCK_S)
        ids = tl.load(ids_ptr + p, mask=p < num_pairs, other=-1).to(tl.int32)
        hit = ((ids[:, None] == e[None, :]) & (e[None, :] < num_experts)).to(tl.int32)
        earlier = tl.cumsum(hit, axis=0) - hit  # same-expert pairs before p in this chunk
        position = tl.sum(hit * (row_start + seen)[None, :] + hit * earlier, axis=1)
        placed = tl.sum(hit, axis=1) > 0  # out-of-range ids are dropped, never scattered
        tl.store(sorted_pairs_ptr + position, p, mask=placed)
        seen += tl.sum(hit, axis=0)


def align_routing(topk_ids: torch.Tensor, num_experts: int, block_m: int, workspace=torch.empty) -> Routing:
    """Group the (token, slot) pairs of ``topk_ids [T, k]`` by expert into tiles of ``block_m`` rows."""
    num_tokens, top_k = topk_ids.shape
    num_pairs = num_tokens * top_k
    num_tiles = max_tiles(num_tokens, top_k, num_experts, block_m)
    device = topk_ids.device
    sorted_pairs = workspace((num_pairs,), dtype=torch.int32, device=device)
    tile_expert = workspace((num_tiles,), dtype=torch.int32, device=device)
    tile_start = workspace((num_tiles,), dtype=torch.int32, device=device)
    tile_end = workspace((num_tiles,), dtype=torch.int32, device=device)
    block_e = triton.next_power_of_2(num_experts)
    block_s = max(16, min(triton.next_power_of_2(num_pairs), 8192 // block_e))
    block_tiles = max(16, min(triton.next_power_of_2(num_tiles), 8192 // block_e))
    _align_kernel[(1,)](
        topk_ids.contiguous().view(-1), sorted_pairs, tile_expert, tile_start, tile_end,
        num_pairs, num_experts, num_tiles,
        BLOCK_M=block_m, BLOCK_S=block_s, BLOCK_E=block_e, BLOCK_TILES=block_tiles,
        num_warps=8 if block_e >= 256 else 4,
    )
    return Routing(sorted_pairs, tile_expert, tile_start, tile_end, block_m)
