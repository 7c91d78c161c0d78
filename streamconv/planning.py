"""Phase 1, the plan: the model family a checkpoint is, its settings checked, every output tensor mapped to its
source and placed in a shard, and the Hugging Face config; metadata only, no weight is read."""

from __future__ import annotations

from streamconv import families, tokenizer
from streamconv.errors import ConversionError
from streamconv.families import settings
from streamconv.families.base import MAX_SIZE, number
from streamconv.pipeline import split_view_axis
from streamconv.plan import Plan, make_plan
from streamconv.recipe import pieces
from streamconv.sources import Checkpoint
from streamconv.sources.records import Split


def build_plan(checkpoint: Checkpoint, shard_size: int, dtype: str | None, vocab_size: int | None,
               num_heads: int | None = None, family: str | None = None) -> tuple[Plan, dict]:
    """Recipes checked against the checkpoint's tensors, output dtypes, the shard plan and the HF config, for the
    model family the checkpoint shows (`family`: the one --family forces)."""
    if checkpoint.hparams is None and num_heads is None:
        raise ConversionError(
            f"{checkpoint.path} has no {checkpoint.config_name}; pass --num-heads N to convert it anyway "
            "(the other sizes are read from the tensor shapes)"
        )
    if vocab_size is None and checkpoint.vocab_size is not None:  # (the true vocabulary, as Megatron-Bridge says it)
        vocab_size = number("vocab_size", checkpoint.vocab_size, int, above=0, high=MAX_SIZE)
    if vocab_size is None and checkpoint.tokenizer is not None:
        vocab_size = tokenizer.vocab_size(checkpoint.tokenizer)
    shapes = {k: t.shape for k, t in checkpoint.tensors.items()}
    chosen = families.choose(checkpoint.hparam, shapes, family)
    settings.check(checkpoint.hparam, chosen.settings, chosen.architecture)
    if family is not None:
        families.check_forced(chosen, checkpoint.hparam, shapes)
    if vocab_size is None and checkpoint.tokenizer_files and not chosen.sentencepiece:
        vocab_size = tokenizer.hf_vocab_size(checkpoint.tokenizer_files)
    dims = chosen.read_dims(checkpoint.hparam, shapes, vocab_size, num_heads, checkpoint.local_slices)
    wanted = chosen.tensor_recipes(dims)
    each = [piece for r in wanted for piece in pieces(r)]  # (a tensor of several sources: each one's own recipe)
    for r in each:  # every shape first, then how tensor-parallel slices divide
        if r.source not in shapes:
            raise ConversionError(f"source tensor {r.source!r} is missing from the checkpoint's state_dict")
        if shapes[r.source] != r.source_shape:
            source = checkpoint.tensors[r.source]
            missing = f"; with {len(source.parts)} tensor-parallel ranks found, is one missing?" \
                if isinstance(source, Split) else ""
            raise ConversionError(
                f"source tensor {r.source!r} has shape {shapes[r.source]}, expected {r.source_shape} "
                f"from the checkpoint's cfg{missing}"
            )
    unused = sorted(set(shapes) - {r.source for r in each} - {k for k in shapes if _not_a_weight(k)})
    if unused:
        raise ConversionError(f"the checkpoint holds {len(unused)} tensor(s) that the {chosen.name} mapping has no "
                              f"place for, such as {unused[0]!r}: converting would drop them; is this another "
                              "architecture (biases, extra norms, experts)?")
    for r in each:
        source = checkpoint.tensors[r.source]
        if isinstance(source, Split) and source.axis != 0 and r.row_ranges is not None and len(r.row_ranges) > 1:
            raise ConversionError(f"source tensor {r.source!r} is stored in slices side by side (axis {source.axis}), "
                                  f"and {r.name!r} takes rows out of it; megatron-core slices it by rows: is the "
                                  "checkpoint from another writer?")
        if isinstance(source, Split) and r.row_ranges is None and r.arrangement.moves:
            sliced = r.arrangement.view[split_view_axis(r.source_shape, r.arrangement.view, source.axis)]
            if sliced % len(source.parts):
                raise ConversionError(
                    f"source tensor {r.source!r} is sliced across {len(source.parts)} tensor-parallel ranks, which "
                    f"do not divide its {sliced} {'heads' if r.arrangement.name.startswith('qkv') else 'rows'}; check "
                    "num_attention_heads (--num-heads) against the checkpoint"
                )
    for r in wanted:
        stored = {checkpoint.tensors[piece.source].dtype for piece in pieces(r)}
        if len(stored) > 1:
            raise ConversionError(f"the sources of {r.name!r} ({r.source!r}, ...) differ in dtype ({sorted(stored)}); "
                                  "streamconv fuses tensors of one dtype: pass --dtype to cast them alike")
    dtypes = [dtype or checkpoint.tensors[r.source].dtype for r in wanted]
    plan = make_plan(wanted, dtypes, shard_size)
    plan.family = chosen
    config = chosen.hf_config(checkpoint.hparam, dims, dtypes[0].removeprefix("torch."))
    return plan, config


def _not_a_weight(key: str) -> bool:
    """Tensors a checkpoint may hold beside the weights (recomputed buffers), which no output needs."""
    return key.endswith(("._extra_state", ".inv_freq"))
