"""The transformers experts paths we compare against, on one layer's weights.

``hf_paths`` returns callables ``(hidden, ids, weights) -> out`` for transformers' default
``grouped_mm`` experts forward and for its eager per-expert loop. It calls the installed
transformers' own functions on a bare experts module when it can (the real ops, whatever the
version does), and otherwise falls back to the emulations below, which restate the ops of
transformers 5.24's ``grouped_mm_experts_forward`` and ``MixtralExperts.forward``. The
returned ``source`` says which one ran.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ACT = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


def _grouped_mm(x, w, offs):
    mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return mm(x.to(w.dtype), w, offs=offs)


def _gate(layer, gate_up):
    if layer.activation == "swiglu_oai":
        alpha, limit = layer.activation_args
        gate = gate_up[..., ::2].clamp(max=limit)
        up = gate_up[..., 1::2].clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    gate, up = gate_up.chunk(2, dim=-1)
    return _ACT[layer.activation](gate) * up


def emulated_grouped_mm(layer, hidden, ids, weights):
    """transformers' grouped_mm experts forward: sort by expert, two grouped GEMMs, unsort, sum."""
    num_tokens, top_k = ids.shape
    expert_ids, perm = torch.sort(ids.reshape(-1))
    x = hidden[perm // top_k]
    counts_in = expert_ids.float() if hidden.device.type == "cpu" else expert_ids.int()
    counts = torch.histc(counts_in, bins=layer.num_experts, min=0, max=layer.num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    transposed = layer.layout == "gate_up_interleaved_t"
    w1 = layer.w_gate_up if transposed else layer.w_gate_up.transpose(-2, -1)
    y = _grouped_mm(x, w1, offsets)
    if layer.b_gate_up is not None:
        y = y + layer.b_gate_up[expert_ids]
    w2 = layer.w_down if transposed else layer.w_down.transpose(-2, -1)
    y = _grouped_mm(_gate(layer, y), w2, offsets)
    if layer.b_down is not None:
        y = y + layer.b_down[expert_ids]
    y = y * weights.reshape(-1)[perm].unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return y[inverse].view(num_tokens, top_k, -1).sum(dim=1).to(hidden.dtype)


def emulated_eager(layer, hidden, ids, weights):
    """transformers' eager experts forward: a Python loop over the experts that got tokens."""
    out = torch.zeros_like(hidden)
    mask = F.one_hot(ids, num_classes=layer.num_experts).permute(2, 1, 0)
    transposed = layer.layout == "gate_up_interleaved_t"
    for expert in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero():
        e = expert[0]
        slot, token = torch.where(mask[e])
        x = hidden[token]
        gate_up = x @ layer.w_gate_up[e] if transposed else F.linear(x, layer.w_gate_up[e])
        if layer.b_gate_up is not None:
            gate_up = gate_up + layer.b_gate_up[e]
        act = _gate(layer, gate_up)
        y = act @ layer.w_down[e] if transposed else F.linear(act, layer.w_down[e])
        if layer.b_down is not None:
            y = y + layer.b_down[e]
        out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
    return out


class _Config:
    _experts_implementation = "grouped_mm"


def _hf_module(layer):
    """A bare instance of the model's transformers experts class holding ``layer``'s tensors."""
    import importlib

    module_name, class_name = layer.hf_class.rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), class_name)
    m = cls.__new__(cls)
    torch.nn.Module.__init__(m)
    m.config = _Config()
    m.num_experts = layer.num_experts
    m.hidden_dim = m.hidden_size = layer.hidden_size
    m.intermediate_dim = m.intermediate_size = layer.inter_size
    m.gate_up_proj = torch.nn.Parameter(layer.w_gate_up, requires_grad=False)
    m.down_proj = torch.nn.Parameter(layer.w_down, requires_grad=False)
    has_bias = layer.b_gate_up is not None
    if has_bias:
        m.gate_up_proj_bias = torch.nn.Parameter(layer.b_gate_up, requires_grad=False)
        m.down_proj_bias = torch.nn.Parameter(layer.b_down, requires_grad=False)
    if layer.activation == "swiglu_oai":
        m.alpha, m.limit = layer.activation_args
    else:
        m.act_fn = _ACT[layer.activation]
    # What transformers' use_experts_implementation decorator sets in __init__.
    m.has_gate, m.has_bias, m.has_post_expert_norm, m._is_expert_parallel = True, has_bias, False, False
    m.is_transposed = layer.layout == "gate_up_interleaved_t"
    m.is_concatenated = layer.layout == "gate_up_concat"
    return m, cls


def hf_paths(layer, hidden, ids, weights, force_emulation=False):
    """``{"grouped_mm": fn, "eager": fn}`` and ``{"grouped_mm": source, "eager": source}``."""
    emulated = {
        "grouped_mm": lambda h, i, w: emulated_grouped_mm(layer, h, i, w),
        "eager": lambda h, i, w: emulated_eager(layer, h, i, w),
    }
    sources = dict.fromkeys(emulated, "emulated")
    if force_emulation:
        return emulated, sources
    try:
        from transformers.integrations.moe import grouped_mm_experts_forward

        module, cls = _hf_module(layer)
        eager_forward = getattr(cls.forward, "__wrapped__", cls.forward)
        real = {
            "grouped_mm": lambda h, i, w: grouped_mm_experts_forward(module, h, i, w),
            "eager": lambda h, i, w: eager_forward(module, h, i, w),
        }
    except Exception as error:  # another transformers version: keep the emulation
        print(f"  transformers experts unavailable ({type(error).__name__}: {error}); emulating")
        return emulated, sources
    for name, fn in real.items():
        try:
            got, want = fn(hidden, ids, weights), emulated[name](hidden, ids, weights)
            if (got.float() - want.float()).abs().max() <= 0.05 * want.float().abs().max() + 1e-3:
                emulated[name], sources[name] = fn, "transformers"
            else:
                print(f"  transformers {name} disagrees with the emulation; emulating")
        except Exception as error:
            print(f"  transformers {name} failed ({type(error).__name__}: {error}); emulating")
    return emulated, sources
