"""Mistral (`MistralForCausalLM`): Llama, with a sliding attention window in every layer where the cfg sets one.

Without a window a Mistral model is a Llama one: the cfg's `_target_` (Megatron-Bridge's MistralModelProvider,
NeMo 2.0's MistralConfig*) says which to write."""

from __future__ import annotations

from typing import Any

from streamconv.families.base import WINDOW, Dims, HParam, listed, sliding_window
from streamconv.families.llama import Llama
from streamconv.families.registry import register


@register
class Mistral(Llama):
    name = "mistral"
    model_type = "mistral"
    architecture = "MistralForCausalLM"
    description = "Mistral (Llama with a sliding attention window)"
    optional = Llama.optional | {WINDOW}
    providers = ("Mistral",)
    settings = (*Llama.settings, "window_size")

    def hf_config(self, hparam: HParam, dims: Dims, dtype_name: str) -> dict[str, Any]:
        """MistralConfig keyword arguments."""
        window = sliding_window(listed(hparam, "window_size"))
        return self.decoder_config(hparam, dims, dtype_name, {"sliding_window": window})

