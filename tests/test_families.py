"""The families after Llama, each against the model Megatron-Bridge 0.6.2 imported (tests/fixtures/bridge062-families/:
a tiny random Hugging Face model per family, its norms perturbed, imported by Bridge on CPU and saved as a run folder;
its logits computed by transformers; see tests/fixtures/README.md). Converted with no flag, the output loads with no
missing or unexpected key, equals the original parameter for parameter, computes its logits, and its config.json
describes the same model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import streamconv
from streamconv.families import FAMILIES
from tests.test_fixtures_bridge062_families import FIXTURES, MANIFEST

CONVERTED = ("qwen2", "qwen3", "mistral", "gemma3")  # (one name a family)
# config.json keys that say which model it is (sizes, norms, rotary bases, windows, scaling, tying)
SAME_MODEL = ("model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
              "rope_parameters", "sliding_window", "layer_types", "query_pre_attn_scalar", "hidden_act",
              "hidden_activation", "tie_word_embeddings", "attention_bias", "use_sliding_window")


def _load(folder):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                       output_loading_info=True)
    return model.eval(), info


def _described(config) -> dict:
    """A config's keys, with the head size as the model computes it (Qwen2's config has no head_dim of its own:
    its attention reads one where given, else hidden / heads)."""
    values = config.to_dict()
    values["head_dim"] = values.get("head_dim") or values["hidden_size"] // values["num_attention_heads"]
    return values


@pytest.mark.parametrize("family, layout", [(f, layout) for f in CONVERTED for layout in ("tp1", "tp2")
                                            if layout == "tp1" or "tp2" in MANIFEST["families"][f]])
def test_a_family_converts_to_the_model_bridge_imported(tmp_path, family, layout):
    case = MANIFEST["families"][family]
    source = FIXTURES / (case["checkpoint"] if layout == "tp1" else case["tp2"]["checkpoint"])
    assert_converts_to_the_original(source, FIXTURES / case["hf"], FIXTURES / case["logits"], tmp_path / "hf",
                                    family, SAME_MODEL)


def assert_converts_to_the_original(source, hf, logits_file, out, family: str, same_model: tuple[str, ...]) -> None:
    """`source` converted with no flag into `out`: loads as `family` with no missing or unexpected key, equals the
    Hugging Face model in `hf` parameter for parameter, computes the oracle's logits within 1e-4, says the same
    `same_model` keys in config.json, and passes verify."""
    result = streamconv.convert(source, out)
    assert result.config["model_type"] == FAMILIES[family].model_type
    ours, info = _load(out)
    assert {k: v for k, v in info.items() if v} == {}, info
    theirs, _ = _load(hf)
    assert type(ours) is type(theirs)
    mine, original = ours.state_dict(), theirs.state_dict()
    assert sorted(mine) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(mine[name], tensor), name
    oracle = load_file(logits_file)
    with torch.no_grad():
        logits = ours(input_ids=oracle["input_ids"]).logits
    assert torch.allclose(logits, oracle["logits"], atol=1e-4, rtol=0), (logits - oracle["logits"]).abs().max()
    written, expected = _described(ours.config), _described(theirs.config)
    for key in same_model:
        assert written.get(key) == expected.get(key), (key, written.get(key), expected.get(key))
    assert streamconv.verify(source, out) == []


def test_each_fixture_is_chosen_as_its_own_family():
    for family in CONVERTED:
        plan = streamconv.convert(FIXTURES / MANIFEST["families"][family]["checkpoint"], None, dry_run=True)
        assert plan.config["architectures"] == [FAMILIES[family].architecture], family


def test_the_registry_lists_six_families_and_every_fixture_is_converted():
    assert {"gemma3", "gpt-sw3", "llama", "mistral", "qwen2", "qwen3"} <= set(FAMILIES)
    assert sorted(CONVERTED) == sorted(MANIFEST["families"])
    assert sorted(f for f, case in MANIFEST["families"].items() if "tp2" in case) == ["gemma3", "qwen2"]


def test_the_cfgs_provider_class_says_mistral_where_no_window_does(tmp_path):
    """A Mistral model without a window is a Llama model: Megatron-Bridge's MistralModelProvider in run_config.yaml
    says which to write; the same cfg under the generic provider is Llama."""
    import shutil

    source = shutil.copytree(FIXTURES / MANIFEST["families"]["mistral"]["checkpoint"], tmp_path / "run")
    path = source / "iter_0000000" / "run_config.yaml"
    text = path.read_text()
    assert "\n  window_size:\n  - 15\n  - 0\n" in text
    path.write_text(text.replace("\n  window_size:\n  - 15\n  - 0\n", "\n  window_size: null\n"))
    planned = streamconv.convert(source, None, dry_run=True).config
    assert planned["architectures"] == ["MistralForCausalLM"] and planned["sliding_window"] is None
    generic = "megatron.bridge.models.gpt_provider.GPTModelProvider"
    path.write_text(path.read_text().replace("megatron.bridge.models.mistral.mistral_provider.MistralModelProvider",
                                             generic))
    assert streamconv.convert(source, None, dry_run=True).config["architectures"] == ["LlamaForCausalLM"]


def edited_run(run, tmp_path, old: str, new: str):
    """A copy of a Megatron-Bridge run folder whose run_config.yaml has `old` replaced by `new`."""
    import shutil

    source = shutil.copytree(run, tmp_path / "run")
    path = source / "iter_0000000" / "run_config.yaml"
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))
    return source
