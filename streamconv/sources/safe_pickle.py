"""A restricted unpickler for torch checkpoints that never imports or calls anything off a list.

A checkpoint's pickle names the globals it needs; a normal unpickler imports and calls them, which is
how a checkpoint runs code. Here `find_class` answers from the allow-list (`Unpickler.allowed`: what
containers and NeMo's OmegaConf config are built from; `torch_zip` adds inert stand-ins for torch's tensor
globals) and nothing else: every other global becomes an inert placeholder class that records its name and
ignores whatever it is called with. Nothing is imported.

Lightning checkpoints carry objects beside the weights (callbacks, loop state, optimizer wrappers) that
may name other classes; as placeholders they load harmlessly and are never used. The reader then
refuses a checkpoint whose `state_dict` or `hyper_parameters` holds a placeholder, naming the global.
"""

from __future__ import annotations

import _compat_pickle
import collections
import pickle
import typing
from typing import Any

DTYPES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
          "uint8": 1, "bool": 1}  # the tensor dtypes a checkpoint may hold (torch.<name>), bytes per element


def _omegaconf() -> dict[str, Any]:
    """OmegaConf's classes, as the inert stand-ins `hparams` reads the cfg from (OmegaConf is never imported)."""
    from streamconv.sources.hparams import STAND_INS

    return dict(STAND_INS)


def _allowed() -> dict[str, Any]:
    """The allow-list: containers, plain values, OmegaConf's config. (torch_zip adds stand-ins for torch's
    tensor-building globals, which build nothing but a description of where the bytes lie.)"""
    return {
        "collections.OrderedDict": collections.OrderedDict,
        "collections.defaultdict": collections.defaultdict,
        "typing.Any": typing.Any,
        **{f"builtins.{t.__name__}": t for t in (dict, list, tuple, set, frozenset, int, float, bool, str)},
        **_omegaconf(),
    }


class Placeholder:
    """Stands in for a global that is not allowed: accepts any construction, does nothing."""

    global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<refused {self.global_name}>"


def placeholder_class(name: str) -> type[Placeholder]:
    return type("Refused", (Placeholder,), {"global_name": name})


class Unpickler(pickle._Unpickler):
    """`find_class` from the allow-list; anything else becomes a placeholder class (never imported).

    The allow-listed classes and functions are shared by the whole process, so a pickle may not change them:
    BUILD (set an object's state) on one of them is refused. That is why this is the pure-Python unpickler,
    whose opcodes can be overridden (the C one offers no hook); it reads a 283 kB Lightning pickle in 44 ms
    instead of 25.
    """

    dispatch = dict(pickle._Unpickler.dispatch)
    _allowed: dict[str, Any] = {}

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self._handed: set[int] = set()  # ids of the allow-listed objects this pickle was given

    def hand(self, obj: Any) -> Any:
        """`obj`, an allow-listed global, recorded as one the pickle must not change."""
        self._handed.add(id(obj))
        return obj

    def load_build(self) -> None:
        target = self.stack[-2]  # (the state is on top)
        if id(target) in self._handed:
            name = getattr(target, "__qualname__", type(target).__name__)
            raise pickle.UnpicklingError(f"the pickle tries to change {name:.60}, which streamconv refuses")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    @classmethod
    def allowed(cls) -> dict[str, Any]:
        """The allow-list, made on first use."""
        if not Unpickler._allowed:
            Unpickler._allowed = _allowed()
        return Unpickler._allowed

    def find_class(self, module: str, name: str) -> Any:
        # protocol 2 (torch.save's default) writes Python 2 names such as __builtin__.dict
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = self.allowed().get(f"{module}.{name}")
        return self.hand(found) if found is not None else placeholder_class(f"{module}.{name}")


def refused_global(obj: Any) -> str | None:
    """The name of the first placeholder found anywhere inside `obj` (containers and object state)."""
    seen: set[int] = set()
    stack = [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, str | bytes | int | float | bool | type(None)):
            continue
        seen.add(id(item))
        if isinstance(item, Placeholder):
            return item.global_name
        if isinstance(item, type) and issubclass(item, Placeholder):
            return item.global_name
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)
        state = getattr(item, "__dict__", None)
        if isinstance(state, dict) and not isinstance(item, type):
            stack.extend(state.values())
    return None


def storage_id(saved_id: Any) -> tuple[Any, str, int]:
    """(storage type, key, element count) from a pickle's persistent id, as torch.save writes it."""
    if not isinstance(saved_id, tuple) or len(saved_id) != 5 or saved_id[0] not in ("storage", b"storage"):
        raise pickle.UnpicklingError(f"unexpected persistent id {saved_id!r:.80}")
    _, storage_type, key, _location, numel = saved_id
    if not isinstance(numel, int) or numel < 0:
        raise pickle.UnpicklingError(f"unexpected storage size {numel!r:.80}")
    return storage_type, str(key), numel
