"""Rearranging source rows into their place in an output tensor: the one step that costs CPU per byte.

On the CPU, elements are moved as integers of their width (numpy, no torch). A whole matrix transposed
in one copy reads or writes with a stride of a full row at every element; so a matrix is transposed in
strips of STRIP_ROWS source rows: reading the strip walks that many rows side by side, and each output
row receives a run of that many elements. Each thread takes a block of neighbouring strips (numpy releases
the GIL while it copies). Measured on the 2-core machine, two threads, bf16 matrices of 130 to 300 MB:
3.2 GB/s in strips of 16 rows (2.6 GB/s with strips dealt out in turn, whose runs share cache lines across
threads; strips of 8 or 32 rows were slower), 1.1 GB/s in square tiles transposed through a scratch
buffer, 0.26 GB/s in one copy.

A cast between bfloat16, float16 and float32 happens in the same pass (`casts`): each strip is cast into a
small scratch array of the thread's, which is then transposed into place, so the bytes are read from memory
once. A tensor that is only cast is cast in blocks split between the threads (`cast`).

A GPU needs torch: `TorchArranger` reads the source bits as their dtype and lets torch permute, cast and copy
on the device.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from streamconv.casts import cast_into
from streamconv.recipe import Arrangement

if TYPE_CHECKING:
    import torch

STRIP_ROWS = 16  # source rows transposed in one copy
BLOCKS_PER_THREAD = 2**18  # elements: fewer are cast on one thread
CAST_ROWS_BYTES = 2**20  # source bytes cast at once where a chunk is rearranged but not in strips


def default_threads() -> int:
    return max(1, min(16, len(os.sched_getaffinity(0))))


def narrow(x: Any, axis: int, start: int, length: int) -> Any:
    """`x[..., start:start + length, ...]` on `axis`, a view (numpy arrays and torch tensors alike)."""
    return x[(slice(None),) * axis + (slice(start, start + length),)]


class Arranger:
    """Places chunks of source rows (as integer bits) into output arrays, with a pool of CPU threads."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or default_threads()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="streamconv-arrange")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def arrange(self, out: np.ndarray, part: np.ndarray, arrangement: Arrangement, start: int,
                dtypes: tuple[str, str] | None = None) -> None:
        """Write `part` (rows `start:` of the source, viewed as `arrangement.view`) into `out`, cast from
        `dtypes[0]` to `dtypes[1]` on the way when given (`out` then holds integers of the target's width)."""
        perm = arrangement.perm
        dst = narrow(out, perm.index(0), start, part.shape[0])
        part = np.ascontiguousarray(part)
        if not _tileable(part, perm):
            if dtypes is None:
                np.copyto(dst, part.transpose(perm))
                return
            step = max(1, CAST_ROWS_BYTES * part.shape[0] // max(1, part.nbytes))
            for r in range(0, part.shape[0], step):
                rows = part[r : r + step]
                cast = np.empty(rows.shape, dtype=out.dtype)
                cast_into(cast, rows, *dtypes)
                np.copyto(narrow(dst, perm.index(0), r, len(rows)), cast.transpose(perm))
            return
        # a strip: source rows [r, r + STRIP_ROWS) of one matrix part[lead], each lead axis an index
        strips = [(lead, r) for lead in np.ndindex(part.shape[:-2]) for r in range(0, part.shape[-2], STRIP_ROWS)]
        rows_axis = perm.index(part.ndim - 2)
        workers = min(self.threads, len(strips))

        def work(k: int) -> None:  # a block of neighbouring strips: threads write apart, not into one cache line
            scratch = np.empty((STRIP_ROWS, part.shape[-1]), dtype=out.dtype) if dtypes else None
            for lead, r in strips[k * len(strips) // workers : (k + 1) * len(strips) // workers]:
                where: list[int | slice] = [slice(None)] * part.ndim
                for axis, i in enumerate(lead):
                    where[perm.index(axis)] = i
                where[rows_axis] = slice(r, r + STRIP_ROWS)
                strip = part[(*lead, slice(r, r + STRIP_ROWS))]
                if scratch is not None:
                    cast_into(scratch[: len(strip)], strip, *dtypes)
                    strip = scratch[: len(strip)]
                np.copyto(dst[tuple(where)], strip.T)

        self._run(work, workers)

    def cast(self, out: np.ndarray, bits: np.ndarray, source: str, target: str) -> None:
        """`casts.cast_into` of a C-contiguous array, its elements split between the threads."""
        flat_in, flat_out = bits.reshape(-1), out.reshape(-1)
        workers = max(1, min(self.threads, flat_in.size // BLOCKS_PER_THREAD))

        def work(k: int) -> None:
            a, b = k * flat_in.size // workers, (k + 1) * flat_in.size // workers
            cast_into(flat_out[a:b], flat_in[a:b], source, target)

        self._run(work, workers)

    def _run(self, work: Callable[[int], None], workers: int) -> None:
        for future in [self._pool.submit(work, k) for k in range(workers)]:
            future.result()


def _tileable(part: np.ndarray, perm: tuple[int, ...]) -> bool:
    """Matrices whose last axis becomes the first (Conv1D transposes, QKV), read in strips."""
    return len(perm) >= 2 and perm[0] == len(perm) - 1 and part.flags.c_contiguous


class TorchArranger:
    """Places chunks of source rows, read as `dtype`, into an output tensor on `device`, cast to its dtype."""

    def __init__(self, device: str, dtype: str) -> None:
        import torch

        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        # torch warns that the source, a view into the read-only file mapping, cannot be written: it is only read
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)

    def arrange(self, out: torch.Tensor, part: np.ndarray, arrangement: Arrangement, start: int) -> None:
        import torch

        perm = arrangement.perm
        source = torch.from_numpy(part).view(self.dtype)
        narrow(out, perm.index(0), start, part.shape[0]).copy_(source.to(self.device).permute(perm))


def torch_dtype(name: str) -> torch.dtype:
    """torch.bfloat16 from 'torch.bfloat16'."""
    import torch

    return getattr(torch, name.removeprefix("torch."))
