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


# --- megatron-core 0.19's HybridModel without Mamba layers (tests/fixtures/mcore019-hybrid/, pattern '*-*-') -------

DENSE = FIXTURES.parent / "mcore019-hybrid"


def test_a_hybrid_stack_of_attention_and_mlp_layers_converts_as_its_dense_family(tmp_path):
    """megatron-core 0.19 builds GPT models as HybridModel: '*-*-' saves each transformer layer's attention and MLP
    as two layers (2k, 2k + 1). Read as pairs, it is a Llama model of 2 layers giving megatron-core's logits."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    result = streamconv.convert(DENSE / "checkpoints", tmp_path / "hf", vocab_size=256)
    assert result.config["architectures"] == ["LlamaForCausalLM"] and result.config["num_hidden_layers"] == 2
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    oracle = load_file(DENSE / "oracle.safetensors")
    with torch.no_grad():
        logits = model.eval()(oracle["input_ids"]).logits
    assert (logits - oracle["logits_fp32"]).abs().max() < 1e-4
    assert streamconv.verify(DENSE / "checkpoints", tmp_path / "hf") == []


@pytest.mark.parametrize("pattern", ["**--", "*-M-", "*-*-*-"])
def test_a_hybrid_pattern_other_than_attention_and_mlp_in_turn_is_refused(pattern):
    from streamconv.families import FAMILIES
    from streamconv.sources import open_checkpoint

    with open_checkpoint(DENSE / "checkpoints") as checkpoint:
        shapes = {k: t.shape for k, t in checkpoint.tensors.items()}

        def hparam(key, default=None, **null):
            return pattern if key == "hybrid_layer_pattern" else checkpoint.hparam(key, default, **null)

        with pytest.raises(streamconv.ConversionError) as caught:
            FAMILIES["llama"].read_dims(hparam, shapes, 256)
    assert f"layer pattern '{pattern}'), not attention and MLP layers in turn" in str(caught.value), caught.value
