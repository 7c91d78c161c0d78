"""Model families, one module each, behind one interface; `choose` picks the one a checkpoint is.

A family module has NAME, MODEL_TYPE (config.json's), DESCRIPTION, HEADS_KEY (config.json's head count) and
`accepts(features)`, `read_dims(hparam, shapes, vocab_size, num_heads, local_slices)`, `tensor_recipes(dims)`,
`hf_config(hparam, dims, dtype_name)`; the tokenizer it ships is described in `streamconv.tokenizer`.
"""

from __future__ import annotations

from types import ModuleType

from streamconv.errors import ConversionError
from streamconv.recipes import gpt_sw3, llama
from streamconv.recipes.base import HParam, check_matrices, features, names_of

FAMILIES: dict[str, ModuleType] = {family.NAME: family for family in (gpt_sw3, llama)}


def by_model_type(model_type: object) -> ModuleType | None:
    """The family that writes config.json's `model_type`."""
    return next((f for f in FAMILIES.values() if model_type == f.MODEL_TYPE), None)


def choose(hparam: HParam, shapes: dict[str, tuple[int, ...]], forced: str | None = None) -> ModuleType:
    """The family whose features the checkpoint's cfg and tensors show (`forced`: the one --family names)."""
    if forced is not None:
        if forced not in FAMILIES:
            raise ConversionError(f"unknown model family {forced!r}; use one of {', '.join(FAMILIES)}")
        return FAMILIES[forced]
    names = names_of(shapes)
    check_matrices(shapes, names)
    found = features(hparam, shapes, names)
    for family in FAMILIES.values():
        if family.accepts(found):
            return family
    known = "; ".join(f.DESCRIPTION for f in FAMILIES.values())
    raise ConversionError(f"this model has {found.described()}: no model family streamconv knows has these "
                          f"({known}); if the cfg misleads, --family {' or '.join(FAMILIES)} forces one")
