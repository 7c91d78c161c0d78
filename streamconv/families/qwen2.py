"""Qwen2 and Qwen2.5 (`Qwen2ForCausalLM`): Llama with biases on the query, key and value projections only
(megatron-core's `add_qkv_bias`), split out of `linear_qkv.bias` by the same head rows as the weight."""

from __future__ import annotations

from typing import Any

from streamconv.families.base import QKV_BIAS, Dims, Entry, HParam
from streamconv.families.llama import MLP, Llama
from streamconv.families.registry import register


@register
class Qwen2(Llama):
    name = "qwen2"
    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"
    description = "Qwen2 (Llama with biases on the query, key and value projections)"
    traits = Llama.traits | {QKV_BIAS}
    layer = (
        Entry("model.layers.{i}.input_layernorm.weight", "input_norm"),
        Entry("model.layers.{i}.self_attn.q_proj.weight", "qkv", take="q"),
        Entry("model.layers.{i}.self_attn.q_proj.bias", "qkv", "bias", take="q"),
        Entry("model.layers.{i}.self_attn.k_proj.weight", "qkv", take="k"),
        Entry("model.layers.{i}.self_attn.k_proj.bias", "qkv", "bias", take="k"),
        Entry("model.layers.{i}.self_attn.v_proj.weight", "qkv", take="v"),
        Entry("model.layers.{i}.self_attn.v_proj.bias", "qkv", "bias", take="v"),
        Entry("model.layers.{i}.self_attn.o_proj.weight", "proj"),
        Entry("model.layers.{i}.post_attention_layernorm.weight", "mlp_norm"),
        *MLP,
    )

    def hf_config(self, hparam: HParam, dims: Dims, dtype_name: str) -> dict[str, Any]:
        """Qwen2Config keyword arguments (every layer attends to the whole context)."""
        return self.decoder_config(hparam, dims, dtype_name, {"use_sliding_window": False})
