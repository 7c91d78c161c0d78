"""`--memory-limit`: every contender run in a fresh memory cgroup nested under the harness's own.

What a cgroup charges is what the kernel charges it: the run's anonymous memory and the page cache it reads
and writes (clean cache is reclaimed, dirty cache written back, before the OOM killer is called), so a limit
is the RAM of a smaller machine. Swap is capped with it (v1 `memory.memsw.limit_in_bytes`, v2
`memory.swap.max` 0): a run cannot page its way past the limit. The run's shell moves itself into the cgroup
before it execs the contender; `benchmarks.launcher.measure`'s launcher stays outside.
The parsing (`locate`, `counters`) is unit-tested; the rest is tested on a tiny run where a cgroup is writable.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.launcher import Measurement, measure

# per version: (limit file, swap limit file, peak usage, the file with the oom_kill counter)
FILES = {1: ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.max_usage_in_bytes",
             "memory.oom_control"),
         2: ("memory.max", "memory.swap.max", "memory.peak", "memory.events")}
ENTER = 'echo $$ > "$0" && exec "$@"'  # sh -c ENTER CGROUP/cgroup.procs ARGV...


@dataclass(frozen=True)
class Limit:
    bytes: int
    version: int  # 1 or 2
    parent: Path  # the harness's own memory cgroup: each run's cgroup is made below it


def locate(proc_cgroup: str, mountinfo: str) -> tuple[int, Path] | None:
    """(version, folder) of this process's memory cgroup, from /proc/self/cgroup and /proc/self/mountinfo: v1's
    memory hierarchy where one is mounted (also on hybrid machines), else v2's unified one; None without."""
    paths: dict[int, str] = {}
    for line in proc_cgroup.splitlines():
        ident, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            paths[1] = path
        elif ident == "0" and not controllers:
            paths[2] = path
    found: dict[int, Path] = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        tail = fields[fields.index("-") + 1:]  # file system type, source, super options
        version = 1 if tail[0] == "cgroup" and "memory" in tail[2].split(",") else 2 if tail[0] == "cgroup2" else 0
        if version in paths and version not in found:
            root, point = fields[3], fields[4]  # the mount's root inside the hierarchy, and where it is mounted
            inside = paths[version].removeprefix(root.rstrip("/"))
            found[version] = Path(point) / inside.lstrip("/")
    return next(((v, found[v]) for v in (1, 2) if v in found), None)


def counters(text: str) -> dict[str, int]:
    """`key value` lines (memory.oom_control, memory.events) as a dict."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def prepare(limit_bytes: int) -> tuple[Limit | None, str]:
    """The limit to run under, or None and why no memory cgroup is writable here (then runs are unlimited)."""
    try:
        where = locate(Path("/proc/self/cgroup").read_text(), Path("/proc/self/mountinfo").read_text())
    except OSError as e:
        return None, f"cannot read this process's cgroups: {e}"
    if where is None:
        return None, "no memory cgroup hierarchy is mounted"
    version, parent = where
    if version == 2 and "memory" not in _read(parent / "cgroup.subtree_control").split():
        try:  # refused while the harness's own cgroup holds processes, unless it is the root
            (parent / "cgroup.subtree_control").write_text("+memory")
        except OSError as e:
            return None, f"cannot enable the memory controller below {parent} (cgroup v2): {e}"
    limit = Limit(limit_bytes, version, parent)
    try:
        remove(create(limit))
    except OSError as e:
        return None, f"cannot make a memory cgroup below {parent} (cgroup v{version}): {e}"
    return limit, f"cgroup v{version}, one fresh cgroup per run below {parent}"


def create(limit: Limit) -> Path:
    """A fresh cgroup below the harness's, capped at the limit, swap included."""
    path = limit.parent / f"streamconv-bench-{os.getpid()}-{time.monotonic_ns()}"
    memory, swap, *_ = FILES[limit.version]
    path.mkdir()
    try:
        (path / memory).write_text(str(limit.bytes))
        if (path / swap).exists():  # v1 memsw is memory + swap, v2 swap.max is swap alone
            (path / swap).write_text(str(limit.bytes) if limit.version == 1 else "0")
    except OSError:
        path.rmdir()
        raise
    return path


def remove(path: Path, tries: int = 50) -> None:
    """rmdir the cgroup; a task that has just exited may hold it for a moment."""
    for _ in range(tries - 1):
        try:
            path.rmdir()
            return
        except OSError:
            time.sleep(0.02)
    path.rmdir()


def usage(path: Path, version: int) -> dict:
    """What the cgroup saw of its run: OOM kills and peak usage (None where the kernel keeps no peak)."""
    *_, peak, events = FILES[version]
    text = _read(path / peak).strip()
    return {"oom_kills": counters(_read(path / events)).get("oom_kill", 0),
            "cgroup_peak": int(text) if text.isdigit() else None}


def measure_under(limit: Limit, argv: list[str]) -> tuple[Measurement, dict]:
    """`measure` `argv` inside a fresh cgroup under `limit`, which is removed afterwards; with `usage`."""
    path = create(limit)
    try:
        m = measure(["sh", "-c", ENTER, str(path / "cgroup.procs"), *argv], check=False)
        return m, usage(path, limit.version)
    finally:
        remove(path)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
