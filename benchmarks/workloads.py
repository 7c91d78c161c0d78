"""Synthetic GPT-SW3 checkpoints for the benchmarks, generated once into a cache folder outside the repository.

Profiles keep the tensor shapes of the real GPT-SW3 20B model (hidden 6144, 48 heads, ffn 24576, bf16) and
scale by layer count, so the largest tensor, which sets streamconv's memory, is the real one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from streamconv.testing import SyntheticModel, nemo_weight_bytes

CACHE_ENV = "STREAMCONV_BENCH_CACHE"
ITEMSIZE = 2  # bf16
ADAM_FACTOR = 6  # fp32 exp_avg, exp_avg_sq and master weights: 3 x 4 bytes per 2-byte weight


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
}
# For the CI memory baseline: the interpreter, torch and streamconv's imports, almost no tensor bytes.
TINY = Profile("tiny", layers=1, vocab_size=2048, n_embd=64, n_head=4, n_inner=256, n_positions=64)


def default_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "streamconv-bench")


def weight_bytes(model: SyntheticModel) -> int:
    """Bytes of the weights in the checkpoint (optimizer state excluded): throughput is measured against them."""
    return nemo_weight_bytes(model, ITEMSIZE)


def largest_rearranged(model: SyntheticModel) -> int:
    """Bytes of the largest tensor streamconv must transpose or regroup (QKV or an MLP weight): its memory unit."""
    h, f = model.n_embd, model.ffn
    return ITEMSIZE * max(3 * h * h, h * h, f * h)


def checkpoint_bytes(model: SyntheticModel, optimizer: bool) -> int:
    """Approximate file size: weights, plus fp32 Adam state when asked."""
    weights = weight_bytes(model)
    return weights * (1 + ADAM_FACTOR) if optimizer else weights


def ensure_checkpoint(profile: Profile, cache: Path, layers: int | None = None, optimizer: bool = False) -> Path:
    """The profile's checkpoint in `cache`, generated (atomically, memory-lean) the first time it is asked for."""
    model = profile.model(layers)
    path = cache / f"{profile.name}-L{model.n_layer}{'-adam' if optimizer else ''}.ckpt"
    need = checkpoint_bytes(model, optimizer)

    def write(partial: Path) -> None:
        import torch

        from streamconv.testing import make_checkpoint

        make_checkpoint(partial, model, dtype=torch.bfloat16, optimizer=optimizer, keep_hf=False)

    # RAM: the NeMo weights, one group's GPT-2 copy, fp32 temporaries
    return _generate_once(path, need, 1.5 * weight_bytes(model) + 2**30, f"{need / 1e9:.2f} GB", write)


def ensure_parallel(profile: Profile, cache: Path, layers: int | None, tp: int) -> Path:
    """The profile's model saved as a plain `.nemo` of `tp` tensor-parallel ranks (same shapes, vocabulary
    padded to 128 x tp as NeMo pads it), generated once into `cache`. Built in RAM: about three copies of
    the weights."""
    model = profile.model(layers)
    need = weight_bytes(model)

    def write(partial: Path) -> None:
        import torch

        from streamconv.testing import make_parallel

        make_parallel(partial, model, tp=tp, kind="nemo", dtype=torch.bfloat16, optimizer=False)

    return _generate_once(cache / f"{profile.name}-L{model.n_layer}-tp{tp}.nemo", need, 3 * need + 2**30,
                          f"{need / 1e9:.2f} GB, {tp} TP ranks", write)


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
