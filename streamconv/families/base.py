"""What every model family's recipe is made of: source naming schemes, arrangements, tensor recipes, features.

Everything here is metadata. A family (`gpt_sw3`, `llama`) says which source tensor, or which rows of one,
feeds each output name, how its elements are rearranged, and the Hugging Face config; the plan and the
pipeline know only these records.

An arrangement is written as data: view the source as `view` (built from its shape and the config), then
permute the axes by `perm`. Output bytes are the permuted view, read in row-major order. Examples:
- GPT-2 stores linear weights as Conv1D `[in, out]`; Megatron as `[out, in]`: view `(out, in)`, perm `(1, 0)`.
- Megatron's fused QKV rows are grouped `(heads, 3, head_dim)`, GPT-2's `(3, heads, head_dim)`, and the
  weight is transposed as well: view `(heads, 3, head_dim, in)`, perm `(3, 1, 0, 2)`.
An output may also be some row ranges of its source, concatenated (`TensorRecipe.row_ranges`): Llama's
query, key and value heads out of megatron's fused QKV weight, its gate and up halves out of `linear_fc1`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from streamconv.errors import ConversionError, describe, is_whole

HParam = Callable[..., Any]  # hparam(key, default=None, null=default): one resolved cfg value
NULL = object()  # what `hparam(key, null=NULL)` gives for an explicit null, where null differs from absent


@dataclass(frozen=True)
class Names:
    """Where a naming scheme keeps each tensor: legacy NeMo's (`model.language_model.`) or megatron-core's
    (`decoder.layers.N.`, under `model.` in NeMo 1.x, `module.` in NeMo 2.0, no prefix in Megatron-LM).
    `layer` maps a layer module's role (input_norm, qkv, proj, mlp_norm, fc1, fc2) to its name below `layers`."""

    scheme: str
    embedding: str
    positions: str
    final_norm: str
    layers: str  # with {i}
    layer: dict[str, str]
    output_layer: str | None = None  # megatron-core's output layer (untied, or the last stage's tied copy)

    @property
    def layer_prefix(self) -> str:
        return self.layers.split("{i}")[0]

    def of(self, i: int, role: str, field: str) -> str:
        """The source name of layer `i`'s `role` module's `field` ('weight', 'bias')."""
        return self.layers.format(i=i) + self.layer[role] + field


def _legacy() -> Names:
    prefix = "model.language_model."
    return Names("legacy NeMo", prefix + "embedding.word_embeddings.weight",
                 prefix + "embedding.position_embeddings.weight", prefix + "encoder.final_layernorm",
                 prefix + "encoder.layers.{i}.", {
                     "input_norm": "input_layernorm.", "qkv": "self_attention.query_key_value.",
                     "proj": "self_attention.dense.", "mlp_norm": "post_attention_layernorm.",
                     "fc1": "mlp.dense_h_to_4h.", "fc2": "mlp.dense_4h_to_h."})


def _mcore(prefix: str, fused_norms: bool) -> Names:
    """megatron-core's names; its layer norms are fused into the next linear layer (`layer_norm_weight`) in
    distributed checkpoints and Transformer Engine state_dicts, separate in the local spec's state_dicts."""
    norms = {"input_norm": "self_attention.linear_qkv.layer_norm_", "mlp_norm": "mlp.linear_fc1.layer_norm_"} \
        if fused_norms else {"input_norm": "input_layernorm.", "mlp_norm": "pre_mlp_layernorm."}
    return Names("megatron-core", prefix + "embedding.word_embeddings.weight",
                 prefix + "embedding.position_embeddings.weight", prefix + "decoder.final_layernorm",
                 prefix + "decoder.layers.{i}.", {
                     **norms, "qkv": "self_attention.linear_qkv.", "proj": "self_attention.linear_proj.",
                     "fc1": "mlp.linear_fc1.", "fc2": "mlp.linear_fc2."}, prefix + "output_layer.weight")


SCHEMES = [_legacy(), *(_mcore(prefix, fused) for prefix in ("model.", "module.", "", "model.module.")
                         for fused in (True, False))]


def names_of(keys: Collection[str]) -> Names:
    """The naming scheme of a state_dict: the one whose embedding and first layer norm it holds."""
    for names in SCHEMES:
        if names.embedding in keys and names.of(0, "input_norm", "weight") in keys:
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
    shape: tuple[int, ...]  # output shape as the Hugging Face model declares it
    arrangement: Arrangement
    # Keep only these [start, stop) row ranges of the source, concatenated in order (vocabulary padding dropped,
    # Llama's q/k/v and gate/up sliced out); the arrangement applies to what is kept. None: every row.
    row_ranges: tuple[tuple[int, int], ...] | None = None


def copy(shape: tuple[int, ...]) -> Arrangement:
    return Arrangement("copy", shape, tuple(range(len(shape))))


def transpose(rows: int, cols: int) -> Arrangement:
    return Arrangement("transpose", (rows, cols), (1, 0))


def layer_id(key: str, names: Names) -> int:
    """The layer number in a `...layers.<i>.` state_dict key."""
    local = key[len(names.layer_prefix):].split(".")[0]
    if not (local.isascii() and local.isdecimal()):
        raise ConversionError(f"unexpected state_dict key {key!r} (no layer number); is this a GPT checkpoint?")
    return int(local)


def layer_ids(shapes: Collection[str], names: Names) -> list[int]:
    return sorted({layer_id(k, names) for k in shapes if k.startswith(names.layer_prefix)})


MAX_POSITIONS = 2**24  # a context length: the longest models have 10**7 positions
MAX_SIZE = 2**20  # a model dimension (hidden, heads, a layer count): the largest models have a few 10**4


def number(key: str, value: Any, kind: type, low: float | None = None, high: float | None = None,
           above: float | None = None) -> Any:
    """A cfg value as an int or float in the range a model can have (`low` <= value <= `high`, value > `above`),
    or a one-line error naming the key: NaN, infinities and null are no model's setting."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) < 2**63 \
            or kind is int and not is_whole(value):
        wanted = "a whole number" if kind is int else "a number"
        raise ConversionError(f"hyper-parameter {key!r} is {describe(value)}, not {wanted}; fix the checkpoint's cfg")
    if above is not None and not value > above or low is not None and value < low \
            or high is not None and value > high:
        wanted = " and ".join(f"{word} {bound}" for word, bound in
                              (("above", above), ("at least", low), ("at most", high)) if bound is not None)
        raise ConversionError(f"hyper-parameter {key!r} is {describe(value)}; a model's {key} is {wanted}: fix the "
                              "checkpoint's cfg")
    return kind(value)


def flag(hparam: HParam, key: str) -> bool | None:
    """A cfg flag: true, false, or None when absent. Anything else (1, "true") is malformed, never taken as
    false. (YAML files are read by YAML 1.1's own rule, in which yes/no/on/off are booleans too.)"""
    value = hparam(key)
    if value is not None and not isinstance(value, bool):
        raise ConversionError(f"hyper-parameter {key!r} is {describe(value)}, not true or false; fix the "
                              "checkpoint's cfg")
    return value


def sizes(hparam: HParam, inferred: dict[str, int | None], num_heads: int | None) -> dict[str, int]:
    """Whole-number hyper-parameters from the cfg, else as read from the tensors (`inferred`); --num-heads wins."""
    values: dict[str, int] = {}
    for key, guess in inferred.items():
        value = num_heads if key == "num_attention_heads" and num_heads else hparam(key, null=NULL)
        if value is NULL and key == "ffn_hidden_size":
            value = 4 * values["hidden_size"]  # (megatron-core's meaning of a null ffn_hidden_size)
        elif value is NULL:
            raise ConversionError(f"hyper-parameter {key!r} is null in the checkpoint's cfg; fix the cfg")
        if value is None:
            value = guess
        if value is None:
            fix = "pass --num-heads N" if key == "num_attention_heads" else "fix the checkpoint's cfg"
            raise ConversionError(
                f"hyper-parameter {key!r} is not in the checkpoint's cfg and cannot be read from the tensors; {fix}"
            )
        values[key] = number(key, value, int, high=MAX_POSITIONS if key in POSITION_KEYS else MAX_SIZE, above=0)
    return values


POSITION_KEYS = ("encoder_seq_length", "max_position_embeddings")


def check_layers(layers: int, found: list[int]) -> None:
    """The cfg's layer count is the tensors' (compared by count first: the cfg's number is untrusted)."""
    if layers != len(found) or found != list(range(len(found))):
        text = f"layers {found[0]}..{found[-1]}" if found else "no layers"
        raise ConversionError(
            f"the cfg says num_layers {layers} but the state_dict holds {text} ({len(found)} in all); "
            "is this one pipeline stage of a larger model?"
        )


def check_matrices(shapes: dict[str, tuple[int, ...]], names: Names) -> None:
    """The embedding and the first layer's linear weights are matrices (the recipes read sizes off them)."""
    for name in (names.embedding, names.positions, *(names.of(0, role, "weight") for role in
                                                      ("qkv", "proj", "fc1", "fc2"))):
        if name in shapes and len(shapes[name]) != 2:
            raise ConversionError(f"source tensor {name!r} has shape {shapes[name]}, not a matrix; is this a GPT "
                                  "checkpoint?")


@dataclass(frozen=True)
class Features:
    """The architecture a checkpoint's cfg and tensors describe, as far as choosing a family needs."""

    rms_norm: bool  # RMSNorm (else LayerNorm)
    gated: bool  # a gated MLP (SwiGLU): linear_fc1 holds [gate; up]
    rotary: bool  # rotary position embeddings (else learned absolute ones)
    grouped: bool  # grouped-query attention (fewer key/value heads than query heads)
    bias: bool  # the linear layers have biases
    tied: bool  # the output layer is the word embedding
    odd: tuple[str, ...] = ()  # what neither family has (zero-centred norms, another activation)

    def described(self) -> str:
        words = ["RMSNorm" if self.rms_norm else "LayerNorm", "a gated MLP" if self.gated else "a plain MLP",
                 "rotary positions" if self.rotary else "learned positions",
                 "grouped-query attention" if self.grouped else "multi-head attention",
                 "biases" if self.bias else "no biases", "a tied output layer" if self.tied else "an untied output "
                 "layer", *self.odd]
        return ", ".join(words)


_FLAGS = ("gated_linear_unit", "swiglu", "share_embeddings_and_output_weights", "untie_embeddings_and_output_weights",
          "layernorm_zero_centered_gamma", "apply_layernorm_1p", "bias", "add_bias_linear", "group_query_attention",
          "qkv_bias", "add_qkv_bias", "qk_layernorm")


def features(hparam: HParam, shapes: dict[str, tuple[int, ...]], names: Names) -> Features:
    """What the cfg says (NeMo's and Megatron-LM's keys), else what the tensors show; a cfg that contradicts the
    tensors about the output layer is refused."""
    qkv, fc1, fc2 = (shapes.get(names.of(0, role, "weight")) for role in ("qkv", "fc1", "fc2"))
    hidden = shapes[names.embedding][1] if len(shapes[names.embedding]) == 2 else None
    said = {key: hparam(key) for key in ("position_embedding_type", "normalization", "activation",
                                          "num_query_groups", "num_attention_heads", "activation_func._target_")}
    said.update({key: flag(hparam, key) for key in _FLAGS})
    text = {k: v.lower() for k, v in said.items() if isinstance(v, str)}
    odd = []
    norm = text.get("normalization")
    if norm not in (None, "layernorm", "rmsnorm"):
        odd.append(f"{said['normalization']} normalization")
    if said["layernorm_zero_centered_gamma"] or said["apply_layernorm_1p"]:
        odd.append("zero-centred layer norms")
    rms = norm == "rmsnorm" if norm in ("layernorm", "rmsnorm") else \
        names.of(0, "input_norm", "weight") in shapes and names.of(0, "input_norm", "bias") not in shapes
    activation = text.get("activation")
    gated = said["gated_linear_unit"] is True or said["swiglu"] is True or \
        (activation or "").endswith("glu") or (fc1 is not None and fc2 is not None and len(fc2) == 2
                                                and fc1[0] == 2 * fc2[1])
    if activation not in (None, "gelu", "swiglu", "fast-swiglu"):
        odd.append(f"the activation {said['activation']}")
    function = text.get("activation_func._target_")  # NeMo 2.0's: a torch function's path
    if function is not None and function.rsplit(".", 1)[-1] != ("silu" if gated else "gelu"):
        odd.append(f"the activation function {said['activation_func._target_']}"
                   + (" in a gated MLP" if gated else ""))
    if (said["qkv_bias"] or said["add_qkv_bias"]) and not said["bias"] and not said["add_bias_linear"]:
        odd.append("biases on the query, key and value projections only")
    if said["qk_layernorm"]:
        odd.append("query and key layer norms")
    positions = text.get("position_embedding_type")
    rotary = positions == "rope" if positions is not None else \
        names.scheme == "megatron-core" and names.positions not in shapes
    if positions not in (None, "rope", "learned_absolute"):
        odd.append(f"{said['position_embedding_type']} position embeddings")
    groups, heads = said["num_query_groups"], said["num_attention_heads"]
    grouped = (said["group_query_attention"] is not False and isinstance(groups, int) and isinstance(heads, int)
               and 0 < groups < heads)
    if not grouped and qkv is not None and hidden is not None and not gated and qkv[0] != 3 * hidden:
        grouped = True  # (a GPT-2 model's QKV rows are 3 x hidden; Llama's may differ with its head size too)
    bias_said = said["bias"] if said["bias"] is not None else said["add_bias_linear"]
    bias = bias_said if bias_said is not None else names.of(0, "qkv", "bias") in shapes
    return Features(rms, gated, rotary, grouped, bias, _tied(said, shapes, names), tuple(odd))


def _tied(said: dict[str, Any], shapes: dict[str, tuple[int, ...]], names: Names) -> bool:
    """Whether the output layer is the word embedding: megatron-core stores an output layer only when untied (a
    pipeline's last-stage copy of a tied one is dropped when its ranks are merged), so the cfg must agree."""
    share, untie = said["share_embeddings_and_output_weights"], said["untie_embeddings_and_output_weights"]
    cfg = None if share is None and untie is None else share is not False and untie is not True
    stored = names.output_layer is not None and names.output_layer in shapes
    if cfg is None:
        return not stored
    if cfg and stored or not cfg and names.output_layer is not None and not stored:
        key = "share_embeddings_and_output_weights" if share is not None else "untie_embeddings_and_output_weights"
        raise ConversionError(f"the cfg says {key} {share if share is not None else untie}, but the checkpoint "
                              f"{'holds' if stored else 'has no'} {names.output_layer!r}; is the cfg from another "
                              "run?")
    return cfg
