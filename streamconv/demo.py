"""`streamconv --demo`: make a small GPT-SW3-style checkpoint, convert it, and show transformers agrees.

The checkpoint writer lives here, in the installed package, because the demo runs on a bare install. The
tests and benchmarks write their checkpoints with it too, and keep their other writers (`.nemo` files,
tensor/pipeline-parallel ranks, SentencePiece models) and the RSS launcher in tests/ and benchmarks/.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from streamconv.converter import convert
from streamconv.errors import one_line
from streamconv.output import check_save_path


def run_demo(save_path: str | None = None, *, device: str = "cpu", shard_size: str = "5GB",
             overwrite: bool = False, quiet: bool = False) -> int:
    """Returns 0 when the converted model's logits equal the source model's exactly, else 1.

    `save_path` is checked before anything is built, as a conversion checks it.
    """
    if save_path is not None:
        check_save_path(save_path, overwrite)
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    model = SyntheticModel(n_embd=128, n_layer=4, n_head=4, vocab_size=64000, n_positions=256)
    with tempfile.TemporaryDirectory(prefix="streamconv-demo-") as tmp:
        ckpt_path = os.path.join(tmp, "megatron_gpt_sw3.ckpt")
        source = make_checkpoint(ckpt_path, model, dtype=torch.bfloat16)
        print(f"demo: wrote a NeMo-style checkpoint ({os.path.getsize(ckpt_path) / 1e6:.1f} MB with optimizer "
              f"state): hidden {model.n_embd}, {model.n_layer} layers, {model.n_head} heads, vocab {model.vocab_size}")
        out = save_path or os.path.join(tmp, "hf")
        result = convert(ckpt_path, out, device=device, shard_size=shard_size, overwrite=overwrite,
                         progress=not quiet)
        print(one_line(result.summary()))

        reference = GPT2LMHeadModel(source.gpt2_config())
        reference.load_state_dict(source.hf_state_dict, strict=False)  # lm_head is tied to wte
        reference.float().eval()
        converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        tokens = torch.randint(0, model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = (converted(tokens).logits - reference(tokens).logits).abs().max().item()
    ok = diff == 0.0
    print(f"demo: logits of the converted model vs the source model on {tokens.numel()} tokens: "
          f"max abs diff {diff} -> {'OK' if ok else 'MISMATCH'}")
    print(one_line(f"demo: the converted model is in {save_path}") if save_path
          else "demo: the converted model was in a temporary folder; pass --save-path DIR to keep it")
    sys.stdout.flush()
    return 0 if ok else 1


# --- The checkpoint it converts: a synthetic NeMo-Megatron GPT-SW3 .ckpt -------------------------------------
#
# A seeded random GPT-2 state dict is mapped backwards into NeMo's layout (the inverse of the recipe,
# written independently of it) and saved as PyTorch Lightning does: top-level training keys, OmegaConf
# `DictConfig` hyper-parameters with unresolved interpolations, fp32 Adam state beside the weights, and
# vocabulary rows padded to a multiple of `make_vocab_size_divisible_by`.

PREFIX = "model.language_model."


@dataclass
class SyntheticModel:
    """A GPT-SW3-shaped model; defaults are tiny. `n_inner` defaults to 4 x `n_embd` as in GPT-SW3.

    `tensor_model_parallel_size` is the TP degree the model was trained with: NeMo pads the vocabulary to a
    multiple of `make_vocab_size_divisible_by` x TP so the embedding splits evenly across TP ranks.
    """

    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_inner: int | None = None
    vocab_size: int = 64000
    n_positions: int = 128
    make_vocab_size_divisible_by: int = 128
    tensor_model_parallel_size: int = 1

    @property
    def ffn(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def padded_vocab(self) -> int:
        m = self.make_vocab_size_divisible_by * self.tensor_model_parallel_size
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
    sd: dict[str, torch.Tensor] = {}
    for group in random_gpt2_groups(model, dtype, seed):
        sd.update(group)
    return sd


def random_gpt2_groups(model: SyntheticModel, dtype: torch.dtype, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """The same weights as `random_gpt2_state_dict`, drawn in the same order, one group at a time
    (embeddings, each layer, the final norm), so a large model never needs two copies in memory."""
    gen = torch.Generator().manual_seed(seed)
    h, f = model.n_embd, model.ffn

    def normal(*shape: int, mean: float = 0.0, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std + mean).to(dtype)

    yield {
        "transformer.wte.weight": normal(model.vocab_size, h),
        "transformer.wpe.weight": normal(model.n_positions, h, std=0.01),
    }
    for i in range(model.n_layer):
        p = f"transformer.h.{i}."
        yield {
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
        }
    yield {
        "transformer.ln_f.weight": normal(h, mean=1.0, std=0.1),
        "transformer.ln_f.bias": normal(h),
    }


def to_nemo_state_dict(sd: dict[str, torch.Tensor], model: SyntheticModel, seed: int = 1) -> OrderedDict:
    """GPT-2 layout -> NeMo-Megatron layout: un-transpose, regroup QKV rows as (heads, 3, head_dim), pad vocab."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    out.update(_nemo_embeddings(sd, model, seed))
    for i in range(model.n_layer):
        out.update(_nemo_layer(sd, model, i))
    out.update(_nemo_final(sd))
    return out


def _nemo_embeddings(sd: dict[str, torch.Tensor], model: SyntheticModel, seed: int) -> dict[str, torch.Tensor]:
    wte = sd["transformer.wte.weight"]
    padding = torch.randn(model.padded_vocab - model.vocab_size, model.n_embd,
                          generator=torch.Generator().manual_seed(seed)).to(wte.dtype)
    return {
        PREFIX + "embedding.word_embeddings.weight": torch.cat([wte, padding]),
        PREFIX + "embedding.position_embeddings.weight": sd["transformer.wpe.weight"].clone(),
    }


def _nemo_layer(sd: dict[str, torch.Tensor], model: SyntheticModel, i: int) -> dict[str, torch.Tensor]:
    h, heads = model.n_embd, model.n_head
    hd = h // heads
    src, dst = f"transformer.h.{i}.", f"{PREFIX}encoder.layers.{i}."
    qkv_w = sd[src + "attn.c_attn.weight"].t()  # [3h, h], rows (3, heads, hd)
    qkv_b = sd[src + "attn.c_attn.bias"]
    return {
        dst + "input_layernorm.weight": sd[src + "ln_1.weight"].clone(),
        dst + "input_layernorm.bias": sd[src + "ln_1.bias"].clone(),
        dst + "self_attention.query_key_value.weight": (
            qkv_w.reshape(3, heads, hd, h).transpose(0, 1).reshape(3 * h, h).clone()
        ),
        dst + "self_attention.query_key_value.bias": (
            qkv_b.reshape(3, heads, hd).transpose(0, 1).reshape(3 * h).clone()
        ),
        dst + "self_attention.dense.weight": sd[src + "attn.c_proj.weight"].t().contiguous(),
        dst + "self_attention.dense.bias": sd[src + "attn.c_proj.bias"].clone(),
        dst + "post_attention_layernorm.weight": sd[src + "ln_2.weight"].clone(),
        dst + "post_attention_layernorm.bias": sd[src + "ln_2.bias"].clone(),
        dst + "mlp.dense_h_to_4h.weight": sd[src + "mlp.c_fc.weight"].t().contiguous(),
        dst + "mlp.dense_h_to_4h.bias": sd[src + "mlp.c_fc.bias"].clone(),
        dst + "mlp.dense_4h_to_h.weight": sd[src + "mlp.c_proj.weight"].t().contiguous(),
        dst + "mlp.dense_4h_to_h.bias": sd[src + "mlp.c_proj.bias"].clone(),
    }


def _nemo_final(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        PREFIX + "encoder.final_layernorm.weight": sd["transformer.ln_f.weight"].clone(),
        PREFIX + "encoder.final_layernorm.bias": sd["transformer.ln_f.bias"].clone(),
    }




def nemo_config(
    model: SyntheticModel,
    precision: str | int,
    *,
    pipeline_model_parallel_size: int = 1,
    tokenizer_model: str = "nemo:4f2a1c9e_tokenizer.model",
):
    """`hyper_parameters` as NeMo saves it: one DictConfig({'cfg': ...}) with interpolations unresolved.

    The TP degree is the model's `tensor_model_parallel_size` (it also sets the vocabulary padding)."""
    from omegaconf import OmegaConf

    cfg = {
        "precision": precision,
        "micro_batch_size": 4,
        "global_batch_size": 256,
        "tensor_model_parallel_size": model.tensor_model_parallel_size,
        "pipeline_model_parallel_size": pipeline_model_parallel_size,
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
                      "model": tokenizer_model, "vocab_file": None, "merge_file": None},
        "optim": {"name": "fused_adam", "lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.1,
                  "sched": {"name": "CosineAnnealing", "warmup_steps": 100, "min_lr": "${multiply:${..lr},0.1}"}},
    }
    return OmegaConf.create({"cfg": cfg})


def adam_state(weights: OrderedDict, zeros_file: str | None = None) -> dict:
    """fp32 Adam moments plus fp32 master weights, as NeMo's mixed-precision optimizer wrapper saves them.

    With `zeros_file` (a sparse file at least as large as the largest fp32 parameter) every optimizer tensor
    is a private mapping of it, all zeros: the saved file has the real layout and size, but building it costs
    page cache instead of six bytes of RAM per parameter (a 2.6 GB bf16 model carries 16 GB of such state).
    """
    params = list(weights.values())

    def fp32(p: torch.Tensor, fill: float) -> torch.Tensor:
        if zeros_file is None:
            return torch.full(p.shape, fill) if fill else torch.zeros(p.shape)
        return torch.from_file(zeros_file, shared=False, size=p.numel(), dtype=torch.float32).view(p.shape)

    return {
        "optimizer": {
            "state": {
                i: {"exp_avg": fp32(p, 0.0), "exp_avg_sq": fp32(p, 1e-8), "step": torch.tensor(100.0)}
                for i, p in enumerate(params)
            },
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1,
                              "params": list(range(len(params)))}],
        },
        "fp32_from_fp16_params": [[p.float() if zeros_file is None else fp32(p, 0.0) for p in params]],
    }


def make_checkpoint(
    path: str | os.PathLike[str],
    model: SyntheticModel | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    optimizer: bool = True,
    seed: int = 0,
    keep_hf: bool = True,
) -> SyntheticCheckpoint:
    """Write a NeMo-style Lightning `.ckpt` for `model` and return it with the GPT-2 weights it encodes.

    `keep_hf=False` is the memory-lean path for benchmark-sized models: the same weights are built one layer
    at a time without keeping the GPT-2 copy (the result's `hf_state_dict` is empty), and optimizer state is
    zeros mapped from a sparse scratch file, so RAM holds the NeMo weights once plus one layer.
    """
    model = model or SyntheticModel()
    zeros_file = None
    if keep_hf:
        hf = random_gpt2_state_dict(model, dtype, seed)
        weights = to_nemo_state_dict(hf, model, seed + 1)
    else:
        hf = {}
        weights = OrderedDict()
        for i, group in enumerate(random_gpt2_groups(model, dtype, seed)):
            if i == 0:
                weights.update(_nemo_embeddings(group, model, seed + 1))
            elif i <= model.n_layer:
                weights.update(_nemo_layer(group, model, i - 1))
            else:
                weights.update(_nemo_final(group))
            del group
        if optimizer:
            zeros_file = f"{os.fspath(path)}.zeros"
            with open(zeros_file, "wb") as f:
                f.truncate(4 * max(p.numel() for p in weights.values()))
    checkpoint = lightning_checkpoint(
        weights, nemo_config(model, nemo_precision(dtype)), [adam_state(weights, zeros_file)] if optimizer else []
    )
    try:
        torch.save(checkpoint, path)
    finally:
        if zeros_file is not None:
            os.remove(zeros_file)
    return SyntheticCheckpoint(os.fspath(path), model, hf)


def nemo_precision(dtype: torch.dtype) -> str | int:
    return {torch.bfloat16: "bf16", torch.float16: 16, torch.float32: 32}[dtype]


def lightning_checkpoint(weights: Mapping[str, torch.Tensor], hyper_parameters, optimizer_states: list) -> dict:
    """The dict PyTorch Lightning saves for a NeMo model: training keys around `state_dict` and the config."""
    from omegaconf import DictConfig

    return {
        "epoch": 0,
        "global_step": 100,
        "pytorch-lightning_version": "1.9.5",
        "state_dict": weights,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 1, "completed": 0}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
            "best_model_score": torch.tensor(2.42), "best_model_path": "", "kth_best_model_path": ""}},
        "optimizer_states": optimizer_states,
        "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 100, "_step_count": 101}],
        "NativeMixedPrecisionPlugin": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                       "growth_interval": 1000, "_growth_tracker": 0},
        "hparams_name": "cfg",
        "hyper_parameters": hyper_parameters,
        "hparams_type": DictConfig,
    }
