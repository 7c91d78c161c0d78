"""Synthetic NeMo-Megatron GPT-SW3 checkpoints, shaped like the real thing, for tests, the demo and benchmarks.

A seeded random GPT-2 state dict is mapped backwards into NeMo's layout (the inverse of the recipe,
written independently of it) and saved as PyTorch Lightning does: top-level training keys, OmegaConf
`DictConfig` hyper-parameters with unresolved interpolations, fp32 Adam state beside the weights, and
vocabulary rows padded to a multiple of `make_vocab_size_divisible_by`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

PREFIX = "model.language_model."


@dataclass
class SyntheticModel:
    """A GPT-SW3-shaped model; defaults are tiny. `n_inner` defaults to 4 x `n_embd` as in GPT-SW3."""

    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_inner: int | None = None
    vocab_size: int = 64000
    n_positions: int = 128
    make_vocab_size_divisible_by: int = 128

    @property
    def ffn(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def padded_vocab(self) -> int:
        m = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // m) * m


@dataclass
class SyntheticCheckpoint:
    path: str
    model: SyntheticModel
    hf_state_dict: dict[str, torch.Tensor] = field(repr=False)  # the GPT-2 weights the checkpoint encodes

    def gpt2_config(self):
        """The GPT2Config of the source model, for building it in transformers as an oracle."""
        from transformers import GPT2Config

        m = self.model
        return GPT2Config(
            vocab_size=m.vocab_size, n_positions=m.n_positions, n_embd=m.n_embd, n_layer=m.n_layer,
            n_head=m.n_head, n_inner=m.ffn, activation_function="gelu", layer_norm_epsilon=1e-5,
            tie_word_embeddings=True,
        )


def random_gpt2_state_dict(model: SyntheticModel, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """GPT-2 (Conv1D layout) weights: normal(0, 0.02) matrices, layer-norm weights near 1, small biases."""
    gen = torch.Generator().manual_seed(seed)
    h, f = model.n_embd, model.ffn

    def normal(*shape: int, mean: float = 0.0, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std + mean).to(dtype)

    sd = {
        "transformer.wte.weight": normal(model.vocab_size, h),
        "transformer.wpe.weight": normal(model.n_positions, h, std=0.01),
    }
    for i in range(model.n_layer):
        p = f"transformer.h.{i}."
        sd.update({
            p + "ln_1.weight": normal(h, mean=1.0, std=0.1),
            p + "ln_1.bias": normal(h),
            p + "attn.c_attn.weight": normal(h, 3 * h),
            p + "attn.c_attn.bias": normal(3 * h),
            p + "attn.c_proj.weight": normal(h, h),
            p + "attn.c_proj.bias": normal(h),
            p + "ln_2.weight": normal(h, mean=1.0, std=0.1),
            p + "ln_2.bias": normal(h),
            p + "mlp.c_fc.weight": normal(h, f),
            p + "mlp.c_fc.bias": normal(f),
            p + "mlp.c_proj.weight": normal(f, h),
            p + "mlp.c_proj.bias": normal(h),
        })
    sd["transformer.ln_f.weight"] = normal(h, mean=1.0, std=0.1)
    sd["transformer.ln_f.bias"] = normal(h)
    return sd


def to_nemo_state_dict(sd: dict[str, torch.Tensor], model: SyntheticModel, seed: int = 1) -> OrderedDict:
    """GPT-2 layout -> NeMo-Megatron layout: un-transpose, regroup QKV rows as (heads, 3, head_dim), pad vocab."""
    h, heads = model.n_embd, model.n_head
    hd = h // heads
    wte = sd["transformer.wte.weight"]
    padding = torch.randn(model.padded_vocab - model.vocab_size, h,
                          generator=torch.Generator().manual_seed(seed)).to(wte.dtype)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    out[PREFIX + "embedding.word_embeddings.weight"] = torch.cat([wte, padding])
    out[PREFIX + "embedding.position_embeddings.weight"] = sd["transformer.wpe.weight"].clone()
    for i in range(model.n_layer):
        src, dst = f"transformer.h.{i}.", f"{PREFIX}encoder.layers.{i}."
        qkv_w = sd[src + "attn.c_attn.weight"].t()  # [3h, h], rows (3, heads, hd)
        qkv_b = sd[src + "attn.c_attn.bias"]
        out[dst + "input_layernorm.weight"] = sd[src + "ln_1.weight"].clone()
        out[dst + "input_layernorm.bias"] = sd[src + "ln_1.bias"].clone()
        out[dst + "self_attention.query_key_value.weight"] = (
            qkv_w.reshape(3, heads, hd, h).transpose(0, 1).reshape(3 * h, h).clone()
        )
        out[dst + "self_attention.query_key_value.bias"] = (
            qkv_b.reshape(3, heads, hd).transpose(0, 1).reshape(3 * h).clone()
        )
        out[dst + "self_attention.dense.weight"] = sd[src + "attn.c_proj.weight"].t().contiguous()
        out[dst + "self_attention.dense.bias"] = sd[src + "attn.c_proj.bias"].clone()
        out[dst + "post_attention_layernorm.weight"] = sd[src + "ln_2.weight"].clone()
        out[dst + "post_attention_layernorm.bias"] = sd[src + "ln_2.bias"].clone()
        out[dst + "mlp.dense_h_to_4h.weight"] = sd[src + "mlp.c_fc.weight"].t().contiguous()
        out[dst + "mlp.dense_h_to_4h.bias"] = sd[src + "mlp.c_fc.bias"].clone()
        out[dst + "mlp.dense_4h_to_h.weight"] = sd[src + "mlp.c_proj.weight"].t().contiguous()
        out[dst + "mlp.dense_4h_to_h.bias"] = sd[src + "mlp.c_proj.bias"].clone()
    out[PREFIX + "encoder.final_layernorm.weight"] = sd["transformer.ln_f.weight"].clone()
    out[PREFIX + "encoder.final_layernorm.bias"] = sd["transformer.ln_f.bias"].clone()
    return out


def nemo_config(model: SyntheticModel, precision: str):
    """`hyper_parameters` as NeMo saves it: one DictConfig({'cfg': ...}) with interpolations unresolved."""
    from omegaconf import OmegaConf

    cfg = {
        "precision": precision,
        "micro_batch_size": 4,
        "global_batch_size": 256,
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
        "encoder_seq_length": model.n_positions,
        "max_position_embeddings": "${.encoder_seq_length}",
        "num_layers": model.n_layer,
        "hidden_size": model.n_embd,
        "ffn_hidden_size": model.ffn,
        "num_attention_heads": model.n_head,
        "init_method_std": 0.02,
        "hidden_dropout": 0.1,
        "kv_channels": None,
        "apply_query_key_layer_scaling": True,
        "layernorm_epsilon": 1e-5,
        "make_vocab_size_divisible_by": model.make_vocab_size_divisible_by,
        "pre_process": True,
        "post_process": True,
        "share_embeddings_and_output_weights": True,
        "position_embedding_type": "learned_absolute",
        "activation": "gelu",
        "normalization": "layernorm",
        "transformer_block_type": "pre_ln",
        "tokenizer": {"library": "sentencepiece", "type": None,
                      "model": "nemo:4f2a1c9e_tokenizer.model", "vocab_file": None, "merge_file": None},
        "optim": {"name": "fused_adam", "lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.1,
                  "sched": {"name": "CosineAnnealing", "warmup_steps": 100, "min_lr": "${multiply:${..lr},0.1}"}},
    }
    return OmegaConf.create({"cfg": cfg})


def adam_state(weights: OrderedDict) -> dict:
    """fp32 Adam moments plus fp32 master weights, as NeMo's mixed-precision optimizer wrapper saves them."""
    params = list(weights.values())
    return {
        "optimizer": {
            "state": {
                i: {"exp_avg": torch.zeros(p.shape), "exp_avg_sq": torch.full(p.shape, 1e-8),
                    "step": torch.tensor(100.0)}
                for i, p in enumerate(params)
            },
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1,
                              "params": list(range(len(params)))}],
        },
        "fp32_from_fp16_params": [[p.float() for p in params]],
    }


def make_checkpoint(
    path: str | os.PathLike[str],
    model: SyntheticModel | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    optimizer: bool = True,
    seed: int = 0,
) -> SyntheticCheckpoint:
    """Write a NeMo-style Lightning `.ckpt` for `model` and return it with the GPT-2 weights it encodes."""
    from omegaconf import DictConfig

    model = model or SyntheticModel()
    hf = random_gpt2_state_dict(model, dtype, seed)
    weights = to_nemo_state_dict(hf, model, seed + 1)
    precision = {torch.bfloat16: "bf16", torch.float16: 16, torch.float32: 32}[dtype]
    checkpoint = {
        "epoch": 0,
        "global_step": 100,
        "pytorch-lightning_version": "1.9.5",
        "state_dict": weights,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 1, "completed": 0}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
            "best_model_score": torch.tensor(2.42), "best_model_path": "", "kth_best_model_path": ""}},
        "optimizer_states": [adam_state(weights)] if optimizer else [],
        "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 100, "_step_count": 101}],
        "NativeMixedPrecisionPlugin": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                       "growth_interval": 1000, "_growth_tracker": 0},
        "hparams_name": "cfg",
        "hyper_parameters": nemo_config(model, precision),
        "hparams_type": DictConfig,
    }
    torch.save(checkpoint, path)
    return SyntheticCheckpoint(os.fspath(path), model, hf)


# Runs a command and prints its peak RSS. Linux starts a child's ru_maxrss at its parent's RSS at fork
# (the hiwater mark survives exec), so measuring from a large parent (pytest holding test models) would
# report the parent. This launcher is a small Python with no torch: the command's own peak dominates.
_LAUNCHER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
    "sys.exit(code)\n"
)


def peak_rss_of(command: list[str]) -> int:
    """Run `command` (stdout discarded) and return its peak resident set in bytes; raise if it fails."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *map(str, command)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{command} exited with {proc.returncode}: {proc.stderr.strip()}")
    return int(proc.stdout.strip().splitlines()[-1])
