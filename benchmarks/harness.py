"""Run contenders as child processes in interleaved rounds, summarise, record, compare.

Each run goes through `benchmarks.launcher.measure`: a small launcher process starts the contender, samples
its RSS every 50 ms and reports the child's own ru_maxrss (a child forked from this process, which may hold
torch and a freshly generated checkpoint, would start its ru_maxrss at our RSS). Under `--memory-limit` the
contender runs in a cgroup of its own (`benchmarks.cgroup`) and a run that fails there is recorded, not fatal.
The pure parts (medians, pair-by-pair ratios, the record, the comparison, the table) are unit-tested.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import psutil

from benchmarks import cgroup
from benchmarks.launcher import measure
from streamconv import parts

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
NAIVE = Path(__file__).resolve().parent / "naive.py"
STREAMCONV = "streamconv"  # contenders whose name starts with this are measured against the others
# Megatron-Bridge's own export (benchmarks/bridge_export.py), run by the interpreter of a Python >= 3.12 environment
BRIDGE = "bridge"
BRIDGE_EXPORT = Path(__file__).resolve().parent / "bridge_export.py"
BRIDGE_PYTHON_ENV = "STREAMCONV_BRIDGE_PYTHON"
BRIDGE_SETUP = ("build one with `bash benchmarks/setup_bridge.sh DIR` (Python 3.12, about 5 GB from PyPI), then pass "
                f"--bridge-python DIR/bin/python or set {BRIDGE_PYTHON_ENV}=DIR/bin/python")
BASELINES = ("copy", "dd", "naive", BRIDGE)
DTYPES = ("bf16", "fp16", "fp32")  # --dtype: a `streamconv-as-<dtype>` contender each
CONVERTED = "converted"  # a run's status when it exited 0 (copies too); else OOM-killed or failed (exit N)
# A variant of the plain conversion, measured against it: a cast (`streamconv-as-fp16`) or a split one
# (`streamconv-parts3`, `--parts`)
VARIANT = re.compile(rf"^{STREAMCONV}-(?:as-(?:{'|'.join(DTYPES)})|parts[0-9]+)")
# `cp` + fsync of a checkpoint file, or of every file (and folder) of a checkpoint folder
COPY = ('if [ -d "$0" ]; then cp -r -- "$0" "$1" && find "$1" -exec sync -- {} +; '
        'else cp -- "$0" "$1" && sync -- "$1"; fi')
# The targets tracked (benchmarks/README.md): (source dtype or None for any, ratio (a regular expression),
# figure, ceiling). Split conversions: N parts at once on one disk cost no time, and no part more memory; the
# part holding the largest tensor needs the single run's buffers, so its peak is the single run's give or take
# a few pages (+0.02% and -0.03% seen), which the 1% allows.
TARGETS = (
    ("bf16", f"{STREAMCONV}-as-fp16/{STREAMCONV}", "wall", 1.15),
    ("bf16", f"{STREAMCONV}-as-fp16/{STREAMCONV}", "peak_rss", 1.10),
    ("fp32", f"{STREAMCONV}-as-bf16/copy", "wall", 1.15),
    (None, f"{STREAMCONV}-parts[0-9]+/{STREAMCONV}", "wall", 1.10),
    (None, f"{STREAMCONV}-parts[0-9]+/{STREAMCONV}", "peak_rss", 1.01),
    # issue #29: on the same run folder, streamconv at most 1/8 of Megatron-Bridge's export's time, 1/20 of its RSS
    (None, f"{STREAMCONV}/{BRIDGE}", "wall", 0.125),
    (None, f"{STREAMCONV}/{BRIDGE}", "peak_rss", 0.05),
)
# `sh -c PARTS sh N CMD...`: CMD --part I/N for every I at once, then wait for each; exit 1 if any failed
PARTS = ('n=$1; shift; i=0; pids=; while [ "$i" -lt "$n" ]; do "$@" --part "$i/$n" & pids="$pids $!"; '
         'i=$((i + 1)); done; rc=0; for p in $pids; do wait "$p" || rc=1; done; exit "$rc"')
DD_FLAGS = "bs=64M iflag=direct oflag=direct conv=fsync status=none"
# The direct-I/O copy (no page cache either side), of a file or of each file of a folder into the same layout
DD = (f'if [ -d "$0" ]; then find "$0" -type f | while IFS= read -r f; do r="${{f#"$0"/}}"; '
      f'mkdir -p "$1/$(dirname "$r")" && dd if="$f" of="$1/$r" {DD_FLAGS} || exit 1; done '
      f'&& find "$1" -type d -exec sync -- {{}} +; else dd if="$0" of="$1" {DD_FLAGS}; fi')


@dataclass(frozen=True)
class Contender:
    name: str
    argv: Callable[[Path, Path], list[str]]  # (checkpoint, output path) -> command


def _streamconv(vocab_size: int | None, *flags: str) -> Callable[[Path, Path], list[str]]:
    """streamconv's command line; `vocab_size` None: no --vocab-size (the checkpoint says it)."""
    vocab = ("--vocab-size", str(vocab_size)) if vocab_size is not None else ()
    return lambda src, dst: [sys.executable, "-m", "streamconv", "--checkpoint-path", str(src), "--save-path",
                             str(dst), "--quiet", *vocab, *flags]


def contenders(vocab_size: int | None, devices: list[str], names: list[str] | None = None,
               dtypes: Collection[str] = ()) -> list[Contender]:
    """copy (what users compare with), dd (the I/O floor), naive (the reference, in RAM), streamconv on each
    device, then streamconv on the CPU casting to each of `dtypes` (whatever `names` says); in run order."""
    made = [
        Contender("copy", lambda src, dst: ["sh", "-c", COPY, str(src), str(dst)]),
        Contender("dd", lambda src, dst: ["sh", "-c", DD, str(src), str(dst)]),
        Contender("naive", lambda src, dst: [sys.executable, str(NAIVE), str(src), str(dst), "--vocab-size",
                                             str(vocab_size)]),
    ]
    made += [Contender(STREAMCONV if d == "cpu" else f"{STREAMCONV}-{d}", _streamconv(vocab_size, "--device", d))
             for d in devices]
    chosen = [c for c in made if names is None or c.name in names or c.name.split("-")[0] in names]
    return chosen + [Contender(f"{STREAMCONV}-as-{d}", _streamconv(vocab_size, "--device", "cpu", "--dtype", d))
                     for d in dtypes]


def bridge_contender(python: str, reference: Path) -> Contender:
    """`bridge`: Megatron-Bridge's documented export (benchmarks/bridge_export.py) run by `python`, the interpreter
    of a Bridge environment, with `reference` as the Hugging Face folder it takes the config class and tokenizer
    from."""
    return Contender(BRIDGE, lambda src, dst: [python, str(BRIDGE_EXPORT), str(src), str(dst), "--hf-reference",
                                               str(reference)])


def bridge_check(python: str | None, timeout: float = 600) -> tuple[dict | None, str | None]:
    """(versions, None) when `python` imports Megatron-Bridge as bridge_export.py does (its `--check`: some 10-15 s
    cold), else (None, why it cannot run the `bridge` contender and how to set an environment up)."""
    if not python:
        return None, f"no Megatron-Bridge environment given; {BRIDGE_SETUP}"
    try:
        proc = subprocess.run([python, str(BRIDGE_EXPORT), "--check"], capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{python} cannot run {BRIDGE_EXPORT.name} --check ({e}); {BRIDGE_SETUP}"
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        error = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return None, f"{python} does not import Megatron-Bridge ({error}); {BRIDGE_SETUP}"
    return json.loads(lines[-1]), None  # (Bridge logs to stdout before it)


def parts_contender(vocab_size: int, count: int) -> Contender:
    """`streamconv-partsN`: the N parts of one conversion (`--part I/N`) started at once under one shell, which
    waits for them all and fails if any part does. Its wall time ends with the last part; its ru_maxrss (that of
    its children) is the largest part's; its RSS timeline sums the parts."""
    conversion = _streamconv(vocab_size, "--device", "cpu")
    return Contender(f"{STREAMCONV}-parts{count}",
                     lambda src, dst: ["sh", "-c", PARTS, "sh", str(count), *conversion(src, dst)])


def dd_refusal(src: Path, scratch: Path) -> str | None:
    """Why dd's direct I/O fails from `src` (a folder: its first file) into `scratch`, or None when it works:
    some file systems refuse O_DIRECT (tmpfs before Linux 6.6, some FUSE and network ones)."""
    first = src if src.is_file() else min((p for p in src.rglob("*") if p.is_file()), default=src)
    probe = scratch / "dd-probe"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(["dd", f"if={first}", f"of={probe}", "bs=4096", "count=1", "iflag=direct",
                               "oflag=direct", "status=none"], capture_output=True, text=True)
    except OSError as e:
        return f"cannot run dd: {e}"
    finally:
        probe.unlink(missing_ok=True)
    if proc.returncode != 0:
        return f"dd with O_DIRECT fails from {first} into {scratch}: {proc.stderr.strip() or f'exit {proc.returncode}'}"
    return None


def drop_page_cache() -> bool:
    """Write back dirty pages and drop the page cache (root only); False when the kernel refuses."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def remove(path: Path) -> None:
    """`path` and what split conversions staged beside it (a published one's markers would make the next
    round's parts no-ops)."""
    for staged in parts.staged_folders(str(path.resolve())).values() if path.parent.is_dir() else ():
        shutil.rmtree(staged)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def status(returncode: int, oom_kills: int) -> str:
    """A run's outcome: converted (exit 0), OOM-killed (by the kernel, in the run's cgroup), failed (exit N)."""
    if returncode == 0:
        return CONVERTED
    return "OOM-killed" if oom_kills else f"failed (exit {returncode})"


def run_once(contender: Contender, src: Path, scratch: Path, weight_bytes: int, cold: bool,
             digest: bool = False, limit: cgroup.Limit | None = None, tensors: bool = False) -> dict:
    """One measured run, in a cgroup of its own under `limit` when given; its output is deleted afterwards
    (with `digest`, after hashing its files into the run's "outputs"; with `tensors`, its tensors into "tensors"
    and its other files' names into "other_files"). A failure exits with the child's stderr, unless under a limit:
    there it is the finding, recorded with its status and left out of medians and ratios."""
    dst = scratch / contender.name
    remove(dst)
    if cold:
        drop_page_cache()
    argv = contender.argv(src, dst)
    m, seen = (measure(argv, check=False), {}) if limit is None else cgroup.measure_under(limit, argv)
    outputs = digests(dst) if digest and m.returncode == 0 else None
    held = {"tensors": tensor_digests(dst), "other_files": sorted(
        str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file() and p.suffix != ".safetensors")} \
        if tensors and m.returncode == 0 else {}
    remove(dst)
    if m.returncode != 0 and limit is None:
        raise SystemExit(f"{contender.name} failed (exit {m.returncode}):\n{m.stderr.strip()}")
    run = {"wall": m.wall, "throughput": weight_bytes / m.wall, "peak_rss": m.peak_rss,
           "peak_anon": m.peak_anon, "timeline": m.timeline, "returncode": m.returncode,
           "status": status(m.returncode, seen.get("oom_kills", 0))}
    if limit is not None:
        run.update({"oom_killed": run["status"] == "OOM-killed", **seen})
    if m.returncode != 0:
        run["stderr"] = m.stderr.strip()[-2000:]
    return {**run, **held} if outputs is None else {**run, **held, "outputs": outputs}


# A dry run in a fresh interpreter: the seconds convert() takes from its start to the plan (opening the checkpoint,
# reading its metadata and hyper-parameters), which a conversion spends before streaming a byte.
_OPEN = """import json, sys
from streamconv.converter import convert
r = convert(sys.argv[1], None, dry_run=True, vocab_size=int(sys.argv[2]))
print(json.dumps({"seconds": r.seconds, "peak_rss": r.peak_rss}))
"""


def open_seconds(src: Path, vocab_size: int, cold: bool) -> dict:
    """How long streamconv takes to open `src` and plan its conversion (a dry run), and that run's peak RSS."""
    if cold:
        drop_page_cache()
    proc = subprocess.run([sys.executable, "-c", _OPEN, str(src), str(vocab_size)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"dry run on {src} failed (exit {proc.returncode}):\n{proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder`, by relative path: two outputs are byte-identical when these are."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(2**24):
                h.update(block)
        out[str(path.relative_to(folder))] = h.hexdigest()
    return out


def tensor_digests(folder: Path) -> dict[str, list]:
    """name -> [dtype, shape, sha256 of its bytes] of every tensor in `folder`'s safetensors files, whichever file
    holds it: two outputs sharded differently hold the same tensors when these are equal. One tensor in memory at a
    time (safe_open); a name in two files is an error."""
    import torch
    from safetensors import safe_open

    out: dict[str, list] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if name in out:
                    raise ValueError(f"{folder}: tensor {name!r} is in two files, {path.name} one of them")
                stored = f.get_slice(name)
                raw = f.get_tensor(name).reshape(-1).view(torch.uint8).numpy()
                out[name] = [stored.get_dtype(), list(stored.get_shape()), hashlib.sha256(raw).hexdigest()]
                del raw  # (before the next tensor is read)
    return out


def tensor_differences(mine: dict[str, list], theirs: dict[str, list], a: str, b: str) -> list[str]:
    """What differs between two `tensor_digests` (of `a`'s and `b`'s outputs), tensor by tensor; empty when they
    hold the same tensors: names, dtypes, shapes and bytes."""
    problems = []
    for name in sorted(set(mine) | set(theirs)):
        x, y = mine.get(name), theirs.get(name)
        if x is None or y is None:
            problems.append(f"{name} only in {a if y is None else b}'s output")
        elif x[0] != y[0]:
            problems.append(f"{name}: dtype {x[0]} in {a}'s output, {y[0]} in {b}'s")
        elif x[1] != y[1]:
            problems.append(f"{name}: shape {x[1]} in {a}'s output, {y[1]} in {b}'s")
        elif x[2] != y[2]:
            problems.append(f"{name}: same dtype and shape, different bytes")
    return problems


def round_tensor_differences(runs: dict[str, list[dict]], a: str, b: str) -> list[str]:
    """`tensor_differences` of jobs `a` and `b`, round by round (their runs hashed with `tensors`); a round where
    either has no digests (it did not convert) is named too."""
    problems = []
    for r, (x, y) in enumerate(zip(runs[a], runs[b], strict=True), 1):
        if "tensors" not in x or "tensors" not in y:
            problems.append(f"round {r}: no tensors of {a if 'tensors' not in x else b}'s output")
            continue
        problems += [f"round {r}: {d}" for d in tensor_differences(x["tensors"], y["tensors"], a, b)]
    return problems


def run_rounds(jobs: list[tuple[str, Contender, Path, int]], scratch: Path, rounds: int, cold: bool,
               digest: Collection[str] = (), limit: cgroup.Limit | None = None,
               tensors: Collection[str] = ()) -> dict:
    """Interleave the jobs (key, contender, checkpoint, weight bytes) A B C A B C ...; runs by key, in order.
    The outputs of the jobs named in `digest` are hashed, the tensors of those in `tensors` one by one; each runs
    under `limit` when given (see `run_once`)."""
    runs: dict[str, list[dict]] = {key: [] for key, *_ in jobs}
    scratch.mkdir(parents=True, exist_ok=True)
    for r in range(rounds):
        for key, contender, src, nbytes in jobs:
            run = run_once(contender, src, scratch, nbytes, cold, key in digest, limit, key in tensors)
            runs[key].append(run)
            print(f"  round {r + 1}/{rounds} {key:<20} {run_line(run)}", flush=True)
    return runs


def run_line(run: dict) -> str:
    """One run's figures for the progress lines."""
    peak = f", cgroup peak {run['cgroup_peak'] / 1e9:.3f} GB" if run.get("cgroup_peak") is not None else ""
    if run.get("status", CONVERTED) != CONVERTED:
        return f"{run['status']} after {run['wall']:.2f} s (peak RSS {run['peak_rss'] / 1e9:.3f} GB{peak})"
    return (f"{run['wall']:7.2f} s  {run['throughput'] / 1e9:5.2f} GB/s  peak RSS {run['peak_rss'] / 1e9:6.3f} GB"
            f"{peak}")


# ---- pure parts ------------------------------------------------------------------------------------------

def median(values: list[float]) -> float:
    return statistics.median(values)


def converted(runs: list[dict]) -> list[dict]:
    """The runs that completed (records from before --memory-limit have no status: all did)."""
    return [r for r in runs if r.get("status", CONVERTED) == CONVERTED]


def outcome(runs: list[dict]) -> str:
    """`converted`, `OOM-killed`, or a mix such as `2/3 converted, 1/3 OOM-killed`."""
    counts = Counter(r.get("status", CONVERTED) for r in runs)
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{n}/{len(runs)} {s}" for s, n in counts.items())


def summarize(runs: list[dict]) -> dict:
    """Medians (and spread) of one contender's converted runs; the status of all of them, and the highest
    cgroup peak (killed runs included) under a memory limit."""
    out: dict = {"status": outcome(runs), "runs": len(runs), "converted": len(converted(runs))}
    peaks = [r["cgroup_peak"] for r in runs if r.get("cgroup_peak") is not None]
    if peaks:
        out["cgroup_peak_max"] = max(peaks)
    done = converted(runs)
    if not done:
        return out
    walls = [r["wall"] for r in done]
    return {
        **out, "wall": median(walls), "wall_min": min(walls), "wall_max": max(walls),
        "throughput": median([r["throughput"] for r in done]),
        "peak_rss": median([r["peak_rss"] for r in done]), "peak_rss_max": max(r["peak_rss"] for r in done),
        "peak_anon": median([r["peak_anon"] for r in done]),
    }


def pair_ratios(num: list[dict], den: list[dict], key: str = "wall") -> list[float]:
    """num/den round by round: runs of the same round ran back to back, so machine drift mostly cancels.
    A round where either did not convert is left out."""
    return [a[key] / b[key] for a, b in zip(num, den, strict=True) if b[key] and converted([a, b]) == [a, b]]


def plain_of(name: str) -> str | None:
    """`streamconv-as-fp16` -> `streamconv` (`streamconv-as-fp16-dist` -> `streamconv-dist`, `streamconv-parts3`
    -> `streamconv`): the same conversion without the cast or the split; None for a name that is neither."""
    m = VARIANT.match(name)
    return None if m is None else STREAMCONV + name[m.end():]


def ratios(runs: dict[str, list[dict]]) -> dict:
    """`streamconv*/copy`, `streamconv*/dd` and `streamconv*/naive`, against a baseline run on the same input
    (`streamconv-dist/copy-dist`), and a cast or a split conversion against the plain one
    (`streamconv-as-fp16/streamconv`, `streamconv-parts3/streamconv`): medians of the per-round ratios of wall
    time and peak RSS."""
    out = {}
    for num in (k for k in runs if k.startswith(STREAMCONV)):
        same_input = [k for k in runs if (base := k.split("-")[0]) in BASELINES and k != base
                      and num.endswith(k[len(base):])]
        plain = [k for k in [plain_of(num)] if k in runs]
        for den in [k for k in BASELINES if k in runs] + same_input + plain:
            per_round = pair_ratios(runs[num], runs[den])
            if not per_round:  # no round where both converted
                continue
            out[f"{num}/{den}"] = {"wall": median(per_round), "per_round": per_round,
                                   "peak_rss": median(pair_ratios(runs[num], runs[den], "peak_rss"))}
    return out


def output_differences(runs: dict[str, list[dict]], a: str, b: str) -> list[str]:
    """Why the outputs of jobs `a` and `b` (hashed by `run_rounds`) are not all byte-identical, round by round
    and across rounds; empty when they are."""
    problems = []
    first = runs[a][0].get("outputs") if runs[a] else None
    for r, (x, y) in enumerate(zip(runs[a], runs[b], strict=True), 1):
        mine, theirs = x.get("outputs"), y.get("outputs")
        if mine is None or theirs is None:
            missing = x if mine is None else y
            why = "" if missing.get("status", CONVERTED) == CONVERTED else f" ({missing['status']})"
            problems.append(f"round {r}: no digest of {a if mine is None else b}'s output{why}")
            continue
        for name in sorted(set(mine) | set(theirs)):
            if name not in theirs or name not in mine:
                problems.append(f"round {r}: {name} only in {a if name in mine else b}'s output")
            elif mine[name] != theirs[name]:
                problems.append(f"round {r}: {name} differs between {a} and {b}")
        if mine != first:
            problems.append(f"round {r}: {a}'s output differs from its round 1 output")
    return problems


def targets(source_dtype: str, found: dict) -> list[dict]:
    """The tracked targets (`TARGETS`) that the ratios `found` on a `source_dtype` checkpoint measure: each
    with its value and whether it is met."""
    out = []
    for dtype, pattern, figure, ceiling in TARGETS:
        for name in (n for n in found if dtype in (None, source_dtype) and re.fullmatch(pattern, n)):
            value = found[name][figure]
            out.append({"ratio": name, "figure": figure, "ceiling": ceiling, "value": value, "met": value <= ceiling})
    return out


def make_record(meta: dict, runs: dict[str, list[dict]]) -> dict:
    """The JSON record of one benchmark run: what ran where, every run's figures, medians, ratios, targets."""
    found = ratios(runs)
    return {**meta, "runs": runs, "summary": {k: summarize(v) for k, v in runs.items()}, "ratios": found,
            "targets": targets(meta.get("source_dtype", "bf16"), found)}


def median_run(runs: list[dict]) -> dict:
    """The run whose wall time is the median (for plotting one representative timeline)."""
    ordered = sorted(runs, key=lambda r: r["wall"])
    return ordered[(len(ordered) - 1) // 2]


def _change(old: float, new: float) -> str:
    return f"{(new - old) / old * 100:+.1f}%" if old else "n/a"


def compare(old: dict, new: dict) -> list[str]:
    """Lines describing how `new` moved against `old`: each contender's medians, then the ratios."""
    lines = [f"change since {old.get('started', '?')} (commit {str(old.get('git', {}).get('commit'))[:10]}):"]
    for name, s in new["summary"].items():
        o = old.get("summary", {}).get(name)
        if o is None:
            lines.append(f"  {name}: new contender")
            continue
        if "wall" not in o or "wall" not in s:
            lines.append(f"  {name}: {o.get('status', CONVERTED)} -> {s['status']}")
            continue
        lines.append(
            f"  {name}: wall {o['wall']:.2f} -> {s['wall']:.2f} s ({_change(o['wall'], s['wall'])}), "
            f"throughput {o['throughput'] / 1e9:.2f} -> {s['throughput'] / 1e9:.2f} GB/s "
            f"({_change(o['throughput'], s['throughput'])}), peak RSS {o['peak_rss'] / 1e9:.3f} -> "
            f"{s['peak_rss'] / 1e9:.3f} GB ({_change(o['peak_rss'], s['peak_rss'])})"
        )
    for name, r in new["ratios"].items():
        o = old.get("ratios", {}).get(name)
        if o is not None:
            lines.append(f"  {name}: wall ratio {o['wall']:.2f} -> {r['wall']:.2f} ({_change(o['wall'], r['wall'])})")
    return lines


def workload(record: dict) -> tuple:
    """What two records must share to be compared: profile, layers, optimizer state, cache state, source dtype
    and the memory limit applied (older records are bf16 and unlimited)."""
    limit = record.get("memory_limit") or {}
    return (*(record.get(k) for k in ("profile", "layers", "optimizer", "page_cache")),
            record.get("source_dtype", "bf16"), limit.get("bytes") if limit.get("applied") else None)


def previous_record(results: Path, record: dict, exclude: Path | None = None) -> dict | None:
    """The newest earlier record of the same workload (see `workload`)."""
    for path in sorted(results.glob("*.json"), reverse=True):
        if exclude is not None and path.resolve() == exclude.resolve():
            continue
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if workload(old) == workload(record) and old.get("started", "") < record.get("started", ""):
            return old
    return None


def limit_line(limit: dict | None) -> str | None:
    """How the record's runs were limited, for the table's first line; None without --memory-limit."""
    if not limit:
        return None
    if not limit.get("applied"):
        return f"memory limit {limit['bytes'] / 1e9:.3f} GB asked for, NOT applied ({limit['note']}): runs unlimited"
    return (f"memory limit {limit['bytes'] / 1e9:.3f} GB per run, page cache included ({limit['note']}); "
            "runs that did not convert are left out of medians and ratios")


def _gb(s: dict, key: str, digits: int = 3) -> str:
    return f"{s[key] / 1e9:.{digits}f}" if key in s else "—"


def table(record: dict) -> str:
    """Markdown: one row per contender (medians over its converted rounds) with its status (and cgroup peak
    under a memory limit), the pair-by-pair ratios, the tracked targets."""
    limited = any("cgroup_peak_max" in s for s in record["summary"].values())
    rows = [line] if (line := limit_line(record.get("memory_limit"))) else []
    rows += [
        "| contender | wall s (median) | wall s (min–max) | throughput GB/s | peak RSS GB | peak anon RSS GB | "
        + ("cgroup peak GB (max) | " if limited else "") + "status |",
        "|---|---:|---:|---:|---:|---:|" + ("---:|" if limited else "") + "---|",
    ]
    for name, s in record["summary"].items():
        wall = f"{s['wall']:.2f} | {s['wall_min']:.2f}–{s['wall_max']:.2f}" if "wall" in s else "— | —"
        rows.append(f"| {name} | {wall} | {_gb(s, 'throughput', 2)} | {_gb(s, 'peak_rss')} | {_gb(s, 'peak_anon')} | "
                    + (f"{_gb(s, 'cgroup_peak_max')} | " if limited else "") + f"{s.get('status', CONVERTED)} |")
    if record["ratios"]:
        rows += ["", "| ratio (per round, median) | wall | wall per round | peak RSS |", "|---|---:|---|---:|"]
        for name, r in record["ratios"].items():
            per = ", ".join(f"{x:.2f}" for x in r["per_round"])
            rows.append(f"| {name} | {r['wall']:.2f} | {per} | {r['peak_rss']:.2f} |")
    if record.get("targets"):
        rows += ["", "| target | figure | value | ceiling | met |", "|---|---|---:|---:|---|"]
        for t in record["targets"]:
            rows.append(f"| {t['ratio']} | {t['figure']} | {t['value']:.3f} | {t['ceiling']:.3f} | "
                        f"{'yes' if t['met'] else 'NO'} |")
    return "\n".join(rows)


# ---- the machine -----------------------------------------------------------------------------------------

def machine(cache: Path) -> dict:
    """Cores, CPU model, RAM and the disk holding the checkpoints, for reading a record later."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    disk = shutil.disk_usage(cache)
    return {"cores": os.cpu_count(), "cpu": cpu, "ram_bytes": psutil.virtual_memory().total,
            "disk_path": str(cache), "disk_total_bytes": disk.total, "disk_free_bytes": disk.free,
            "platform": platform.platform(), "python": platform.python_version()}


def git_state() -> dict:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def write_record(record: dict, results: Path) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    stamp = record["started"].replace(":", "").replace("-", "")[:15]
    path = results / f"{stamp}-{record['profile']}-L{record['layers']}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path
