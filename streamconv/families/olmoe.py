"""OLMoE (`OlmoeForCausalLM`): Llama with one RMSNorm over the whole query and another over the whole key (not per
head, as Qwen3's), and a mixture of experts in every layer: a softmax router (its top-k weights renormalised or
not: `norm_topk_prob`), each expert a SwiGLU MLP written one tensor each (`mlp.experts.E.gate_proj.weight`), as the
Hugging Face Hub's OLMoE checkpoints hold them. Its `intermediate_size` is an expert's width."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from streamconv.errors import ConversionError
from streamconv.families import experts
from streamconv.families.base import EXPERTS, QK_NORM, WHOLE_QK_NORM, Dims, HParam
from streamconv.families.llama import ATTENTION, Llama, decoder_dims
from streamconv.families.qwen3_moe import EXPERT_MLP, NORMS
from streamconv.families.registry import register


@register
class Olmoe(Llama):
    name = "olmoe"
    model_type = "olmoe"
    architecture = "OlmoeForCausalLM"
    description = "OLMoE (Llama with whole-width query and key norms and a mixture of experts)"
    traits = Llama.traits | {QK_NORM, WHOLE_QK_NORM, EXPERTS}
    providers = ("OlMoE", "Olmoe", "OLMoE")
    settings = Llama.settings + experts.ROUTER_SETTINGS
    layer = (*ATTENTION, *NORMS, *EXPERT_MLP)

    def read_dims(self, hparam: HParam, shapes: dict[str, tuple[int, ...]], vocab_size: int | None = None,
                  num_heads: int | None = None, local_slices: int = 1) -> Dims:
        dims = experts.read_experts(hparam, shapes, decoder_dims(hparam, shapes, vocab_size, num_heads, local_slices))
        if dims.groups != dims.heads:  # (megatron-core's key norm is as wide as the query's, OLMoE's as the key)
            raise ConversionError(f"this OLMoE model has {dims.groups} key/value groups of {dims.heads} heads: its "
                                  "key norm covers all query heads, OlmoeForCausalLM's only the key's; streamconv "
                                  "will not write a different model")
        if len(dims.moe_layers) != dims.layers:
            raise ConversionError(f"layers {sorted(set(range(dims.layers)) - dims.moe_layers)} have a dense MLP, which "
                                  "OlmoeForCausalLM cannot express (every OLMoE layer has experts)")
        return replace(dims, qk_norm_width=dims.heads * dims.head_dim)

    def hf_config(self, hparam: HParam, dims: Dims, dtype_name: str) -> dict[str, Any]:
        """OlmoeConfig keyword arguments (no query/key/value clipping: megatron-core has none)."""
        config = self.decoder_config(hparam, dims, dtype_name, {
            "attention_bias": False, "clip_qkv": None, "num_experts": dims.experts,
            **experts.softmax_router(hparam, dims, self.architecture)})
        return {**config, "intermediate_size": dims.expert_ffn}
