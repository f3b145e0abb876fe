"""The model ``benchmarks/decode.py`` times, and how its routers are made realistic.

Model: a transformers MoE causal LM built from a config (no downloads) whose MoE layers have
the shape of a real model (OLMoE-1B-7B or Qwen3-30B-A3B: hidden size, expert size, E, k, the
router's weight rule), with a few layers, a small attention (few heads) and a small vocabulary,
so that nearly all weight bytes are expert bytes and a decode step's cost is the experts it reads.

Routers. A freshly initialised router gives logits whose spread over the experts is set by the
init scale, not by training; random hidden states also make every token route independently.
We match the *spread* of a trained router: the per-token standard deviation of the router
logits over the experts (population std, averaged over tokens and layers), measured in decode
steps. The reference, in order of preference (``reference_router_stats``):

1. ``models/lynx-tiny-moe`` (the project's trained model) when its weights exist: its router
   logits on held-out text (the first bytes of the held-out standard-library files it lists),
   teacher-forced, so each position is what a decode step of that text would see;
2. otherwise (the documented fallback) the last held-out evaluation in that model's
   ``train_log.jsonl``: it logs the mean top-1 router probability per layer but not the std, so
   the std is the one that gives Gaussian logits over the trained model's E experts that mean
   top-1 probability (solved numerically);
3. otherwise a fixed std of ``FALLBACK_STD``.

Each layer's router weight is then scaled (the routers are bias-free linear maps, so logits
scale exactly) until that layer's decode-step logit std equals the target; a few passes settle
the layers' interaction. The resulting top-1 probability, entropy, top-k mass and expert-load
imbalance are measured and reported next to the reference's.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "models" / "lynx-tiny-moe"
FALLBACK_STD = 1.5  # used only when neither the trained model nor its training log exists
GAP_RANKS = (2, 4, 8)


@dataclass(frozen=True)
class MoeShape:
    name: str
    family: str  # "olmoe" | "qwen3_moe" | "llama4"
    hidden: int
    inter: int  # expert intermediate size
    experts: int
    top_k: int
    norm_topk_prob: bool
    scoring: str = "softmax"  # the router's scores: "softmax" or "sigmoid" (Llama-4: of the top-k logits)
    # (batch, prompt length, decode steps) of the eager probes that scale the routers: smaller for
    # Llama-4, whose eager forward runs every expert on every token
    probe: tuple[int, int, int] = (32, 16, 4)


SHAPES = {
    "olmoe": MoeShape("OLMoE-1B-7B", "olmoe", 2048, 1024, 64, 8, False),
    "qwen3": MoeShape("Qwen3-30B-A3B", "qwen3_moe", 2048, 768, 128, 8, True),
    # Llama-4 Scout's MoE layers: top-1 of 16 experts, sigmoid weight, a shared expert of the
    # same size in every MoE layer (transformers' dense form: every expert runs on every token)
    "llama4": MoeShape("Llama-4-Scout-17B-16E", "llama4", 5120, 8192, 16, 1, False, scoring="sigmoid",
                       probe=(8, 4, 2)),
}
QUICK_HIDDEN, QUICK_INTER = 256, 128  # --quick: same E, k and router rule, tiny experts


def build_model(shape: MoeShape, layers: int, dtype: torch.dtype, heads: int, head_dim: int,
                vocab: int, hidden: int | None = None, inter: int | None = None, seed: int = 0):
    """A random MoE causal LM with ``shape``'s MoE layers (``hidden``/``inter`` override sizes)."""
    from transformers import AutoModelForCausalLM, Llama4TextConfig, OlmoeConfig, Qwen3MoeConfig

    hidden = hidden or shape.hidden
    inter = inter or shape.inter
    common = dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, num_experts=shape.experts, num_experts_per_tok=shape.top_k,
        norm_topk_prob=shape.norm_topk_prob, max_position_embeddings=4096, pad_token_id=0,
        eos_token_id=None, bos_token_id=None, tie_word_embeddings=False,
    )
    if shape.family == "olmoe":  # OLMoE's experts use intermediate_size; head_dim = hidden / heads
        config = OlmoeConfig(intermediate_size=inter, **common)
    elif shape.family == "llama4":  # every layer a MoE layer; experts and shared expert of size inter
        common["num_local_experts"] = common.pop("num_experts")
        common.pop("norm_topk_prob")
        # Full attention in every layer: a chunked-attention layer's static cache keeps its length
        # as a Python int, which recompiles every decode position (and the attention is small here)
        config = Llama4TextConfig(intermediate_size=inter, intermediate_size_mlp=inter, head_dim=head_dim,
                                  interleave_moe_layer_step=1, layer_types=["full_attention"] * layers, **common)
    else:
        config = Qwen3MoeConfig(moe_intermediate_size=inter, intermediate_size=4 * inter, head_dim=head_dim,
                                decoder_sparse_step=1, mlp_only_layers=[], **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def experts_modules(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "num_experts")]


def router_modules(model) -> list[torch.nn.Module]:
    """The routers (``mlp.gate``, Llama-4's ``feed_forward.router``: a bias-free linear map to one
    logit per expert), in layer order."""
    return [m for name, m in model.named_modules()
            if name.endswith(("mlp.gate", "feed_forward.router")) and hasattr(m, "weight")]


def router_logits(module: torch.nn.Module, output) -> torch.Tensor:
    """A router's logits from its forward's output (Llama-4's router returns (scores, logits))."""
    if type(module).__name__ == "Llama4Router":
        return output[1]
    return output[0] if isinstance(output, (tuple, list)) else output


def weight_bytes(model) -> dict:
    """Bytes of expert weights (per expert, per layer, all layers) and of everything else."""
    experts = experts_modules(model)
    per_layer = sum(p.numel() * p.element_size() for p in experts[0].parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(per_expert=per_layer // experts[0].num_experts, per_layer=per_layer,
                experts_total=per_layer * len(experts), other=total - per_layer * len(experts),
                moe_layers=len(experts))


# --- router statistics --------------------------------------------------------------------

@dataclass
class RouterStats:
    """Spread of router logits over the experts, per layer (means over tokens)."""

    source: str
    num_experts: int
    top_k: int
    tokens: int
    logit_std: list[float]  # per-token population std over experts
    top1_prob: list[float]  # softmax probability of the best expert
    entropy: list[float]  # nats; uniform = log(E)
    topk_mass: list[float]  # probability mass of the plain top-k
    load_cv: list[float]  # coefficient of variation of top-k assignments over experts
    gaps: list[list[float]] = field(default_factory=list)  # best logit minus the 2nd, 4th, 8th best
    notes: list[str] = field(default_factory=list)

    @staticmethod
    def from_logits(source: str, per_layer: list[torch.Tensor], top_k: int) -> RouterStats:
        stats = dict(logit_std=[], top1_prob=[], entropy=[], topk_mass=[], load_cv=[], gaps=[])
        for logits in per_layer:
            logits = logits.float()
            probs = logits.softmax(-1)
            stats["logit_std"].append(logits.std(dim=-1, correction=0).mean().item())
            stats["top1_prob"].append(probs.max(-1).values.mean().item())
            stats["entropy"].append(-(probs * probs.clamp_min(1e-30).log()).sum(-1).mean().item())
            stats["topk_mass"].append(probs.topk(top_k, dim=-1).values.sum(-1).mean().item())
            load = torch.bincount(logits.topk(top_k, dim=-1).indices.reshape(-1), minlength=logits.shape[1]).float()
            stats["load_cv"].append((load.std(correction=0) / load.mean()).item())
            top = logits.topk(min(8, logits.shape[1]), dim=-1).values
            stats["gaps"].append([(top[:, 0] - top[:, r - 1]).mean().item() for r in GAP_RANKS if r <= top.shape[1]])
        tokens = per_layer[0].shape[0] if per_layer else 0
        return RouterStats(source, per_layer[0].shape[1], top_k, tokens, **stats)

    def mean(self, key: str) -> float:
        values = getattr(self, key)
        return sum(values) / len(values) if values else float("nan")

    def to_dict(self) -> dict:
        return asdict(self)


class RouterLogitRecorder:
    """Forward hooks on the routers: their logits, per layer, while ``active``."""

    def __init__(self, model):
        self.routers = router_modules(model)
        self.logits: list[list[torch.Tensor]] = [[] for _ in self.routers]
        self.active = True
        self.handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def _hook(self, i):
        def hook(module, args, output):
            if self.active:
                logits = router_logits(module, output)
                self.logits[i].append(logits.detach().float().reshape(-1, logits.shape[-1]))
        return hook

    def per_layer(self) -> list[torch.Tensor]:
        return [torch.cat(chunks) for chunks in self.logits]

    def remove(self):
        for h in self.handles:
            h.remove()


def decode_probe_logits(model, batch: int, prompt_len: int, steps: int, seed: int = 1) -> list[torch.Tensor]:
    """Router logits of ``steps`` eager greedy decode steps of random prompts (decode steps only)."""
    from transformers import StaticCache

    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, model.config.vocab_size, (batch, prompt_len), generator=g)
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + steps + 1)
    recorder = RouterLogitRecorder(model)
    recorder.active = False
    try:
        with torch.no_grad():
            out = model(input_ids=prompt, cache=cache, cache_position=torch.arange(prompt_len), use_cache=True)
            token = out.logits[:, -1].argmax(-1)
            recorder.active = True
            for step in range(steps):
                out = model(input_ids=token[:, None], cache=cache,
                            cache_position=torch.tensor([prompt_len + step]), use_cache=True)
                token = out.logits[:, -1].argmax(-1)
    finally:
        recorder.remove()
    return recorder.per_layer()


def match_router_spread(model, target_std: float, batch: int = 32, prompt_len: int = 16,
                        steps: int = 4, passes: int = 3) -> tuple[RouterStats, RouterStats, list[float]]:
    """Scale each router so its decode-step logits have per-token std ``target_std``
    (probes of ``batch`` prompts of ``prompt_len`` tokens, ``steps`` decode steps).

    Returns (stats before, stats after, the total scale applied per layer)."""
    routers = router_modules(model)
    top_k = model.config.num_experts_per_tok
    before = RouterStats.from_logits("random init", decode_probe_logits(model, batch, prompt_len, steps), top_k)
    scales = [1.0] * len(routers)
    stds = before.logit_std
    for _ in range(passes):
        with torch.no_grad():
            for i, (router, std) in enumerate(zip(routers, stds)):
                factor = target_std / std
                router.weight.mul_(factor)
                scales[i] *= factor
        stds = RouterStats.from_logits("", decode_probe_logits(model, batch, prompt_len, steps), top_k).logit_std
    after = RouterStats.from_logits(f"random, routers scaled to std {target_std:.3f}",
                                    decode_probe_logits(model, batch, prompt_len, steps, seed=2), top_k)
    return before, after, scales


def _heldout_windows(model_dir: Path, windows: int, length: int) -> torch.Tensor:
    """ByT5 ids (byte + 3) of the first ``length`` bytes of held-out stdlib files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rows = []
    for rel in (model_dir / "heldout_files.txt").read_text().split():
        path = stdlib / rel
        if path.exists():
            data = path.read_bytes()[:length]
            if len(data) == length:
                rows.append([b + 3 for b in data])
        if len(rows) == windows:
            break
    if not rows:
        raise RuntimeError(f"no held-out file of {length} bytes found for {model_dir}")
    return torch.tensor(rows)


def trained_model_stats(model_dir: Path, windows: int = 16, length: int = 256) -> RouterStats:
    """Router statistics of the trained model on held-out text (teacher-forced, all positions
    after the first 8)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = _heldout_windows(model_dir, windows, length)
    recorder = RouterLogitRecorder(model)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        recorder.remove()
    per_layer = [x.view(ids.shape[0], ids.shape[1], -1)[:, 8:].reshape(-1, x.shape[-1]) for x in recorder.per_layer()]
    stats = RouterStats.from_logits(f"{model_dir.name} (trained; {ids.shape[0]} held-out windows of {length} bytes)",
                                    per_layer, model.config.num_experts_per_tok)
    return stats


def gaussian_std_for_top1(top1: float, num_experts: int, samples: int = 20000) -> float:
    """The std s for which logits ~ N(0, s^2) i.i.d. over ``num_experts`` give mean top-1 softmax
    probability ``top1`` (bisection on a fixed sample)."""
    z = torch.randn(samples, num_experts, generator=torch.Generator().manual_seed(0))
    lo, hi = 1e-3, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if (z * mid).softmax(-1).max(-1).values.mean().item() < top1:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def logged_eval(model_dir: Path) -> dict | None:
    log = model_dir / "train_log.jsonl"
    if not log.exists():
        return None
    last = None
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("type") in ("eval", "final") and record.get("router_top1_prob"):
            last = record
    return last


def reference_router_stats(model_dir: Path = SHIPPED, match: str = "std") -> tuple[float, str, RouterStats | None, dict | None]:
    """(target std, how it was obtained, the trained model's stats or None, the logged eval or None).

    ``match="std"``: the trained model's per-token logit std. ``match="top1"``: the std at which
    Gaussian logits over the trained model's E give its mean top-1 probability (trained routers
    are peakier than Gaussian: at equal std a random router's best expert stands out less)."""
    problem = ""
    if (model_dir / "config.json").exists() and any(model_dir.glob("*.safetensors")):
        try:
            stats = trained_model_stats(model_dir)
            if match == "top1":
                top1 = stats.mean("top1_prob")
                std = gaussian_std_for_top1(top1, stats.num_experts)
                return std, (f"measured on {stats.source}: its mean top-1 router probability {top1:.4f} over "
                             f"E={stats.num_experts}, which Gaussian logits over {stats.num_experts} experts give "
                             f"at std {std:.3f} (--router-match top1)"), stats, None
            return stats.mean("logit_std"), f"measured on {stats.source}", stats, None
        except Exception as error:  # noqa: BLE001 - fall back, and say why
            problem = f" (measuring {model_dir.name} failed: {type(error).__name__}: {error})"
    record = logged_eval(model_dir)
    if record is not None:
        header = json.loads((model_dir / "train_log.jsonl").read_text().splitlines()[0])
        experts = header.get("args", {}).get("experts", 64)
        top1 = sum(record["router_top1_prob"]) / len(record["router_top1_prob"])
        std = gaussian_std_for_top1(top1, experts)
        how = (f"fallback{problem}: {model_dir.name} has no usable weights; its training log's last held-out eval "
               f"(step {record.get('step')}) has mean top-1 router probability {top1:.4f} over E={experts}; "
               f"Gaussian logits over {experts} experts give that at std {std:.3f}")
        return std, how, None, dict(record, experts=experts, top_k=header.get("args", {}).get("topk"))
    return FALLBACK_STD, f"fallback{problem}: no trained model or training log; fixed std {FALLBACK_STD}", None, None


# --- the machine --------------------------------------------------------------------------

def machine_info(threads: int) -> dict:
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "vendor_id") and key not in fields:
                fields[key] = value.strip()
            if not line.strip() and fields:
                break
    except OSError:
        pass
    cpu = fields.get("model name", "unknown")
    if "cpu family" in fields:
        cpu += f" ({fields.get('vendor_id', '')} family {fields['cpu family']} model {fields.get('model', '?')})"
    caches, bf16 = {}, "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            m = re.match(r"\s*(L1d|L1i|L2|L3) cache:\s*(.+)", line)
            if m:
                caches[m.group(1)] = m.group(2).strip()
            if line.startswith("Flags:"):
                flags = line.split(":", 1)[1].split()
                bf16 = " ".join(f for f in flags if "bf16" in f or f.startswith("amx")) or "none"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    import transformers

    return dict(cpu=cpu, caches=caches, bf16_flags=bf16, cores_available=cores, threads=threads,
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "(unset)"),
                python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__, loadavg=_loadavg())


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def read_bandwidth(model, repeats: int = 5) -> float:
    """GB/s of a plain streaming read (max over one layer's expert weights as int16): an upper
    bound for what any experts kernel can reach on this machine, under the current load."""
    w = experts_modules(model)[0].gate_up_proj
    flat = w.view(torch.int16).reshape(-1) if w.element_size() == 2 else w.view(torch.int32).reshape(-1)
    return streaming_read(flat, torch.max, repeats)


def streaming_read(tensor: torch.Tensor, read=torch.sum, repeats: int = 5) -> float:
    """GB/s of ``read(tensor)`` (a reduction that touches every byte once), median of ``repeats``
    after one warm-up."""
    import time

    read(tensor)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        read(tensor)
        times.append(time.perf_counter() - start)
    return tensor.numel() * tensor.element_size() / sorted(times)[len(times) // 2] / 1e9


def uniform_distinct(num_experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts when each token picks k of E uniformly at random."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


__all__ = ["SHAPES", "MoeShape", "RouterStats", "build_model", "match_router_spread", "reference_router_stats",
           "machine_info", "read_bandwidth", "streaming_read", "uniform_distinct", "weight_bytes", "experts_modules"]
