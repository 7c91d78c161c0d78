"""Mixture-of-experts families against the models Megatron-Bridge 0.6.2 imported (tests/fixtures/bridge062-moe/: a
tiny random Hugging Face model per family imported by Bridge on CPU and saved as run folders, one rank, two
expert-parallel ranks, Transformer Engine's names; see tests/fixtures/README.md). Converted with no flag, each loads
with no missing or unexpected key, equals the original parameter for parameter, computes its logits, and its
config.json describes the same model: experts, top-k, router scoring, shared experts."""

from __future__ import annotations

import pytest

from tests.test_families import SAME_MODEL, assert_converts_to_the_original
from tests.test_fixtures_bridge062_moe import FIXTURES, MANIFEST, RUNS

FAMILY = {"qwen3_moe": "qwen3-moe"}  # fixture folder -> --family name
SAME_EXPERTS = (*SAME_MODEL, "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
                "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers")


@pytest.mark.parametrize("family, run", RUNS)
def test_a_moe_family_converts_to_the_model_bridge_imported(tmp_path, family, run):
    case = MANIFEST["families"][family]
    assert_converts_to_the_original(FIXTURES / case["runs"][run]["checkpoint"], FIXTURES / case["hf"],
                                    FIXTURES / case["logits"], tmp_path / "hf", FAMILY[family], SAME_EXPERTS)
