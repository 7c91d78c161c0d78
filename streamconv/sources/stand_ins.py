"""Inert stand-ins for OmegaConf's classes (and argparse.Namespace): what the restricted unpickler (`safe_pickle`)
builds a pickled cfg from, and what `hparams` reads it from. They keep the state a pickle gives them and build
nothing (OmegaConf is never imported)."""

from __future__ import annotations

from typing import Any


class Node:
    """Stands in for an OmegaConf container or node: keeps the state a pickle gives it, builds nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Node:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # (OmegaConf pickles with NEWOBJ and no arguments; anything else is ignored, never walked)

    def __setstate__(self, state: Any) -> None:
        self.state = state  # one reference: not walked, not copied

    def content(self) -> Any:
        state = getattr(self, "state", None)
        return state.get(self.field) if isinstance(state, dict) else None

    field = "_content"


class _ValueNode(Node):
    field = "_val"


class _Metadata(Node):
    def content(self) -> Any:
        return None


class _Namespace(Node):
    """argparse.Namespace (Megatron-LM's training `args`): its fields are its state."""

    def content(self) -> Any:
        state = getattr(self, "state", None)
        return state if isinstance(state, dict) else None


_CONTAINERS = ("dictconfig.DictConfig", "listconfig.ListConfig")
_VALUES = ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "BytesNode", "PathNode")
STAND_INS: dict[str, type] = {
    **{f"omegaconf.{name}": type(name.split(".")[-1], (Node,), {}) for name in _CONTAINERS},
    **{f"omegaconf.nodes.{name}": type(name, (_ValueNode,), {}) for name in _VALUES},
    **{f"omegaconf.base.{name}": type(name, (_Metadata,), {}) for name in ("ContainerMetadata", "Metadata")},
    "argparse.Namespace": _Namespace,
}
