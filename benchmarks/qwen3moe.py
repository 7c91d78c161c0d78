"""A synthetic Qwen3-MoE checkpoint as Megatron-Bridge saves it, for the benchmarks (`--profile qwen3moe`).

Qwen3-30B-A3B's shapes (hidden 2048, 32 heads in 4 key/value groups of head size 128, per-head query and key
RMSNorms, 128 experts of ffn 768, top-8, every layer a mixture of experts, vocabulary 151936, an untied output
layer, bf16), two layers, laid out as Megatron-Bridge 0.6.2 (megatron-core 0.19) saves a run with expert
parallelism 2 and TP 1 (tests/fixtures/bridge062-moe/qwen3_moe/ep2/): two gloo processes write through torch's
DCP writer, keys without a prefix, layers stacked; the grouped experts `mlp.experts.experts.linear_fc{1,2}.weight`
of shape (layers, experts, out, in) in one chunk per layer and expert (fc1's gate and up halves apart), EP rank r
holding experts [r E/2, (r + 1) E/2) and their `_extra_state` byte items; the other tensors and byte items written
by rank 0, one chunk per layer; the common state as the bytes item `common_state/shard_0_1`; the fixture's
run_config.yaml with this model's sizes, in a run folder (`iter_0000000/`), so that Bridge's loader reads it and
streamconv converts it with no flag. Weights are random normals (`benchmarks.llama`'s writer, which lays out the
run folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmarks.llama import FIXTURES, SyntheticModel, bridge_run_config, ensure_folder

MOE_RUN_CONFIG = FIXTURES / "bridge062-moe/qwen3_moe/ep2/iter_0000000/run_config.yaml"


@dataclass(frozen=True)
class Qwen3MoeModel(SyntheticModel):
    hidden: int = 2048
    heads: int = 32
    groups: int = 4
    head_dim: int = 128  # kv_channels
    ffn: int = 6144  # a dense layer's width (Qwen3-30B's intermediate_size); no layer here is dense
    experts: int = 128
    moe_ffn: int = 768  # each expert's
    topk: int = 8
    vocab_size: int = 151936
    n_layer: int = 2
    positions: int = 40960
    rotary_base: float = 1e6
    eps: float = 1e-6

    HF_FIXTURE = FIXTURES / "bridge062-moe/qwen3_moe/hf"

    def shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        h, L, d, E, F = self.hidden, self.n_layer, self.head_dim, self.experts, self.moe_ffn
        layers, experts = "decoder.layers.", "decoder.layers.mlp.experts.experts."
        return {
            "embedding.word_embeddings.weight": ((self.vocab_size, h), ".."),
            layers + "self_attention.linear_qkv.layer_norm_weight": ((L, h), "L."),
            layers + "self_attention.linear_qkv.weight": ((L, (self.heads + 2 * self.groups) * d, h), "L.."),
            layers + "self_attention.q_layernorm.weight": ((L, d), "L."),
            layers + "self_attention.k_layernorm.weight": ((L, d), "L."),
            layers + "self_attention.linear_proj.weight": ((L, h, self.heads * d), "L.."),
            layers + "mlp.linear_fc1.layer_norm_weight": ((L, h), "L."),  # the MoE layer's norm, as Bridge names it
            layers + "mlp.router.weight": ((L, E, h), "L.."),
            experts + "linear_fc1.weight": ((L, E, 2 * F, h), "LEH."),
            experts + "linear_fc2.weight": ((L, E, h, F), "LE.."),
            "decoder.final_layernorm.weight": ((h,), "."),
            "output_layer.weight": ((self.vocab_size, h), ".."),
        }

    def extra_states(self) -> dict[str, tuple[tuple[int, ...], str]]:
        L, E = self.n_layer, self.experts
        return {"decoder.layers.self_attention.linear_qkv": ((L,), "L"),
                "decoder.layers.self_attention.linear_proj": ((L,), "L"),
                "decoder.layers.mlp.experts.experts.linear_fc1": ((L, E), "LE"),
                "decoder.layers.mlp.experts.experts.linear_fc2": ((L, E), "LE")}

    def hf_config(self) -> dict:
        return {"hidden_size": self.hidden, "num_attention_heads": self.heads, "num_key_value_heads": self.groups,
                "head_dim": self.head_dim, "intermediate_size": self.ffn, "moe_intermediate_size": self.moe_ffn,
                "num_local_experts": self.experts, "num_experts_per_tok": self.topk, "num_hidden_layers": self.n_layer,
                "vocab_size": self.vocab_size, "max_position_embeddings": self.positions, "rms_norm_eps": self.eps,
                "rope_parameters": {"rope_theta": self.rotary_base, "rope_type": "default"}}

    def run_config(self, ep: int) -> str:
        """Bridge's run_config.yaml of the Qwen3-MoE EP 2 test fixture, with this model's sizes."""
        return bridge_run_config(MOE_RUN_CONFIG, {
            "tensor_model_parallel_size": 1, "expert_model_parallel_size": ep, "num_layers": self.n_layer,
            "hidden_size": self.hidden, "ffn_hidden_size": self.ffn, "num_attention_heads": self.heads,
            "num_query_groups": self.groups, "kv_channels": self.head_dim, "num_moe_experts": self.experts,
            "moe_ffn_hidden_size": self.moe_ffn, "moe_router_topk": self.topk, "seq_length": self.positions,
            "vocab_size": self.vocab_size, "rotary_base": self.rotary_base, "layernorm_epsilon": self.eps})


def ensure_qwen3moe(cache: Path, model: Qwen3MoeModel, ep: int = 2) -> Path:
    """The run folder `qwen3moe-L<layers>-ep<ep>.run` in `cache`, written once by `ep` expert-parallel ranks."""
    if model.experts % ep:
        raise ValueError(f"{model.experts} experts do not divide among {ep} expert-parallel ranks")
    return ensure_folder(cache / f"qwen3moe-L{model.n_layer}-ep{ep}.run", model, ep, True,
                         f"Qwen3-30B-A3B shapes, {ep} EP ranks, torch_dist as Megatron-Bridge saves it")
