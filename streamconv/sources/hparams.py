"""Hyper-parameters read as data: NeMo's pickled OmegaConf config and `model_config.yaml`, never OmegaConf itself.

A checkpoint's cfg is untrusted. OmegaConf walks a whole config when it is built or resolved, follows
`_parent` chains that a pickle can make loop, deep-copies YAML aliases (ten lines of YAML expand to
billions of nodes) and evaluates resolvers such as `${oc.env:HOME}`. So the pickle builds inert stand-ins
for OmegaConf's classes (`stand_ins`, allow-listed in `safe_pickle`) that only keep the state they are
given, and `Config` reads one key at a time by walking down from the root: only the path to a key is ever
visited, shared references cost nothing, `_parent` is never followed. Interpolations are resolved as
OmegaConf would for the plain forms NeMo writes (`${key}`, `${.key}`, `${..a.b}`, `${a[0]}`, inside a
string too), with bounded depth, steps and length; a resolver (`${name:...}`) is refused by name, the
environment is never read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from streamconv.errors import ConversionError, first_line
from streamconv.sources import safe_pickle
from streamconv.sources.stand_ins import Node

MAX_CONFIG_BYTES = 16 * 2**20  # a config file (model_config.yaml, context/model.yaml): real ones are a few kB
_MAX_DEPTH = 32  # interpolations followed from one key (a chain or a loop)
_MAX_STEPS = 10_000  # keys looked up while reading one hyper-parameter
_MAX_STRING = 65_536  # characters of a string built by interpolation
_MISSING = "???"  # OmegaConf's mandatory-missing value
_SAME = object()  # Config.get's `null` when not given: a null reads as absent
_INTERPOLATION = re.compile(r"\\\$\{|\$\{([^${}]*)\}")
_KEY = re.compile(r"[^.\[\]]+|\[[^\]]*\]")
_RESOLVER = re.compile(r"\$\{\s*+([^${}:\s]*+)\s*+:")  # possessive: no backtracking on long runs of blanks


def _unwrap(value: Any) -> Any:
    """The plain value behind a stand-in (its `_content` or `_val`); plain data as it is."""
    return value.content() if isinstance(value, Node) else value


def _short(text: str) -> str:
    return repr(text[:80] + ("..." if len(text) > 80 else ""))


class Config:
    """A NeMo cfg, read key by key. `source` names it in errors ("'hyper_parameters.cfg' entry of X.ckpt").

    Keys are asked for by their NeMo 1.x names; `aliases` maps one to where another writer keeps it (Megatron-LM's
    `args.seq_length` for `encoder_seq_length`)."""

    def __init__(self, root: Any, base: tuple[Any, ...], source: str, aliases: Mapping[str, str] | None = None) -> None:
        self.root, self.base, self.source, self.aliases = root, base, source, dict(aliases or {})
        self._steps, self._asked = 0, ".".join(base)

    @classmethod
    def of(cls, root: Any, base: tuple[Any, ...], source: str,
           aliases: Mapping[str, str] | None = None) -> Config | None:
        """The config at `base` below `root` (None when absent); refused unless it is a mapping."""
        try:
            value = cls(root, (), source)._read(base, "cfg")
        except _Absent:
            return None
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ConversionError(f"the cfg of {source} is {_kind(value)}, not a mapping of hyper-parameters; "
                                  "fix the checkpoint's cfg")
        return cls(root, base, source, aliases)

    def get(self, key: str, default: Any = None, null: Any = _SAME) -> Any:
        """The value at dotted `key` with interpolations resolved; `default` when absent or '???', and when null
        unless `null` says what to give then (a null that means something in megatron-core, or is refused).
        A mapping or list comes back as a `Section`, which only says what it is (it is never walked); an empty one
        as absent."""
        key = self.aliases.get(key, key)
        self._steps, self._asked = 0, key
        path = self.base + tuple(key.split("."))
        try:
            value = self._read(path, key)
        except _Absent:
            return default
        if value is None:
            return default if null is _SAME else null
        if value == _MISSING:
            return default
        if isinstance(value, dict | list):  # (an empty one sets nothing: read as absent)
            return Section(_kind(value)) if value else default
        return value

    def _read(self, path: tuple[Any, ...], key: str, depth: int = 0) -> Any:
        """The resolved value at absolute `path`; `key` is what the user asked for, for errors."""
        value = self._node(path)
        if isinstance(value, str) and "${" in value:
            return self._interpolate(value, path[:-1], key, depth)
        return value

    def _node(self, path: tuple[Any, ...]) -> Any:
        value = _unwrap(self.root)
        for part in path:
            self._steps += 1
            if self._steps > _MAX_STEPS:
                raise self._error(self._asked, "takes too many look-ups to read (an interpolation loop?)")
            if isinstance(value, dict):
                if part not in value:
                    raise _Absent
                value = _unwrap(value[part])
            elif isinstance(value, list) and isinstance(part, str) and part.isdecimal() and int(part) < len(value):
                value = _unwrap(value[int(part)])
            else:
                raise _Absent
        return value

    def _interpolate(self, text: str, parent: tuple[Any, ...], key: str, depth: int) -> Any:
        """`text` with each `${...}` replaced; a string that is one interpolation takes the value's type."""
        if len(text) > _MAX_STRING:
            raise self._error(key, f"is a string of more than {_MAX_STRING} characters with an interpolation")
        resolver = _RESOLVER.search(text)
        if resolver is not None:
            self._refuse_resolver(resolver.group(1), key)
        if depth >= _MAX_DEPTH:
            raise self._error(key, f"follows more than {_MAX_DEPTH} interpolations (a loop?)")
        whole = _INTERPOLATION.fullmatch(text)
        if whole is not None and whole.group(1) is not None:
            return self._follow(whole.group(1), parent, key, depth)
        pieces, length, last = [], 0, 0
        for match in _INTERPOLATION.finditer(text):
            pieces.append(text[last:match.start()])
            if match.group(1) is None:  # an escaped \${
                pieces.append("${")
            else:
                value = self._follow(match.group(1), parent, key, depth)
                huge = isinstance(value, int) and value.bit_length() > 64  # (str() of 4,300 digits raises)
                if huge or not isinstance(value, str | int | float | bool):
                    raise self._error(key, f"puts {_kind(value)} inside the string {_short(text)}")
                pieces.append(str(value))
            last = match.end()
            length += sum(map(len, pieces[-2:]))
            if length > _MAX_STRING:
                raise self._error(key, f"builds a string longer than {_MAX_STRING} characters")
        pieces.append(text[last:])
        if "${" in text[last:]:
            raise self._error(key, f"has an interpolation streamconv cannot read: {_short(text)}")
        return "".join(pieces)

    def _follow(self, reference: str, parent: tuple[Any, ...], key: str, depth: int) -> Any:
        reference = reference.strip()
        dots = len(reference) - len(reference.lstrip("."))
        parts = tuple(p.strip("[]") for p in _KEY.findall(reference[dots:]))
        if dots:
            if dots - 1 > len(parent):
                raise self._error(key, f"refers above the top of the cfg (${{{reference[:80]}}})")
            target = parent[: len(parent) - (dots - 1)] + parts
        else:
            target = parts
        try:
            return self._read(target, key, depth + 1)
        except _Absent:
            raise self._error(key, f"refers to ${{{reference[:80]}}}, which is not in the cfg") from None

    def _refuse_resolver(self, name: str, key: str) -> None:
        if name.startswith("oc.env") or name == "env":
            raise self._error(key, f"reads an environment variable (${{{name}:...}}), which streamconv never "
                              "does; write the value into the cfg")
        raise self._error(key, f"uses the resolver {name[:40]!r}, which streamconv does not evaluate; write the "
                          "value into the cfg")

    def _error(self, key: str, reason: str) -> ConversionError:
        fix = "" if "write the value" in reason else "; fix the checkpoint's cfg"
        return ConversionError(f"hyper-parameter {key!r} in the cfg of {self.source} {reason}{fix}")


class Section:
    """A mapping or list inside the cfg where a value was expected: says what it is, holds nothing."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __repr__(self) -> str:
        return f"<{self.kind}>"


class _Absent(Exception):
    """No value at a path."""


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return f"a mapping of {len(value)} keys"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, str):
        return f"the string {_short(value)}"
    return f"a {type(value).__name__}"


def lightning_cfg(path: str, payload: Mapping) -> Config | None:
    """The cfg in a Lightning checkpoint's `hyper_parameters` (NeMo's DictConfig({'cfg': ...})), if any."""
    hparams = payload.get("hyper_parameters")
    safe_pickle.refuse(path, "hyper_parameters", hparams)
    return Config.of(hparams, ("cfg",), f"{path} (hyper_parameters)")


def yaml_config(source: str, text: bytes, base: tuple[Any, ...] = (),
                aliases: Mapping[str, str] | None = None) -> Config | None:
    """A YAML file's config at `base`: yaml.safe_load (no objects built, aliases kept as shared references,
    `_target_:` keys kept as strings), read key by key as data."""
    import yaml

    try:
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except Exception as exc:  # any YAML error, or a nesting too deep to parse
        raise ConversionError(f"{source} cannot be read ({first_line(exc)[:200]}); fix or remove it and pass "
                              "--num-heads") from None
    return Config.of(data, base, source, aliases)
