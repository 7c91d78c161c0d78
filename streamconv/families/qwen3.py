"""Qwen3 (`Qwen3ForCausalLM`): Llama with an RMSNorm over each query and key head (megatron-core's `qk_layernorm`:
`self_attention.q_layernorm`, `k_layernorm`) and a head size of its own (`kv_channels`, not hidden / heads)."""

from __future__ import annotations

from typing import Any

from streamconv.families.base import QK_NORM, Dims, Entry, HParam
from streamconv.families.llama import ATTENTION, MLP, Llama
from streamconv.families.registry import register


@register
class Qwen3(Llama):
    name = "qwen3"
    model_type = "qwen3"
    architecture = "Qwen3ForCausalLM"
    description = "Qwen3 (Llama with query and key norms)"
    traits = Llama.traits | {QK_NORM}
    layer = (*ATTENTION, Entry("model.layers.{i}.self_attn.q_norm.weight", "q_norm"),
             Entry("model.layers.{i}.self_attn.k_norm.weight", "k_norm"),
             Entry("model.layers.{i}.post_attention_layernorm.weight", "mlp_norm"), *MLP)

    def hf_config(self, hparam: HParam, dims: Dims, dtype_name: str) -> dict[str, Any]:
        """Qwen3Config keyword arguments (its q/k norms share rms_norm_eps, as megatron-core's share
        layernorm_epsilon)."""
        return self.decoder_config(hparam, dims, dtype_name, {"attention_bias": False, "use_sliding_window": False})
