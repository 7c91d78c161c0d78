"""Llama-style megatron-core GPT models (RMSNorm, SwiGLU, rotary positions, grouped-query attention, no biases)
to Hugging Face Llama (`LlamaForCausalLM`).

Both keep `nn.Linear`'s `[out, in]` layout, and megatron-core's default rotary layout is the half-split one
transformers uses, so no element moves: every output is a source tensor or some of its rows. megatron-core's
fused QKV weight groups its rows `(groups, heads / groups + 2, head_dim)`: each group's query heads, then its
key head, then its value head; `linear_fc1` is `[gate; up]`, whole in a distributed checkpoint, per rank
(`[gate_r; up_r]` on each of the tensor-parallel ranks) in state_dicts saved rank by rank.
"""

from __future__ import annotations

from typing import Any

from streamconv.errors import ConversionError, describe
from streamconv.families import base
from streamconv.families.base import (
    EITHER_ATTENTION,
    EITHER_OUTPUT,
    GATED,
    NO_BIASES,
    RMS_NORM,
    ROTARY,
    Dims,
    Entry,
    Family,
    HParam,
)
from streamconv.families.megatron import Names, check_matrices, layer_ids, names_of
from streamconv.families.registry import register

ROTARY_SETTINGS = ("rotary_base", "rotary_percent", "rotary_percentage", "rotary_interleaved",
                   "seq_len_interpolation_factor", "rope_scaling", "use_rope_scaling", "rope_scaling_factor",
                   "scale_positional_embedding", "scale_factor", "low_freq_factor", "high_freq_factor",
                   "old_context_len")
ATTENTION = (Entry("model.layers.{i}.input_layernorm.weight", "input_norm"),
             Entry("model.layers.{i}.self_attn.q_proj.weight", "qkv", take="q"),
             Entry("model.layers.{i}.self_attn.k_proj.weight", "qkv", take="k"),
             Entry("model.layers.{i}.self_attn.v_proj.weight", "qkv", take="v"),
             Entry("model.layers.{i}.self_attn.o_proj.weight", "proj"))
MLP = (Entry("model.layers.{i}.mlp.gate_proj.weight", "fc1", take="gate"),
       Entry("model.layers.{i}.mlp.up_proj.weight", "fc1", take="up"),
       Entry("model.layers.{i}.mlp.down_proj.weight", "fc2"))


@register
class Llama(Family):
    """The family the other megatron-core decoders (Qwen, Mistral, Gemma) extend: their dimensions are read
    alike, their tables and configs add what they have."""

    name = "llama"
    model_type = "llama"
    architecture = "LlamaForCausalLM"
    description = "Llama (RMSNorm, a SwiGLU MLP, rotary positions, no biases)"
    traits = frozenset({RMS_NORM, GATED, ROTARY, NO_BIASES})
    optional = EITHER_ATTENTION | EITHER_OUTPUT
    settings = ROTARY_SETTINGS + ("is_hybrid_model",)  # rotary positions, with their scalings; a hybrid stack
    head = (Entry("model.embed_tokens.weight", "embedding", take="vocab"),)
    layer = (*ATTENTION, Entry("model.layers.{i}.post_attention_layernorm.weight", "mlp_norm"), *MLP)
    tail = (Entry("model.norm.weight", "final_norm"), Entry("lm_head.weight", "output_layer", take="vocab"))

    def read_dims(self, hparam: HParam, shapes: dict[str, tuple[int, ...]], vocab_size: int | None = None,
                  num_heads: int | None = None, local_slices: int = 1) -> Dims:
        return decoder_dims(hparam, shapes, vocab_size, num_heads, local_slices)

    def hf_config(self, hparam: HParam, dims: Dims, dtype_name: str) -> dict[str, Any]:
        """LlamaConfig keyword arguments."""
        return self.decoder_config(hparam, dims, dtype_name, {"attention_bias": False, "mlp_bias": False})

    def rotary(self, hparam: HParam) -> dict[str, Any]:
        """The rotary positions' Hugging Face keys: one base, its scaling."""
        return {"rope_theta": base.number("rotary_base", hparam("rotary_base", 10000, null=None), float, above=0),
                "rope_scaling": _rope_scaling(hparam)}

    def decoder_config(self, hparam: HParam, dims: Dims, dtype_name: str, extra: dict[str, Any]) -> dict[str, Any]:
        """The Hugging Face config keys the megatron-core decoders share, the family's `extra` ones among them."""
        percent = next((p for p in (hparam("rotary_percent", 1.0), hparam("rotary_percentage", 1.0)) if p != 1.0),
                       1.0)
        if percent != 1.0 or base.flag(hparam, "rotary_interleaved"):  # (either spelling other than 1: refused)
            raise ConversionError(f"the cfg says rotary_percent {percent}, rotary_interleaved "
                                  f"{hparam('rotary_interleaved')}: Hugging Face {self.description.split(' (')[0]} "
                                  "rotates every dimension, half-split; streamconv cannot convert this model")
        return {
            "model_type": self.model_type,
            "architectures": [self.architecture],
            "vocab_size": dims.vocab,
            "hidden_size": dims.hidden,
            "intermediate_size": dims.ffn,
            "num_hidden_layers": dims.layers,
            "num_attention_heads": dims.heads,
            "num_key_value_heads": dims.groups,
            "head_dim": dims.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": dims.positions,
            "rms_norm_eps": base.epsilon(hparam),
            **self.rotary(hparam),
            **extra,
            "tie_word_embeddings": dims.tied,
            "initializer_range": base.init_std(hparam),
            "use_cache": True,
            "dtype": dtype_name,
        }


def decoder_dims(hparam: HParam, shapes: dict[str, tuple[int, ...]], vocab_size: int | None = None,
              num_heads: int | None = None, local_slices: int = 1) -> Dims:
    """A megatron-core decoder's dimensions from the cfg (`hparam(key)` reads one value), checked against the
    tensor shapes."""
    names = names_of(shapes)
    if names.scheme != "megatron-core":
        raise ConversionError("this Llama-style model uses legacy NeMo names (model.language_model.); "
                              "streamconv converts Llama-style models saved by megatron-core (NeMo 1.2x+, NeMo "
                              "2.0, Megatron-LM)")
    check_matrices(shapes, names)
    found = layer_ids(shapes, names)
    qkv, fc2 = shapes.get(names.of(0, "qkv", "weight")), shapes.get(names.of(0, "fc2", "weight"))
    stack = 2 if names.paired else 1  # (a hybrid stack's layers: attention and MLP layers in turn)
    values = base.sizes(hparam, {
        "hidden_size": shapes[names.embedding][1],
        "num_layers": stack * len(found),
        "ffn_hidden_size": fc2[1] if fc2 else None,
        "num_attention_heads": num_heads,
    }, num_heads)
    hidden, heads, ffn = values["hidden_size"], values["num_attention_heads"], values["ffn_hidden_size"]
    _check_hybrid(hparam, names.paired, len(found))
    base.check_layers(values["num_layers"] // stack, found)
    if heads <= 0:
        raise ConversionError(f"num_attention_heads is {heads}; check the cfg or --num-heads")
    kv_channels = hparam("kv_channels")  # (null: megatron-core's hidden / heads, as absent)
    head_dim = base.number("kv_channels", kv_channels, int, high=base.MAX_SIZE, above=0) \
        if kv_channels is not None else hidden // heads
    if head_dim <= 0 or kv_channels is None and hidden % heads:
        raise ConversionError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}, and the cfg "
                              "gives no kv_channels; check the cfg or --num-heads")
    if qkv is None:
        raise ConversionError(f"source tensor {names.of(0, 'qkv', 'weight')!r} is missing from the checkpoint's "
                              "state_dict")
    groups = _groups(qkv[0], heads, head_dim, names)
    said = hparam("num_query_groups", null=heads)  # (null: megatron-core's multi-head attention)
    if base.flag(hparam, "group_query_attention") is not False and said is not None and said != groups:
        raise ConversionError(f"the cfg says num_query_groups {said}, but {names.of(0, 'qkv', 'weight')!r} holds "
                              f"{groups} key/value groups of {heads} heads of {head_dim}; fix the cfg or --num-heads")
    if local_slices > 1 and (ffn % local_slices or groups % local_slices):
        raise ConversionError(f"the {local_slices} tensor-parallel ranks do not divide ffn_hidden_size {ffn} and "
                              f"{groups} key/value groups; are the ranks from one checkpoint?")
    return Dims(hidden, values["num_layers"] // stack, heads, groups, head_dim, ffn,
                *model_ends(hparam, shapes, names, vocab_size), gated=True, local_slices=local_slices)


def _check_hybrid(hparam: HParam, paired: bool, layers: int) -> None:
    """A hybrid stack converts as this decoder only as attention and MLP layers in turn, each pair one layer."""
    pattern = hparam("hybrid_layer_pattern") or hparam("hybrid_override_pattern")
    hybrid = base.flag(hparam, "is_hybrid_model") or pattern is not None
    if (hybrid or paired) and not (paired and pattern in (None, "*-" * layers)):
        shown = describe(pattern) if pattern is not None else "none"
        raise ConversionError(f"this is a hybrid stack (is_hybrid_model {describe(hparam('is_hybrid_model'))}, layer "
                              f"pattern {shown}), not attention and MLP layers in turn ('*-' for each of the "
                              f"{layers} layers its tensors hold): a megatron-core decoder family reads only those")


def model_ends(hparam: HParam, shapes: dict[str, tuple[int, ...]], names: Names,
               vocab_size: int | None) -> tuple[int, int, Names, int, bool]:
    """What a megatron-core decoder's `Dims` say of its ends: the context length, the vocabulary (its embedding
    rows padded beyond it), the naming scheme and whether the output layer is the embedding."""
    positions = hparam("max_position_embeddings", hparam("encoder_seq_length"))
    if positions is None:
        raise ConversionError("the cfg gives no context length (max_position_embeddings, seq_length), and a Llama "
                              "model's context length and rotary base are not in its tensors; convert the checkpoint "
                              "with its cfg (streamconv does not guess them)")
    if vocab_size is None:
        raise ConversionError("the vocabulary size is unknown (the checkpoint ships no SentencePiece tokenizer that "
                              "says it); pass --vocab-size N")
    if vocab_size <= 0:
        raise ConversionError(f"--vocab-size must be positive, got {vocab_size}")
    rows = shapes[names.embedding][0]
    if vocab_size > rows:
        raise ConversionError(f"vocabulary size {vocab_size} is larger than the {rows} embedding rows in the "
                              f"checkpoint; pass --vocab-size {rows} or less")
    return (base.number("max_position_embeddings", positions, int, high=base.MAX_POSITIONS, above=0), int(vocab_size),
            names, rows, names.output_layer not in shapes)


def _groups(rows: int, heads: int, head_dim: int, names: Names) -> int:
    """The key/value groups of a QKV weight with `rows` rows: (heads + 2 x groups) x head_dim of them."""
    groups, left = divmod(rows // head_dim - heads, 2) if rows % head_dim == 0 else (0, 1)
    if left or groups <= 0 or heads % groups:
        raise ConversionError(f"{names.of(0, 'qkv', 'weight')!r} has {rows} rows, not (heads + 2 x groups) x "
                              f"head_dim for {heads} heads of {head_dim}; check num_attention_heads (--num-heads) "
                              "and kv_channels")
    return groups


def _rope_scaling(hparam: HParam) -> dict[str, Any] | None:
    """Llama 3.1's frequency scaling or a linear position interpolation, as transformers' `rope_scaling`.

    megatron-core's own scaling (Megatron-LM's `use_rope_scaling`, Megatron-Bridge's `rope_scaling`, NeMo 1.x's
    `scale_positional_embedding`) reads only its factor (`rope_scaling_factor`, 8 by default): the low and high
    frequency factors and the original context are fixed at 1, 4 and 8192 there. NeMo 2.0's Llama31Config scales
    with its own four fields (`scale_factor`, `low_freq_factor`, `high_freq_factor`, `old_context_len`). Linear
    interpolation (`seq_len_interpolation_factor`) divides the positions; transformers has no form for it together
    with Llama 3.1's scaling, nor for both scalings at once, so those are refused."""
    core = any(base.flag(hparam, key) for key in ("use_rope_scaling", "rope_scaling", "scale_positional_embedding"))
    nemo2 = hparam("old_context_len") is not None
    linear = hparam("seq_len_interpolation_factor")
    if (core or nemo2) and linear is not None or core and nemo2:
        raise ConversionError("the cfg asks for two rotary scalings at once (" + ", ".join(
            what for what, on in (("megatron-core's Llama 3.1 scaling", core), ("NeMo 2.0's old_context_len", nemo2),
                                  (f"seq_len_interpolation_factor {linear}", linear is not None)) if on)
            + "), which Hugging Face Llama cannot express; streamconv will not write a different model")
    if core:
        return {"rope_type": "llama3", "factor": base.number(
                    "rope_scaling_factor", hparam("rope_scaling_factor", 8.0, null=None), float, above=0),
                "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if nemo2:
        low, high = (base.number(key, hparam(key, default, null=None), float, above=0)
                     for key, default in (("low_freq_factor", 1.0), ("high_freq_factor", 4.0)))
        if not low < high:
            raise ConversionError(f"the cfg says low_freq_factor {low:g} and high_freq_factor {high:g}: Llama 3.1's "
                                  "scaling needs the low one below the high one; fix the checkpoint's cfg")
        return {"rope_type": "llama3", "factor": base.number("scale_factor", hparam("scale_factor", 8.0, null=None),
                                                             float, above=0),
                "low_freq_factor": low, "high_freq_factor": high,
                "original_max_position_embeddings": base.number(
                    "old_context_len", hparam("old_context_len", 8192, null=None), int, high=base.MAX_POSITIONS,
                    above=0)}
    if linear is not None:
        return {"rope_type": "linear", "factor": base.number("seq_len_interpolation_factor", linear, float, above=0)}
    return None
