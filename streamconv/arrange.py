"""Rearranging source rows into their place in an output tensor: the one step that costs CPU per byte.

torch copies a whole 2-D matrix into its contiguous transpose with a fast blocked kernel, but a transposed
copy into a slice of a larger output falls back to an element-wise strided loop that runs about 4x slower.
So matrices are arranged in tiles: each tile of source rows is transposed into a small contiguous scratch
tile (fast kernel, stays in cache), then placed into the output with row-sized runs. Tiles are spread
over threads (torch releases the GIL during copies).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from streamconv.recipes.gpt_sw3 import Arrangement

TILE_BYTES = 2 * 2**20  # source bytes per tile: two tiles per thread stay in L2/L3


def default_threads() -> int:
    return max(1, min(16, len(os.sched_getaffinity(0))))


class Arranger:
    """Places chunks of source rows into output tensors on one device, with a pool of threads on CPU."""

    def __init__(self, device: torch.device, threads: int | None = None) -> None:
        self.device = device
        self.threads = threads or default_threads()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="streamconv-arrange")
        self._tiles: list[torch.Tensor] = [torch.empty(0, dtype=torch.uint8) for _ in range(self.threads)]

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def arrange(self, out: torch.Tensor, part: torch.Tensor, arrangement: Arrangement, start: int) -> None:
        """Write `part` (rows `start:` of the source, viewed as `arrangement.view`) into `out`."""
        perm = arrangement.perm
        dst = out.narrow(perm.index(0), start, part.shape[0])
        if self.device.type != "cpu" or not _tileable(part, dst, perm):
            dst.copy_(part.to(self.device, non_blocking=False).permute(perm))
            return
        cols = part.shape[-1]
        rows_per_item = part[0].numel() // cols  # 2-D rows in one step along the first axis
        step = max(1, TILE_BYTES // (part[0].numel() * part.element_size()))
        starts = list(range(0, part.shape[0], step))

        def work(k: int) -> None:
            for a in starts[k :: self.threads]:
                sub = part[a : a + step]
                n = sub.shape[0]
                tile = self._tile(k, sub.nbytes).view(sub.dtype)[: sub.numel()].view(cols, n * rows_per_item)
                tile.copy_(sub.reshape(-1, cols).t())  # fast blocked transpose into contiguous scratch
                placed = tile.view(cols, n, *sub.shape[1:-1]).permute(0, *(p + 1 for p in perm[1:]))
                dst.narrow(perm.index(0), a, n).copy_(placed)

        for future in [self._pool.submit(work, k) for k in range(min(self.threads, len(starts)))]:
            future.result()

    def _tile(self, k: int, nbytes: int) -> torch.Tensor:
        if self._tiles[k].numel() < nbytes:
            self._tiles[k] = torch.empty(nbytes, dtype=torch.uint8)
        return self._tiles[k]


def _tileable(part: torch.Tensor, dst: torch.Tensor, perm: tuple[int, ...]) -> bool:
    """Matrices whose last axis becomes the first (Conv1D transposes, QKV), with no dtype cast."""
    return len(perm) >= 2 and perm[0] == len(perm) - 1 and part.dtype == dst.dtype and part.is_contiguous()
