"""An independent, in-memory implementation of the reference conversion (transformers' gpt_sw3 script).

It loads the whole checkpoint trusting it (test files only) and applies the reference's operations
literally, so streamconv's output can be compared with it bit for bit.
"""

import torch


def fix_query_key_value_ordering(param, num_splits, num_heads, hidden_size):
    input_shape = param.size()
    saved_shape = (num_heads, num_splits, hidden_size) + input_shape[1:]
    param = param.view(*saved_shape)
    param = param.transpose(0, 1).contiguous()
    return param.view(*input_shape)


def reference_convert(checkpoint_path, vocab_size=64000):
    ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    cfg = ckpt["hyper_parameters"]["cfg"]
    sd = ckpt["state_dict"]
    heads, hidden, layers = cfg["num_attention_heads"], cfg["hidden_size"], cfg["num_layers"]
    hd = hidden // heads
    out = {
        "transformer.wte.weight": sd["model.language_model.embedding.word_embeddings.weight"][:vocab_size, :],
        "transformer.wpe.weight": sd["model.language_model.embedding.position_embeddings.weight"],
        "transformer.ln_f.weight": sd["model.language_model.encoder.final_layernorm.weight"],
        "transformer.ln_f.bias": sd["model.language_model.encoder.final_layernorm.bias"],
    }
    pf = "model.language_model.encoder.layers."
    for i in range(layers):
        out[f"transformer.h.{i}.ln_1.weight"] = sd[f"{pf}{i}.input_layernorm.weight"]
        out[f"transformer.h.{i}.ln_1.bias"] = sd[f"{pf}{i}.input_layernorm.bias"]
        val1 = fix_query_key_value_ordering(sd[f"{pf}{i}.self_attention.query_key_value.weight"], 3, heads, hd)
        out[f"transformer.h.{i}.attn.c_attn.weight"] = val1.transpose(0, 1).contiguous()
        val2 = fix_query_key_value_ordering(sd[f"{pf}{i}.self_attention.query_key_value.bias"], 3, heads, hd)
        out[f"transformer.h.{i}.attn.c_attn.bias"] = val2
        out[f"transformer.h.{i}.attn.c_proj.weight"] = sd[f"{pf}{i}.self_attention.dense.weight"].transpose(0, 1)
        out[f"transformer.h.{i}.attn.c_proj.bias"] = sd[f"{pf}{i}.self_attention.dense.bias"]
        out[f"transformer.h.{i}.ln_2.weight"] = sd[f"{pf}{i}.post_attention_layernorm.weight"]
        out[f"transformer.h.{i}.ln_2.bias"] = sd[f"{pf}{i}.post_attention_layernorm.bias"]
        out[f"transformer.h.{i}.mlp.c_fc.weight"] = sd[f"{pf}{i}.mlp.dense_h_to_4h.weight"].transpose(0, 1)
        out[f"transformer.h.{i}.mlp.c_fc.bias"] = sd[f"{pf}{i}.mlp.dense_h_to_4h.bias"]
        out[f"transformer.h.{i}.mlp.c_proj.weight"] = sd[f"{pf}{i}.mlp.dense_4h_to_h.weight"].transpose(0, 1)
        out[f"transformer.h.{i}.mlp.c_proj.bias"] = sd[f"{pf}{i}.mlp.dense_4h_to_h.bias"]
    return {k: v.contiguous() for k, v in out.items()}
