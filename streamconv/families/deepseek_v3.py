"""DeepSeek-V3 (`DeepseekV3ForCausalLM`): multi-latent attention, dense MLPs in the first layers, then a mixture of
experts with shared experts and a sigmoid router that picks experts within the best groups, biased by a
score-correction term (megatron-core's `expert_bias`), its weights renormalised and scaled.

Every Hugging Face tensor is a megatron-core tensor as it is, no row moves: the query's up projection keeps each
head's `[not rotated; rotated]` rows, the keys' down projection `[latent; rotated]`, their up projection each head's
`[key; value]` rows; megatron-core rotates the rotated part interleaved, as `rope_interleave` says. Experts are
written one tensor each (`mlp.experts.E.gate_proj.weight`), as the Hugging Face Hub's DeepSeek-V3 holds them.
"""

from __future__ import annotations

from typing import Any

from streamconv.errors import ConversionError, describe
from streamconv.families import base, experts
from streamconv.families.base import (
    EITHER_ATTENTION,
    EITHER_OUTPUT,
    EXPERTS,
    GATED,
    LATENT_ATTENTION,
    MAX_SIZE,
    NO_BIASES,
    NULL,
    RMS_NORM,
    ROTARY,
    Dims,
    Entry,
    Family,
    HParam,
)
from streamconv.families.llama import MLP, ROTARY_SETTINGS, model_ends
from streamconv.families.megatron import check_matrices, layer_ids, names_of
from streamconv.families.qwen3_moe import EXPERT_MLP
from streamconv.families.registry import register

ATTN = "model.layers.{i}.self_attn."
Q_LATENT = (Entry(ATTN + "q_a_proj.weight", "q_down"), Entry(ATTN + "q_a_layernorm.weight", "q_latent_norm"),
            Entry(ATTN + "q_b_proj.weight", "q_up"))
KV = (Entry(ATTN + "kv_a_proj_with_mqa.weight", "kv_down"), Entry(ATTN + "kv_a_layernorm.weight", "kv_latent_norm"),
      Entry(ATTN + "kv_b_proj.weight", "kv_up"), Entry(ATTN + "o_proj.weight", "proj"))
NORMS = (Entry("model.layers.{i}.input_layernorm.weight", "input_norm"),
         Entry("model.layers.{i}.post_attention_layernorm.weight", "mlp_norm"))
MOE = (*EXPERT_MLP, Entry("model.layers.{i}.mlp.gate.e_score_correction_bias", "router", "expert_bias"),
       Entry("model.layers.{i}.mlp.shared_experts.gate_proj.weight", "shared_fc1", take="gate"),
       Entry("model.layers.{i}.mlp.shared_experts.up_proj.weight", "shared_fc1", take="up"),
       Entry("model.layers.{i}.mlp.shared_experts.down_proj.weight", "shared_fc2"))
# megatron-core's MLATransformerConfig defaults, for the rotary fields a cfg may leave out
YARN = {"rotary_scaling_factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
        "mscale": 1.0, "mscale_all_dim": 0.0}


@register
class DeepseekV3(Family):
    name = "deepseek-v3"
    model_type = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"
    description = "DeepSeek-V3 (multi-latent attention, dense layers then a mixture of experts with shared experts)"
    traits = frozenset({RMS_NORM, GATED, ROTARY, NO_BIASES, LATENT_ATTENTION, EXPERTS})
    optional = EITHER_ATTENTION | EITHER_OUTPUT
    providers = ("DeepSeek", "Deepseek", "MLA")
    settings = ROTARY_SETTINGS + experts.ROUTER_SETTINGS + ("multi_latent_attention",)
    head = (Entry("model.embed_tokens.weight", "embedding", take="vocab"),)
    tail = (Entry("model.norm.weight", "final_norm"), Entry("lm_head.weight", "output_layer", take="vocab"))

    def layer_rows(self, dims: Dims, i: int) -> tuple[Entry, ...]:
        query = Q_LATENT if dims.q_latent else (Entry(ATTN + "q_proj.weight", "q_proj"),)
        return (*NORMS, *query, *KV, *(MOE if i in dims.moe_layers else MLP))

    def read_dims(self, hparam: HParam, shapes: dict[str, tuple[int, ...]], vocab_size: int | None = None,
                  num_heads: int | None = None, local_slices: int = 1) -> Dims:
        names = names_of(shapes)
        check_matrices(shapes, names)
        found = layer_ids(shapes, names)
        fc2 = shapes.get(names.of(0, "fc2", "weight"))
        kv_down, kv_up = (shapes.get(names.of(0, role, "weight")) for role in ("kv_down", "kv_up"))
        query = shapes.get(names.of(0, "q_up", "weight")) or shapes.get(names.of(0, "q_proj", "weight"))
        if kv_down is None or kv_up is None or query is None or len(kv_up) != 2:
            raise ConversionError(f"{names.of(0, 'kv_down', 'weight')!r}, its up projection or the query's "
                                  "projection is missing: not multi-latent attention as megatron-core saves it")
        values = base.sizes(hparam, {"hidden_size": shapes[names.embedding][1], "num_layers": len(found),
                                     "ffn_hidden_size": fc2[1] if fc2 else None, "num_attention_heads": num_heads,
                                     "kv_lora_rank": kv_up[1]}, num_heads)
        base.check_layers(values["num_layers"], found)
        heads, latent = values["num_attention_heads"], values["kv_lora_rank"]
        # (the head sizes as the tensors say them, where the cfg is silent; the plan checks every shape)
        rope_guess = kv_down[0] - latent
        nope_guess = query[0] // heads - rope_guess
        sized = base.sizes(hparam, {"qk_pos_emb_head_dim": rope_guess, "qk_head_dim": nope_guess,
                                    "v_head_dim": kv_up[0] // heads - nope_guess}, None)
        q_latent = hparam("q_lora_rank", null=NULL)
        q_down = shapes.get(names.of(0, "q_down", "weight"))
        if q_latent is None:
            q_latent = q_down[0] if q_down else NULL
        q_latent = 0 if q_latent is NULL else base.number("q_lora_rank", q_latent, int, above=0, high=MAX_SIZE)
        if bool(q_latent) != bool(q_down):
            raise ConversionError(f"the cfg says q_lora_rank {describe(hparam('q_lora_rank'))}, but the checkpoint "
                                  f"{'has no' if q_latent else 'holds'} {names.of(0, 'q_down', 'weight')!r}; is the "
                                  "cfg from another run?")
        if base.number("mtp_num_layers", hparam("mtp_num_layers", 0, null=0), int, low=0, high=MAX_SIZE):
            raise ConversionError(f"the cfg sets mtp_num_layers {hparam('mtp_num_layers')}: streamconv does not "
                                  "export multi-token-prediction layers yet (DeepseekV3ForCausalLM does not run "
                                  "them); convert a checkpoint saved without them")
        dims = Dims(values["hidden_size"], values["num_layers"], heads, heads, sized["qk_head_dim"],
                    values["ffn_hidden_size"], *model_ends(hparam, shapes, names, vocab_size), gated=True,
                    local_slices=local_slices, q_latent=q_latent, kv_latent=latent,
                    rope_dim=sized["qk_pos_emb_head_dim"], v_head_dim=sized["v_head_dim"])
        dims = experts.read_experts(hparam, shapes, dims)
        dense = dims.layers - len(dims.moe_layers)
        if dims.moe_layers != set(range(dense, dims.layers)):
            raise ConversionError(f"layers {sorted(dims.moe_layers)} have experts: DeepseekV3ForCausalLM has its "
                                  "dense layers first, then experts in every layer")
        return dims

    def hf_config(self, hparam: HParam, dims: Dims, dtype_name: str) -> dict[str, Any]:
        """DeepseekV3Config keyword arguments."""
        return {
            "model_type": self.model_type,
            "architectures": [self.architecture],
            "vocab_size": dims.vocab,
            "hidden_size": dims.hidden,
            "intermediate_size": dims.ffn,
            "moe_intermediate_size": dims.expert_ffn,
            "num_hidden_layers": dims.layers,
            "first_k_dense_replace": dims.layers - len(dims.moe_layers),
            "num_attention_heads": dims.heads,
            "num_key_value_heads": dims.heads,
            "q_lora_rank": dims.q_latent or None,
            "kv_lora_rank": dims.kv_latent,
            "qk_nope_head_dim": dims.head_dim,
            "qk_rope_head_dim": dims.rope_dim,
            "head_dim": dims.rope_dim,
            "v_head_dim": dims.v_head_dim,
            **experts.sigmoid_router(hparam, dims, self.architecture),
            **_shared(dims),
            "hidden_act": "silu",
            "max_position_embeddings": dims.positions,
            "rms_norm_eps": base.epsilon(hparam),
            **_rotary(hparam),
            "rope_interleave": True,
            "attention_bias": False,
            "tie_word_embeddings": dims.tied,
            "initializer_range": base.init_std(hparam),
            "use_cache": True,
            "dtype": dtype_name,
        }


def _shared(dims: Dims) -> dict[str, Any]:
    """DeepSeek-V3's shared experts, as a number of experts of the routed ones' width."""
    if dims.shared_ffn % dims.expert_ffn or not dims.shared_ffn:
        raise ConversionError(f"the shared experts' width {dims.shared_ffn} is not a whole number of experts of "
                              f"{dims.expert_ffn}, as DeepseekV3ForCausalLM's n_shared_experts needs")
    return {"n_shared_experts": dims.shared_ffn // dims.expert_ffn, "scoring_func": "sigmoid",
            "topk_method": "noaux_tc"}


def _rotary(hparam: HParam) -> dict[str, Any]:
    """The rotary keys: megatron-core's YaRN for multi-latent attention (its attention factor written out where
    transformers would infer another from mscale and mscale_all_dim), or plain rotary positions; both rotate every
    rotated dimension."""
    rope_type = hparam("rope_type", "yarn")
    percent = hparam("rotary_percent", 1.0)
    if rope_type not in ("yarn", "rope") or percent != 1.0 or base.flag(hparam, "rotary_interleaved"):
        raise ConversionError(f"the cfg sets rope_type {describe(rope_type)}, rotary_percent {describe(percent)}, "
                              f"rotary_interleaved {describe(hparam('rotary_interleaved'))}: DeepseekV3ForCausalLM "
                              "rotates by YaRN or plain rotary positions, every rotated dimension, interleaved; "
                              "streamconv will not write a different model")
    theta = base.number("rotary_base", hparam("rotary_base", 10000, null=None), float, above=0)
    values = {key: base.number(key, hparam(key, default, null=None), type(default), low=0)
              for key, default in YARN.items()}
    factor, scale, scale_all = values["rotary_scaling_factor"], values["mscale"], values["mscale_all_dim"]
    if rope_type == "rope":
        if factor > 1 and scale_all:  # (megatron-core scales the softmax by it whatever the rope type)
            raise ConversionError(f"the cfg scales the attention's softmax by YaRN's mscale_all_dim {scale_all} "
                                  f"without YaRN positions, which DeepseekV3ForCausalLM cannot express")
        return {"rope_theta": theta, "rope_scaling": None}
    return {"rope_theta": theta, "rope_scaling": base.yarn_scaling(
        factor, values["original_max_position_embeddings"], values["beta_fast"], values["beta_slow"], scale, scale_all,
        truncate=True)}
