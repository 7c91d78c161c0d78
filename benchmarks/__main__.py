"""`python -m benchmarks`: streamconv against `cp` + fsync, a direct-I/O `dd`, the naive in-RAM converter and
Megatron-Bridge's own export; see benchmarks/README.md."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import psutil

from benchmarks import cgroup, harness
from benchmarks.llama import LlamaModel, SyntheticModel, ensure_hf_reference, ensure_llama
from benchmarks.nemotronh import NemotronHModel, ensure_nemotronh, pattern_of
from benchmarks.qwen3moe import Qwen3MoeModel, ensure_qwen3moe
from benchmarks.workloads import (
    PROFILES,
    SOURCE_DTYPES,
    TINY,
    default_cache,
    ensure_checkpoint,
    ensure_distributed,
    ensure_parallel,
    files_of,
    largest_rearranged,
    weight_bytes,
)
from streamconv.errors import ConversionError
from streamconv.plan import parse_size

MiB = 2**20
# --ci: streamconv's peak RSS may exceed the Python/torch baseline (a tiny conversion, measured in the same run)
# by this many of the largest rearranged tensors plus slack: the bound tests/test_memory.py checks. Its working
# memory is two output buffers and two 64 MiB read chunks (streamconv.pipeline.working_memory).
RSS_TENSORS, RSS_SLACK = 4, 64 * MiB
# --ci: streamconv may take this many times as long as `cp` + fsync of the same file, pair by pair. Loose on
# purpose: copy timings on this project's virtual disk vary 2-3x from run to run (0.9 to 2.5 s for the small
# profile), and on the small profile streamconv's fixed start-up (Python, torch, transformers: about 3 s of its
# 5-6 s) weighs as much as its streaming, so per-round ratios of 3 to 7.3 were measured on one healthy run.
# 12x catches a gross regression (streaming several times slower, or memory thrashing), not a small one:
# track those with `--compare` on the medium profile.
CI_RATIO_CEILING = 12.0
LLAMA_PROFILE = "llama8b"
BRIDGE_PROFILE = "bridge8b"  # the same model as Megatron-Bridge saves it, converted with no flag
MOE_PROFILE = "qwen3moe"  # Qwen3-30B-A3B's shapes as Megatron-Bridge saves them with expert parallelism 2, no flag
MOE_EP = 2
HYBRID_PROFILE = "nemotronh"  # Nemotron-H 8B's shapes (Mamba, attention, MLP layers) as Bridge saves them at TP 2
DIST_PROFILES = (LLAMA_PROFILE, BRIDGE_PROFILE, MOE_PROFILE, HYBRID_PROFILE)  # synthetic dist checkpoints: llama_run
# The workloads Megatron-Bridge's export runs on (the `bridge` contender): its run folders of families whose reference
# it can be given. Not nemotronh (its Mamba layers need mamba_ssm built for the CPU, which setup_bridge.sh does not
# install), not llama8b (NeMo's layout, which Bridge does not read).
BRIDGE_EXPORT_PROFILES = (BRIDGE_PROFILE, MOE_PROFILE)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--profile", choices=[*sorted(PROFILES), *DIST_PROFILES], default="medium",
                   help="workload: small ~1.1 GB, medium 2.6 GB, large 8.1 GB, 40b 4.3 GB (GPT-SW3 40B shapes); "
                        "llama8b 3.05 GB (Llama 3 8B shapes, a distributed checkpoint of --tp ranks, default 2); "
                        "bridge8b the same as Megatron-Bridge saves it (run_config.yaml, no flag); "
                        "qwen3moe 3.74 GB (Qwen3-30B-A3B shapes, 128 experts, as Bridge saves them with EP 2, no "
                        "flag); "
                        "nemotronh 3.6 GB (Nemotron-H 8B shapes, layers M-M*M-: Mamba, MLP, attention, as Bridge "
                        "saves them with TP 2, no flag; --layers N repeats the pattern to N layers); "
                        "bf16 sizes (default medium)")
    p.add_argument("--layers", type=int, help="override the profile's layer count")
    p.add_argument("--optimizer", action="store_true",
                   help="checkpoint carries fp32 Adam state (7x the file in bf16, 4x in fp32)")
    p.add_argument("--source-dtype", choices=sorted(SOURCE_DTYPES), default="bf16",
                   help="dtype the checkpoint's weights are saved in (default bf16; fp32 is a separate cached file)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds, medians reported (default 3)")
    p.add_argument("--contenders", default="copy,dd,naive,streamconv",
                   help="comma-separated subset of copy, dd, naive, streamconv, bridge (default all but bridge; "
                        "streamconv also runs on cuda when torch sees a GPU; bridge is Megatron-Bridge's export, on "
                        f"{' and '.join(BRIDGE_EXPORT_PROFILES)}, with --bridge-python)")
    p.add_argument("--bridge-python", default=os.environ.get(harness.BRIDGE_PYTHON_ENV), metavar="PATH",
                   help="the Python of a Megatron-Bridge environment, for the bridge contender (default "
                        f"${harness.BRIDGE_PYTHON_ENV}; `bash benchmarks/setup_bridge.sh DIR` builds one: "
                        "DIR/bin/python)")
    p.add_argument("--dtype", type=dtype_list, default=[], metavar="LIST",
                   help=f"also run streamconv --dtype X for each X of LIST ({', '.join(harness.DTYPES)}), as "
                        "streamconv-as-X, on the CPU, on the .ckpt")
    p.add_argument("--memory-limit", type=byte_size, metavar="SIZE",
                   help="run every contender in a fresh memory cgroup capped at SIZE (e.g. 2GB, 1500MB, 2GiB; "
                        "the page cache counts); a run OOM-killed or failing under it is recorded, not fatal")
    p.add_argument("--page-cache", choices=["cold", "warm"], default="cold",
                   help="cold: sync and drop the page cache before every run (needs root; falls back to warm)")
    p.add_argument("--cache", type=Path, default=None,
                   help=f"where checkpoints are generated and reused (default ${'{'}STREAMCONV_BENCH_CACHE{'}'} "
                        "or ~/.cache/streamconv-bench); conversions write their scratch output there too")
    p.add_argument("--results", type=Path, default=harness.RESULTS, help="folder of JSON records and plots")
    p.add_argument("--compare", nargs="?", const="previous", metavar="RECORD",
                   help="print the change against RECORD (default: the previous record of the same workload)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--ci", action="store_true",
                   help="small profile; fail when streamconv's peak RSS or its time against copy exceed budgets")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="also run streamconv on the same model saved as a .nemo of N tensor-parallel ranks")
    p.add_argument("--distributed", type=int, nargs="?", const=2, metavar="TP",
                   help="also run copy, dd and streamconv on the same model saved as a megatron-core torch_dist "
                        "distributed checkpoint of TP tensor-parallel ranks (default 2); check that the two "
                        "conversions are byte-identical and time opening each (a dry run)")
    p.add_argument("--parts", type=int, nargs="?", const=3, metavar="N",
                   help="also run the N parts of one streamconv conversion (--part I/N) at once, on the .ckpt "
                        "(default 3); check their folder is byte-identical to the single run's and report the "
                        "part balance")
    p.add_argument("--scaling", metavar="L1,L2",
                   help="run copy and streamconv on the profile at two layer counts; check RSS flat, time linear")
    args = p.parse_args(argv)
    if args.ci:
        args.profile = "small"
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.distributed is not None and args.distributed < 1:
        p.error("--distributed takes a tensor-parallel size of at least 1")
    if args.parts is not None and (args.parts < 2 or args.scaling or args.profile in DIST_PROFILES):
        p.error("--parts takes N >= 2, on a GPT-SW3 profile, without --scaling")
    if args.parts is not None and "streamconv" not in args.contenders.split(","):
        p.error("--parts is measured against the streamconv contender: keep it in --contenders")
    return args


def byte_size(text: str) -> int:
    try:
        return parse_size(text)
    except ConversionError:
        raise argparse.ArgumentTypeError(f"{text!r}: a size such as 2GB, 1500MB or 2GiB") from None


def dtype_list(text: str) -> list[str]:
    """`fp16,fp32` -> ['fp16', 'fp32'] (each once, in order)."""
    dtypes = [d.strip() for d in text.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in harness.DTYPES]
    if bad or not dtypes:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of {', '.join(harness.DTYPES)}")
    return list(dict.fromkeys(dtypes))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cache = args.cache or default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    scratch = cache / "scratch"
    cold = args.page_cache == "cold"
    if cold and not harness.drop_page_cache():
        print("cannot drop the page cache (needs root): runs are warm")
        cold = False
    profile = PROFILES.get(args.profile)
    meta = {
        "started": harness.now(), "profile": args.profile, "optimizer": args.optimizer,
        "source_dtype": args.source_dtype,
        "page_cache": "cold" if cold else "warm", "rounds": args.rounds,
        "machine": harness.machine(cache), "torch": _torch_version(), "git": harness.git_state(),
        "load_average_at_start": os.getloadavg(),  # other work on the machine skews every figure
    }
    limit, meta["memory_limit"] = memory_limit(args.memory_limit)
    if args.profile in DIST_PROFILES:
        return llama_run(args, cache, scratch, cold, meta, limit)
    if args.scaling:
        return scaling(args, profile, cache, scratch, cold, meta, limit)

    src = ensure_checkpoint(profile, cache, args.layers, args.optimizer, args.source_dtype)
    model = profile.model(args.layers)
    nbytes = weight_bytes(model, args.source_dtype)
    names = [n.strip() for n in args.contenders.split(",")]
    skipped = {}
    available = psutil.virtual_memory().available
    if "naive" in names and os.path.getsize(src) > 0.8 * available:
        skipped["naive"] = (f"would load {os.path.getsize(src) / 1e9:.1f} GB into RAM, "
                            f"{available / 1e9:.1f} GB available")
        names.remove("naive")
    if "dd" in names and (why := harness.dd_refusal(src, scratch)):
        skipped["dd"] = why
        names.remove("dd")
    if harness.BRIDGE in names:
        skipped[harness.BRIDGE] = f"Megatron-Bridge's export runs on --profile {' or '.join(BRIDGE_EXPORT_PROFILES)}"
        names.remove(harness.BRIDGE)
    chosen = harness.contenders(model.vocab_size, _devices(), names, args.dtype)
    plain = [c for c in chosen if harness.plain_of(c.name) is None]  # what also runs on the .nemo and dist inputs
    meta.update({"layers": model.n_layer, "checkpoint": str(src), "file_bytes": os.path.getsize(src),
                 "weight_bytes": nbytes, "largest_rearranged_bytes": largest_rearranged(model, args.source_dtype),
                 "skipped": skipped})
    for name, why in skipped.items():
        print(f"{name} skipped: {why}")
    print(f"{profile.name}: {model.n_layer} layers, {nbytes / 1e9:.2f} GB of {args.source_dtype} weights, file "
          f"{meta['file_bytes'] / 1e9:.2f} GB, {args.rounds} rounds, page cache {meta['page_cache']}", flush=True)

    ci = ci_baseline(cache, scratch, cold, model, args.source_dtype) if args.ci else None
    jobs = [(c.name, c, src, nbytes) for c in chosen]
    if args.tp > 1:
        split = ensure_parallel(profile, cache, args.layers, args.tp, args.source_dtype)
        meta["parallel_checkpoint"] = str(split)
        jobs += [(f"{c.name}-tp{args.tp}", c, split, nbytes) for c in plain if c.name.startswith(harness.STREAMCONV)]
    split = None
    if args.parts:
        split = harness.parts_contender(model.vocab_size, args.parts)
        jobs.append((split.name, split, src, nbytes))
        meta["parts"] = {"count": args.parts, **part_balance(src, model.vocab_size, args.parts)}
    pairs: list[tuple[str, str]] = []  # (job on the .ckpt, the same on the distributed checkpoint)
    if args.distributed:
        dist = ensure_distributed(profile, cache, args.layers, args.distributed, args.optimizer, args.source_dtype)
        count, size = files_of(dist)
        meta["distributed"] = {"tp": args.distributed, "checkpoint": str(dist), "files": count, "file_bytes": size}
        print(f"distributed checkpoint: {args.distributed} TP ranks, {count} files, {size / 1e9:.2f} GB", flush=True)
        dist_jobs = [(f"{c.name}-dist", c, dist, nbytes) for c in plain if c.name in ("copy", "dd")
                     or c.name.startswith(harness.STREAMCONV)]
        jobs += dist_jobs
        pairs = [(key.removesuffix("-dist"), key) for key, c, *_ in dist_jobs if c.name.startswith(harness.STREAMCONV)]
    digest = {k for pair in pairs for k in pair} | ({harness.STREAMCONV, split.name} if split else set())
    runs = harness.run_rounds(jobs, scratch, args.rounds, cold, digest=digest, limit=limit)
    dist_failures = distributed_checks(meta, runs, pairs, src, model.vocab_size, args.rounds, cold) if pairs else []
    if split:
        differences = harness.output_differences(runs, harness.STREAMCONV, split.name)
        meta["parts"].update({"identical": not differences, "differences": differences})
        dist_failures += [f"--parts: {d}" for d in differences]
    record = harness.make_record({**meta, "load_average_at_end": os.getloadavg()}, runs)
    failures = []
    if ci is not None:
        failures = ci_failures(record, ci)
        record["ci"] = {**ci, "failures": failures}
    failures += dist_failures
    path = harness.write_record(record, args.results)

    print()
    print(harness.table(record))
    if "distributed" in record:
        print("\n" + "\n".join(distributed_report(record)))
    if "parts" in record:
        print("\n" + "\n".join(parts_report(record)))
    print(f"\nrecord: {path}")
    if not args.no_plots:
        for plot in _plots(record, path):
            print(f"plot: {plot}")
    _print_comparison(args.compare, args.results, record, path)
    if failures:
        print("\nbenchmark CI FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    if ci is not None:
        print(f"\nbenchmark CI passed: streamconv peak RSS {record['summary']['streamconv']['peak_rss_max'] / 1e9:.3f}"
              f" GB <= budget {ci['rss_budget'] / 1e9:.3f} GB; streamconv/copy "
              f"{record['ratios']['streamconv/copy']['wall']:.2f} <= {CI_RATIO_CEILING}")
    return 0


def llama_run(args: argparse.Namespace, cache: Path, scratch: Path, cold: bool, meta: dict,
              limit: cgroup.Limit | None) -> int:
    """copy, dd and streamconv (and its casts) on a synthetic distributed checkpoint (the Llama-shaped one, as
    NeMo or Megatron-Bridge saves it, the Qwen3-MoE one or the Nemotron-H one), interleaved; on Bridge's run
    folders also Megatron-Bridge's own export (`bridge`), its tensors checked against streamconv's every round."""
    if args.scaling or args.ci or args.distributed or args.optimizer or args.source_dtype != "bf16":
        raise SystemExit(f"--profile {args.profile} runs copy, dd and streamconv (--dtype, --tp, --layers, "
                         "--memory-limit); not --scaling, --ci, --distributed, --optimizer or --source-dtype")
    if args.profile == MOE_PROFILE:
        if args.tp > 1:
            raise SystemExit(f"--profile {MOE_PROFILE} is saved with expert parallelism {MOE_EP} and TP 1: no --tp")
        model, parallel = Qwen3MoeModel(n_layer=args.layers or 2), {"tp": 1, "ep": MOE_EP}
        src = ensure_qwen3moe(cache, model, MOE_EP)
    elif args.profile == HYBRID_PROFILE:
        model, parallel = NemotronHModel(pattern=pattern_of(args.layers)), {"tp": args.tp if args.tp > 1 else 2}
        src = ensure_nemotronh(cache, model, parallel["tp"])
    else:
        model, parallel = LlamaModel(n_layer=args.layers or 2), {"tp": args.tp if args.tp > 1 else 2}
        src = ensure_llama(cache, model, parallel["tp"], args.profile == BRIDGE_PROFILE)
    bridge = args.profile != LLAMA_PROFILE  # a Megatron-Bridge run folder: converted with no flag
    names = [n.strip() for n in args.contenders.split(",") if n.strip() != "naive"]  # (the naive one is GPT-SW3's)
    skipped = {}
    if "dd" in names and (why := harness.dd_refusal(src, scratch)):
        print(f"dd skipped: {why}")
        names.remove("dd")
    exporter = bridge_exporter(args, cache, model, skipped) if harness.BRIDGE in names else None
    count, size = files_of(src)
    meta.update({"layers": model.n_layer, "checkpoint": str(src), "file_bytes": size, "files": count, **parallel,
                 "weight_bytes": model.weight_bytes(), "largest_rearranged_bytes": 0, "skipped": skipped})
    ranks = ", ".join(f"{n} {axis.upper()} ranks" for axis, n in parallel.items() if n > 1)
    print(f"{args.profile}: {model.n_layer} layers, {model.weight_bytes() / 1e9:.2f} GB of bf16 weights, {ranks}, "
          f"{count} files, {size / 1e9:.2f} GB, {args.rounds} rounds, page cache {meta['page_cache']}", flush=True)
    chosen = harness.contenders(None if bridge else model.vocab_size, ["cpu"], names, args.dtype)  # (bridge: no flag)
    compared = ()
    if exporter is not None:
        meta[harness.BRIDGE] = exporter[1]
        chosen.append(exporter[0])
        compared = (harness.STREAMCONV, harness.BRIDGE) if harness.STREAMCONV in names else ()
    runs = harness.run_rounds([(c.name, c, src, model.weight_bytes()) for c in chosen], scratch, args.rounds,
                              cold, limit=limit, tensors=compared)
    failures = bridge_checks(meta, runs) if compared else []
    record = harness.make_record({**meta, "load_average_at_end": os.getloadavg()}, runs)
    path = harness.write_record(record, args.results)
    print()
    print(harness.table(record))
    if harness.BRIDGE in record:
        print("\n" + "\n".join(bridge_report(record)))
    print(f"\nrecord: {path}")
    if failures:
        print("\nbenchmark FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def bridge_exporter(args: argparse.Namespace, cache: Path, model: SyntheticModel, skipped: dict
                    ) -> tuple[harness.Contender, dict] | None:
    """The `bridge` contender on this workload and what the record says of it (its Python, versions and Hugging
    Face reference, made once beside the checkpoint); None, with the reason printed and in `skipped`, where it
    cannot run: another workload, no Megatron-Bridge environment, or one that does not import."""
    if args.profile not in BRIDGE_EXPORT_PROFILES:
        versions, why = None, (f"Megatron-Bridge's export runs on --profile {' or '.join(BRIDGE_EXPORT_PROFILES)}, "
                               f"not {args.profile}")
    else:
        if args.bridge_python:
            print(f"checking the Megatron-Bridge environment of {args.bridge_python} (imports it)", flush=True)
        versions, why = harness.bridge_check(args.bridge_python)
    if why:
        print(f"{harness.BRIDGE} skipped: {why}", flush=True)
        skipped[harness.BRIDGE] = why
        return None
    reference = ensure_hf_reference(cache / f"{args.profile}-L{model.n_layer}.hf-reference", model)
    return (harness.bridge_contender(args.bridge_python, reference),
            {"python": args.bridge_python, "versions": versions, "hf_reference": str(reference)})


def bridge_checks(meta: dict, runs: dict) -> list[str]:
    """Compare streamconv's output with Megatron-Bridge's export, tensor by tensor, every round, into
    `meta["bridge"]`, and keep only a fingerprint of each run's tensors in the record. Returns the failures: any
    difference."""
    differences = harness.round_tensor_differences(runs, harness.STREAMCONV, harness.BRIDGE)
    first = {k: runs[k][0] for k in (harness.STREAMCONV, harness.BRIDGE)}
    meta[harness.BRIDGE].update({
        "identical": not differences, "differences": differences,
        "tensors": len(first[harness.STREAMCONV].get("tensors", {})),
        "other_files": {k: run.get("other_files", []) for k, run in first.items()}})
    for run in (r for k in first for r in runs[k] if "tensors" in r):
        run["tensors_sha256"] = hashlib.sha256(json.dumps(run.pop("tensors"), sort_keys=True).encode()).hexdigest()
    return [f"{harness.STREAMCONV} and {harness.BRIDGE}: {d}" for d in differences]


def bridge_report(record: dict) -> list[str]:
    """Lines on Megatron-Bridge's export: its environment, and whether its tensors are streamconv's."""
    b = record[harness.BRIDGE]
    v = b["versions"]
    lines = [f"{harness.BRIDGE}: Megatron-Bridge {v['megatron-bridge']} (megatron-core {v['megatron-core']}, torch "
             f"{v['torch']}, transformers {v['transformers']}, Python {v['python']}: {b['python']}), Hugging Face "
             f"reference {b['hf_reference']}"]
    both = f"{harness.STREAMCONV}'s and {harness.BRIDGE}'s outputs"
    if "identical" in b:
        other = "; ".join(f"{k}: {', '.join(files) or 'none'}" for k, files in b["other_files"].items())
        lines.append(f"{both}: the same {b['tensors']} tensors (names, dtypes, shapes, bytes) in every round; other "
                     f"files ({other})" if b["identical"] else f"{both} DIFFER:\n  " + "\n  ".join(b["differences"]))
    return lines


def memory_limit(size: int | None) -> tuple[cgroup.Limit | None, dict | None]:
    """The cgroup limit every run gets and what the record says of it; where no memory cgroup is writable, one
    message and no limit (the record says so too)."""
    if size is None:
        return None, None
    limit, note = cgroup.prepare(size)
    if limit is None:
        print(f"--memory-limit {size / 1e9:.3f} GB NOT applied, runs are unlimited: {note}", flush=True)
        return None, {"bytes": size, "applied": False, "note": note}
    print(f"memory limit {size / 1e9:.3f} GB per run: {note}", flush=True)
    return limit, {"bytes": size, "applied": True, "note": note, "cgroup_version": limit.version,
                   "parent": str(limit.parent)}


def distributed_checks(meta: dict, runs: dict, pairs: list[tuple[str, str]], src: Path, vocab_size: int,
                       rounds: int, cold: bool) -> list[str]:
    """Compare each streamconv conversion of the distributed checkpoint with its conversion of the `.ckpt`
    (every output file, every round) and time a dry run on each; the results go into `meta["distributed"]`.
    Returns the failures: any difference."""
    dist = Path(meta["distributed"]["checkpoint"])
    differences = [d for a, b in pairs for d in harness.output_differences(runs, a, b)]
    opened = {"ckpt": [], "dist": []}
    for _ in range(rounds):
        for name, path in (("ckpt", src), ("dist", dist)):
            opened[name].append(harness.open_seconds(path, vocab_size, cold))
    meta["distributed"].update({
        "identical": not differences, "differences": differences,
        "output_files": sorted(runs[pairs[0][0]][0].get("outputs", {})),
        "open": {name: {"seconds": harness.median([o["seconds"] for o in runs_]),
                        "per_round": [o["seconds"] for o in runs_],
                        "peak_rss": harness.median([o["peak_rss"] for o in runs_])} for name, runs_ in opened.items()},
    })
    return [f"distributed checkpoint: {d}" for d in differences]


def distributed_report(record: dict) -> list[str]:
    """Lines on the distributed checkpoint: same output as the .ckpt, and how long each takes to open."""
    d = record["distributed"]
    lines = [f"distributed checkpoint {d['checkpoint']}: TP={d['tp']}, {d['files']} files, "
             f"{d['file_bytes'] / 1e9:.2f} GB"]
    if "identical" in d:
        same = f"byte-identical to the .ckpt's in every round ({', '.join(d['output_files'])})" if d["identical"] \
            else "DIFFERENT from the .ckpt's:\n  " + "\n  ".join(d["differences"])
        lines.append(f"streamconv's conversions of it: {same}")
        o = d["open"]
        lines.append(f"opening (dry run, convert() start to plan, median): .ckpt {o['ckpt']['seconds']:.2f} s, "
                     f"distributed {o['dist']['seconds']:.2f} s (per round: "
                     f"{', '.join(f'{x:.2f}' for x in o['dist']['per_round'])})")
    return lines


def part_balance(src: Path, vocab_size: int, count: int) -> dict:
    """How `count` parts share the conversion of `src`: tensor bytes and tensors per part (from a dry run's plan,
    cut as `--part` cuts it)."""
    from streamconv import parts
    from streamconv.converter import convert

    plan = convert(src, None, dry_run=True, vocab_size=vocab_size).plan
    shares = [parts.share(plan, i, count) for i in range(count)]
    sizes = [s.total_size for s in shares]
    return {"bytes": sizes, "tensors": [len(s.tensors) for s in shares], "largest_tensor_bytes":
            max(t.nbytes for t in plan.tensors), "max_over_min": max(sizes) / min(sizes) if min(sizes) else None}


def parts_report(record: dict) -> list[str]:
    """Lines on the split conversion: the part balance, and whether its folder is the single run's."""
    p, name = record["parts"], f"{harness.STREAMCONV}-parts{record['parts']['count']}"
    balance = "inf" if p["max_over_min"] is None else f"{p['max_over_min']:.3f}"
    lines = [f"{name}: {p['count']} parts at once, tensor bytes per part "
             f"{' / '.join(f'{b / 1e9:.3f}' for b in p['bytes'])} GB (max/min {balance}; largest tensor "
             f"{p['largest_tensor_bytes'] / 1e9:.3f} GB), tensors per part {' / '.join(map(str, p['tensors']))}"]
    if "identical" in p:
        lines.append(f"{name}'s folder: byte-identical to the single run's in every round" if p["identical"] else
                     f"{name}'s folder DIFFERS from the single run's:\n  " + "\n  ".join(p["differences"]))
    return lines


def ci_baseline(cache: Path, scratch: Path, cold: bool, model, dtype: str) -> dict:
    """The memory budget: a tiny conversion's peak RSS (interpreter, torch, imports) + the largest tensor's share."""
    tiny = ensure_checkpoint(TINY, cache)
    streamconv = harness.contenders(TINY.vocab_size, ["cpu"], ["streamconv"])[0]
    baseline = min(harness.run_once(streamconv, tiny, scratch, 1, cold)["peak_rss"] for _ in range(2))
    largest = largest_rearranged(model, dtype)
    budget = baseline + RSS_TENSORS * largest + RSS_SLACK
    print(f"CI budget: peak RSS <= {baseline / 1e9:.3f} GB baseline + {RSS_TENSORS} x {largest / 1e9:.3f} GB "
          f"largest rearranged tensor + {RSS_SLACK // MiB} MiB = {budget / 1e9:.3f} GB; "
          f"streamconv/copy <= {CI_RATIO_CEILING}", flush=True)
    return {"baseline_rss": baseline, "rss_budget": budget, "ratio_ceiling": CI_RATIO_CEILING}


def ci_failures(record: dict, ci: dict) -> list[str]:
    """Human-readable reasons the CI benchmark fails; empty when it passes."""
    failures = []
    summary = record["summary"]["streamconv"]
    peak = summary.get("peak_rss_max", 0)
    if summary["converted"] < summary["runs"]:
        failures.append(f"streamconv did not convert every round: {summary['status']}")
    if peak > ci["rss_budget"]:
        failures.append(
            f"streamconv peak RSS {peak / 1e9:.3f} GB exceeds the budget {ci['rss_budget'] / 1e9:.3f} GB "
            f"(baseline {ci['baseline_rss'] / 1e9:.3f} GB + {RSS_TENSORS} x largest rearranged tensor "
            f"{record['largest_rearranged_bytes'] / 1e9:.3f} GB + {RSS_SLACK // MiB} MiB): memory is no longer "
            "bounded by the largest tensor")
    ratio = record["ratios"].get("streamconv/copy", {}).get("wall")
    if ratio is not None and ratio > ci["ratio_ceiling"]:
        per_round = ", ".join(f"{x:.2f}" for x in record["ratios"]["streamconv/copy"]["per_round"])
        failures.append(f"streamconv/copy wall-time ratio {ratio:.2f} exceeds the ceiling {ci['ratio_ceiling']} "
                        f"(per round: {per_round}): streamconv got slower against the I/O floor")
    return failures


def scaling(args: argparse.Namespace, profile, cache: Path, scratch: Path, cold: bool, meta: dict,
            limit: cgroup.Limit | None) -> int:
    """Same profile at two layer counts: peak RSS must stay flat, time grow at most linearly with bytes."""
    try:
        small, big = sorted(int(x) for x in args.scaling.split(","))
    except ValueError:
        raise SystemExit("--scaling takes two layer counts, e.g. --scaling 1,4") from None
    jobs, sizes = [], {}
    for layers in (small, big):
        src = ensure_checkpoint(profile, cache, layers, args.optimizer, args.source_dtype)
        sizes[layers] = weight_bytes(profile.model(layers), args.source_dtype)
        for c in harness.contenders(profile.vocab_size, ["cpu"], ["copy", "streamconv"]):
            jobs.append((f"{c.name}@L{layers}", c, src, sizes[layers]))
    print(f"scaling {profile.name}: {small} vs {big} layers ({sizes[small] / 1e9:.2f} vs {sizes[big] / 1e9:.2f} GB), "
          f"{args.rounds} rounds, page cache {meta['page_cache']}", flush=True)
    runs = harness.run_rounds(jobs, scratch, args.rounds, cold, limit=limit)
    record = harness.make_record({**meta, "mode": "scaling", "layers": f"{small}-{big}",
                                  "weight_bytes": {str(small): sizes[small], str(big): sizes[big]}}, runs)
    pair = [record["summary"][f"streamconv@L{layers}"] for layers in (small, big)]
    if all("wall" in s for s in pair):
        lines, ok = scaling_verdict(*pair, sizes[small], sizes[big])
    else:
        lines, ok = [f"no verdict: streamconv {pair[0]['status']} at {small} layers, "
                     f"{pair[1]['status']} at {big}"], False
    record["scaling"] = {"ok": ok, "report": lines}
    path = harness.write_record(record, args.results)
    print()
    print(harness.table(record))
    print("\n" + "\n".join(lines))
    print(f"\nrecord: {path}")
    return 0 if ok else 1


def scaling_verdict(small: dict, big: dict, small_bytes: int, big_bytes: int,
                    rss_tolerance: float = 0.10, time_tolerance: float = 0.10) -> tuple[list[str], bool]:
    """Compare two sizes' medians: RSS growth within `rss_tolerance`, time ratio no worse than the byte ratio."""
    rss_growth = big["peak_rss"] / small["peak_rss"] - 1
    byte_ratio, time_ratio = big_bytes / small_bytes, big["wall"] / small["wall"]
    per_gb = (big["wall"] - small["wall"]) / ((big_bytes - small_bytes) / 1e9)
    fixed = small["wall"] - small_bytes / 1e9 * per_gb
    rss_ok = rss_growth <= rss_tolerance
    time_ok = time_ratio <= byte_ratio * (1 + time_tolerance)
    lines = [
        f"peak RSS {small['peak_rss'] / 1e9:.3f} -> {big['peak_rss'] / 1e9:.3f} GB ({rss_growth * 100:+.1f}%) for "
        f"{byte_ratio:.2f}x the bytes: {'flat' if rss_ok else 'NOT flat'} (tolerance {rss_tolerance * 100:.0f}%)",
        f"wall {small['wall']:.2f} -> {big['wall']:.2f} s ({time_ratio:.2f}x): {per_gb:.2f} s per extra GB, "
        f"{fixed:.2f} s fixed; {'linear' if time_ok else 'WORSE than linear'} "
        f"(time ratio <= byte ratio {byte_ratio:.2f} x {1 + time_tolerance:.2f})",
    ]
    return lines, rss_ok and time_ok


def _devices() -> list[str]:
    import torch

    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def _torch_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return None


def _plots(record: dict, path: Path) -> list[Path]:
    from benchmarks.plots import plot

    return plot(record, path.with_suffix(""))


def _print_comparison(compare: str | None, results: Path, record: dict, path: Path) -> None:
    if compare is None:
        return
    old = harness.previous_record(results, record, exclude=path) if compare == "previous" else \
        json.loads(Path(compare).read_text())
    print()
    print("\n".join(harness.compare(old, record)) if old else "no previous record of this workload to compare with")


if __name__ == "__main__":
    sys.exit(main())
