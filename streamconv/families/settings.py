"""Every cfg setting that changes what a model computes is read by its family or refused by name.

The mirror of the tensor rule (a tensor without a place in the output is refused): a setting that changes the
forward pass but adds no tensor would otherwise convert, with exit 0, into a different model. The names are
megatron-core's `TransformerConfig` and `GPTModel` fields, which NeMo 1.x, NeMo 2.0, Megatron-LM and
Megatron-Bridge all pass through under the same names, plus the few that only one writer spells its own way.

- `FORWARD`: settings that change the forward pass, with megatron-core's default. A family that does not read one
  accepts only that default (absent, null or equal); any other value is refused.
- `ACTS_WITH`: settings that act only when another one is set (a router's settings with experts): checked only
  when that one is set, so a dense model's cfg full of MoE defaults is not refused for them.
- `READ`: what every family reads, as sizes or through `base.features` (which picks the family).
- `HARMLESS`: the rest of megatron-core's fields (0.16.1 and 0.19.2), named so that `tests/test_settings.py` can
  tell a field megatron-core adds from one classified: kernels, fusions, parallelism, precision of training, dropout,
  initialisation, recompute, training-only losses.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from streamconv.errors import ConversionError, describe
from streamconv.families.base import NULL, HParam

FORWARD: dict[str, Any] = {
    # attention
    "softmax_scale": None, "softmax_type": "vanilla", "qk_l2_norm": False, "attention_output_gate": False,
    "window_size": None, "multi_latent_attention": False, "experimental_attention_variant": None,
    "linear_attention_freq": None, "no_rope_freq": None, "mrope_section": None,
    # the residual stream and the norms
    "apply_residual_connection_post_layernorm": False, "transformer_block_type": "pre_ln",  # (NeMo 1.x's)
    "headscale": False, "normalize_attention_scores": True, "megatron_legacy": False,  # (NeMo 1.x's)
    # NeMo 1.x's model customisations of megatron-core (layers made no-ops, a scaled embedding, soft-capped logits)
    "drop_layers": None, "apply_embedding_scaling": False, "mcore_customization_config.final_logit_softcapping": 0.0,
    # the MLP
    "glu_linear_offset": 0.0, "activation_func_clamp_value": None, "num_moe_experts": None,
    "openai_gelu": False, "squared_relu": False, "quick_geglu": False,  # (Megatron-LM's and NeMo 1.x's)
    # whole-model structure, and width-scaled parametrisation (MuP, megatron-core 0.19)
    "heterogeneous_block_specs": False, "is_hybrid_model": False, "quant_recipe": None, "use_mup": False,
    "mup_width_mult": 1.0, "mup_base_hidden_size": None, "mup_embedding_mult": 1.0, "mup_output_mult": 1.0,
    "mup_base_head_dim": None, "mup_attn_scale_power": 1.0,
    # rotary positions (act with position_embedding_type 'rope': see ACTS_WITH)
    "rotary_base": 10000, "rotary_percent": 1.0, "rotary_percentage": 1.0, "rotary_interleaved": False,
    "seq_len_interpolation_factor": None, "rope_scaling": False, "use_rope_scaling": False,
    "rope_scaling_factor": 8.0, "scale_positional_embedding": False, "scale_factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "old_context_len": 8192,
    # experts (act with num_moe_experts)
    "moe_shared_expert_intermediate_size": None, "moe_shared_expert_gate": False, "moe_layer_freq": 1,
    "moe_ffn_hidden_size": None, "moe_router_topk": 2, "moe_router_num_groups": None,
    "moe_router_group_topk": None, "moe_router_pre_softmax": False, "moe_router_topk_scaling_factor": None,
    "moe_router_score_function": "softmax", "moe_router_enable_expert_bias": False,
    "moe_apply_probs_on_input": False, "moe_latent_size": None, "moe_router_topk_limited_devices": None,
    "moe_expert_capacity_factor": None, "moe_token_drop_policy": "probs", "moe_pad_expert_input_to_capacity": False,
    "moe_token_dropping": False, "moe_shared_expert_glu_interleave_size": None, "moe_mlp_glu_interleave_size": None,
    "moe_router_force_biased": None, "moe_expert_rank_capacity_factor": None,
    # sliding windows, DeepSeek's sparse attention, linear attention, Mamba (each acts with its switch)
    "window_attn_skip_freq": None, "dsa_indexer_n_heads": None, "dsa_indexer_head_dim": None,
    "dsa_indexer_topk": None, "dsa_indexer_topk_freq": 1, "dsa_indexer_skip_topk_offset": 0,
    "dsa_indexer_rope_interleaved": False, "dsa_indexer_rotate_activation": True, "dsa_indexer_scoring_relu": True,
    "dsa_indexer_k_norm_epsilon": None, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32, "mamba_state_dim": 128,
    "mamba_head_dim": 64, "mamba_num_groups": 8, "mamba_num_heads": None,
}

_ROTARY = ("rotary_base", "rotary_percent", "rotary_percentage", "rotary_interleaved", "seq_len_interpolation_factor",
           "rope_scaling", "use_rope_scaling", "rope_scaling_factor", "scale_positional_embedding", "scale_factor",
           "low_freq_factor", "high_freq_factor", "old_context_len")
ACTS_WITH: dict[str, tuple[str, ...]] = {
    "position_embedding_type": _ROTARY,
    "num_moe_experts": tuple(k for k in FORWARD if k.startswith("moe_")),
    "window_size": ("window_attn_skip_freq",),
    "experimental_attention_variant": tuple(k for k in FORWARD if k.startswith("dsa_")),
    "linear_attention_freq": tuple(k for k in FORWARD if k.startswith("linear_") and k != "linear_attention_freq"),
    "is_hybrid_model": tuple(k for k in FORWARD if k.startswith("mamba_")),
    "use_mup": tuple(k for k in FORWARD if k.startswith("mup_")),
}
_SWITCH_DEFAULTS = {"position_embedding_type": "learned_absolute"}  # switches that are not in FORWARD

# Sizes every family reads and checks against the tensors, and what `base.features` reads to pick the family.
READ = frozenset({
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "group_query_attention",
    "ffn_hidden_size", "kv_channels", "layernorm_epsilon", "init_method_std", "encoder_seq_length",
    "max_position_embeddings", "seq_length", "normalization", "layernorm_zero_centered_gamma", "apply_layernorm_1p",
    "add_bias_linear", "bias", "add_qkv_bias", "qkv_bias", "gated_linear_unit", "swiglu", "activation",
    "activation_func", "qk_layernorm", "position_embedding_type", "share_embeddings_and_output_weights",
    "untie_embeddings_and_output_weights",
})

HARMLESS = frozenset({
    # numerics only: the same function, rounded differently (scaling by the layer number is undone in fp32)
    "fp32_residual_connection", "attention_softmax_in_fp32", "apply_query_key_layer_scaling",
    "disable_bf16_reduced_precision_matmul", "batch_invariant_mode", "moe_router_dtype", "params_dtype", "fp16",
    "bf16", "pipeline_dtype", "autocast_dtype", "enable_autocast", "deterministic_mode",
    "fp8", "fp8_recipe", "fp8_param", "fp8_quantizer_factory", "fp8_margin", "fp8_interval", "fp8_amax_history_len",
    "fp8_amax_compute_algo", "fp8_wgrad", "fp8_dot_product_attention", "fp8_multi_head_attention", "tp_only_amax_red",
    "first_last_layers_bf16", "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16", "fp4", "fp4_recipe",
    "fp4_param", "fp4_quantizer_factory", "activation_func_fp8_input_store", "fp8_output_proj",
    "mamba_training_ssm_states_dtype", "dsa_indexer_k_norm_fp32",
    # kernels, fusions and implementations
    "attention_backend", "transformer_impl", "use_kitchen", "use_kitchen_attention", "kitchen_attention_backend",
    "bias_activation_fusion", "masked_softmax_fusion", "persist_layer_norm", "memory_efficient_layer_norm",
    "bias_dropout_fusion", "apply_rope_fusion", "use_fused_weighted_squared_relu", "fused_single_qkv_rope",
    "use_te_activation_func", "moe_grouped_gemm", "moe_use_legacy_grouped_gemm", "moe_permute_fusion",
    "moe_router_fusion", "moe_enable_deepep", "moe_flex_dispatcher_backend", "moe_token_dispatcher_type",
    "moe_deepep_num_sms", "moe_hybridep_num_sms", "moe_shared_expert_overlap", "moe_extended_tp", "flash_decode",
    "use_mamba_mem_eff_path", "mlp_chunks_for_prefill", "use_inference_optimized_layers",
    "inference_fuse_tp_communication", "symmetric_ar_type", "cross_entropy_loss_fusion", "cross_entropy_fusion_impl",
    "gradient_accumulation_fusion", "use_te_rng_tracker", "inference_rng_tracker", "inference_sampling_seed",
    "clone_scatter_output_in_embedding", "disable_parameter_transpose_cache",
    "enable_cuda_graph", "cuda_graph_use_single_mempool", "cuda_graph_retain_backward_graph", "cuda_graph_warmup_steps",
    "external_cuda_graph", "cuda_graph_impl", "cuda_graph_scope", "cuda_graph_modules", "inference_cuda_graph_scope",
    "fused_residual_rmsnorm", "use_transformer_engine_op_fuser", "flash_attention_version", "dsa_kernel_backend",
    "use_grouped_gemm_for_shared_expert", "use_grouped_gemm_for_dense_mlp", "moe_single_grouped_weight",
    "moe_single_grouped_bias", "moe_permute_fusion_into_hybridep", "moe_hybridep_pad_uneven_dispatch_inputs",
    "moe_pad_experts_for_cuda_graph_inference", "moe_flex_dispatcher_num_sms", "moe_hybridep_num_blocks_permute",
    "moe_hybridep_num_blocks_unpermute", "moe_hybridep_num_sms_preprocessing", "moe_ncclep_static_shape",
    "moe_ncclep_zero_copy", "nccl_all_reduce_for_prefill", "inference_disable_triton_nvls_kernels",
    "inference_grouped_gemm_backend", "inference_moe_disable_fused_quant_kernels",
    "inference_moe_token_dispatcher_type", "mlp_chunks_for_training", "high_priority_a2a_comm_stream",
    # parallelism and pipelining
    "tensor_model_parallel_size", "pipeline_model_parallel_comm_backend", "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size", "sequence_parallel", "context_parallel_size",
    "hierarchical_context_parallel_sizes", "max_seqlen_per_dp_cp_rank", "hybrid_context_parallel",
    "expert_model_parallel_size", "expert_tensor_parallel_size", "cp_comm_type", "num_layers_in_first_pipeline_stage",
    "num_layers_in_last_pipeline_stage", "pipeline_model_parallel_layout", "account_for_embedding_in_pipeline_split",
    "account_for_loss_in_pipeline_split", "async_tensor_model_parallel_allreduce", "tp_comm_overlap",
    "tp_comm_bulk_wgrad", "tp_comm_bulk_dgrad", "tp_comm_overlap_ag", "tp_comm_overlap_rs", "tp_comm_overlap_rs_dgrad",
    "tp_comm_split_ag", "tp_comm_atomic_ag", "tp_comm_split_rs", "tp_comm_atomic_rs", "tp_comm_overlap_disable_qkv",
    "tp_comm_overlap_disable_fc1", "tp_comm_bootstrap_backend", "overlap_moe_expert_parallel_comm",
    "delay_wgrad_compute", "ep_overlap_early_attn_memory_release", "variable_seq_lengths", "overlap_p2p_comm",
    "batch_p2p_comm", "batch_p2p_sync", "use_ring_exchange_p2p", "deallocate_pipeline_outputs",
    "defer_embedding_wgrad_compute", "wgrad_deferral_limit", "overlap_p2p_comm_warmup_flush",
    "microbatch_group_size_per_vp_stage", "mtp_standalone", "barrier_with_L1_time", "hetereogenous_dist_checkpoint",
    "timers", "finalize_model_grads_func", "grad_scale_func", "no_sync_func", "grad_sync_func", "param_sync_func",
    "tensor_parallel_num_weight_shards", "gtp_weight_remat_size", "expert_tensor_parallel_num_weight_shards",
    "expert_gtp_weight_remat_size", "moe_grad_scale_func", "mtp_grad_scale_func",
    "overlap_dispatch_backward_with_experts_wgrad",
    # memory: offloading and recompute
    "cpu_offloading", "cpu_offloading_num_layers", "_cpu_offloading_context", "cpu_offloading_activations",
    "cpu_offloading_weights", "cpu_offloading_double_buffering", "fine_grained_activation_offloading",
    "offload_modules", "min_offloaded_tensor_size", "recompute_granularity", "recompute_method",
    "recompute_num_layers", "distribute_saved_activations", "recompute_modules",
    "num_microbatches_with_partial_activation_checkpoints", "moe_layer_recompute",
    "cpu_offloading_retain_pinned_cpu_buffers", "delay_offload_until_cuda_graph", "delta_offload_bytes_across_pp_ranks",
    "activation_offload_fraction", "moe_paged_stash", "moe_paged_stash_page_size",
    "moe_paged_stash_buffer_size_factor_cuda", "moe_paged_stash_buffer_size_factor_cpu",
    "fine_grained_offloading_max_inflight_offloads",
    # initialisation and dropout (inference has none)
    "perform_initialization", "use_cpu_initialization", "init_method", "output_layer_init_method",
    "embedding_init_method", "embedding_init_method_std", "init_model_with_meta_device", "hidden_dropout",
    "attention_dropout",
    # training only: losses, routing balance, logging, weight clipping
    "mtp_num_layers", "mtp_loss_scaling_factor", "calculate_per_token_loss", "test_mode", "config_logger_dir",
    "qk_clip", "qk_clip_alpha", "qk_clip_threshold", "log_max_attention_logit", "moe_router_load_balancing_type",
    "moe_enable_routing_replay", "moe_router_padding_for_quantization", "moe_router_padding_for_fp8",
    "moe_router_bias_update_rate", "moe_router_force_load_balancing", "moe_aux_loss_coeff", "moe_z_loss_coeff",
    "moe_input_jitter_eps", "moe_per_layer_logging", "dsa_indexer_loss_coeff", "dsa_indexer_use_sparse_loss",
    "mtp_use_repeated_layer", "mtp_detach_heads", "mtp_hybrid_override_pattern",
    "experimental_attention_variant_loss_scale_func", "moe_router_quantile_balancing_ema",
})


def _is_set(value: Any, default: Any) -> bool:
    """Whether a cfg value differs from megatron-core's default (None: absent). Flags are booleans."""
    if value is None:
        return False
    if isinstance(default, bool):
        return value is not default
    if isinstance(default, int | float):
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        return not numeric or math.isnan(value) or value != default
    return value != default


def check(hparam: HParam, reads: Collection[str], model: str) -> None:
    """Refuse, by name, the first setting in the cfg that changes the forward pass from megatron-core's default
    and that the family (`reads`: the settings it maps; `model`: its Hugging Face class) does not read."""
    switched_off = {dependent for switch, dependents in ACTS_WITH.items()
                    if not _is_set(hparam(switch), FORWARD.get(switch, _SWITCH_DEFAULTS.get(switch)))
                    for dependent in dependents}
    for key, default in FORWARD.items():
        if key in reads or key in switched_off:
            continue
        value = hparam(key, null=NULL)
        if value is NULL:
            if default is None or isinstance(default, bool):
                continue  # (megatron-core tests these for truth: null acts as their default)
            raise ConversionError(f"the cfg sets {key} to null, for which megatron-core has no meaning (its default "
                                  f"is {default!r}); fix the checkpoint's cfg")
        if isinstance(default, bool) and value is not None and not isinstance(value, bool):
            raise ConversionError(f"the cfg sets the flag {key} to {describe(value)}, not true or false; fix the "
                                  "checkpoint's cfg")
        if _is_set(value, default):
            raise ConversionError(f"the cfg sets {key} {describe(value)} (megatron-core's default: {default!r}), "
                                  f"which {model} cannot express; streamconv will not write a different model")

