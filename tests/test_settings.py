"""Every cfg setting that changes the forward pass is read by the family or refused by name (families/settings.py),
flags are booleans, numbers are what a model can have, and the cfg agrees with the tensors.

Checkpoints are megatron-core's own (tests/mcore_models.py); a setting is put into their cfg (NeMo 1.x's
model_config.yaml, NeMo 2.0's context/model.yaml) as a user's training run would have had it.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time

import pytest
import torch
import yaml

import streamconv
from streamconv.errors import ConversionError
from streamconv.families import FAMILIES, settings
from tests.mcore_models import ITERATION
from tests.test_llama import VOCAB, llama_logits
from tests.test_mcore import refused
from tests.test_mcore_writer import _have_megatron_core

llama, gpt_sw3 = FAMILIES["llama"], FAMILIES["gpt-sw3"]

if not _have_megatron_core():
    pytest.skip("megatron-core is not installed", allow_module_level=True)

CASES = {"llama": dict(groups=2, layout="nemo1_folder", tp=2), "gpt": dict(layout="nemo1_folder", tp=2, pp=2),
         "tied_nemo2": dict(groups=2, layout="nemo2", tp=2, pp=2, tied=True),
         "untied_nemo2": dict(groups=2, layout="nemo2", tp=2, pp=2)}


@pytest.fixture(scope="module")
def cases(mcore_cases):
    return mcore_cases(CASES)


def with_cfg(case, tmp_path, **edit):
    """A copy of the case's checkpoint whose cfg has `edit` applied (None deletes a key)."""
    folder = shutil.copytree(case.checkpoint, tmp_path / "ckpt")
    path, section = (folder / "model_config.yaml", None) if (folder / "model_config.yaml").exists() else \
        (folder / "context" / "model.yaml", "config")
    whole = yaml.safe_load(path.read_text())
    cfg = whole[section] if section else whole
    for key, value in edit.items():
        *sections, name = key.split(".")  # (a dotted key is nested, as megatron's cfg nests it)
        place = cfg
        for section in sections:
            place = place.setdefault(section, {})
        if value is None and name in place:
            del place[name]
        else:
            place[name] = value
    path.write_text(yaml.safe_dump(whole))
    return folder


def plan_error(folder) -> str:
    with pytest.raises(ConversionError) as caught:
        streamconv.convert(folder, None, vocab_size=VOCAB, dry_run=True)
    return str(caught.value)


def test_every_megatron_core_field_is_classified():
    """megatron-core 0.16.1's TransformerConfig fields are each forward-changing, read, or named harmless; a field
    a new megatron-core adds fails here until someone decides which it is."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {f.name: f for f in dataclasses.fields(TransformerConfig)}
    unclassified = sorted(set(fields) - set(settings.FORWARD) - settings.READ - settings.HARMLESS)
    assert not unclassified, unclassified
    assert not set(settings.FORWARD) & settings.HARMLESS and not settings.READ & settings.HARMLESS
    assert not set(settings.FORWARD) & settings.READ
    for name, default in settings.FORWARD.items():  # the defaults are megatron-core's
        if name in fields:
            assert fields[name].default == default, name
    for switch, dependents in settings.ACTS_WITH.items():
        assert dependents and set(dependents) <= set(settings.FORWARD), switch
    for family in FAMILIES.values():
        assert set(family.settings) <= set(settings.FORWARD), family.name


def test_every_field_of_megatron_core_0_19_is_classified():
    """The same for megatron-core 0.19.2, whose fields tests/fixtures/generate_mcore019.py recorded (it needs
    Python 3.12: CI's megatron-core is 0.16.1)."""
    from tests.test_fixtures_mcore019 import MANIFEST

    fields = set(MANIFEST["transformer_config_fields"])
    assert len(fields) > 300 and "use_mup" in fields
    assert not sorted(fields - set(settings.FORWARD) - settings.READ - settings.HARMLESS)


def _non_default(key, default):
    special = {"window_size": [4, 0], "drop_layers": [1], "softmax_type": "off-by-one",
               "transformer_block_type": "post_ln", "moe_router_score_function": "sigmoid",
               "moe_token_drop_policy": "position"}
    if key in special:
        return special[key]
    if isinstance(default, bool):
        return not default
    if isinstance(default, int | float):
        return default * 2 + 1
    return 2 if default is None else "other"


_DEPENDENT = {d: switch for switch, ds in settings.ACTS_WITH.items() for d in ds}
# (a sliding window makes a Llama-shaped model a Mistral one, experts a MoE one: see the tests below)
_REFUSED = [k for k in settings.FORWARD if k not in llama.settings and k not in _DEPENDENT
            and k not in ("window_size", "num_moe_experts", "multi_latent_attention", "is_hybrid_model")]


@pytest.mark.parametrize("key", _REFUSED)
def test_a_forward_changing_setting_llama_does_not_read_is_refused_by_name(cases, tmp_path, key):
    value = _non_default(key, settings.FORWARD[key])
    message = plan_error(with_cfg(cases["llama"], tmp_path, **{key: value}))
    assert f"the cfg sets {key} " in message and "LlamaForCausalLM cannot express" in message, message


@pytest.mark.parametrize("key", sorted(k for k, switch in _DEPENDENT.items() if switch != "position_embedding_type"))
def test_a_setting_acts_only_with_its_switch(cases, tmp_path, key):
    """A router's setting without experts changes nothing in megatron-core: accepted; with them, a dense model's
    cfg saying it has experts is refused (its tensors have none)."""
    value = _non_default(key, settings.FORWARD[key])
    streamconv.convert(with_cfg(cases["llama"], tmp_path, **{key: value}), None, vocab_size=VOCAB, dry_run=True)
    switch = _DEPENDENT[key]
    on = {"window_size": [4, 0], "experimental_attention_variant": "dsa"}.get(switch, True if isinstance(
        settings.FORWARD[switch], bool) else 4)
    message = plan_error(with_cfg(cases["llama"], tmp_path / "on", **{key: value, switch: on}))
    named = key if switch == "window_size" else switch  # (Mistral reads the window, not a window skipped)
    said = "says" if switch == "num_moe_experts" else "sets"
    expected = f"the cfg sets {key} " if switch == "is_hybrid_model" else f"the cfg {said} {named} "  # (mamba_*)
    assert expected in message, message


def test_a_cfg_saying_latent_attention_where_the_tensors_have_none_is_refused(cases, tmp_path):
    message = plan_error(with_cfg(cases["llama"], tmp_path, multi_latent_attention=True))
    assert "the cfg says multi_latent_attention True, but the checkpoint has no" in message, message


def test_a_cfg_saying_a_hybrid_stack_where_the_layers_are_gpt_layers_is_refused(cases, tmp_path):
    message = plan_error(with_cfg(cases["llama"], tmp_path, is_hybrid_model=True))
    assert "this is a hybrid stack (is_hybrid_model True, layer pattern none), not attention and MLP layers in turn" \
        in message, message


def test_a_window_makes_a_llama_cfg_a_mistral_model_and_a_malformed_one_is_refused(cases, tmp_path):
    planned = streamconv.convert(with_cfg(cases["llama"], tmp_path / "w", window_size=[4, 0]), None,
                                 vocab_size=VOCAB, dry_run=True)
    assert planned.config["architectures"] == ["MistralForCausalLM"] and planned.config["sliding_window"] == 5
    for window in (2, [4, 1], [4, 0, 0], ["4", 0]):
        message = plan_error(with_cfg(cases["llama"], tmp_path / str(window), window_size=window))
        assert "the cfg sets window_size " in message and "not a causal window (left, 0)" in message, message


def test_an_inactive_setting_gives_megatron_cores_logits(cases, tmp_path):
    case = cases["llama"]
    folder = with_cfg(case, tmp_path, moe_router_topk=4, window_attn_skip_freq=2)
    streamconv.convert(folder, tmp_path / "hf", vocab_size=VOCAB)
    assert (llama_logits(tmp_path / "hf", case.input_ids) - case.logits_fp32).abs().max() < 1e-4


def test_gpt_sw3_refuses_by_its_own_name_and_ignores_rotary_settings_of_learned_positions(cases, tmp_path):
    message = plan_error(with_cfg(cases["gpt"], tmp_path, softmax_scale=0.5))
    assert message == ("the cfg sets softmax_scale 0.5 (megatron-core's default: None), which GPT2LMHeadModel cannot "
                       "express; streamconv will not write a different model")
    folder = with_cfg(cases["gpt"], tmp_path / "rope", rotary_base=500000, rotary_percentage=0.5)
    assert streamconv.convert(folder, None, dry_run=True).config["model_type"] == gpt_sw3.model_type
    assert "the cfg sets the flag openai_gelu to 1, not true or false" in plan_error(
        with_cfg(cases["gpt"], tmp_path / "gelu", openai_gelu=1))
    assert "kv_channels 8, not hidden_size / num_attention_heads = 16" in plan_error(
        with_cfg(cases["gpt"], tmp_path / "kv", kv_channels=8))


def test_the_refusal_is_one_line_through_the_cli(cases, tmp_path):
    message = refused(with_cfg(cases["llama"], tmp_path, glu_linear_offset=1.0), tmp_path)
    assert "glu_linear_offset 1.0" in message and "streamconv will not write a different model" in message


@pytest.mark.parametrize("edit, named", [
    ({"rotary_interleaved": 1}, "'rotary_interleaved' is 1, not true or false"),
    ({"layernorm_zero_centered_gamma": 1}, "'layernorm_zero_centered_gamma' is 1, not true or false"),
    ({"qk_layernorm": "true"}, "'qk_layernorm' is 'true', not true or false"),
    ({"share_embeddings_and_output_weights": "no"}, "'share_embeddings_and_output_weights' is 'no', not true"),
])
def test_flags_are_booleans(cases, tmp_path, edit, named):
    assert named in plan_error(with_cfg(cases["llama"], tmp_path, **edit))


def explicit_null(folder, key):
    path = folder / "model_config.yaml"
    path.write_text(path.read_text() + f"{key}: null\n")
    return folder


def test_a_null_is_read_as_megatron_core_reads_it(cases, tmp_path):
    """A flag megatron-core tests for truth reads null as false; a number with a non-null default has no null."""
    folder = explicit_null(with_cfg(cases["llama"], tmp_path, qk_l2_norm=None), "qk_l2_norm")
    streamconv.convert(folder, None, vocab_size=VOCAB, dry_run=True)
    folder = explicit_null(with_cfg(cases["llama"], tmp_path / "offset"), "glu_linear_offset")
    assert "the cfg sets glu_linear_offset to null, for which megatron-core has no meaning" in plan_error(folder)
    folder = with_cfg(cases["llama"], tmp_path / "base", rotary_base=None)
    assert "'rotary_base' is None, not a number" in plan_error(explicit_null(folder, "rotary_base"))
    folder = with_cfg(cases["llama"], tmp_path / "drop", drop_layers=[])  # (an empty list sets nothing)
    streamconv.convert(folder, None, vocab_size=VOCAB, dry_run=True)


def test_a_yaml_1_1_boolean_is_a_boolean(cases, tmp_path):
    """yaml.safe_load reads `yes` as true (YAML 1.1), as OmegaConf's loader does: the format's own rule."""
    folder = with_cfg(cases["llama"], tmp_path)
    path = folder / "model_config.yaml"
    path.write_text(path.read_text() + "qk_l2_norm: yes\n")
    assert "the cfg sets qk_l2_norm True" in plan_error(folder)


@pytest.mark.parametrize("edit, named", [
    ({"rotary_base": math.nan}, "'rotary_base' is nan, not a number"),
    ({"rotary_base": -1}, "'rotary_base' is -1; a model's rotary_base is above 0"),
    ({"rotary_base": 0}, "'rotary_base' is 0; a model's rotary_base is above 0"),
    ({"layernorm_epsilon": -1}, "'layernorm_epsilon' is -1; a model's layernorm_epsilon is above 0 and at most 1"),
    ({"layernorm_epsilon": math.inf}, "'layernorm_epsilon' is inf, not a number"),
    ({"encoder_seq_length": 0, "max_position_embeddings": 0}, "'max_position_embeddings' is 0; a model's"),
    ({"encoder_seq_length": -5, "max_position_embeddings": -5}, "'max_position_embeddings' is -5"),
    ({"encoder_seq_length": 2**62, "max_position_embeddings": 2**62}, "and at most 16777216"),
    ({"scale_positional_embedding": True, "rope_scaling_factor": -8}, "'rope_scaling_factor' is -8; a model's"),
    ({"old_context_len": -1}, "'old_context_len' is -1; a model's old_context_len is above 0"),
    ({"old_context_len": 8192, "low_freq_factor": 4.0, "high_freq_factor": 1.0},
     "low_freq_factor 4 and high_freq_factor 1"),
    ({"use_rope_scaling": True, "seq_len_interpolation_factor": 2.0},
     "two rotary scalings at once (megatron-core's Llama 3.1 scaling, seq_len_interpolation_factor 2.0)"),
    ({"scale_positional_embedding": True, "old_context_len": 8192},
     "two rotary scalings at once (megatron-core's Llama 3.1 scaling, NeMo 2.0's old_context_len)"),
    ({"rotary_percent": 1.0, "rotary_percentage": 0.5}, "rotary_percent 0.5"),
    ({"hidden_size": 0}, "'hidden_size' is 0; a model's hidden_size is above 0"),
    ({"ffn_hidden_size": -128}, "'ffn_hidden_size' is -128"),
    ({"seq_len_interpolation_factor": 0}, "'seq_len_interpolation_factor' is 0; a model's"),
])
def test_numbers_are_what_a_model_can_have(cases, tmp_path, edit, named):
    assert named in plan_error(with_cfg(cases["llama"], tmp_path, **edit))


@pytest.mark.parametrize("layers", [2**40, 5 * 10**7])
def test_an_absurd_layer_count_is_refused_at_once(cases, tmp_path, layers):
    started = time.monotonic()
    for name in ("llama", "gpt"):
        message = plan_error(with_cfg(cases[name], tmp_path / name, num_layers=layers))
        assert f"'num_layers' is {layers}; a model's num_layers is above 0 and at most 1048576" in message
    assert time.monotonic() - started < 60  # (a list of 2**40 layer numbers was a MemoryError)


def test_num_layers_is_compared_with_the_tensors_before_anything_per_layer():
    from streamconv.families import base

    with pytest.raises(ConversionError, match="num_layers 1000000 but the state_dict holds layers 0..1"):
        base.check_layers(10**6, [0, 1])


def test_null_num_query_groups_is_multi_head_attention(cases, tmp_path):
    """megatron-core reads a null num_query_groups as one group a head: the tensors' two groups disagree."""
    folder = with_cfg(cases["llama"], tmp_path)
    path = folder / "model_config.yaml"
    assert "num_query_groups: 2\n" in path.read_text()
    path.write_text(path.read_text().replace("num_query_groups: 2", "num_query_groups: null"))
    assert "the cfg says num_query_groups 4, but" in plan_error(folder)


def test_null_ffn_hidden_size_is_four_times_hidden(cases, tmp_path):
    folder = with_cfg(cases["llama"], tmp_path)
    path = folder / "model_config.yaml"
    text = path.read_text()
    assert "ffn_hidden_size: 256\n" in text and "\nhidden_size: 64\n" in text  # (4 x 64: the null's meaning fits)
    path.write_text(text.replace("ffn_hidden_size: 256", "ffn_hidden_size: null"))
    streamconv.convert(folder, tmp_path / "hf", vocab_size=VOCAB)
    assert (llama_logits(tmp_path / "hf", cases["llama"].input_ids) - cases["llama"].logits_fp32).abs().max() < 1e-4


@pytest.mark.parametrize("name, share, named", [
    ("untied_nemo2", True, "the cfg says share_embeddings_and_output_weights True, but the checkpoint holds "
                           "'module.output_layer.weight'"),
    ("tied_nemo2", False, "the cfg says share_embeddings_and_output_weights False, but the checkpoint has no "
                          "'module.output_layer.weight'"),
])
def test_a_cfg_that_contradicts_the_tensors_about_the_output_layer_is_refused(cases, tmp_path, name, share, named):
    assert named in plan_error(with_cfg(cases[name], tmp_path, share_embeddings_and_output_weights=share))


def megatron_lm_with_args(case, tmp_path, **args):
    """A copy of a Megatron-LM checkpoint whose common.pt `args` Namespace has `args` set (our own file: torch.load
    with weights_only=False is safe here)."""
    folder = shutil.copytree(case.checkpoint, tmp_path / "ckpt")
    common = folder / f"iter_{ITERATION:07d}" / "common.pt"  # (the one latest_checkpointed_iteration.txt names)
    state = torch.load(common, weights_only=False)
    for key, value in args.items():
        setattr(state["args"], key, value)
    torch.save(state, common)
    return folder


def test_megatron_lm_spellings_are_read(mcore_cases, tmp_path):
    """Megatron-LM's `num_experts` is megatron-core's num_moe_experts; its rotary_seq_len_interpolation_factor is
    the linear position interpolation."""
    case = mcore_cases({"lm": dict(groups=1, layout="megatron_lm", dtype="fp32")})["lm"]
    message = plan_error(megatron_lm_with_args(case, tmp_path / "moe", num_experts=8))
    assert "the cfg says num_moe_experts 8, but no layer of the checkpoint has a router" in message, message
    folder = megatron_lm_with_args(case, tmp_path / "linear", rotary_seq_len_interpolation_factor=4)
    config = streamconv.convert(folder, None, vocab_size=VOCAB, dry_run=True).config
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


_ODD_VALUES = [math.nan, math.inf, -1, 0, 2**62, 2**70, -(2**40), 0.5, "", "true", "x" * 300, None, True, False,
               [], [1, 2], {}, {"_target_": "os.system"}, "${oc.env:HOME}", "${hidden_size}", 1e-300]


@pytest.mark.parametrize("seed", range(40))
def test_cfg_value_mutations_convert_or_are_refused(cases, tmp_path, seed):
    """Seeded edits of a Llama cfg's values (types, NaN, negative, huge, null, mappings): each converts and then
    verifies, or is refused with a ConversionError; nothing else is raised. A mutant that converts although it
    edited no setting the family reads gives megatron-core's logits of the unedited model: an edit that mattered
    would have had to be refused."""
    import random

    rng = random.Random(seed)
    cfg = yaml.safe_load((cases["llama"].checkpoint / "model_config.yaml").read_text())
    keys = sorted(k for k, v in cfg.items() if not isinstance(v, dict))
    edit = {key: rng.choice(_ODD_VALUES) for key in rng.sample(keys, rng.randint(1, 3))}
    folder = with_cfg(cases["llama"], tmp_path, **{k: v for k, v in edit.items() if v is not None})
    try:
        streamconv.convert(folder, tmp_path / "hf", vocab_size=VOCAB)
    except ConversionError as refusal:
        assert "\n" not in str(refusal), (edit, str(refusal))
        assert not (tmp_path / "hf").exists()
        return
    assert streamconv.verify(folder, tmp_path / "hf", vocab_size=VOCAB) == [], edit
    if not set(edit) & (settings.READ | set(llama.settings)):
        case = cases["llama"]
        assert (llama_logits(tmp_path / "hf", case.input_ids) - case.logits_fp32).abs().max() < 1e-4, edit


def test_a_forced_family_refuses_what_it_cannot_express(cases, tmp_path):
    """--family skips the choice, not the check: a zero-centred norm forced into Llama is refused by name."""
    folder = with_cfg(cases["llama"], tmp_path, layernorm_zero_centered_gamma=True)
    assert "no model family streamconv knows" in plan_error(folder)
    with pytest.raises(ConversionError, match="family llama: this model has zero-centred layer norms, which "
                                            "LlamaForCausalLM cannot express"):
        streamconv.convert(folder, None, vocab_size=VOCAB, dry_run=True, family="llama")
