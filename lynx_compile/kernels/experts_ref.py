"""Reference MLP experts: the plain, obviously-correct definition in fp32.

Every experts kernel (CPU, Triton) is tested against this. It gathers one weight matrix per
(token, slot), so it reads T*k matrices: fine for tests, never for speed.

Layouts (how the expert weights are stored):
  gate_up_concat         transformers' default: w_gate_up [E, 2I, H] (gate rows, then up
                         rows) and w_down [E, H, I], both nn.Linear layout (y = x @ W.T).
  gate_up_concat_t       the same transposed: w_gate_up [E, H, 2I] (gate columns, then up
                         columns) and w_down [E, I, H] (y = x @ W) (Aria).
  gate_up_interleaved_t  GPT-OSS: w_gate_up [E, H, 2I] with gate/up in alternating columns
                         and w_down [E, I, H] (y = x @ W), optional biases [E, 2I] / [E, H].
  gate_up_split          gpt-fast: gate w_gate_up [E, I, H], up w_up [E, I, H], w_down [E, H, I].
  up_only                no gate (transformers' ``has_gate=False``, NemotronH): w_gate_up holds the
                         up projection [E, I, H], w_down [E, H, I]; out = down(act(up(x))).
Expert ids: ``0 <= id < E``, or ``E`` (the sentinel of expert parallelism: the slot's expert lives
on another rank; the slot adds nothing).
Activations of the gated layouts, with their activation_args:
  silu / gelu / gelu_tanh / relu   f(gate) * up                                         []
  swiglu_oai        GPT-OSS, MiniMax-M3: (clamp(up, -l, l) + 1) * g * sigmoid(alpha * g),
                    g = clamp(gate, max=l)                                              [alpha, l]
  silu_clamped      HY-V4: silu(clamp(gate, max=l)) * clamp(up, -l, l)                  [l]
  swiglu_softcapped Inkling2: cap(gate, a) * sigmoid(gate) * cap(up, b),
                    cap(x, c) = c * tanh(x / c)                                         [a, b]
Activations of the up_only layout: act(up) for silu / gelu / gelu_tanh / relu, and relu2
(relu(x) ** 2), none taking activation_args.
Post-expert norms (transformers' ``has_post_expert_norm``): applied to each (token, slot) output row
y before its routing weight, with the norm's weight w [H] and post_norm_args:
  none              y                                                                   []
  input_scaled_rms  MuseSpark: z = r(y * (1 + w)), out = r(z * rsqrt(mean(z ** 2) + eps)), [eps]
                    r() rounding to the hidden dtype and 1 + w added in w's dtype, as transformers does
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LAYOUTS = ("gate_up_concat", "gate_up_concat_t", "gate_up_interleaved_t", "gate_up_split", "up_only")
_TRANSPOSED = ("gate_up_concat_t", "gate_up_interleaved_t")  # weights stored [E, in, out]: y = x @ W
_UNARY = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
# Gated activations with constants: their activation_args, by name.
_GATED_ARGS = {
    "swiglu_oai": ("alpha", "limit"),
    "silu_clamped": ("limit",),
    "swiglu_softcapped": ("gate_softcap", "up_softcap"),
}
GATED_ACTIVATIONS = (*_UNARY, *_GATED_ARGS)
UNGATED_ACTIVATIONS = (*_UNARY, "relu2")
ACTIVATIONS = (*GATED_ACTIVATIONS, "relu2")
POST_NORMS = {"none": (), "input_scaled_rms": ("eps",)}  # name: its post_norm_args


def activation_arg_names(activation: str) -> tuple[str, ...]:
    return _GATED_ARGS.get(activation, ())


def _softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str, args: list[float]) -> torch.Tensor:
    if activation == "swiglu_oai":
        alpha, limit = args
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    if activation == "silu_clamped":
        (limit,) = args
        return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)
    if activation == "swiglu_softcapped":
        gate_cap, up_cap = args
        return _softcap(gate, gate_cap) * torch.sigmoid(gate) * _softcap(up, up_cap)
    return _UNARY[activation](gate) * up


def ungated_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu2":
        return F.relu(x).square()
    return _UNARY[activation](x)


def check_experts_args(w_gate_up, w_down, w_up, b_gate_up, b_down, activation, layout, args) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown experts layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    valid = UNGATED_ACTIVATIONS if layout == "up_only" else GATED_ACTIVATIONS
    if activation not in valid:
        kind = "an ungated" if layout == "up_only" else "a gated"
        raise ValueError(f"unknown activation {activation!r} for {kind} layout ({layout!r}); valid: {', '.join(valid)}")
    names = activation_arg_names(activation)
    if len(args) != len(names):
        raise ValueError(f"activation {activation!r} takes {'[' + ', '.join(names) + ']' if names else 'no'} "
                         f"activation_args, got {args}")
    if activation == "swiglu_softcapped" and not all(cap > 0 for cap in args):
        raise ValueError(f"activation 'swiglu_softcapped' needs positive softcaps, got {args}")
    if (layout == "gate_up_split") != (w_up is not None):
        raise ValueError(f"layout {layout!r} {'needs' if layout == 'gate_up_split' else 'takes no'} w_up")
    if layout != "gate_up_interleaved_t" and (b_gate_up is not None or b_down is not None):
        raise ValueError(f"layout {layout!r} takes no biases")


def check_post_norm(post_norm, weight, args, hidden_size) -> tuple[str, torch.Tensor | None, list[float]]:
    """The post-expert norm's name, weight ([H] floats, only with a norm) and post_norm_args
    (None: none), checked; returned as the kernels take it: (name, fp32 scale 1 + w or None, args)."""
    args = list(args or ())
    if post_norm not in POST_NORMS:
        raise ValueError(f"unknown post-expert norm {post_norm!r}; valid: {', '.join(POST_NORMS)}")
    names = POST_NORMS[post_norm]
    if len(args) != len(names):
        raise ValueError(f"post-expert norm {post_norm!r} takes {'[' + ', '.join(names) + ']' if names else 'no'} "
                         f"post_norm_args, got {args}")
    if post_norm == "none":
        if weight is not None:
            raise ValueError("post_norm_weight given without a post-expert norm")
        return post_norm, None, args
    if weight is None or weight.dim() != 1 or weight.shape[0] != hidden_size or not weight.dtype.is_floating_point:
        got = None if weight is None else f"{weight.dtype} {tuple(weight.shape)}"
        raise ValueError(f"post-expert norm {post_norm!r} needs a float [{hidden_size}] post_norm_weight, got {got}")
    if not args[0] >= 0:
        raise ValueError(f"post-expert norm {post_norm!r} needs eps >= 0, got {args[0]}")
    return post_norm, post_norm_scale(weight), args


def post_norm_scale(weight: torch.Tensor) -> torch.Tensor:
    """``1 + w`` in w's dtype (rounded there, as transformers adds it), as fp32."""
    return (1.0 + weight).float()


def post_norm_rows(rows: torch.Tensor, post_norm: str, scale: torch.Tensor | None, args, dtype: torch.dtype,
                   ) -> torch.Tensor:
    """The post-expert norm of fp32 output rows [N, H], fp32, rounded to ``dtype`` where transformers rounds."""
    if post_norm == "none":
        return rows
    (eps,) = args
    z = (rows * scale).to(dtype).float()
    return (z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)).to(dtype).float()


def check_call_shapes(hidden, topk_ids, topk_weights, w_gate_up, b_gate_up, b_down, hidden_size, inter_size) -> None:
    """The shapes and dtypes of one experts call's tokens, routing and biases (every kernel checks them)."""
    if hidden.dim() != 2 or hidden.shape[1] != hidden_size or not hidden.dtype.is_floating_point:
        raise ValueError(f"hidden must be a float [T, {hidden_size}] tensor, got {hidden.dtype} {tuple(hidden.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0] or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32/int64 [T, k] with T = {hidden.shape[0]}, got {topk_ids.dtype} {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} must match topk_ids {tuple(topk_ids.shape)}")
    num_experts = w_gate_up.shape[0]
    if b_gate_up is not None and tuple(b_gate_up.shape) != (num_experts, 2 * inter_size):
        raise ValueError(f"b_gate_up must be {(num_experts, 2 * inter_size)}, got {tuple(b_gate_up.shape)}")
    if b_down is not None and tuple(b_down.shape) != (num_experts, hidden_size):
        raise ValueError(f"b_down must be {(num_experts, hidden_size)}, got {tuple(b_down.shape)}")


def check_expert_ids(topk_ids: torch.Tensor, num_experts: int) -> None:
    """Ids must name one of the ``num_experts`` experts, or be the sentinel ``num_experts``."""
    if topk_ids.numel() and (int(topk_ids.min()) < 0 or int(topk_ids.max()) > num_experts):
        raise ValueError(f"expert ids must be in [0, {num_experts}] ({num_experts}: an expert on another rank), "
                         f"got ids in [{int(topk_ids.min())}, {int(topk_ids.max())}]")


def _project(x: torch.Tensor, w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``x @ W.T`` (nn.Linear layout) or ``x @ W`` (transposed), one matrix ``w[i]`` per row."""
    if transposed:
        return (x.unsqueeze(-2) @ w).squeeze(-2)
    return (w @ x.unsqueeze(-1)).squeeze(-1)


def expert_mlp(x, w_gate_up, w_down, w_up, b_gate_up, b_down, activation, layout, args, project=_project):
    """The expert MLP on rows ``x``, in ``x``'s dtype. ``project(rows, w, transposed)`` applies
    the weights: by default 3-D weights hold one matrix per row; biases are per row."""
    transposed = layout in _TRANSPOSED
    gate_up = project(x, w_gate_up, transposed)
    if b_gate_up is not None:
        gate_up = gate_up + b_gate_up
    if layout == "up_only":
        hidden = ungated_activation(gate_up, activation)
    else:
        if layout == "gate_up_interleaved_t":
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        elif layout == "gate_up_split":
            gate, up = gate_up, project(x, w_up, transposed)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
        hidden = gated_activation(gate, up, activation, args)
    out = project(hidden.contiguous(), w_down, transposed)
    return out + b_down if b_down is not None else out


def grouped_experts_reference(
    hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up=None, b_gate_up=None, b_down=None,
    activation="silu", layout="gate_up_concat", activation_args=(), post_norm_weight=None, post_norm="none",
    post_norm_args=(),
) -> torch.Tensor:
    check_experts_args(w_gate_up, w_down, w_up, b_gate_up, b_down, activation, layout, list(activation_args))
    post_norm, scale, post_norm_args = check_post_norm(post_norm, post_norm_weight, post_norm_args, hidden.shape[-1])
    num_experts = w_gate_up.shape[0]
    check_expert_ids(topk_ids, num_experts)
    x = hidden.float()
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)

    def pick(w, e):
        return None if w is None else w[e].float()

    for slot in range(topk_ids.shape[1]):
        sentinel = topk_ids[:, slot] == num_experts
        e = topk_ids[:, slot].clamp(max=num_experts - 1)
        y = expert_mlp(x, pick(w_gate_up, e), pick(w_down, e), pick(w_up, e), pick(b_gate_up, e),
                       pick(b_down, e), activation, layout, list(activation_args))
        y = post_norm_rows(y, post_norm, scale, post_norm_args, hidden.dtype)
        out += torch.where(sentinel[:, None], 0.0, topk_weights[:, slot, None].float() * y)
    return out.to(hidden.dtype)
