"""The streaming executor: read ahead, arrange, write behind, one output tensor at a time.

Three things overlap, each bounded:
- reading: a reader thread reads the source chunk after chunk (`chunks_of`: at most CHUNK_BYTES each), in
  the order they are used, with direct preads into reads.BUFFERS buffers (`reads.ReadAhead`), never
  through the page cache;
- arranging: the chunks of a tensor that must be rearranged are placed (and cast) into one of BUFFERS
  reusable output buffers sized for the largest such tensor (a small one, such as the QKV bias, gets memory
  of its own instead of holding up a buffer); a tensor whose elements stay in order goes chunk by chunk
  from its read buffer to the writer, or, when it is only cast (`cast_only`), through one of CAST_BUFFERS
  small buffers, so a cast never needs a buffer the size of the embedding;
- writing: a writer thread appends finished buffers and chunks to the shard files in plan order, with direct
  writes (`formats.safetensors_writer`).
So memory holds at most BUFFERS output buffers, the read buffers, the cast chunks and a few small tensors,
whatever the model size. (A strided source, which torch.save can keep, is copied whole into memory when
reached.) A tensor sliced across tensor-parallel ranks (a `Split`) is moved slice by slice into its place.
Arranging is the CPU's work, moving tensors in order the disk's: one after the other, the disk would idle while a
layer's matrices are transposed (and cast), and the cores while the embedding streams. So runs of at least
LANE_BYTES of tensors that go through in order form a lane of their own, run beside the rest with its own
reader, writer and buffers (`lanes`); each lane's writers skip the other's tensors in the shard files they share.
Bytes are moved, and cast (`casts`), as numpy arrays of integers of the elements' width; torch is imported only
for a GPU (`arranges_on_device`).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamconv import reads
from streamconv.arrange import Arranger, TorchArranger, narrow, torch_dtype
from streamconv.clock import Clock
from streamconv.formats.safetensors_writer import STAGING_BYTES, ShardWriter, placed
from streamconv.plan import Plan, Shard, TensorSpec
from streamconv.reads import ReadAhead
from streamconv.recipe import Arrangement
from streamconv.sources.records import BITS, Checkpoint, SourceTensor, Split, row_ranges

# Source bytes read at once: direct reads of 8 MB run at the disk's speed (2.23 s for 2.6 GB, 2.26 s in 64 MB
# reads, 2.51 s in 1 MB ones), and on the machines measured every byte of memory a process touches for the first
# time costs (about 5 s per GB: the host backs the page then), so buffers are no larger than needed.
CHUNK_BYTES = 8 * 2**20
BUFFERS = 2  # output buffers: one being filled while the other is written
WRITE_QUEUE = 32  # pending write jobs: each holds a buffer, a small tensor or a read chunk
SMALL_BYTES = 2**20  # rearranged tensors up to this size, and 1/64 of a buffer, are not put in a buffer
CAST_BUFFERS = 3  # chunks of a tensor that is only cast: one being cast into, one being written, one queued
LANE_BYTES = 64 * 2**20  # a run of tensors going through in order that is at least this large gets its own lane
log = logging.getLogger(__name__)  # (debug: where each thread spent its time, `Clock.line`)


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


def moved(tensors: list[TensorSpec]) -> Iterator[TensorSpec]:
    """What is moved, in order: each output tensor, or its sources' pieces (`TensorSpec.pieces`) one by one."""
    return (piece for spec in tensors for piece in spec.pieces())


def arranged_sizes(plan: Plan, checkpoint: Checkpoint, device: str = "cpu") -> list[int]:
    """Bytes of each output tensor (or piece of one) that must be arranged in memory."""
    return [t.nbytes for t in moved(plan.tensors) if buffered(t, checkpoint.tensors[t.recipe.source], device)]


def buffer_bytes(plan: Plan, checkpoint: Checkpoint, device: str = "cpu") -> int:
    """Size of each reusable output buffer: the largest tensor that must be arranged in memory."""
    return max(arranged_sizes(plan, checkpoint, device), default=0)


def cast_buffer_bytes(plan: Plan, checkpoint: Checkpoint, device: str = "cpu") -> int:
    """Size of each cast chunk buffer: CHUNK_BYTES, or less when no tensor that is only cast needs as much
    (0 when there is none)."""
    sizes = [t.nbytes for t in moved(plan.tensors) if cast_only(t, checkpoint.tensors[t.recipe.source], device)]
    return min(CHUNK_BYTES, max(sizes, default=0))


def is_small(nbytes: int, buffer: int) -> bool:
    """A rearranged tensor that gets memory of its own: holding a whole buffer for it would stall the
    arranging of the next large tensor until the writer has caught up."""
    return nbytes <= SMALL_BYTES and 64 * nbytes <= buffer


def working_memory(plan: Plan, checkpoint: Checkpoint) -> int:
    """Predicted resident bytes on top of the interpreter (on the CPU): each lane's (`lanes`) output buffers,
    cast chunk buffers, read buffers, writer's staging buffer and small rearranged tensors that may wait to be
    written (a full queue, the one being written and the one being arranged)."""
    return sum(_lane_memory(lane, checkpoint) for lane in lanes(plan, checkpoint, "cpu"))


def _lane_memory(plan: Plan, checkpoint: Checkpoint) -> int:
    """One lane's share of `working_memory`."""
    buffer = buffer_bytes(plan, checkpoint)
    small = sorted((n for n in arranged_sizes(plan, checkpoint) if is_small(n, buffer)), reverse=True)
    return (BUFFERS * buffer + CAST_BUFFERS * cast_buffer_bytes(plan, checkpoint)
            + reads.BUFFERS * read_buffer_bytes(plan.tensors) + STAGING_BYTES
            + sum(small[: WRITE_QUEUE + 2]))


def lanes(plan: Plan, checkpoint: Checkpoint, device: str) -> list[Plan]:
    """The plan as the lanes `stream` runs side by side: the runs of consecutive tensors that go through in order
    (read, maybe cast, written: the disk's work) of at least LANE_BYTES, and the rest (arranged in memory: the
    CPU's work), each shard's tensors in their order in each; the plan alone where either lane would be empty, or
    where the CPU arranges little (on a GPU, or `_costs_cpu`): a second lane's buffers would then buy nothing.
    An empty tensor joins the run it lies in (so only one lane has tensors at a shard's start: the one that writes
    the header). Two lanes also need pages no larger than ALIGN: the block where one lane's run meets the other's
    is written by both through the page cache, while each writes the blocks next to it with O_DIRECT, which a
    page holding both would make fail."""
    if (arranges_on_device(device) or mmap.PAGESIZE > reads.ALIGN
            or not any(_costs_cpu(t, checkpoint, device) for t in moved(plan.tensors))):
        return [plan]
    arranging: list[Shard] = []
    in_order: list[Shard] = []
    for shard in plan.shards:
        mine: list[TensorSpec] = []
        theirs: list[TensorSpec] = []
        for through, run in itertools.groupby(shard.tensors,
                                              key=lambda t: not t.nbytes or _goes_through(t, checkpoint, device)):
            tensors = list(run)
            if through and sum(t.nbytes for t in tensors) >= LANE_BYTES:
                theirs += tensors
            else:
                mine += tensors
        arranging += [Shard(shard.filename, mine, shard.header)] if mine else []
        in_order += [Shard(shard.filename, theirs, shard.header)] if theirs else []
    if not arranging or not in_order:
        return [plan]
    return [Plan(shards, plan.total_size, plan.family) for shards in (arranging, in_order)]


def _costs_cpu(spec: TensorSpec, checkpoint: Checkpoint, device: str) -> bool:
    """Whether the CPU arranges this tensor element by element: a transpose (elements move within rows) or a cast,
    not whole rows moved (tensor-parallel slices joined, QKV regrouped), which runs at memory speed. (Measured: a
    lane of their own for Llama and Nemotron-H tensors in order changed nothing in time and cost 40 MB.)"""
    source = source_of(spec, checkpoint)
    perm = spec.recipe.arrangement.perm
    return buffered(spec, source, device) and (spec.dtype != source.dtype or perm[-1] != len(perm) - 1)


def _goes_through(tensor: TensorSpec, checkpoint: Checkpoint, device: str) -> bool:
    """Whether the tensor is written in order, chunk by chunk (no piece of it arranged in memory)."""
    return not any(buffered(p, source_of(p, checkpoint), device) for p in tensor.pieces())


def stream(
    plan: Plan,
    checkpoint: Checkpoint,
    directory: str,
    device: str,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> None:
    """Write every shard of the plan into `directory`, its lanes (`lanes`) side by side, the first in this
    thread; log (debug) where each lane's threads spent their time. A failure in one lane stops the other."""
    made = lanes(plan, checkpoint, device)
    if len(made) == 1:
        _stream_lane(plan, checkpoint, directory, device, on_bytes, "pipeline")
        return
    arranging, in_order = made
    lock, stop, failures = threading.Lock(), threading.Event(), []

    def counted(n: int) -> None:  # (the progress bar is not updated from two threads at once)
        with lock:
            on_bytes(n)

    def run(lane: Plan, name: str) -> None:
        try:
            _stream_lane(lane, checkpoint, directory, device, counted, name, stop)
        except BaseException as exc:  # raised below, in this thread
            stop.set()
            failures.append(exc)

    helper = threading.Thread(target=run, args=(in_order, "lane in order"), name="streamconv-lane", daemon=True)
    helper.start()
    try:
        run(arranging, "lane arranging")
        helper.join()
    except BaseException:  # an interrupt while waiting for the other lane
        stop.set()
        helper.join()
        raise
    if failures:
        raise next((e for e in failures if not isinstance(e, _Stopped)), failures[0])


def _stream_lane(plan: Plan, checkpoint: Checkpoint, directory: str, device: str, on_bytes: Callable[[int], None],
                 name: str, stop: threading.Event | None = None) -> None:
    """Write the plan's tensors into their shard files, skipping what lies between them (another lane's)."""
    start, clock = time.perf_counter(), Clock()
    with _Stream(plan, checkpoint, device, on_bytes, clock, stop) as run:
        for shard in plan.shards:
            writer = run.open(os.path.join(directory, shard.filename), shard)
            end = shard.tensors[0].begin if shard.tensors else 0
            for spec in shard.tensors:
                if spec.begin != end:
                    run.writes.put(functools.partial(writer.skip_to, spec.begin))
                run.move(spec, writer)
                end = spec.end
            run.writes.put(writer.close)
        with clock.timing("arranger: waiting for the last writes"):
            run.writes.finish()
    log.debug(clock.line(time.perf_counter() - start, name))


def source_of(spec: TensorSpec, checkpoint: Checkpoint) -> SourceTensor | Split:
    """The source tensor (or tensor-parallel slices) of an output tensor, less any padding rows."""
    source = checkpoint.tensors[spec.recipe.source]
    return source if spec.recipe.row_ranges is None else row_ranges(source, spec.recipe.row_ranges)


def parts_of(source: SourceTensor | Split) -> tuple[np.ndarray, ...]:
    """The source bytes to read, in order: the tensor's, or its tensor-parallel slices'."""
    return tuple(p.bits for p in source.parts) if isinstance(source, Split) else (source.bits,)


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


@dataclass(frozen=True)
class Chunk:
    """A piece of a tensor's source, read at once, and where its elements go."""

    view: np.ndarray  # source elements: a contiguous span of the file, or a whole strided part
    shape: tuple[int, ...]  # the elements as arranged: `view` reshaped
    place: tuple[int, int, int]  # (axis, start, length): the slice of the output the part it is of fills
    start: int  # its first row in that slice


def chunks_of(spec: TensorSpec, source: SourceTensor | Split, device: str) -> Iterator[Chunk]:
    """The chunks a conversion reads for `spec`, in order: runs of the tensor's bytes, or of each tensor-parallel
    slice's, of at most CHUNK_BYTES in and out (a cast may widen them); rows of the arrangement's view for a
    tensor arranged in memory."""
    arrangement = spec.recipe.arrangement
    in_order = not buffered(spec, source, device)
    itemsize = parts_of(source)[0].itemsize
    limit = CHUNK_BYTES * itemsize // max(itemsize, spec.itemsize) if in_order else CHUNK_BYTES
    for place, shape, part in _slices(source, arrangement):
        if not part.flags.c_contiguous:  # copied whole when it is reached
            yield Chunk(part, (part.size,) if in_order else shape, place, 0)
        elif in_order:
            flat = part.reshape(-1)
            step = max(1, limit // part.itemsize)
            for start in range(0, flat.size, step):
                rows = flat[start : start + step]
                yield Chunk(rows, rows.shape, place, start)
        else:
            for start, rows in row_chunks(part.reshape(shape), limit):
                yield Chunk(rows, rows.shape, place, start)


def _slices(source: SourceTensor | Split, arrangement: Arrangement
            ) -> Iterator[tuple[tuple[int, int, int], tuple[int, ...], np.ndarray]]:
    """(the slice of the output it fills, its shape as the arrangement views it, the part) for the tensor or each
    of its tensor-parallel slices."""
    out_shape = arrangement.out_shape
    if not isinstance(source, Split):
        yield (0, 0, out_shape[0]), arrangement.view, source.bits
        return
    view_axis = split_view_axis(tuple(source.shape), arrangement.view, source.axis)
    out_axis, at = arrangement.perm.index(view_axis), 0
    others = math.prod(n for i, n in enumerate(arrangement.view) if i != view_axis)
    for part in parts_of(source):
        local = list(arrangement.view)
        local[view_axis] = part.size // others  # this slice's share of the sliced axis
        yield (out_axis, at, local[view_axis]), tuple(local), part
        at += local[view_axis]


Fetch = Callable[[np.ndarray], tuple[np.ndarray, Callable[[], None]]]  # a view -> (its bytes, hand them back)


def arrange_into(host: np.ndarray, spec: TensorSpec, source: SourceTensor | Split, device: str,
                 arranger: Arranger, fetch: Fetch, scratch: Any = None) -> None:
    """Arrange (and cast) `source` as `spec` says into the first `spec.nbytes` bytes of `host`: in place with
    numpy on the CPU, or with torch on `device` through `scratch` (a torch uint8 buffer there)."""
    arrangement = spec.recipe.arrangement
    if not arranges_on_device(device):
        out = host[: spec.nbytes].view(BITS[spec.itemsize]).reshape(arrangement.out_shape)
        dtypes = None if spec.dtype == source.dtype else (source.dtype, spec.dtype)
        arrange = functools.partial(arranger.arrange, arrangement=arrangement, dtypes=dtypes)
    else:
        import torch

        out = scratch[: spec.nbytes].view(torch_dtype(spec.dtype)).view(arrangement.out_shape)
        arrange = functools.partial(TorchArranger(device, source.dtype).arrange, arrangement=arrangement)
    for chunk in chunks_of(spec, source, device):
        data, done = fetch(chunk.view)
        try:
            arrange(narrow(out, *chunk.place), data.reshape(chunk.shape), start=chunk.start)
        finally:
            done()
    if arranges_on_device(device):
        torch.from_numpy(host[: spec.nbytes]).copy_(scratch[: spec.nbytes])


def in_order_chunks(spec: TensorSpec, source: SourceTensor | Split, device: str, arranger: Arranger, fetch: Fetch,
                    take: Callable[[int], tuple[np.ndarray, Callable[[], None]]]
                    ) -> Iterator[tuple[np.ndarray, Callable[[], None], bool]]:
    """The output of a tensor that passes through or is only cast, chunk by chunk: (bytes, the call that hands
    them back once written, whether they are a whole strided part copied into memory). A cast goes into a
    buffer `take(bytes of the tensor before it)` gives with the call that hands it back."""
    written = 0
    for chunk in chunks_of(spec, source, device):
        data, done = fetch(chunk.view)
        if passes_through(spec, source):
            yield data.reshape(-1).view(np.uint8), done, not chunk.view.flags.c_contiguous
            continue
        flat = data.reshape(-1)
        step = max(1, CHUNK_BYTES // spec.itemsize)
        try:
            for start in range(0, flat.size, step):  # (one step, but for a strided part copied whole)
                part, (buffer, give_back) = flat[start : start + step], take(written)
                out = buffer[: part.size * spec.itemsize].view(BITS[spec.itemsize])
                arranger.cast(out, part, source.dtype, spec.dtype)
                written += out.nbytes
                yield out.view(np.uint8), give_back, False
        finally:
            done()


def read_chunks(plan_tensors: list[TensorSpec], checkpoint: Checkpoint, device: str) -> Iterator[np.ndarray]:
    """Every chunk's view a conversion of these tensors fetches, in order: what `ReadAhead` reads ahead."""
    for spec in moved(plan_tensors):
        for chunk in chunks_of(spec, source_of(spec, checkpoint), device):
            yield chunk.view


def read_buffer_bytes(plan_tensors: list[TensorSpec]) -> int:
    """Size of each read buffer: the largest chunk, at most CHUNK_BYTES (a single larger row gets its own)."""
    return min(CHUNK_BYTES, max((t.nbytes for t in plan_tensors), default=0))


class _Stream:
    """The state one conversion's threads share: buffers, the arranger, the reader and writer threads, shards."""

    def __init__(self, plan: Plan, checkpoint: Checkpoint, device: str, on_bytes: Callable[[int], None],
                 clock: Clock | None = None, stop: threading.Event | None = None) -> None:
        self.plan, self.checkpoint, self.device, self.on_bytes = plan, checkpoint, device, on_bytes
        clock = clock or Clock()
        size = self.buffer = buffer_bytes(plan, checkpoint, device)
        # buffer k, when it is free: the tensors arranged in a buffer take buffer 0, 1, 0, 1, ... (`used_extents`)
        self.free: list[queue.Queue[np.ndarray]] = [queue.Queue() for _ in range(BUFFERS)]
        self.turns = 0  # tensors arranged in a buffer so far
        self.free_casts: queue.Queue[np.ndarray] = queue.Queue()
        cast_size = cast_buffer_bytes(plan, checkpoint, device)
        for _ in range(CAST_BUFFERS if cast_size else 0):  # (room to place a chunk as the file has it: `placed`)
            self.free_casts.put(np.empty(cast_size + reads.ALIGN, dtype=np.uint8))
        self.scratch = None
        self.touching: threading.Thread | None = None
        if arranges_on_device(device):  # pinned host buffers: copies from a GPU run at full speed
            import torch

            self.scratch = torch.empty(size, dtype=torch.uint8, device=device)
            for free in self.free if size else []:
                pinned = torch.empty(size + reads.ALIGN, dtype=torch.uint8, pin_memory=device.startswith("cuda"))
                free.put(pinned.numpy())
        elif size:
            buffers = [np.empty(size + reads.ALIGN, dtype=np.uint8) for _ in range(BUFFERS)]
            extents = [buffer[:n] for buffer, n in zip(buffers, used_extents(plan, checkpoint), strict=True)]
            self.touching = threading.Thread(target=_touched, args=(buffers, extents, self.free),
                                             name="streamconv-touch", daemon=True)
            self.touching.start()
        self.arranger = Arranger()
        self.writes = _WriteBehind(WRITE_QUEUE, clock, stop)
        self.reads = ReadAhead(checkpoint, read_chunks(plan.tensors, checkpoint, device),
                               read_buffer_bytes(plan.tensors), waiting=self.writes.check, clock=clock)
        self.writers: list[ShardWriter] = []

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.writes.stop()  # no writer is closed while the writer thread may use it
        self.reads.close()
        self.arranger.close()
        if self.touching is not None:  # (it ends once it has touched what the conversion would use)
            self.touching.join()
        for writer in self.writers:  # after a failure; closing twice is harmless
            writer.close()

    def open(self, path: str, shard: Shard) -> ShardWriter:
        writer = ShardWriter(path, shard)
        self.writers.append(writer)
        return writer

    def move(self, tensor: TensorSpec, writer: ShardWriter) -> None:
        """Queue the writes of one output tensor (piece by piece, where it has several sources): chunk by chunk
        as read (or cast), or arranged in a buffer."""
        for spec in tensor.pieces():
            self._move(spec, writer)

    def _move(self, spec: TensorSpec, writer: ShardWriter) -> None:
        source = source_of(spec, self.checkpoint)
        at = writer.file_offset(spec)
        if not buffered(spec, source, self.device):
            for data, done, copied in in_order_chunks(spec, source, self.device, self.arranger, self.reads.get,
                                                      lambda written: self._cast_buffer(at + written)):

                def write_chunk(data: np.ndarray = data, done: Callable[[], None] = done) -> None:
                    writer.append(data)
                    done()
                    self.on_bytes(data.nbytes)

                self.writes.put(write_chunk)
                if copied:  # one such copy at a time
                    self.writes.drain()
            self.writes.put(lambda: writer.finish_tensor(spec))
            return

        small = is_small(spec.nbytes, self.buffer)
        free = None if small else self.free[self.turns % BUFFERS]
        self.turns += not small
        buffer = np.empty(spec.nbytes, dtype=np.uint8) if free is None else self.writes.take(free)
        host = buffer if free is None else placed(buffer, at, spec.nbytes)
        arrange_into(host, spec, source, self.device, self.arranger, self.reads.get, self.scratch)

        def write() -> None:
            writer.append(host)
            writer.finish_tensor(spec)
            if free is not None:
                free.put(buffer)
            self.on_bytes(spec.nbytes)

        self.writes.put(write)

    def _cast_buffer(self, offset: int) -> tuple[np.ndarray, Callable[[], None]]:
        """A free cast buffer, as a view placed for the chunk that starts at `offset` in the file."""
        buffer = self.writes.take(self.free_casts)
        return placed(buffer, offset, buffer.nbytes - reads.ALIGN), lambda: self.free_casts.put(buffer)


def used_extents(plan: Plan, checkpoint: Checkpoint) -> list[int]:
    """How many bytes of each output buffer the conversion will use (on the CPU): the arranger takes the buffers
    in turn, waiting for the one whose turn it is, so buffer k holds the tensors arranged in a buffer k,
    k + BUFFERS, ... and uses as much as the largest of them, placed (`placed`)."""
    sizes, extents = arranged_sizes(plan, checkpoint), [0] * BUFFERS
    buffer = max(sizes, default=0)  # (`buffer_bytes`)
    for i, nbytes in enumerate(n for n in sizes if not is_small(n, buffer)):
        extents[i % BUFFERS] = max(extents[i % BUFFERS], nbytes + reads.ALIGN)
    return extents


def _touched(buffers: list[np.ndarray], extents: list[np.ndarray], free: list[queue.Queue[np.ndarray]]) -> None:
    """Touch every page of the part of each output buffer the conversion will use (`extents`), then hand the
    buffer to the arranger: the page faults (and, on a virtual machine, the host backing each page: up to 2.5 s
    per GiB measured here after a page-cache drop) happen while the first tensors stream, not while a large tensor
    is arranged, and no page is touched that the conversion would not touch."""
    for buffer, extent, its_queue in zip(buffers, extents, free, strict=True):
        try:
            extent[:: reads.ALIGN] = 0
        finally:
            its_queue.put(buffer)


class _Stopped(Exception):
    """The other lane failed (its own error is what the conversion raises)."""

    def __init__(self) -> None:
        super().__init__("stopped: the other lane failed")


class _WriteBehind:
    """One thread running write jobs in order. A failure there sets `stop`; `stop` set (by a failure here or in
    another lane) ends the writing and stops the producer at its next call."""

    def __init__(self, depth: int, clock: Clock | None = None, stop: threading.Event | None = None) -> None:
        self._clock = clock or Clock()
        self._stop = stop or threading.Event()
        self._jobs: queue.Queue[Callable[[], object] | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="streamconv-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._clock.timing("writer: waiting for bytes"):
                job = self._jobs.get()
            if job is None:
                return
            if not self._stop.is_set():
                try:
                    with self._clock.timing("writer: writing"):
                        job()
                except BaseException as exc:  # surfaced in the producer's thread; the other lane stops now
                    self._error = exc
                    self._stop.set()

    def check(self) -> None:
        """Raise the writer's error, if it had one, or `_Stopped` if another lane failed."""
        if self._error is not None:
            raise self._error
        if self._stop.is_set():
            raise _Stopped

    def put(self, job: Callable[[], object]) -> None:
        with self._clock.timing("arranger: waiting for room in the write queue"):
            while True:
                self.check()
                try:
                    self._jobs.put(job, timeout=0.1)
                    return
                except queue.Full:
                    continue

    def take(self, free: queue.Queue[np.ndarray]) -> np.ndarray:
        """A free output buffer, waiting for the writer to hand one back."""
        with self._clock.timing("arranger: waiting for a free output buffer"):
            while True:
                self.check()
                try:
                    return free.get(timeout=0.1)
                except queue.Empty:
                    continue

    def drain(self) -> None:
        """Wait until every job queued so far has run."""
        done = threading.Event()
        self.put(done.set)
        while not done.wait(0.1):
            self.check()

    def finish(self) -> None:
        """Wait until every queued job has run; raise the writer's error if there was one."""
        self._jobs.put(None)
        self._thread.join()
        self.check()

    def stop(self) -> None:
        """Drop pending jobs and end the thread (after an error or an interrupt in the producer), setting `stop`,
        which stops the other lane too."""
        if not self._thread.is_alive():
            return
        self._stop.set()  # (a job already taken is the last one run)
        while True:
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                break
        self._jobs.put(None)
        self._thread.join()
