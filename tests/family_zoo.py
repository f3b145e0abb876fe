"""Tiny random models for every transformers family with an ``@use_experts_implementation`` experts class.

``families()`` scans the installed transformers for modeling files that decorate an experts class with
``@use_experts_implementation``. ``build(family)`` builds a tiny random model of that family from its
default config (nothing is downloaded):

- The text config (``get_text_config(decoder=True)``) is scaled down generically, key by key when the
  config has the key: hidden 64, 2 decoder layers, 4 attention heads / 2 KV heads (MHA and MQA families
  keep their kind; MLA dims 8 nope + 8 rope, v 16, LoRA ranks 32), vocab 96, max positions 128, 8 experts
  with top-2 routing (group-limited routers: 4 groups, top-2 groups; zaya only allows top-1), small
  (moe/shared) intermediate sizes, sliding windows of 64, linear-attention / mamba / indexer dims cut
  down. Per-layer lists (layer_types, mlp_layer_types, ...) keep two distinct kinds when the family
  has them (e.g. [dense, sparse], [sliding, full]); first_k_dense_replace and friends are capped at 1
  so that at least one layer is a MoE layer. Derived values are left to the config's __post_init__.
  ``FAMILY_FIXES`` holds the few family constraints the generic rules can't know.
- The model is the causal-LM class of the text config (the auto mapping, else the family's
  ``*ForCausalLM``). Multimodal families without one get their nearest ``*ForConditionalGeneration``
  with every other sub-config (vision, audio) shrunk as well; their forward takes ``input_ids`` only.
- Built in fp32 with SDPA attention (eager where the family has no SDPA), ``.eval()``, seeded; the
  experts keep the default ``config._experts_implementation`` ("grouped_mm").
- Routers: the matrices with a row per expert in each MoE block's router (the child named gate/router)
  are multiplied by 30 (re-initialised first when the family zero-initialises them, afmoe), and
  routers still near-uniform after that (zaya's MLP router) are scaled further until their logits' std
  is about 4.5, so routing is skewed. Routing-bias buffers (``e_score_correction_bias``,
  ``expert_bias``, ``balancing_biases``) get small random noise (std 0.1) so bias-corrected selection
  differs from plain top-k; static hash-routing tables (deepseek_v4's ``tid2eid``) get random experts.

Every model must run an eager forward on ``input_ids`` of shape [4, 1] and [2, 5] (``use_cache=False``)
with finite logits; otherwise the entry has no model and a ``skip_reason`` saying what failed. An entry's
``moe_blocks`` are the parents of the experts modules that this forward actually calls (ernie4_5_vl_moe's
vision experts only run on image tokens and aren't listed); for gemma4 that parent is the decoder layer.

``python tests/family_zoo.py [family ...]`` prints a table (``ZOO_WARM=1``: time a second build).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, PreTrainedConfig  # noqa: E402
from transformers.models.auto import modeling_auto  # noqa: E402

# Target sizes.
VOCAB = 96
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
INTERMEDIATE = 64
MOE_INTERMEDIATE = 32
NUM_EXPERTS = 8
TOP_K = 2
N_GROUP = 4  # group-limited routers only (their default n_group > 1)
TOPK_GROUP = 2
MAX_POS = 128
SLIDING_WINDOW = 64
ROUTER_SCALE = 30.0

# Family constraints the generic scaling can't know about: model_type -> extra config overrides.
FAMILY_FIXES: dict[str, dict] = {
    # ZAYA validates num_experts_per_tok == 1 ("currently supports num_experts_per_tok=1 only").
    "zaya": {"num_experts_per_tok": 1},
    # Lfm2Moe's default config leaves layer_types None, which its decoder layers index; LFM2 checkpoints
    # mix short-conv and attention layers.
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
}

# Families whose experts run every expert on every token, with no @use_experts_implementation
# class (lynx matches the dense form: passes/dispatch_dense.py). Built on request, not listed by
# families(), so the sweep test's family list stays the decorated families.
DENSE_EXPERTS: dict[str, tuple[str, ...]] = {"llama4": ("Llama4TextExperts",)}

_DECORATOR = re.compile(r"^@use_experts_implementation\b[^\n]*\n(?:@[^\n]*\n)*class\s+(\w+)", re.M)


@dataclass
class ZooEntry:
    family: str  # model_type / directory name, e.g. "qwen3_moe"
    model: torch.nn.Module | None  # tiny causal LM (eval mode, fp32) or None when skipped
    skip_reason: str | None  # why no model could be built (clear, specific)
    moe_blocks: list[str] = field(default_factory=list)  # dotted paths of the MoE blocks (parents of the experts)
    top_k: int | None = None
    num_experts: int | None = None
    experts_class: str | None = None  # class name of the @use_experts_implementation experts module
    router_class: str | None = None  # class name of the router/gate module if identifiable
    vocab_size: int | None = None


# ----------------------------------------------------------------------------------------------- scanning


def _models_dir() -> Path:
    return Path(transformers.__file__).parent / "models"


@functools.cache
def _experts_classes() -> dict[str, tuple[str, ...]]:
    """family -> names of the classes decorated with @use_experts_implementation in its modeling files."""
    found: dict[str, list[str]] = {}
    for path in sorted(_models_dir().glob("*/modeling_*.py")):
        text = path.read_text(encoding="utf-8")
        if "@use_experts_implementation" not in text:
            continue
        found.setdefault(path.parent.name, []).extend(_DECORATOR.findall(text))
    return {k: tuple(v) for k, v in found.items()}


def families() -> list[str]:
    """Sorted names of the transformers model families whose modeling file decorates an experts class
    with ``@use_experts_implementation``."""
    return sorted(_experts_classes())


# ----------------------------------------------------------------------------------------------- configs


def _default_config(family: str) -> PreTrainedConfig:
    try:
        return AutoConfig.for_model(family)
    except (ValueError, KeyError):
        pass
    # The family directory's model_type differs from its name (e.g. "inkling" -> "inkling_mm_model"):
    # take the config class of the module that isn't a sub-config of another one.
    module = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    classes = [c for c in vars(module).values()
               if inspect.isclass(c) and issubclass(c, PreTrainedConfig) and c is not PreTrainedConfig]
    subs = {s for c in classes for s in getattr(c, "sub_configs", {}).values()}
    tops = [c for c in classes if c not in subs]
    if len(tops) != 1:
        raise LookupError(f"no config registered for model_type {family!r} and {len(tops)} candidate config classes")
    return tops[0]()


def _pick_layers(values: list, n: int) -> list[int]:
    """Indices of ``n`` layers of a per-layer list that keep two distinct kinds when there are any
    (["dense", "dense", "sparse", ...] -> [0, 2], [sliding, sliding, sliding, full] -> [0, 3])."""
    picked = [0]
    for i, v in enumerate(values):
        if len(picked) == n:
            break
        if i and v not in [values[j] for j in picked]:
            picked.append(i)
    for i in range(len(values)):
        if len(picked) == n:
            break
        if i not in picked:
            picked.append(i)
    return sorted(picked)


def _small_token_id(key: str, value):
    """Special token ids moved inside the small vocab, below the ids the checks feed (2 and up)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= VOCAB:
        return 0 if "pad" in key else 1
    if isinstance(value, list):
        return [_small_token_id(key, v) for v in value]
    return value


def _text_overrides(d: dict, rope_keys=()) -> dict:
    """Constructor overrides that scale down the text config whose ``to_dict()`` is ``d``.
    ``rope_keys``: extra rope parameters the config class declares (``ignore_keys_at_rope_validation``)."""
    o: dict = {}

    def put(key, value, when=lambda v: v is not None):
        if key in d and when(d[key]):
            o[key] = value(d[key]) if callable(value) else value

    def each(value):  # scalars or per-kind lists (e.g. ernie4_5_vl_moe text/vision experts)
        return lambda v: [value] * len(v) if isinstance(v, list) else value

    positive = lambda v: v is not None and not isinstance(v, bool) and v > 0  # noqa: E731
    always = lambda v: True  # noqa: E731 - some defaults leave the expert counts None (dots1, gemma4...)

    n_layers_default = d.get("num_hidden_layers") or max(  # nemotron_h: derived from its layer pattern
        [len(v) for k, v in d.items() if k.endswith(("layer_types", "layers_block_type")) and isinstance(v, list)],
        default=None)
    put("vocab_size", VOCAB)
    put("hidden_size", HIDDEN)
    put("num_hidden_layers", LAYERS)
    put("num_attention_heads", HEADS)
    # GQA 4/2 where the family uses GQA; MHA and MQA families keep their kind
    put("num_key_value_heads", lambda v: HEADS if v == d.get("num_attention_heads") else 1 if v == 1 else KV_HEADS)
    if positive(d.get("qk_rope_head_dim")) and d.get("head_dim") == d["qk_rope_head_dim"]:
        put("head_dim", 8)  # MLA: head_dim is the rotary part
    elif positive(d.get("qk_head_dim")) and d.get("head_dim") == d["qk_head_dim"]:
        put("head_dim", 16)  # MLA: head_dim is nope + rope
    else:
        put("head_dim", HEAD_DIM, lambda v: v is None or positive(v))
    put("max_position_embeddings", MAX_POS)
    put("model_max_length", MAX_POS)
    put("intermediate_size", each(INTERMEDIATE), lambda v: v is not None)
    for key in ("moe_intermediate_size", "moe_hidden_size", "router_hidden_size"):
        put(key, each(MOE_INTERMEDIATE), always)
    for key in ("shared_expert_intermediate_size", "shared_intermediate_size", "shared_experts_intermediate_size",
                "moe_shared_expert_intermediate_size"):
        put(key, each(MOE_INTERMEDIATE), positive)
    for key in ("dense_intermediate_size", "prefix_dense_intermediate_size"):
        put(key, INTERMEDIATE, positive)
    # experts
    for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        put(key, each(NUM_EXPERTS), always)
    for key in ("num_experts_per_tok", "moe_topk", "moe_k", "num_experts_per_token", "top_k_experts"):
        put(key, each(TOP_K), always)
    for groups, topk_groups in (("n_group", "topk_group"), ("num_expert_group", "topk_group")):
        if groups in d:
            grouped = (d[groups] or 1) > 1
            put(groups, N_GROUP if grouped else d[groups])
            put(topk_groups, TOPK_GROUP if grouped else d.get(topk_groups), lambda v: True)
    # MLA attention (DeepSeek style): qk_head_dim = nope + rope
    put("q_lora_rank", 32)
    put("kv_lora_rank", 32)
    put("qk_rope_head_dim", 8, positive)
    put("qk_nope_head_dim", 8, positive)
    put("qk_head_dim", 16, positive)
    put("v_head_dim", HEAD_DIM, positive)
    put("o_lora_rank", 32)
    put("o_groups", 2)
    put("rotary_dim", 8, positive)
    put("n_shared_experts", 1, lambda v: v is None)  # dots1's default leaves it None but always builds them
    # sparse-attention indexers
    put("index_head_dim", 16)
    put("index_n_heads", 2)
    put("indexer_n_heads", 2, always)  # qwen4_exp: None by default, but its indexed layers need them
    put("indexer_kv_heads", 1, always)
    put("indexer_head_dim", 16, always)
    put("indexer_budget", 4, always)
    put("indexer_compress_ratio", 2, always)
    # sliding windows: larger than any test sequence
    put("sliding_window", SLIDING_WINDOW, positive)
    put("sliding_window_size", SLIDING_WINDOW, positive)
    put("swa_num_attention_heads", HEADS)
    put("swa_num_key_value_heads", KV_HEADS)
    put("swa_head_dim", HEAD_DIM)
    # linear attention / gated delta net
    put("linear_key_head_dim", HEAD_DIM)
    put("linear_value_head_dim", HEAD_DIM)
    put("linear_num_key_heads", KV_HEADS)
    put("linear_num_value_heads", HEADS)
    put("linear_num_heads", HEADS)
    put("linear_head_dim", HEAD_DIM)
    # mamba
    put("mamba_d_state", 16)
    put("ssm_state_size", 16)
    put("mamba_n_heads", 8)
    put("mamba_num_heads", 8)
    put("mamba_d_head", 16)
    put("mamba_head_dim", 16)
    put("mamba_dt_rank", 8)
    put("mamba_chunk_size", 16)
    put("chunk_size", 16)
    put("n_groups", 2)
    put("use_mamba_kernels", False)
    # misc low-rank / auxiliary widths
    put("gated_norm_rank", 4)
    put("hc_lowrank", 8)
    put("loop_gate_rank", 8)
    put("ple_embed_dim", 16)
    put("hidden_size_per_layer_input", 16, positive)
    put("vocab_size_per_layer_input", VOCAB)
    # layer patterns: with 2 layers, layer 0 keeps the family's first kind and layer 1 is MoE
    put("first_k_dense_replace", lambda v: min(v, 1))
    put("num_dense_layers", lambda v: min(v, 1))
    put("moe_layer_start_index", lambda v: min(v, 1))
    put("moe_layer_end_index", LAYERS - 1)
    put("moe_layer_interval", 1)
    put("decoder_sparse_step", 1)
    put("mlp_only_layers", [])
    put("max_window_layers", LAYERS)
    put("global_attn_every_n_layers", 2)
    put("sliding_window_pattern", 2)
    put("layer_group_size", 2)
    put("expert_layer_period", 2)
    put("expert_layer_offset", 1)
    put("attn_layer_period", 2)
    put("attn_layer_offset", 1)
    put("enable_moe_block", True, lambda v: v is not None)
    # deepseek_ocr2's text config leaves mlp_layer_types None (and its decoder layers index it)
    put("mlp_layer_types", ["dense", "sparse"], lambda v: v is None)
    put("unpadded_vocab_size", VOCAB)
    # per-layer lists
    for key, value in d.items():
        if key in o or not isinstance(value, list) or not value or len(value) != n_layers_default:
            continue
        if key == "kv_source_layers":
            o[key] = list(range(LAYERS))
        elif key == "num_attention_heads_per_layer":
            o[key] = [HEADS] * LAYERS
        else:
            o[key] = [value[i] for i in _pick_layers(value, LAYERS)]
    # heterogeneous layers (gemma4's global layers, dots3_note's SWA layers): the overrides of the layers
    # kept above, scaled like the global values
    per_layer = d.get("per_layer_config")
    if isinstance(per_layer, dict) and per_layer:
        kinds = d.get("layer_types") or d.get("mlp_layer_types")
        kept = _pick_layers(kinds, LAYERS) if isinstance(kinds, list) and len(kinds) == n_layers_default \
            else list(range(LAYERS))
        by_index = {int(k): v for k, v in per_layer.items()}
        o["per_layer_config"] = {}
        for new_index, old_index in enumerate(kept):
            layer = by_index.get(old_index)
            if layer:
                scaled = _text_overrides({**d, **layer, "per_layer_config": None}, rope_keys)
                o["per_layer_config"][new_index] = {k: scaled.get(k, v) for k, v in layer.items()}
    # token ids inside the small vocab
    for key, value in d.items():
        if key.endswith("_token_id") or key.endswith("_token_ids"):
            small = _small_token_id(key, value)
            if small != value:
                o[key] = small
    # rope: multimodal rope sections must add up to head_dim / 2
    rope = d.get("rope_parameters")
    if isinstance(rope, dict) and (rope.get("mrope_section") or "mrope_section" in rope_keys):
        # ernie4_5_vl_moe has no section in its config and falls back on [22, 22, 20] (h, w, t) in code
        section = rope.get("mrope_section") or [22, 22, 20]
        head_dim = o.get("head_dim") or HEAD_DIM
        half = int(head_dim * (rope.get("partial_rotary_factor") or d.get("partial_rotary_factor") or 1.0)) // 2
        new = [max(1, round(s * half / sum(section))) for s in section]
        new[-1] += half - sum(new)
        o["rope_parameters"] = {**rope, "mrope_section": new}
    return o


def _tiny_text_config(cfg: PreTrainedConfig) -> PreTrainedConfig:
    """``cfg`` (a default text config) scaled down. Only the overridden fields and the fields where
    ``cfg`` differs from its class defaults are passed to the constructor, so that whatever the config
    derives in ``__post_init__`` (layer_types from num_hidden_layers, head_dim from the MLA dims...)
    is derived again from the small values."""
    d = cfg.to_dict()
    overrides = _text_overrides(d, getattr(type(cfg), "ignore_keys_at_rope_validation", ()) or ())
    overrides.update(FAMILY_FIXES.get(cfg.model_type, {}))
    return _rebuild(cfg, overrides)


def _rebuild(cfg: PreTrainedConfig, overrides: dict) -> PreTrainedConfig:
    """A new config of ``type(cfg)`` from the values where ``cfg`` differs from its class defaults (what
    was passed to build it) and ``overrides``. Overrides of derived attributes (not dataclass fields, not
    given explicitly) are dropped: ``__post_init__`` derives them again from the small values."""
    cls = type(cfg)
    d = cfg.to_dict()
    class_default = cls().to_dict()
    missing = object()
    fields = set(getattr(cls, "__dataclass_fields__", d))
    # to_dict() names attributes by their storage name; the constructor may declare the alias instead
    # (qwen3_moe's field is num_experts, stored as num_local_experts): pass the declared name
    declared = {target: alias for alias, target in getattr(cls, "attribute_map", {}).items() if alias in fields}

    def name(key):
        return key if key in fields else declared.get(key, key)

    kwargs = {name(k): v for k, v in d.items() if class_default.get(k, missing) != v}
    explicit = {"per_layer_config"}  # a constructor kwarg, not a field
    kwargs.update({name(k): v for k, v in overrides.items()
                   if name(k) in fields or name(k) in kwargs or k in explicit})
    return cls(**kwargs)


_VISION_OVERRIDES = {
    # generic widths of vision / audio towers and their projectors (they are built, not run)
    "depth": 1, "num_layers": 1, "encoder_layers": 1, "num_heads": 2, "encoder_attention_heads": 2,
    "embed_dim": 32, "d_model": 32, "encoder_ffn_dim": 64, "out_hidden_size": HIDDEN, "text_hidden_size": HIDDEN,
    "projector_hidden_size": HIDDEN, "output_dim": HIDDEN, "mlp_dim": 64, "output_channels": 32,
    "projection_intermediate_size": 64, "downsample_hidden_size": 32,
}


def _tiny_config(cfg: PreTrainedConfig, text: PreTrainedConfig) -> PreTrainedConfig:
    """A composite config whose text config (``text``, a sub-config somewhere inside ``cfg``) and
    other sub-configs (vision, audio...) are all scaled down."""
    if cfg is text:
        return _tiny_text_config(cfg)
    subs = getattr(cfg, "sub_configs", {}) or {}
    if not subs:  # a vision/audio leaf: generic widths, one layer
        d = cfg.to_dict()
        o = _text_overrides(d, getattr(type(cfg), "ignore_keys_at_rope_validation", ()) or ())
        o.update({k: v for k, v in _VISION_OVERRIDES.items() if k in d and isinstance(d[k], int)})
        for key in ("hidden_sizes", "depths"):  # per-stage widths / depths of conv towers
            value = o.get(key, d.get(key))
            if isinstance(value, list) and all(isinstance(v, int) for v in value):
                o[key] = [32 if key == "hidden_sizes" else 1] * len(value)
        for key, value in d.items():  # layer index lists (deepstack, full-attention blocks...)
            if key.endswith(("_indexes", "_indices", "_layers")) and isinstance(value, list) and value and \
                    all(isinstance(v, int) for v in value):
                o[key] = [0]
        return _rebuild(cfg, o)
    # The composite's own values: what differs from its class defaults, its vocab and projector widths.
    # Its multimodal placeholder token ids stay where they are, outside the text vocab: text-only
    # input_ids never hit them.
    d = cfg.to_dict()
    class_default = type(cfg)().to_dict()
    kwargs = {k: v for k, v in d.items() if k not in subs and k in class_default and class_default[k] != v}
    for key, value in d.items():
        if key == "vocab_size":
            kwargs[key] = VOCAB
        elif key in _VISION_OVERRIDES and isinstance(value, int):
            kwargs[key] = _VISION_OVERRIDES[key]
    for key in subs:
        sub = getattr(cfg, key, None)
        if isinstance(sub, PreTrainedConfig):
            kwargs[key] = _tiny_config(sub, text)
    return type(cfg)(**kwargs)


# ----------------------------------------------------------------------------------------------- models


def _causal_lm_class(text: PreTrainedConfig, family: str):
    """The causal-LM class for ``text`` (auto mapping first, then a ``*ForCausalLM`` of the family module
    whose config class is ``type(text)``) and whether the auto mapping knows it."""
    name = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(text.model_type)
    if name and hasattr(transformers, name):
        cls = getattr(transformers, name)
        if getattr(cls, "config_class", None) in (type(text), None):
            return cls, True
    for name, cls in _family_classes(family).items():
        if name.endswith("ForCausalLM") and getattr(cls, "config_class", None) is type(text):
            return cls, False
    return None, False


def _ancestors(cfg: PreTrainedConfig, text: PreTrainedConfig) -> list[PreTrainedConfig]:
    """The configs containing ``text`` inside ``cfg``, nearest first (``cfg`` last)."""
    for key in getattr(cfg, "sub_configs", {}) or {}:
        sub = getattr(cfg, key, None)
        if sub is text:
            return [cfg]
        if isinstance(sub, PreTrainedConfig):
            found = _ancestors(sub, text)
            if found:
                return found + [cfg]
    return []


def _family_classes(family: str) -> dict:
    out = {}
    for path in sorted((_models_dir() / family).glob("modeling_*.py")):
        module = importlib.import_module(f"transformers.models.{family}.{path.stem}")
        out.update({n: c for n, c in vars(module).items() if inspect.isclass(c) and c.__module__ == module.__name__})
    return out


def _conditional_generation_class(cfg: PreTrainedConfig, family: str):
    """A ``*ForConditionalGeneration`` / ``*ForCausalLM`` class taking ``cfg`` (auto mappings first)."""
    for mapping in ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
                    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_PRETRAINING_MAPPING_NAMES"):
        name = getattr(modeling_auto, mapping, {}).get(cfg.model_type)
        if name and name.endswith(("ForConditionalGeneration", "ForCausalLM")) and hasattr(transformers, name):
            cls = getattr(transformers, name)
            if getattr(cls, "config_class", None) is type(cfg):
                return cls
    for name, cls in _family_classes(family).items():
        if name.endswith(("ForConditionalGeneration", "ForCausalLM")) and \
                getattr(cls, "config_class", None) is type(cfg):
            return cls
    return None


def _instantiate(cls, config, via_auto: bool):
    errors = []
    for impl in ("sdpa", "eager"):
        try:
            if via_auto:
                return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                                     attn_implementation=impl)
            return cls._from_config(config, dtype=torch.float32, attn_implementation=impl)
        except Exception as e:  # noqa: BLE001 - no SDPA support: retry with eager
            errors.append(e)
            if impl == "eager":
                raise


def _experts_modules(model: torch.nn.Module, names: tuple[str, ...]) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if type(m).__name__ in names and type(m).__module__.startswith("transformers.models.")]


def _num_experts(experts: torch.nn.Module) -> int | None:
    for attr in ("num_experts", "num_local_experts", "n_routed_experts"):
        value = getattr(experts, attr, None)
        if isinstance(value, int):
            return value
    for p in experts.parameters():
        return p.shape[0]
    return None


def _expert_rows(n: int, num_experts: int) -> bool:
    """A router output of ``n`` rows: one per expert, plus a few extra (inkling's shared-expert
    logits, zaya's skip expert)."""
    return num_experts <= n <= num_experts + 4


def _router_params(block: torch.nn.Module, experts: torch.nn.Module, num_experts: int):
    """[(name, module, [(param name, param)])] for the router(s) of ``block``: children other than the
    experts (named gate/router, or holding a matrix with one row per expert) and the matrices in them
    with a row per expert. Falls back on such matrices held by ``block`` itself."""
    found = []
    for name, child in block.named_children():
        if child is experts:
            continue
        params = [(pn, p) for pn, p in child.named_parameters() if p.dim() == 2 and _expert_rows(p.shape[0], num_experts)]
        if params:
            found.append((name, child, params))
    named = [f for f in found if re.search(r"gate|rout", f[0]) or re.search(r"Gate|Rout", type(f[1]).__name__)]
    if named:
        found = named
    if not found:
        own = [(pn, p) for pn, p in block.named_parameters(recurse=False)
               if p.dim() == 2 and _expert_rows(p.shape[0], num_experts)]
        if own:
            found.append(("", block, own))
    return found


def _bias_tensors(module: torch.nn.Module, num_experts: int):
    """Routing-bias tensors of a router (e_score_correction_bias, expert_bias, balancing_biases...):
    one entry per expert (or a few more; ernie's is [1, E]), not a plain Linear ``bias``."""
    out = []
    for name, t in list(module.named_buffers()) + list(module.named_parameters()):
        leaf = name.rsplit(".", 1)[-1]
        if t.squeeze().dim() == 1 and _expert_rows(t.numel(), num_experts) and "bias" in leaf and leaf != "bias":
            out.append((name, t))
    return out


def _randomize_routing_tables(router: torch.nn.Module, num_experts: int, gen: torch.Generator) -> None:
    """Static token -> experts tables (deepseek_v4's hash-routing ``tid2eid``, all zeros until a checkpoint
    is loaded): distinct random experts per token instead."""
    for _, t in router.named_buffers():
        if t.dim() == 2 and not t.is_floating_point() and t.dtype != torch.bool and 1 <= t.shape[1] <= num_experts:
            rows = [torch.randperm(num_experts, generator=gen)[: t.shape[1]] for _ in range(t.shape[0])]
            t.copy_(torch.stack(rows).to(t.dtype))


def _calibrate_routers(model, scaled, vocab: int, seed: int, floor: float = 1.5, target: float = 4.5) -> None:
    """Routers whose logits are still near-uniform after the fixed scale-up (MLP routers such as zaya's,
    where only the last layer has a row per expert): scale their expert-row matrices further until the
    logits' spread over the experts (std per token, averaged) on a probe batch is ``target`` (what the
    plain scale-up gives linear routers on normalised hidden states)."""
    stds: dict[int, list[float]] = {}

    def hook(module, args, output):
        logits = output[0] if isinstance(output, (tuple, list)) else output
        if torch.is_tensor(logits) and logits.is_floating_point() and logits.numel() and logits.shape[-1] > 1:
            logits = logits.detach().float().reshape(-1, logits.shape[-1])
            if logits.min() >= 0 and torch.allclose(logits.sum(-1), torch.ones(1), atol=1e-3):
                logits = logits.clamp_min(1e-30).log()  # probabilities (gemma4): log-probs, same spread
            stds.setdefault(id(module), []).append(logits.std(dim=-1).mean().item())

    hooks = [router.register_forward_hook(hook) for router, _, _ in scaled]
    ids = torch.randint(2, min(vocab, VOCAB), (2, 5), generator=torch.Generator().manual_seed(seed + 2))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except Exception:  # noqa: BLE001 - the verification forward reports it
        return
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for router, params, e in scaled:
            measured = stds.get(id(router))
            if measured and 0 < min(measured) < floor:
                for p in params:
                    p.mul_(min(target / min(measured), 1e4))


def _top_k(model, block, router, text_config) -> int | None:
    for obj in (router, block):
        for attr in ("top_k", "num_experts_per_tok", "moe_topk", "k"):
            value = getattr(obj, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    for attr in ("num_experts_per_tok", "moe_topk", "moe_k", "num_experts_per_token", "top_k_experts"):
        value = getattr(text_config, attr, None)
        if isinstance(value, list):
            value = value[0]
        if isinstance(value, int):
            return value
    return None


def _skip(family: str, reason: str, **known) -> ZooEntry:
    return ZooEntry(family=family, model=None, skip_reason=reason, **known)


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:200]}"


def build(family: str, seed: int = 0) -> ZooEntry:
    """A tiny random model of ``family`` (see the module docstring), or a skip reason."""
    # Tiny tensors: intra-op threads only add synchronisation (tens of ms per op on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build(family, seed)
    finally:
        torch.set_num_threads(threads)


def _build(family: str, seed: int) -> ZooEntry:
    names = _experts_classes().get(family) or DENSE_EXPERTS.get(family)
    if names is None:
        return _skip(family, f"{family!r} has no @use_experts_implementation experts class")
    experts_class = names[0]
    try:
        cfg = _default_config(family)
    except Exception as e:  # noqa: BLE001
        return _skip(family, f"default config: {_short(e)}", experts_class=experts_class)
    text = cfg.get_text_config(decoder=True)
    lm_class, via_auto = _causal_lm_class(text, family)
    try:
        if lm_class is not None:
            config = _tiny_text_config(text)
            model_class = lm_class
        else:
            # multimodal without a text causal LM: the nearest enclosing config with a generation head
            # (e.g. qwen3_omni_moe's thinker rather than thinker + talker + code2wav)
            model_class, owner = None, None
            for owner in _ancestors(cfg, text):
                model_class = _conditional_generation_class(owner, family)
                if model_class is not None:
                    break
            if model_class is None:
                heads = sorted(n for n in _family_classes(family) if re.match(r"\w+For\w+$", n))
                return _skip(family, "not a causal LM: no *ForCausalLM / *ForConditionalGeneration class "
                             f"(has {', '.join(heads) or 'base models only'})", experts_class=experts_class)
            config = _tiny_config(owner, text)
            via_auto = False
    except Exception as e:  # noqa: BLE001
        return _skip(family, f"tiny config: {_short(e)}", experts_class=experts_class)

    torch.manual_seed(seed)
    try:
        model = _instantiate(model_class, config, via_auto).eval()
    except Exception as e:  # noqa: BLE001
        return _skip(family, f"{model_class.__name__}.from_config raised {_short(e)}", experts_class=experts_class)

    text_config = model.config.get_text_config(decoder=True)
    experts = _experts_modules(model, names)
    if not experts:
        return _skip(family, f"{model_class.__name__} has no {'/'.join(names)} module with this config",
                     experts_class=experts_class)
    experts_class = type(experts[0][1]).__name__
    modules = dict(model.named_modules())
    moe_blocks, router_class, top_k, num_experts = [], None, None, None
    scaled = []  # (router module, its expert-row matrices, num_experts)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for path, module in experts:
            block_path = path.rsplit(".", 1)[0] if "." in path else ""
            block = modules[block_path]
            moe_blocks.append(block_path)
            e = _num_experts(module)
            routers = _router_params(block, module, e) if e else []
            for _, router, params in routers:
                for _, p in params:
                    if not p.any():  # zero-initialised routers (afmoe, zaya): a random init first
                        p.copy_(torch.randn(p.shape, generator=gen) * getattr(text_config, "initializer_range", 0.02))
                    p.mul_(ROUTER_SCALE)
                _randomize_routing_tables(router, e, gen)
                scaled.append((router, [p for _, p in params], e))
            # Routing biases start at zero (or a fixed prior, zaya's skip expert): add small noise
            # so that bias-corrected selection differs from plain top-k.
            seen = set()
            for owner in [r for _, r, _ in routers] + [block]:
                for _, t in _bias_tensors(owner, e):
                    if id(t) not in seen and not any(t is x for _, x in module.named_buffers()):
                        seen.add(id(t))
                        t.add_(0.1 * torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype))
            if num_experts is None:
                num_experts = e
                router = routers[0][1] if routers else None
                router_class = type(router).__name__ if router is not None and router is not block else None
                top_k = _top_k(model, block, router, text_config)

    _calibrate_routers(model, scaled, vocab=getattr(text_config, "vocab_size", None) or VOCAB, seed=seed)

    calls = {path: 0 for path, _ in experts}
    hooks = [m.register_forward_hook(lambda *_a, _p=p: calls.__setitem__(_p, calls[_p] + 1)) for p, m in experts]
    vocab = getattr(text_config, "vocab_size", None)
    known = dict(moe_blocks=moe_blocks, top_k=top_k, num_experts=num_experts, experts_class=experts_class,
                 router_class=router_class, vocab_size=vocab)
    try:
        ids_gen = torch.Generator().manual_seed(seed)
        for shape in ((4, 1), (2, 5)):
            ids = torch.randint(2, min(vocab or VOCAB, VOCAB), shape, generator=ids_gen)
            try:
                with torch.no_grad():
                    out = model(input_ids=ids, use_cache=False)
            except Exception as e:  # noqa: BLE001
                return _skip(family, f"forward on input_ids {list(shape)} raised {_short(e)}", **known)
            logits = getattr(out, "logits", None)
            if logits is None or tuple(logits.shape[:2]) != shape:
                got = None if logits is None else tuple(logits.shape)
                return _skip(family, f"forward on input_ids {list(shape)} gave logits of shape {got}", **known)
            if not torch.isfinite(logits).all():
                return _skip(family, f"forward on input_ids {list(shape)} gave non-finite logits", **known)
    finally:
        for h in hooks:
            h.remove()
    # Experts a text-only forward never reaches (ernie4_5_vl_moe's vision experts run on image tokens
    # only) are not reported: a compiled text forward can't see them either.
    ran = {p.rsplit(".", 1)[0] if "." in p else "" for p, n in calls.items() if n}
    if not ran:
        return _skip(family, f"experts never called by the forward: {sorted(calls)}", **known)
    known["moe_blocks"] = [b for b in moe_blocks if b in ran]
    return ZooEntry(family=family, model=model, skip_reason=None, **known)


if __name__ == "__main__":  # table of all families
    import sys

    wanted = sys.argv[1:] or families()
    for fam in wanted:
        if os.environ.get("ZOO_WARM"):
            build(fam)  # imports and first-call caches out of the timing
        t0 = time.perf_counter()
        try:
            entry = build(fam)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            continue
        dt = time.perf_counter() - t0
        status = "built" if entry.model is not None else f"SKIP {entry.skip_reason}"
        print(f"{fam:24s} {len(entry.moe_blocks):2d} k={entry.top_k} E={entry.num_experts} "
              f"{entry.experts_class} {entry.router_class} {dt:5.2f}s {status}", flush=True)
