"""Gemma 3, text only (`Gemma3ForCausalLM`, `gemma3_text`), as Megatron-Bridge's Gemma3ModelProvider builds it.

Its RMSNorms store gamma zero-centred and scale by (1 + gamma) on both sides (`layernorm_zero_centered_gamma`), so
they are copied as they are. A layer has four of them: before attention (`linear_qkv.layer_norm_weight`), after it
(`linear_proj.post_layernorm`), before the MLP (`linear_fc1.layer_norm_weight`) and after it
(`linear_fc2.post_layernorm`), besides the per-head query and key norms; the MLP is gated by the tanh GELU
(`fast_gelu`), and the embedding is scaled by sqrt(hidden) on both sides. Layers alternate local and global
attention by `interleaved_attn_pattern` (local, global): layer n (from 1) is global when the pattern's length divides
it. Local layers see `window_size` keys and rotate by `rotary_base[0]`, global ones see all and rotate by
`rotary_base[1]`. `softmax_scale` is transformers' `query_pre_attn_scalar ** -0.5`.
"""

from __future__ import annotations

import math
from typing import Any

from streamconv.errors import ConversionError, describe, is_whole
from streamconv.families.base import (
    POST_NORMS,
    QK_NORM,
    SCALED_EMBEDDING,
    TANH_GELU,
    TWO_BASES,
    WINDOW,
    ZERO_CENTRED,
    Dims,
    Entry,
    HParam,
    listed,
    number,
    sliding_window,
)
from streamconv.families.llama import ATTENTION, MLP, Llama
from streamconv.families.registry import register


@register
class Gemma3(Llama):
    name = "gemma3"
    model_type = "gemma3_text"
    architecture = "Gemma3ForCausalLM"
    description = ("Gemma 3 (zero-centred RMSNorm, four norms a layer, query and key norms, a tanh-GELU gated MLP, "
                   "local and global attention)")
    traits = Llama.traits | {ZERO_CENTRED, QK_NORM, POST_NORMS, TANH_GELU, SCALED_EMBEDDING, WINDOW}
    optional = Llama.optional | {TWO_BASES}
    providers = ("Gemma3",)
    settings = ("rotary_base", "rotary_percent", "rotary_percentage", "rotary_interleaved", "rope_scaling",
                "rope_scaling_factor", "window_size", "softmax_scale")
    layer = (*ATTENTION, Entry("model.layers.{i}.self_attn.q_norm.weight", "q_norm"),
             Entry("model.layers.{i}.self_attn.k_norm.weight", "k_norm"),
             Entry("model.layers.{i}.post_attention_layernorm.weight", "post_attention_norm"),
             Entry("model.layers.{i}.pre_feedforward_layernorm.weight", "mlp_norm"),
             Entry("model.layers.{i}.post_feedforward_layernorm.weight", "post_mlp_norm"), *MLP)

    def rotary(self, hparam: HParam) -> dict[str, Any]:
        """The local and global layers' rotary bases. The provider scales the global layers' frequencies by
        `rope_scaling_factor` (never by megatron-core's own `rope_scaling`, which it refuses): not mapped yet, so
        only a factor of 1 converts."""
        bases = listed(hparam, "rotary_base")
        if not (isinstance(bases, tuple) and len(bases) == 2):
            bases = (bases, bases) if bases is not None else (10000, 1000000)  # (one base: every layer's)
        local, main = (number("rotary_base", b, float, above=0) for b in bases)
        factor = hparam("rope_scaling_factor", 1.0, null=None)
        if hparam("rope_scaling") or factor != 1.0:
            raise ConversionError(f"the cfg sets rope_scaling {hparam('rope_scaling')} and rope_scaling_factor "
                                  f"{describe(factor)}: Gemma 3's scaling of its global layers is not mapped yet; "
                                  "streamconv converts Gemma 3 with a factor of 1 only")
        return {"rope_theta": main, "rope_local_base_freq": local}

    def hf_config(self, hparam: HParam, dims: Dims, dtype_name: str) -> dict[str, Any]:
        """Gemma3TextConfig keyword arguments."""
        window = listed(hparam, "window_size")  # (Bridge's: the keys a local layer sees; megatron-core's: (left, 0))
        keys = window if is_whole(window) and 0 < window <= 2**24 else sliding_window(window)
        if keys is None:
            raise ConversionError(f"the cfg sets window_size {describe(window)}: Gemma 3's local layers need a window; "
                                  "fix the checkpoint's cfg")
        pattern = listed(hparam, "interleaved_attn_pattern") or (5, 1)  # (the provider's default)
        if not (isinstance(pattern, tuple) and len(pattern) == 2 and all(is_whole(n) and 0 <= n <= dims.layers
                                                                          for n in pattern) and sum(pattern) > 0):
            raise ConversionError(f"the cfg sets interleaved_attn_pattern {describe(pattern)}, not a count of local "
                                  "and of global layers; fix the checkpoint's cfg")
        every = int(sum(pattern))
        config = self.decoder_config(hparam, dims, dtype_name, {
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": _pre_attention_scalar(hparam("softmax_scale"), dims.head_dim),
            "sliding_window": int(keys),
            "layer_types": ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                            for i in range(dims.layers)],
            "attention_bias": False,
        })
        del config["hidden_act"]
        return config


def _pre_attention_scalar(softmax_scale: Any, head_dim: int) -> float | int:
    """transformers scales attention scores by `query_pre_attn_scalar ** -0.5`, megatron-core by `softmax_scale`
    (None: head_dim ** -0.5); a whole number where the scale is one's inverse square root (48 for 48 ** -0.5)."""
    if softmax_scale is None:
        return head_dim
    scalar = number("softmax_scale", softmax_scale, float, above=0, high=1e6) ** -2
    return round(scalar) if math.isclose(scalar, round(scalar), rel_tol=1e-9) else scalar
