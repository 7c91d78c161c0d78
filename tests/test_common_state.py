"""megatron-core >= 0.17 writes no common.pt: the common state (Megatron-LM's `args`, NeMo's `hyper_parameters`) is a
bytes item `common_state/shard_0_1` of the torch_dist checkpoint, the torch.save archive of `[state]`.

Here megatron-core 0.16.1's checkpoints are re-saved that way with torch's own DCP writer (the same bytes item
megatron-core 0.19's ShardedObject becomes); the checkpoints megatron-core 0.19.2 itself wrote are in
tests/fixtures/. Oracle: megatron-core's logits of the model.
"""

from __future__ import annotations

import io
import shutil

import pytest
import torch
from torch.distributed.checkpoint import DefaultSavePlanner

import streamconv
from streamconv.sources import dcp as dcp_source
from tests.mcore_models import ITERATION
from tests.test_llama import VOCAB, llama_logits
from tests.test_mcore import refused
from tests.test_mcore_writer import _have_megatron_core, tensors, whole

if not _have_megatron_core():
    pytest.skip("megatron-core is not installed", allow_module_level=True)

CASES = {"megatron_lm": dict(groups=2, layout="megatron_lm", tp=2, dtype="fp32"),
         "nemo1_train": dict(groups=2, layout="nemo1_train", tp=2, dtype="fp32")}


@pytest.fixture(scope="module")
def cases(mcore_cases):
    return mcore_cases(CASES)


def as_0_19(case, tmp_path, edit=None, legacy_edit=None):
    """The case's checkpoint re-saved as megatron-core 0.19 lays it out: the weights, and the common state as the
    bytes item instead of common.pt (`edit(state)` changes that state first; with `legacy_edit`, a common.pt so
    changed is kept beside it)."""
    import torch.distributed.checkpoint as dcp

    iteration = case.checkpoint / f"iter_{ITERATION:07d}"  # (Megatron-LM's run folder; else the folder itself)
    original = iteration if iteration.is_dir() else case.checkpoint
    root = shutil.copytree(case.checkpoint, tmp_path / "ckpt")
    folder = root / original.relative_to(case.checkpoint)
    state = torch.load(folder / "common.pt", weights_only=False)  # (our own file)
    for name in [*folder.glob("*.distcp"), folder / ".metadata", folder / "common.pt"]:
        name.unlink()
    if legacy_edit is not None:
        legacy = torch.load(original / "common.pt", weights_only=False)
        legacy_edit(legacy)
        torch.save(legacy, folder / "common.pt")
    if edit is not None:
        edit(state)
    buffer = io.BytesIO()
    torch.save([state], buffer)
    buffer.seek(0)
    dcp.save({**tensors(whole(original)), dcp_source.COMMON_STATE: buffer}, checkpoint_id=str(folder),
             planner=_BytesAsTheyAre())
    return root


class _BytesAsTheyAre(DefaultSavePlanner):
    """Writes a bytes item's bytes as they are, as megatron-core's own planner does (torch's default would
    torch.save the BytesIO once more)."""

    def transform_object(self, write_item, object):
        return object


def _softmax_scale(state):
    state["args"].softmax_scale = 0.5


@pytest.mark.parametrize("name", CASES)
def test_the_common_state_item_gives_the_hyper_parameters(cases, tmp_path, name):
    case = cases[name]
    folder = as_0_19(case, tmp_path)
    result = streamconv.convert(folder, tmp_path / "hf", vocab_size=VOCAB)
    assert result.config["rope_theta"] == 500000.0 and result.config["num_key_value_heads"] == 2
    assert (llama_logits(tmp_path / "hf", case.input_ids) - case.logits_fp32).abs().max() < 1e-4
    assert streamconv.verify(folder, tmp_path / "hf") == []


def test_a_legacy_common_pt_wins(cases, tmp_path):
    """megatron-core's loader prefers common.pt where one exists: so does streamconv."""
    folder = as_0_19(cases["megatron_lm"], tmp_path, legacy_edit=_softmax_scale)
    assert "the cfg sets softmax_scale 0.5" in refused(folder, tmp_path)


def test_the_common_state_is_read_as_data(cases, tmp_path):
    """Its `args` go through the same rules as common.pt's: a forward-changing setting is refused by name."""
    folder = as_0_19(cases["megatron_lm"], tmp_path, edit=_softmax_scale)
    assert "the cfg sets softmax_scale 0.5" in refused(folder, tmp_path)
