"""The plan: every output tensor's name, shape, dtype, shard, header and byte offset, from metadata alone.

Nothing here reads weights, so the plan answers --dry-run, the free-space check, the progress total and
the predicted working memory before a byte moves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from streamconv.errors import ConversionError
from streamconv.formats import safetensors
from streamconv.recipe import TensorRecipe, pieces

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(text: str | int) -> int:
    """Bytes from '5GB' (powers of ten, as huggingface_hub), '4GiB' (powers of two) or a plain count."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", text)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ConversionError(
                f"cannot parse shard size {text!r}; use a byte count or a unit such as 5GB, 500MB, 2GiB"
            )
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConversionError(f"shard size must be positive, got {text!r}")
    return value


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor and where its bytes go: `begin`/`end` are offsets in its shard's data section."""

    recipe: TensorRecipe
    dtype: str  # 'torch.bfloat16'
    begin: int
    end: int

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def itemsize(self) -> int:
        return safetensors.DTYPES[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def pieces(self) -> list[TensorSpec]:
        """The tensor as its sources' pieces (`recipe.pieces`), each with the bytes it fills; itself if one."""
        if not self.recipe.stacked:
            return [self]
        parts = pieces(self.recipe)
        size = self.nbytes // len(parts)
        return [TensorSpec(r, self.dtype, self.begin + k * size, self.begin + (k + 1) * size)
                for k, r in enumerate(parts)]


@dataclass
class Shard:
    """One output file: its tensors in order and its header. A part of a split conversion (`streamconv.parts`)
    holds a run of a shard's tensors under the shard's own name and header."""

    filename: str
    tensors: list[TensorSpec] = field(default_factory=list)
    header: bytes = b""

    @property
    def data_size(self) -> int:
        return self.tensors[-1].end if self.tensors else 0

    @property
    def file_size(self) -> int:
        return len(self.header) + self.data_size


@dataclass
class Plan:
    shards: list[Shard]
    total_size: int  # bytes of tensor data, as the index's metadata.total_size
    family: Any = None  # what made it (a `families.base.Family`, set by planning; the engine never reads it)

    @property
    def tensors(self) -> list[TensorSpec]:
        return [t for shard in self.shards for t in shard.tensors]

    @property
    def is_sharded(self) -> bool:
        return len(self.shards) > 1

    @property
    def file_bytes(self) -> int:
        return sum(s.file_size for s in self.shards)

    def index(self) -> dict:
        """`model.safetensors.index.json`, as transformers and huggingface_hub write it."""
        return {
            "metadata": {"total_size": self.total_size},
            "weight_map": {t.name: s.filename for s in self.shards for t in s.tensors},
        }


def make_plan(recipes: list[TensorRecipe], dtypes: list[str], shard_size: int) -> Plan:
    """Assign tensors to shards greedily in recipe order (huggingface_hub's rule), then lay out each shard."""
    from huggingface_hub import split_state_dict_into_shards_factory

    for r, dtype in zip(recipes, dtypes, strict=True):
        if dtype not in safetensors.DTYPES:
            raise ConversionError(f"source tensor {r.source} has dtype {dtype}, which streamconv does not convert")
    sizes = {r.name: safetensors.tensor_bytes(d, r.shape) for r, d in zip(recipes, dtypes, strict=True)}
    by_name = {r.name: (r, d) for r, d in zip(recipes, dtypes, strict=True)}
    split = split_state_dict_into_shards_factory(
        {r.name: r for r in recipes},  # the splitter only needs sizes, never tensors
        get_storage_size=lambda recipe: sizes[recipe.name],
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=shard_size,
    )
    shards = []
    for filename, names in split.filename_to_tensors.items():
        chosen = [by_name[name] for name in names]
        entries = [(recipe.name, dtype, recipe.shape) for recipe, dtype in chosen]
        spans = safetensors.data_offsets(entries)
        tensors = [TensorSpec(recipe, dtype, *span) for (recipe, dtype), span in zip(chosen, spans, strict=True)]
        shards.append(Shard(filename, tensors, safetensors.header(entries)))
    return Plan(shards=shards, total_size=sum(sizes.values()))
