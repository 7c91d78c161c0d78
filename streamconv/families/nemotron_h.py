"""Nemotron-H and Nemotron-3 (`NemotronHForCausalLM`): megatron-core's hybrid stack, whose layers are not alike.

Its layer pattern (`hybrid_layer_pattern`, e.g. `M*M-`, Hugging Face's `hybrid_override_pattern`) gives each
layer's kind: `M` a Mamba-2 mixer, `*` attention without positions, `-` a squared-ReLU MLP, `E` a mixture of
squared-ReLU experts with shared experts and DeepSeek's sigmoid router. Each layer is one norm and one mixer
(`backbone.layers.N.norm`, `.mixer`). A Mamba mixer's input projection `[z; x; B; C; dt]` and its convolution
`[x; B; C]` are the tensors the sources join from megatron-core's named row blocks, rows in order; nothing moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streamconv.errors import ConversionError, describe
from streamconv.families import base, experts
from streamconv.families.base import (
    EITHER_ATTENTION,
    EITHER_OUTPUT,
    EXPERTS,
    MAMBA,
    MAX_SIZE,
    NO_BIASES,
    NO_POSITIONS,
    PLAIN,
    RMS_NORM,
    SQUARED_RELU,
    Dims,
    Entry,
    Family,
    HParam,
)
from streamconv.families.llama import _groups, model_ends
from streamconv.families.megatron import check_matrices, layer_ids, names_of
from streamconv.families.registry import register

LAYER = "backbone.layers.{i}."
KINDS = {"M": "Mamba", "*": "attention", "-": "MLP", "E": "mixture of experts"}
ROWS = {
    "M": (Entry(LAYER + "norm.weight", "mamba_norm"), Entry(LAYER + "mixer.in_proj.weight", "in_proj"),
          Entry(LAYER + "mixer.conv1d.weight", "conv1d"), Entry(LAYER + "mixer.conv1d.bias", "conv1d", "bias"),
          Entry(LAYER + "mixer.A_log", "mixer", "A_log"), Entry(LAYER + "mixer.D", "mixer", "D"),
          Entry(LAYER + "mixer.dt_bias", "mixer", "dt_bias"), Entry(LAYER + "mixer.norm.weight", "gated_norm"),
          Entry(LAYER + "mixer.out_proj.weight", "out_proj")),
    "*": (Entry(LAYER + "norm.weight", "input_norm"), Entry(LAYER + "mixer.q_proj.weight", "qkv", take="q"),
          Entry(LAYER + "mixer.k_proj.weight", "qkv", take="k"), Entry(LAYER + "mixer.v_proj.weight", "qkv", take="v"),
          Entry(LAYER + "mixer.o_proj.weight", "proj")),
    "-": (Entry(LAYER + "norm.weight", "mlp_norm"), Entry(LAYER + "mixer.up_proj.weight", "fc1"),
          Entry(LAYER + "mixer.down_proj.weight", "fc2")),
    "E": (Entry(LAYER + "norm.weight", "mlp_norm"), Entry(LAYER + "mixer.gate.weight", "router"),
          Entry(LAYER + "mixer.gate.e_score_correction_bias", "router", "expert_bias"),
          Entry(LAYER + "mixer.experts.{e}.up_proj.weight", "expert_fc1"),
          Entry(LAYER + "mixer.experts.{e}.down_proj.weight", "expert_fc2"),
          Entry(LAYER + "mixer.shared_experts.up_proj.weight", "shared_fc1"),
          Entry(LAYER + "mixer.shared_experts.down_proj.weight", "shared_fc2")),
}
MAMBA_EPS = 1e-5  # megatron-core's Mamba mixer fixes its gated norm's epsilon; transformers' takes the model's


@dataclass(frozen=True)
class HybridDims(Dims):
    pattern: str = ""  # each layer's kind (`KINDS`)
    mamba_heads: int = 0
    mamba_head_dim: int = 0
    state: int = 0  # B's and C's width per group
    mamba_groups: int = 0
    conv_kernel: int = 0

    @property
    def inner(self) -> int:  # the mixer's width (z, x)
        return self.mamba_heads * self.mamba_head_dim


@register
class NemotronH(Family):
    name = "nemotron-h"
    model_type = "nemotron_h"
    architecture = "NemotronHForCausalLM"
    description = "Nemotron-H and Nemotron-3 (Mamba-2, attention, squared-ReLU MLP and expert layers by a pattern)"
    traits = frozenset({RMS_NORM, PLAIN, NO_POSITIONS, NO_BIASES, MAMBA, SQUARED_RELU})
    optional = EITHER_ATTENTION | EITHER_OUTPUT | {EXPERTS}
    providers = ("Hybrid", "NemotronH", "Nemotron3", "MambaModel")
    settings = experts.ROUTER_SETTINGS + ("is_hybrid_model", "mamba_state_dim", "mamba_head_dim", "mamba_num_groups",
                                          "mamba_num_heads")
    head = (Entry("backbone.embeddings.weight", "embedding", take="vocab"),)
    tail = (Entry("backbone.norm_f.weight", "final_norm"), Entry("lm_head.weight", "output_layer", take="vocab"))

    def layer_rows(self, dims: Dims, i: int) -> tuple[Entry, ...]:
        return ROWS[dims.pattern[i]]

    def source_shape(self, role: str, field: str, dims: Dims) -> tuple[int, ...]:
        d = dims
        assert isinstance(d, HybridDims)
        blocks = d.inner + 2 * d.mamba_groups * d.state  # (x, B, C: what the convolution sees)
        shape = {"in_proj": (d.inner + blocks + d.mamba_heads, d.hidden),
                 "conv1d": (blocks, 1, d.conv_kernel) if field == "weight" else (blocks,),
                 "mixer": (d.mamba_heads,), "gated_norm": (d.inner,), "out_proj": (d.hidden, d.inner)}.get(role)
        return shape if shape is not None else super().source_shape(role, field, dims)

    def read_dims(self, hparam: HParam, shapes: dict[str, tuple[int, ...]], vocab_size: int | None = None,
                  num_heads: int | None = None, local_slices: int = 1) -> Dims:
        if local_slices > 1:
            raise ConversionError(f"this hybrid model is saved rank by rank in {local_slices} tensor-parallel "
                                  "slices; streamconv converts hybrid models from distributed checkpoints")
        names = names_of(shapes)
        check_matrices(shapes, names)
        pattern = _pattern(hparam)
        found = layer_ids(shapes, names)
        first = {kind: pattern.index(kind) for kind in KINDS if kind in pattern}
        fc2 = shapes.get(names.of(first["-"], "fc2", "weight")) if "-" in first else None
        values = base.sizes(hparam, {"hidden_size": shapes[names.embedding][1], "num_layers": len(found),
                                     "ffn_hidden_size": fc2[1] if fc2 else None, "num_attention_heads": num_heads},
                            num_heads)
        base.check_layers(values["num_layers"], found)
        if len(pattern) != values["num_layers"]:
            raise ConversionError(f"the cfg's layer pattern {pattern!r} has {len(pattern)} layers, num_layers says "
                                  f"{values['num_layers']}; fix the checkpoint's cfg")
        hidden, heads = values["hidden_size"], values["num_attention_heads"]
        kv = hparam("kv_channels")
        head_dim = base.number("kv_channels", kv, int, above=0, high=MAX_SIZE) if kv is not None else hidden // heads
        groups = heads
        if "*" in first:
            qkv = shapes.get(names.of(first["*"], "qkv", "weight"))
            if qkv is None:
                raise ConversionError(f"layer {first['*']} is an attention layer by the cfg's pattern, but the "
                                      f"checkpoint has no {names.of(first['*'], 'qkv', 'weight')!r}")
            groups = _groups(qkv[0], heads, head_dim, names)
        mamba = {}
        if "M" in first:
            conv = shapes.get(names.of(first["M"], "conv1d", "weight"))
            if conv is None or len(conv) != 3:
                raise ConversionError(f"layer {first['M']} is a Mamba layer by the cfg's pattern, but the checkpoint "
                                      f"has no {names.of(first['M'], 'conv1d', 'weight')!r} of (channels, 1, kernel)")
            mamba = base.sizes(hparam, {"mamba_num_heads": None, "mamba_head_dim": None, "mamba_state_dim": None,
                                        "mamba_num_groups": None}, None)
            mamba["conv"] = base.number("the convolution's kernel", conv[2], int, above=0, high=MAX_SIZE)
            eps = hparam("layernorm_epsilon", 1e-5, null=None)
            if eps != MAMBA_EPS:
                raise ConversionError(f"the cfg sets layernorm_epsilon {describe(eps)}: megatron-core's Mamba mixer "
                                      f"normalises with {MAMBA_EPS} whatever it says, NemotronHForCausalLM with the "
                                      "model's; streamconv will not write a different model")
        dims = HybridDims(hidden, values["num_layers"], heads, groups, head_dim, values["ffn_hidden_size"],
                          *model_ends(hparam, shapes, names, vocab_size), gated=False, pattern=pattern,
                          mamba_heads=mamba.get("mamba_num_heads", 0), mamba_head_dim=mamba.get("mamba_head_dim", 0),
                          state=mamba.get("mamba_state_dim", 0), mamba_groups=mamba.get("mamba_num_groups", 0),
                          conv_kernel=mamba.get("conv", 0))
        if "E" in first:
            dims = experts.read_experts(hparam, shapes, dims, {i for i, kind in enumerate(pattern) if kind == "E"})
        return dims

    def hf_config(self, hparam: HParam, dims: Dims, dtype_name: str) -> dict[str, Any]:
        """NemotronHConfig keyword arguments (its pattern as the Hub's configs spell it)."""
        assert isinstance(dims, HybridDims)
        config = {
            "model_type": self.model_type,
            "architectures": [self.architecture],
            "vocab_size": dims.vocab,
            "hidden_size": dims.hidden,
            "hybrid_override_pattern": dims.pattern,
            "num_hidden_layers": dims.layers,
            "num_attention_heads": dims.heads,
            "num_key_value_heads": dims.groups,
            "head_dim": dims.head_dim,
            "intermediate_size": dims.ffn,
            "mlp_hidden_act": "relu2",
            "attention_bias": False,
            "mlp_bias": False,
            "use_bias": False,
            "use_conv_bias": True,
            "layer_norm_epsilon": base.epsilon(hparam),
            "max_position_embeddings": dims.positions,
            "tie_word_embeddings": dims.tied,
            "initializer_range": base.init_std(hparam),
            "use_cache": True,
            "dtype": dtype_name,
        }
        if dims.mamba_heads:
            config.update(mamba_num_heads=dims.mamba_heads, mamba_head_dim=dims.mamba_head_dim,
                          ssm_state_size=dims.state, n_groups=dims.mamba_groups, conv_kernel=dims.conv_kernel,
                          chunk_size=base.number("mamba_chunk_size", hparam("mamba_chunk_size", 128, null=None), int,
                                                 above=0, high=MAX_SIZE), mamba_hidden_act="silu")
        if dims.experts:
            config.update(**experts.sigmoid_router(hparam, dims, self.architecture),
                          moe_intermediate_size=dims.expert_ffn, moe_shared_expert_intermediate_size=dims.shared_ffn,
                          n_shared_experts=1 if dims.shared_ffn else 0)
        return config


def _pattern(hparam: HParam) -> str:
    """The hybrid layer pattern (megatron-core 0.19's `hybrid_layer_pattern`, earlier `hybrid_override_pattern`)."""
    pattern = hparam("hybrid_layer_pattern") or hparam("hybrid_override_pattern")
    if not isinstance(pattern, str) or not pattern:
        raise ConversionError(f"the cfg gives no hybrid_layer_pattern ({describe(pattern)}): a hybrid model's layers "
                              "are known by it alone; convert the checkpoint with its cfg")
    if "/" in pattern:
        raise ConversionError(f"the cfg's layer pattern {pattern!r} has multi-token-prediction layers (after '/'): "
                              "streamconv does not export them yet; convert a checkpoint saved without them")
    odd = sorted(set(pattern) - set(KINDS))
    if odd or len(pattern) > base.MAX_SIZE:
        raise ConversionError(f"the cfg's layer pattern {pattern[:80]!r} has layers of kind {odd[0]!r}, which "
                              f"streamconv does not know (it knows {', '.join(f'{k} {v}' for k, v in KINDS.items())})")
    return pattern
