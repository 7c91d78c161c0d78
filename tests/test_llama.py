"""Llama-style megatron-core models (RMSNorm, SwiGLU, rotary positions, grouped-query attention, no biases, an untied
output layer), written by megatron-core itself (tests/mcore_models.py with `groups`), converted to LlamaForCausalLM.

Oracles: megatron-core's own logits of each model (its forward pass in fp32 on the stored weights) against
transformers' logits of the converted folder; every output tensor against torch's own `dcp_to_torch_save` reading
of the checkpoint put through the mapping written out below; the same model in every container converting to the
same bytes.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import streamconv
from benchmarks.launcher import peak_rss_of
from tests.conftest import run_cli
from tests.test_mcore import output_tensors, refused
from tests.test_mcore_writer import _have_megatron_core, whole

if not _have_megatron_core():
    pytest.skip("megatron-core is not installed", allow_module_level=True)

VOCAB = 256
CASES = {
    "gqa_nemo1_fp32": dict(groups=2, layout="nemo1", dtype="fp32"),
    "gqa_nemo1_tp2": dict(groups=2, layout="nemo1", tp=2),
    "gqa_megatron_lm_tp2": dict(groups=2, layout="megatron_lm", tp=2),
    "gqa_nemo2_tp2pp2": dict(groups=2, layout="nemo2", tp=2, pp=2),
    "gqa_nemo1_train_tp2pp2_fp32": dict(groups=2, layout="nemo1_train", tp=2, pp=2, dtype="fp32"),
    "gqa_legacy_tp2": dict(groups=2, layout="legacy_container", tp=2),
    "gqa_legacy_tp2pp2_fp32": dict(groups=2, layout="legacy_container", tp=2, pp=2, dtype="fp32"),
    "mha_nemo1_tp2": dict(groups=4, layout="nemo1", tp=2),
    "gqa_two_groups_a_rank_legacy_tp2": dict(groups=4, heads=8, layout="legacy_container", tp=2),
    "mha_legacy_tp2_fp32": dict(groups=4, layout="legacy_container", tp=2, dtype="fp32"),
    "mqa_megatron_lm_fp32": dict(groups=1, layout="megatron_lm", dtype="fp32"),
    "gqa_nemo1_folder_tp2": dict(groups=2, layout="nemo1_folder", tp=2),
    "tied_nemo2_tp2pp2": dict(groups=2, layout="nemo2", tp=2, pp=2, tied=True),
    "tied_legacy_pp2": dict(groups=2, layout="legacy_container", pp=2, tied=True),
}


@pytest.fixture(scope="session")
def cases(mcore_cases):
    return mcore_cases(CASES)


def llama_logits(folder, input_ids):
    from transformers import LlamaForCausalLM

    model, info = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return model.eval()(input_ids).logits


@pytest.mark.parametrize("name", CASES)
def test_logits_match_megatron_core(cases, tmp_path, name):
    case = cases[name]
    result = streamconv.convert(case.checkpoint, tmp_path / "hf", vocab_size=VOCAB)
    assert result.config["model_type"] == "llama"
    assert result.config["num_key_value_heads"] == case.config["groups"]
    assert result.config["rope_theta"] == 500000.0 and result.config["tie_word_embeddings"] is case.config["tied"]
    assert ("lm_head.weight" in output_tensors(tmp_path / "hf")) is not case.config["tied"]
    logits = llama_logits(tmp_path / "hf", case.input_ids)
    assert (logits - case.logits_fp32).abs().max() < 1e-4
    assert streamconv.verify(case.checkpoint, tmp_path / "hf") == []


def expected_llama(sd: dict, c: dict) -> dict[str, torch.Tensor]:
    """The mapping, written out independently: megatron-core's stacked global tensors -> Hugging Face Llama."""
    h, heads, groups, f = c["hidden"], c["heads"], c["groups"], c["ffn"]
    hd, per = h // heads, heads // groups
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"][:VOCAB],
           "model.norm.weight": sd["decoder.final_layernorm.weight"],
           "lm_head.weight": sd["output_layer.weight"][:VOCAB]}
    layer = "decoder.layers."
    for i in range(c["layers"]):
        qkv = sd[layer + "self_attention.linear_qkv.weight"][i].reshape(groups, per + 2, hd, h)
        fc1 = sd[layer + "mlp.linear_fc1.weight"][i]
        out |= {f"model.layers.{i}.{k}": v for k, v in {
            "input_layernorm.weight": sd[layer + "self_attention.linear_qkv.layer_norm_weight"][i],
            "self_attn.q_proj.weight": qkv[:, :per].reshape(heads * hd, h),
            "self_attn.k_proj.weight": qkv[:, per].reshape(groups * hd, h),
            "self_attn.v_proj.weight": qkv[:, per + 1].reshape(groups * hd, h),
            "self_attn.o_proj.weight": sd[layer + "self_attention.linear_proj.weight"][i],
            "post_attention_layernorm.weight": sd[layer + "mlp.linear_fc1.layer_norm_weight"][i],
            "mlp.gate_proj.weight": fc1[:f], "mlp.up_proj.weight": fc1[f:],
            "mlp.down_proj.weight": sd[layer + "mlp.linear_fc2.weight"][i]}.items()}
    return out


def test_every_tensor_is_the_mapping_of_torchs_own_reading(cases, tmp_path):
    case = cases["gqa_nemo1_folder_tp2"]
    streamconv.convert(case.checkpoint, tmp_path / "hf", vocab_size=VOCAB)
    got = output_tensors(tmp_path / "hf")
    expected = expected_llama(whole(case.checkpoint / "model_weights", "model."), case.config)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name].view(torch.int16),
                                                              tensor.contiguous().view(torch.int16)), name


def test_every_container_gives_the_same_bytes(cases, tmp_path):
    """The same model saved whole (distributed) and rank by rank (per-rank [gate_r; up_r]) converts alike."""
    for names in (("gqa_nemo1_tp2", "gqa_megatron_lm_tp2", "gqa_nemo2_tp2pp2", "gqa_legacy_tp2"),
                  ("gqa_nemo1_fp32", "gqa_nemo1_train_tp2pp2_fp32", "gqa_legacy_tp2pp2_fp32")):
        made = set()
        for name in names:
            streamconv.convert(cases[name].checkpoint, tmp_path / name, vocab_size=VOCAB)
            made.add((tmp_path / name / "model.safetensors").read_bytes())
        assert len(made) == 1, names


def test_a_cast_keeps_the_logits(cases, tmp_path):
    case = cases["gqa_nemo1_tp2"]
    result = streamconv.convert(case.checkpoint, tmp_path / "hf", vocab_size=VOCAB, dtype="fp32")
    assert result.config["dtype"] == "float32"
    assert (llama_logits(tmp_path / "hf", case.input_ids) - case.logits_fp32).abs().max() < 1e-4
    assert streamconv.verify(case.checkpoint, tmp_path / "hf") == []


def test_a_changed_tensor_is_found_by_verify(cases, tmp_path):
    case = cases["gqa_megatron_lm_tp2"]
    streamconv.convert(case.checkpoint, tmp_path / "hf", vocab_size=VOCAB)
    from safetensors.torch import save_file

    tensors = output_tensors(tmp_path / "hf")
    tensors["model.layers.1.self_attn.k_proj.weight"][3, 5] += 1
    save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    problems = streamconv.verify(case.checkpoint, tmp_path / "hf")
    assert any("model.layers.1.self_attn.k_proj.weight" in p for p in problems), problems


def test_without_a_vocabulary_size_it_asks_for_one(cases, tmp_path):
    out = tmp_path / "out"
    done = run_cli("--checkpoint-path", str(cases["gqa_megatron_lm_tp2"].checkpoint), "--save-path", str(out),
                   "--quiet")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "pass --vocab-size N" in done.stderr
    assert not out.exists()


def test_the_shipped_sentencepiece_model_gives_the_vocabulary(cases, tmp_path):
    pytest.importorskip("sentencepiece")
    result = streamconv.convert(cases["gqa_nemo1_tp2"].checkpoint, tmp_path / "hf")
    assert result.config["vocab_size"] == VOCAB
    assert "no tokenizer copied (its SentencePiece model is not copied for this family yet" in result.note


def test_a_hub_tokenizer_the_cfg_names_is_said_not_fetched(cases, tmp_path):
    result = streamconv.convert(cases["gqa_megatron_lm_tp2"].checkpoint, tmp_path / "hf", vocab_size=VOCAB)
    assert "the cfg names 'meta-llama/Meta-Llama-3-8B' as its tokenizer, not fetched" in result.note
    assert not [n for n in os.listdir(tmp_path / "hf") if n.startswith("tokenizer")]


def test_forcing_the_wrong_family_is_one_line(cases, tmp_path):
    assert "rotary_base 500000 (megatron-core's default: 10000), which GPT2LMHeadModel cannot express" in refused(
        cases["gqa_megatron_lm_tp2"].checkpoint, tmp_path, "--family", "gpt-sw3")


def test_biases_on_a_llama_style_model_are_refused_naming_them(cases, tmp_path):
    import shutil

    import yaml

    folder = tmp_path / "nemo"
    import tarfile

    with tarfile.open(cases["gqa_nemo1_tp2"].checkpoint) as tar:
        tar.extractall(folder, filter="data")
    cfg = yaml.safe_load((folder / "model_config.yaml").read_text())
    cfg["bias"] = True
    (folder / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    message = refused(folder, tmp_path)
    assert "RMSNorm, a gated MLP, rotary positions, grouped-query attention, biases" in message
    shutil.rmtree(folder)


def test_memory_stays_bounded_by_the_read_buffers(mcore_cases, tmp_path):
    """Every Llama tensor is copied in order (no output buffer): a model of 8 MiB layers converts in the read
    buffers' memory over a tiny model's."""
    wide = dict(groups=4, layout="nemo1", hidden=1024, heads=16, ffn=4096, vocab=2048, layers=4, seq=64)
    made = mcore_cases({"wide": wide, "tiny": dict(groups=2, layout="nemo1", layers=1)})
    peaks = {name: peak_rss_of([sys.executable, "-m", "streamconv", "--checkpoint-path", str(case.checkpoint),
                                "--save-path", str(tmp_path / name), "--vocab-size", str(case.config["vocab"]),
                                "--quiet"]) for name, case in made.items()}
    largest = 2 * 4096 * 1024 * 2  # linear_fc1 in bf16: 16 MiB, never held whole
    assert peaks["wide"] < peaks["tiny"] + largest + 48 * 2**20, peaks


@pytest.mark.parametrize("cfg", [{}, {"use_rope_scaling": True, "rope_scaling_factor": 8.0},
                                 {"use_rope_scaling": True, "rope_scaling_factor": 16.0},
                                 {"scale_positional_embedding": True}, {"seq_len_interpolation_factor": 4.0},
                                 # megatron-core's scaling fixes the frequency factors: the cfg's are not its
                                 {"use_rope_scaling": True, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                                  "rope_scaling_factor": 16.0}])
def test_rotary_frequencies_are_megatron_cores(cfg):
    """transformers' inverse frequencies for the config written equal megatron-core's for the cfg (Llama 3.1
    scaling, linear interpolation: megatron-core divides the positions, transformers the frequencies)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from streamconv.families import FAMILIES
    from streamconv.families.base import Dims
    from streamconv.families.megatron import SCHEMES

    values = {"rotary_base": 500000, "max_position_embeddings": 131072, **cfg}
    hparam = lambda key, default=None, **null: values.get(key, default)  # noqa: E731
    dims = Dims(1024, 2, 8, 2, 128, 4096, 131072, 256, SCHEMES[1], 256, False, gated=True)
    config = FAMILIES["llama"].hf_config(hparam, dims, "float32")
    ours = LlamaRotaryEmbedding(LlamaConfig(**config)).inv_freq
    theirs = RotaryEmbedding(kv_channels=128, rotary_percent=1.0, rotary_base=500000,
                             rope_scaling=bool(cfg.get("use_rope_scaling") or cfg.get("scale_positional_embedding")),
                             rope_scaling_factor=cfg.get("rope_scaling_factor", 8.0), use_cpu_initialization=True,
                             seq_len_interpolation_factor=cfg.get("seq_len_interpolation_factor")).inv_freq
    theirs = theirs / cfg.get("seq_len_interpolation_factor", 1.0)
    assert torch.allclose(ours.float(), theirs.float(), rtol=1e-6, atol=0), (ours, theirs)
    if cfg.get("use_rope_scaling") or cfg.get("scale_positional_embedding"):
        assert not torch.allclose(ours.float(), RotaryEmbedding(128, 1.0, rotary_base=500000,
                                                                use_cpu_initialization=True).inv_freq)


@pytest.mark.parametrize("edit, named", [({"rotary_percentage": 0.5}, "rotary_percent 0.5"),
                                         ({"rotary_interleaved": True}, "rotary_interleaved True"),
                                         ({"qk_layernorm": True}, "query and key layer norms"),
                                         ({"qkv_bias": True}, "biases on the query, key and value projections")])
def test_what_hugging_face_llama_cannot_express_is_refused(cases, tmp_path, edit, named):
    import tarfile

    import yaml

    folder = tmp_path / "nemo"
    with tarfile.open(cases["gqa_nemo1_tp2"].checkpoint) as tar:
        tar.extractall(folder, filter="data")
    cfg = yaml.safe_load((folder / "model_config.yaml").read_text())
    cfg.update(edit)
    (folder / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    assert named in refused(folder, tmp_path)


def test_nemo2s_hugging_face_tokenizer_is_copied_and_gives_the_vocabulary(cases, tmp_path):
    from transformers import AutoTokenizer

    case = cases["gqa_nemo2_tp2pp2"]
    result = streamconv.convert(case.checkpoint, tmp_path / "hf")  # no --vocab-size: tokenizer.json says it
    assert result.config["vocab_size"] == VOCAB
    assert "tokenizer files copied and checked: " in result.note and f"of {VOCAB} tokens" in result.note
    shipped = case.checkpoint / "context" / "nemo_tokenizer"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (shipped / name).read_bytes()
    ours, theirs = AutoTokenizer.from_pretrained(tmp_path / "hf"), AutoTokenizer.from_pretrained(shipped)
    assert ours("w3 w17 w200").input_ids == theirs("w3 w17 w200").input_ids == [3, 17, 200]
    assert streamconv.verify(case.checkpoint, tmp_path / "hf") == []
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    assert streamconv.verify(case.checkpoint, tmp_path / "hf") == ["tokenizer.json: differs from the checkpoint's"]


def test_a_tokenizer_file_linking_out_of_the_checkpoint_is_refused(cases, tmp_path):
    import shutil

    folder = shutil.copytree(cases["gqa_nemo2_tp2pp2"].checkpoint, tmp_path / "nemo2", symlinks=True)
    secret = tmp_path / "secret.json"
    secret.write_text('{"model": {"vocab": {"a": 0}}}')
    (folder / "context" / "nemo_tokenizer" / "tokenizer.json").unlink()
    (folder / "context" / "nemo_tokenizer" / "tokenizer.json").symlink_to(secret)
    assert "outside the checkpoint folder" in refused(folder, tmp_path)


def test_a_tensor_no_output_uses_is_refused_not_dropped(cases, tmp_path):
    """A Qwen-style QKV bias in the weights, whatever the cfg says: converting would lose it."""
    import shutil

    import torch.distributed.checkpoint as dcp

    folder = shutil.copytree(cases["gqa_nemo1_folder_tp2"].checkpoint, tmp_path / "nemo")
    sd = whole(folder / "model_weights")
    qkv = sd["model.decoder.layers.self_attention.linear_qkv.weight"]
    sd["model.decoder.layers.self_attention.linear_qkv.bias"] = torch.zeros(qkv.shape[:2], dtype=qkv.dtype)
    shutil.rmtree(folder / "model_weights")
    dcp.save({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, checkpoint_id=str(folder / "model_weights"))
    message = refused(folder, tmp_path)
    assert "4 tensor(s) that the llama mapping has no place for" in message  # one a layer
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in message


def test_nemo2s_activation_function_is_read(cases, tmp_path):
    """NeMo 2.0 names the activation as a torch function: a gated GELU (GeGLU) is not Llama's SwiGLU."""
    import shutil

    import yaml

    folder = shutil.copytree(cases["gqa_nemo2_tp2pp2"].checkpoint, tmp_path / "nemo2")
    path = folder / "context" / "model.yaml"
    model = yaml.safe_load(path.read_text())
    model["config"]["activation_func"]["_target_"] = "torch.nn.functional.gelu"
    path.write_text(yaml.safe_dump(model))
    assert "the activation function torch.nn.functional.gelu in a gated MLP" in refused(folder, tmp_path)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_the_device_flow_on_the_cpu_gives_the_same_bytes(cases, tmp_path, monkeypatch, dtype):
    """What --device cuda does with a Llama model's row ranges, minus the transfers (a cast is arranged by torch
    in the device's scratch buffer, then copied back): the same bytes as the CPU path."""
    from streamconv import pipeline

    case = cases["gqa_legacy_tp2"]
    streamconv.convert(case.checkpoint, tmp_path / "cpu", vocab_size=VOCAB, dtype=dtype)
    monkeypatch.setattr(pipeline, "arranges_on_device", lambda device: True)
    streamconv.convert(case.checkpoint, tmp_path / "flow", vocab_size=VOCAB, dtype=dtype)
    monkeypatch.undo()
    cpu, flow = (tmp_path / name / "model.safetensors" for name in ("cpu", "flow"))
    assert cpu.read_bytes() == flow.read_bytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [None, "fp32"])
def test_cuda_gives_the_cpus_bytes(cases, tmp_path, dtype):
    case = cases["gqa_nemo2_tp2pp2"]
    streamconv.convert(case.checkpoint, tmp_path / "cpu", vocab_size=VOCAB, dtype=dtype)
    streamconv.convert(case.checkpoint, tmp_path / "cuda", vocab_size=VOCAB, dtype=dtype, device="cuda")
    cpu, cuda = (tmp_path / name / "model.safetensors" for name in ("cpu", "cuda"))
    assert cpu.read_bytes() == cuda.read_bytes()
