#!/usr/bin/env python
"""Train a tiny byte-level Qwen3-MoE causal LM on the Python standard library (CPU).

The result is a small but *fine-grained* MoE (64 experts, top-4, renormalised top-k
weights, load-balancing loss on) in the ordinary transformers format, so that the Lynx
batch-aware selector has something real to work on without downloading anything:

    AutoModelForCausalLM.from_pretrained("models/lynx-tiny-moe")
    AutoTokenizer.from_pretrained("models/lynx-tiny-moe")      # ByT5 byte tokenizer

Why Qwen3-MoE: its router is "softmax -> top-k -> renormalise" (norm_topk_prob=True),
the rule of Qwen3-30B-A3B / 235B-A22B, for which the paper publishes (alpha, beta); it
has no shared expert, so every expert of every layer is subject to selection; and the
modelling code uses transformers' default `grouped_mm` experts implementation.

Corpus: every *.py file of the running interpreter's standard library
(`sysconfig.get_paths()["stdlib"]`), minus site-packages and test directories, split BY
FILE: a file is held out when int(sha1(relative posix path), 16) % 1000 < heldout_permille.
Bytes are mapped exactly as ByT5 does (id = byte + 3; pad 0, eos 1, unk 2) and every file
ends with eos. The held-out file list is written with the checkpoint.

Output directory (default models/lynx-tiny-moe):
    model.safetensors, config.json, generation_config.json   (weights saved in --save-dtype)
    tokenizer_config.json (+ special tokens files)            ByT5Tokenizer, offline
    train_log.jsonl       header / train / eval / final records (JSON lines)
    heldout_files.txt     relative paths of the held-out files
    eval_results.json     final held-out metrics of the saved checkpoint

Full run (50 min on 2 idle cores; 79 min on a shared, busy machine):
    .venv/bin/python examples/train_tiny_moe.py --seed 0 --out models/lynx-tiny-moe
Smoke run (1-2 min):
    .venv/bin/python examples/train_tiny_moe.py --quick --out out/tiny-moe-quick
Re-evaluate a saved checkpoint on the same held-out sample:
    .venv/bin/python examples/train_tiny_moe.py --eval-only --out models/lynx-tiny-moe
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import platform
import sys
import sysconfig
import time

# Passive OpenMP waiting: on a shared 2-core machine, spinning worker threads that get
# descheduled make each step several times slower. Must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

PAD_ID, EOS_ID, UNK_ID, BYTE_OFFSET = 0, 1, 2, 3  # ByT5 id mapping
VOCAB_SIZE = 384  # len(ByT5Tokenizer()): 3 specials + 256 bytes + 125 <extra_id_*>
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test"}


# --------------------------------------------------------------------------- corpus
def stdlib_files(root: pathlib.Path, skip_tests: bool = True) -> list[str]:
    """Sorted relative posix paths of the stdlib's *.py files."""
    out = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root)
        parts = set(rel.parts[:-1])
        if "site-packages" in parts or "dist-packages" in parts:
            continue
        if skip_tests and parts & SKIP_DIRS:
            continue
        if f.is_file():
            out.append(rel.as_posix())
    return sorted(out)


def is_heldout(rel: str, permille: int) -> bool:
    return int(hashlib.sha1(rel.encode("utf-8")).hexdigest(), 16) % 1000 < permille


def encode_files(root: pathlib.Path, rels: list[str]) -> np.ndarray:
    """Concatenate files as ByT5 ids (byte + 3), each followed by eos."""
    parts = []
    for rel in rels:
        data = np.frombuffer((root / rel).read_bytes(), dtype=np.uint8).astype(np.int16)
        parts.append(data + BYTE_OFFSET)
        parts.append(np.array([EOS_ID], dtype=np.int16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)


def build_corpus(root: pathlib.Path, permille: int, skip_tests: bool):
    rels = stdlib_files(root, skip_tests)
    train_rels = [r for r in rels if not is_heldout(r, permille)]
    held_rels = [r for r in rels if is_heldout(r, permille)]
    train = encode_files(root, train_rels)
    held = encode_files(root, held_rels)
    digest = hashlib.sha1()
    for r in rels:
        digest.update(r.encode() + b"\0" + (root / r).read_bytes())
    return train, held, train_rels, held_rels, digest.hexdigest()


def eval_windows(held: np.ndarray, ctx: int, n: int) -> torch.Tensor:
    """A fixed sample of n non-overlapping held-out windows, evenly spread over the stream."""
    total = (len(held)) // ctx
    n = min(n, total)
    idx = np.unique(np.linspace(0, total - 1, n).round().astype(np.int64))
    win = np.stack([held[i * ctx : (i + 1) * ctx] for i in idx]).astype(np.int64)
    return torch.from_numpy(win)


class Batches:
    """Deterministic epochs of shuffled, non-overlapping train windows."""

    def __init__(self, train: np.ndarray, ctx: int, bs: int, seed: int):
        self.data = torch.from_numpy(train.astype(np.int64))
        self.ctx, self.bs = ctx, bs
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.epoch, self.order, self.pos, self.offset = -1, None, 0, 0

    def _new_epoch(self):
        self.epoch += 1
        self.offset = int(torch.randint(0, self.ctx, (1,), generator=self.gen))
        n = (len(self.data) - self.offset) // self.ctx
        self.order = torch.randperm(n, generator=self.gen)
        self.pos = 0

    def next(self) -> torch.Tensor:
        if self.order is None or self.pos + self.bs > len(self.order):
            self._new_epoch()
        idx = self.order[self.pos : self.pos + self.bs]
        self.pos += self.bs
        starts = self.offset + idx * self.ctx
        return torch.stack([self.data[s : s + self.ctx] for s in starts.tolist()])


# --------------------------------------------------------------------------- model
def make_config(a):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=a.d_model,
        intermediate_size=4 * a.d_model,  # unused: every layer is MoE (decoder_sparse_step=1)
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.d_model // a.heads,
        max_position_embeddings=a.ctx,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        moe_intermediate_size=a.expert_dim,
        num_experts=a.experts,
        num_experts_per_tok=a.topk,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        output_router_logits=True,
        router_aux_loss_coef=a.aux_coef,
        tie_word_embeddings=False,
        use_cache=True,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=None,
    )


def lr_at(step: int, a) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    p = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def per_layer_balance_loss(router_logits, E: int, k: int) -> torch.Tensor:
    """Switch-Transformer balance loss computed per layer, then averaged over layers.

    transformers' `load_balancing_loss_func` pools the top-k counts and the mean router
    probabilities over *all* layers before taking their product, so a hot expert i in one
    layer and a cold expert i in another (unrelated experts that only share an index)
    cancel out. In our first run that left the pooled loss at ~4.04 (balanced: k = 4) while,
    at step 200, about half of each layer's 64 experts got under a tenth of their fair share. Same scale as the built-in one:
    k when perfectly balanced.
    """
    losses = []
    for rl in router_logits:
        p = rl.float().reshape(-1, E).softmax(-1)
        idx = p.topk(k, dim=-1).indices
        f = torch.nn.functional.one_hot(idx, E).sum((0, 1)).float() / p.shape[0]  # sums to k
        losses.append(E * (f * p.mean(0)).sum())
    return torch.stack(losses).mean()


def load_stats(counts: torch.Tensor) -> dict:
    """counts [L, E] top-k assignments -> per-layer fractions and balance statistics."""
    frac = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    E = counts.shape[-1]
    ent = -(frac.clamp_min(1e-12).log() * frac).sum(-1) / math.log(E)
    return {
        "load": [[round(x, 5) for x in row] for row in frac.tolist()],
        "load_max_over_mean": [round(x, 3) for x in (frac.max(-1).values * E).tolist()],
        "load_min_over_mean": [round(x, 3) for x in (frac.min(-1).values * E).tolist()],
        "load_max_over_min": [
            round(float(mx / mn), 3) if mn > 0 else None for mx, mn in zip(counts.max(-1).values, counts.min(-1).values)
        ],
        "load_cv": [round(x, 4) for x in (frac.std(-1, unbiased=False) * E).tolist()],
        "load_norm_entropy": [round(x, 4) for x in ent.tolist()],
    }


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, k: int, bs: int = 16) -> dict:
    """Held-out CE / accuracy / bits-per-byte plus routing statistics on a fixed sample."""
    was_training = model.training
    model.eval()
    L, E = model.config.num_hidden_layers, model.config.num_experts
    nll, correct, n = 0.0, 0, 0
    counts = torch.zeros(L, E, dtype=torch.float64)
    ent_sum = torch.zeros(L, dtype=torch.float64)
    top1_sum = torch.zeros(L, dtype=torch.float64)
    topk_mass_sum = torch.zeros(L, dtype=torch.float64)
    gap_sum = torch.zeros(L, k - 1, dtype=torch.float64)  # logit(top1) - logit(rank j), j = 2..k
    rows = 0
    for i in range(0, len(windows), bs):
        x = windows[i : i + bs]
        out = model(input_ids=x, output_router_logits=True, use_cache=False)
        logits = out.logits[:, :-1].float()
        tgt = x[:, 1:]
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum").item()
        correct += (logits.argmax(-1) == tgt).sum().item()
        n += tgt.numel()
        for li, rl in enumerate(out.router_logits):
            rl = rl.float().reshape(-1, E)
            p = rl.softmax(-1)
            topv, topi = rl.topk(k, dim=-1)
            counts[li] += torch.bincount(topi.reshape(-1), minlength=E).double()
            ent_sum[li] += (-(p * p.clamp_min(1e-12).log()).sum(-1)).sum().double()
            pk = p.gather(-1, topi)
            top1_sum[li] += pk[:, 0].sum().double()
            topk_mass_sum[li] += pk.sum(-1).sum().double()
            gap_sum[li] += (topv[:, :1] - topv[:, 1:]).sum(0).double()
            if li == 0:
                rows += rl.shape[0]
    model.train(was_training)
    ce = nll / n
    res = {
        "heldout_loss": round(ce, 5),
        "heldout_acc": round(correct / n, 5),
        "heldout_bpb": round(ce / math.log(2), 5),
        "heldout_tokens": n,
        "router_entropy_nats": [round(x, 4) for x in (ent_sum / rows).tolist()],
        "router_entropy_max_nats": round(math.log(E), 4),
        "router_top1_prob": [round(x, 4) for x in (top1_sum / rows).tolist()],
        "router_topk_mass": [round(x, 4) for x in (topk_mass_sum / rows).tolist()],
        "router_logit_gap_top1_minus_rank": [[round(x, 3) for x in row] for row in (gap_sum / rows).tolist()],
    }
    res.update(load_stats(counts))
    return res


def summary(ev: dict) -> str:
    mm = [x for x in ev["load_max_over_min"] if x is not None]
    return (
        f"heldout loss {ev['heldout_loss']:.4f} acc {ev['heldout_acc']:.4f} bpb {ev['heldout_bpb']:.4f} | "
        f"load max/min {max(mm) if mm else 'inf'} cv {max(ev['load_cv']):.3f} | "
        f"top1 p {sum(ev['router_top1_prob']) / len(ev['router_top1_prob']):.3f}"
    )


def greedy(model, prompt: str, n: int = 120) -> str:
    from transformers import AutoTokenizer  # noqa: F401  (tokenizer equivalence is checked in save)

    ids = torch.tensor([[b + BYTE_OFFSET for b in prompt.encode()]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=PAD_ID, eos_token_id=EOS_ID)
    new = [t - BYTE_OFFSET for t in out[0, ids.shape[1] :].tolist() if BYTE_OFFSET <= t < 256 + BYTE_OFFSET]
    return bytes(new).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="models/lynx-tiny-moe")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default 3400; 60 with --quick)")
    ap.add_argument("--quick", action="store_true", help="1-2 minute smoke run (60 steps, small eval)")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the checkpoint in --out and exit")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stop-after", type=int, default=None, help="pilot runs: stop after N steps (LR schedule still for --steps)")
    # model
    ap.add_argument("--d-model", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--expert-dim", type=int, default=64)
    ap.add_argument("--aux-coef", type=float, default=0.01, help="balance loss coefficient (router_aux_loss_coef)")
    ap.add_argument("--balance-loss", choices=["per-layer", "hf"], default="per-layer",
                    help="per-layer Switch loss (default) or transformers' built-in loss pooled over layers")
    # data / optimisation
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--heldout-permille", type=int, default=50)
    ap.add_argument("--include-tests", action="store_true")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-windows", type=int, default=128)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--save-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    a = ap.parse_args(argv)
    if a.quick:
        a.warmup, a.eval_every, a.eval_windows, a.log_every = 10, 30, 16, 10
        a.steps = 60 if a.steps is None else a.steps
    elif a.steps is None:
        a.steps = 3400
    return a


def save_checkpoint(model, out: pathlib.Path, dtype: torch.dtype):
    from transformers import AutoTokenizer, ByT5Tokenizer

    # Inference default, as in the released Qwen3-MoE checkpoints: do not return router logits /
    # compute the aux loss on every forward (training passes output_router_logits=True itself).
    model.config.output_router_logits = False
    model.to(dtype).save_pretrained(out)
    tok = ByT5Tokenizer()
    tok.save_pretrained(out)
    back = AutoTokenizer.from_pretrained(out)
    probe = "def f(x):\n    return x  # é"
    want = [b + BYTE_OFFSET for b in probe.encode()] + [EOS_ID]
    assert back(probe).input_ids == want, "tokenizer round trip does not match the byte mapping"


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    # index_put_(accumulate=True) -- the backward of the token gather in grouped_mm experts and of
    # the embedding -- is not run-to-run deterministic on CPU otherwise; no measurable cost here.
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM
    import transformers

    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])

    if a.eval_only:
        held_rels = [l for l in (out / "heldout_files.txt").read_text().splitlines() if l and not l.startswith("#")]
        held = encode_files(root, held_rels)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        win = eval_windows(held, model.config.max_position_embeddings, a.eval_windows)
        res = {"dtype": "float32", **evaluate(model, win, model.config.num_experts_per_tok)}
        print(summary(res))
        print(json.dumps({k: v for k, v in res.items() if k != "load"}, indent=1))
        return

    t0 = time.time()
    train, held, train_rels, held_rels, digest = build_corpus(root, a.heldout_permille, not a.include_tests)
    (out / "heldout_files.txt").write_text(
        f"# held-out files (relative to the stdlib of Python {platform.python_version()}); "
        f"rule: int(sha1(path),16) % 1000 < {a.heldout_permille}\n" + "\n".join(held_rels) + "\n"
    )
    win = eval_windows(held, a.ctx, a.eval_windows)
    cfg = make_config(a)
    model = AutoModelForCausalLM.from_config(cfg)  # init drawn from torch.manual_seed(a.seed)
    model.train()
    if a.balance_loss == "per-layer":
        model.router_aux_loss_coef = 0.0  # the forward then returns the plain CE; we add our own term
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n_, p in model.named_parameters() if ".experts." in n_)
    active = n_params - n_expert + n_expert * a.topk // a.experts
    log = open(out / "train_log.jsonl", "w")

    def emit(rec):
        log.write(json.dumps(rec) + "\n")
        log.flush()

    # "stdlib" says how the corpus was found, not where: no machine path in a committed log.
    emit({
        "type": "header", "args": vars(a), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "stdlib": 'sysconfig.get_paths()["stdlib"]',
        "corpus_sha1": digest,
        "train_files": len(train_rels), "heldout_files": len(held_rels), "train_bytes": int(len(train)),
        "heldout_bytes": int(len(held)), "eval_windows": int(len(win)), "params": n_params,
        "expert_params": n_expert, "active_params_per_token": active,
        "experts_implementation": model.config._experts_implementation,
    })
    print(f"corpus: {len(train_rels)} train files ({len(train)/1e6:.2f} MB), {len(held_rels)} held-out "
          f"({len(held)/1e6:.2f} MB); params {n_params/1e6:.2f}M (active {active/1e6:.2f}M); "
          f"experts impl {model.config._experts_implementation}", flush=True)

    decay = [p for n_, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n_]
    no_decay = [p for n_, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n_)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    batches = Batches(train, a.ctx, a.batch, a.seed)
    L, E = cfg.num_hidden_layers, cfg.num_experts
    acc = {"loss": 0.0, "ce": 0.0, "aux": 0.0, "aux_pl": 0.0, "n": 0, "counts": torch.zeros(L, E, dtype=torch.float64), "dt": []}
    t_train, t_last = 0.0, time.time()
    ev = evaluate(model, win, a.topk)
    emit({"type": "eval", "step": 0, "elapsed_s": round(time.time() - t0, 1), **ev})
    done = 0
    bar = tqdm(range(a.steps), desc="train", mininterval=5 if sys.stderr.isatty() else 30, file=sys.stderr)
    for step in bar:
        if a.stop_after is not None and step >= a.stop_after:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        ts = time.time()
        x = batches.next()
        o = model(input_ids=x, labels=x, output_router_logits=True, use_cache=False)
        if a.balance_loss == "per-layer":  # o.loss is the plain CE (model.router_aux_loss_coef = 0 below)
            aux_pl = per_layer_balance_loss(o.router_logits, E, a.topk)
            loss = o.loss + a.aux_coef * aux_pl
        else:  # transformers' built-in: o.loss = CE + coef * aux (pooled over layers)
            aux_pl = per_layer_balance_loss([r.detach() for r in o.router_logits], E, a.topk)
            loss = o.loss
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t_train += time.time() - ts
        done = step + 1
        acc["dt"].append(time.time() - ts)
        aux = o.aux_loss.item()
        acc["loss"] += loss.item()
        acc["ce"] += o.loss.item() - (a.aux_coef * aux if a.balance_loss == "hf" else 0.0)
        acc["aux"] += aux
        acc["aux_pl"] += aux_pl.item()
        acc["n"] += 1
        with torch.no_grad():
            for li, rl in enumerate(o.router_logits):
                acc["counts"][li] += torch.bincount(rl.topk(a.topk, -1).indices.reshape(-1), minlength=E).double()
        if (step + 1) % a.log_every == 0 or step + 1 in (a.steps, a.stop_after):
            n = acc["n"]
            dt = time.time() - t_last
            rec = {
                "type": "train", "step": step + 1, "loss": round(acc["loss"] / n, 5), "ce": round(acc["ce"] / n, 5),
                "aux": round(acc["aux"] / n, 5), "aux_per_layer": round(acc["aux_pl"] / n, 5), "lr": round(lr_at(step, a), 7), "grad_norm": round(float(gn), 4),
                "tok_per_s": round(n * a.batch * a.ctx / dt, 1),
                "step_s_median": round(float(np.median(acc["dt"])), 4), "epoch": batches.epoch,
                "elapsed_s": round(time.time() - t0, 1),
            }
            st = load_stats(acc["counts"])
            rec["train_load_max_over_min"] = st["load_max_over_min"]
            rec["train_load_cv"] = st["load_cv"]
            emit(rec)
            bar.set_postfix(ce=f"{rec['ce']:.3f}", aux=f"{rec['aux']:.3f}", tps=f"{rec['tok_per_s']:.0f}")
            acc = {"loss": 0.0, "ce": 0.0, "aux": 0.0, "aux_pl": 0.0, "n": 0, "counts": torch.zeros(L, E, dtype=torch.float64), "dt": []}
            t_last = time.time()
        if (step + 1) % a.eval_every == 0 or step + 1 in (a.steps, a.stop_after):
            te = time.time()
            ev = evaluate(model, win, a.topk)
            emit({"type": "eval", "step": step + 1, "elapsed_s": round(time.time() - t0, 1), **ev})
            tqdm.write(f"step {step + 1}: train ce {rec['ce']:.4f} | " + summary(ev), file=sys.stderr)
            t_last += time.time() - te  # do not count eval time in throughput
    bar.close()
    train_time = time.time() - t0

    # final metrics in fp32, then save in the chosen dtype, reload from disk and evaluate again
    final32 = evaluate(model, win, a.topk)
    save_dtype = getattr(torch, a.save_dtype)
    save_checkpoint(model, out, save_dtype)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    final_saved = evaluate(reloaded, win, a.topk)
    sample = greedy(reloaded, "def fibonacci(n):\n    ")
    results = {
        "train_wall_s": round(train_time, 1), "train_compute_s": round(t_train, 1),
        "steps": done, "train_tokens": done * a.batch * a.ctx,
        "mean_tok_per_s": round(done * a.batch * a.ctx / t_train, 1),
        "params": n_params, "active_params_per_token": active,
        "final_train_ce_last_interval": rec["ce"],
        "fp32_in_memory": {k: v for k, v in final32.items()},
        f"saved_{a.save_dtype}_loaded_as_float32": {k: v for k, v in final_saved.items()},
        "greedy_sample_prompt": "def fibonacci(n):\n    ", "greedy_sample": sample,
    }
    (out / "eval_results.json").write_text(json.dumps(results, indent=1) + "\n")
    emit({"type": "final", **{k: v for k, v in results.items() if not isinstance(v, dict)},
          "heldout_fp32": summary(final32), "heldout_saved": summary(final_saved)})
    log.close()
    print(f"done in {train_time/60:.1f} min ({results['mean_tok_per_s']:.0f} tok/s)")
    print("fp32 :", summary(final32))
    print(f"saved ({a.save_dtype}) reloaded as fp32:", summary(final_saved))
    print("greedy:", repr(sample))


if __name__ == "__main__":
    main()
