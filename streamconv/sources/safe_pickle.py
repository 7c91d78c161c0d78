"""A restricted unpickler for torch checkpoints that never imports or calls anything off a list.

A checkpoint's pickle names the globals it needs; a normal unpickler imports and calls them, which is
how a checkpoint runs code. Here `find_class` answers from the allow-list (`Unpickler.allowed`: what
containers and NeMo's OmegaConf config are built from; `torch_zip` adds inert stand-ins for torch's tensor
globals) and nothing else: every other global becomes an inert placeholder class that records its name and
ignores whatever it is called with. Nothing is imported.

Lightning checkpoints carry objects beside the weights (callbacks, loop state, optimizer wrappers) that
may name other classes; as placeholders they load harmlessly and are never used. The reader then
refuses a checkpoint whose `state_dict` or `hyper_parameters` holds a placeholder, naming the global.
A callable that only an attack would pickle (`posix.system`, `builtins.eval`, `subprocess.Popen`: `DANGEROUS`)
refuses the whole file wherever it appears, even where its value would never be used.
"""

from __future__ import annotations

import _compat_pickle
import collections
import pickle
import typing
from typing import Any

from streamconv.errors import ConversionError, describe
from streamconv.sources.stand_ins import STAND_INS

DTYPES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
          "uint8": 1, "bool": 1}  # the tensor dtypes a checkpoint may hold (torch.<name>), bytes per element


def _allowed() -> dict[str, Any]:
    """The allow-list: containers, plain values, OmegaConf's config. (torch_zip adds stand-ins for torch's
    tensor-building globals, which build nothing but a description of where the bytes lie.)"""
    return {
        "collections.OrderedDict": collections.OrderedDict,
        "collections.defaultdict": collections.defaultdict,
        "typing.Any": typing.Any,
        **{f"builtins.{t.__name__}": t for t in (dict, list, tuple, set, frozenset, int, float, bool, str)},
        **STAND_INS,  # OmegaConf's classes, as the inert stand-ins `hparams` reads the cfg from
    }


# Globals no checkpoint pickles but an attack does: they run commands or code, or reach files, processes or the
# network. Found anywhere in a pickle, they refuse the whole file (`Dangerous`), used or not. A module here refuses
# its submodules too, a name the attributes under it; so does an attribute path through a dunder ('x.__globals__').
DANGEROUS_MODULES = frozenset({
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "_posixsubprocess", "sys", "shutil", "socket", "_socket",
    "ssl", "importlib", "pkgutil", "zipimport", "pickle", "_pickle", "pickletools", "marshal", "shelve", "dill",
    "cloudpickle", "joblib", "runpy", "ctypes", "_ctypes", "cffi", "code", "codeop", "pty", "tty", "webbrowser",
    "multiprocessing", "concurrent", "asyncio", "threading", "_thread", "pdb", "bdb", "timeit", "trace", "profile",
    "cProfile", "tempfile", "glob", "fileinput", "mmap", "urllib", "http", "ftplib", "smtplib", "telnetlib", "xmlrpc",
    "requests", "httpx", "aiohttp", "pip", "setuptools", "distutils", "torch.hub", "torch.package",
    "torch.utils.cpp_extension", "torch._dynamo", "torch._inductor", "torch.jit", "numpy.testing", "numpy.ctypeslib",
})
DANGEROUS_NAMES = frozenset({
    "builtins.eval", "builtins.exec", "builtins.compile", "builtins.open", "builtins.__import__", "builtins.getattr",
    "builtins.setattr", "builtins.delattr", "builtins.globals", "builtins.locals", "builtins.vars", "builtins.input",
    "builtins.breakpoint", "builtins.help", "builtins.exit", "builtins.quit", "builtins.__build_class__",
    "io.open", "io.open_code", "io.FileIO", "_io.open", "_io.open_code", "_io.FileIO", "codecs.open",
    "operator.attrgetter", "operator.methodcaller", "types.FunctionType", "types.LambdaType", "types.CodeType",
    "types.ModuleType", "signal.signal", "signal.alarm", "signal.setitimer", "signal.pthread_kill", "torch.load",
    "numpy.load", "numpy.fromfile", "numpy.memmap",
})


def dangerous(module: str, name: str) -> bool:
    """Whether the global `module`.`name` is one only an attack pickles (DANGEROUS_MODULES, DANGEROUS_NAMES)."""
    modules, names = module.split("."), name.split(".")
    return any(".".join(modules[:i]) in DANGEROUS_MODULES for i in range(1, len(modules) + 1)) \
        or any(f"{module}.{'.'.join(names[:i])}" in DANGEROUS_NAMES for i in range(1, len(names) + 1)) \
        or any(n.startswith("__") and n.endswith("__") for n in names[1:])


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


# What one pickle may make the unpickler do. A checkpoint's pickle describes tensors and a config: a 24-layer
# Lightning .ckpt with Adam state runs about 46,000 opcodes (tests/test_pickle_bounds.py). Each limit leaves a
# margin of over 50 x and keeps a small hostile file from taking minutes or gigabytes.
MAX_OPCODES = 8_000_000  # each makes at most one object (about 100 bytes with its memo entry): under 1 GB
MAX_WORK = 32_000_000  # elements copied or hashed by the calls and insertions the pickle asks for
MAX_TUPLE = 65_536  # elements of a tuple counted through the tuples it holds, shared ones each time (one hash)
MAX_DEPTH = 64  # tuples inside tuples (hashing recurses in C)
_SCALARS = (str, bytes, int, float, bool, type(None))
_COERCIONS = (str, int, float, bool)  # called on a container, these walk it (str of shared lists: 2**40 steps)


class Refused(pickle.UnpicklingError):
    """The pickle asks for more than a checkpoint ever needs: damaged, or built to hang or fill memory."""


class Dangerous(pickle.UnpicklingError):
    """The pickle names a global only an attack pickles (its message is the global's name)."""


def tampered(path: str, exc: Dangerous) -> ConversionError:
    """The one line for a file whose pickle names a `DANGEROUS` global."""
    return ConversionError(f"{path} contains a pickled reference to {exc}, which can run commands or reach files; "
                           "streamconv refuses the whole file as tampered: do not trust this checkpoint")


class _Dispatch(dict):
    def __missing__(self, code: int) -> Any:
        raise pickle.UnpicklingError(f"unknown pickle opcode {code:#04x}")


def _counted(load: Any) -> Any:
    def step(self: Unpickler) -> None:
        self.opcodes += 1
        if self.opcodes > self.max_opcodes:
            raise Refused(f"runs more than {self.max_opcodes} opcodes")
        load(self)

    return step


class Unpickler(pickle._Unpickler):
    """`find_class` from the allow-list; anything else becomes a placeholder class (never imported).

    The allow-listed classes and functions are shared by the whole process, so a pickle may not change them:
    BUILD (set an object's state) on one of them is refused. That is why this is the pure-Python unpickler,
    whose opcodes can be overridden (the C one offers no hook); it reads a 283 kB Lightning pickle in 44 ms
    instead of 25. The same hooks bound the work: opcodes counted, every call and every insertion into a dict
    or set charged by the elements it copies or hashes, tuples weighed as they are made (memo references
    let a few bytes stand for a tuple of 2**40 elements, whose every hash would walk them all), and the
    coercions (`str`, `int`, ...) applied to plain values only.
    """

    dispatch: dict[int, Any]  # set below the class: every opcode counted, these overrides used
    _allowed: dict[str, Any] = {}

    def __init__(self, file: Any, scale: int = 1) -> None:
        """`scale` multiplies the bounds, for an index that grows with the model (DCP's `.metadata`)."""
        super().__init__(file)
        self.max_opcodes, self.max_work = MAX_OPCODES * scale, MAX_WORK * scale
        self._handed: set[int] = set()  # ids of the allow-listed objects this pickle was given
        self.opcodes = self.work = 0
        self._tuples: dict[int, tuple[Any, int, int]] = {}  # id -> (the tuple, its weight, its depth)

    def hand(self, obj: Any) -> Any:
        """`obj`, an allow-listed global, recorded as one the pickle must not change."""
        self._handed.add(id(obj))
        return obj

    def charge(self, n: int) -> None:
        self.work += n
        if self.work > self.max_work:
            raise Refused(f"asks for more than {self.max_work} steps of work")

    def _weight(self, obj: Any) -> tuple[int, int]:
        """(elements a hash of `obj` walks, its tuple depth); a tuple made by a call is weighed once, here."""
        if type(obj) not in (tuple, frozenset):
            return 1, 0
        known = self._tuples.get(id(obj))
        if known is not None and known[0] is obj:
            return known[1], known[2]
        self.charge(len(obj))
        weight, depth = 1, 0
        for item in obj:
            w, d = self._weight(item)
            weight, depth = weight + w, max(depth, d)
        if weight > MAX_TUPLE or depth >= MAX_DEPTH:
            raise Refused(f"builds a tuple of more than {min(weight, MAX_TUPLE)} elements or {depth + 1} levels")
        self._tuples[id(obj)] = (obj, weight, depth + 1)
        return weight, depth + 1

    def _keys_weight(self, keys: Any) -> int:
        return sum(self._weight(k)[0] for k in keys)

    def _check_call(self, func: Any, args: Any, kwargs: Any = None) -> None:
        """Charge a call by what its arguments hold; refuse a coercion of anything but a plain value."""
        if not isinstance(args, tuple) or not isinstance(kwargs or {}, dict):
            raise pickle.UnpicklingError("a call's arguments are not a tuple")
        values = [*args, *(kwargs or {}).values()]
        if func in _COERCIONS and not all(isinstance(v, _SCALARS) for v in values):
            raise Refused(f"applies {func.__name__} to a container")
        self.charge(1 + len(values))
        for value in values:
            if isinstance(value, dict):
                self.charge(len(value) + self._keys_weight(value))
            elif isinstance(value, list | tuple | set | frozenset):
                self.charge(self._keys_weight(value))
            elif isinstance(value, str | bytes | bytearray):  # list(s), str(b), frozenset(s): each element made
                self.charge(4 * len(value))

    def _made(self) -> None:
        """Weigh what a call or an opcode just put on the stack, if it is a tuple."""
        self._weight(self.stack[-1])

    def load_build(self) -> None:
        target, state = self.stack[-2], self.stack[-1]
        if id(target) in self._handed:
            name = getattr(target, "__qualname__", type(target).__name__)
            raise pickle.UnpicklingError(f"the pickle tries to change {name:.60}, which streamconv refuses")
        self.charge(1 + (len(state) if isinstance(state, dict | tuple) else 0))
        super().load_build()

    def load_reduce(self) -> None:
        self._check_call(self.stack[-2], self.stack[-1])
        super().load_reduce()
        self._made()

    def load_newobj(self) -> None:
        self._check_call(self.stack[-2], self.stack[-1])
        super().load_newobj()
        self._made()

    def load_newobj_ex(self) -> None:
        self._check_call(self.stack[-3], self.stack[-2], self.stack[-1])
        super().load_newobj_ex()
        self._made()

    def _instantiate(self, klass: Any, args: Any) -> None:
        self._check_call(klass, tuple(args))
        super()._instantiate(klass, args)
        self._made()

    def load_frozenset(self) -> None:
        self.charge(self._keys_weight(self.stack))  # (after MARK, the stack holds just the items)
        super().load_frozenset()
        self._made()

    def load_setitem(self) -> None:
        self.charge(self._weight(self.stack[-2])[0])
        super().load_setitem()

    def load_setitems(self) -> None:
        self.charge(self._keys_weight(self.stack[0::2]))
        super().load_setitems()

    def load_additems(self) -> None:
        self.charge(self._keys_weight(self.stack))
        super().load_additems()

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
        if found is not None:
            return self.hand(found)
        if dangerous(module, name):
            raise Dangerous(f"{module:.60}.{name:.60}")
        return placeholder_class(f"{module}.{name}")


def _weighed(load: Any) -> Any:
    """An opcode that makes a tuple, followed by weighing it."""
    def step(self: Unpickler) -> None:
        load(self)
        self._made()

    return step


_OVERRIDDEN = {pickle.BUILD: "load_build", pickle.REDUCE: "load_reduce", pickle.NEWOBJ: "load_newobj",
               pickle.NEWOBJ_EX: "load_newobj_ex", pickle.FROZENSET: "load_frozenset",
               pickle.SETITEM: "load_setitem", pickle.SETITEMS: "load_setitems", pickle.ADDITEMS: "load_additems"}
_TUPLES = (pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3)


def _step(code: bytes, load: Any) -> Any:
    if code in _OVERRIDDEN:
        load = getattr(Unpickler, _OVERRIDDEN[code])
    return _counted(_weighed(load) if code in _TUPLES else load)


Unpickler.dispatch = _Dispatch({code: _step(bytes([code]), load) for code, load in pickle._Unpickler.dispatch.items()})


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
        raise pickle.UnpicklingError(f"unexpected persistent id {describe(saved_id)}")
    _, storage_type, key, _location, numel = saved_id
    if not isinstance(key, str | int) or isinstance(key, bool):
        raise pickle.UnpicklingError(f"unexpected storage key {describe(key)}")
    if not isinstance(numel, int) or numel < 0:
        raise pickle.UnpicklingError(f"unexpected storage size {describe(numel)}")
    return storage_type, str(key), numel


def refuse(path: str, entry: str, obj: Any) -> None:
    name = refused_global(obj)
    if name is not None:
        raise ConversionError(
            f"{path}: {entry} contains a pickled reference to {name}, which streamconv refuses to load "
            "(only tensors, containers and OmegaConf configs are allowed); do not trust this file"
        )
