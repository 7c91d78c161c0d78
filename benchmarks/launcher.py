"""The launcher that measures one command in a child process: wall seconds, peak RSS and an RSS timeline.

The benchmarks measure every contender run with it, and the memory tests check streamconv's peak with
`peak_rss_of`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

# Runs a command, samples the resident memory of its process tree every INTERVAL seconds (psutil: RSS, and
# RSS minus file-backed and shared pages, i.e. RssAnon) and prints one JSON line: wall seconds, ru_maxrss,
# the samples, the exit code. Linux starts a child's ru_maxrss at its parent's RSS at fork (the hiwater mark
# survives exec), so measuring from a large parent (pytest holding test models, a benchmark that built a
# checkpoint) would report the parent. This launcher is a small Python with no torch: the command's own
# peak dominates.
_LAUNCHER = """import json, resource, subprocess, sys, threading, time
interval, command = float(sys.argv[1]), sys.argv[2:]
samples, done = [], threading.Event()
start = time.perf_counter()
proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
import psutil  # after the fork: the child's ru_maxrss starts at this process's RSS
def sample():
    root = psutil.Process(proc.pid)
    while not done.is_set():
        rss = anon = 0
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                m = p.memory_info()
            except psutil.Error:
                continue
            rss, anon = rss + m.rss, anon + m.rss - m.shared
        samples.append((round(time.perf_counter() - start, 4), rss, anon))
        done.wait(interval)
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
code = proc.wait()
wall = time.perf_counter() - start
done.set()
sampler.join()
maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"wall": wall, "peak_rss": maxrss, "returncode": code, "timeline": samples}))
"""


@dataclass
class Measurement:
    """One child process's run: wall seconds, peak RSS (ru_maxrss), peak sampled RssAnon and the samples."""

    wall: float
    peak_rss: int
    peak_anon: int
    timeline: list[tuple[float, int, int]]  # (seconds since start, RSS bytes, anonymous RSS bytes)
    returncode: int
    stderr: str


def measure(command: list[str], interval: float = 0.05, check: bool = True) -> Measurement:
    """Run `command` (stdout discarded) through the launcher above; raise if it fails and `check`."""
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, str(interval), *map(str, command)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"launcher for {command} exited with {proc.returncode}: {proc.stderr.strip()}")
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    if check and record["returncode"] != 0:
        raise RuntimeError(f"{command} exited with {record['returncode']}: {proc.stderr.strip()}")
    timeline = [tuple(s) for s in record["timeline"]]
    return Measurement(record["wall"], record["peak_rss"], max((s[2] for s in timeline), default=0), timeline,
                       record["returncode"], proc.stderr)


def peak_rss_of(command: list[str]) -> int:
    """Run `command` (stdout discarded) and return its peak resident set in bytes; raise if it fails."""
    return measure(command).peak_rss

