"""Greedy-decode a batch with eager, Inductor, lynx (selector off) and lynx (selector on).

    python examples/generate.py                       # the shipped model, 16 Python prompts
    python examples/generate.py --model tiny-config   # a random model built from a config

Prints two tables. The shipped model (quality): decode tokens/s, mean distinct experts per MoE
layer per decode step, and whether eager / Inductor / lynx-off produce identical tokens, then a
few completions. Its experts fit in cache, so its speed follows op overheads. Then a memory-bound
shape (speed; ``demo_speed.py``: OLMoE-1B-7B's MoE layers, bf16, batch 16), where a decode step
costs the expert bytes it reads. Both say what the machine is (cores, ISA, bandwidth).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from demo_model import load_model, make_prompts
from demo_speed import machine_line, memory_bound_table, streaming_bandwidth
from tqdm import tqdm
from transformers import StaticCache

import lynx_compile

TIMED_RUNS = 5
MODES = {  # name -> (backend, options)
    "eager": (None, None),
    "inductor": ("inductor", None),
    "lynx off": ("lynx", {"policy": "off"}),
    "lynx on": ("lynx", {"policy": "lynx"}),
}


def greedy(forward, config, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """Prefill, then ``new_tokens - 1`` one-token decode steps on a static cache.

    Returns the generated tokens and the decode time (prefill excluded)."""
    batch, prompt_len = prompt.shape
    cache = StaticCache(config=config, max_cache_len=prompt_len + new_tokens)
    out = forward(input_ids=prompt, cache=cache, cache_position=torch.arange(prompt_len), use_cache=True)
    token = out.logits[:, -1].argmax(-1)
    tokens = [token]
    start = time.perf_counter()
    for step in range(new_tokens - 1):
        position = torch.tensor([prompt_len + step])
        out = forward(input_ids=token[:, None], cache=cache, cache_position=position, use_cache=True)
        token = out.logits[:, -1].argmax(-1)
        tokens.append(token)
    return torch.stack(tokens, dim=1), time.perf_counter() - start


class EagerExpertCounter:
    """Distinct experts per experts-module call, read from the experts' inputs (eager only)."""

    def __init__(self, model):
        self.counts: list[int] = []
        self.handles = [
            m.register_forward_pre_hook(self._hook)
            for m in model.modules()
            if hasattr(m, "gate_up_proj") and hasattr(m, "num_experts")
        ]

    def _hook(self, module, args):
        self.counts.append(int(args[1].unique().numel()))

    def remove(self):
        for h in self.handles:
            h.remove()


def run_mode(name, model, prompt, new_tokens, num_moe_layers):
    backend, options = MODES[name]
    torch._dynamo.reset()
    forward = model.forward if backend is None else torch.compile(model.forward, backend=backend, options=options)
    start = time.perf_counter()
    # Compiles the prefill and decode graphs. Same cache length as the timed run: dynamo
    # guards on it, and a different one would recompile inside the timed loop.
    greedy(forward, model.config, prompt, new_tokens)
    warmup = time.perf_counter() - start
    counter = EagerExpertCounter(model) if backend is None else None
    with lynx_compile.capture_routing() as cap:
        tokens, _ = greedy(forward, model.config, prompt, new_tokens)
    if counter:
        counter.remove()
    counts = counter.counts if counter else cap.distinct_experts()
    decode_counts = counts[num_moe_layers:]  # drop the prefill's calls
    experts = sum(decode_counts) / len(decode_counts) if backend != "inductor" else None
    # A decode run of this model takes a tenth of a second: the median of a few, so that one
    # burst of other load on the machine does not decide a row
    seconds = statistics.median(greedy(forward, model.config, prompt, new_tokens)[1] for _ in range(TIMED_RUNS))
    tokens_per_s = prompt.shape[0] * (new_tokens - 1) / seconds
    return dict(tokens=tokens, tokens_per_s=tokens_per_s, experts=experts, warmup=warmup)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory, or 'tiny-config' (default: the shipped model)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=48, help="prompt length in tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    parser.add_argument("--no-speed-table", action="store_true", help="skip the memory-bound table (2-3 min)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer, description = load_model(args.model)
    prompt, texts = make_prompts(model, tokenizer, args.batch, args.prompt_len)
    num_moe_layers = sum(1 for m in model.modules() if hasattr(m, "gate_up_proj"))
    print(f"model: {description}; batch {args.batch}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens")

    results = {}
    modes = args.modes.split(",")
    with torch.no_grad():
        for name in tqdm(modes, desc="modes"):
            results[name] = run_mode(name, model, prompt, args.new_tokens, num_moe_layers)

    reference = results.get("eager", next(iter(results.values())))["tokens"]
    print()
    print(machine_line(streaming_bandwidth()))
    print("| mode | decode tokens/s | distinct experts / layer / step | same tokens as eager | compile + warmup s |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        experts = "-" if r["experts"] is None else f"{r['experts']:.2f}"
        same = "yes" if torch.equal(r["tokens"], reference) else "no"
        print(f"| {name} | {r['tokens_per_s']:.1f} | {experts} | {same} | {r['warmup']:.1f} |")
    print("\nInductor's graph hides the routing (it routes exactly as eager: plain top-k).")
    plain = [n for n in ("eager", "inductor", "lynx off") if n in results]
    identical = all(torch.equal(results[n]["tokens"], reference) for n in plain)
    print(f"eager / Inductor / lynx-off token sequences identical: {identical}")

    if tokenizer is not None and "lynx on" in results:
        print("\nCompletions (eager | lynx on):")
        for i in range(min(3, args.batch)):
            print("-" * 60)
            print(texts[i] + "\u2502" + tokenizer.decode(reference[i]))
            print(texts[i] + "\u2502" + tokenizer.decode(results["lynx on"]["tokens"][i]))

    if not args.no_speed_table:
        print()
        with torch.no_grad():
            print(memory_bound_table())


if __name__ == "__main__":
    main()
