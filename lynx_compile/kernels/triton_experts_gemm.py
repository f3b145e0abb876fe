"""The Triton kernels of the grouped experts: gate_up (+activation), down (+weight), the
post-expert norm where the experts have one, sum.

Work tiles come from ``triton_moe_align``: tile ``i`` is up to BLOCK_M rows (token, slot
pairs) of one expert. Weight addressing is by strides, so one kernel serves every layout:
element (k, n) of expert e's gate matrix is ``w_gate[e*stride_e + n*stride_n + k*stride_k]``,
and the up matrix is the same with its own base, expert stride and ``up_offset``; only the
interleaved GPT-OSS layout needs its own code path (the INTERLEAVED constexpr), and the
layout without a gate (GATED=False) skips the up matrix.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ACTIVATION constexpr codes; the host maps the reference's names onto them.
SILU, GELU, GELU_TANH, RELU, SWIGLU_OAI, SILU_CLAMPED, SWIGLU_SOFTCAPPED, RELU2 = 0, 1, 2, 3, 4, 5, 6, 7


@triton.jit
def _dot(a, b, acc, FP32_DOT: tl.constexpr):
    # The CPU interpreter computes bf16 dots as garbage and fp32 weights need IEEE products,
    # so those cases upcast; on the GPU 16-bit operands go to the tensor cores as they are.
    if FP32_DOT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _unary(x, ACTIVATION: tl.constexpr):
    """``f(x)`` in fp32 for the activations that are plain functions."""
    if ACTIVATION == 0:
        out = x * tl.sigmoid(x)
    elif ACTIVATION == 1:
        out = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACTIVATION == 2:
        # 0.5 * (1 + tanh(z)) == sigmoid(2z): no tanh needed, and stable for large |z|.
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        out = x * tl.sigmoid(2.0 * z)
    elif ACTIVATION == 3:
        out = tl.maximum(x, 0.0)
    else:  # RELU2
        out = tl.maximum(x, 0.0)
        out = out * out
    return out


@triton.jit
def _softcap(x, cap):
    # cap * tanh(x / cap), with tanh(y) = 2 * sigmoid(2y) - 1 (tl has no tanh on every backend)
    return (2.0 * tl.sigmoid(2.0 * x / cap) - 1.0) * cap


@triton.jit
def _gated(gate, up, act_p0, act_p1, ACTIVATION: tl.constexpr):
    """The gated activation in fp32 (experts_ref.gated_activation); act_p0, act_p1 are its
    activation_args."""
    if ACTIVATION == 4:  # SWIGLU_OAI: p0 = alpha, p1 = limit
        gate = tl.minimum(gate, act_p1)
        up = tl.minimum(tl.maximum(up, -act_p1), act_p1)
        out = (up + 1.0) * gate * tl.sigmoid(gate * act_p0)
    elif ACTIVATION == 5:  # SILU_CLAMPED: p0 = limit
        gate = tl.minimum(gate, act_p0)
        up = tl.minimum(tl.maximum(up, -act_p0), act_p0)
        out = gate * tl.sigmoid(gate) * up
    elif ACTIVATION == 6:  # SWIGLU_SOFTCAPPED: p0, p1 = the gate's and up's softcaps
        out = _softcap(gate, act_p0) * tl.sigmoid(gate) * _softcap(up, act_p1)
    else:
        out = _unary(gate, ACTIVATION) * up
    return out


@triton.jit
def _tile_rows(tile_start_ptr, tile_end_ptr, tile, BLOCK_M: tl.constexpr):
    rows = tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_M)
    return rows, rows < tl.load(tile_end_ptr + tile)


@triton.jit
def gate_up_kernel(
    x_ptr, w_gate_ptr, w_up_ptr, bias_ptr, inter_ptr,
    sorted_pairs_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
    hidden_size, inter_size, top_k, stride_x_t,
    stride_gate_e, stride_up_e, up_offset, stride_w_n, stride_w_k,
    stride_bias_e, bias_up_offset, stride_bias_n,
    act_p0, act_p1,
    INTERLEAVED: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """inter[row, n] = act(x @ W_gate + b_gate) * (x @ W_up + b_up) for one tile's rows, or
    act(x @ W_up) without a gate (GATED=False: w_gate_ptr holds the up matrix).

    INTERLEAVED (GPT-OSS): gate and up are alternating columns of one matrix, so the program
    streams one contiguous [BLOCK_K, 2*BLOCK_N] tile (stride_w_n is the column stride) and
    splits the accumulator in the epilogue; a stride-2 load per half would defeat vector
    loads and the software pipeline. Otherwise gate and up are two tiles, at their own bases.
    """
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:  # past the active tiles: the grid is sized by an upper bound
        return
    expert = expert.to(tl.int64)
    rows, row_ok = _tile_rows(tile_start_ptr, tile_end_ptr, tile, BLOCK_M)
    tokens = tl.load(sorted_pairs_ptr + rows, mask=row_ok, other=0) // top_k
    x_rows = x_ptr + tokens.to(tl.int64)[:, None] * stride_x_t
    w_dtype = w_gate_ptr.dtype.element_ty
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < inter_size

    if INTERLEAVED:
        c = tl.program_id(1) * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)  # gate0, up0, gate1, ...
        c_ok = c < 2 * inter_size
        w_cols = w_gate_ptr + expert * stride_gate_e + c.to(tl.int64)[None, :] * stride_w_n
        acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
        for k0 in range(0, hidden_size, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < hidden_size
            x = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(w_dtype)
            w = tl.load(w_cols + k.to(tl.int64)[:, None] * stride_w_k, mask=k_ok[:, None] & c_ok[None, :], other=0.0)
            acc = _dot(x, w, acc, FP32_DOT)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + expert * stride_bias_e + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        acc_gate, acc_up = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N, 2]))
    else:
        w_cols = n.to(tl.int64)[None, :] * stride_w_n
        gate_cols = w_gate_ptr + expert * stride_gate_e + w_cols
        up_cols = w_up_ptr + expert * stride_up_e + up_offset + w_cols
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # stays 0 without a gate
        for k0 in range(0, hidden_size, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < hidden_size
            x = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(w_dtype)
            w_rows = k.to(tl.int64)[:, None] * stride_w_k
            w_ok = k_ok[:, None] & n_ok[None, :]
            acc_gate = _dot(x, tl.load(gate_cols + w_rows, mask=w_ok, other=0.0), acc_gate, FP32_DOT)
            if GATED:
                acc_up = _dot(x, tl.load(up_cols + w_rows, mask=w_ok, other=0.0), acc_up, FP32_DOT)
        if HAS_BIAS:
            bias = bias_ptr + expert * stride_bias_e + n * stride_bias_n
            acc_gate += tl.load(bias, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            acc_up += tl.load(bias + bias_up_offset, mask=n_ok, other=0.0).to(tl.float32)[None, :]

    if GATED:
        hidden = _gated(acc_gate, acc_up, act_p0, act_p1, ACTIVATION)
    else:
        hidden = _unary(acc_gate, ACTIVATION)
    out = inter_ptr + rows.to(tl.int64)[:, None] * inter_size + n[None, :]
    tl.store(out, hidden.to(inter_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def down_kernel(
    inter_ptr, w_ptr, bias_ptr, routed_ptr, partial_ptr,
    sorted_pairs_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
    hidden_size, inter_size, num_pairs, k_per_split,
    stride_w_e, stride_w_n, stride_w_k, stride_bias_e,
    HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """partial[split, pair, n] = routed[pair] * (inter @ W_down (+ b_down in split 0)) over
    the split's slice of the intermediate dimension."""
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:
        return
    expert = expert.to(tl.int64)
    rows, row_ok = _tile_rows(tile_start_ptr, tile_end_ptr, tile, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows, mask=row_ok, other=0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < hidden_size
    split = tl.program_id(2)
    k_begin = split * k_per_split
    k_stop = tl.minimum(k_begin + k_per_split, inter_size)

    a_rows = inter_ptr + rows.to(tl.int64)[:, None] * inter_size
    w_cols = w_ptr + expert * stride_w_e + n.to(tl.int64)[None, :] * stride_w_n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_stop, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_stop
        a = tl.load(a_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + k.to(tl.int64)[:, None] * stride_w_k, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a, w, acc, FP32_DOT)

    if HAS_BIAS:
        if split == 0:  # once per output: only the first split adds it
            acc += tl.load(bias_ptr + expert * stride_bias_e + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc *= tl.load(routed_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out = partial_ptr + (split * num_pairs + pairs).to(tl.int64)[:, None] * hidden_size + n[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def post_norm_kernel(partial_ptr, ids_ptr, routed_ptr, scale_ptr, hidden_size, num_pairs, num_splits, num_experts,
                     eps, ROUND: tl.constexpr, BLOCK_H: tl.constexpr):
    """partial[0, pair] = routed[pair] * norm(sum over splits s of partial[s, pair]), one program per
    pair: MuseSpark's input-scaled RMS norm (experts_ref.post_norm_rows), z = r(y * scale),
    r(z * rsqrt(mean(z^2) + eps)), r() rounding to the dtype ROUND. Pairs of no expert here (the
    expert-parallel sentinel) were never computed: skipped, as the sum skips them."""
    pair = tl.program_id(0).to(tl.int64)
    expert = tl.load(ids_ptr + pair)
    if (expert < 0) | (expert >= num_experts):
        return
    n = tl.arange(0, BLOCK_H)
    n_ok = n < hidden_size
    y = tl.zeros([BLOCK_H], dtype=tl.float32)
    for s in range(num_splits):
        y += tl.load(partial_ptr + (s * num_pairs + pair) * hidden_size + n, mask=n_ok, other=0.0)
    z = (y * tl.load(scale_ptr + n, mask=n_ok, other=0.0)).to(ROUND).to(tl.float32)
    inv = tl.rsqrt(tl.sum(z * z, axis=0) / hidden_size + eps)
    out = (z * inv).to(ROUND).to(tl.float32) * tl.load(routed_ptr + pair).to(tl.float32)
    tl.store(partial_ptr + pair * hidden_size + n, out, mask=n_ok)


@triton.jit
def sum_slots_kernel(partial_ptr, ids_ptr, out_ptr, hidden_size, num_pairs, top_k, num_splits, num_experts,
                     BLOCK_H: tl.constexpr):
    """out[t] = sum over slots j, then splits s, of partial[s, t*k + j]: a fixed order, no atomics.
    Slots whose id is not an expert here (the expert-parallel sentinel) were never computed: skipped."""
    token = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    n_ok = n < hidden_size
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in range(top_k):
        expert = tl.load(ids_ptr + token * top_k + j)
        width = tl.where((expert >= 0) & (expert < num_experts), hidden_size, 0)  # 0: nothing to read
        for s in range(num_splits):
            row = s * num_pairs + token * top_k + j
            acc += tl.load(partial_ptr + row * hidden_size + n, mask=n < width, other=0.0)
    tl.store(out_ptr + token * hidden_size + n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)
