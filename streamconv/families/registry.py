"""The registered model families, and the choice of the one a checkpoint is."""

from __future__ import annotations

from streamconv.errors import ConversionError
from streamconv.families.base import Family, HParam, traits
from streamconv.families.megatron import check_matrices, names_of

FAMILIES: dict[str, Family] = {}  # by --family name


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: the family becomes a --family choice and a candidate for `choose`."""
    FAMILIES[cls.name] = cls()
    return cls


def by_model_type(model_type: object) -> Family | None:
    """The family that writes config.json's `model_type` (for verify, which reads a converted folder)."""
    return next((f for f in FAMILIES.values() if model_type == f.model_type), None)


def choose(hparam: HParam, shapes: dict[str, tuple[int, ...]], forced: str | None = None) -> Family:
    """The family whose traits the checkpoint's cfg and tensors show (`forced`: the one --family names). Where
    several accept them (Mistral without a window is Llama), the cfg's `_target_` class picks among them, else
    the one requiring the most traits, else the one allowing the fewest besides."""
    if forced is not None:
        if forced not in FAMILIES:
            raise ConversionError(f"unknown model family {forced!r}; use one of {', '.join(FAMILIES)}")
        return FAMILIES[forced]
    names = names_of(shapes)
    check_matrices(shapes, names)
    found = traits(hparam, shapes, names)
    accepting = [f for f in FAMILIES.values() if f.accepts(found)]
    target = hparam("_target_")
    named = [f for f in accepting if isinstance(target, str) and f.providers
             and target.rsplit(".", 1)[-1].startswith(f.providers)]
    if named or accepting:
        return (named or sorted(accepting, key=lambda f: (-len(f.traits), len(f.optional))))[0]
    known = "; ".join(f.description for f in FAMILIES.values())
    raise ConversionError(f"this model has {', '.join(found)}: no model family streamconv knows has these "
                          f"({known}); if the cfg misleads, --family {' or '.join(FAMILIES)} forces one")


def check_forced(family: Family, hparam: HParam, shapes: dict[str, tuple[int, ...]]) -> None:
    """A family --family forces still expresses the model: what the cfg or the tensors show beyond its traits (a
    zero-centred norm, a query-key norm) is refused, never dropped."""
    found = traits(hparam, shapes, names_of(shapes))
    beyond = [t for t in found if t not in family.traits | family.optional]
    if beyond:
        raise ConversionError(f"--family {family.name}: this model has {', '.join(beyond)}, which "
                              f"{family.architecture} cannot express; streamconv will not write a different model")
