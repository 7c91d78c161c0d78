"""Where a conversion's threads spend their time: the reader, the arranger (the main thread) and the writer each
time their waits and their work by stage, so that a slow conversion shows what it waited for (`--debug`)."""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Iterator


class Clock:
    """Seconds spent per stage (`thread: stage`); each stage is timed by one thread only."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)

    @contextlib.contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start

    def line(self, total: float, name: str = "pipeline") -> str:
        """`pipeline: 4.83 s; reader: reading 3.29 s, waiting for a free buffer 1.16 s; ...` (arranging: the
        main thread's time not spent waiting)."""
        waits = {stage: s for stage, s in self.seconds.items() if stage.startswith("arranger: waiting")}
        stages = {**self.seconds, "arranger: arranging": total - sum(waits.values())}
        threads: dict[str, list[str]] = {}
        for stage in sorted(stages):
            thread, what = stage.split(": ", 1)
            threads.setdefault(thread, []).append(f"{what} {stages[stage]:.2f} s")
        return f"{name}: {total:.2f} s; " + "; ".join(f"{t}: {', '.join(w)}" for t, w in threads.items())
