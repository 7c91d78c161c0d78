"""GPT-SW3 (NeMo-Megatron GPT) to Hugging Face GPT-2, as transformers' `gpt_sw3/convert_megatron_to_pytorch.py`.

Everything here is metadata (see `base`): which source tensor feeds which output name, how its elements are
rearranged, and the config. No weight is read.
"""

from __future__ import annotations

from typing import Any

from streamconv.errors import ConversionError, describe
from streamconv.families.base import (
    BIASES,
    LAYER_NORM,
    LEARNED,
    MULTI_HEAD,
    PLAIN,
    TIED,
    Dims,
    Entry,
    Family,
    HParam,
    check_layers,
    epsilon,
    flag,
    init_std,
    sizes,
)
from streamconv.families.megatron import check_matrices, layer_ids, names_of
from streamconv.families.registry import register
from streamconv.recipe import TensorRecipe

GPT_SW3_VOCAB_SIZE = 64000


def _layer(name: str, role: str, field: str, take: str = "whole") -> Entry:
    return Entry("transformer.h.{i}." + name, role, field, take)


@register
class GptSw3(Family):
    name = "gpt-sw3"
    model_type = "gpt2"
    architecture = "GPT2LMHeadModel"
    description = "GPT-SW3 (GPT-2: LayerNorm, a GELU MLP, learned positions, biases, a tied output layer)"
    traits = frozenset({LAYER_NORM, PLAIN, LEARNED, MULTI_HEAD, BIASES, TIED})
    heads_key = "n_head"
    sentencepiece = True
    head = (Entry("transformer.wte.weight", "embedding", take="vocab"), Entry("transformer.wpe.weight", "positions"))
    layer = (
        _layer("ln_1.weight", "input_norm", "weight"), _layer("ln_1.bias", "input_norm", "bias"),
        _layer("attn.c_attn.weight", "qkv", "weight", "gpt2_qkv"),
        _layer("attn.c_attn.bias", "qkv", "bias", "gpt2_qkv_bias"),
        _layer("attn.c_proj.weight", "proj", "weight", "transposed"), _layer("attn.c_proj.bias", "proj", "bias"),
        _layer("ln_2.weight", "mlp_norm", "weight"), _layer("ln_2.bias", "mlp_norm", "bias"),
        _layer("mlp.c_fc.weight", "fc1", "weight", "transposed"), _layer("mlp.c_fc.bias", "fc1", "bias"),
        _layer("mlp.c_proj.weight", "fc2", "weight", "transposed"), _layer("mlp.c_proj.bias", "fc2", "bias"),
    )
    tail = (Entry("transformer.ln_f.weight", "final_norm", "weight"), Entry("transformer.ln_f.bias", "final_norm",
                                                                            "bias"))

    def read_dims(self, hparam: HParam, shapes: dict[str, tuple[int, ...]], vocab_size: int | None = None,
                      num_heads: int | None = None, local_slices: int = 1) -> Dims:
        """Model dimensions from the NeMo cfg (`hparam(key)` reads one resolved value), checked against the
        tensor shapes. Without a cfg, every size but the head count is read from the shapes. (`local_slices` is
        not needed: GPT-2's tensors are whole once their tensor-parallel slices are concatenated.)"""
        names = names_of(shapes)
        check_matrices(shapes, names)
        found = layer_ids(shapes, names)
        fc1 = shapes.get(names.of(0, "fc1", "weight"))
        values = sizes(hparam, {
            "hidden_size": shapes[names.embedding][1],
            "num_layers": len(found),
            "ffn_hidden_size": fc1[0] if fc1 else None,
            "encoder_seq_length": shapes[names.positions][0] if names.positions in shapes else None,
            "num_attention_heads": num_heads,
        }, num_heads)
        hidden, heads = values["hidden_size"], values["num_attention_heads"]
        dims = Dims(
            hidden=hidden,
            layers=values["num_layers"],
            heads=heads,
            groups=heads,
            head_dim=hidden // heads if heads > 0 else 0,
            ffn=values["ffn_hidden_size"],
            positions=values["encoder_seq_length"],
            vocab=GPT_SW3_VOCAB_SIZE if vocab_size is None else int(vocab_size),
            names=names,
            embedding_rows=shapes[names.embedding][0],
        )
        if dims.heads <= 0 or dims.hidden % dims.heads:
            raise ConversionError(
                f"hidden_size {dims.hidden} is not divisible by num_attention_heads {dims.heads}; check the cfg "
                "or --num-heads"
            )
        kv_channels = hparam("kv_channels")
        if kv_channels is not None and kv_channels != dims.head_dim:
            raise ConversionError(f"the cfg says kv_channels {describe(kv_channels)}, not hidden_size / "
                                  f"num_attention_heads = {dims.head_dim}, which GPT-2 cannot express; fix the cfg")
        check_layers(dims.layers, found)
        if dims.vocab <= 0:
            raise ConversionError(f"--vocab-size must be positive, got {dims.vocab}")
        return dims

    def tensor_recipes(self, dims: Dims) -> list[TensorRecipe]:
        """Every output tensor, in the order they are written: embeddings, then layer by layer, then ln_f."""
        if dims.vocab > dims.embedding_rows:
            raise ConversionError(
                f"vocabulary size {dims.vocab} is larger than the {dims.embedding_rows} embedding rows in the "
                f"checkpoint; pass --vocab-size {dims.embedding_rows} or less (the default is GPT-SW3's "
                f"{GPT_SW3_VOCAB_SIZE})"
            )
        return super().tensor_recipes(dims)

    def tokenizer_settings(self, config: dict) -> dict:
        """`tokenizer_config.json` beside `spiece.model`: GPTSw3Tokenizer, its length and special tokens."""
        return {"tokenizer_class": "GPTSw3Tokenizer", "model_max_length": config["n_positions"],
                **special_tokens(config["n_embd"])}

    def hf_config(self, hparam: HParam, dims: Dims, dtype_name: str) -> dict[str, Any]:
        """GPT2Config keyword arguments, as the reference's `copy_config` sets them."""
        if dims.hidden == 4096:  # the 6.7B model ships a different tokenizer
            bos, eos, pad = 1, 1, 0
        else:
            bos, eos, pad = 2, 3, 0
        return {
            "model_type": self.model_type,
            "vocab_size": dims.vocab,
            "n_positions": dims.positions,
            "n_embd": dims.hidden,
            "n_layer": dims.layers,
            "n_head": dims.heads,
            "n_inner": dims.ffn,
            "activation_function": "gelu",
            "resid_pdrop": 0.1,
            "embd_pdrop": 0.1,
            "attn_pdrop": 0.1,
            "layer_norm_epsilon": epsilon(hparam),
            "initializer_range": init_std(hparam),
            "apply_query_key_layer_scaling": flag(hparam, "apply_query_key_layer_scaling") is not False,
            "normalize_attention_scores": True,
            "use_cache": True,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "tie_word_embeddings": True,
            "architectures": ["GPT2LMHeadModel"],
            "tokenizer_class": "GPTSw3Tokenizer",
            "dtype": dtype_name,
        }


def special_tokens(hidden: int) -> dict[str, str]:
    """GPT-SW3's special tokens as GPTSw3Tokenizer names them (ids 2/3/0 or 1/1/0 in `hf_config`): the 6.7B
    model's tokenizer has no `<s>` or `<pad>` and uses `<|endoftext|>` and `<unk>` in their place."""
    if hidden == 4096:
        return {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<unk>"}
    return {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<pad>"}
