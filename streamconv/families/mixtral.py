"""Mixtral (`MixtralForCausalLM`): Llama's attention (a sliding window optional, as Mistral's) with a mixture of
experts in every layer: a softmax router whose top-k weights are renormalised, each expert a SwiGLU MLP
(`block_sparse_moe.experts.E.w1` the gate, `w3` the up, `w2` the down projection, one tensor each as the Hugging
Face Hub's Mixtral checkpoints hold them). Its `intermediate_size` is an expert's width."""

from __future__ import annotations

from typing import Any

from streamconv.errors import ConversionError
from streamconv.families import experts
from streamconv.families.base import EXPERTS, WINDOW, Dims, Entry, HParam, listed, sliding_window
from streamconv.families.llama import ATTENTION, Llama, decoder_dims
from streamconv.families.registry import register

MOE = "model.layers.{i}.block_sparse_moe."


@register
class Mixtral(Llama):
    name = "mixtral"
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    description = "Mixtral (Llama with a mixture of experts)"
    traits = Llama.traits | {EXPERTS}
    optional = Llama.optional | {WINDOW}
    providers = ("Mixtral",)
    settings = Llama.settings + experts.ROUTER_SETTINGS + ("window_size",)
    layer = (*ATTENTION, Entry("model.layers.{i}.post_attention_layernorm.weight", "mlp_norm"),
             Entry(MOE + "gate.weight", "router"),
             Entry(MOE + "experts.{e}.w1.weight", "expert_fc1", take="gate"),
             Entry(MOE + "experts.{e}.w3.weight", "expert_fc1", take="up"),
             Entry(MOE + "experts.{e}.w2.weight", "expert_fc2"))

    def read_dims(self, hparam: HParam, shapes: dict[str, tuple[int, ...]], vocab_size: int | None = None,
                  num_heads: int | None = None, local_slices: int = 1) -> Dims:
        dims = experts.read_experts(hparam, shapes, decoder_dims(hparam, shapes, vocab_size, num_heads, local_slices))
        if len(dims.moe_layers) != dims.layers:
            raise ConversionError(f"layers {sorted(set(range(dims.layers)) - dims.moe_layers)} have a dense MLP, which "
                                  "MixtralForCausalLM cannot express (every Mixtral layer has experts)")
        return dims

    def hf_config(self, hparam: HParam, dims: Dims, dtype_name: str) -> dict[str, Any]:
        """MixtralConfig keyword arguments."""
        router = experts.softmax_router(hparam, dims, self.architecture)
        if not router["norm_topk_prob"]:
            raise ConversionError("the cfg sets moe_router_pre_softmax True (the top k of a softmax over all experts, "
                                  "not renormalised): MixtralForCausalLM renormalises them; streamconv will not write "
                                  "a different model")
        config = self.decoder_config(hparam, dims, dtype_name, {
            "sliding_window": sliding_window(listed(hparam, "window_size")), "num_local_experts": dims.experts,
            "num_experts_per_tok": router["num_experts_per_tok"], "router_jitter_noise": 0.0})
        return {**config, "intermediate_size": dims.expert_ffn}
