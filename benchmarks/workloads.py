"""Synthetic GPT-SW3 checkpoints for the benchmarks, generated once into a cache folder outside the repository.

Profiles keep the tensor shapes of the real GPT-SW3 20B model (hidden 6144, 48 heads, ffn 24576, bf16) and
scale by layer count, so the largest tensor, which sets streamconv's memory, is the real one; `40b` has the
GPT-SW3 40B shapes. Checkpoints are bf16 unless asked for fp32 (`--source-dtype`).
The same model is also saved as a plain `.nemo` of TP ranks and as a megatron-core distributed checkpoint,
so that streamconv's figures on those layouts sit next to the `.ckpt`'s.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from benchmarks.parallel import parallel_dim
from streamconv.demo import SyntheticModel

CACHE_ENV = "STREAMCONV_BENCH_CACHE"
# --source-dtype: torch's name for it and its item size
SOURCE_DTYPES = {"bf16": ("bfloat16", 2), "fp32": ("float32", 4)}
ADAM_BYTES = 12  # fp32 exp_avg, exp_avg_sq and master weights: 3 x 4 bytes per parameter


@dataclass(frozen=True)
class Profile:
    name: str
    layers: int
    vocab_size: int = 64000
    n_embd: int = 6144
    n_head: int = 48
    n_inner: int = 24576
    n_positions: int = 2048

    def model(self, layers: int | None = None) -> SyntheticModel:
        return SyntheticModel(n_embd=self.n_embd, n_layer=self.layers if layers is None else layers,
                              n_head=self.n_head, n_inner=self.n_inner, vocab_size=self.vocab_size,
                              n_positions=self.n_positions)


PROFILES = {
    # One 20B layer with a quarter of the vocabulary: 1.13 GB, the same largest tensor as the big profiles.
    "small": Profile("small", layers=1, vocab_size=16000),
    "medium": Profile("medium", layers=2),  # 2.62 GB
    "large": Profile("large", layers=8),  # 8.06 GB
    # GPT-SW3 40B's shapes, two layers: 4.30 GB, an MLP weight of 0.54 GB (its largest tensor)
    "40b": Profile("40b", layers=2, n_embd=8192, n_head=64, n_inner=32768),
}
# For the CI memory baseline: the interpreter, torch and streamconv's imports, almost no tensor bytes.
TINY = Profile("tiny", layers=1, vocab_size=2048, n_embd=64, n_head=4, n_inner=256, n_positions=64)


def default_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "streamconv-bench")


def itemsize(dtype: str) -> int:
    return SOURCE_DTYPES[dtype][1]


def torch_dtype(dtype: str):
    import torch

    return getattr(torch, SOURCE_DTYPES[dtype][0])


def nemo_weight_bytes(model: SyntheticModel, itemsize: int = 2) -> int:
    """Bytes of the checkpoint's `state_dict` (vocabulary padded), without building it: benchmarks divide by it."""
    h, f = model.n_embd, model.ffn
    layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (f * h + f) + (h * f + h)
    return itemsize * (model.padded_vocab * h + model.n_positions * h + model.n_layer * layer + 2 * h)


def weight_bytes(model: SyntheticModel, dtype: str = "bf16") -> int:
    """Bytes of the weights in the checkpoint (optimizer state excluded): throughput is measured against them."""
    return nemo_weight_bytes(model, itemsize(dtype))


def largest_rearranged(model: SyntheticModel, dtype: str = "bf16") -> int:
    """Bytes of the largest tensor streamconv must transpose or regroup (QKV or an MLP weight): its memory unit."""
    h, f = model.n_embd, model.ffn
    return itemsize(dtype) * max(3 * h * h, h * h, f * h)


def checkpoint_bytes(model: SyntheticModel, optimizer: bool, dtype: str = "bf16") -> int:
    """Approximate file size: weights, plus fp32 Adam state when asked."""
    weights = weight_bytes(model, dtype)
    return weights + ADAM_BYTES * weights // itemsize(dtype) if optimizer else weights


def stem(profile: Profile, model: SyntheticModel, optimizer: bool, dtype: str) -> str:
    """`medium-L2`, `medium-L2-adam-fp32`: cached bf16 checkpoints keep the names they had before fp32 ones."""
    return f"{profile.name}-L{model.n_layer}{'-adam' if optimizer else ''}{'' if dtype == 'bf16' else '-' + dtype}"


def ensure_checkpoint(profile: Profile, cache: Path, layers: int | None = None, optimizer: bool = False,
                      dtype: str = "bf16") -> Path:
    """The profile's checkpoint in `cache`, generated (atomically, memory-lean) the first time it is asked for."""
    model = profile.model(layers)
    path = cache / f"{stem(profile, model, optimizer, dtype)}.ckpt"
    need = checkpoint_bytes(model, optimizer, dtype)

    def write(partial: Path) -> None:
        from streamconv.demo import make_checkpoint

        make_checkpoint(partial, model, dtype=torch_dtype(dtype), optimizer=optimizer, keep_hf=False)

    # RAM: the NeMo weights, one group's GPT-2 copy, fp32 temporaries
    return _generate_once(path, need, 1.5 * weight_bytes(model, dtype) + 2**30, f"{need / 1e9:.2f} GB, {dtype}", write)


def ensure_parallel(profile: Profile, cache: Path, layers: int | None, tp: int, dtype: str = "bf16") -> Path:
    """The profile's model saved as a plain `.nemo` of `tp` tensor-parallel ranks (same shapes, vocabulary
    padded to 128 x tp as NeMo pads it), generated once into `cache`. Built in RAM: about three copies of
    the weights."""
    model = profile.model(layers)
    need = weight_bytes(model, dtype)

    def write(partial: Path) -> None:
        from benchmarks.parallel import make_parallel

        make_parallel(partial, model, tp=tp, kind="nemo", dtype=torch_dtype(dtype), optimizer=False)

    return _generate_once(cache / f"{stem(profile, model, False, dtype)}-tp{tp}.nemo", need, 3 * need + 2**30,
                          f"{need / 1e9:.2f} GB, {dtype}, {tp} TP ranks", write)


# ---- megatron-core distributed checkpoints ----------------------------------------------------------------

LEGACY = "model.language_model."
MCORE = "model."  # NeMo 1.x keeps megatron-core's GPTModel under `model.`
STACKED = MCORE + "decoder.layers."
# Legacy NeMo names below `encoder.layers.N.` -> megatron-core's below `decoder.layers.` (the layer norms fused
# into the next linear layer, as distributed checkpoints name them whichever layer spec trained the model).
LAYER_NAMES = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "self_attention.query_key_value.": "self_attention.linear_qkv.",
    "self_attention.dense.": "self_attention.linear_proj.",
    "post_attention_layernorm.": "mlp.linear_fc1.layer_norm_",
    "mlp.dense_h_to_4h.": "mlp.linear_fc1.",
    "mlp.dense_4h_to_h.": "mlp.linear_fc2.",
}
OTHER_NAMES = {"embedding.": "embedding.", "encoder.final_layernorm.": "decoder.final_layernorm."}
# Linear layers whose `_extra_state` (Transformer Engine's FP8 metadata; None without) megatron-core saves per layer
# as a ShardedObject, `<key>/shard_<layer>_<layers>`: DCP bytes holding torch.save([state]), written by rank 0.
EXTRA_STATE = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
OPTIMIZER_STATES = ("exp_avg", "exp_avg_sq", "fp32_param")  # megatron-core's `optimizer.state.<state>.<key>`
# NeMo 1.x's distributed checkpoint: metadata.json as megatron-core up to 0.18 writes it; common.pt's training keys
DIST_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                 "common_backend_version": 1}
COMMON_KEYS = {"epoch": 0, "global_step": 100, "pytorch-lightning_version": "2.4.0"}

Chunks = list[tuple[tuple[int, ...], Any]]  # (offsets in the global tensor, this rank's tensor)


def mcore_name(legacy: str) -> tuple[str, int | None]:
    """A legacy NeMo key -> (its megatron-core key, its layer number or None); stacked keys have no number."""
    rest = legacy.removeprefix(LEGACY)
    if rest.startswith("encoder.layers."):
        number, below = rest.removeprefix("encoder.layers.").split(".", 1)
        for old, new in LAYER_NAMES.items():
            if below.startswith(old):
                return STACKED + new + below.removeprefix(old), int(number)
    for old, new in OTHER_NAMES.items():
        if rest.startswith(old):
            return MCORE + new + rest.removeprefix(old), None
    raise ValueError(f"no megatron-core name for {legacy!r}")


def mcore_shards(weights: Mapping, tp: int, rank: int) -> dict[str, tuple[tuple[int, ...], Chunks]]:
    """Rank `rank`'s part of a consolidated legacy NeMo state_dict as megatron-core shards it: key -> (global
    shape, [(offsets, tensor)]). Layers are stacked on a new first axis, one chunk per layer and TP slice;
    a tensor TP splits (on the axis the legacy rank files split it, `benchmarks.parallel.parallel_dim`: QKV and
    fc1 rows, the vocabulary, linear_proj and fc2 columns) gives this rank its slice, a replicated one is
    written by rank 0 only. The chunks are views: nothing is copied here (a column slice is not contiguous,
    which a ShardedTensor's shard must be: its writer copies it)."""
    layers = 1 + max((n for k in weights if (n := mcore_name(k)[1]) is not None), default=-1)
    out: dict[str, tuple[tuple[int, ...], Chunks]] = {}
    for legacy, tensor in weights.items():
        key, layer = mcore_name(legacy)
        axis = parallel_dim(legacy)
        if axis is None:
            piece, start = (tensor, 0) if rank == 0 else (None, 0)
        else:
            if tensor.shape[axis] % tp:
                raise ValueError(f"{legacy}: axis {axis} of {tuple(tensor.shape)} does not split into {tp} TP ranks")
            size = tensor.shape[axis] // tp
            piece, start = tensor.narrow(axis, rank * size, size), rank * size
        offsets = tuple(start if d == axis else 0 for d in range(tensor.dim()))
        if layer is None:
            shape, chunks = out.setdefault(key, (tuple(tensor.shape), []))
        else:
            shape, chunks = out.setdefault(key, ((layers, *tensor.shape), []))
            offsets, piece = (layer, *offsets), None if piece is None else piece.unsqueeze(0)
        if piece is not None:
            chunks.append((offsets, piece))
    return out


def ensure_distributed(profile: Profile, cache: Path, layers: int | None, tp: int, optimizer: bool = False,
                       dtype: str = "bf16") -> Path:
    """The profile's model (the weights of `ensure_checkpoint`'s `.ckpt`, which is generated first and read)
    saved as a NeMo 1.x megatron-core training checkpoint of `tp` tensor-parallel ranks: a torch_dist
    distributed checkpoint folder `<profile>-L<layers>[-adam][-fp32]-tp<tp>.dist`, written by torch's own writer from
    `tp` gloo processes. With `optimizer`, fp32 Adam state beside it (zeros, as the lean `.ckpt`'s)."""
    model = profile.model(layers)
    ckpt = ensure_checkpoint(profile, cache, layers, optimizer, dtype)
    need = checkpoint_bytes(model, optimizer, dtype)
    # RAM: the TP-split tensors, copied once by the writer; per rank, the interpreter and torch
    return _generate_once(cache / f"{ckpt.stem}-tp{tp}.dist", need, weight_bytes(model, dtype) + tp * 2**30,
                          f"{need / 1e9:.2f} GB, {tp} TP ranks, torch_dist",
                          lambda partial: write_distributed(ckpt, partial, tp, optimizer))


def write_distributed(ckpt: Path, folder: Path, tp: int, optimizer: bool = False) -> None:
    """Save the weights and hyper-parameters of the NeMo `.ckpt` at `ckpt` into `folder` as a megatron-core
    torch_dist checkpoint, from `tp` spawned gloo processes (this process never joins a process group)."""
    import torch.multiprocessing as mp

    if folder.exists():
        shutil.rmtree(folder)  # what a run that died left
    folder.mkdir(parents=True)
    rendezvous = folder.with_name(folder.name + ".rendezvous")
    rendezvous.unlink(missing_ok=True)
    try:
        mp.spawn(_write_rank, args=(tp, str(ckpt), str(folder), str(rendezvous), optimizer), nprocs=tp)
    finally:
        rendezvous.unlink(missing_ok=True)


def _write_rank(rank: int, tp: int, ckpt: str, folder: str, rendezvous: str, optimizer: bool) -> None:
    """One TP rank: map the `.ckpt`, hand its own slices to torch's DCP writer as ShardedTensors of several
    chunks each (what megatron-core hands it), and on rank 0 the common state."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed._shard.sharded_tensor import Shard, ShardMetadata, init_from_local_shards

    dist.init_process_group("gloo", init_method=Path(rendezvous).as_uri(), rank=rank, world_size=tp)
    zeros = f"{folder}.zeros{rank}"
    try:
        saved = torch.load(ckpt, mmap=True, weights_only=False, map_location="cpu")
        shards = mcore_shards(saved["state_dict"], tp, rank)
        if optimizer:  # zeros mapped from a sparse file: page cache, not RAM (as the lean .ckpt's)
            with open(zeros, "wb") as f:
                f.truncate(4 * max((t.numel() for _, (_, chunks) in shards.items() for _, t in chunks), default=1))

        def fp32(t: torch.Tensor) -> torch.Tensor:
            return torch.from_file(zeros, shared=False, size=t.numel(), dtype=torch.float32).view(t.shape)

        def sharded(shape: tuple[int, ...], chunks: Chunks, make=lambda t: t):
            local = [Shard(make(t).contiguous(), ShardMetadata(list(offsets), list(t.shape), f"rank:{rank}/cpu"))
                     for offsets, t in chunks]
            return init_from_local_shards(local, *shape)

        state: dict[str, Any] = {}
        for key, (shape, chunks) in shards.items():
            state[key] = sharded(shape, chunks)
        layers = shards[STACKED + "self_attention.linear_qkv.weight"][0][0]
        if rank == 0:
            empty = io.BytesIO()
            torch.save([None], empty)
            for module in EXTRA_STATE:
                for i in range(layers):
                    state[f"{STACKED}{module}._extra_state/shard_{i}_{layers}"] = io.BytesIO(empty.getvalue())
        if optimizer:
            for name in OPTIMIZER_STATES:
                for key, (shape, chunks) in shards.items():
                    state[f"optimizer.state.{name}.{key}"] = sharded(shape, chunks, fp32)
        dcp.save(state, checkpoint_id=folder)
        if rank == 0:
            with open(os.path.join(folder, "metadata.json"), "w") as f:
                json.dump(DIST_METADATA, f)
            torch.save({"hyper_parameters": saved["hyper_parameters"], **COMMON_KEYS},
                       os.path.join(folder, "common.pt"))
        dist.barrier()
    finally:
        if os.path.exists(zeros):
            os.remove(zeros)
        dist.destroy_process_group()


def files_of(path: Path) -> tuple[int, int]:
    """How many files a checkpoint (a file, or a folder) has, and their bytes."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def _generate_once(path: Path, disk: float, ram: float, what: str, write: Callable[[Path], None]) -> Path:
    """`path`, written by `write` into a `.partial` sibling and renamed the first time it is asked for, after
    checking that the cache has the disk and the machine the RAM that writing it needs."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if free < 1.2 * disk + 2**30:
        raise SystemExit(f"not enough disk in {path.parent} for {path.name}: about {disk / 1e9:.1f} GB needed, "
                         f"{free / 1e9:.1f} GB free; free space or set {CACHE_ENV}")
    available = psutil.virtual_memory().available
    if ram > 0.8 * available:
        raise SystemExit(f"generating {path.name} needs about {ram / 1e9:.1f} GB of RAM, "
                         f"{available / 1e9:.1f} GB available; choose fewer layers")
    print(f"generating {path} ({what}), once", flush=True)
    partial = path.with_name(path.name + ".partial")
    write(partial)
    partial.rename(path)
    return path
