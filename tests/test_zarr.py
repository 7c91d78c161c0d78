"""sources/zarr against checkpoints laid out by hand as megatron-core's zarr backend writes them (and against
zarr itself when it is importable)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from streamconv.errors import ConversionError
from streamconv.sources import zarr as zarr_source
from streamconv.sources.records import MappedFile

_ZARR_DTYPES = {torch.bfloat16: "bfloat16", torch.float32: "<f4", torch.float16: "<f2", torch.float64: "<f8",
                torch.int64: "<i8", torch.int32: "<i4", torch.int16: "<i2", torch.int8: "|i1", torch.uint8: "|u1",
                torch.bool: "|b1"}
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits_of(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's elements as integers of their width (numpy has no bfloat16)."""
    return tensor.contiguous().view(_BITS[tensor.element_size()]).numpy()


def write_array(root, key: str, tensor: torch.Tensor, chunks: tuple[int, ...], **fields) -> None:
    """One array as megatron-core's zarr backend lays it out: `.zarray` and one raw C-order file per chunk,
    edge chunks padded to the full chunk shape."""
    folder = root / key
    folder.mkdir(parents=True)
    meta = {"chunks": list(chunks), "compressor": None, "dtype": _ZARR_DTYPES[tensor.dtype], "fill_value": None,
            "filters": None, "order": "C", "shape": list(tensor.shape), "zarr_format": 2, **fields}
    (folder / ".zarray").write_text(json.dumps(meta, indent=4))
    bits = bits_of(tensor)
    grid = [-(-s // c) if s else 0 for s, c in zip(bits.shape, chunks, strict=True)]
    for index in np.ndindex(*grid):
        box = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks, strict=True))
        padded = np.zeros(chunks, bits.dtype)
        part = bits[box]
        padded[tuple(slice(0, n) for n in part.shape)] = part
        (folder / (".".join(map(str, index)) or "0")).write_bytes(padded.tobytes())


def assemble(tensor: zarr_source.ZarrTensor) -> np.ndarray:
    """The tensor put together from views of its chunk files."""
    parts = [(chunk, MappedFile(chunk.file).tensor(chunk.stored)) for chunk in tensor.chunks]
    out = np.zeros(tensor.shape, parts[0][1].bits.dtype if parts else np.uint8)
    for chunk, part in parts:
        assert part.dtype == tensor.dtype and part.shape == chunk.sizes
        out[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes, strict=True))] = part.bits
    return out


G = torch.Generator().manual_seed(0)
WEIGHTS = {
    # a 2x2 grid whose last row and column of chunks are padded on disk
    "embedding.word_embeddings.weight": (torch.randn(5, 3, generator=G).bfloat16(), (3, 2)),
    # [layers, rows, columns]: one chunk per layer and tensor-parallel slice (TP 2 splits the rows)
    "decoder.layers.self_attention.linear_qkv.weight": (torch.randn(4, 6, 8, generator=G), (1, 3, 8)),
    "decoder.layers.mlp.linear_fc1.layer_norm_weight": (torch.randn(4, 8, generator=G).half(), (1, 8)),
    "decoder.final_layernorm.weight": (torch.randn(7, generator=G).double(), (4,)),
    "scalar": (torch.tensor(-3, dtype=torch.int64), ()),
    "ints": (torch.randint(-100, 100, (3, 2), generator=G, dtype=torch.int8), (2, 2)),
    "bytes": (torch.randint(0, 255, (6,), generator=G, dtype=torch.uint8), (6,)),
    "mask": (torch.rand(2, 3, generator=G) > 0.5, (1, 3)),
    "int32s": (torch.arange(12, dtype=torch.int32).reshape(3, 4), (3, 4)),
    "int16s": (torch.arange(6, dtype=torch.int16), (10,)),  # one chunk, larger than the array
}
GARBAGE = b"\xff not json, and must never be read"


@pytest.fixture
def checkpoint(tmp_path):
    root = tmp_path / "iter_0000010"
    for key, (tensor, chunks) in WEIGHTS.items():
        write_array(root, key, tensor, chunks)
    # skipped unread: optimizer state, zarr's lock folders, extra state, ShardedObjects, the common state
    for key in ("optimizer.state.exp_avg.decoder.final_layernorm.weight", "decoder.final_layernorm.weight.sync",
                "decoder.layers.self_attention.linear_qkv._extra_state", "rng_state.sync"):
        (root / key).mkdir()
        (root / key / ".zarray").write_bytes(GARBAGE)
        (root / key / "0").write_bytes(GARBAGE)
    for key, shard in (("rng_state", "shard_0.0_1.1.pt"), ("decoder.layers.mlp._extra_state", "shard_0_4.pt")):
        (root / key).mkdir()
        (root / key / shard).write_bytes(GARBAGE)
    (root / "common.pt").write_bytes(GARBAGE)
    (root / "metadata.json").write_text('{"sharded_backend": "zarr", "sharded_backend_version": 1}')
    return root


def test_bit_exact(checkpoint, monkeypatch):
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    tensors = zarr_source.read_zarr(checkpoint)
    monkeypatch.undo()
    assert sorted(opened) == sorted(str(checkpoint / key / ".zarray") for key in WEIGHTS)  # no chunk opened
    assert sorted(tensors) == sorted(WEIGHTS)
    for key, (tensor, _) in WEIGHTS.items():
        got = tensors[key]
        assert got.fqn == key and got.dtype == str(tensor.dtype) and got.shape == tuple(tensor.shape)
        assert np.array_equal(assemble(got), bits_of(tensor)), key
    grid = tensors["embedding.word_embeddings.weight"].chunks
    assert [(c.offsets, c.sizes) for c in grid] == [((0, 0), (3, 2)), ((0, 2), (3, 1)), ((3, 0), (2, 2)),
                                                    ((3, 2), (2, 1))]
    assert {c.stored.strides for c in grid} == {(2, 1)}  # (the chunk shape's, not the valid box's)
    assert len(tensors["decoder.layers.self_attention.linear_qkv.weight"].chunks) == 8
    assert tensors["scalar"].chunks[0].file == os.path.realpath(checkpoint / "scalar" / "0")


def test_empty_axis(tmp_path):
    write_array(tmp_path, "w", torch.zeros(0, 4), (0, 2))
    tensor = zarr_source.read_zarr(tmp_path)["w"]
    assert tensor.shape == (0, 4) and tensor.chunks == ()


def test_not_zarr(tmp_path):
    (tmp_path / "model.w").mkdir()
    (tmp_path / "model.w" / "shard_0_1.pt").write_bytes(GARBAGE)
    with pytest.raises(ConversionError, match="not a zarr distributed checkpoint"):
        zarr_source.read_zarr(tmp_path)


def edit(root, key: str, **fields) -> None:
    path = root / key / ".zarray"
    meta = json.loads(path.read_text())
    meta.update(fields)
    path.write_text(json.dumps({k: v for k, v in meta.items() if v != "DROP"}))


KEY = "embedding.word_embeddings.weight"


@pytest.mark.parametrize(("fields", "message"), [
    ({"compressor": {"id": "blosc", "cname": "zstd", "clevel": 5, "shuffle": 1, "blocksize": 0}},
     "compressed with blosc/zstd, which streamconv does not read; re-save the arrays uncompressed"),
    ({"compressor": {"id": "zlib", "level": 1}}, "compressed with zlib,"),
    ({"filters": [{"id": "delta", "dtype": "<f4"}]}, "through the filters delta,"),
    ({"order": "F"}, "Fortran"),
    ({"order": "K"}, "order 'K'"),
    ({"dtype": ">f4"}, "big-endian"),
    ({"dtype": "<c8"}, "zarr dtype '<c8', which streamconv does not convert"),
    ({"dtype": "<V2"}, "zarr dtype '<V2'"),
    ({"dtype": [["a", "<f4"]]}, "zarr dtype"),
    ({"zarr_format": 3}, "zarr format 3"),
    ({"zarr_format": True}, "zarr format True"),
    ({"dimension_separator": "/"}, "nested folders"),
    ({"dimension_separator": "-"}, "damaged .*dimension_separator"),
    ({"shape": [5]}, "differ in rank"),
    ({"shape": [5, 3.0]}, "damaged .*shape"),
    ({"shape": [5, -3]}, "damaged .*shape"),
    ({"chunks": [0, 2]}, "damaged .*empty axis"),
    ({"chunks": "3,2"}, "damaged .*chunks"),
    ({"codecs": []}, "fields \\['codecs'\\] that zarr v2 does not define"),
    ({"order": "DROP"}, "damaged \\(no order\\)"),
    ({"fill_value": [1]}, "damaged .*fill_value"),
])
def test_refused_metadata(checkpoint, fields, message):
    edit(checkpoint, KEY, **fields)
    with pytest.raises(ConversionError, match=message) as caught:
        zarr_source.read_zarr(checkpoint)
    assert "\n" not in str(caught.value) and str(checkpoint / KEY / ".zarray") in str(caught.value)


@pytest.mark.parametrize("text", [b"{not json", b"\xff\xfe", b"[1, 2]", b'{"a": 1, "a": 2}', b"[" * 100_000])
def test_not_json(checkpoint, text):
    (checkpoint / KEY / ".zarray").write_bytes(text)
    with pytest.raises(ConversionError, match="damaged"):
        zarr_source.read_zarr(checkpoint)


def test_zarray_too_large(checkpoint):
    path = checkpoint / KEY / ".zarray"
    path.write_text(path.read_text() + " " * 2**20)
    with pytest.raises(ConversionError, match="more than the 1048576 such a file needs"):
        zarr_source.read_zarr(checkpoint)


def test_missing_chunk(checkpoint):
    (checkpoint / KEY / "1.0").unlink()
    with pytest.raises(ConversionError, match=r"1\.0 is missing: it is the chunk \[1, 0\]"):
        zarr_source.read_zarr(checkpoint)


@pytest.mark.parametrize("size", [11, 13, 0])
def test_wrong_size(checkpoint, size):
    path = checkpoint / KEY / "0.1"
    path.write_bytes(path.read_bytes()[:size].ljust(size, b"\0"))
    with pytest.raises(ConversionError, match=f"0.1 is damaged: it has {size} bytes, .* has 12; copy"):
        zarr_source.read_zarr(checkpoint)


def test_too_many_chunks(checkpoint):
    edit(checkpoint, KEY, shape=[2**40, 3], chunks=[1, 3])
    with pytest.raises(ConversionError, match=f"in {2**40} chunks .* holds 5 files"):
        zarr_source.read_zarr(checkpoint)


def test_link_outside(checkpoint, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.write_bytes(b"\0" * 12)
    (checkpoint / KEY / "0.1").unlink()
    (checkpoint / KEY / "0.1").symlink_to(outside)
    with pytest.raises(ConversionError, match="outside the checkpoint folder"):
        zarr_source.read_zarr(checkpoint)


def test_link_inside(checkpoint):
    folder = checkpoint / KEY
    os.replace(folder / "0.1", checkpoint / "kept")
    (folder / "0.1").symlink_to("../kept")
    assert np.array_equal(assemble(zarr_source.read_zarr(checkpoint)[KEY]), bits_of(WEIGHTS[KEY][0]))


@pytest.mark.parametrize("link", [os.symlink, os.link])
def test_two_chunks_linked_to_the_same_file(checkpoint, link):
    folder = checkpoint / KEY
    (folder / "1.0").unlink()
    link("0.1" if link is os.symlink else folder / "0.1", folder / "1.0")
    with pytest.raises(ConversionError, match=fr"{KEY}/1\.0 is the same file as .*{KEY}/0\.1: two chunks of '{KEY}' "
                       "at the same bytes; the checkpoint is damaged"):
        zarr_source.read_zarr(checkpoint)


@pytest.mark.parametrize("name", ["0.1", ".zarray"])
def test_fifo(checkpoint, name):
    (checkpoint / KEY / name).unlink()
    os.mkfifo(checkpoint / KEY / name)
    with pytest.raises(ConversionError, match="is not a regular file"):
        zarr_source.read_zarr(checkpoint)


def test_real_zarr(tmp_path):
    """What zarr 2 itself writes with megatron-core's arguments reads back bit for bit; its default
    (blosc) compression is refused."""
    zarr = pytest.importorskip("zarr")
    g = np.random.default_rng(0)
    arrays = {"a": (g.standard_normal((5, 3)).astype("<f4"), (2, 2)),
              "b": (g.standard_normal((4, 6, 8)).astype("<f2"), (1, 3, 8)),
              "c": (np.array(2.5, "<f8"), ()), "d": (g.integers(-9, 9, 7).astype("<i4"), (3,))}
    for key, (array, chunks) in arrays.items():
        z = zarr.create(store=str(tmp_path / key), shape=array.shape, dtype=array.dtype, chunks=chunks,
                        compressor=None, fill_value=None, write_empty_chunks=True)
        z[...] = array
    tensors = zarr_source.read_zarr(tmp_path)
    assert sorted(tensors) == sorted(arrays)
    for key, (array, _) in arrays.items():
        assert np.array_equal(assemble(tensors[key]), array.view(f"<i{array.itemsize}"))
    z = zarr.create(store=str(tmp_path / "e"), shape=(4,), dtype="<f4", chunks=(2,))
    z[...] = 1
    with pytest.raises(ConversionError, match="compressed with blosc/lz4"):
        zarr_source.read_zarr(tmp_path)
