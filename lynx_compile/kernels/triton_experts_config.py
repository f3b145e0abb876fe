"""Block sizes for the grouped-experts kernels, chosen from shapes alone (no routing data).

Decode reads weights, so the aim is (1) BLOCK_M >= T, so each expert's rows fit one tile and
its weights are streamed once, and (2) enough programs to keep every SM loading: the
number of active experts is unknown on the host, so min(E, T*k) stands in for it, narrow
N-tiles raise the gate_up program count (its activation epilogue forbids split-K), and the
down projection splits its K = I dimension (partial sums are added by the sum kernel).
Under the CPU interpreter each program step costs milliseconds: few, large blocks.
These are untuned first guesses for Hopper; ``config=`` overrides them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

_SMEM_BUDGET = 160 * 1024  # bytes of pipelined tiles per program; Hopper has 227 KiB


@dataclass(frozen=True)
class ExpertsConfig:
    block_m: int  # rows per tile: at least 16 (tl.dot), ideally >= T
    gate_up_block_n: int  # columns of gate (and as many of up) per program
    gate_up_block_k: int
    down_block_n: int
    down_block_k: int
    split_k: int  # slices of the intermediate dimension in the down projection
    num_warps: int = 4
    num_stages: int = 3

    def check(self) -> None:
        blocks = (self.block_m, self.gate_up_block_n, self.gate_up_block_k, self.down_block_n, self.down_block_k)
        if any(b < 16 or b & (b - 1) for b in blocks):
            raise ValueError(f"block sizes must be powers of two >= 16, got {self}")
        if self.split_k < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"split_k, num_warps and num_stages must be >= 1, got {self}")


def _clamp_pow2(n: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(1, n))))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _stages(block_m: int, block_n: int, block_k: int, weight_tiles: int, elem_bytes: int, wanted: int) -> int:
    per_stage = (block_m * block_k + weight_tiles * block_k * block_n) * elem_bytes
    return max(1, min(wanted, _SMEM_BUDGET // per_stage))


@functools.lru_cache(maxsize=1024)  # called on every launch: keep the host path short
def default_config(
    num_tokens: int, top_k: int, num_experts: int, hidden_size: int, inter_size: int,
    elem_bytes: int, device: torch.device, interpreted: bool,
) -> ExpertsConfig:
    block_m = _clamp_pow2(num_tokens, 16, 64)
    if interpreted:
        return ExpertsConfig(
            block_m=block_m,
            gate_up_block_n=_clamp_pow2(inter_size, 16, 64),
            gate_up_block_k=_clamp_pow2(hidden_size, 16, 128),
            down_block_n=_clamp_pow2(hidden_size, 16, 64),
            down_block_k=_clamp_pow2(inter_size, 16, 128),
            split_k=1,
            num_warps=4,
            num_stages=1,
        )

    target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    experts = min(num_experts, num_tokens * top_k)
    gate_up_block_n = 16
    for block_n in (64, 32):
        if experts * triton.cdiv(inter_size, block_n) >= target:
            gate_up_block_n = block_n
            break
    block_k = 128
    down_block_n = 64
    down_programs = experts * triton.cdiv(hidden_size, down_block_n)
    max_split = max(1, inter_size // (4 * block_k))  # keep >= 4 K-steps per split
    split_k = max(1, min(max_split, triton.cdiv(target, down_programs)))
    stages = min(_stages(block_m, gate_up_block_n, block_k, 2, elem_bytes, 4),
                 _stages(block_m, down_block_n, block_k, 1, elem_bytes, 4))
    return ExpertsConfig(
        block_m=block_m,
        gate_up_block_n=gate_up_block_n,
        gate_up_block_k=block_k,
        down_block_n=down_block_n,
        down_block_k=block_k,
        split_k=split_k,
        num_warps=4,
        num_stages=max(2, stages),
    )
