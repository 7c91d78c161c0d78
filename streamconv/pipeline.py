"""The streaming executor: read ahead, arrange, write behind, one output tensor at a time.

Three things overlap, each bounded:
- reading: while a tensor is arranged, a read-ahead thread has the kernel read the next tensor's
  source bytes (MADV_WILLNEED); they land in the page cache, not in this process;
- arranging: source rows, read in chunks of at most CHUNK_BYTES, are placed into one of BUFFERS
  reusable output buffers sized for the largest tensor that needs rearranging (a small one, such as the
  QKV bias, gets memory of its own instead of holding up a buffer); each chunk's pages are handed back
  (`Checkpoint.release`) as soon as it has been consumed;
- writing: a writer thread appends finished buffers to the shard files in plan order; tensors that
  pass through unchanged are copied file to file inside the kernel (copy_file_range), never entering
  this process; tensors that are only cast (`cast_only`) are cast a chunk at a time into one of
  CAST_BUFFERS small buffers, so a cast never needs a buffer the size of the embedding.
So memory holds at most BUFFERS output buffers, a couple of read chunks, the cast chunks and a few small
tensors, whatever the model size. (A strided source, which torch.save can keep, is also copied whole into
memory when reached.)
A tensor sliced across tensor-parallel ranks (a `Split`) is moved slice by slice into its place.
Bytes are moved, and cast (`casts`), as numpy arrays of integers of the elements' width; torch is imported only
for a GPU (`arranges_on_device`).
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from streamconv.arrange import Arranger, TorchArranger, narrow, torch_dtype
from streamconv.plan import Plan, Shard, TensorSpec
from streamconv.recipes.gpt_sw3 import Arrangement
from streamconv.safetensors_writer import ShardWriter
from streamconv.sources.records import BITS, Checkpoint, SourceTensor, Split

CHUNK_BYTES = 64 * 2**20  # source bytes read (and resident) at once
BUFFERS = 2  # output buffers: one being filled while the other is written
WRITE_QUEUE = 32  # pending write jobs: each holds a buffer, a small tensor or views of the file
SMALL_BYTES = 2**20  # rearranged tensors up to this size, and 1/64 of a buffer, are not put in a buffer
CAST_CHUNK_BYTES = 16 * 2**20  # output bytes of a tensor that is only cast, cast at once
CAST_BUFFERS = 3  # one being cast into, one being written, one queued


def _in_order(spec: TensorSpec, source: SourceTensor | Split) -> bool:
    """The output's elements are the source's in their order, slice after slice (no permutation, any
    tensor-parallel slices stacked on rows)."""
    return not spec.recipe.arrangement.moves and (not isinstance(source, Split) or source.axis == 0)


def passes_through(spec: TensorSpec, source: SourceTensor | Split) -> bool:
    """True when the output bytes are the source bytes (in order, no cast): no device needs them."""
    return _in_order(spec, source) and spec.dtype == source.dtype


def cast_only(spec: TensorSpec, source: SourceTensor | Split, device: str) -> bool:
    """True when the output is the source in order, cast, on the CPU: cast a chunk at a time on its way."""
    return _in_order(spec, source) and spec.dtype != source.dtype and not arranges_on_device(device)


def arranges_on_device(device: str) -> bool:
    """Whether tensors are arranged in a scratch buffer on the device, then copied back into a host buffer
    (every device but the CPU, which arranges straight into the host buffer)."""
    return device != "cpu"


def buffered(spec: TensorSpec, source: SourceTensor | Split, device: str) -> bool:
    """True when the whole output tensor is arranged in memory before it is written."""
    return not passes_through(spec, source) and not cast_only(spec, source, device)


def arranged_sizes(plan: Plan, checkpoint: Checkpoint, device: str = "cpu") -> list[int]:
    """Bytes of each output tensor that must be arranged in memory."""
    return [t.nbytes for t in plan.tensors if buffered(t, checkpoint.tensors[t.recipe.source], device)]


def buffer_bytes(plan: Plan, checkpoint: Checkpoint, device: str = "cpu") -> int:
    """Size of each reusable output buffer: the largest tensor that must be arranged in memory."""
    return max(arranged_sizes(plan, checkpoint, device), default=0)


def cast_buffer_bytes(plan: Plan, checkpoint: Checkpoint, device: str = "cpu") -> int:
    """Size of each cast chunk buffer: CAST_CHUNK_BYTES, or less when no tensor that is only cast needs as much
    (0 when there is none)."""
    sizes = [t.nbytes for t in plan.tensors if cast_only(t, checkpoint.tensors[t.recipe.source], device)]
    return min(CAST_CHUNK_BYTES, max(sizes, default=0))


def is_small(nbytes: int, buffer: int) -> bool:
    """A rearranged tensor that gets memory of its own: holding a whole buffer for it would stall the
    arranging of the next large tensor until the writer has caught up."""
    return nbytes <= SMALL_BYTES and 64 * nbytes <= buffer


def working_memory(plan: Plan, checkpoint: Checkpoint) -> int:
    """Predicted resident bytes on top of the interpreter (on the CPU): the output buffers, the cast chunk
    buffers, the chunk being arranged, the chunk being written and the small rearranged tensors that may wait to
    be written (a full queue, the one being written and the one being arranged)."""
    largest = max((t.nbytes for t in plan.tensors), default=0)
    buffer = buffer_bytes(plan, checkpoint)
    small = sorted((n for n in arranged_sizes(plan, checkpoint) if is_small(n, buffer)), reverse=True)
    return (BUFFERS * buffer + CAST_BUFFERS * cast_buffer_bytes(plan, checkpoint)
            + 2 * min(CHUNK_BYTES, largest) + sum(small[: WRITE_QUEUE + 2]))


def stream(
    plan: Plan,
    checkpoint: Checkpoint,
    directory: str,
    device: str,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> None:
    """Write every shard of the plan into `directory`."""
    specs = plan.tensors
    following = dict(zip(map(id, specs), [*specs[1:], None], strict=True))
    with _Stream(plan, checkpoint, device, on_bytes) as run:
        if specs:
            run.read_ahead(specs[0])
        for shard in plan.shards:
            writer = run.open(os.path.join(directory, shard.filename), shard)
            for spec in shard.tensors:
                if following[id(spec)] is not None:  # the next tensor is read while this one is arranged
                    run.read_ahead(following[id(spec)])
                run.move(spec, writer)
            run.writes.put(writer.close)
        run.writes.finish()


def source_of(spec: TensorSpec, checkpoint: Checkpoint) -> SourceTensor | Split:
    """The source tensor (or tensor-parallel slices) of an output tensor, less any padding rows."""
    source = checkpoint.tensors[spec.recipe.source]
    return source if spec.recipe.rows is None else source.first_rows(spec.recipe.rows)


def parts_of(source: SourceTensor | Split) -> tuple[np.ndarray, ...]:
    """The source bytes to read, in order: the tensor's, or its tensor-parallel slices'."""
    return tuple(p.bits for p in source.parts) if isinstance(source, Split) else (source.bits,)


def pieces(source: SourceTensor | Split) -> Iterator[np.ndarray]:
    """`parts_of(source)`, each made contiguous (torch.save can keep strided views) only when it is reached."""
    for part in parts_of(source):
        yield part if part.flags.c_contiguous else np.ascontiguousarray(part)


def row_chunks(view: np.ndarray, limit: int = CHUNK_BYTES) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) pieces of at most `limit` bytes (or one row) along the first axis."""
    step = max(1, limit // max(1, view.nbytes // max(1, len(view))))
    for start in range(0, view.shape[0], step):
        yield start, view[start : start + step]


def split_view_axis(shape: tuple[int, ...], view: tuple[int, ...], axis: int) -> int:
    """The axis of `view` (a refinement of `shape`, each source axis split into consecutive view axes)
    that a slicing of source axis `axis` slices: the first view axis of that source axis."""
    j = 0
    for i, size in enumerate(shape):
        if i == axis:
            return j
        product = 1
        while product < size:
            product *= view[j]
            j += 1
    raise ValueError(f"axis {axis} out of range for shape {shape}")


def arrange_into(host: np.ndarray, spec: TensorSpec, source: SourceTensor | Split, device: str,
                 arranger: Arranger, release: Callable[[np.ndarray], None], scratch: Any = None) -> None:
    """Arrange (and cast) `source` as `spec` says into the first `spec.nbytes` bytes of `host`: in place with
    numpy on the CPU, or with torch on `device` through `scratch` (a torch uint8 buffer there)."""
    arrangement = spec.recipe.arrangement
    if not arranges_on_device(device):
        out = host[: spec.nbytes].view(BITS[spec.itemsize]).reshape(arrangement.out_shape)
        dtypes = None if spec.dtype == source.dtype else (source.dtype, spec.dtype)
        arrange_source(functools.partial(arranger.arrange, dtypes=dtypes), out, source, arrangement, release)
        return
    import torch

    out = scratch[: spec.nbytes].view(torch_dtype(spec.dtype)).view(arrangement.out_shape)
    arrange_source(TorchArranger(device, source.dtype).arrange, out, source, arrangement, release)
    torch.from_numpy(host[: spec.nbytes]).copy_(scratch[: spec.nbytes])


def arrange_source(arrange: Callable[[Any, np.ndarray, Arrangement, int], None], out: Any,
                   source: SourceTensor | Split, arrangement: Arrangement,
                   release: Callable[[np.ndarray], None]) -> None:
    """Place a source tensor, or each tensor-parallel slice of one, into `out` (shaped as the output),
    CHUNK_BYTES of source rows at a time, handing each chunk to `release` once consumed."""
    for target, view in _targets(out, source, arrangement):
        for start, part in row_chunks(view):
            arrange(target, part, arrangement, start)
            release(part)


def cast_chunks(spec: TensorSpec, source: SourceTensor | Split, arranger: Arranger,
                release: Callable[[np.ndarray], None], take: Callable[[], np.ndarray]
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The output of a tensor that is only cast (`cast_only`), chunk by chunk: (the buffer `take` gave, the
    bytes cast into it), each source chunk handed to `release` once cast."""
    for piece in pieces(source):
        flat = piece.reshape(-1)
        step = max(1, CAST_CHUNK_BYTES // spec.itemsize)
        for start in range(0, flat.size, step):
            part = flat[start : start + step]
            buffer = take()
            out = buffer[: part.size * spec.itemsize].view(BITS[spec.itemsize])
            arranger.cast(out, part, source.dtype, spec.dtype)
            release(part)
            yield buffer, out.view(np.uint8)


def _targets(out: Any, source: SourceTensor | Split, arrangement: Arrangement) -> Iterator[tuple[Any, np.ndarray]]:
    """(where in `out`, source viewed as the arrangement expects) for the tensor or each of its slices."""
    if not isinstance(source, Split):
        yield out, next(pieces(source)).reshape(arrangement.view)
        return
    view_axis = split_view_axis(tuple(source.shape), arrangement.view, source.axis)
    local = list(arrangement.view)
    local[view_axis] = -1  # this slice's share of the sliced axis
    out_axis, at = arrangement.perm.index(view_axis), 0
    for part in pieces(source):
        view = part.reshape(local)
        yield narrow(out, out_axis, at, view.shape[view_axis]), view
        at += view.shape[view_axis]


class _Stream:
    """The state one conversion's threads share: buffers, the arranger, the writer thread, open shards."""

    def __init__(self, plan: Plan, checkpoint: Checkpoint, device: str, on_bytes: Callable[[int], None]) -> None:
        self.plan, self.checkpoint, self.device, self.on_bytes = plan, checkpoint, device, on_bytes
        size = self.buffer = buffer_bytes(plan, checkpoint, device)
        self.free: queue.Queue[np.ndarray] = queue.Queue()
        self.free_casts: queue.Queue[np.ndarray] = queue.Queue()
        cast_size = cast_buffer_bytes(plan, checkpoint, device)
        for _ in range(CAST_BUFFERS if cast_size else 0):
            self.free_casts.put(np.empty(cast_size, dtype=np.uint8))
        self.scratch = None
        if arranges_on_device(device):  # pinned host buffers: copies from a GPU run at full speed
            import torch

            self.scratch = torch.empty(size, dtype=torch.uint8, device=device)
            for _ in range(BUFFERS if size else 0):
                pinned = torch.empty(size, dtype=torch.uint8, pin_memory=device.startswith("cuda"))
                self.free.put(pinned.numpy())
        else:
            for _ in range(BUFFERS if size else 0):
                self.free.put(np.empty(size, dtype=np.uint8))
        self.arranger = Arranger()
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="streamconv-readahead")  # queueing reads may block
        self.writes = _WriteBehind(WRITE_QUEUE)
        self.writers: list[ShardWriter] = []

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.writes.stop()  # no writer is closed while the writer thread may use it
        self.reader.shutdown(wait=True, cancel_futures=True)
        self.arranger.close()
        for writer in self.writers:  # after a failure; closing twice is harmless
            writer.close()

    def read_ahead(self, spec: TensorSpec) -> None:
        for part in parts_of(source_of(spec, self.checkpoint)):
            if part.flags.c_contiguous:  # a strided one is copied whole when it is reached anyway
                self.reader.submit(self.checkpoint.prefetch, part)

    def open(self, path: str, shard: Shard) -> ShardWriter:
        writer = ShardWriter(path, shard)
        self.writers.append(writer)
        return writer

    def move(self, spec: TensorSpec, writer: ShardWriter) -> None:
        """Queue the write of one output tensor: straight from the file, or arranged through a buffer."""
        source = source_of(spec, self.checkpoint)
        checkpoint = self.checkpoint

        if passes_through(spec, source):
            for piece in pieces(source):
                for _, part in row_chunks(piece):
                    where = checkpoint.file_offset(part)

                    def copy(part: np.ndarray = part, where: tuple[int, int] | None = where) -> None:
                        if where is None:
                            writer.append(part)
                        else:  # file to file inside the kernel
                            writer.append_from_file(*where, part.nbytes)
                        checkpoint.release(part)
                        self.on_bytes(part.nbytes)

                    self.writes.put(copy)
                if where is None:  # a strided part copied into memory: one such copy at a time
                    self.writes.drain()
            self.writes.put(lambda: writer.finish_tensor(spec))
            return

        if cast_only(spec, source, self.device):
            for buffer, cast in cast_chunks(spec, source, self.arranger, checkpoint.release,
                                            lambda: self.writes.take(self.free_casts)):

                def write_cast(buffer: np.ndarray = buffer, cast: np.ndarray = cast) -> None:
                    writer.append(cast)
                    self.free_casts.put(buffer)
                    self.on_bytes(cast.nbytes)

                self.writes.put(write_cast)
            self.writes.put(lambda: writer.finish_tensor(spec))
            return

        small = is_small(spec.nbytes, self.buffer)
        host = np.empty(spec.nbytes, dtype=np.uint8) if small else self.writes.take(self.free)
        arrange_into(host, spec, source, self.device, self.arranger, checkpoint.release, self.scratch)

        def write() -> None:
            writer.append(host[: spec.nbytes])
            writer.finish_tensor(spec)
            if not small:
                self.free.put(host)
            self.on_bytes(spec.nbytes)

        self.writes.put(write)


class _WriteBehind:
    """One thread running write jobs in order. A failure there stops the producer at its next call."""

    def __init__(self, depth: int) -> None:
        self._jobs: queue.Queue[Callable[[], object] | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="streamconv-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self._error is None:
                try:
                    job()
                except BaseException as exc:  # surfaced in the producer's thread
                    self._error = exc

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, job: Callable[[], object]) -> None:
        while True:
            self._check()
            try:
                self._jobs.put(job, timeout=0.1)
                return
            except queue.Full:
                continue

    def take(self, free: queue.Queue[np.ndarray]) -> np.ndarray:
        """A free output buffer, waiting for the writer to hand one back."""
        while True:
            self._check()
            try:
                return free.get(timeout=0.1)
            except queue.Empty:
                continue

    def drain(self) -> None:
        """Wait until every job queued so far has run."""
        done = threading.Event()
        self.put(done.set)
        while not done.wait(0.1):
            self._check()

    def finish(self) -> None:
        """Wait until every queued job has run; raise the writer's error if there was one."""
        self._jobs.put(None)
        self._thread.join()
        self._check()

    def stop(self) -> None:
        """Drop pending jobs and end the thread (after an error or an interrupt in the producer)."""
        if not self._thread.is_alive():
            return
        self._error = self._error or RuntimeError("stopped")
        while True:
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                break
        self._jobs.put(None)
        self._thread.join()
