"""What the mixture-of-experts families share: the experts' sizes read from the cfg and checked against the
tensors, which layers have experts, and the router settings each Hugging Face family can express.

megatron-core's MoE layer routes each token to `moe_router_topk` of `num_moe_experts` experts (each an MLP of width
`moe_ffn_hidden_size`) and sums their outputs weighted by the router's probabilities; `moe_layer_freq` says which
layers have experts (an int N: every Nth from the first; a list: one 0/1 per layer), the others a dense MLP. Its
softmax router takes the top k of the logits and a softmax over those (the Hugging Face `norm_topk_prob: true`), or
with `moe_router_pre_softmax` the top k of a softmax over all experts (`norm_topk_prob: false`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from streamconv.errors import ConversionError, describe
from streamconv.families import base
from streamconv.families.base import MAX_SIZE, Dims, HParam

# The router settings the MoE families read (`Family.settings`); a family refuses a value it cannot express.
ROUTER_SETTINGS = ("num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_layer_freq",
                   "moe_router_pre_softmax", "moe_router_score_function", "moe_router_topk_scaling_factor",
                   "moe_router_enable_expert_bias", "moe_router_num_groups", "moe_router_group_topk",
                   "moe_shared_expert_intermediate_size")


def read_experts(hparam: HParam, shapes: dict[str, tuple[int, ...]], dims: Dims,
                 by_pattern: set[int] | None = None) -> Dims:
    """`dims` with the experts' count and widths and the layers that have experts, each from the cfg checked
    against the tensors (the router's rows, the experts' MLPs), or from the tensors where the cfg is silent.
    `by_pattern`: the layers a hybrid model's layer pattern gives experts, in place of `moe_layer_freq`'s."""
    names = dims.names
    routed = [i for i in range(dims.layers) if names.of(i, "router", "weight") in shapes]
    if not routed:
        raise ConversionError(f"the cfg says num_moe_experts {describe(hparam('num_moe_experts'))}, but no layer "
                              f"has a router ({names.of(0, 'router', 'weight')!r}); is the cfg from another run?")
    router = shapes[names.of(routed[0], "router", "weight")]
    fc2 = shapes.get(names.of(routed[0], "expert_fc2", "weight", 0))
    shared = shapes.get(names.of(routed[0], "shared_fc2", "weight"))
    values = base.sizes(hparam, {"num_moe_experts": router[0], "moe_ffn_hidden_size": fc2[1] if fc2 else None}, None)
    experts, width = values["num_moe_experts"], values["moe_ffn_hidden_size"]
    if experts != router[0]:
        raise ConversionError(f"the cfg says num_moe_experts {experts}, but {names.of(routed[0], 'router', 'weight')!r}"
                              f" routes to {router[0]}; is the cfg from another run?")
    said = hparam("moe_shared_expert_intermediate_size")
    shared_width = base.number("moe_shared_expert_intermediate_size", said, int, above=0, high=MAX_SIZE) \
        if said is not None else shared[1] if shared else 0
    if bool(shared_width) != bool(shared):
        raise ConversionError(f"the cfg says moe_shared_expert_intermediate_size {describe(said)}, but the checkpoint "
                              f"{'has no' if shared_width else 'holds'} {names.of(routed[0], 'shared_fc2', 'weight')!r}"
                              "; is the cfg from another run?")
    moe_layers = _moe_layers(hparam, dims.layers) if by_pattern is None else by_pattern
    if moe_layers != set(routed):
        where = "layer pattern" if by_pattern is not None else f"moe_layer_freq {describe(hparam('moe_layer_freq'))}"
        raise ConversionError(f"the cfg's {where} puts experts in layers "
                              f"{sorted(moe_layers)}, but the checkpoint has routers in layers {routed}; is the cfg "
                              "from another run?")
    return replace(dims, experts=experts, expert_ffn=width, shared_ffn=shared_width, moe_layers=frozenset(routed))


def _moe_layers(hparam: HParam, layers: int) -> set[int]:
    """The layers megatron-core gives experts: `moe_layer_freq` N (every Nth, from layer 0) or a 0/1 per layer."""
    freq = base.listed(hparam, "moe_layer_freq", most=layers)
    if freq is None:
        freq = 1
    if isinstance(freq, tuple):
        if len(freq) != layers or any(f not in (0, 1) or isinstance(f, bool) for f in freq):
            raise ConversionError(f"the cfg's moe_layer_freq {describe(freq)} is not a 0 or 1 for each of the "
                                  f"{layers} layers; fix the checkpoint's cfg")
        return {i for i, f in enumerate(freq) if f}
    freq = base.number("moe_layer_freq", freq, int, above=0, high=layers)
    return {i for i in range(layers) if i % freq == 0}


def softmax_router(hparam: HParam, dims: Dims, model: str) -> dict[str, Any]:
    """The Hugging Face keys of a softmax top-k router without scaling, groups, bias or shared experts (Qwen3-MoE's,
    Mixtral's, OLMoE's): `num_experts_per_tok` and `norm_topk_prob`. Any other router is refused by name."""
    score = hparam("moe_router_score_function", "softmax")
    scaling = hparam("moe_router_topk_scaling_factor")
    refused = [(key, value) for key, value, ok in (
        ("moe_router_score_function", score, score == "softmax"),
        ("moe_router_topk_scaling_factor", scaling, scaling is None or scaling == 1),
        ("moe_router_enable_expert_bias", hparam("moe_router_enable_expert_bias"),
         not base.flag(hparam, "moe_router_enable_expert_bias")),
        ("moe_router_num_groups", hparam("moe_router_num_groups"), hparam("moe_router_num_groups") in (None, 1)),
        ("moe_shared_expert_intermediate_size", hparam("moe_shared_expert_intermediate_size"),
         hparam("moe_shared_expert_intermediate_size") is None)) if not ok]
    if refused:
        key, value = refused[0]
        raise ConversionError(f"the cfg sets {key} {describe(value)}: {model}'s router has no such setting; "
                              "streamconv will not write a different model")
    return {"num_experts_per_tok": topk(hparam, dims),
            "norm_topk_prob": not base.flag(hparam, "moe_router_pre_softmax")}


def topk(hparam: HParam, dims: Dims) -> int:
    """How many experts each token goes to (megatron-core's default: 2), at most all of them."""
    return base.number("moe_router_topk", hparam("moe_router_topk", 2, null=None), int, above=0, high=dims.experts)


def sigmoid_router(hparam: HParam, dims: Dims, model: str) -> dict[str, Any]:
    """The Hugging Face keys of DeepSeek-V3's router (Nemotron-H's too): a sigmoid with its score-correction bias,
    group-limited as megatron-core limits it (groups ranked by their two best scores: transformers' rule,
    megatron-core's where top-k / the groups kept is 2), its weights renormalised (megatron-core does where top-k >
    1) and scaled. Any other router is refused by name."""
    score = hparam("moe_router_score_function", "softmax")
    if score != "sigmoid":
        raise ConversionError(f"the cfg sets moe_router_score_function {describe(score)}: {model}'s router is a "
                              "sigmoid; streamconv will not write a different model")
    if not base.flag(hparam, "moe_router_enable_expert_bias"):
        raise ConversionError(f"the cfg sets no moe_router_enable_expert_bias: {model}'s router always adds a "
                              "score-correction bias, and this model has none to write")
    count = topk(hparam, dims)
    groups = hparam("moe_router_num_groups")
    if groups is None:
        groups, kept = 1, 1
    else:
        groups = base.number("moe_router_num_groups", groups, int, above=0, high=dims.experts)
        kept = base.number("moe_router_group_topk", hparam("moe_router_group_topk"), int, above=0, high=groups)
        if dims.experts % groups or groups > 1 and count != 2 * kept:
            raise ConversionError(f"the cfg routes to {count} of {dims.experts} experts in the best {kept} of {groups} "
                                  f"groups: {model} ranks groups by their two best experts, megatron-core by their "
                                  f"{count} / {kept}; streamconv will not write a different model")
    scaling = hparam("moe_router_topk_scaling_factor")
    return {"n_routed_experts": dims.experts, "num_experts_per_tok": count, "n_group": groups, "topk_group": kept,
            "norm_topk_prob": count > 1, "routed_scaling_factor": 1.0 if scaling is None else base.number(
                "moe_router_topk_scaling_factor", scaling, float, above=0)}
