"""GPT-SW3 (NeMo-Megatron GPT) to Hugging Face GPT-2, as transformers' `gpt_sw3/convert_megatron_to_pytorch.py`.

Everything here is metadata (see `base`): which source tensor feeds which output name, how its elements are
rearranged, and the config. No weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from streamconv.errors import ConversionError, describe
from streamconv.recipes.base import (
    SCHEMES,
    Arrangement,
    Features,
    HParam,
    Names,
    TensorRecipe,
    check_layers,
    check_matrices,
    copy,
    flag,
    layer_ids,
    names_of,
    number,
    sizes,
    transpose,
)

NAME = "gpt-sw3"
MODEL_TYPE = "gpt2"
DESCRIPTION = "GPT-SW3 (GPT-2: LayerNorm, a GELU MLP, learned positions, biases, a tied output layer)"
HF_CLASS = "GPT2LMHeadModel"
SETTINGS = ()  # the forward-changing settings (`settings.FORWARD`) read here: none, GPT-2 has megatron-core's defaults
HEADS_KEY = "n_head"  # config.json's head count
GPT_SW3_VOCAB_SIZE = 64000
# A GPT-2 layer module (below `transformer.h.N.`) -> its role in the source's naming scheme
_ROLES = {"ln_1": "input_norm", "attn.c_attn": "qkv", "attn.c_proj": "proj", "ln_2": "mlp_norm", "mlp.c_fc": "fc1",
          "mlp.c_proj": "fc2"}


def accepts(found: Features) -> bool:
    return not (found.rms_norm or found.gated or found.rotary or found.grouped or found.odd) and found.bias \
        and found.tied


@dataclass(frozen=True)
class Dims:
    """The model dimensions the mapping needs, read from the NeMo config."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    positions: int
    vocab: int
    names: Names = field(default_factory=lambda: SCHEMES[0])  # the source's naming scheme
    embedding_rows: int = 0  # the embedding's rows in the checkpoint (the vocabulary padded)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def read_dims(hparam: HParam, shapes: dict[str, tuple[int, ...]], vocab_size: int | None = None,
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
    dims = Dims(
        hidden=values["hidden_size"],
        layers=values["num_layers"],
        heads=values["num_attention_heads"],
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


def tensor_recipes(dims: Dims) -> list[TensorRecipe]:
    """Every output tensor, in the order they are written: embeddings, then layer by layer, then ln_f."""
    embedding_rows = dims.embedding_rows
    if dims.vocab > embedding_rows:
        raise ConversionError(
            f"vocabulary size {dims.vocab} is larger than the {embedding_rows} embedding rows in the checkpoint; "
            f"pass --vocab-size {embedding_rows} or less (the default is GPT-SW3's {GPT_SW3_VOCAB_SIZE})"
        )
    h, f, heads, hd, names = dims.hidden, dims.ffn, dims.heads, dims.head_dim, dims.names
    out = [
        TensorRecipe("transformer.wte.weight", names.embedding, (embedding_rows, h), (dims.vocab, h),
                     copy((dims.vocab, h)), row_ranges=((0, dims.vocab),)),
        TensorRecipe("transformer.wpe.weight", names.positions, (dims.positions, h), (dims.positions, h),
                     copy((dims.positions, h))),
    ]
    for i in range(dims.layers):
        dst = f"transformer.h.{i}."

        def source(tensor: str) -> str:
            """The source name of the GPT-2 layer tensor `tensor` ('attn.c_attn.weight')."""
            module, field = tensor.rsplit(".", 1)
            return names.of(i, _ROLES[module], field)  # noqa: B023

        def vector(name: str, n: int) -> TensorRecipe:
            return TensorRecipe(dst + name, source(name), (n,), (n,), copy((n,)))  # noqa: B023

        def linear(name: str, n_out: int, n_in: int) -> TensorRecipe:
            # Megatron [out, in] -> Conv1D [in, out]
            return TensorRecipe(dst + name, source(name), (n_out, n_in), (n_in, n_out),  # noqa: B023
                                transpose(n_out, n_in))

        out += [
            vector("ln_1.weight", h),
            vector("ln_1.bias", h),
            TensorRecipe(dst + "attn.c_attn.weight", source("attn.c_attn.weight"),
                         (3 * h, h), (h, 3 * h), Arrangement("qkv_weight", (heads, 3, hd, h), (3, 1, 0, 2))),
            TensorRecipe(dst + "attn.c_attn.bias", source("attn.c_attn.bias"),
                         (3 * h,), (3 * h,), Arrangement("qkv_bias", (heads, 3, hd), (1, 0, 2))),
            linear("attn.c_proj.weight", h, h),
            vector("attn.c_proj.bias", h),
            vector("ln_2.weight", h),
            vector("ln_2.bias", h),
            linear("mlp.c_fc.weight", f, h),
            vector("mlp.c_fc.bias", f),
            linear("mlp.c_proj.weight", h, f),
            vector("mlp.c_proj.bias", h),
        ]
    out += [
        TensorRecipe("transformer.ln_f.weight", names.final_norm + ".weight", (h,), (h,), copy((h,))),
        TensorRecipe("transformer.ln_f.bias", names.final_norm + ".bias", (h,), (h,), copy((h,))),
    ]
    return out


def special_tokens(hidden: int) -> dict[str, str]:
    """GPT-SW3's special tokens as GPTSw3Tokenizer names them (ids 2/3/0 or 1/1/0 in `hf_config`): the 6.7B
    model's tokenizer has no `<s>` or `<pad>` and uses `<|endoftext|>` and `<unk>` in their place."""
    if hidden == 4096:
        return {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<unk>"}
    return {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<pad>"}


def tokenizer_settings(config: dict) -> dict:
    """`tokenizer_config.json` beside `spiece.model`: GPTSw3Tokenizer, its length and special tokens."""
    return {"tokenizer_class": "GPTSw3Tokenizer", "model_max_length": config["n_positions"],
            **special_tokens(config["n_embd"])}


def hf_config(hparam: HParam, dims: Dims, dtype_name: str) -> dict[str, Any]:
    """GPT2Config keyword arguments, as the reference's `copy_config` sets them."""
    if dims.hidden == 4096:  # the 6.7B model ships a different tokenizer
        bos, eos, pad = 1, 1, 0
    else:
        bos, eos, pad = 2, 3, 0
    return {
        "model_type": MODEL_TYPE,
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
        "layer_norm_epsilon": number("layernorm_epsilon", hparam("layernorm_epsilon", 1e-5, null=None), float,
                                     above=0, high=1),
        "initializer_range": number("init_method_std", hparam("init_method_std", 0.02), float, low=0),
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
