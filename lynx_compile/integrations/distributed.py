"""lynx on sharded models (torch.distributed): check that every rank routed alike.

Under tensor and expert parallelism every rank runs the router on the same replicated hidden
states and the selector on the same logits, so every rank must choose the same experts: a rank
that chose differently would compute other experts' partial outputs and the all-reduce would sum
parts of different models. lynx's selector is deterministic (exact integer scores, ties to the
lower expert index), so the choices agree whenever the router logits agree bit for bit; this
module checks both after the fact:

    with lynx_compile.capture_routing() as cap:
        compiled(**batch)
    check_same_routing(cap)          # on every rank of the group; raises on the first difference
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..capture import RoutingCapture


def _gather(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def check_same_routing(capture: RoutingCapture, group=None) -> int:
    """Raise ``RuntimeError`` unless every rank of ``group`` captured the same routing calls with
    bitwise equal router logits and expert ids; return the number of calls compared.

    A collective: every rank of ``group`` must call it, after the same forward passes.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("check_same_routing needs an initialised torch.distributed process group")
    rank = dist.get_rank(group)
    counts = _gather(torch.tensor([len(capture.routing)]), group)
    if len({int(c) for c in counts}) != 1:
        raise RuntimeError(f"ranks captured different numbers of routing calls: {[int(c) for c in counts]}")
    for call, event in enumerate(capture.routing):
        shapes = _gather(torch.tensor(list(event.logits.shape) + list(event.ids.shape)), group)
        if any(not torch.equal(s, shapes[rank]) for s in shapes):
            raise RuntimeError(f"routing call {call}: ranks saw different shapes {[s.tolist() for s in shapes]}")
        for what, tensor in (("router logits", event.logits), ("expert ids", event.ids)):
            parts = _gather(tensor, group)
            differing = [r for r, part in enumerate(parts) if not torch.equal(part, parts[0])]
            if differing:
                rows = int((parts[differing[0]] != parts[0]).reshape(parts[0].shape[0], -1).any(-1).sum())
                raise RuntimeError(
                    f"routing call {call}: rank {differing[0]}'s {what} differ from rank 0's in {rows} token(s); "
                    "every rank must run the router on the same batch, with the same dtype, kernels and lynx options")
    return len(capture.routing)


__all__ = ["check_same_routing"]
