"""Shard sizes, the index, headers and offsets, and size strings."""

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open

import streamconv
from streamconv.errors import ConversionError
from streamconv.plan import parse_size


@pytest.mark.parametrize("text,expected", [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("64KB", 64_000), ("1.5GB", 1_500_000_000),
    ("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("4KiB", 4096), ("123456", 123456), ("10 mb", 10**7),
    (7, 7), ("1TB", 10**12),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["0", "0GB", "abc", "5XB", "-1GB", "", "GB", 0])
def test_parse_size_rejects(text):
    with pytest.raises(ConversionError, match="shard size"):
        parse_size(text)


def read_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


@pytest.mark.parametrize("limit", [50_000, 200_000, 10**9])
def test_shards_within_limit_and_index_complete(bf16_ckpt, tmp_path, limit):
    out = tmp_path / "hf"
    result = streamconv.convert(bf16_ckpt.path, out, shard_size=limit, vocab_size=1000)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    names = [t.name for t in result.plan.tensors]
    sizes = {}
    for file in files:
        header_len, header = read_header(out / file)
        assert header.pop("__metadata__") == {"format": "pt"}
        data = sum(e - b for b, e in (v["data_offsets"] for v in header.values()))
        # the data section is exactly the tensors, back to back, and the file ends with it
        spans = sorted(tuple(v["data_offsets"]) for v in header.values())
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        assert os.path.getsize(out / file) == 8 + header_len + data
        assert (8 + header_len) % 8 == 0
        if len(header) > 1:
            assert data <= limit, f"{file} holds {data} bytes > {limit}"
        sizes.update({k: (file, e - b) for k, (b, e) in ((k, v["data_offsets"]) for k, v in header.items())})
    assert sorted(sizes) == sorted(names)
    total = sum(n for _, n in sizes.values())
    if len(files) == 1:
        assert files == ["model.safetensors"] and not os.path.exists(out / "model.safetensors.index.json")
    else:
        assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["metadata"] == {"total_size": total}
        assert index["weight_map"] == {k: f for k, (f, _) in sizes.items()}
    assert result.bytes == total


def test_tensor_larger_than_limit_sits_alone(bf16_ckpt, tmp_path):
    out = tmp_path / "hf"
    streamconv.convert(bf16_ckpt.path, out, shard_size="100KB", vocab_size=1000)  # wte is 128,000 bytes
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["transformer.wte.weight"]
    assert [k for k, f in index["weight_map"].items() if f == shard] == ["transformer.wte.weight"]
    with safe_open(out / shard, framework="pt") as f:
        assert f.get_slice("transformer.wte.weight").get_shape() == [1000, 64]


def test_plan_order_is_layer_by_layer(bf16_ckpt):
    result = streamconv.convert(bf16_ckpt.path, "unused", dry_run=True, vocab_size=1000)
    names = [t.name for t in result.plan.tensors]
    assert names[:2] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert names[-2:] == ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    layers = [int(n.split(".")[2]) for n in names if n.startswith("transformer.h.")]
    assert layers == sorted(layers) and len(names) == 2 + 12 * 3 + 2
    assert all(t.dtype == str(torch.bfloat16) for t in result.plan.tensors)
