"""The CUDA path gives the same bytes as the CPU path (skipped where torch sees no GPU)."""

import os

import pytest
import torch

import streamconv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("ckpt_name", ["bf16_ckpt", "fp32_ckpt"])
@pytest.mark.parametrize("dtype", [None, "fp16"])
def test_cuda_output_bit_identical_to_cpu(request, tmp_path, ckpt_name, dtype):
    source = request.getfixturevalue(ckpt_name)
    cpu, cuda = tmp_path / "cpu", tmp_path / "cuda"
    streamconv.convert(source.path, cpu, vocab_size=source.model.vocab_size, dtype=dtype, shard_size="100KB")
    streamconv.convert(source.path, cuda, vocab_size=source.model.vocab_size, dtype=dtype, shard_size="100KB",
                       device="cuda")
    assert sorted(os.listdir(cpu)) == sorted(os.listdir(cuda))
    for name in os.listdir(cpu):
        assert (cpu / name).read_bytes() == (cuda / name).read_bytes(), name


def test_cuda_device_index(bf16_ckpt, tmp_path):
    result = streamconv.convert(bf16_ckpt.path, tmp_path / "out", vocab_size=1000, device="cuda:0")
    assert streamconv.verify(bf16_ckpt.path, tmp_path / "out", vocab_size=1000) == []
    assert result.tensors == 40
