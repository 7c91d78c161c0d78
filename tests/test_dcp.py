"""sources/dcp against torch's own distributed-checkpoint writer and reader (dcp_to_torch_save)."""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as torch_dcp
from torch.distributed._shard.sharded_tensor.metadata import TensorProperties as OldTensorProperties
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from streamconv.errors import ConversionError
from streamconv.sources import dcp, torch_zip
from streamconv.sources.records import BITS, MappedFile, check_tiling

_SHARDED_WRITER = """
import os, sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp, torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

def worker(rank, folder, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    g = torch.Generator().manual_seed(0)
    w, v, r = torch.randn(5, 4, generator=g).bfloat16(), torch.randn(3, 6, generator=g), torch.randn(4, generator=g)
    dcp.save({"w": distribute_tensor(w, mesh, [Shard(0)]), "v": distribute_tensor(v, mesh, [Shard(1)]),
              "r": distribute_tensor(r, mesh, [Replicate()]),
              "optimizer.state.exp_avg.w": distribute_tensor(w.float(), mesh, [Shard(0)])}, checkpoint_id=folder)
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1], sys.argv[2]), nprocs=2)
"""


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, no process group: bf16 and fp32 weights beside optimizer state, rng state and objects."""
    folder = tmp_path_factory.mktemp("dcp") / "single"
    g = torch.Generator().manual_seed(1)
    state = {"model.a": torch.randn(4, 3, generator=g).bfloat16(), "model.b": torch.randn(2, 3, generator=g),
             "model.c": torch.randn(2, 3, 5, generator=g).bfloat16(), "model.s": torch.tensor(3.5),
             "optimizer.state.exp_avg.model.a": torch.randn(4, 3, generator=g),
             "optimizer.state.fp32_param.model.c": torch.randn(2, 3, 5, generator=g),
             "rng_state": torch.arange(8, dtype=torch.uint8),
             "model.layer._extra_state": torch.zeros(2), "model.blob": b"not a tensor", "model.n": 5}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch says it assumes a single process)
        torch_dcp.save(state, checkpoint_id=str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Two gloo ranks saving DTensors: rows split unevenly (3 + 2), columns split, one replicated."""
    root = tmp_path_factory.mktemp("dcp")
    script, folder = root / "write.py", root / "sharded"
    script.write_text(_SHARDED_WRITER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([sys.executable, str(script), str(folder), str(port)], check=True, capture_output=True,
                   timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return str(folder)


def torch_tensors(folder, tmp_path) -> dict[str, torch.Tensor]:
    """What torch itself reads from the checkpoint."""
    out = tmp_path / "oracle.pt"
    dcp_to_torch_save(folder, str(out))
    return torch.load(out, weights_only=False)


def assembled(folder: str, tensor: dcp.DcpTensor) -> np.ndarray:
    """The global tensor's bits, put together from its chunks viewed in place in the .distcp files."""
    chunks = [(c, *dcp.chunk_tensor(folder, c)) for c in tensor.chunks]
    out = np.zeros(tensor.shape, BITS[chunks[0][2].itemsize])
    for chunk, file, stored in chunks:
        mapped = MappedFile(file)
        view = mapped.tensor(stored)
        assert mapped.holds(view.bits) and view.dtype == tensor.dtype
        out[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes, strict=True))] = view.bits
        mapped.close()
    return out


def bits(t: torch.Tensor) -> np.ndarray:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).numpy()


@pytest.mark.parametrize("which", ["single", "sharded"])
def test_every_weight_equals_torchs_own_reading_bit_for_bit(which, request, tmp_path):
    folder = request.getfixturevalue(which)
    expected = torch_tensors(folder, tmp_path)
    index = dcp.read_metadata(folder)
    weights = {k for k, v in expected.items() if isinstance(v, torch.Tensor) and dcp.is_weight(k)}
    assert set(index.tensors) == weights
    assert set(index.skipped) == set(expected) - weights
    for fqn, tensor in index.tensors.items():
        assert tensor.dtype == str(expected[fqn].dtype) and tensor.shape == tuple(expected[fqn].shape)
        assert np.array_equal(assembled(folder, tensor), bits(expected[fqn])), fqn
    if which == "sharded":
        assert [c.sizes for c in index.tensors["w"].chunks] == [(3, 4), (2, 4)]
        assert [c.offsets for c in index.tensors["v"].chunks] == [(0, 0), (0, 3)]
        assert {c.file for c in index.tensors["w"].chunks} == {"__0_0.distcp", "__1_0.distcp"}


def test_what_is_not_a_weight_is_never_read(single, tmp_path, monkeypatch):
    """The optimizer, rng and _extra_state chunks and the objects are overwritten with garbage, and no
    archive is opened anywhere in them: the weights still read, equal to torch's reading beforehand."""
    expected = torch_tensors(single, tmp_path)
    folder = copy(single, tmp_path)
    metadata = torch_metadata(folder)
    skipped = set(dcp.read_metadata(folder).skipped)
    regions = [(info.relative_path, info.offset, info.length) for key, info in metadata.storage_data.items()
               if key.fqn in skipped]
    assert len(regions) == 6
    for name, offset, length in regions:
        with open(os.path.join(folder, name), "r+b") as f:
            f.seek(offset)
            f.write(b"\xff" * length)
    opened = []
    real_load = torch_zip.load
    monkeypatch.setattr(torch_zip, "load", lambda path, offset=0, size=None, label=None: (
        opened.append((os.path.basename(path), offset)), real_load(path, offset, size, label))[1])
    index = dcp.read_metadata(folder)
    for fqn, tensor in index.tensors.items():
        assert np.array_equal(assembled(folder, tensor), bits(expected[fqn]))
    assert len(opened) == 4 and not {(name, offset) for name, offset, _ in regions} & set(opened)


def test_old_torch_module_names_and_megatron_fields_are_read(single, tmp_path):
    """TensorProperties from torch.distributed._shard (older torch); megatron-core's extra `mcore_data`."""
    folder = copy(single, tmp_path)
    metadata = torch_metadata(folder)
    for entry in metadata.state_dict_metadata.values():
        if hasattr(entry, "properties"):
            entry.properties = OldTensorProperties(dtype=entry.properties.dtype)
    metadata.mcore_data = {"model.a": {"nd_reformulated_orig_global_shape": (4, 3)}}
    data = save_metadata(folder, metadata)
    assert b"torch.distributed._shard.sharded_tensor.metadata" in data and b"MEM_FORMAT_ENCODING" in data
    index = dcp.read_metadata(folder)
    assert index.tensors["model.a"].dtype == "torch.bfloat16"
    assert index.extra == {"mcore_data": {"model.a": {"nd_reformulated_orig_global_shape": (4, 3)}}}


# --- refusals ---------------------------------------------------------------------------------------

def copy(folder: str, tmp_path) -> str:
    return shutil.copytree(folder, tmp_path / "copy")


def torch_metadata(folder: str):
    with open(os.path.join(folder, ".metadata"), "rb") as f:
        return pickle.load(f)  # (trusted: the tests wrote it)


def save_metadata(folder: str, metadata) -> bytes:
    data = pickle.dumps(metadata)
    with open(os.path.join(folder, ".metadata"), "wb") as f:
        f.write(data)
    return data


def refusal(folder: str, read_chunks: bool = False) -> str:
    with pytest.raises(ConversionError) as caught:
        index = dcp.read_metadata(folder)
        if read_chunks:
            for tensor in index.tensors.values():
                for chunk in tensor.chunks:
                    dcp.chunk_tensor(folder, chunk)
    message = str(caught.value)
    assert "\n" not in message and message.strip() == message
    return message


def storage_of(metadata, fqn: str, index: int = 0):
    return next(info for key, info in metadata.storage_data.items() if key.fqn == fqn and key.index == index)


def test_a_missing_chunk_file_is_named(sharded, tmp_path):
    folder = copy(sharded, tmp_path)
    os.remove(os.path.join(folder, "__1_0.distcp"))
    assert "__1_0.distcp is missing" in refusal(folder)


@pytest.mark.parametrize("name", ["../outside.distcp", "/tmp/outside.distcp", "sub/../../outside.distcp",
                                  "..\\outside.distcp", ".", ""])
def test_a_chunk_file_outside_the_folder_is_refused_unread(sharded, tmp_path, name):
    folder = copy(sharded, tmp_path)
    shutil.copy(os.path.join(folder, "__0_0.distcp"), tmp_path / "outside.distcp")
    metadata = torch_metadata(folder)
    storage_of(metadata, "w").relative_path = name
    save_metadata(folder, metadata)
    assert "not a file name inside the checkpoint folder" in refusal(folder)


def test_a_chunk_file_linked_outside_the_folder_or_not_a_file_is_refused(sharded, tmp_path):
    folder = copy(sharded, tmp_path)
    shutil.move(os.path.join(folder, "__0_0.distcp"), tmp_path / "outside.distcp")
    os.symlink(tmp_path / "outside.distcp", os.path.join(folder, "__0_0.distcp"))
    assert "outside the checkpoint folder" in refusal(folder)
    os.remove(os.path.join(folder, "__0_0.distcp"))
    os.mkfifo(os.path.join(folder, "__0_0.distcp"))  # (opening it would wait for a writer)
    assert "__0_0.distcp is not a regular file" in refusal(folder)


def test_a_chunk_past_the_end_of_its_file_is_refused(sharded, tmp_path):
    folder = copy(sharded, tmp_path)
    metadata = torch_metadata(folder)
    r, optimizer = storage_of(metadata, "r"), storage_of(metadata, "optimizer.state.exp_avg.w", 1)
    assert r.relative_path == optimizer.relative_path == "__1_0.distcp"
    path = os.path.join(folder, "__1_0.distcp")
    os.truncate(path, optimizer.offset + optimizer.length - 1)
    dcp.read_metadata(folder)  # (the optimizer's chunk is not looked at)
    os.truncate(path, r.offset + r.length - 1)
    assert f"__1_0.distcp is truncated: .metadata puts a chunk of 'r' at bytes {r.offset}" in refusal(folder)


def test_two_chunks_of_a_tensor_at_the_same_bytes_are_refused(sharded, tmp_path):
    """Both halves of 'v' (columns 0..2 and 3..5, each a valid [3, 3] archive) pointing at the first half's bytes
    would read as a whole tensor of repeated columns."""
    folder = copy(sharded, tmp_path)
    metadata = torch_metadata(folder)
    first, second = storage_of(metadata, "v", 0), storage_of(metadata, "v", 1)
    second.relative_path, second.offset, second.length = first.relative_path, first.offset, first.length
    save_metadata(folder, metadata)
    assert (f".metadata is damaged (the chunks of 'v' at [0, 0] and [0, 3] are the same bytes, {first.length} at "
            f"byte {first.offset} of {first.relative_path}); copy the checkpoint again") in refusal(folder, True)


def test_stream_transforms_are_refused_by_name(sharded, tmp_path):
    folder = copy(sharded, tmp_path)
    metadata = torch_metadata(folder)
    storage_of(metadata, "v").transform_descriptors = ["stream.zstd/1"]  # what torch's ZStandard extension writes
    save_metadata(folder, metadata)
    assert "stream.zstd/1" in refusal(folder)


def test_a_chunk_that_disagrees_with_the_metadata_is_refused(single, tmp_path):
    folder = copy(single, tmp_path)
    metadata = torch_metadata(folder)
    metadata.state_dict_metadata["model.a"].properties.dtype = torch.float16
    save_metadata(folder, metadata)
    assert "is a torch.bfloat16 [4, 3], but .metadata says torch.float16 [4, 3]" in refusal(folder, True)
    entry = metadata.state_dict_metadata["model.a"]
    entry.properties.dtype = torch.bfloat16
    entry.size = entry.chunks[0].sizes = torch.Size([3, 4])
    save_metadata(folder, metadata)
    assert "is a torch.bfloat16 [4, 3], but .metadata says torch.bfloat16 [3, 4]" in refusal(folder, True)


@pytest.mark.parametrize("change, expected", [
    (lambda chunks: chunks.pop(), "leave a gap at [3, 0]"),
    (lambda chunks: chunks.append(chunks[0]), "overlap (2 of them hold the element at [0, 0])"),
    (lambda chunks: setattr(chunks[1], "sizes", torch.Size([3, 4])), "past the tensor's end"),
])
def test_chunks_that_do_not_tile_the_tensor_are_refused(sharded, tmp_path, change, expected):
    folder = copy(sharded, tmp_path)
    metadata = torch_metadata(folder)
    change(metadata.state_dict_metadata["w"].chunks)
    save_metadata(folder, metadata)
    message = refusal(folder)
    assert "the chunks of 'w' [5, 4]" in message and expected in message


def boxes(*spans):
    return [(tuple(o for o, _ in span), tuple(s for _, s in span)) for span in spans]


def test_tiling_overlaps_that_add_up_to_the_volume_are_found():
    # the same row twice and no second row: the element count matches, the tiling does not
    with pytest.raises(ConversionError, match=r"overlap \(2 of them hold the element at \[0, 0\]\)"):
        check_tiling("m", "t", (2, 2), boxes([(0, 1), (0, 2)], [(0, 1), (0, 2)]))
    # [0, 1] held twice, [1, 1] by none
    with pytest.raises(ConversionError, match=r"overlap \(2 of them hold the element at \[0, 1\]\)"):
        check_tiling("m", "t", (2, 4), boxes([(0, 1), (0, 2)], [(0, 2), (2, 2)], [(1, 1), (0, 1)],
                                                  [(0, 1), (1, 1)]))


def test_tiling_is_checked_in_bounded_time():
    # megatron-core's layout: 96 layers x 8 tensor-parallel slices of [96, 3h, h]
    grid = boxes(*[[(layer, 1), (tp * 48, 48), (0, 64)] for layer in range(96) for tp in range(8)])
    start = time.perf_counter()
    check_tiling("m", "t", (96, 384, 64), grid)
    assert time.perf_counter() - start < 2
    # a staircase (valid, but each of its 2000 row slabs cuts all 2000 columns) and a pile of overlapping
    # chunks: refused, quickly
    stairs = boxes(*[[(0, j + 1), (j, 1)] for j in range(2000)], *[[(j + 1, 1999 - j), (j, 1)] for j in range(1999)])
    pile = boxes(*[[(i, 20000 - i), (0, 1)] for i in range(20000)])
    for shape, layout, expected in (((2000, 2000), stairs, "too irregularly"), ((20000, 1), pile, "overlap")):
        start = time.perf_counter()
        with pytest.raises(ConversionError, match=expected):
            check_tiling("m", "t", shape, layout)
        assert time.perf_counter() - start < 5


def test_a_truncated_metadata_is_refused(single, tmp_path):
    folder = copy(single, tmp_path)
    path = os.path.join(folder, ".metadata")
    os.truncate(path, os.path.getsize(path) // 2)
    assert "is truncated or damaged" in refusal(folder)
    os.remove(path)
    assert "not a torch distributed checkpoint" in refusal(folder)
    os.mkfifo(path)  # (opening it would wait for a writer)
    assert ".metadata is not a regular file" in refusal(folder)
    os.remove(path)
    (tmp_path / "elsewhere").write_bytes(b"")
    os.symlink(tmp_path / "elsewhere", path)
    assert "outside the checkpoint folder" in refusal(folder)


class _Evil:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_a_hostile_metadata_runs_nothing_and_is_refused_by_name(single, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = copy(single, tmp_path)
    metadata = torch_metadata(folder)
    metadata.planner_data = _Evil()
    save_metadata(folder, metadata)
    assert "reference to posix.system" in refusal(folder)
    assert not (tmp_path / "pwned").exists()
    metadata.planner_data = None
    metadata.state_dict_metadata["model.a"].chunks[0].offsets = ("x", 0)
    save_metadata(folder, metadata)
    assert "is damaged (a chunk offset of 'model.a' is ('x', 0))" in refusal(folder)
    save_metadata(folder, {"state_dict_metadata": {}})  # not torch's Metadata at all
    assert "holds a dict, not torch's checkpoint Metadata" in refusal(folder)
