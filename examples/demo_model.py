"""The model the examples run on: the shipped trained model, or a random one from a config."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "lynx-tiny-moe"


def load_model(name: str | None = None):
    """(model, tokenizer or None, description). ``name``: a model directory, 'tiny-config',
    or None for the shipped model (falling back to 'tiny-config' if it is missing)."""
    if name is None:
        name = str(SHIPPED) if (SHIPPED / "config.json").exists() else "tiny-config"
    if name == "tiny-config":
        config = Qwen3MoeConfig(
            vocab_size=259, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            num_experts=32, num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=512,
        )
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        with torch.no_grad():  # random routers are near-uniform; skew them like trained ones
            for pname, p in model.named_parameters():
                if pname.endswith("mlp.gate.weight"):
                    p.mul_(30.0)
        return model, None, "random Qwen3-MoE from a config (E=32, k=4, 2 layers)"
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(name)
    return model, tokenizer, f"{Path(name).name} (trained, {model.config.model_type})"


def heldout_sources(model_dir: Path) -> list[Path]:
    listed = model_dir / "heldout_files.txt"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [stdlib / line for line in listed.read_text().split() if (stdlib / line).exists()]


def make_prompts(model, tokenizer, batch: int, length: int) -> tuple[torch.Tensor, list[str]]:
    """``batch`` prompts of exactly ``length`` tokens (no padding needed), and their texts.

    With the shipped byte-level model: the first ``def`` of held-out standard-library files."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        return torch.randint(3, model.config.vocab_size, (batch, length), generator=g), []
    texts = []
    for path in heldout_sources(Path(model.name_or_path)):
        source = path.read_bytes()
        start = source.find(b"\ndef ")
        snippet = source[start + 1:start + 1 + length]
        if start >= 0 and len(snippet) == length and snippet.isascii():
            texts.append(snippet.decode())
        if len(texts) == batch:
            break
    if len(texts) < batch:
        raise RuntimeError(f"only {len(texts)} held-out files have a {length}-byte 'def' prompt")
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    return torch.tensor(ids), texts
