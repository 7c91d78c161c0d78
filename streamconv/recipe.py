"""What the engine is told about one output tensor: its source, the rows it keeps, how its elements move.

Families produce these records, the planner and the pipeline consume them; neither side imports the other.
An arrangement is written as data: view the source as `view` (built from its shape and the config), then
permute the axes by `perm`. Output bytes are the permuted view, read in row-major order. Examples:
- GPT-2 stores linear weights as Conv1D `[in, out]`; Megatron as `[out, in]`: view `(out, in)`, perm `(1, 0)`.
- Megatron's fused QKV rows are grouped `(heads, 3, head_dim)`, GPT-2's `(3, heads, head_dim)`, and the
  weight is transposed as well: view `(heads, 3, head_dim, in)`, perm `(3, 1, 0, 2)`.
An output may also be some row ranges of its source, concatenated (`TensorRecipe.row_ranges`): Llama's
query, key and value heads out of megatron's fused QKV weight, its gate and up halves out of `linear_fc1`. And it
may be several sources' outputs one after another (`TensorRecipe.stacked`): a mixture of experts' weights fused
into one tensor per layer, each expert moved as a tensor of its own (`pieces`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Arrangement:
    """How a source tensor's elements are laid out in the output: view, then permute."""

    name: str
    view: tuple[int, ...]
    perm: tuple[int, ...]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.view[p] for p in self.perm)

    @property
    def moves(self) -> bool:
        """Whether any element changes place (a transpose or regroup, not a plain copy)."""
        return self.perm != tuple(range(len(self.perm)))


@dataclass(frozen=True)
class TensorRecipe:
    """One output tensor: its name, its source tensor and the expected source shape, its arrangement."""

    name: str
    source: str
    source_shape: tuple[int, ...]
    shape: tuple[int, ...]  # output shape as the Hugging Face model declares it
    arrangement: Arrangement
    # Keep only these [start, stop) row ranges of the source, concatenated in order (vocabulary padding dropped,
    # Llama's q/k/v and gate/up sliced out); the arrangement applies to what is kept. None: every row.
    row_ranges: tuple[tuple[int, int], ...] | None = None
    # More sources after `source`, each taken and arranged alike, their outputs following one another along the
    # output's first axis (`shape[0]` divides among them). Empty: the one source.
    stacked: tuple[str, ...] = ()


def pieces(recipe: TensorRecipe) -> tuple[TensorRecipe, ...]:
    """A recipe as one single-source recipe per source, each filling its share of the output's first axis."""
    if not recipe.stacked:
        return (recipe,)
    sources = (recipe.source, *recipe.stacked)
    shape = (recipe.shape[0] // len(sources), *recipe.shape[1:])
    return tuple(replace(recipe, source=source, shape=shape, stacked=()) for source in sources)


def copy(shape: tuple[int, ...]) -> Arrangement:
    return Arrangement("copy", shape, tuple(range(len(shape))))


def transpose(rows: int, cols: int) -> Arrangement:
    return Arrangement("transpose", (rows, cols), (1, 0))
