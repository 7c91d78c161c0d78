"""streamconv.casts against torch's own `.to()` on the CPU, bit for bit: every 16-bit pattern, the float32 specials
and millions of random float32 patterns."""

import numpy as np
import pytest
import torch

from streamconv.casts import cast

DTYPES = {"torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16, "torch.float32": torch.float32}
INTS = {2: (np.int16, torch.int16), 4: (np.int32, torch.int32)}


def torch_cast(bits: np.ndarray, source: str, target: str) -> np.ndarray:
    """torch's cast through its vector loop (a tensor shorter than a register, or a tail, may take the scalar
    path, whose NaNs differ): each pattern is repeated 64 times and the first copy kept."""
    repeated = np.repeat(bits, 64)
    out = torch.from_numpy(repeated).view(DTYPES[source]).to(DTYPES[target])[::64].contiguous()
    return out.view(INTS[out.element_size()][1]).numpy()


def every_16_bit_pattern() -> np.ndarray:
    return np.arange(-(2**15), 2**15, dtype=np.int32).astype(np.int16)


def float32_patterns(n: int = 2_000_000, seed: int = 0) -> np.ndarray:
    """Random patterns plus the specials: zeros, subnormals, infinities, NaNs with payloads, rounding ties."""
    rng = np.random.default_rng(seed)
    specials = np.array([0, 0x80000000, 1, 0x807FFFFF, 0x007FFFFF, 0x00800000, 0x7F800000, 0xFF800000,
                         0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7FFFFFFF, 0xFFFFFFFF,
                         0x7F7FFFFF, 0xFF7FFFFF, 0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x7F7F8000,
                         0x477FF000, 0x477FE000, 0x38800000, 0x33800000, 0x33000000, 0x33000001],
                        dtype=np.uint32)
    ties = (rng.integers(0, 2**16, 100_000, dtype=np.uint32) << 16) | 0x8000  # exactly half a bfloat16 step
    return np.concatenate([specials, ties, rng.integers(0, 2**32, n, dtype=np.uint32)]).view(np.int32)


@pytest.mark.parametrize("source, target", [("torch.bfloat16", "torch.float32"), ("torch.float16", "torch.float32"),
                                            ("torch.bfloat16", "torch.float16"), ("torch.float16", "torch.bfloat16")])
def test_every_16_bit_pattern_casts_as_torch_does(source, target):
    bits = every_16_bit_pattern()
    assert np.array_equal(cast(bits, source, target), torch_cast(bits, source, target))


@pytest.mark.parametrize("target", ["torch.bfloat16", "torch.float16"])
def test_float32_narrows_as_torch_does(target):
    bits = float32_patterns()
    got, expected = cast(bits, "torch.float32", target), torch_cast(bits, "torch.float32", target)
    wrong = np.flatnonzero(got != expected)
    assert wrong.size == 0, [(hex(bits.view(np.uint32)[i]), hex(got.view(np.uint16)[i]),
                              hex(expected.view(np.uint16)[i])) for i in wrong[:5]]


def test_the_same_dtype_is_the_same_array():
    bits = every_16_bit_pattern()
    assert cast(bits, "torch.bfloat16", "torch.bfloat16") is bits
