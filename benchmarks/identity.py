"""Byte-identity check of a refactor: the benchmark workloads, converted by two checkouts, must give the same files.

    cd <a checkout holding this file> && /work/main/.venv/bin/python -m benchmarks.identity BEFORE AFTER [--cache DIR]

BEFORE and AFTER are source trees (e.g. a `git worktree add --detach /work/wt-base <commit>` and /work/main); each
conversion runs `PYTHONPATH=<checkout> python -m streamconv --checkpoint-path X --save-path Y --device cpu --quiet
FLAGS` (cwd: the checkout; the Python is this one, or $PYTHON), with the same FLAGS and the same save path on both
sides, one side after the other. Every file the run leaves in its scratch folder (the output folder, and anything a
`--part` run leaves beside it) is hashed (sha256) and the folder deleted before the next run; a run both sides
refuse compares its exit status and stderr instead. One line per workload (`same` or what differs); exit 1 on any
difference. The same checkout twice checks that the conversions are deterministic.

Inputs: the benchmark generators (benchmarks/workloads.py, benchmarks/llama.py) at their smallest profiles, made
once into the cache (default $STREAMCONV_BENCH_CACHE or ~/.cache/streamconv-bench; 3.7 GB in all, plus one
output of at most 1.13 GB at a time in a scratch folder there, deleted at the end), and the committed fixtures
tests/fixtures/mcore019, bridge062 and bridge062-families (which e1798ea refuses: their exit status and message are
compared). The inputs are made by this checkout's generators; the conversions are the checkouts'. About 2 minutes
on 2 cores once the inputs exist (about 1 minute more to make them the first time). `--list` shows the workloads
and their flags, `--only`/`--skip WORD,...` pick some.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
# A Llama-shaped checkpoint at about a fifteenth of llama8b (0.19 GB): the same structure (grouped queries 4:1,
# SwiGLU, untied, TP 2 with fc1's gate and up halves as separate chunks), in its own cache folder, as the
# generator names its files by layer count only.
SMALL_LLAMA = dict(hidden=1024, heads=8, groups=2, ffn=3584, vocab_size=32000, n_layer=2, positions=8192)
# A `--part` run leaves its staging folder beside the save path (by design: a rerun of a part is then a no-op). Its
# name (a fingerprint of flags, source, plan, config and version) and parts.json are compared byte for byte; these
# markers hold what differs from run to run by design (done-I: the part's pid, host and start time; published and
# swapping: inode numbers), so only their presence is compared.
PER_RUN = re.compile(r"(^|/)\.[^/]*\.streamconv-parts-[0-9a-f]+/(done-[0-9]+|published|swapping)$")


@dataclass
class Workload:
    name: str
    source: Callable[[Path], Path]  # cache -> the checkpoint (made on first use)
    flags: list[str] = field(default_factory=list)
    parts: int = 0  # > 0: run --part 0/N .. N-1/N one after the other (the last publishes)


# ---- inputs ----------------------------------------------------------------------------------------------------

def _small(cache: Path) -> Path:
    from benchmarks.workloads import PROFILES, ensure_checkpoint

    return ensure_checkpoint(PROFILES["small"], cache)


def _tiny(dtype: str) -> Callable[[Path], Path]:
    def make(cache: Path) -> Path:
        from benchmarks.workloads import TINY, ensure_checkpoint

        return ensure_checkpoint(TINY, cache, dtype=dtype)
    return make


def _small_tp2_nemo(cache: Path) -> Path:
    from benchmarks.workloads import PROFILES, ensure_parallel

    return ensure_parallel(PROFILES["small"], cache, None, 2)


def _small_tp2_dist(cache: Path) -> Path:
    from benchmarks.workloads import PROFILES, ensure_distributed

    return ensure_distributed(PROFILES["small"], cache, None, 2)


def _llama(bridge: bool) -> Callable[[Path], Path]:
    def make(cache: Path) -> Path:
        from benchmarks.llama import LlamaModel, ensure_llama

        return ensure_llama(cache / "identity-llama", LlamaModel(**SMALL_LLAMA), 2, bridge)
    return make


def _tiny_zarr(cache: Path) -> Path:
    """The tiny model (benchmarks' TINY .ckpt) as megatron-core's zarr backend lays out a TP 2 checkpoint: a folder
    per tensor, one chunk file per layer and tensor-parallel slice (tests/test_zarr.py's writer), metadata.json and
    a common.pt with the hyper-parameters, as ensure_distributed writes for torch_dist."""
    from benchmarks.workloads import COMMON_KEYS, TINY, _generate_once, ensure_checkpoint, mcore_shards

    ckpt = ensure_checkpoint(TINY, cache)

    def write(folder: Path) -> None:
        import torch

        from tests.test_zarr import write_array

        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        saved = torch.load(ckpt, weights_only=False, map_location="cpu")
        ranks = [mcore_shards(saved["state_dict"], 2, rank) for rank in range(2)]
        for key, (shape, first) in ranks[0].items():
            chunks = [c for r in ranks for c in r[key][1]]
            whole = torch.empty(shape, dtype=chunks[0][1].dtype)
            for offsets, piece in chunks:
                whole[tuple(slice(o, o + n) for o, n in zip(offsets, piece.shape, strict=True))] = piece
            write_array(folder, key, whole, tuple(first[0][1].shape))
        (folder / "metadata.json").write_text('{"sharded_backend": "zarr", "sharded_backend_version": 1}')
        torch.save({"hyper_parameters": saved["hyper_parameters"], **COMMON_KEYS}, folder / "common.pt")

    return _generate_once(cache / "tiny-L1-tp2.zarr", 2 * 2**20, 2**30, "tiny, 2 TP ranks, zarr", write)


def _fixture(path: str) -> Callable[[Path], Path]:
    return lambda cache: FIXTURES / path


def workloads() -> list[Workload]:
    small = ["--vocab-size", "16000"]  # as the harness passes each GPT-SW3 profile's vocabulary
    tiny = ["--vocab-size", "2048"]
    llama_vocab = ["--vocab-size", str(SMALL_LLAMA["vocab_size"])]
    out = [
        Workload("small.ckpt", _small, small),
        Workload("small.ckpt --dtype fp16", _small, [*small, "--dtype", "fp16"]),
        Workload("small.ckpt --shard-size 500MB", _small, [*small, "--shard-size", "500MB"]),
        Workload("small.ckpt --part I/2", _small, small, parts=2),
        Workload("tiny.ckpt --dtype fp32", _tiny("bf16"), [*tiny, "--dtype", "fp32"]),
        Workload("tiny-fp32.ckpt --dtype bf16", _tiny("fp32"), [*tiny, "--dtype", "bf16"]),
        Workload("small-tp2.nemo", _small_tp2_nemo, small),
        Workload("small-tp2.dist (torch_dist)", _small_tp2_dist, small),
        Workload("tiny-tp2.zarr", _tiny_zarr, tiny),
        Workload("llama-tp2.dist", _llama(False), llama_vocab),
        Workload("llama-tp2.dist --dtype fp16 --shard-size 100MB", _llama(False),
                 [*llama_vocab, "--dtype", "fp16", "--shard-size", "100MB"]),
        Workload("bridge-tp2.run (no flag)", _llama(True)),
    ]
    # the committed fixtures, with the flags tests/test_mcore019.py and tests/test_bridge.py pass
    cases = json.loads((FIXTURES / "mcore019" / "manifest.json").read_text())["cases"]
    for name, case in sorted(cases.items()):
        flags = ["--vocab-size", str(case["params"]["vocab"])]
        if name.endswith("-bare"):
            flags += ["--num-heads", "4"]  # (llama_gqa-bare is refused: no context length or rotary base)
        out.append(Workload(f"mcore019/{name}", _fixture(f"mcore019/{case['checkpoint']}"), flags))
    bridge = json.loads((FIXTURES / "bridge062" / "manifest.json").read_text())["cases"]
    for name, case in sorted(bridge.items()):
        out.append(Workload(f"bridge062/{name}", _fixture(f"bridge062/{case['checkpoint']}")))
    families = json.loads((FIXTURES / "bridge062-families" / "manifest.json").read_text())["families"]
    for name, family in sorted(families.items()):
        out.append(Workload(f"bridge062-families/{name}", _fixture(f"bridge062-families/{family['checkpoint']}")))
    return out


# ---- running and comparing -------------------------------------------------------------------------------------

@dataclass
class Result:
    returncode: int
    stderr: str
    files: dict[str, str]  # relative path -> sha256 (everything left in the run's scratch folder)
    bytes: int
    seconds: float


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def check_import(python: str, checkout: Path) -> None:
    """The checkout's streamconv is the one its conversions import (not an installed or editable one)."""
    found = subprocess.run([python, "-c", "import streamconv; print(streamconv.__file__)"], cwd=checkout,
                           env={**os.environ, "PYTHONPATH": str(checkout)}, capture_output=True, text=True)
    where = Path(found.stdout.strip()).resolve()
    if found.returncode or not where.is_relative_to(checkout.resolve()):
        raise SystemExit(f"{checkout}: `import streamconv` finds {where or found.stderr.strip()}, not this checkout")


def convert(python: str, checkout: Path, workload: Workload, source: Path, run: Path) -> Result:
    """One side: convert into `run`/out (the same path for both sides), hash what `run` holds, delete it."""
    run.mkdir(parents=True)
    base = [python, "-m", "streamconv", "--checkpoint-path", str(source), "--save-path", str(run / "out"),
            "--device", "cpu", "--quiet", *workload.flags]
    commands = [base + ["--part", f"{i}/{workload.parts}"] for i in range(workload.parts)] or [base]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    started, returncode, stderr = time.monotonic(), 0, ""
    for argv in commands:
        proc = subprocess.run(argv, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
        if proc.returncode:
            returncode, stderr = proc.returncode, proc.stderr
            break
    seconds = time.monotonic() - started
    files = {str(p.relative_to(run)): "(per run)" if PER_RUN.search(str(p.relative_to(run))) else sha256(p)
             for p in sorted(run.rglob("*")) if p.is_file() or p.is_symlink()}
    nbytes = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    shutil.rmtree(run)
    return Result(returncode, stderr, files, nbytes, seconds)


def compare(before: Result, after: Result) -> list[str]:
    """What differs between the two sides; empty when they are the same."""
    out = []
    if before.returncode != after.returncode:
        out.append(f"exit {before.returncode} before, {after.returncode} after")
    if before.returncode and after.returncode and before.stderr != after.stderr:
        out.append(f"stderr before: {before.stderr.strip()!r}; after: {after.stderr.strip()!r}")
    for name in sorted(set(before.files) | set(after.files)):
        a, b = before.files.get(name), after.files.get(name)
        if a != b:
            out.append(f"{name}: " + ("only after" if a is None else "only before" if b is None else
                                     f"{a[:12]} before, {b[:12]} after"))
    return out


def main(argv: list[str] | None = None) -> int:
    from benchmarks.workloads import default_cache

    p = argparse.ArgumentParser(prog="python -m benchmarks.identity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", type=Path, help="source tree of the code before (e.g. a worktree of the base commit)")
    p.add_argument("after", type=Path, help="source tree of the code after (may be the same path: determinism)")
    p.add_argument("--cache", type=Path, default=None, help="where inputs are made once, and the scratch folder "
                   "(default $STREAMCONV_BENCH_CACHE or ~/.cache/streamconv-bench)")
    p.add_argument("--only", default="", help="run only the workloads whose name contains one of these "
                   "comma-separated words")
    p.add_argument("--skip", default="", help="skip the workloads whose name contains one of these words")
    p.add_argument("--list", action="store_true", help="list the workloads and their flags, and exit")
    args = p.parse_args(argv)
    python = os.environ.get("PYTHON") or sys.executable
    chosen = [w for w in workloads()
              if (not args.only or any(s and s in w.name for s in args.only.split(",")))
              and not any(s and s in w.name for s in args.skip.split(","))]
    if args.list:
        for w in chosen:
            print(f"{w.name}: {' '.join(w.flags) or '(no flag)'}" + (f", --part I/{w.parts}" if w.parts else ""))
        return 0
    for checkout in (args.before, args.after):
        check_import(python, checkout)
    cache = args.cache or default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="identity-", dir=cache))
    started, differing = time.monotonic(), []
    print(f"before {args.before.resolve()} ({_commit(args.before)}), after {args.after.resolve()} "
          f"({_commit(args.after)}), python {python}", flush=True)
    try:
        for w in chosen:
            source = w.source(cache)
            before = convert(python, args.before, w, source, scratch / "run")
            after = convert(python, args.after, w, source, scratch / "run")
            problems = compare(before, after)
            markers = sum(h == "(per run)" for h in before.files.values())
            what = (f"refused by both, exit {before.returncode}" if before.returncode and not problems else
                    f"{len(before.files)} files, {before.bytes / 1e9:.3f} GB"
                    + (f", {markers} of them staging markers compared by name" if markers else ""))
            times = f"{before.seconds:.1f} s / {after.seconds:.1f} s"
            if problems:
                differing.append(w.name)
                print(f"{w.name}: DIFFERENT ({times}): " + "; ".join(problems), flush=True)
            else:
                print(f"{w.name}: same ({what}; {times})", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    verdict = f"{len(differing)} of {len(chosen)} workloads differ" if differing else f"all {len(chosen)} same"
    print(f"{verdict} ({time.monotonic() - started:.0f} s)")
    return 1 if differing else 0


def _commit(checkout: Path) -> str:
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    return (head.stdout.strip() or "no git") + (", dirty" if dirty.stdout.strip() else "")


if __name__ == "__main__":
    sys.exit(main())
