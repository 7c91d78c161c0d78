"""A head start: copy the output's leading pass-through tensors while `import torch` runs.

A cold `import torch` takes 1.5 to 2.5 s on the 2-core benchmark machine, most of it spent on small reads
and Python code, not on disk bandwidth; and a GPT-SW3 output begins with tensors that are plain copies
(the word and position embeddings: 0.8 GB of the medium benchmark's 2.6 GB). So, for a `.ckpt` file, the
`streamconv` command starts this thread before importing torch. It reads the pickle without torch
(`torch_zip.peek`), makes the plan `convert` will make, stages the output folder and copies those
tensors into the first shard inside the kernel. `convert` adopts that shard only if its own plan has
the same first shard, byte for byte, and finds every copied tensor at the same offset of the same file;
otherwise the head start is discarded and the conversion runs as without it. Any problem the head start
meets (a damaged file, a bad argument) only ends the head start: `convert` finds it again and names it.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from streamconv.output import check_save_path, staging_folder
from streamconv.plan import DTYPE_NAMES, Plan, TensorSpec, make_plan, parse_size
from streamconv.recipes import gpt_sw3
from streamconv.safetensors_writer import ShardWriter
from streamconv.sources import safe_pickle, torch_zip

if TYPE_CHECKING:
    from streamconv.sources import Checkpoint

PIECE = 8 * 2**20  # bytes per kernel copy (a stop is noticed between two); small ones delay the torch import less
_ZIP_MAGIC = b"PK\x03\x04"


def begin(checkpoint_path: str | os.PathLike[str], save_path: str | os.PathLike[str], *,
          shard_size: str | int = "5GB", dtype: str = "auto", vocab_size: int | None = None,
          num_heads: int | None = None, tokenizer_path: str | None = None, overwrite: bool = False) -> HeadStart | None:
    """Start copying, or None where a head start cannot apply: the input is not a single torch zip file
    (a `.nemo` or a folder of ranks), or the vocabulary depends on a tokenizer still to be read."""
    if tokenizer_path is not None and vocab_size is None:
        return None
    try:
        if not os.path.isfile(checkpoint_path):  # (before opening: a pipe would block)
            return None
        with open(checkpoint_path, "rb") as f:
            if f.read(4) != _ZIP_MAGIC:
                return None
    except OSError:
        return None
    return HeadStart(os.fspath(checkpoint_path), os.fspath(save_path), shard_size, dtype, vocab_size, num_heads,
                     overwrite)


class HeadStart:
    """The thread and what it made: the plan, the staging folder, the first shard's writer."""

    def __init__(self, checkpoint_path: str, save_path: str, shard_size: str | int, dtype: str,
                 vocab_size: int | None, num_heads: int | None, overwrite: bool) -> None:
        self._request = (checkpoint_path, save_path, shard_size, dtype, vocab_size, num_heads, overwrite)
        self.started = time.perf_counter()  # before torch is imported: where an adopting conversion's time starts
        self.copy_started: float | None = None
        self.plan: Plan | None = None  # still None once `_planned` is set: there is no head start
        self.staging: str | None = None
        self.writer: ShardWriter | None = None
        self.leading: list[tuple[TensorSpec, int]] = []  # the first shard's leading copies, file offsets
        self._source: os.stat_result | None = None
        self._error: BaseException | None = None
        self.adopted = False  # set by adopt(): the staging folder and first shard are the conversion's
        self._planned = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streamconv-head-start", daemon=True)
        self._thread.start()

    @property
    def count(self) -> int:
        """How many tensors at the start of the first shard the head start writes."""
        return len(self.leading)

    def _run(self) -> None:
        try:
            fd = self._prepare()
            self.copy_started = time.perf_counter()
        except Exception:  # the conversion meets the same problem and names it
            self.plan = None
            fd = None
        finally:
            self._planned.set()
        if fd is None:
            return
        try:
            for spec, offset in self.leading:
                for start in range(0, spec.nbytes, PIECE):
                    if self._stop.is_set():
                        return
                    self.writer.append_from_file(fd, offset + start, min(PIECE, spec.nbytes - start))
                self.writer.finish_tensor(spec)
        except BaseException as exc:  # raised by wait(), in the conversion's writer thread
            self._error = exc
        finally:
            os.close(fd)

    def _prepare(self) -> int | None:
        """Plan, stage and open; the source's descriptor, or None when there is nothing to copy."""
        path, save_path, shard_size, dtype, vocab_size, num_heads, overwrite = self._request
        payload = torch_zip.peek(path)
        if not isinstance(payload, Mapping) or not isinstance(payload.get("state_dict"), Mapping):
            return None
        state_dict, hparams = payload["state_dict"], payload.get("hyper_parameters")
        if safe_pickle.refused_global(state_dict) or safe_pickle.refused_global(hparams):
            return None  # the conversion refuses it: copy nothing
        cfg = hparams.get("cfg") if isinstance(hparams, Mapping) else None
        tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch_zip.StoredTensor)}

        def hparam(key: str, default: Any = None) -> Any:
            return default if cfg is None else cfg.get(key, default)

        _, recipes = gpt_sw3.checked_recipes(hparam, tensors, vocab_size, num_heads)
        dtypes = [DTYPE_NAMES.get(dtype) or tensors[r.source].dtype for r in recipes]
        plan = make_plan(recipes, dtypes, parse_size(shard_size))
        leading = []
        for spec in plan.shards[0].tensors:
            source = tensors[spec.recipe.source]
            if spec.recipe.arrangement.moves or spec.dtype != source.dtype or not source.contiguous:
                break
            leading.append((spec, source.offset))
        check_save_path(save_path, overwrite)
        parent = os.path.dirname(os.path.abspath(save_path))
        if not leading or shutil.disk_usage(parent).free < plan.file_bytes:
            return None
        self.staging = staging_folder(save_path)  # removed by close() unless adopted, as the writer's file
        self.writer = ShardWriter(os.path.join(self.staging, plan.shards[0].filename), plan.shards[0])
        fd = os.open(path, os.O_RDONLY)
        try:
            self._source = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        self.plan, self.leading = plan, leading
        return fd

    def adopt(self, plan: Plan, checkpoint: Checkpoint) -> bool:
        """Whether the conversion's own `plan` starts as this one (and needs as much space, which the head
        start checked), with each copied tensor passing through from the same offset of the same file.
        If so the staging folder and the first shard are the conversion's."""
        from streamconv.pipeline import passes_through, source_of
        from streamconv.sources.parallel import Split

        self._planned.wait()
        if self.plan is None:
            return False
        ours, theirs = self.plan.shards[0], plan.shards[0]
        if (ours.filename, ours.header, self.plan.file_bytes) != (theirs.filename, theirs.header, plan.file_bytes):
            return False
        for (_, offset), spec in zip(self.leading, theirs.tensors, strict=False):
            source = source_of(spec, checkpoint)
            if isinstance(source, Split) or not passes_through(spec, source) or not source.is_contiguous():
                return False
            where = checkpoint.file_offset(source)
            if where is None or where[1] != offset or not os.path.samestat(os.fstat(where[0]), self._source):
                return False
        self.adopted = True
        return True

    def wait(self) -> int:
        """Wait for the copies to finish; the bytes written, or the error that stopped them."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self.writer.written != self.leading[-1][0].end:
            raise RuntimeError("the head start was stopped before its copies were done")
        return self.writer.written

    def stop(self) -> None:
        """Stop the copies at the next piece and wait for the thread: its writer is then safe to close."""
        self._stop.set()
        self._thread.join()

    def close(self) -> None:
        """Stop; close the writer if the conversion did not; remove the staging folder if it is still there
        (a published conversion has renamed it away)."""
        self.stop()
        if self.writer is not None:
            self.writer.discard()
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
