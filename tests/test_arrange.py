"""The tiled, threaded CPU arrangement against torch's plain permuted copy."""

import pytest
import torch

from streamconv import arrange
from streamconv.arrange import Arranger
from streamconv.recipes.gpt_sw3 import Arrangement


def arrangements():
    heads, hd, h, f = 6, 8, 48, 80
    return [
        (Arrangement("transpose", (f, h), (1, 0)), torch.bfloat16),
        (Arrangement("transpose", (h, f), (1, 0)), torch.float32),
        (Arrangement("qkv_weight", (heads, 3, hd, h), (3, 1, 0, 2)), torch.bfloat16),
        (Arrangement("qkv_bias", (heads, 3, hd), (1, 0, 2)), torch.float16),
        (Arrangement("copy", (f, h), (0, 1)), torch.bfloat16),
    ]


@pytest.mark.parametrize("tile_bytes", [1, 200, 2**20])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
def test_tiles_equal_plain_permute(monkeypatch, tile_bytes, threads, chunk_rows):
    monkeypatch.setattr(arrange, "TILE_BYTES", tile_bytes)
    arranger = Arranger(torch.device("cpu"), threads=threads)
    gen = torch.Generator().manual_seed(0)
    try:
        for arrangement, dtype in arrangements():
            source = torch.randn(arrangement.view, generator=gen).to(dtype)
            expected = source.permute(arrangement.perm).contiguous()
            out = torch.full(arrangement.out_shape, float("nan"), dtype=dtype)
            for start in range(0, source.shape[0], chunk_rows):
                arranger.arrange(out, source[start : start + chunk_rows], arrangement, start)
            assert torch.equal(out, expected), arrangement.name
    finally:
        arranger.close()


def test_cast_while_arranging():
    arranger = Arranger(torch.device("cpu"), threads=2)
    a = Arrangement("transpose", (40, 24), (1, 0))
    source = torch.randn(40, 24).to(torch.bfloat16)
    out = torch.empty(24, 40, dtype=torch.float32)
    arranger.arrange(out, source, a, 0)
    arranger.close()
    assert torch.equal(out, source.t().float())
