"""GPT-SW3 (NeMo-Megatron GPT) to Hugging Face GPT-2, as transformers' `gpt_sw3/convert_megatron_to_pytorch.py`.

Everything here is metadata: which source tensor feeds which output name, how its elements are
rearranged, and the config. No weight is read.

An arrangement is written as data: view the source as `view` (built from its shape and the config), then
permute the axes by `perm`. Output bytes are the permuted view, read in row-major order. Examples:
- GPT-2 stores linear weights as Conv1D `[in, out]`; Megatron as `[out, in]`: view `(out, in)`, perm `(1, 0)`.
- Megatron's fused QKV rows are grouped `(heads, 3, head_dim)`, GPT-2's `(3, heads, head_dim)`, and the
  weight is transposed as well: view `(heads, 3, head_dim, in)`, perm `(3, 1, 0, 2)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streamconv.errors import ConversionError, describe, is_whole

GPT_SW3_VOCAB_SIZE = 64000

EMBEDDING = "model.language_model.embedding.word_embeddings.weight"
POSITIONS = "model.language_model.embedding.position_embeddings.weight"
FINAL_NORM = "model.language_model.encoder.final_layernorm"
LAYER_PREFIX = "model.language_model.encoder.layers."
LAYER = LAYER_PREFIX + "{i}."

@dataclass(frozen=True)
class Arrangement:
    """How a source tensor's elements are laid out in the output: view, then permute."""

    name: str
    view: tuple[int, ...]
    perm: tuple[int, ...]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.view[p] for p in self.perm)

    @property
    def moves(self) -> bool:
        """Whether any element changes place (a transpose or regroup, not a plain copy)."""
        return self.perm != tuple(range(len(self.perm)))


@dataclass(frozen=True)
class TensorRecipe:
    """One output tensor: its name, its source tensor and the expected source shape, its arrangement."""

    name: str
    source: str
    source_shape: tuple[int, ...]
    shape: tuple[int, ...]  # output shape as GPT-2 declares it
    arrangement: Arrangement
    rows: int | None = None  # keep only the first `rows` rows of the source (vocabulary padding)


@dataclass(frozen=True)
class Dims:
    """The model dimensions the mapping needs, read from the NeMo config."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    positions: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def _copy(shape: tuple[int, ...]) -> Arrangement:
    return Arrangement("copy", shape, tuple(range(len(shape))))


def _transpose(rows: int, cols: int) -> Arrangement:
    return Arrangement("transpose", (rows, cols), (1, 0))


def layer_id(key: str) -> int:
    """The layer number in a `...encoder.layers.<i>.` state_dict key."""
    local = key[len(LAYER_PREFIX):].split(".")[0]
    if not (local.isascii() and local.isdecimal()):
        raise ConversionError(f"unexpected state_dict key {key!r} (no layer number); is this a GPT checkpoint?")
    return int(local)


def number(key: str, value: Any, kind: type) -> Any:
    """A cfg value as an int or float, or a one-line error naming the key."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) >= 2**63 \
            or kind is int and not is_whole(value):
        wanted = "a whole number" if kind is int else "a number"
        raise ConversionError(f"hyper-parameter {key!r} is {describe(value)}, not {wanted}; fix the checkpoint's cfg")
    return kind(value)


def read_dims(hparam: Any, shapes: dict[str, tuple[int, ...]], vocab_size: int | None = None,
              num_heads: int | None = None) -> Dims:
    """Model dimensions from the NeMo cfg (`hparam(key)` reads one resolved value), checked against the
    tensor shapes. Without a cfg, every size but the head count is read from the shapes."""
    if EMBEDDING not in shapes:
        raise ConversionError(f"source tensor {EMBEDDING!r} is missing from the checkpoint's state_dict")
    layer_ids = sorted({layer_id(k) for k in shapes if k.startswith(LAYER_PREFIX)})
    h_to_4h = shapes.get(LAYER.format(i=0) + "mlp.dense_h_to_4h.weight")
    inferred = {
        "hidden_size": shapes[EMBEDDING][1],
        "num_layers": len(layer_ids),
        "ffn_hidden_size": h_to_4h[0] if h_to_4h else None,
        "encoder_seq_length": shapes[POSITIONS][0] if POSITIONS in shapes else None,
        "num_attention_heads": num_heads,
    }
    values = {}
    for key, guess in inferred.items():
        value = num_heads if key == "num_attention_heads" and num_heads else hparam(key)
        if value is None:
            value = guess
        if value is None:
            fix = "pass --num-heads N" if key == "num_attention_heads" else "fix the checkpoint's cfg"
            raise ConversionError(
                f"hyper-parameter {key!r} is not in the checkpoint's cfg and cannot be read from the tensors; {fix}"
            )
        values[key] = number(key, value, int)
    dims = Dims(
        hidden=values["hidden_size"],
        layers=values["num_layers"],
        heads=values["num_attention_heads"],
        ffn=values["ffn_hidden_size"],
        positions=values["encoder_seq_length"],
        vocab=GPT_SW3_VOCAB_SIZE if vocab_size is None else int(vocab_size),
    )
    if dims.heads <= 0 or dims.hidden % dims.heads:
        raise ConversionError(
            f"hidden_size {dims.hidden} is not divisible by num_attention_heads {dims.heads}; check the cfg "
            "or --num-heads"
        )
    if layer_ids != list(range(dims.layers)):
        found = f"layers {layer_ids[0]}..{layer_ids[-1]}" if layer_ids else "no layers"
        raise ConversionError(
            f"the cfg says num_layers {dims.layers} but the state_dict holds {found} ({len(layer_ids)} in all); "
            "is this one pipeline stage of a larger model?"
        )
    if dims.vocab <= 0:
        raise ConversionError(f"--vocab-size must be positive, got {dims.vocab}")
    return dims


def tensor_recipes(dims: Dims, embedding_rows: int) -> list[TensorRecipe]:
    """Every output tensor, in the order they are written: embeddings, then layer by layer, then ln_f."""
    if dims.vocab > embedding_rows:
        raise ConversionError(
            f"vocabulary size {dims.vocab} is larger than the {embedding_rows} embedding rows in the checkpoint; "
            f"pass --vocab-size {embedding_rows} or less (the default is GPT-SW3's {GPT_SW3_VOCAB_SIZE})"
        )
    h, f, heads, hd = dims.hidden, dims.ffn, dims.heads, dims.head_dim
    out = [
        TensorRecipe("transformer.wte.weight", EMBEDDING, (embedding_rows, h), (dims.vocab, h),
                     _copy((dims.vocab, h)), rows=dims.vocab),
        TensorRecipe("transformer.wpe.weight", POSITIONS, (dims.positions, h), (dims.positions, h),
                     _copy((dims.positions, h))),
    ]
    for i in range(dims.layers):
        src, dst = LAYER.format(i=i), f"transformer.h.{i}."

        def vector(name: str, source: str, n: int) -> TensorRecipe:
            return TensorRecipe(dst + name, src + source, (n,), (n,), _copy((n,)))  # noqa: B023

        def linear(name: str, source: str, n_out: int, n_in: int) -> TensorRecipe:
            # Megatron [out, in] -> Conv1D [in, out]
            return TensorRecipe(dst + name, src + source, (n_out, n_in), (n_in, n_out),  # noqa: B023
                                _transpose(n_out, n_in))

        out += [
            vector("ln_1.weight", "input_layernorm.weight", h),
            vector("ln_1.bias", "input_layernorm.bias", h),
            TensorRecipe(dst + "attn.c_attn.weight", src + "self_attention.query_key_value.weight",
                         (3 * h, h), (h, 3 * h), Arrangement("qkv_weight", (heads, 3, hd, h), (3, 1, 0, 2))),
            TensorRecipe(dst + "attn.c_attn.bias", src + "self_attention.query_key_value.bias",
                         (3 * h,), (3 * h,), Arrangement("qkv_bias", (heads, 3, hd), (1, 0, 2))),
            linear("attn.c_proj.weight", "self_attention.dense.weight", h, h),
            vector("attn.c_proj.bias", "self_attention.dense.bias", h),
            vector("ln_2.weight", "post_attention_layernorm.weight", h),
            vector("ln_2.bias", "post_attention_layernorm.bias", h),
            linear("mlp.c_fc.weight", "mlp.dense_h_to_4h.weight", f, h),
            vector("mlp.c_fc.bias", "mlp.dense_h_to_4h.bias", f),
            linear("mlp.c_proj.weight", "mlp.dense_4h_to_h.weight", h, f),
            vector("mlp.c_proj.bias", "mlp.dense_4h_to_h.bias", h),
        ]
    out += [
        TensorRecipe("transformer.ln_f.weight", FINAL_NORM + ".weight", (h,), (h,), _copy((h,))),
        TensorRecipe("transformer.ln_f.bias", FINAL_NORM + ".bias", (h,), (h,), _copy((h,))),
    ]
    return out


def special_tokens(hidden: int) -> dict[str, str]:
    """GPT-SW3's special tokens as GPTSw3Tokenizer names them (ids 2/3/0 or 1/1/0 in `hf_config`): the 6.7B
    model's tokenizer has no `<s>` or `<pad>` and uses `<|endoftext|>` and `<unk>` in their place."""
    if hidden == 4096:
        return {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<unk>"}
    return {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<pad>"}


def hf_config(hparam: Any, dims: Dims, dtype_name: str) -> dict[str, Any]:
    """GPT2Config keyword arguments, as the reference's `copy_config` sets them."""
    if dims.hidden == 4096:  # the 6.7B model ships a different tokenizer
        bos, eos, pad = 1, 1, 0
    else:
        bos, eos, pad = 2, 3, 0
    return {
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
        "layer_norm_epsilon": number("layernorm_epsilon", hparam("layernorm_epsilon", 1e-5), float),
        "initializer_range": number("init_method_std", hparam("init_method_std", 0.02), float),
        "apply_query_key_layer_scaling": bool(hparam("apply_query_key_layer_scaling", True)),
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
