"""Where Megatron checkpoints keep each tensor: one table of roles to every naming scheme's spelling.

A family's table names a source tensor by its role (`qkv`, `fc1`, `q_norm`, ...) and field (`weight`, `bias`);
the scheme a checkpoint uses (legacy NeMo's, megatron-core's under its writer's prefix, with fused or separate
layer norms) says where that is. A family never spells a source name itself, so a new spelling is one line here.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace

from streamconv.errors import ConversionError


@dataclass(frozen=True)
class Names:
    """Where a naming scheme keeps each tensor: legacy NeMo's (`model.language_model.`) or megatron-core's
    (`decoder.layers.N.`, under `model.` in NeMo 1.x, `module.` in NeMo 2.0, no prefix in Megatron-LM).
    `layer` maps a layer module's role (input_norm, qkv, proj, mlp_norm, fc1, fc2, ...) to its name below
    `layers`."""

    scheme: str
    embedding: str
    positions: str
    final_norm: str
    layers: str  # with {i}
    layer: dict[str, str]  # an expert's role with {e}
    output_layer: str | None = None  # megatron-core's output layer (untied, or the last stage's tied copy)
    present: frozenset[str] = frozenset()  # the checkpoint's names: where a role has two spellings, which it uses
    paired: bool = False  # a hybrid stack of attention and MLP layers in turn: layer i is layers 2i and 2i + 1

    @property
    def layer_prefix(self) -> str:
        return self.layers.split("{i}")[0]

    def of(self, i: int, role: str, field: str, e: int | None = None) -> str:
        """The source name of layer `i`'s `role` module's `field` ('weight', 'bias'); `e`: an expert's number."""
        if role not in self.layer:
            raise ConversionError(f"{self.scheme} checkpoints have no {role} tensors; is this another architecture?")
        if self.paired:
            i = 2 * i + (role in MLP_ROLES)
        name = self.layers.format(i=i) + self.layer[role].format(e=e) + field
        if name in self.present:
            return name
        others = (self.layers.format(i=i) + other + field for other in SPELLED_ALSO.get(self.layer[role], ()))
        return next((other for other in others if other in self.present), name)

    def source(self, role: str, field: str, i: int | None, e: int | None = None) -> str:
        """The source name of a model-level (`i` None: embedding, positions, final_norm, output_layer) or layer
        role's field."""
        if i is not None:
            return self.of(i, role, field, e)
        if role == "final_norm":  # (a hybrid model's block calls it final_norm)
            name, other = f"{self.final_norm}.{field}", f"{self.final_norm.removesuffix('layernorm')}norm.{field}"
            return other if name not in self.present and other in self.present else name
        name = {"embedding": self.embedding, "positions": self.positions, "output_layer": self.output_layer}[role]
        if name is None:
            raise ConversionError(f"{self.scheme} checkpoints have no {role}; is this another architecture?")
        return name


def _legacy() -> Names:
    prefix = "model.language_model."
    return Names("legacy NeMo", prefix + "embedding.word_embeddings.weight",
                 prefix + "embedding.position_embeddings.weight", prefix + "encoder.final_layernorm",
                 prefix + "encoder.layers.{i}.", {
                     "input_norm": "input_layernorm.", "qkv": "self_attention.query_key_value.",
                     "proj": "self_attention.dense.", "mlp_norm": "post_attention_layernorm.",
                     "fc1": "mlp.dense_h_to_4h.", "fc2": "mlp.dense_4h_to_h."})


# A layer norm fused into the next linear layer in one layer spec is its own module in another: Transformer Engine's
# spec keeps a mixture of experts' norm separate (its experts have no linear_fc1 to fuse it into), the local spec
# saves it under the fused name all the same; multi-latent attention's input norm is its own module in both, its
# latent norms are fused in TE's spec only. All occur; `Names.present` says which spelling a checkpoint has.
_SAME_NORMS = (("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm."),
               ("self_attention.linear_qkv.layer_norm_", "input_layernorm."),
               ("self_attention.linear_q_up_proj.layer_norm_", "self_attention.q_layernorm."),
               ("self_attention.linear_kv_up_proj.layer_norm_", "self_attention.kv_layernorm."),
               ("mixer.in_proj.layer_norm_", "norm."))
SPELLED_ALSO = {a: tuple(b for b in pair if b != a) for pair in _SAME_NORMS for a in pair}
# The roles of a transformer layer's second half: a hybrid stack keeps them in a layer of their own
MLP_ROLES = frozenset({"mlp_norm", "fc1", "fc2", "post_mlp_norm", "router", "expert_fc1", "expert_fc2",
                       "shared_fc1", "shared_fc2"})


def _mcore(prefix: str, fused_norms: bool) -> Names:
    """megatron-core's names; its layer norms are fused into the next linear layer (`layer_norm_weight`) in
    distributed checkpoints and Transformer Engine state_dicts, separate in the local spec's state_dicts. Gemma 3's
    norms after attention and the MLP sit on the linear layer before them (`linear_proj.post_layernorm`). A
    mixture of experts: its router, each expert's MLP (numbered over all expert-parallel ranks, as the sources
    name them) and the shared experts' MLP. Multi-latent attention: the query's projection (or its down and up
    projections around a latent norm), the keys' and values' down and up projections around theirs. A Mamba
    mixer: its input projection (its norm fused in), convolution, state parameters (`mixer.` A_log, D, dt_bias),
    gated norm and output projection."""
    norms = {"input_norm": "self_attention.linear_qkv.layer_norm_", "mlp_norm": "mlp.linear_fc1.layer_norm_"} \
        if fused_norms else {"input_norm": "input_layernorm.", "mlp_norm": "pre_mlp_layernorm."}
    return Names("megatron-core", prefix + "embedding.word_embeddings.weight",
                 prefix + "embedding.position_embeddings.weight", prefix + "decoder.final_layernorm",
                 prefix + "decoder.layers.{i}.", {
                     **norms, "qkv": "self_attention.linear_qkv.", "proj": "self_attention.linear_proj.",
                     "fc1": "mlp.linear_fc1.", "fc2": "mlp.linear_fc2.", "q_norm": "self_attention.q_layernorm.",
                     "k_norm": "self_attention.k_layernorm.",
                     "post_attention_norm": "self_attention.linear_proj.post_layernorm.",
                     "post_mlp_norm": "mlp.linear_fc2.post_layernorm.", "router": "mlp.router.",
                     "sinks": "self_attention.core_attention.", "q_proj": "self_attention.linear_q_proj.",
                     "q_down": "self_attention.linear_q_down_proj.",
                     "q_up": "self_attention.linear_q_up_proj.",
                     "q_latent_norm": "self_attention.linear_q_up_proj.layer_norm_",
                     "kv_down": "self_attention.linear_kv_down_proj.", "kv_up": "self_attention.linear_kv_up_proj.",
                     "kv_latent_norm": "self_attention.linear_kv_up_proj.layer_norm_",
                     "mamba_norm": "mixer.in_proj.layer_norm_", "in_proj": "mixer.in_proj.",
                     "conv1d": "mixer.conv1d.", "mixer": "mixer.", "gated_norm": "mixer.norm.",
                     "out_proj": "mixer.out_proj.",
                     "expert_fc1": "mlp.experts.local_experts.{e}.linear_fc1.",
                     "expert_fc2": "mlp.experts.local_experts.{e}.linear_fc2.",
                     "shared_fc1": "mlp.shared_experts.linear_fc1.", "shared_fc2": "mlp.shared_experts.linear_fc2."},
                 prefix + "output_layer.weight")


SCHEMES = [_legacy(), *(_mcore(prefix, fused) for prefix in ("model.", "module.", "", "model.module.")
                         for fused in (True, False))]


def names_of(keys: Collection[str]) -> Names:
    """The naming scheme of a state_dict: the one whose embedding and first layer norm it holds."""
    for names in SCHEMES:
        if names.embedding in keys and names.of(0, "input_norm", "weight") in keys:
            return replace(names, present=frozenset(keys), paired=_paired(keys, names))
    for names in SCHEMES:
        if names.embedding in keys:
            return replace(names, present=frozenset(keys), paired=_paired(keys, names))
    raise ConversionError(f"the checkpoint holds no word embedding ({SCHEMES[0].embedding!r}, or megatron-core's "
                          f"{SCHEMES[1].embedding.removeprefix('model.')!r}, plain or under model. or module.); is "
                          "this a GPT checkpoint?")


def layer_id(key: str, names: Names) -> int:
    """The layer number in a `...layers.<i>.` state_dict key."""
    local = key[len(names.layer_prefix):].split(".")[0]
    if not (local.isascii() and local.isdecimal()):
        raise ConversionError(f"unexpected state_dict key {key!r} (no layer number); is this a GPT checkpoint?")
    return int(local)


def layer_ids(shapes: Collection[str], names: Names) -> list[int]:
    ids = sorted({layer_id(k, names) for k in shapes if k.startswith(names.layer_prefix)})
    return sorted({i // 2 for i in ids}) if names.paired else ids


def _paired(keys: Collection[str], names: Names) -> bool:
    """Whether the layers are megatron-core's hybrid stack of attention and MLP layers in turn (pattern `*-*-`):
    every even layer holds attention and nothing of an MLP, every odd one an MLP and nothing of attention."""
    if names.scheme != "megatron-core":
        return False
    kinds: dict[int, set[str]] = {}
    for key in keys:
        if key.startswith(names.layer_prefix):
            rest = key[len(names.layer_prefix):].split(".", 2)
            if rest[0].isdecimal() and len(rest) > 1:
                kinds.setdefault(int(rest[0]), set()).add(rest[1])
    mlp = {"mlp", "pre_mlp_layernorm"}
    return len(kinds) >= 2 and sorted(kinds) == list(range(len(kinds))) and len(kinds) % 2 == 0 and all(
        (found <= {"self_attention", "input_layernorm"} and "self_attention" in found) if i % 2 == 0
        else (found <= mlp and "mlp" in found) for i, found in kinds.items())


def check_matrices(shapes: dict[str, tuple[int, ...]], names: Names) -> None:
    """The embedding and the first layer's linear weights are matrices (the families read sizes off them)."""
    for name in (names.embedding, names.positions, *(names.of(0, role, "weight") for role in
                                                      ("qkv", "proj", "fc1", "fc2"))):
        if name in shapes and len(shapes[name]) != 2:
            raise ConversionError(f"source tensor {name!r} has shape {shapes[name]}, not a matrix; is this a GPT "
                                  "checkpoint?")
