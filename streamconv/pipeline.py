"""The streaming executor: one output tensor at a time, read, arrange on the device, write, release.

Memory stays at one output-sized buffer (for tensors that need rearranging) plus one read chunk: each
chunk of the source mapping is handed back (`Checkpoint.release`) as soon as it has been consumed.
Tensors whose bytes pass through unchanged go from the mapping straight to the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from streamconv.plan import Plan, TensorSpec
from streamconv.safetensors_writer import ShardWriter
from streamconv.sources import Checkpoint

CHUNK_BYTES = 64 * 2**20  # source bytes read (and resident) at once


def passes_through(spec: TensorSpec, source_dtype: torch.dtype, device: torch.device) -> bool:
    """True when the output bytes are the source bytes: no permutation, no cast, no device."""
    perm = spec.recipe.arrangement.perm
    return perm == tuple(range(len(perm))) and spec.dtype == source_dtype and device.type == "cpu"


def buffer_bytes(plan: Plan, checkpoint: Checkpoint, device: torch.device) -> int:
    """Size of the one reusable output buffer: the largest tensor that must be rearranged or cast."""
    sizes = [
        t.nbytes
        for t in plan.tensors
        if not passes_through(t, checkpoint.tensors[t.recipe.source].dtype, device)
    ]
    return max(sizes, default=0)


def working_memory(plan: Plan, checkpoint: Checkpoint, device: torch.device) -> int:
    """Predicted resident bytes on top of the interpreter and torch: the buffer plus one read chunk."""
    largest_source = max((t.nbytes for t in plan.tensors), default=0)
    return buffer_bytes(plan, checkpoint, device) + min(CHUNK_BYTES, largest_source)


def stream(
    plan: Plan,
    checkpoint: Checkpoint,
    directory: str,
    device: torch.device,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> None:
    """Write every shard of the plan into `directory`."""
    host = torch.empty(buffer_bytes(plan, checkpoint, device), dtype=torch.uint8)
    scratch = host if device.type == "cpu" else torch.empty_like(host, device=device)
    for shard in plan.shards:
        with ShardWriter(os.path.join(directory, shard.filename), shard) as writer:
            for spec in shard.tensors:
                _move(spec, checkpoint, writer, device, host, scratch)
                writer.finish_tensor(spec)
                on_bytes(spec.nbytes)


def _move(
    spec: TensorSpec,
    checkpoint: Checkpoint,
    writer: ShardWriter,
    device: torch.device,
    host: torch.Tensor,
    scratch: torch.Tensor,
) -> None:
    recipe = spec.recipe
    source = checkpoint.tensors[recipe.source]
    if recipe.rows is not None:
        source = source[: recipe.rows]
    if not source.is_contiguous():  # torch.save kept a strided view: read it whole
        source = source.contiguous()
    arrangement = recipe.arrangement
    view = source.view(arrangement.view)
    step = max(1, CHUNK_BYTES // max(1, view[0].numel() * view.element_size()))

    if passes_through(spec, source.dtype, device):
        for start in range(0, view.shape[0], step):
            part = view[start : start + step]
            writer.append(part)
            checkpoint.release(part)
        return

    out = scratch[: spec.nbytes].view(spec.dtype).view(arrangement.out_shape)
    axis = arrangement.perm.index(0)  # where the source's first axis lands in the output
    for start in range(0, view.shape[0], step):
        part = view[start : start + step]
        out.narrow(axis, start, part.shape[0]).copy_(part.to(device).permute(arrangement.perm))
        checkpoint.release(part)
    if device.type != "cpu":
        host[: spec.nbytes].copy_(scratch[: spec.nbytes])
    writer.append(host[: spec.nbytes])
