"""The CPU arrangement (numpy strips over threads, on raw bits) and the torch one against torch's permuted copy."""

import numpy as np
import pytest
import torch

from streamconv import arrange
from streamconv.arrange import Arranger, TorchArranger
from streamconv.recipe import Arrangement
from streamconv.sources.records import BITS


def arrangements():
    heads, hd, h, f = 6, 8, 48, 80
    return [
        (Arrangement("transpose", (f, h), (1, 0)), torch.bfloat16),
        (Arrangement("transpose", (h, f), (1, 0)), torch.float32),
        (Arrangement("transpose", (7, 5), (1, 0)), torch.float16),
        (Arrangement("qkv_weight", (heads, 3, hd, h), (3, 1, 0, 2)), torch.bfloat16),
        (Arrangement("qkv_bias", (heads, 3, hd), (1, 0, 2)), torch.float16),
        (Arrangement("copy", (f, h), (0, 1)), torch.bfloat16),
    ]


def bits(tensor: torch.Tensor) -> np.ndarray:
    return tensor.view(getattr(torch, BITS[tensor.element_size()].__name__)).numpy()


@pytest.mark.parametrize("strip_rows", [1, 3, 16])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
def test_strips_equal_torch_permute(monkeypatch, strip_rows, threads, chunk_rows):
    monkeypatch.setattr(arrange, "STRIP_ROWS", strip_rows)
    arranger = Arranger(threads=threads)
    gen = torch.Generator().manual_seed(0)
    try:
        for arrangement, dtype in arrangements():
            source = torch.randn(arrangement.view, generator=gen).to(dtype)
            expected = source.permute(arrangement.perm).contiguous()
            out = torch.full(arrangement.out_shape, float("nan"), dtype=dtype)
            for start in range(0, source.shape[0], chunk_rows):
                arranger.arrange(bits(out), bits(source[start : start + chunk_rows]), arrangement, start)
            assert torch.equal(out, expected), arrangement.name
    finally:
        arranger.close()


@pytest.mark.parametrize("chunk_rows", [3, 40])
def test_torch_arranger_casts_while_arranging(chunk_rows):
    a = Arrangement("transpose", (40, 24), (1, 0))
    source = torch.randn(40, 24).to(torch.bfloat16)
    out = torch.empty(24, 40, dtype=torch.float32)
    arranger = TorchArranger("cpu", "torch.bfloat16")
    for start in range(0, 40, chunk_rows):
        arranger.arrange(out, bits(source[start : start + chunk_rows]), a, start)
    assert torch.equal(out, source.t().float())


CASTS = [(torch.bfloat16, torch.float16), (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
         (torch.float32, torch.float16), (torch.float16, torch.bfloat16), (torch.float16, torch.float32)]


def with_specials(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` starting with infinities, a NaN, subnormals and an overflow for the narrower dtypes (at the start:
    torch casts those elements in its vector loop, whose NaN bits streamconv's casts follow)."""
    flat = tensor.reshape(-1).clone()
    flat[:8] = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e-7, -3e-6, 7e4, 0.0, -0.0])
    return flat.view(tensor.shape)


@pytest.mark.parametrize("source_dtype, target_dtype", CASTS)
@pytest.mark.parametrize("threads, chunk_rows, strip_rows", [(1, 1000, 16), (2, 3, 3), (3, 4, 16)])
def test_casts_while_arranging_equal_torch(monkeypatch, source_dtype, target_dtype, threads, chunk_rows,
                                           strip_rows):
    """Cast and arranged in one pass (strips through a scratch, other arrangements in blocks of rows), equal to
    torch's cast of its permuted copy bit for bit."""
    monkeypatch.setattr(arrange, "STRIP_ROWS", strip_rows)
    monkeypatch.setattr(arrange, "CAST_ROWS_BYTES", 64)  # several blocks even for these small tensors
    arranger = Arranger(threads=threads)
    gen = torch.Generator().manual_seed(1)
    names = (str(source_dtype), str(target_dtype))
    try:
        for arrangement, _ in arrangements():
            source = with_specials(torch.randn(arrangement.view, generator=gen).to(source_dtype))
            expected = source.to(target_dtype).permute(arrangement.perm).contiguous()
            out = torch.zeros(arrangement.out_shape, dtype=target_dtype)
            for start in range(0, source.shape[0], chunk_rows):
                arranger.arrange(bits(out), bits(source[start : start + chunk_rows]), arrangement, start, names)
            assert np.array_equal(bits(out), bits(expected)), (arrangement.name, names)
    finally:
        arranger.close()


@pytest.mark.parametrize("source_dtype, target_dtype", CASTS)
def test_threaded_cast_equals_torch(source_dtype, target_dtype):
    gen = torch.Generator().manual_seed(2)
    source = with_specials(torch.randn(3 * 2**18 + 5, generator=gen).to(source_dtype))  # uneven shares, 3 threads
    out = torch.zeros(source.shape, dtype=target_dtype)
    arranger = Arranger(threads=3)
    try:
        arranger.cast(bits(out), bits(source), str(source_dtype), str(target_dtype))
    finally:
        arranger.close()
    assert np.array_equal(bits(out), bits(source.to(target_dtype)))
