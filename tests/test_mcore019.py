"""Checkpoints megatron-core 0.19.2 itself wrote (tests/fixtures/mcore019/, Python 3.12; see tests/fixtures/README.md):
no common.pt, the hyper-parameters in the `common_state` bytes item, one .distcp per rank. Each converts with no flag
beyond what the checkpoint cannot know, to megatron-core 0.19.2's own logits (its fp32 forward pass, recorded by the
generator); a bare folder, which carries no hyper-parameters, needs --num-heads for GPT-SW3 and is refused for Llama.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

import streamconv
from streamconv.errors import ConversionError
from tests.test_fixtures_mcore019 import CASES, FIXTURES
from tests.test_llama import llama_logits
from tests.test_mcore import hf_logits


def oracle(name: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / CASES[name]["oracle"])


def logits_of(name: str, folder) -> torch.Tensor:
    ids = oracle(name)["input_ids"]
    return llama_logits(folder, ids) if name.startswith("llama") else hf_logits(folder, ids)


@pytest.mark.parametrize("name", sorted(n for n in CASES if not n.endswith("-bare")))
def test_megatron_core_0_19_checkpoints_convert_with_no_flag_but_the_vocabulary(tmp_path, name):
    case = CASES[name]
    result = streamconv.convert(FIXTURES / case["checkpoint"], tmp_path / "hf", vocab_size=case["params"]["vocab"])
    assert result.config["model_type"] == ("llama" if name.startswith("llama") else "gpt2")
    assert (logits_of(name, tmp_path / "hf") - oracle(name)["logits_fp32"]).abs().max() < 1e-4
    assert streamconv.verify(FIXTURES / case["checkpoint"], tmp_path / "hf") == []


def test_a_bare_gpt_sw3_folder_needs_only_the_head_count(tmp_path):
    case = CASES["gpt_sw3-bare"]
    with pytest.raises(ConversionError, match="pass num_heads=N"):
        streamconv.convert(FIXTURES / case["checkpoint"], tmp_path / "hf", vocab_size=256)
    streamconv.convert(FIXTURES / case["checkpoint"], tmp_path / "hf", vocab_size=256, num_heads=4)
    assert (logits_of("gpt_sw3-bare", tmp_path / "hf") - oracle("gpt_sw3-bare")["logits_fp32"]).abs().max() < 1e-4


def test_a_bare_llama_folder_is_refused_naming_what_the_tensors_lack(tmp_path):
    with pytest.raises(ConversionError, match="context length and rotary base are not in its tensors"):
        streamconv.convert(FIXTURES / CASES["llama_gqa-bare"]["checkpoint"], tmp_path / "hf", vocab_size=256,
                           num_heads=4)
    assert not (tmp_path / "hf").exists()


def test_verify_checks_megatron_cores_integrity_manifest(tmp_path):
    """integrity.json (written by megatron-core's own save_integrity_manifest) names each file's SHA-256: verify
    hashes them, so a change that leaves the weights alone (here metadata.json) is found."""
    case = CASES["llama_gqa-nemo1_train"]
    source = shutil.copytree(FIXTURES / case["checkpoint"], tmp_path / "ckpt")
    assert (source / "integrity.json").is_file()
    streamconv.convert(source, tmp_path / "hf", vocab_size=256)
    assert streamconv.verify(source, tmp_path / "hf") == []
    (source / "metadata.json").write_text((source / "metadata.json").read_text() + " ")
    assert streamconv.verify(source, tmp_path / "hf") == [
        f"{source}/metadata.json: its SHA-256 is not the one integrity.json recorded: the checkpoint changed after it "
        "was saved"]
    (source / "integrity.json").write_text('{"algorithm": "sha256", "files": {"../hf/config.json": "0"}}')
    problems = streamconv.verify(source, tmp_path / "hf")
    assert len(problems) == 1 and "names '../hf/config.json', which cannot be read" in problems[0], problems
    for name in ("a", "b"):  # links to one big file, listed many times, are read once
        (source / name).symlink_to(source / "__0_0.distcp")
    (source / "integrity.json").write_text('{"files": {"a": "0", "b": "0"}}')
    problems = streamconv.verify(source, tmp_path / "hf")
    assert len(problems) == 2 and "names 'b', which cannot be read (the same bytes as another entry)" in problems[1]
