"""`--ray N`: the N parts of a split conversion (`streamconv.parts`) as Ray tasks, from one driver.

Ray schedules, retries a task whose worker or node died, and carries the bytes written back to one progress bar;
the parts themselves coordinate through the staging folder as they do under Slurm, so the save path must be on a
filesystem every node sees. Ray is imported only here, and only when asked for.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

from streamconv.errors import ConversionError
from streamconv.parts import MAX_PARTS
from streamconv.process import progress_bar

CPUS_PER_PART = 2  # a part's reader and writer threads; arranging (GPT-SW3's transposes) reached the disk's speed
# with two threads on the machines measured
RETRIES = 3  # attempts after a task's worker or node died
_BATCH = 64 * 10**6  # bytes written between two progress reports of a task


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConversionError('--ray needs Ray, which is not installed: pip install "streamconv[ray]" (or run the '
                              "parts yourself with --part I/N)") from None
    return ray


def convert_with_ray(convert: Callable[..., Any], count: int, checkpoint_path: str, save_path: str, progress: bool,
                     **options: Any) -> Any:
    """Plan on the driver (a bad input fails here, before any task starts), run parts 0..count-1 as Ray tasks,
    and return the driver's ConversionResult; a part's ConversionError is raised here as it was raised there.

    `convert` is streamconv.converter.convert, which calls this for `ray=`: handed in, so that this module stays
    below the converter; each task runs it for its part."""
    if not 1 <= count <= MAX_PARTS:
        raise ConversionError(f"--ray {count}: give the number of parts, 1 to {MAX_PARTS}")
    ray = _ray()
    started = time.perf_counter()
    result = convert(checkpoint_path, save_path, dry_run=True, **options)
    if not ray.is_initialized():  # RAY_ADDRESS names a cluster to join; without it Ray starts a local instance
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False, configure_logging=False)
    counter = ray.remote(num_cpus=0)(_Counter).remote()
    part = ray.remote(num_cpus=CPUS_PER_PART, max_retries=RETRIES, scheduling_strategy="SPREAD")(_run_part)
    pending = [part.remote(convert, i, count, checkpoint_path, save_path, options, counter) for i in range(count)]
    refs = list(pending)
    bar = progress_bar(result.plan.total_size, enabled=progress)
    try:
        shown = 0
        while pending:
            _, pending = ray.wait(pending, timeout=0.2)
            done = min(ray.get(counter.total.remote()), result.plan.total_size)  # (a retried task counts again)
            bar.update(done - shown)
            shown = done
        parts = [_unwrapped(ray, ref) for ref in refs]
    finally:
        bar.close()
    published = [p for p in parts if p.published]
    if not published:  # every part done, and the one that claimed publishing did not publish
        waiting = [p.outcome for p in parts if p.outcome.startswith("-> ") and "publishes it" in p.outcome]
        raise ConversionError(f"the {count} Ray tasks ended, but none published {save_path}"
                              + (f": {waiting[0][3:]:.400}" if waiting else "; run the same command again"))
    result.dry_run = False
    result.seconds = time.perf_counter() - started
    result.stream_seconds = max(p.stream_seconds for p in parts)
    result.peak_rss = max(p.peak_rss for p in parts)
    result.outcome = f"-> {save_path} ({count} Ray tasks; largest part peak RSS shown)"
    result.note = published[0].note if published else ""
    return result


def _unwrapped(ray: Any, ref: Any) -> Any:
    """A task's result, or its ConversionError (one line) raised again on the driver."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, ConversionError):
            raise ConversionError(str(exc.cause)) from None
        raise exc.cause from None  # an OSError is the CLI's one line, as in a single run; anything else a bug
    except ray.exceptions.RayError as exc:  # a worker or node lost more often than retried, an OOM kill
        lines = str(exc).strip().splitlines()
        raise ConversionError(f"a Ray task failed ({type(exc).__name__}: {lines[0] if lines else ''!s:.200}) "
                              f"after {RETRIES} retries; run the same command again (finished parts are not "
                              "redone)") from None


class _Counter:
    """Bytes written by all tasks, for the driver's progress bar."""

    def __init__(self) -> None:
        self.bytes = 0

    def add(self, n: int) -> None:
        self.bytes += n

    def total(self) -> int:
        return self.bytes


def _run_part(convert: Callable[..., Any], index: int, count: int, checkpoint_path: str, save_path: str, options: dict,
              counter: Any) -> Any:
    """One Ray task: part `index` of `count`, reporting its bytes in batches."""
    unreported = 0

    def on_bytes(n: int) -> None:
        nonlocal unreported
        unreported += n
        if unreported >= _BATCH:
            counter.add.remote(unreported)
            unreported = 0

    result = convert(checkpoint_path, save_path, part=(index, count), on_bytes=on_bytes, **options)
    counter.add.remote(unreported)
    return dataclasses.replace(result, plan=dataclasses.replace(result.plan, shards=[]))  # small to send back
