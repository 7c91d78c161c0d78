"""GPT-OSS (`GptOssForCausalLM`): biases on every projection, a learned softmax sink per head, sliding and full
attention layers in turn, YaRN rotary positions, and a mixture of experts in every layer: a biased softmax top-k
router, each expert a gated MLP of the quick GELU (`x * sigmoid(1.702 x)`) with clamped inputs and `up + 1`.

As the Hugging Face Hub's GPT-OSS checkpoints hold them, a layer's experts are fused (`mlp.experts.gate_up_proj`,
`[experts, hidden, 2 x width]`, gate and up columns interleaved; `down_proj` `[experts, width, hidden]`): each is
its experts' megatron-core tensors, transposed (and interleaved) one expert at a time, so no buffer holds more than
one expert's matrix.
"""

from __future__ import annotations

from typing import Any

from streamconv.errors import ConversionError, describe
from streamconv.families import base, experts
from streamconv.families.base import (
    BIASES,
    EITHER_ATTENTION,
    EITHER_OUTPUT,
    EXPERTS,
    GATED,
    QUICK_GELU,
    RMS_NORM,
    ROTARY,
    WINDOW,
    YARN,
    Dims,
    Entry,
    Family,
    HParam,
    listed,
    sliding_window,
)
from streamconv.families.llama import ATTENTION, ROTARY_SETTINGS, decoder_dims
from streamconv.families.registry import register

LAYER = "model.layers.{i}."
ATTENTION_BIASES = (Entry(LAYER + "self_attn.q_proj.bias", "qkv", "bias", "q"),
                    Entry(LAYER + "self_attn.k_proj.bias", "qkv", "bias", "k"),
                    Entry(LAYER + "self_attn.v_proj.bias", "qkv", "bias", "v"),
                    Entry(LAYER + "self_attn.o_proj.bias", "proj", "bias"),
                    Entry(LAYER + "self_attn.sinks", "sinks", "softmax_offset"))
MOE = (Entry(LAYER + "post_attention_layernorm.weight", "mlp_norm"),
       Entry(LAYER + "mlp.router.weight", "router"), Entry(LAYER + "mlp.router.bias", "router", "bias"),
       Entry(LAYER + "mlp.experts.gate_up_proj", "expert_fc1", take="interleaved"),
       Entry(LAYER + "mlp.experts.gate_up_proj_bias", "expert_fc1", "bias", "interleaved_bias"),
       Entry(LAYER + "mlp.experts.down_proj", "expert_fc2", take="transposed"),
       Entry(LAYER + "mlp.experts.down_proj_bias", "expert_fc2", "bias"))
# megatron-core's YaRN fields for `position_embedding_type: yarn`, with TransformerConfig's defaults
YARN_FIELDS = {"yarn_rotary_scaling_factor": None, "yarn_original_max_position_embeddings": None,
               "yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0, "yarn_mscale": None, "yarn_mscale_all_dim": None}


@register
class GptOss(Family):
    name = "gpt-oss"
    model_type = "gpt_oss"
    architecture = "GptOssForCausalLM"
    description = "GPT-OSS (biases, attention sinks, sliding and full attention, YaRN, a mixture of quick-GELU experts)"
    traits = frozenset({RMS_NORM, GATED, ROTARY, BIASES, QUICK_GELU, YARN, EXPERTS})
    optional = EITHER_ATTENTION | EITHER_OUTPUT | {WINDOW}
    providers = ("GPTOSS", "GptOss")
    settings = ROTARY_SETTINGS + experts.ROUTER_SETTINGS + (
        "softmax_type", "window_size", "window_attn_skip_freq", "activation_func_clamp_value", "glu_linear_offset")
    head = (Entry("model.embed_tokens.weight", "embedding", take="vocab"),)
    layer = (*ATTENTION, *ATTENTION_BIASES, *MOE)
    tail = (Entry("model.norm.weight", "final_norm"), Entry("lm_head.weight", "output_layer", take="vocab"))

    def read_dims(self, hparam: HParam, shapes: dict[str, tuple[int, ...]], vocab_size: int | None = None,
                  num_heads: int | None = None, local_slices: int = 1) -> Dims:
        if local_slices > 1:  # (each rank's [gate_r; up_r] would have to be interleaved rank by rank)
            raise ConversionError(f"this GPT-OSS model is saved rank by rank in {local_slices} tensor-parallel "
                                  "slices; streamconv converts GPT-OSS from distributed checkpoints")
        dims = experts.read_experts(hparam, shapes, decoder_dims(hparam, shapes, vocab_size, num_heads))
        if len(dims.moe_layers) != dims.layers:
            raise ConversionError(f"layers {sorted(set(range(dims.layers)) - dims.moe_layers)} have a dense MLP, which "
                                  "GptOssForCausalLM cannot express (every GPT-OSS layer has experts)")
        return dims

    def hf_config(self, hparam: HParam, dims: Dims, dtype_name: str) -> dict[str, Any]:
        """GptOssConfig keyword arguments."""
        model = self.architecture
        softmax = hparam("softmax_type", "vanilla")
        if softmax != "learnable":
            raise ConversionError(f"the cfg sets softmax_type {describe(softmax)}: {model} has a learned sink per head "
                                  "(megatron-core's 'learnable'); streamconv will not write a different model")
        offset, clamp = hparam("glu_linear_offset", 0.0), hparam("activation_func_clamp_value")
        if offset != 1.0 or clamp is None:
            raise ConversionError(f"the cfg sets glu_linear_offset {describe(offset)}, activation_func_clamp_value "
                                  f"{describe(clamp)}: {model}'s experts add 1 to the linear half and clamp both "
                                  "halves; streamconv will not write a different model")
        router = experts.softmax_router(hparam, dims, model)
        if not router["norm_topk_prob"]:
            raise ConversionError(f"the cfg sets moe_router_pre_softmax True: {model}'s router takes a softmax over "
                                  "the top k logits; streamconv will not write a different model")
        window = sliding_window(listed(hparam, "window_size"))
        return {
            "model_type": self.model_type,
            "architectures": [model],
            "vocab_size": dims.vocab,
            "hidden_size": dims.hidden,
            "intermediate_size": dims.expert_ffn,
            "num_hidden_layers": dims.layers,
            "num_attention_heads": dims.heads,
            "num_key_value_heads": dims.groups,
            "head_dim": dims.head_dim,
            "num_local_experts": dims.experts,
            "num_experts_per_tok": router["num_experts_per_tok"],
            "swiglu_limit": base.number("activation_func_clamp_value", clamp, float, above=0),
            "sliding_window": window or 128,
            "layer_types": _layer_types(hparam, dims.layers, window),
            "max_position_embeddings": dims.positions,
            "rms_norm_eps": base.epsilon(hparam),
            "rope_theta": base.number("rotary_base", hparam("rotary_base", 10000, null=None), float, above=0),
            "rope_scaling": _yarn(hparam),
            "attention_bias": True,
            "tie_word_embeddings": dims.tied,
            "initializer_range": base.init_std(hparam),
            "use_cache": True,
            "dtype": dtype_name,
        }


def _layer_types(hparam: HParam, layers: int, window: int | None) -> list[str]:
    """Which layers slide their window, as megatron-core's `window_attn_skip_freq` says: every layer where it is
    unset, all but every Nth (counted from 1) for N, each layer's 0 (full) or 1 (sliding) for a list."""
    skip = listed(hparam, "window_attn_skip_freq", most=layers)
    if window is None:
        sliding = [False] * layers
    elif skip is None:
        sliding = [True] * layers
    elif isinstance(skip, tuple) and len(skip) == layers and all(s in (0, 1) and not isinstance(s, bool)
                                                                   for s in skip):
        sliding = [bool(s) for s in skip]
    else:
        every = base.number("window_attn_skip_freq", skip, int, above=0, high=layers)
        sliding = [(i + 1) % every != 0 for i in range(layers)]
    return ["sliding_attention" if s else "full_attention" for s in sliding]


def _yarn(hparam: HParam) -> dict[str, Any]:
    """YaRN as megatron-core's `position_embedding_type: yarn` applies it (its `yarn_*` fields), to every dimension
    of a head, half-split; no other scaling with it."""
    others = {key: hparam(key) for key in ("rotary_percent", "rotary_interleaved", "seq_len_interpolation_factor",
                                           "rope_scaling", "use_rope_scaling")}
    set_ = [(key, value) for key, value in others.items() if value is not None and (
        value != 1.0 or isinstance(value, bool) if key == "rotary_percent" else value is not False)]
    if set_:
        key, value = set_[0]
        raise ConversionError(f"the cfg sets {key} {describe(value)} with YaRN positions, which GptOssForCausalLM "
                              "cannot express; streamconv will not write a different model")
    values = {key: hparam(key, default) for key, default in YARN_FIELDS.items()}
    for key, value in values.items():
        if value is not None:
            values[key] = base.number(key, value, float, low=0)
    if values["yarn_rotary_scaling_factor"] is None or values["yarn_original_max_position_embeddings"] is None:
        raise ConversionError("the cfg's YaRN positions give no yarn_rotary_scaling_factor or "
                              "yarn_original_max_position_embeddings; fix the checkpoint's cfg")
    round_to_int = hparam("yarn_correction_range_round_to_int")
    return base.yarn_scaling(values["yarn_rotary_scaling_factor"], values["yarn_original_max_position_embeddings"],
                             values["yarn_beta_fast"], values["yarn_beta_slow"], values["yarn_mscale"],
                             values["yarn_mscale_all_dim"], truncate=round_to_int is not False)
