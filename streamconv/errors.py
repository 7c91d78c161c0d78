"""The one exception type users see: a problem with the input or the request, worded as a fix."""

from __future__ import annotations

import functools
import re
import reprlib
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

# The command line's flags and the Python API's keyword arguments for the same setting.
KEYWORDS = {"--checkpoint-path": "checkpoint_path", "--save-path": "save_path", "--shard-size": "shard_size",
            "--device": "device", "--dtype": "dtype", "--vocab-size": "vocab_size", "--tokenizer": "tokenizer_path",
            "--num-heads": "num_heads", "--family": "family", "--part": "part", "--ray": "ray",
            "--overwrite": "overwrite=True", "--dry-run": "dry_run=True"}
_FLAG = re.compile(r"(--[a-z][a-z-]*)(?: (N|[0-9]+)\b)?")


class _Short(reprlib.Repr):
    def repr_int(self, value: int, level: int) -> str:  # repr() of an int over 4,300 digits raises
        if value.bit_length() > 256:
            return f"<an integer of {value.bit_length()} bits>"
        return super().repr_int(value, level)


_REPR = _Short()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60


def describe(value: Any) -> str:
    """A short repr of an untrusted value: bounded in length and depth, never the whole structure (a few bytes
    of pickle can stand for nested lists of 2**40 elements, whose full repr would never finish)."""
    return _REPR.repr(value)


def first_line(exc: BaseException) -> str:
    """An exception's message in one line (its first), or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """`text` with its control characters escaped as Python writes them (a newline as \\n), so that a line
    naming a path or a checkpoint's key stays one line and cannot move the terminal's cursor."""
    return _CONTROL.sub(lambda match: repr(match.group())[1:-1], text)


class ConversionError(Exception):
    """Bad input or arguments. The CLI prints the message as one line and exits with code 2."""


def _keywords(message: str) -> str:
    """`message` with each flag worded as the keyword argument: '--vocab-size 256' -> 'vocab_size=256'."""
    def word(match: re.Match[str]) -> str:
        keyword = KEYWORDS.get(match.group(1))
        if keyword is None:
            return match.group(0)
        return f"{keyword}={match.group(2)}" if match.group(2) else keyword

    return _FLAG.sub(word, message)


def python_api(function: F) -> F:
    """For `streamconv.convert` and `streamconv.verify`: errors name keyword arguments, not flags.

    The command line calls the function itself (`__wrapped__`), whose messages name the flags.
    """
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except ConversionError as exc:
            raise ConversionError(_keywords(str(exc))) from None

    return wrapper  # type: ignore[return-value]


def is_whole(value: Any) -> bool:
    """An int, or a float with nothing after the point (YAML may write 2.0); not a bool."""
    if isinstance(value, bool) or not isinstance(value, int | float) or abs(value) >= 2**63:
        return False
    return isinstance(value, int) or value.is_integer()
