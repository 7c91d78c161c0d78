"""Qwen3-MoE (`Qwen3MoeForCausalLM`): Qwen3's attention (query and key norms per head) with a mixture of experts,
a softmax router and no shared experts, each expert a SwiGLU MLP; layers without experts (`mlp_only_layers`) have
Qwen3's dense MLP. Its experts are written one tensor each (`mlp.experts.E.gate_proj.weight`), as the Hugging Face
Hub's Qwen3-MoE checkpoints hold them."""

from __future__ import annotations

from typing import Any

from streamconv.families import experts
from streamconv.families.base import EXPERTS, QK_NORM, Dims, Entry, HParam
from streamconv.families.llama import ATTENTION, MLP, Llama, decoder_dims
from streamconv.families.registry import register

NORMS = (Entry("model.layers.{i}.self_attn.q_norm.weight", "q_norm"),
         Entry("model.layers.{i}.self_attn.k_norm.weight", "k_norm"),
         Entry("model.layers.{i}.post_attention_layernorm.weight", "mlp_norm"))
EXPERT_MLP = (Entry("model.layers.{i}.mlp.gate.weight", "router"),
              Entry("model.layers.{i}.mlp.experts.{e}.gate_proj.weight", "expert_fc1", take="gate"),
              Entry("model.layers.{i}.mlp.experts.{e}.up_proj.weight", "expert_fc1", take="up"),
              Entry("model.layers.{i}.mlp.experts.{e}.down_proj.weight", "expert_fc2"))


@register
class Qwen3Moe(Llama):
    name = "qwen3-moe"
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    description = "Qwen3-MoE (Qwen3 with a mixture of experts)"
    traits = Llama.traits | {QK_NORM, EXPERTS}
    providers = ("Qwen3MoE", "Qwen3Moe")
    settings = Llama.settings + experts.ROUTER_SETTINGS
    layer = (*ATTENTION, *NORMS, *EXPERT_MLP)

    def layer_rows(self, dims: Dims, i: int) -> tuple[Entry, ...]:
        return self.layer if i in dims.moe_layers else (*ATTENTION, *NORMS, *MLP)

    def read_dims(self, hparam: HParam, shapes: dict[str, tuple[int, ...]], vocab_size: int | None = None,
                  num_heads: int | None = None, local_slices: int = 1) -> Dims:
        dims = decoder_dims(hparam, shapes, vocab_size, num_heads, local_slices)
        return experts.read_experts(hparam, shapes, dims)

    def hf_config(self, hparam: HParam, dims: Dims, dtype_name: str) -> dict[str, Any]:
        """Qwen3MoeConfig keyword arguments: every layer listed in `mlp_only_layers` or not has experts, as
        megatron-core's `moe_layer_freq` says (`decoder_sparse_step` 1)."""
        return self.decoder_config(hparam, dims, dtype_name, {
            "attention_bias": False, "use_sliding_window": False, "num_experts": dims.experts,
            "moe_intermediate_size": dims.expert_ffn, **experts.softmax_router(hparam, dims, self.architecture),
            "decoder_sparse_step": 1, "mlp_only_layers": sorted(set(range(dims.layers)) - dims.moe_layers)})
