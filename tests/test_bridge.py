"""Checkpoints Megatron-Bridge 0.6.2 itself wrote (tests/fixtures/bridge062/: a tiny random Hugging Face Llama imported
by Bridge on CPU and saved as a run folder, TP 1 and 2; see tests/fixtures/README.md). They carry no hyper-parameters
in the common state: the architecture and the true vocabulary are in run_config.yaml, the tokenizer in tokenizer/.
Converted with no flag at all, the output is the Hugging Face model Bridge imported, parameter for parameter.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import streamconv
from tests.test_fixtures_bridge062 import FIXTURES, MANIFEST
from tests.test_mcore import refused


def output_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for name in folder.glob("*.safetensors"):
        out.update(load_file(name))
    return out


@pytest.mark.parametrize("case", sorted(MANIFEST["cases"]))
def test_a_bridge_run_folder_converts_with_no_flag_to_the_model_bridge_imported(tmp_path, case):
    source = FIXTURES / MANIFEST["cases"][case]["checkpoint"]
    result = streamconv.convert(source, tmp_path / "hf")
    hf = FIXTURES / MANIFEST["hf"]["folder"]
    ours, theirs = output_tensors(tmp_path / "hf"), load_file(hf / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
    config, original = result.config, json.loads((hf / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"):
        assert config[key] == original[key], key
    assert config["rope_theta"] == original["rope_parameters"]["rope_theta"] == 500000.0
    assert "vocabulary 256 from the 'model' section of run_config.yaml" in result.summary()
    assert "tokenizer files copied and checked" in result.summary()
    tokenizer = source / "iter_0000000" / "tokenizer" / "tokenizer.json"
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == tokenizer.read_bytes()
    assert streamconv.verify(source, tmp_path / "hf") == []


def test_the_converted_model_computes_what_the_imported_one_does(tmp_path):
    from transformers import LlamaForCausalLM

    streamconv.convert(FIXTURES / MANIFEST["cases"]["tp2"]["checkpoint"], tmp_path / "hf")
    ids = torch.tensor([[3, 17, 200, 5, 99]])
    with torch.no_grad():
        ours = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)(ids).logits
        theirs = LlamaForCausalLM.from_pretrained(FIXTURES / "hf", dtype=torch.float32)(ids).logits
    assert torch.equal(ours, theirs)


def test_run_config_yaml_is_read_by_the_setting_rule(tmp_path):
    """A setting Hugging Face Llama cannot express, put into Bridge's run_config.yaml, is refused by name."""
    source = shutil.copytree(FIXTURES / MANIFEST["cases"]["tp1"]["checkpoint"], tmp_path / "run")
    path = source / "iter_0000000" / "run_config.yaml"
    text = path.read_text()
    assert "\n  qk_layernorm: false\n" in text
    path.write_text(text.replace("\n  qk_l2_norm: false\n", "\n  qk_l2_norm: true\n"))
    assert "the cfg sets qk_l2_norm True" in refused(source, tmp_path)


def test_a_run_config_without_its_model_section_is_refused(tmp_path):
    source = shutil.copytree(FIXTURES / MANIFEST["cases"]["tp1"]["checkpoint"], tmp_path / "run")
    (source / "iter_0000000" / "run_config.yaml").write_text("train:\n  train_iters: 10\n")
    assert "run_config.yaml has no model: section" in refused(source, tmp_path)


@pytest.mark.parametrize("family, named", [
    ("qwen2", "biases on the query, key and value projections only"),
    ("qwen3", "query and key layer norms"),
    ("mistral", "the cfg sets window_size <a list of 2 items>"),
    ("gemma3", "the cfg sets softmax_scale 0.14433756729740646"),
])
def test_forcing_llama_on_the_next_families_is_refused_by_name(tmp_path, family, named):
    """Megatron-Bridge 0.6.2's own checkpoints of the next families (tests/fixtures/bridge062-families/, converted
    in tests/test_families.py): forced to be Llama, each is refused in one line naming what Hugging Face Llama
    cannot express."""
    source = FIXTURES.parent / "bridge062-families" / family / "tp1"
    assert named in refused(source, tmp_path, "--family", "llama")
