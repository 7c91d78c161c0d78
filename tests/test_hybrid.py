"""Hybrid Mamba models against the models Megatron-Bridge 0.6.2 imported (tests/fixtures/bridge062-hybrid/: a tiny
random NemotronHForCausalLM, and a Nemotron-3-Nano-style one with expert layers, imported by Bridge on CPU and saved
at TP 1 and 2; see tests/fixtures/README.md). Converted with no flag, each loads with no missing or unexpected key,
equals the original parameter for parameter, computes its logits (32 tokens: one Mamba chunk), and its config.json
describes the same model."""

from __future__ import annotations

import pytest

import streamconv
from tests.test_families import SAME_MODEL, assert_converts_to_the_original, edited_run
from tests.test_fixtures_bridge062_hybrid import FIXTURES, MANIFEST
from tests.test_settings import plan_error

RUNS = [(family, run) for family, case in sorted(MANIFEST["families"].items()) for run in case["runs"]]
SAME_HYBRID = (*SAME_MODEL, "layers_block_type", "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups",
               "conv_kernel", "chunk_size", "layer_norm_epsilon", "mlp_hidden_act", "use_conv_bias", "use_bias",
               "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
               "moe_shared_expert_intermediate_size", "n_group", "topk_group", "norm_topk_prob",
               "routed_scaling_factor")


@pytest.mark.parametrize("family, run", RUNS)
def test_a_hybrid_model_converts_to_the_model_bridge_imported(tmp_path, family, run):
    case = MANIFEST["families"][family]
    assert_converts_to_the_original(FIXTURES / case["runs"][run]["checkpoint"], FIXTURES / case["hf"],
                                    FIXTURES / case["logits"], tmp_path / "hf", "nemotron-h", SAME_HYBRID)


def _edited_run(tmp_path, family: str, old: str, new: str):
    return edited_run(FIXTURES / MANIFEST["families"][family]["runs"]["tp1"]["checkpoint"], tmp_path, old, new)


@pytest.mark.parametrize("old, new, says", [
    ("hybrid_layer_pattern: M*M-", "hybrid_layer_pattern: M*M-/*-", "has multi-token-prediction layers (after '/')"),
    ("hybrid_layer_pattern: M*M-", "hybrid_layer_pattern: M*MG", "has layers of kind 'G'"),
    ("hybrid_layer_pattern: M*M-", "hybrid_layer_pattern: M*-M", "layer_norm_weight' is missing from the checkpoint"),
    ("hybrid_layer_pattern: M*M-", "hybrid_layer_pattern: M*M-M", "has 5 layers, num_layers says 4"),
    ("layernorm_epsilon: 1.0e-05", "layernorm_epsilon: 1.0e-06", "megatron-core's Mamba mixer normalises with 1e-05"),
])
def test_a_pattern_or_setting_the_hybrid_family_cannot_express_is_refused(tmp_path, old, new, says):
    message = plan_error(_edited_run(tmp_path, "nemotron_h", f"\n  {old}\n", f"\n  {new}\n"))
    assert says in message, message


def test_the_pattern_not_num_moe_experts_says_which_layers_have_experts(tmp_path):
    """Bridge leaves transformers' default num_moe_experts (8) in a dense Nemotron-H's run_config.yaml: the pattern
    has no E, so the model has no experts; in the Nano one, a pattern moving an E is refused."""
    config = streamconv.convert(FIXTURES / "nemotron_h" / "tp1", None, dry_run=True).config
    assert config["architectures"] == ["NemotronHForCausalLM"] and "n_routed_experts" not in config
    message = plan_error(_edited_run(tmp_path, "nemotron3_nano", "\n  hybrid_layer_pattern: M*EM-E\n",
                                     "\n  hybrid_layer_pattern: M*EME-\n"))
    assert "layer pattern puts experts in layers [2, 4], but the checkpoint has routers in layers [2, 5]" in message
