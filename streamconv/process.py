"""This process: its peak memory, signals held across torch's import, and the progress bar on stderr."""

from __future__ import annotations

import contextlib
import resource
import signal
import sys
import threading
from collections.abc import Iterator

from streamconv.errors import one_line


def peak_rss() -> int:
    """This process's peak resident set in bytes (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM; deliver them right after, to the handlers there were.

    torch's C extension imports numpy and discards any Python error raised meanwhile, so the exception a
    signal raised during `import torch` vanished and the conversion went on (seen with SIGTERM 0.25 s into
    a run). Only the main thread can set handlers; elsewhere this holds nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)  # (None: set outside Python)
        if held:  # the first one: its handler may raise
            signal.raise_signal(held[0])


def import_torch() -> None:
    """Import torch, for a cast or a GPU (about 1.7 s cold: a CPU conversion without a cast never does)."""
    if "torch" not in sys.modules:
        with signals_held():
            import torch  # noqa: F401


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, enabled: bool, description: str = "converting"):
    """tqdm's bar on stderr; with --quiet, not even tqdm's import (0.1 s of a cold start)."""
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=one_line(description),
        file=sys.stderr, dynamic_ncols=True,
    )
