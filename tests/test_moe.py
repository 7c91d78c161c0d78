"""Mixture-of-experts families against the models Megatron-Bridge 0.6.2 imported (tests/fixtures/bridge062-moe/: a
tiny random Hugging Face model per family imported by Bridge on CPU and saved as run folders, one rank, two
expert-parallel ranks, Transformer Engine's names; see tests/fixtures/README.md). Converted with no flag, each loads
with no missing or unexpected key, equals the original parameter for parameter, computes its logits, and its
config.json describes the same model: experts, top-k, router scoring, shared experts."""

from __future__ import annotations

import json
import math
import tarfile
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import streamconv
from tests.test_families import SAME_MODEL, assert_converts_to_the_original, edited_run
from tests.test_fixtures_bridge062_moe import FIXTURES, MANIFEST, RUNS
from tests.test_settings import plan_error, with_cfg

FAMILY = {"qwen3_moe": "qwen3-moe", "mixtral": "mixtral", "olmoe": "olmoe",  # fixture folder -> --family name
          "deepseek_v3": "deepseek-v3", "gpt_oss": "gpt-oss"}
SAME_EXPERTS = (*SAME_MODEL, "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
                "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "router_jitter_noise", "clip_qkv",
                "first_k_dense_replace", "n_routed_experts", "n_shared_experts", "n_group", "topk_group",
                "routed_scaling_factor", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                "v_head_dim", "rope_interleave", "swiglu_limit")


def test_every_fixture_family_is_converted():
    assert sorted(FAMILY) == sorted(MANIFEST["families"])


@pytest.mark.parametrize("family, run", RUNS)
def test_a_moe_family_converts_to_the_model_bridge_imported(tmp_path, family, run):
    case = MANIFEST["families"][family]
    assert_converts_to_the_original(FIXTURES / case["runs"][run]["checkpoint"], FIXTURES / case["hf"],
                                    FIXTURES / case["logits"], tmp_path / "hf", FAMILY[family], SAME_EXPERTS)


# --- megatron-core 0.16.1's own MoE model (tests/mcore_models.py, experts=4): every container, TP 1 and 2 --------

VOCAB = 256
MCORE = {f"{layout}-tp{tp}": dict(layout=layout, tp=tp, groups=2, experts=4, layers=2, dtype="fp32")
         for layout in ("legacy_container", "megatron_lm", "nemo1_folder", "nemo2") for tp in (1, 2)}


@pytest.fixture(scope="module")
def cases(mcore_cases):
    return mcore_cases(MCORE)


def _logits(folder, input_ids):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    with torch.no_grad():
        return model.eval()(input_ids).logits


@pytest.mark.parametrize("name", MCORE)
def test_megatron_cores_moe_model_converts_to_its_own_logits(cases, tmp_path, name):
    """Rank-by-rank state_dicts (`local_experts.E`, each tensor-parallel rank holding its slice of every expert) and
    distributed checkpoints (grouped expert tensors) alike give megatron-core's logits."""
    case = cases[name]
    result = streamconv.convert(case.checkpoint, tmp_path / "hf", vocab_size=VOCAB)
    assert result.config["architectures"] == ["Qwen3MoeForCausalLM"] and result.config["num_experts"] == 4
    assert (_logits(tmp_path / "hf", case.input_ids) - case.logits_fp32).abs().max() < 1e-4


def test_rank_by_rank_experts_sliced_otherwise_than_the_layers_are_refused(cases, tmp_path):
    with tarfile.open(cases["legacy_container-tp2"].checkpoint) as tar:  # (a .nemo: its cfg edited extracted)
        tar.extractall(tmp_path / "nemo", filter="data")
    extracted = SimpleNamespace(checkpoint=tmp_path / "nemo")
    message = plan_error(with_cfg(extracted, tmp_path, expert_tensor_parallel_size=1))
    assert "expert_tensor_parallel_size 1, not the 2 tensor-parallel ranks" in message, message


@pytest.mark.parametrize("key, value, named", [
    ("moe_router_score_function", "sigmoid", "moe_router_score_function 'sigmoid'"),
    ("moe_router_topk_scaling_factor", 2.5, "moe_router_topk_scaling_factor 2.5"),
    ("moe_router_enable_expert_bias", True, "moe_router_enable_expert_bias True"),
    ("moe_router_num_groups", 2, "moe_router_num_groups 2"),
    ("moe_expert_capacity_factor", 1.0, "moe_expert_capacity_factor 1.0"),
    ("moe_apply_probs_on_input", True, "moe_apply_probs_on_input True"),
])
def test_a_router_qwen3_moe_cannot_express_is_refused_by_name(cases, tmp_path, key, value, named):
    message = plan_error(with_cfg(cases["nemo1_folder-tp1"], tmp_path, **{key: value}))
    assert f"the cfg sets {named}" in message and "Qwen3MoeForCausalLM" in message, message


@pytest.mark.parametrize("changes, says", [
    ({"num_moe_experts": 8}, "num_moe_experts 8, but 'model.decoder.layers.0.mlp.router.weight' routes to 4"),
    ({"moe_ffn_hidden_size": 64}, "expected (128, 64) from the checkpoint's cfg"),
    ({"moe_layer_freq": 2}, "puts experts in layers [0], but the checkpoint has routers in layers [0, 1]"),
    ({"moe_layer_freq": [1, 0]}, "puts experts in layers [0], but the checkpoint has routers in layers [0, 1]"),
    ({"moe_layer_freq": [1, 2]}, "is not a 0 or 1 for each of the 2 layers"),
    ({"moe_router_topk": 5}, "moe_router_topk' is 5; a model's moe_router_topk is above 0 and at most 4"),
    ({"moe_shared_expert_intermediate_size": 32}, "but the checkpoint has no"),
])
def test_a_cfg_that_disagrees_with_the_experts_is_refused(cases, tmp_path, changes, says):
    message = plan_error(with_cfg(cases["nemo1_folder-tp1"], tmp_path, **changes))
    assert says in message, message


def test_the_pre_softmax_router_is_norm_topk_prob_false(cases, tmp_path):
    """megatron-core's pre-softmax router (the top k of a softmax over all experts) is transformers'
    `norm_topk_prob: false`; the default (a softmax over the top k logits) `true`."""
    folder = with_cfg(cases["nemo1_folder-tp1"], tmp_path, moe_router_pre_softmax=True)
    assert streamconv.convert(folder, None, vocab_size=VOCAB, dry_run=True).config["norm_topk_prob"] is False


def _edited_run(tmp_path, family: str, old: str, new: str):
    """A copy of the family's TP 1 Bridge run folder whose run_config.yaml has `old` replaced by `new`."""
    return edited_run(FIXTURES / MANIFEST["families"][family]["runs"]["tp1"]["checkpoint"], tmp_path, old, new)


def test_mixtral_refuses_a_router_it_does_not_renormalise_and_maps_a_window(tmp_path):
    source = _edited_run(tmp_path / "a", "mixtral", "\n  moe_router_pre_softmax: false\n",
                         "\n  moe_router_pre_softmax: true\n")
    message = plan_error(source)
    assert "moe_router_pre_softmax True" in message and "MixtralForCausalLM renormalises" in message, message
    windowed = _edited_run(tmp_path / "b", "mixtral", "\n  window_size: null\n", "\n  window_size:\n  - 7\n  - 0\n")
    config = streamconv.convert(windowed, None, dry_run=True).config
    assert config["architectures"] == ["MixtralForCausalLM"] and config["sliding_window"] == 8


def test_a_moe_layer_freq_the_routers_contradict_is_refused(tmp_path):
    source = _edited_run(tmp_path, "mixtral", "\n  moe_layer_freq: 1\n", "\n  moe_layer_freq:\n  - 1\n  - 0\n")
    message = plan_error(source)
    assert "puts experts in layers [0], but the checkpoint has routers in layers [0, 1]" in message, message


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_a_dense_layer_is_refused_where_the_family_has_experts_in_every_layer(family):
    """Layer 1 as a dense MLP (its router and experts replaced by linear_fc1/fc2, the cfg saying so): Qwen3-MoE's
    mlp_only_layers can say it, Mixtral and OLMoE cannot."""
    from streamconv.families import FAMILIES
    from streamconv.sources import open_checkpoint

    with open_checkpoint(FIXTURES / MANIFEST["families"][family]["runs"]["tp1"]["checkpoint"]) as checkpoint:
        shapes = {k: t.shape for k, t in checkpoint.tensors.items()
                  if not k.startswith(("decoder.layers.1.mlp.router", "decoder.layers.1.mlp.experts"))}
        shapes.update({"decoder.layers.1.mlp.linear_fc1.weight": (96, 64), "decoder.layers.1.mlp.linear_fc2.weight":
                       (64, 48)})

        def hparam(key, default=None, **null):
            edited = {"moe_layer_freq": [1, 0], "moe_layer_freq.0": 1, "moe_layer_freq.1": 0}
            return edited[key] if key in edited else checkpoint.hparam(key, default, **null)

        with pytest.raises(streamconv.ConversionError) as caught:
            FAMILIES[family].read_dims(hparam, shapes, 256)
    assert "layers [1] have a dense MLP, which" in str(caught.value), caught.value


def test_olmoes_whole_width_norms_choose_olmoe_and_forcing_qwen3_moe_is_refused(tmp_path):
    source = FIXTURES / MANIFEST["families"]["olmoe"]["runs"]["tp1"]["checkpoint"]
    assert streamconv.convert(source, None, dry_run=True).config["architectures"] == ["OlmoeForCausalLM"]
    with pytest.raises(streamconv.ConversionError) as caught:
        streamconv.convert(source, None, dry_run=True, family="qwen3-moe")
    assert "query and key norms over all heads at once, which Qwen3MoeForCausalLM cannot express" in str(caught.value)


# --- DeepSeek-V3: its router and rotary settings, and a 671B plan ----------------------------------------------


@pytest.mark.parametrize("old, new, says", [
    ("moe_router_score_function: sigmoid", "moe_router_score_function: softmax",
     "moe_router_score_function 'softmax': DeepseekV3ForCausalLM's router is a sigmoid"),
    ("moe_router_group_topk: 1", "moe_router_group_topk: 2",
     "routes to 2 of 4 experts in the best 2 of 2 groups: DeepseekV3ForCausalLM ranks groups by their two best"),
    ("moe_shared_expert_intermediate_size: 24", "moe_shared_expert_intermediate_size: 36", "expected (72, 64)"),
    ("mtp_num_layers: null", "mtp_num_layers: 1", "does not export multi-token-prediction layers"),
    ("rope_type: yarn", "rope_type: longrope", "rope_type 'longrope'"),
    ("rotary_interleaved: false", "rotary_interleaved: true", "rotary_interleaved True"),
    ("moe_layer_freq:\n  - 0\n  - 1\n  - 1\n", "moe_layer_freq:\n  - 1\n  - 1\n  - 0\n",
     "puts experts in layers [0, 1]"),
])
def test_deepseek_v3_refuses_what_its_hugging_face_class_cannot_express(tmp_path, old, new, says):
    message = plan_error(_edited_run(tmp_path, "deepseek_v3", f"\n  {old}", f"\n  {new}"))
    assert says in message, message


def test_deepseek_v3s_rotary_and_router_settings_reach_config_json(tmp_path):
    """YaRN's factors as the cfg says them (an mscale transformers would not infer is written as attention_factor:
    megatron-core scales cos/sin by mscale / mscale_all_dim's), no groups as one group, no scaling as 1."""
    edited = _edited_run(tmp_path, "deepseek_v3", "\n  mscale_all_dim: 1.0\n", "\n  mscale_all_dim: 0.0\n")
    path = edited / "iter_0000000" / "run_config.yaml"
    text = path.read_text().replace("\n  mscale: 1.0\n", "\n  mscale: 0.5\n")
    text = text.replace("\n  moe_router_num_groups: 2\n", "\n  moe_router_num_groups: null\n")
    text = text.replace("\n  moe_router_topk_scaling_factor: 2.5\n", "\n  moe_router_topk_scaling_factor: null\n")
    path.write_text(text)
    config = streamconv.convert(edited, None, dry_run=True).config
    assert config["rope_scaling"]["attention_factor"] == pytest.approx(0.05 * math.log(4.0) + 1)
    assert (config["n_group"], config["topk_group"], config["routed_scaling_factor"]) == (1, 1, 1.0)
    original = streamconv.convert(FIXTURES / "deepseek_v3" / "tp1", None, dry_run=True).config
    assert "attention_factor" not in original["rope_scaling"] and original["n_group"] == 2


def _no_bytes(shape):
    """A bf16 tensor's stand-in with its shape and no memory behind it (the plan reads metadata only)."""
    import numpy as np

    from streamconv.sources.records import SourceTensor

    return SourceTensor(np.broadcast_to(np.zeros((), np.uint16), shape), "torch.bfloat16")


def test_a_671b_deepseek_v3_plans_in_little_memory():
    """DeepSeek-V3's own shapes (61 layers, the first 3 dense, 256 experts of 2048 and a shared one, 128 heads of
    multi-latent attention, vocabulary 129280), as megatron-core saves them (per layer: its moe_layer_freq is a
    list), planned from metadata alone: 1.34 TB of bf16 in 5 GB shards, predicted working memory under 1.5 GB."""
    from streamconv.pipeline import working_memory
    from streamconv.planning import build_plan
    from streamconv.sources.hparams import Config
    from streamconv.sources.records import Checkpoint

    h, layers, dense, n_experts, width, heads = 7168, 61, 3, 256, 2048, 128
    cfg = {"num_layers": layers, "hidden_size": h, "ffn_hidden_size": 18432, "num_attention_heads": heads,
           "multi_latent_attention": True, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_head_dim": 128,
           "qk_pos_emb_head_dim": 64, "v_head_dim": 128, "normalization": "RMSNorm", "gated_linear_unit": True,
           "add_bias_linear": False, "position_embedding_type": "rope", "rope_type": "yarn", "rotary_base": 10000,
           "rotary_scaling_factor": 40, "original_max_position_embeddings": 4096, "mscale": 1.0,
           "mscale_all_dim": 1.0, "max_position_embeddings": 163840, "num_moe_experts": n_experts,
           "moe_ffn_hidden_size": width, "moe_shared_expert_intermediate_size": width, "moe_router_topk": 8,
           "moe_layer_freq": [0] * dense + [1] * (layers - dense), "moe_router_score_function": "sigmoid",
           "moe_router_enable_expert_bias": True, "moe_router_num_groups": 8, "moe_router_group_topk": 4,
           "moe_router_topk_scaling_factor": 2.5, "share_embeddings_and_output_weights": False}
    layer = "decoder.layers.{}."
    shapes = {"embedding.word_embeddings.weight": (129280, h), "output_layer.weight": (129280, h),
              "decoder.final_layernorm.weight": (h,)}
    for i in range(layers):
        attention = {"input_layernorm.weight": (h,), "self_attention.linear_q_down_proj.weight": (1536, h),
                     "self_attention.linear_q_up_proj.layer_norm_weight": (1536,),
                     "self_attention.linear_q_up_proj.weight": (heads * 192, 1536),
                     "self_attention.linear_kv_down_proj.weight": (576, h),
                     "self_attention.linear_kv_up_proj.layer_norm_weight": (512,),
                     "self_attention.linear_kv_up_proj.weight": (heads * 256, 512),
                     "self_attention.linear_proj.weight": (h, heads * 128)}
        if i < dense:
            mlp = {"mlp.linear_fc1.layer_norm_weight": (h,), "mlp.linear_fc1.weight": (2 * 18432, h),
                   "mlp.linear_fc2.weight": (h, 18432)}
        else:
            mlp = {"pre_mlp_layernorm.weight": (h,), "mlp.router.weight": (n_experts, h),
                   "mlp.router.expert_bias": (n_experts,), "mlp.shared_experts.linear_fc1.weight": (2 * width, h),
                   "mlp.shared_experts.linear_fc2.weight": (h, width)}
            for e in range(n_experts):
                mlp[f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = (2 * width, h)
                mlp[f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = (h, width)
        shapes.update({layer.format(i) + k: v for k, v in {**attention, **mlp}.items()})
    checkpoint = Checkpoint("deepseek-v3-671b", {k: _no_bytes(s) for k, s in shapes.items()},
                            Config.of(cfg, (), "the test's cfg"), vocab_size=129280)
    plan, config = build_plan(checkpoint, 5 * 10**9, None, None)
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and config["first_k_dense_replace"] == dense
    assert (config["n_routed_experts"], config["num_experts_per_tok"], config["n_group"]) == (256, 8, 8)
    weights = sum(t.nbytes for t in plan.tensors)
    fc1s = dense + (layers - dense) * (n_experts + 1)  # (each linear_fc1 gives a gate and an up projection)
    assert 1.3e12 < weights < 1.4e12 and len(plan.tensors) == len(shapes) + fc1s
    assert working_memory(plan, checkpoint) < 1.5e9


# --- GPT-OSS: settings, and its fused experts moved one expert at a time -----------------------------------------


@pytest.mark.parametrize("old, new, says", [
    ("softmax_type: learnable", "softmax_type: vanilla", "softmax_type 'vanilla'"),
    ("activation_func_clamp_value: 7.0", "activation_func_clamp_value: null", "activation_func_clamp_value None"),
    ("glu_linear_offset: 1.0", "glu_linear_offset: 0.0", "glu_linear_offset 0.0"),
    ("moe_router_pre_softmax: false", "moe_router_pre_softmax: true", "moe_router_pre_softmax True"),
    ("rotary_interleaved: false", "rotary_interleaved: true", "rotary_interleaved True with YaRN positions"),
])
def test_gpt_oss_refuses_what_its_hugging_face_class_cannot_express(tmp_path, old, new, says):
    message = plan_error(_edited_run(tmp_path, "gpt_oss", f"\n  {old}\n", f"\n  {new}\n"))
    assert says in message and "GptOssForCausalLM" in message, message


def test_gpt_oss_layer_types_and_yarn_follow_the_cfg(tmp_path):
    """window_attn_skip_freq as a list (1: sliding) and YaRN's rounding of its correction range (transformers'
    `truncate`) reach config.json."""
    edited = _edited_run(tmp_path, "gpt_oss", "\n  window_attn_skip_freq: 2\n",
                         "\n  window_attn_skip_freq:\n  - 0\n  - 1\n")
    path = edited / "iter_0000000" / "run_config.yaml"
    path.write_text(path.read_text().replace("yarn_correction_range_round_to_int: false",
                                             "yarn_correction_range_round_to_int: true"))
    config = streamconv.convert(edited, None, dry_run=True).config
    assert config["layer_types"] == ["full_attention", "sliding_attention"]
    assert "truncate" not in config["rope_scaling"] and config["sliding_window"] == 8
    original = streamconv.convert(FIXTURES / "gpt_oss" / "tp1", None, dry_run=True).config
    assert original["layer_types"] == ["sliding_attention", "full_attention"]
    assert original["rope_scaling"]["truncate"] is False


def test_fused_experts_are_arranged_one_expert_at_a_time_cast_verified_and_split(tmp_path):
    """gate_up_proj ([experts, hidden, 2 x width]) is each expert's linear_fc1 interleaved and transposed in turn:
    the arranging buffer holds one expert's, a cast gives transformers' logits in fp32, verify finds a changed
    byte in the last expert, and a conversion split in two parts writes the same bytes."""
    from streamconv.pipeline import buffer_bytes
    from streamconv.planning import build_plan
    from streamconv.sources import open_checkpoint

    source = FIXTURES / "gpt_oss" / "tp1"
    with open_checkpoint(source) as checkpoint:
        plan, _ = build_plan(checkpoint, 2**40, None, None)
        fused = next(t for t in plan.tensors if t.name == "model.layers.0.mlp.experts.gate_up_proj")
        assert len(fused.pieces()) == 4 and buffer_bytes(plan, checkpoint) == fused.nbytes // 4
    streamconv.convert(source, tmp_path / "fp32", dtype="fp32")
    oracle = load_file(FIXTURES / "gpt_oss" / "logits.safetensors")
    logits = _logits(tmp_path / "fp32", oracle["input_ids"])
    assert (logits - oracle["logits"]).abs().max() < 1e-4
    streamconv.convert(source, tmp_path / "whole", shard_size="100KB")
    for index in (0, 1):
        streamconv.convert(source, tmp_path / "parts", shard_size="100KB", part=f"{index}/2")
    written = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert len(written) > 4 and written == sorted(p.name for p in (tmp_path / "parts").iterdir())
    for name in written:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "parts" / name).read_bytes(), name
    shard = json.loads((tmp_path / "whole" / "model.safetensors.index.json").read_text())["weight_map"][
        "model.layers.1.mlp.experts.down_proj"]
    data = bytearray((tmp_path / "whole" / shard).read_bytes())
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    end = 8 + int.from_bytes(data[:8], "little") + header["model.layers.1.mlp.experts.down_proj"]["data_offsets"][1]
    data[end - 3] ^= 0xFF  # (in the last expert's rows)
    (tmp_path / "whole" / shard).write_bytes(bytes(data))
    problems = streamconv.verify(source, tmp_path / "whole")
    assert len(problems) == 1 and "model.layers.1.mlp.experts.down_proj: bytes differ" in problems[0], problems


def test_rank_by_rank_expert_parallel_folders_are_refused_by_name(cases, tmp_path):
    """Megatron-LM names an expert-parallel rank's folder mp_rank_TT_EEE; its experts are numbered per rank, which
    streamconv does not renumber yet: refused, never converted without them."""
    folder = tmp_path / "ep"
    with tarfile.open(cases["legacy_container-tp2"].checkpoint) as tar:
        tar.extractall(folder, filter="data")
    for tp in (0, 1):
        (folder / f"mp_rank_0{tp}").rename(folder / f"mp_rank_00_00{tp}")
    with tarfile.open(tmp_path / "ep.nemo", "w") as tar:
        tar.add(folder, arcname=".")
    for checkpoint in (folder, tmp_path / "ep.nemo"):
        message = plan_error(checkpoint)
        assert "holds expert-parallel rank folders ('mp_rank_00_00" in message, message
        assert "save a distributed checkpoint" in message


def test_deepseek_v3_refuses_a_dense_layer_after_its_expert_layers():
    """Layer 2 dense after the expert layer 1 (its router and experts replaced by linear_fc1/fc2, the cfg saying
    so): DeepseekV3ForCausalLM's first_k_dense_replace puts the dense layers first, so it cannot express it."""
    from streamconv.families import FAMILIES
    from streamconv.sources import open_checkpoint

    with open_checkpoint(FIXTURES / "deepseek_v3" / "tp1") as checkpoint:
        shapes = {k: t.shape for k, t in checkpoint.tensors.items()
                  if not k.startswith(("decoder.layers.2.mlp.router", "decoder.layers.2.mlp.experts",
                                       "decoder.layers.2.mlp.shared_experts"))}
        shapes.update({"decoder.layers.2.mlp.linear_fc1.weight": (192, 64), "decoder.layers.2.mlp.linear_fc2.weight":
                       (64, 96)})

        def hparam(key, default=None, **null):
            edited = {"moe_layer_freq": [0, 1, 0], "moe_layer_freq.0": 0, "moe_layer_freq.1": 1, "moe_layer_freq.2": 0}
            return edited[key] if key in edited else checkpoint.hparam(key, default, **null)

        with pytest.raises(streamconv.ConversionError) as caught:
            FAMILIES["deepseek-v3"].read_dims(hparam, shapes, 256)
    assert "layers [1] have experts: DeepseekV3ForCausalLM has its dense layers first" in str(caught.value)
