"""The CUDA path gives the same bytes as the CPU path (skipped where torch sees no GPU); its flow (device scratch
buffer, arranged by torch, copied back to the host buffer) is also run on the CPU, everywhere."""

import os

import pytest
import torch

import streamconv

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
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


@needs_cuda
def test_cuda_device_index(bf16_ckpt, tmp_path):
    result = streamconv.convert(bf16_ckpt.path, tmp_path / "out", vocab_size=1000, device="cuda:0")
    assert streamconv.verify(bf16_ckpt.path, tmp_path / "out", vocab_size=1000) == []
    assert result.tensors == 40


@pytest.mark.parametrize("source_kind", ["ckpt", "tp2pp2"])
@pytest.mark.parametrize("dtype", [None, "fp32"])
def test_device_flow_on_the_cpu_gives_the_same_bytes(bf16_ckpt, tmp_path, monkeypatch, source_kind, dtype):
    """What --device cuda does, minus the transfers: arrange into a scratch buffer with torch, copy it into the
    host buffer, write that. TP slices included."""
    from benchmarks.parallel import make_parallel
    from streamconv import pipeline
    from streamconv.demo import SyntheticModel

    if source_kind == "ckpt":
        path, vocab = bf16_ckpt.path, bf16_ckpt.model.vocab_size
    else:
        model = SyntheticModel(n_embd=64, n_layer=4, n_head=8, vocab_size=1000, n_positions=64)
        path, vocab = make_parallel(tmp_path / "in.nemo", model, tp=2, pp=2).path, 1000
    expected, actual = tmp_path / "cpu", tmp_path / "device-flow"
    streamconv.convert(path, expected, vocab_size=vocab, dtype=dtype, shard_size="100KB")
    scratches = []
    real_init = pipeline._Stream.__init__

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        scratches.append(self.scratch)

    monkeypatch.setattr(pipeline, "arranges_on_device", lambda device: True)
    monkeypatch.setattr(pipeline._Stream, "__init__", recording_init)
    streamconv.convert(path, actual, vocab_size=vocab, dtype=dtype, shard_size="100KB")
    monkeypatch.undo()
    assert len(scratches) == 1 and scratches[0] is not None  # arranged in the scratch, then copied to the host
    assert sorted(os.listdir(expected)) == sorted(os.listdir(actual))
    for name in os.listdir(expected):
        assert (expected / name).read_bytes() == (actual / name).read_bytes(), name
