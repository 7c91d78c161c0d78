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

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from streamconv.errors import ConversionError, describe, is_whole

GPT_SW3_VOCAB_SIZE = 64000



@dataclass(frozen=True)
class Names:
    """Where a naming scheme keeps each GPT-2 tensor: legacy NeMo's (`model.language_model.`) or megatron-core's
    (`decoder.layers.N.`, under `model.` in NeMo 1.x, `module.` in NeMo 2.0, no prefix in Megatron-LM).
    `layer` maps a GPT-2 layer tensor (its name below `transformer.h.N.`) to the source's, below `layers`."""

    scheme: str
    embedding: str
    positions: str
    final_norm: str
    layers: str  # with {i}
    layer: dict[str, str]
    output_layer: str | None = None  # an untied output layer, which GPT-SW3 does not have

    @property
    def layer_prefix(self) -> str:
        return self.layers.split("{i}")[0]


def _legacy() -> Names:
    prefix = "model.language_model."
    return Names("legacy NeMo", prefix + "embedding.word_embeddings.weight",
                 prefix + "embedding.position_embeddings.weight", prefix + "encoder.final_layernorm",
                 prefix + "encoder.layers.{i}.", {
                     "ln_1": "input_layernorm.", "attn.c_attn": "self_attention.query_key_value.",
                     "attn.c_proj": "self_attention.dense.", "ln_2": "post_attention_layernorm.",
                     "mlp.c_fc": "mlp.dense_h_to_4h.", "mlp.c_proj": "mlp.dense_4h_to_h."})


def _mcore(prefix: str, fused_norms: bool) -> Names:
    """megatron-core's names; its layer norms are fused into the next linear layer (`layer_norm_weight`) in
    distributed checkpoints and Transformer Engine state_dicts, separate in the local spec's state_dicts."""
    norms = {"ln_1": "self_attention.linear_qkv.layer_norm_", "ln_2": "mlp.linear_fc1.layer_norm_"} if fused_norms \
        else {"ln_1": "input_layernorm.", "ln_2": "pre_mlp_layernorm."}
    return Names("megatron-core", prefix + "embedding.word_embeddings.weight",
                 prefix + "embedding.position_embeddings.weight", prefix + "decoder.final_layernorm",
                 prefix + "decoder.layers.{i}.", {
                     **norms, "attn.c_attn": "self_attention.linear_qkv.", "attn.c_proj": "self_attention.linear_proj.",
                     "mlp.c_fc": "mlp.linear_fc1.", "mlp.c_proj": "mlp.linear_fc2."}, prefix + "output_layer.weight")


SCHEMES = [_legacy(), *(_mcore(prefix, fused) for prefix in ("model.", "module.", "", "model.module.")
                         for fused in (True, False))]


def names_of(keys: Collection[str]) -> Names:
    """The naming scheme of a state_dict: the one whose embedding and first layer norm it holds."""
    for names in SCHEMES:
        if names.embedding in keys and names.layers.format(i=0) + names.layer["ln_1"] + "weight" in keys:
            return names
    for names in SCHEMES:
        if names.embedding in keys:
            return names
    raise ConversionError(f"the checkpoint holds no word embedding ({SCHEMES[0].embedding!r}, or megatron-core's "
                          f"{SCHEMES[1].embedding.removeprefix('model.')!r}, plain or under model. or module.); is "
                          "this a GPT checkpoint?")


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
    names: Names = field(default_factory=lambda: SCHEMES[0])  # the source's naming scheme

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def _copy(shape: tuple[int, ...]) -> Arrangement:
    return Arrangement("copy", shape, tuple(range(len(shape))))


def _transpose(rows: int, cols: int) -> Arrangement:
    return Arrangement("transpose", (rows, cols), (1, 0))


def layer_id(key: str, names: Names) -> int:
    """The layer number in a `...layers.<i>.` state_dict key."""
    local = key[len(names.layer_prefix):].split(".")[0]
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
    names = names_of(shapes)
    first = names.layers.format(i=0)
    for name in (names.embedding, names.positions, *(first + names.layer[r] + "weight" for r in
                                                      ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))):
        if name in shapes and len(shapes[name]) != 2:
            raise ConversionError(f"source tensor {name!r} has shape {shapes[name]}, not a matrix; is this a GPT "
                                  "checkpoint?")
    refuse_other_families(hparam, shapes, names)
    layer_ids = sorted({layer_id(k, names) for k in shapes if k.startswith(names.layer_prefix)})
    fc1 = shapes.get(first + names.layer["mlp.c_fc"] + "weight")
    inferred = {
        "hidden_size": shapes[names.embedding][1],
        "num_layers": len(layer_ids),
        "ffn_hidden_size": fc1[0] if fc1 else None,
        "encoder_seq_length": shapes[names.positions][0] if names.positions in shapes else None,
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
        names=names,
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


def refuse_other_families(hparam: Any, shapes: dict[str, tuple[int, ...]], names: Names) -> None:
    """Refuse, naming them, the features of a model GPT-2 cannot express (Llama-style models: grouped-query
    attention, rotary positions, RMSNorm, a gated MLP, an untied output layer), from the tensors and the cfg."""
    first = names.layers.format(i=0)
    qkv, fc1, fc2 = (shapes.get(first + names.layer[r] + "weight") for r in ("attn.c_attn", "mlp.c_fc", "mlp.c_proj"))
    hidden = shapes[names.embedding][1] if len(shapes[names.embedding]) == 2 else None  # (checked by read_dims)
    said = {key: hparam(key) for key in ("position_embedding_type", "normalization", "activation",
                                          "gated_linear_unit", "swiglu", "share_embeddings_and_output_weights",
                                          "untie_embeddings_and_output_weights", "layernorm_zero_centered_gamma",
                                          "apply_layernorm_1p")}
    text = {k: v.lower() for k, v in said.items() if isinstance(v, str)}
    features = []
    if qkv is not None and hidden is not None and qkv[0] != 3 * hidden:
        features.append(f"grouped-query attention ({qkv[0]} query/key/value rows for hidden size {hidden}, not "
                        f"{3 * hidden})")
    if text.get("position_embedding_type", "learned_absolute") != "learned_absolute":
        features.append(f"{said['position_embedding_type']} position embeddings")
    elif names.positions not in shapes and qkv is not None and names.scheme == "megatron-core":
        features.append("no learned position embeddings (rotary?)")
    if text.get("normalization", "layernorm") not in ("layernorm",) or said["layernorm_zero_centered_gamma"] is True \
            or said["apply_layernorm_1p"] is True:
        features.append(f"{said['normalization'] or 'zero-centred'} normalization")
    elif first + names.layer["ln_1"] + "weight" in shapes and first + names.layer["ln_1"] + "bias" not in shapes:
        features.append("layer norms without a bias (RMSNorm?)")
    gated = said["gated_linear_unit"] is True or said["swiglu"] is True \
        or text.get("activation", "gelu").endswith("glu")
    if gated or (fc1 is not None and fc2 is not None and len(fc2) == 2 and fc1[0] == 2 * fc2[1]):
        features.append(f"a gated MLP ({said['activation'] or 'SwiGLU'})")
    elif text.get("activation", "gelu") != "gelu":
        features.append(f"the activation {said['activation']}")
    if said["share_embeddings_and_output_weights"] is False or said["untie_embeddings_and_output_weights"] is True \
            or (names.output_layer is not None and names.output_layer in shapes):
        features.append("an output layer untied from the word embedding")
    if features:
        raise ConversionError(f"this model has {', '.join(features)}: it is not a GPT-SW3 (GPT-2) model, and "
                              "streamconv does not convert Llama-style models yet")


def tensor_recipes(dims: Dims, embedding_rows: int) -> list[TensorRecipe]:
    """Every output tensor, in the order they are written: embeddings, then layer by layer, then ln_f."""
    if dims.vocab > embedding_rows:
        raise ConversionError(
            f"vocabulary size {dims.vocab} is larger than the {embedding_rows} embedding rows in the checkpoint; "
            f"pass --vocab-size {embedding_rows} or less (the default is GPT-SW3's {GPT_SW3_VOCAB_SIZE})"
        )
    h, f, heads, hd, names = dims.hidden, dims.ffn, dims.heads, dims.head_dim, dims.names
    out = [
        TensorRecipe("transformer.wte.weight", names.embedding, (embedding_rows, h), (dims.vocab, h),
                     _copy((dims.vocab, h)), rows=dims.vocab),
        TensorRecipe("transformer.wpe.weight", names.positions, (dims.positions, h), (dims.positions, h),
                     _copy((dims.positions, h))),
    ]
    for i in range(dims.layers):
        dst = f"transformer.h.{i}."

        def source(tensor: str) -> str:
            """The source name of the GPT-2 layer tensor `tensor` ('attn.c_attn.weight')."""
            module, field = tensor.rsplit(".", 1)
            return names.layers.format(i=i) + names.layer[module] + field  # noqa: B023

        def vector(name: str, n: int) -> TensorRecipe:
            return TensorRecipe(dst + name, source(name), (n,), (n,), _copy((n,)))  # noqa: B023

        def linear(name: str, n_out: int, n_in: int) -> TensorRecipe:
            # Megatron [out, in] -> Conv1D [in, out]
            return TensorRecipe(dst + name, source(name), (n_out, n_in), (n_in, n_out),  # noqa: B023
                                _transpose(n_out, n_in))

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
        TensorRecipe("transformer.ln_f.weight", names.final_norm + ".weight", (h,), (h,), _copy((h,))),
        TensorRecipe("transformer.ln_f.bias", names.final_norm + ".bias", (h,), (h,), _copy((h,))),
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
