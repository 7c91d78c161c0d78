"""Command line: `streamconv --checkpoint-path SRC --save-path DST` (and `--demo`)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import TextIO

from streamconv._version import version
from streamconv.errors import ConversionError, one_line
from streamconv.families import FAMILIES

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="streamconv",
        description="Convert a NeMo or Megatron checkpoint of a GPT-SW3, Llama-family or other supported model (the "
        "families are --family's choices) into a Hugging Face model folder of sharded safetensors, one tensor at a "
        "time, in memory bounded by the largest tensor.",
    )
    p.add_argument("--checkpoint-path", "--checkpoint_path", dest="checkpoint_path", metavar="SRC",
                   help="the checkpoint: a NeMo/Lightning .ckpt file, a .nemo archive (plain or gzip) or extracted "
                   ".nemo folder, a folder of per-rank .ckpt files (mp_rank_XX/, tp_rank_XX_pp_rank_YYY/), or a "
                   "megatron-core distributed checkpoint (torch_dist or zarr: a NeMo 1.x, NeMo 2.0, Megatron-LM or "
                   "Megatron-Bridge folder, or a bare one)")
    p.add_argument("--save-path", "--save_path", dest="save_path", metavar="DST",
                   help="output folder (config.json + safetensors shards)")
    p.add_argument("--shard-size", default="5GB",
                   help="largest shard: 5GB / 500MB (powers of ten), 4GiB / 512MiB, or bytes (default 5GB)")
    p.add_argument("--device", default="cpu", help="where tensors are rearranged: cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="output dtype; auto keeps the checkpoint's (default)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="true vocabulary size; embedding rows past it are padding (default: the tokenizer's size "
                   "with sentencepiece installed, else GPT-SW3's 64000; a Llama model needs one of the two)")
    p.add_argument("--tokenizer", metavar="MODEL", default=None,
                   help="SentencePiece model to ship as spiece.model (default: the one inside a .nemo)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads, for checkpoints without hyper_parameters.cfg (overrides the cfg)")
    p.add_argument("--family", default=None, choices=list(FAMILIES),
                   help="model family, when the cfg and tensors do not show it (default: found from them)")
    p.add_argument("--part", metavar="I/N", default=None,
                   help="convert only part I of N (0 <= I < N) into a staging folder beside the save path, shared by "
                   "all N parts; the last part to finish publishes the folder. 'slurm' reads I and N from a job "
                   "array task's variables")
    p.add_argument("--ray", metavar="N", type=int, default=None,
                   help="run the N parts as Ray tasks, on the cluster RAY_ADDRESS names, else on a local Ray "
                   "(pip install \"streamconv[ray]\"); the save path must be on a filesystem all nodes share")
    p.add_argument("--print-checkpoint-structure", action="store_true",
                   help="print every output tensor with its shape, dtype and source; without --save-path, "
                   "only that")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (tensors, shards, bytes, predicted memory) and write nothing")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output folder that holds only a model folder's files (config.json, "
                   "safetensors, tokenizer files, README.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, only errors and the summary line")
    p.add_argument("--demo", action="store_true",
                   help="build a small GPT-SW3-style checkpoint, convert it and check the logits")
    p.add_argument("--verify", action="store_true",
                   help="instead of converting, check that SAVE_PATH is exactly the conversion of SRC (exit 1 if not)")
    p.add_argument("--debug", action="store_true",
                   help="show tracebacks, and where the reader, arranger and writer threads spent their time")
    p.add_argument("--version", action="store_true", help="print streamconv's version and exit")
    return p


def say(line: str, file: TextIO | None = None) -> None:
    """Print one line: a path or a checkpoint's key in it may hold a newline or a terminal escape, shown escaped."""
    print(one_line(line), file=file)


def print_structure(plan) -> None:
    for spec in plan.tensors:
        shape = "x".join(map(str, spec.recipe.shape))
        dtype = str(spec.dtype).removeprefix("torch.")
        more = f" and {len(spec.recipe.stacked)} more" if spec.recipe.stacked else ""
        say(f"{spec.name:<40} {shape:>14} {dtype:<9} <- {spec.recipe.source}{more} ({spec.recipe.arrangement.name})")


def print_plan(result) -> None:
    plan = result.plan
    for shard in plan.shards:
        print(f"{shard.filename}: {len(shard.tensors)} tensors, {shard.file_size} bytes")
    if plan.is_sharded:
        print("model.safetensors.index.json")
    print("config.json")


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup runs as for Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def debug_log() -> None:
    """streamconv's debug messages (the pipeline's stage times) on stderr, one line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("streamconv: %(message)s"))
    logger = logging.getLogger("streamconv")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)


def run_verify(args: argparse.Namespace) -> int:
    from streamconv.verification import verify

    problems = verify(args.checkpoint_path, args.save_path, dtype=args.dtype, vocab_size=args.vocab_size,
                      num_heads=args.num_heads, family=args.family, tokenizer_path=args.tokenizer)
    for problem in problems:
        say(f"verify: {problem}")
    if problems:
        say(f"verify: {len(problems)} problem(s): {args.save_path} is not the conversion of {args.checkpoint_path}")
        return 1
    say(f"verify: OK: {args.save_path} is exactly the conversion of {args.checkpoint_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if args.debug:
        debug_log()
    if args.version:
        print(f"streamconv {version()}")
        return 0
    structure_only = args.print_checkpoint_structure and not args.save_path and not args.verify
    try:
        if args.demo:
            if args.checkpoint_path:
                raise ConversionError("--demo builds its own checkpoint; drop --checkpoint-path, or drop --demo to "
                                      f"convert {args.checkpoint_path}")
            from streamconv.demo import run_demo

            return run_demo(args.save_path, device=args.device, shard_size=args.shard_size,
                            overwrite=args.overwrite, quiet=args.quiet)
        if not args.checkpoint_path or not (args.save_path or structure_only):
            raise ConversionError("both --checkpoint-path and --save-path are required (or try --demo)")
        if args.verify:
            return run_verify(args)
        from streamconv.converter import convert

        result = convert(
            args.checkpoint_path,
            args.save_path,
            device=args.device,
            shard_size=args.shard_size,
            dtype=args.dtype,
            vocab_size=args.vocab_size,
            num_heads=args.num_heads,
            family=args.family,
            tokenizer_path=args.tokenizer,
            overwrite=args.overwrite,
            dry_run=args.dry_run or structure_only,
            progress=not args.quiet,
            before_write=print_structure if args.print_checkpoint_structure else None,
            part=args.part,
            ray=args.ray,
        )
        if structure_only:
            return 0
        if args.dry_run:
            print_plan(result)
        say(result.summary())
        return 0
    except ConversionError as exc:
        if args.debug:
            raise
        say(f"streamconv: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # the machine, not the input: a permission, a failing disk, a file gone
        if args.debug:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        say(f"streamconv: error: {exc.strerror or exc}{where}; nothing was written: check the paths and the "
            "disk, then run again (--debug shows where it happened)", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("streamconv: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("streamconv: terminated; nothing was written", file=sys.stderr)
        return 143


def run() -> None:
    """The `streamconv` command: main(), then exit without tearing the interpreter down.

    By then the output is fsynced and renamed into place and every file is closed; unloading the modules
    (torch's, after a cast, a GPU run or --demo) only costs time.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
