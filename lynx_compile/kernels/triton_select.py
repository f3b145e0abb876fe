"""The batch-aware expert selector in Triton: four launches, the reference's exact int64 keys.

It chooses exactly the experts ``lynx_compile.selector.reference_route`` chooses for an
ungrouped softmax router (every row a voter) and weighs them by the same rule. One program holds
one token's whole row of E logits (E is padded to a power of two), so E = 256 costs one 256-wide
vector per program.

  1. bins     grid T   shifted bin ``s = ceil(alpha * (L - max L)) clamped to -D, + D``
  2. votes    grid 1+  ``S[e] = sum_t B ** s[t, e]`` in int64 (exact, order-free); clears kept
  3. choose   grid T   key ``s * B ** (D + 1) + S - B ** s``; top-k by (key desc, logit desc,
                       index asc); marks the chosen experts in ``kept`` (all write 1: no race)
  4. reroute  grid T   top-k logits among kept experts (ties to the lower index), weights

Every row votes: B is the row count, known on the host. The kernel therefore cannot leave out
rows that are not live tokens, or rows with NaN / +inf logits, as ``select_experts`` does (one
such row would change every other row's choice), so ``select_experts`` never calls it; on CUDA
compiled graphs get Inductor's code for the fused torch selector. It serves the GPU benchmarks
and stays tested against the reference for finite, all-live batches.

The depth D and ``B ** (D + 1)`` come from the token count alone (``policies.affinity_binning.vote_depth``),
so nothing is read back to the host and every shape is static: the launches can be
captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..policies import get_policy
from ..policies.affinity_binning import vote_depth
from ..selector import check_logits

_MAX_EXPERTS = 8192  # one program holds a whole row

# Outputs and scratch buffers come from here, so tests can poison them.
_workspace = torch.empty


@triton.jit
def _power(base, exponent, depth):
    """``base ** exponent`` in int64 for 0 <= exponent <= depth, 0 where exponent < 0."""
    value = tl.where(exponent >= 0, 1, 0).to(tl.int64)
    for i in range(depth):
        value = tl.where(exponent > i, value * base, value)
    return value


@triton.jit
def _bins_kernel(logits_ptr, shifted_ptr, num_experts, alpha, depth, BLOCK_E: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * num_experts
    e = tl.arange(0, BLOCK_E)
    valid = e < num_experts
    logits = tl.load(logits_ptr + row + e, mask=valid, other=-float("inf"))
    gap = logits - tl.max(logits, axis=0)
    # Same fp32 ops as the reference (sub, mul, ceil), so bin edges fall identically.
    bins = tl.maximum(tl.ceil(gap * alpha), 0.0 - depth)
    tl.store(shifted_ptr + row + e, (bins + depth).to(tl.int32), mask=valid)


@triton.jit
def _votes_kernel(shifted_ptr, votes_ptr, kept_ptr, num_tokens, num_experts, depth,
                  BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    valid = e < num_experts
    total = tl.zeros([BLOCK_E], dtype=tl.int64)
    for t0 in range(0, num_tokens, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        inside = (t[:, None] < num_tokens) & valid[None, :]
        shifted = tl.load(shifted_ptr + t[:, None].to(tl.int64) * num_experts + e[None, :],
                          mask=inside, other=-1)
        total += tl.sum(_power(num_tokens, shifted, depth), axis=0)
    tl.store(votes_ptr + e, total, mask=valid)
    tl.store(kept_ptr + e, tl.zeros([BLOCK_E], dtype=tl.int32), mask=valid)


@triton.jit
def _choose_kernel(logits_ptr, shifted_ptr, votes_ptr, kept_ptr, num_tokens, num_experts, depth,
                   bin_scale, top_k, BLOCK_E: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * num_experts
    e = tl.arange(0, BLOCK_E)
    valid = e < num_experts
    logits = tl.load(logits_ptr + row + e, mask=valid, other=-float("inf"))
    shifted = tl.load(shifted_ptr + row + e, mask=valid, other=0)
    own = _power(num_tokens, shifted, depth)
    others = tl.load(votes_ptr + e, mask=valid, other=0) - own
    key = tl.where(valid, shifted.to(tl.int64) * bin_scale + others, -1)
    taken = e < 0
    for _ in range(top_k):
        free = valid & ~taken
        best_key = tl.max(tl.where(free, key, -1), axis=0)
        tied = free & (key == best_key)
        best_logit = tl.max(tl.where(tied, logits, -float("inf")), axis=0)
        tied = tied & (logits == best_logit)
        pick = tl.min(tl.where(tied, e, BLOCK_E), axis=0)
        taken = taken | (e == pick)
    tl.store(kept_ptr + e, tl.full([BLOCK_E], 1, dtype=tl.int32), mask=taken)


@triton.jit
def _reroute_kernel(logits_ptr, kept_ptr, weights_ptr, ids_ptr, num_experts, top_k,
                    RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    valid = e < num_experts
    logits = tl.load(logits_ptr + token * num_experts + e, mask=valid, other=-float("inf"))
    kept = tl.load(kept_ptr + e, mask=valid, other=0) != 0
    survivors = tl.where(kept, logits, -float("inf"))
    exps = tl.where(valid, tl.exp(logits - tl.max(logits, axis=0)), 0.0)
    probs = exps / tl.sum(exps, axis=0)

    rank = tl.zeros([BLOCK_E], dtype=tl.int32)  # slot of each chosen expert
    chosen = e < 0
    plain = e < 0  # the plain top-k by probability, for the non-renormalised mass
    for j in range(top_k):
        free = valid & ~chosen
        best = tl.max(tl.where(free, survivors, -float("inf")), axis=0)
        pick = tl.min(tl.where(free & (survivors == best), e, BLOCK_E), axis=0)
        chosen = chosen | (e == pick)
        rank = tl.where(e == pick, j, rank)
        if not RENORMALIZE:
            free = valid & ~plain
            top = tl.max(tl.where(free, probs, -1.0), axis=0)
            plain = plain | (e == tl.min(tl.where(free & (probs == top), e, BLOCK_E), axis=0))

    chosen_mass = tl.sum(tl.where(chosen, probs, 0.0), axis=0)
    if RENORMALIZE:
        weights = probs / chosen_mass
    else:
        weights = probs * (tl.sum(tl.where(plain, probs, 0.0), axis=0) / chosen_mass)
    out = token * top_k + rank
    tl.store(weights_ptr + out, weights, mask=chosen)
    tl.store(ids_ptr + out, e.to(tl.int64), mask=chosen)


def select_experts_triton(
    logits: torch.Tensor, top_k: int, alpha: float, beta: int | None, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-aware top-k of fp32 router logits ``[T, E]``: ``(weights fp32, ids int64)``, ``[T, k]``."""
    check_logits(logits, top_k)
    get_policy("lynx").check({"alpha": alpha, "beta": beta})
    num_tokens, num_experts = logits.shape
    if num_experts > _MAX_EXPERTS:
        raise ValueError(f"select_experts_triton holds a row per program: E <= {_MAX_EXPERTS}, got {num_experts}")
    logits = logits.float().contiguous()
    device = logits.device
    weights = _workspace((num_tokens, top_k), dtype=torch.float32, device=device)
    ids = _workspace((num_tokens, top_k), dtype=torch.int64, device=device)
    if num_tokens == 0:
        return weights, ids

    depth = vote_depth(num_tokens, beta)
    block_e = triton.next_power_of_2(num_experts)
    shifted = _workspace((num_tokens, num_experts), dtype=torch.int32, device=device)
    votes = _workspace((num_experts,), dtype=torch.int64, device=device)
    kept = _workspace((num_experts,), dtype=torch.int32, device=device)

    _bins_kernel[(num_tokens,)](logits, shifted, num_experts, float(alpha), depth, BLOCK_E=block_e)
    votes_block_e = min(block_e, 256)
    votes_block_t = max(1, min(triton.next_power_of_2(num_tokens), 4096 // votes_block_e))
    _votes_kernel[(triton.cdiv(num_experts, votes_block_e),)](
        shifted, votes, kept, num_tokens, num_experts, depth,
        BLOCK_T=votes_block_t, BLOCK_E=votes_block_e,
    )
    _choose_kernel[(num_tokens,)](
        logits, shifted, votes, kept, num_tokens, num_experts, depth, num_tokens ** (depth + 1),
        top_k, BLOCK_E=block_e,
    )
    _reroute_kernel[(num_tokens,)](
        logits, kept, weights, ids, num_experts, top_k, RENORMALIZE=bool(renormalize), BLOCK_E=block_e,
    )
    return weights, ids
