"""What every model family is made of: cfg values read with their ranges, the traits a checkpoint shows, the
dimensions a mapping needs, and the tensor table a family declares, expanded into the engine's records.

A family (one registered file each) is mostly data: its names, the traits it accepts, the cfg settings it maps,
and a table whose rows say which source role and field feed each Hugging Face name and how (`TAKES`: whole, some
rows, transposed, regrouped), all plannable from metadata. Hooks say what a table cannot: its dimensions, its
Hugging Face config.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from streamconv.errors import ConversionError, describe, is_whole
from streamconv.families.megatron import SCHEMES, Names
from streamconv.recipe import Arrangement, TensorRecipe, copy, transpose

HParam = Callable[..., Any]  # hparam(key, default=None, null=default): one resolved cfg value
NULL = object()  # what `hparam(key, null=NULL)` gives for an explicit null, where null differs from absent

MAX_POSITIONS = 2**24  # a context length: the longest models have 10**7 positions
MAX_SIZE = 2**20  # a model dimension (hidden, heads, a layer count): the largest models have a few 10**4


def number(key: str, value: Any, kind: type, low: float | None = None, high: float | None = None,
           above: float | None = None) -> Any:
    """A cfg value as an int or float in the range a model can have (`low` <= value <= `high`, value > `above`),
    or a one-line error naming the key: NaN, infinities and null are no model's setting."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) < 2**63 \
            or kind is int and not is_whole(value):
        wanted = "a whole number" if kind is int else "a number"
        raise ConversionError(f"hyper-parameter {key!r} is {describe(value)}, not {wanted}; fix the checkpoint's cfg")
    if above is not None and not value > above or low is not None and value < low \
            or high is not None and value > high:
        wanted = " and ".join(f"{word} {bound}" for word, bound in
                              (("above", above), ("at least", low), ("at most", high)) if bound is not None)
        raise ConversionError(f"hyper-parameter {key!r} is {describe(value)}; a model's {key} is {wanted}: fix the "
                              "checkpoint's cfg")
    return kind(value)


def flag(hparam: HParam, key: str) -> bool | None:
    """A cfg flag: true, false, or None when absent. Anything else (1, "true") is malformed, never taken as
    false. (YAML files are read by YAML 1.1's own rule, in which yes/no/on/off are booleans too.)"""
    value = hparam(key)
    if value is not None and not isinstance(value, bool):
        raise ConversionError(f"hyper-parameter {key!r} is {describe(value)}, not true or false; fix the "
                              "checkpoint's cfg")
    return value


def listed(hparam: HParam, key: str, most: int = 4) -> Any:
    """A cfg value that may be a list (window_size's (left, right), a rotary base per attention kind) as a tuple of
    its items, read one by one; any other value as it is (a longer list too: refused where it is read)."""
    value = hparam(key)
    items = []
    for n in range(most + 1):
        item = hparam(f"{key}.{n}")
        if item is None:
            break
        items.append(item)
    return tuple(items) if 0 < len(items) <= most else value


def sliding_window(window: Any) -> int | None:
    """transformers' `sliding_window` for megatron-core's `window_size` (left, right), where a query sees itself and
    `left` keys before it: left + 1 keys, causal only (None: no window; a left of -1 is an unbounded one)."""
    if window is None:
        return None
    if not (isinstance(window, tuple) and len(window) == 2 and all(is_whole(w) for w in window)
            and window[1] == 0 and -1 <= window[0] < MAX_POSITIONS):
        raise ConversionError(f"the cfg sets window_size {describe(window)}, not a causal window (left, 0) of a "
                              "length a model has; fix the checkpoint's cfg")
    return None if window[0] == -1 else int(window[0]) + 1


def yarn_scaling(factor: float, original: int, beta_fast: float, beta_slow: float, mscale: float | None,
                 mscale_all_dim: float | None, truncate: bool) -> dict[str, Any]:
    """transformers' YaRN `rope_scaling` for megatron-core's: its factors (`truncate`: the correction range rounded
    to whole dimensions, transformers' default), and the cos/sin scale megatron-core
    applies (`mscale / mscale_all_dim`'s magnitudes, or the factor's alone where either is unset) written out as
    `attention_factor` where transformers would infer another (it takes both only when both are non-zero)."""
    if not (factor >= 1 and beta_fast > 0 and beta_slow > 0 and 0 < original <= MAX_POSITIONS):
        raise ConversionError(f"the cfg's YaRN scaling (factor {factor}, beta_fast {beta_fast}, beta_slow "
                              f"{beta_slow}, original context {original}) is not one a model has; fix the cfg")
    scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": int(original),
               "beta_fast": beta_fast, "beta_slow": beta_slow, **({} if truncate else {"truncate": False})}
    applied = _mscale(factor, 1.0) if mscale is None or mscale_all_dim is None else \
        _mscale(factor, mscale) / _mscale(factor, mscale_all_dim)
    if mscale is not None and mscale_all_dim is not None:
        scaling.update(mscale=mscale, mscale_all_dim=mscale_all_dim)
    inferred = _mscale(factor, mscale) / _mscale(factor, mscale_all_dim) if mscale and mscale_all_dim else \
        _mscale(factor, 1.0)
    if applied != inferred:
        scaling["attention_factor"] = applied
    return scaling


def _mscale(factor: float, scale: float) -> float:
    """YaRN's magnitude scaling, as megatron-core and transformers compute it."""
    return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0


def epsilon(hparam: HParam) -> float:
    """The layer norms' epsilon (megatron-core's `layernorm_epsilon`, 1e-5 by default)."""
    return number("layernorm_epsilon", hparam("layernorm_epsilon", 1e-5, null=None), float, above=0, high=1)


def init_std(hparam: HParam) -> float:
    """The initialisation's standard deviation (config.json's `initializer_range`; inference does not use it)."""
    return number("init_method_std", hparam("init_method_std", 0.02), float, low=0)


def sizes(hparam: HParam, inferred: dict[str, int | None], num_heads: int | None) -> dict[str, int]:
    """Whole-number hyper-parameters from the cfg, else as read from the tensors (`inferred`); --num-heads wins."""
    values: dict[str, int] = {}
    for key, guess in inferred.items():
        value = num_heads if key == "num_attention_heads" and num_heads else hparam(key, null=NULL)
        if value is NULL and key == "ffn_hidden_size":
            value = 4 * values["hidden_size"]  # (megatron-core's meaning of a null ffn_hidden_size)
        elif value is NULL:
            raise ConversionError(f"hyper-parameter {key!r} is null in the checkpoint's cfg; fix the cfg")
        if value is None:
            value = guess
        if value is None:
            fix = "pass --num-heads N" if key == "num_attention_heads" else "fix the checkpoint's cfg"
            raise ConversionError(
                f"hyper-parameter {key!r} is not in the checkpoint's cfg and cannot be read from the tensors; {fix}"
            )
        values[key] = number(key, value, int, high=MAX_POSITIONS if key in POSITION_KEYS else MAX_SIZE, above=0)
    return values


POSITION_KEYS = ("encoder_seq_length", "max_position_embeddings")


def check_layers(layers: int, found: list[int]) -> None:
    """The cfg's layer count is the tensors' (compared by count first: the cfg's number is untrusted)."""
    if layers != len(found) or found != list(range(len(found))):
        text = f"layers {found[0]}..{found[-1]}" if found else "no layers"
        raise ConversionError(
            f"the cfg says num_layers {layers} but the state_dict holds {text} ({len(found)} in all); "
            "is this one pipeline stage of a larger model?"
        )


# The traits a checkpoint can show, as its description names them. Every checkpoint shows one of each pair; a
# family accepts a set of them (`Family.traits`, `Family.optional`), and what no family accepts is refused by name.
RMS_NORM, LAYER_NORM = "RMSNorm", "LayerNorm"
GATED, PLAIN = "a gated MLP", "a plain MLP"
ROTARY, LEARNED, NO_POSITIONS = "rotary positions", "learned positions", "no position embeddings"
GROUPED, MULTI_HEAD = "grouped-query attention", "multi-head attention"
BIASES, NO_BIASES = "biases", "no biases"
TIED, UNTIED = "a tied output layer", "an untied output layer"
ZERO_CENTRED = "zero-centred layer norms"
QKV_BIAS = "biases on the query, key and value projections only"
QK_NORM = "query and key layer norms"
WINDOW = "sliding-window attention"
TWO_BASES = "two rotary bases"
POST_NORMS = "norms after attention and the MLP"
TANH_GELU = "the tanh GELU"
QUICK_GELU = "the quick GELU, clamped"
YARN = "YaRN rotary positions"
MAMBA = "Mamba layers"
SQUARED_RELU = "the squared ReLU"
SCALED_EMBEDDING = "a scaled embedding"
EXPERTS = "a mixture of experts"
WHOLE_QK_NORM = "query and key norms over all heads at once"
LATENT_ATTENTION = "multi-latent attention"
EITHER_ATTENTION = frozenset({GROUPED, MULTI_HEAD})
EITHER_OUTPUT = frozenset({TIED, UNTIED})

_FLAGS = ("gated_linear_unit", "swiglu", "share_embeddings_and_output_weights", "untie_embeddings_and_output_weights",
          "layernorm_zero_centered_gamma", "apply_layernorm_1p", "bias", "add_bias_linear", "group_query_attention",
          "qkv_bias", "add_qkv_bias", "qk_layernorm", "multi_latent_attention", "is_hybrid_model")


def traits(hparam: HParam, shapes: dict[str, tuple[int, ...]], names: Names) -> tuple[str, ...]:
    """What the cfg says (NeMo's and Megatron-LM's keys), else what the tensors show, in the order a message names
    them; a cfg that contradicts the tensors about the output layer is refused."""
    qkv, fc1, fc2 = (shapes.get(names.of(0, role, "weight")) for role in ("qkv", "fc1", "fc2"))
    routed = names.scheme == "megatron-core" and any(
        k.startswith(names.layer_prefix) and k.endswith(".mlp.router.weight") for k in shapes)
    if fc1 is None and fc2 is None and routed:  # (a mixture of experts' first layer: its first expert's MLP)
        fc1, fc2 = (shapes.get(names.of(0, role, "weight", 0)) for role in ("expert_fc1", "expert_fc2"))
    hidden = shapes[names.embedding][1] if len(shapes[names.embedding]) == 2 else None
    said = {key: hparam(key) for key in ("position_embedding_type", "normalization", "activation",
                                          "num_query_groups", "num_attention_heads", "activation_func._target_",
                                          "window_size", "_target_", "num_moe_experts", "kv_channels")}
    said.update({key: flag(hparam, key) for key in _FLAGS})
    text = {k: v.lower() for k, v in said.items() if isinstance(v, str)}
    odd = []
    norm = text.get("normalization")
    if norm not in (None, "layernorm", "rmsnorm"):
        odd.append(f"{said['normalization']} normalization")
    if said["layernorm_zero_centered_gamma"] or said["apply_layernorm_1p"]:
        odd.append(ZERO_CENTRED)
    rms = norm == "rmsnorm" if norm in ("layernorm", "rmsnorm") else \
        names.of(0, "input_norm", "weight") in shapes and names.of(0, "input_norm", "bias") not in shapes
    activation = text.get("activation")
    gated = said["gated_linear_unit"] is True or said["swiglu"] is True or \
        (activation or "").endswith("glu") or (fc1 is not None and fc2 is not None and len(fc2) == 2
                                                and fc1[0] == 2 * fc2[1])
    if activation not in (None, "gelu", "swiglu", "fast-swiglu"):
        odd.append(f"the activation {said['activation']}")
    function = text.get("activation_func._target_")  # NeMo 2.0's and Megatron-Bridge's: a function's path
    if function is not None and gated and function.rsplit(".", 1)[-1] == "fast_gelu":
        odd.append(TANH_GELU)
    elif function is not None and gated and function.rsplit(".", 1)[-1] == "quick_gelu":
        odd.append(QUICK_GELU)  # (GPT-OSS's: x * sigmoid(1.702 x), its inputs clamped, the linear half offset)
    elif function is not None and not gated and function.rsplit(".", 1)[-1] == "squared_relu":
        odd.append(SQUARED_RELU)  # (Nemotron-H's)
    elif function is not None and function.rsplit(".", 1)[-1] != ("silu" if gated else "gelu"):
        odd.append(f"the activation function {said['activation_func._target_']}"
                   + (" in a gated MLP" if gated else ""))
    if (said["qkv_bias"] or said["add_qkv_bias"]) and not said["bias"] and not said["add_bias_linear"]:
        odd.append(QKV_BIAS)
    mcore = names.scheme == "megatron-core"
    latent = said["multi_latent_attention"] is True or mcore and names.of(0, "kv_down", "weight") in shapes
    if latent and mcore and names.of(0, "kv_down", "weight") not in shapes:
        raise ConversionError(f"the cfg says multi_latent_attention True, but the checkpoint has no "
                              f"{names.of(0, 'kv_down', 'weight')!r}; is the cfg from another run?")
    if latent:  # (its query and key norms are the latent ones, part of it: qk_layernorm says they are there)
        odd.append(LATENT_ATTENTION)
    elif said["qk_layernorm"] or mcore and names.of(0, "q_norm", "weight") in shapes:
        odd.append(QK_NORM)
    q_norm = shapes.get(names.of(0, "q_norm", "weight")) if mcore and not latent else None
    heads, kv = said["num_attention_heads"], said["kv_channels"]
    if q_norm and hidden and is_whole(heads) and heads > 1 and q_norm[0] == heads * (
            kv if is_whole(kv) and kv > 0 else hidden // heads):
        odd.append(WHOLE_QK_NORM)  # (OLMoE's: one norm over the whole query, another over the whole key)
    for key, trait, role, field in (("qk_layernorm", QK_NORM, "q_norm", "weight"),
                                    ("add_qkv_bias", QKV_BIAS, "qkv", "bias"), ("qkv_bias", QKV_BIAS, "qkv", "bias")):
        if trait in odd and said[key] and mcore and names.of(0, role, field) not in shapes:
            raise ConversionError(f"the cfg says {key} True ({trait}), but the checkpoint has no "
                                  f"{names.of(0, role, field)!r}; is the cfg from another run?")
    if mcore and names.of(0, "post_attention_norm", "weight") in shapes:
        odd.append(POST_NORMS)
    positions = text.get("position_embedding_type")
    rotary = positions in ("rope", "yarn") if positions is not None else mcore and names.positions not in shapes
    if positions == "yarn":
        odd.append(YARN)
    elif positions not in (None, "rope", "learned_absolute", "none"):
        odd.append(f"{said['position_embedding_type']} position embeddings")
    if isinstance(listed(hparam, "rotary_base"), tuple):
        odd.append(TWO_BASES)
    if said["window_size"] is not None:
        odd.append(WINDOW)
    mamba = mcore and any(k.startswith(names.layer_prefix) and ".mixer.in_proj." in k for k in shapes)
    if mamba:
        odd.append(MAMBA)
    hybrid = mamba or said["is_hybrid_model"] is True  # (its layer pattern says which layers have experts)
    if said["num_moe_experts"] not in (None, 0) and not hybrid or routed:
        odd.append(EXPERTS)
    if said["num_moe_experts"] not in (None, 0) and mcore and not routed and not hybrid:
        raise ConversionError(f"the cfg says num_moe_experts {describe(said['num_moe_experts'])}, but no layer of the "
                              f"checkpoint has a router ({names.of(0, 'router', 'weight')!r}); is the cfg from "
                              "another run?")
    if text.get("_target_", "").rsplit(".", 1)[-1].startswith("gemma"):  # (Gemma's providers scale the embedding)
        odd.append(SCALED_EMBEDDING)
    groups, heads = said["num_query_groups"], said["num_attention_heads"]
    grouped = (said["group_query_attention"] is not False and isinstance(groups, int) and isinstance(heads, int)
               and 0 < groups < heads)
    if not grouped and qkv is not None and hidden is not None and not gated and qkv[0] != 3 * hidden:
        grouped = True  # (a GPT-2 model's QKV rows are 3 x hidden; Llama's may differ with its head size too)
    bias_said = said["bias"] if said["bias"] is not None else said["add_bias_linear"]
    bias = bias_said if bias_said is not None else names.of(0, "qkv", "bias") in shapes
    return (RMS_NORM if rms else LAYER_NORM, GATED if gated else PLAIN,
            ROTARY if rotary else NO_POSITIONS if positions == "none" else LEARNED,
            GROUPED if grouped else MULTI_HEAD, BIASES if bias else NO_BIASES,
            TIED if _tied(said, shapes, names) else UNTIED, *odd)


def _tied(said: dict[str, Any], shapes: dict[str, tuple[int, ...]], names: Names) -> bool:
    """Whether the output layer is the word embedding: megatron-core stores an output layer only when untied (a
    pipeline's last-stage copy of a tied one is dropped when its ranks are merged), so the cfg must agree."""
    share, untie = said["share_embeddings_and_output_weights"], said["untie_embeddings_and_output_weights"]
    cfg = None if share is None and untie is None else share is not False and untie is not True
    stored = names.output_layer is not None and names.output_layer in shapes
    if cfg is None:
        return not stored
    if cfg and stored or not cfg and names.output_layer is not None and not stored:
        key = "share_embeddings_and_output_weights" if share is not None else "untie_embeddings_and_output_weights"
        raise ConversionError(f"the cfg says {key} {share if share is not None else untie}, but the checkpoint "
                              f"{'holds' if stored else 'has no'} {names.output_layer!r}; is the cfg from another "
                              "run?")
    return cfg


@dataclass(frozen=True)
class Dims:
    """The model dimensions a mapping needs, read from the cfg and checked against the tensors."""

    hidden: int
    layers: int
    heads: int
    groups: int  # key/value heads (heads: multi-head attention)
    head_dim: int
    ffn: int
    positions: int
    vocab: int
    names: Names = SCHEMES[0]  # the source's naming scheme
    embedding_rows: int = 0  # the embedding's rows in the checkpoint (the vocabulary padded)
    tied: bool = True
    gated: bool = False  # linear_fc1 holds [gate; up]
    local_slices: int = 1  # tensor-parallel ranks whose `[gate_r; up_r]` were concatenated (1: stored whole)
    experts: int = 0  # a mixture of experts': routed experts per MoE layer,
    expert_ffn: int = 0  # each one's MLP width,
    shared_ffn: int = 0  # the shared experts' MLP width (0: none),
    moe_layers: frozenset[int] = frozenset()  # the layers that have experts (the others a dense MLP)
    qk_norm_width: int = 0  # the query and key norms' width (0: one head's, head_dim)
    q_latent: int = 0  # multi-latent attention's: the query's latent width (0: projected directly),
    kv_latent: int = 0  # the keys' and values' latent width,
    rope_dim: int = 0  # the rotated part of each query and key head (head_dim: the rest),
    v_head_dim: int = 0  # a value head's width


def source_shape(role: str, field: str, d: Dims) -> tuple[int, ...]:
    """The shape a role's tensor has in the source, Megatron's `[out, in]` (a bias: `[out]`)."""
    h, up = d.hidden, 2 if d.gated else 1  # (a gated MLP's linear_fc1 holds the gate and the up projection)
    norm = d.qk_norm_width or d.head_dim
    shape = {"embedding": (d.embedding_rows, h), "output_layer": (d.embedding_rows, h), "positions": (d.positions, h),
             "qkv": ((d.heads + 2 * d.groups) * d.head_dim, h), "proj": (h, d.heads * (d.v_head_dim or d.head_dim)),
             "fc1": (up * d.ffn, h), "fc2": (h, d.ffn), "q_norm": (norm,), "k_norm": (norm,), "sinks": (d.heads,),
             "router": (d.experts, h), "expert_fc1": (up * d.expert_ffn, h), "expert_fc2": (h, d.expert_ffn),
             "shared_fc1": (up * d.shared_ffn, h), "shared_fc2": (h, d.shared_ffn),
             "q_proj": (d.heads * (d.head_dim + d.rope_dim), h), "q_down": (d.q_latent, h),
             "q_up": (d.heads * (d.head_dim + d.rope_dim), d.q_latent), "q_latent_norm": (d.q_latent,),
             "kv_down": (d.kv_latent + d.rope_dim, h), "kv_latent_norm": (d.kv_latent,),
             "kv_up": (d.heads * (d.head_dim + d.v_head_dim), d.kv_latent)}.get(role, (h,))  # (norms)
    return shape if field == "weight" else shape[:1]


Taken = tuple[tuple[int, ...], Arrangement, tuple[tuple[int, int], ...] | None]  # shape, arrangement, row ranges


def _rows(shape: tuple[int, ...], ranges: tuple[tuple[int, int], ...]) -> Taken:
    kept = (sum(b - a for a, b in ranges), *shape[1:])
    return kept, copy(kept), ranges


def _heads(d: Dims, first: int, count: int) -> tuple[tuple[int, int], ...]:
    """Rows of heads first..first+count of every group of megatron-core's fused QKV, which groups its rows
    `(groups, heads / groups + 2, head_dim)`: each group's query heads, then its key head, then its value head."""
    slot = (d.heads // d.groups + 2) * d.head_dim  # one group's rows
    return tuple((g * slot + first * d.head_dim, g * slot + (first + count) * d.head_dim) for g in range(d.groups))


def _halves(d: Dims, rows: int, second: bool) -> tuple[tuple[int, int], ...]:
    """The gate (first) or up (second) rows of a `linear_fc1` of `rows` rows (a dense MLP's, an expert's):
    `[gate; up]` whole, or `[gate_r; up_r]` per rank."""
    t = d.local_slices
    local = rows // t  # one rank's [gate_r; up_r]
    return tuple((r * local + second * local // 2, r * local + (1 + second) * local // 2) for r in range(t))


# How an output is taken from its source: name -> (dims, source shape) -> output shape, arrangement, row ranges
TAKES: dict[str, Callable[[Dims, tuple[int, ...]], Taken]] = {
    "whole": lambda d, s: (s, copy(s), None),
    "vocab": lambda d, s: _rows(s, ((0, d.vocab),)),  # the vocabulary's rows, its padding dropped
    "q": lambda d, s: _rows(s, _heads(d, 0, d.heads // d.groups)),
    "k": lambda d, s: _rows(s, _heads(d, d.heads // d.groups, 1)),
    "v": lambda d, s: _rows(s, _heads(d, d.heads // d.groups + 1, 1)),
    "gate": lambda d, s: _rows(s, _halves(d, s[0], False)),
    "up": lambda d, s: _rows(s, _halves(d, s[0], True)),
    "transposed": lambda d, s: ((s[1], s[0]), transpose(*s), None),  # (GPT-2's Conv1D, GPT-OSS's experts: [in, out])
    # GPT-OSS's experts interleave gate and up columns, `[in, (gate, up) x out]`; megatron's linear_fc1 is [gate; up]
    "interleaved": lambda d, s: ((s[1], s[0]), Arrangement("interleave", (2, s[0] // 2, s[1]), (2, 1, 0)), None),
    "interleaved_bias": lambda d, s: (s, Arrangement("interleave", (2, s[0] // 2), (1, 0)), None),
    # GPT-2's fused QKV groups its rows (3, heads, head_dim), transposed; megatron's (heads, 3, head_dim)
    "gpt2_qkv": lambda d, s: ((s[1], s[0]), Arrangement("qkv_weight", (d.heads, 3, d.head_dim, s[1]),
                                                        (3, 1, 0, 2)), None),
    "gpt2_qkv_bias": lambda d, s: (s, Arrangement("qkv_bias", (d.heads, 3, d.head_dim), (1, 0, 2)), None),
}


@dataclass(frozen=True)
class Entry:
    """One row of a family's tensor table: a Hugging Face name (`{i}`: the layer's number; `{e}`: an expert's, a
    row repeated for each expert) <- a source role's field (see `megatron.Names`), taken as `TAKES[take]` says. An
    expert's role without `{e}` in the name: every expert's, taken alike, fused into one tensor."""

    name: str
    role: str
    field: str = "weight"
    take: str = "whole"


class Family:
    """A model family: class attributes are its data, methods the hooks a table cannot say. Registered with
    `registry.register`; the planner, verify and the tokenizer know a family only through this interface."""

    name: str  # what --family names
    model_type: str  # config.json's
    architecture: str  # the Hugging Face class
    description: str
    traits: frozenset[str]  # what a checkpoint of the family shows, all of it
    optional: frozenset[str] = frozenset()  # what it may show besides
    providers: tuple[str, ...] = ()  # how cfg `_target_` class names that say this family begin (a tie-breaker)
    settings: tuple[str, ...] = ()  # the forward-changing settings (`settings.FORWARD`) it maps
    heads_key = "num_attention_heads"  # config.json's head count
    sentencepiece = False  # whether a conversion ships the checkpoint's SentencePiece tokenizer
    head: tuple[Entry, ...] = ()  # the tensor table: before the layers,
    layer: tuple[Entry, ...] = ()  # each layer's,
    tail: tuple[Entry, ...] = ()  # after them (an `output_layer` row only when the output layer is untied)

    def accepts(self, found: tuple[str, ...]) -> bool:
        return self.traits <= set(found) <= self.traits | self.optional

    def read_dims(self, hparam: HParam, shapes: dict[str, tuple[int, ...]], vocab_size: int | None = None,
                  num_heads: int | None = None, local_slices: int = 1) -> Dims:
        raise NotImplementedError

    def hf_config(self, hparam: HParam, dims: Dims, dtype_name: str) -> dict[str, Any]:
        raise NotImplementedError

    def tokenizer_settings(self, config: dict) -> dict:
        """`tokenizer_config.json` beside a shipped SentencePiece model (families with `sentencepiece`)."""
        raise NotImplementedError

    def source_shape(self, role: str, field: str, dims: Dims) -> tuple[int, ...]:
        """A role's tensor's shape in the source (a family with roles of its own adds theirs)."""
        return source_shape(role, field, dims)

    def layer_rows(self, dims: Dims, i: int) -> tuple[Entry, ...]:
        """Layer `i`'s rows of the table (a family whose layers differ says which kind `i` is)."""
        return self.layer

    def tensor_recipes(self, dims: Dims) -> list[TensorRecipe]:
        """Every output tensor, in the table's order, the layers' rows once per layer (an expert's once per
        expert)."""
        rows = [(r, None) for r in self.head] + [(r, i) for i in range(dims.layers) for r in self.layer_rows(dims, i)] \
            + [(r, None) for r in self.tail if not (r.role == "output_layer" and dims.tied)]
        out = []
        for entry, i in rows:
            shape = self.source_shape(entry.role, entry.field, dims)
            taken, arrangement, ranges = TAKES[entry.take](dims, shape)
            experts = [dims.names.source(entry.role, entry.field, i, e) for e in range(dims.experts)]
            if "{e}" in entry.name:  # (one tensor per expert)
                out += [TensorRecipe(entry.name.format(i=i, e=e), source, shape, taken, arrangement, row_ranges=ranges)
                        for e, source in enumerate(experts)]
            elif entry.role.startswith("expert_"):  # (the experts' tensors fused into one, expert after expert)
                out.append(TensorRecipe(entry.name.format(i=i), experts[0], shape, (dims.experts, *taken), arrangement,
                                        row_ranges=ranges, stacked=tuple(experts[1:])))
            else:
                out.append(TensorRecipe(entry.name.format(i=i), dims.names.source(entry.role, entry.field, i), shape,
                                        taken, arrangement, row_ranges=ranges))
        return out
