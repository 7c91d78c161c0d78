"""The naive converter, as users run it today: transformers' `gpt_sw3/convert_megatron_to_pytorch.py`.

Loads the whole checkpoint (optimizer state included) into RAM, converts with the reference mapping and
`torch.save`s one `pytorch_model.bin`. The operations follow the reference literally (causal-mask buffers,
tied `lm_head`, views left non-contiguous). One addition: the output file is fsynced, as `copy` and
streamconv do, so all contenders are timed until their bytes are on disk.

Usage: python -m benchmarks.naive SRC.ckpt DST_FOLDER [--vocab-size N]
"""

from __future__ import annotations

import argparse
import os

import torch


def fix_query_key_value_ordering(param: torch.Tensor, num_splits: int, num_heads: int, hidden: int) -> torch.Tensor:
    input_shape = param.size()
    saved_shape = (num_heads, num_splits, hidden) + input_shape[1:]
    param = param.view(*saved_shape)
    param = param.transpose(0, 1).contiguous()
    return param.view(*input_shape)


def convert_megatron_checkpoint(sd: dict, cfg, vocab_size: int) -> dict[str, torch.Tensor]:
    """The reference's mapping, NeMo names to GPT-2 names."""
    n_positions, layers, heads = cfg["encoder_seq_length"], cfg["num_layers"], cfg["num_attention_heads"]
    head_dim = cfg["hidden_size"] // heads
    word_embeddings = sd["model.language_model.embedding.word_embeddings.weight"][:vocab_size, :]
    out = {
        "transformer.wte.weight": word_embeddings,
        "transformer.wpe.weight": sd["model.language_model.embedding.position_embeddings.weight"],
        "transformer.ln_f.weight": sd["model.language_model.encoder.final_layernorm.weight"],
        "transformer.ln_f.bias": sd["model.language_model.encoder.final_layernorm.bias"],
    }
    pf = "model.language_model.encoder.layers."
    for i in range(layers):
        causal_mask = torch.tril(torch.ones((n_positions, n_positions), dtype=torch.bool))
        out[f"transformer.h.{i}.attn.bias"] = causal_mask.view(1, 1, n_positions, n_positions)
        out[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4, dtype=torch.bfloat16)
        out[f"transformer.h.{i}.ln_1.weight"] = sd[f"{pf}{i}.input_layernorm.weight"]
        out[f"transformer.h.{i}.ln_1.bias"] = sd[f"{pf}{i}.input_layernorm.bias"]
        val1 = fix_query_key_value_ordering(sd[f"{pf}{i}.self_attention.query_key_value.weight"], 3, heads, head_dim)
        out[f"transformer.h.{i}.attn.c_attn.weight"] = val1.transpose(0, 1).contiguous()
        val2 = fix_query_key_value_ordering(sd[f"{pf}{i}.self_attention.query_key_value.bias"], 3, heads, head_dim)
        out[f"transformer.h.{i}.attn.c_attn.bias"] = val2
        out[f"transformer.h.{i}.attn.c_proj.weight"] = sd[f"{pf}{i}.self_attention.dense.weight"].transpose(0, 1)
        out[f"transformer.h.{i}.attn.c_proj.bias"] = sd[f"{pf}{i}.self_attention.dense.bias"]
        out[f"transformer.h.{i}.ln_2.weight"] = sd[f"{pf}{i}.post_attention_layernorm.weight"]
        out[f"transformer.h.{i}.ln_2.bias"] = sd[f"{pf}{i}.post_attention_layernorm.bias"]
        out[f"transformer.h.{i}.mlp.c_fc.weight"] = sd[f"{pf}{i}.mlp.dense_h_to_4h.weight"].transpose(0, 1)
        out[f"transformer.h.{i}.mlp.c_fc.bias"] = sd[f"{pf}{i}.mlp.dense_h_to_4h.bias"]
        out[f"transformer.h.{i}.mlp.c_proj.weight"] = sd[f"{pf}{i}.mlp.dense_4h_to_h.weight"].transpose(0, 1)
        out[f"transformer.h.{i}.mlp.c_proj.bias"] = sd[f"{pf}{i}.mlp.dense_4h_to_h.bias"]
    out["lm_head.weight"] = word_embeddings
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.naive", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint_path")
    p.add_argument("save_path")
    p.add_argument("--vocab-size", type=int, default=64000)
    args = p.parse_args(argv)

    # Trusted synthetic input: the reference unpickles everything, OmegaConf objects included.
    checkpoint = torch.load(args.checkpoint_path, map_location="cpu", weights_only=False)
    cfg = checkpoint["hyper_parameters"]["cfg"]
    out = convert_megatron_checkpoint(checkpoint["state_dict"], cfg, args.vocab_size)

    from transformers import GPT2Config

    config = GPT2Config(
        vocab_size=args.vocab_size, n_positions=cfg["encoder_seq_length"], n_embd=cfg["hidden_size"],
        n_layer=cfg["num_layers"], n_head=cfg["num_attention_heads"], n_inner=cfg["ffn_hidden_size"],
        activation_function="gelu", layer_norm_epsilon=cfg["layernorm_epsilon"], tie_word_embeddings=True,
        architectures=["GPT2LMHeadModel"],
    )
    os.makedirs(args.save_path, exist_ok=True)
    config.save_pretrained(args.save_path)
    target = os.path.join(args.save_path, "pytorch_model.bin")
    torch.save(out, target)
    with open(target, "rb") as f:
        os.fsync(f.fileno())


if __name__ == "__main__":
    main()
