"""`convert()`: open lazily, plan from metadata, then stream into a temporary folder renamed into place."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from streamconv import parts, tokenizer
from streamconv.errors import ConversionError
from streamconv.formats.safetensors import DTYPE_NAMES
from streamconv.hf_folder import finish, read_tokenizer, write_extras
from streamconv.options import resolve_device, resolve_dtype
from streamconv.output import (
    check_save_path,
    claimed,
    make_folders,
    only_model_files,
    publish,
    staging_folder,
)
from streamconv.pipeline import stream, working_memory
from streamconv.plan import Plan, parse_size
from streamconv.planning import build_plan
from streamconv.process import peak_rss, progress_bar
from streamconv.ray_parts import convert_with_ray
from streamconv.sources import Checkpoint, open_checkpoint

if TYPE_CHECKING:
    import torch


@dataclass
class ConversionResult:
    """What a conversion did; `summary()` is the line the CLI prints at the end."""

    save_path: str | None  # None: a dry run without one
    plan: Plan
    config: dict
    working_memory: int  # predicted bytes on top of the interpreter
    dry_run: bool
    seconds: float = 0.0  # the whole call, from opening the checkpoint to the rename
    stream_seconds: float = 0.0  # moving tensor bytes only
    peak_rss: int = 0  # bytes, ru_maxrss of this process
    note: str = ""  # how the input was read, when worth saying (a gzip .nemo was extracted)
    part: tuple[int, int] | None = None  # (I, N): this was part I of N (`plan` is its share)
    streamed: bool = True  # False: a part found its share done before
    outcome: str = ""  # where the output went, when not simply to the save path (a part)
    published: bool = False  # a part: it published the folder

    @property
    def tensors(self) -> int:
        return len(self.plan.tensors)

    @property
    def shards(self) -> int:
        return len(self.plan.shards)

    @property
    def bytes(self) -> int:
        return self.plan.total_size

    def summary(self) -> str:
        label = f"part {self.part[0]}/{self.part[1]}: " if self.part is not None else ""
        destination = self.outcome or f"-> {self.save_path}"
        if self.dry_run:
            return (
                f"dry run: {label}{self.tensors} tensors -> {self.shards} shard(s), {_size(self.bytes)}; "
                f"predicted working memory {_size(self.working_memory)} plus the Python baseline; "
                "nothing written"
            )
        if not self.streamed:
            return f"{label}done before {destination}"
        rate = self.bytes / self.stream_seconds / 1e9 if self.stream_seconds > 0 else float("inf")
        return (
            f"{label}converted {self.tensors} tensors into {self.shards} shard(s), {_size(self.bytes)} in "
            f"{self.seconds:.2f} s (streaming {self.stream_seconds:.2f} s, {rate:.2f} GB/s), "
            f"peak RSS {_size(self.peak_rss)} {destination}" + (f"; {self.note}" if self.note else "")
        )


def _size(n: int) -> str:
    """Bytes in decimal units, as the shard sizes are given: '2.624 GB', '18.0 MB', '640 B'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f} GB" if unit == "GB" else f"{n / scale:.1f} {unit}"
    return f"{n} B"


def convert(
    checkpoint_path: str | os.PathLike[str],
    save_path: str | os.PathLike[str] | None,
    *,
    device: str | torch.device = "cpu",
    shard_size: str | int = "5GB",
    dtype: str | torch.dtype | None = None,
    vocab_size: int | None = None,
    num_heads: int | None = None,
    family: str | None = None,
    tokenizer_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: bool = False,
    before_write: Callable[[Plan], None] | None = None,
    part: str | tuple[int, int] | None = None,
    ray: int | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> ConversionResult:
    """Convert a NeMo or Megatron checkpoint of a GPT-SW3 or Llama-style model into a Hugging Face folder of sharded
    safetensors (GPT-2 or Llama; `family`, 'gpt-sw3' or 'llama', forces one, else the checkpoint shows which).

    The tokenizer is the SentencePiece model at `tokenizer_path`, else the one a `.nemo` ships; without
    `vocab_size`, the vocabulary is its size (with sentencepiece installed), else GPT-SW3's 64000.
    Raises ConversionError, before anything is written, for any problem with the input or arguments.
    `before_write(plan)` is called once the plan is known (the CLI prints the structure with it).
    torch is imported only for `device` cuda or a `dtype` that casts. A dry run needs no `save_path`.
    The save path is checked (see output.check_save_path) and locked before anything is read.
    `part` ('I/N', (I, N) or 'slurm') converts only part I of N of the conversion, into a staging folder all
    parts share; the part that finds every part done publishes the folder (see streamconv.parts). `ray` runs
    that many parts as Ray tasks (see streamconv.ray_parts). `on_bytes(n)` is told of the bytes as they are written.
    """
    if ray is not None:
        if part is not None or dry_run or save_path is None:
            raise ConversionError("--ray runs every part itself into a save path: give --save-path, drop --part "
                                  "and --dry-run")
        return convert_with_ray(convert, ray, os.fspath(checkpoint_path), os.fspath(save_path), progress, device=device,
                                shard_size=shard_size, dtype=dtype, vocab_size=vocab_size, num_heads=num_heads,
                                family=family, tokenizer_path=tokenizer_path, overwrite=overwrite)
    started = time.perf_counter()
    if save_path is None and not dry_run:
        raise ConversionError("a save path is needed to convert (only a dry run goes without)")
    save_path = os.fspath(save_path) if save_path is not None else None
    dev = resolve_device(device)
    limit = parse_size(shard_size)
    out_dtype = resolve_dtype(dtype)
    inputs = [os.fspath(p) for p in (checkpoint_path, tokenizer_path) if p is not None]
    parent = os.path.dirname(os.path.realpath(save_path)) if save_path is not None else ""
    index, count = parts.parse_part(part) if part is not None else (0, 1)
    with contextlib.ExitStack() as stack:
        if part is None:
            target = None if dry_run else stack.enter_context(claimed(save_path, overwrite, inputs))
        elif save_path is not None:  # parts lock the save path only to publish; a published one is checked later
            target = check_save_path(save_path, True, inputs)
        checkpoint, plan, config, notes = _open_and_plan(stack, checkpoint_path, tokenizer_path, parent, progress,
                                                         limit, out_dtype, vocab_size, num_heads, family)
        mine = parts.share(plan, index, count) if part is not None else plan
        result = ConversionResult(save_path, mine, config, working_memory(mine, checkpoint), dry_run,
                                  part=(index, count) if part is not None else None)
        if before_write is not None:
            before_write(mine)
        if dry_run:
            result.seconds = time.perf_counter() - started
            result.peak_rss = peak_rss()
            return result
        if part is not None:
            short = {name: key for key, name in DTYPE_NAMES.items()}
            fields = {"parts": count, "--dtype": short[out_dtype] if out_dtype else "auto", "--shard-size": limit,
                      "--vocab-size": vocab_size, "--num-heads": num_heads, "--family": family,
                      "--overwrite": overwrite}
            _convert_part(result, checkpoint, plan, notes, fields, target, inputs, dev, progress, on_bytes)
            result.seconds = time.perf_counter() - started
            result.peak_rss = peak_rss()
            result.note = "; ".join(notes)
            return result

        needed = plan.file_bytes + _tokenizer_bytes(checkpoint)
        _check_free_space(parent, needed, save_path)
        try:
            staging = staging_folder(target)
        except FileNotFoundError:
            raise _deleted(parent, save_path) from None
        checked = None
        try:
            checked = write_extras(staging, checkpoint, plan, config, notes)
            result.stream_seconds = stream_into(staging, plan, checkpoint, dev, progress, on_bytes)
            finish(staging, plan, checked, notes)
            publish(staging, target, save_path, overwrite)
        except OSError as exc:
            raise _write_error(exc, save_path, staging, needed) from None
        finally:
            if checked is not None:
                checked.stop()
            shutil.rmtree(staging, ignore_errors=True)
        result.seconds = time.perf_counter() - started
        result.peak_rss = peak_rss()
        result.note = "; ".join(notes)
        return result


def _convert_part(result: ConversionResult, checkpoint: Checkpoint, plan: Plan, notes: list[str],
                  fields: dict, target: str, inputs: list[str], device: str, progress: bool,
                  on_bytes: Callable[[int], None] | None) -> None:
    """Part I of N: its share into the shared staging folder, then, if every part is done, publish (once)."""
    index, count = result.part
    save_path = result.save_path
    digests = [checkpoint.tokenizer or b""] + [name.encode() + data for name, data in
                                               sorted(checkpoint.tokenizer_files.items())]
    parent = os.path.dirname(target)
    identity = parts.identity(fields, plan, result.config, digests, inputs)
    made = make_folders(parent)
    try:
        already = parts.staged(target, index, count, identity)
        if already is None or not (already.published or already.done(index)):  # it will stream, as a single run
            check_save_path(save_path, fields["--overwrite"], inputs)
            _check_free_space(parent, parts.written_bytes(result.plan) + _tokenizer_bytes(checkpoint), save_path)
        staged = parts.join(target, index, count, identity)
    except BaseException:
        for folder in made:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise
    try:
        if staged.published:
            if not staged.still_published(target):
                raise ConversionError(f"{staged.label}: this conversion was published to {save_path}, which was "
                                      f"removed or replaced since; remove {staged.folder} to convert again")
            result.streamed = False
            result.outcome = f"-> {save_path} (all {count} parts were done and published before)"
            return
        if staged.done(index):
            result.streamed = False
        else:
            try:
                result.stream_seconds = stream_into(staged.model, result.plan, checkpoint, device, progress, on_bytes)
                staged.mark_done()
            except OSError as exc:
                staged.check_joined()
                raise _write_error(exc, save_path, os.path.join(staged.folder, "model"),
                                   parts.written_bytes(result.plan)) from None
        missing = staged.missing()
        if missing:
            waiting = ", ".join(map(str, missing[:8])) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            result.outcome = f"-> {staged.folder} (waiting for part(s) {waiting} of {count})"
            return
        with staged.publishing() as holder:
            if holder is not None:
                result.outcome = (f"-> {staged.folder} (all {count} parts done; {holder} publishes it: if that process "
                                  f"is gone, remove {staged.claim} and run any part again)")
                return
            try:
                kept = _publish_parts(staged, plan, checkpoint, result.config, notes, save_path, fields["--overwrite"],
                                      inputs)
            except ConversionError as exc:
                raise ConversionError(f"all {count} parts are done, but {save_path} was not published: {exc}; "
                                      "then run any part again to publish it") from None
        result.published = True
        result.outcome = f"-> {save_path} (all {count} parts done{kept})"
    finally:
        staged.close()


def _publish_parts(staged: parts.Staged, plan: Plan, checkpoint: Checkpoint, config: dict, notes: list[str],
                   save_path: str, overwrite: bool, inputs: list[str]) -> str:
    """Index, config and tokenizer into the staged folder, then the single run's swap under its lock; returns
    what the summary must add.

    The staged folder's inode is recorded before the swap, so a publisher killed during it is told apart on the
    rerun (see parts.Staged.swapped): not swapped (publish it), or swapped (what `model/` holds is the old
    model: remove it, unless another program wrote into it).
    """
    target, kept = os.path.realpath(save_path), ""
    began = staged.swapped(target)  # the save path may hold this conversion's model already
    with claimed(save_path, overwrite or began, inputs, lock_required=False) as target:
        if staged.published:
            return kept
        if not staged.swapped(target):
            staged.check_shards(plan)
            checked = None
            try:
                checked = write_extras(staged.model, checkpoint, plan, config, notes)
                finish(staged.model, plan, checked, notes)
            finally:
                if checked is not None:
                    checked.stop()
            staged.mark_swapping(target)
            publish(staged.model, target, save_path, overwrite)
        elif os.path.isdir(staged.model) and not only_model_files(staged.model):
            # swapped by a publisher killed before it checked the old contents, which another program wrote into
            kept = (f"; the old contents of {save_path} gained other files meanwhile: they are kept in "
                    f"{os.path.join(staged.folder, 'model')}")
        else:  # swapped by a publisher killed before it recorded so: `model/` holds the old model, if anything
            shutil.rmtree(staged.model, ignore_errors=True)
        staged.mark_published(target)
    return kept


def _open_and_plan(stack: contextlib.ExitStack, checkpoint_path: str | os.PathLike[str],
                   tokenizer_path: str | os.PathLike[str] | None, parent: str, progress: bool, limit: int,
                   dtype: str | None, vocab_size: int | None, num_heads: int | None, family: str | None
                   ) -> tuple[Checkpoint, Plan, dict, list[str]]:
    """Phase 1: the checkpoint opened (closed with `stack`), its plan and config, and what the summary says of
    them."""
    bar_for = (lambda description, total: progress_bar(total, True, description)) if progress else None
    model = read_tokenizer(os.fspath(tokenizer_path)) if tokenizer_path is not None else None
    checkpoint = stack.enter_context(open_checkpoint(checkpoint_path, parent if os.path.isdir(parent) else None,
                                                     bar_for))
    if model is not None:
        checkpoint.tokenizer = model
    plan, config = build_plan(checkpoint, limit, dtype, vocab_size, num_heads, family)
    notes = [checkpoint.note] if checkpoint.note else []
    if vocab_size is None and checkpoint.vocab_size is not None:
        notes.append(f"vocabulary {config['vocab_size']} from the {checkpoint.config_name}")
    elif vocab_size is None:
        told = checkpoint.tokenizer is not None and tokenizer.vocab_size(checkpoint.tokenizer) is not None \
            or tokenizer.hf_vocab_size(checkpoint.tokenizer_files) is not None
        notes.append(f"vocabulary {config['vocab_size']} " + ("from the tokenizer" if told else
                     "(GPT-SW3's default; --vocab-size sets it)"))
    return checkpoint, plan, config, notes


def _check_free_space(parent: str, needed: int, save_path: str) -> None:
    try:
        free = shutil.disk_usage(parent).free
    except FileNotFoundError:
        raise _deleted(parent, save_path) from None
    if free < needed:
        raise ConversionError(
            f"not enough free space in {parent}: need {_size(needed)}, have {_size(free)}; "
            "free some space or choose another --save-path"
        )


def _tokenizer_bytes(checkpoint: Checkpoint) -> int:
    """The bytes a conversion writes for the tokenizer (at most: a SentencePiece model may not be copied)."""
    return len(checkpoint.tokenizer or b"") + sum(map(len, checkpoint.tokenizer_files.values()))


def stream_into(folder: str, plan: Plan, checkpoint: Checkpoint, device: str, progress: bool,
                on_bytes: Callable[[int], None] | None = None) -> float:
    """Phase 2: the plan's tensors into their shard files in `folder`, with a progress bar; the seconds taken."""
    bar = progress_bar(plan.total_size, enabled=progress)
    started = time.perf_counter()

    def written(n: int) -> None:
        bar.update(n)
        if on_bytes is not None:
            on_bytes(n)

    try:
        stream(plan, checkpoint, folder, device, on_bytes=written)
    finally:
        bar.close()  # before any message: an interrupted bar would be glued to it, and redrawn after it
    return time.perf_counter() - started


def _write_error(exc: OSError, save_path: str, staging: str, needed: int) -> BaseException:
    """The one line for a write that failed: the disk full or a size limit, or the folder deleted; else `exc`."""
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return ConversionError(f"could not write {save_path}: {os.strerror(exc.errno)}; the output needs "
                               f"{_size(needed)}, free space or raise the limit and run again")
    if not os.path.isdir(staging):
        return _deleted(staging, save_path)
    return exc


def _deleted(folder: str, save_path: str) -> ConversionError:
    return ConversionError(f"the folder {folder} was deleted during the conversion (or a folder above it); "
                           f"nothing was written to {save_path}: run again")


