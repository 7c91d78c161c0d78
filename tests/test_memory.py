"""Peak memory of a real conversion, measured as the child process's ru_maxrss (touched mmap pages count).

The checkpoints are dozens of times larger than their largest tensor. The bound is derived from the
largest tensor, on top of a baseline measured the same way on a tiny checkpoint (interpreter, numpy and
the converter's own imports).
"""

import os
import sys

import pytest
import torch

from benchmarks.launcher import peak_rss_of
from streamconv import reads
from streamconv.demo import SyntheticModel
from streamconv.formats.safetensors_writer import STAGING_BYTES
from streamconv.pipeline import CHUNK_BYTES

# Hidden 1024, ffn 4096: the largest tensor is an MLP weight, 4096 x 1024 x 2 bytes = 8.4 MB; a layer is 25 MB.
WIDE = dict(n_embd=1024, n_head=16, vocab_size=2048, n_positions=512)
LARGEST = 4096 * 1024 * 2
MiB = 2**20


def cli_peak_rss(ckpt, out, *extra) -> int:
    """Peak RSS in bytes of `streamconv` converting `ckpt` in a child process."""
    return peak_rss_of([sys.executable, "-m", "streamconv", "--checkpoint-path", ckpt, "--save-path", out,
                        "--vocab-size", WIDE["vocab_size"], "--quiet", *extra])


@pytest.fixture(scope="module")
def peaks(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("memory")
    made = {
        "tiny": checkpoints("mem_tiny", SyntheticModel(**{**WIDE, "n_embd": 64, "n_head": 4}, n_layer=1),
                            optimizer=False),
        "12": checkpoints("mem_12", SyntheticModel(**WIDE, n_layer=12), optimizer=False),
        "24": checkpoints("mem_24", SyntheticModel(**WIDE, n_layer=24), optimizer=False),
        "12+adam": checkpoints("mem_12_adam", SyntheticModel(**WIDE, n_layer=12), optimizer=True),
    }
    result = {name: cli_peak_rss(c.path, out / name) for name, c in made.items()}
    sizes = {name: os.path.getsize(c.path) for name, c in made.items()}
    print({k: f"{v / MiB:.0f} MiB peak, {sizes[k] / MiB:.0f} MiB file" for k, v in result.items()})
    return result, sizes


def test_checkpoints_are_large_next_to_their_largest_tensor(peaks):
    _, sizes = peaks
    assert sizes["12"] > 30 * LARGEST and sizes["24"] > 60 * LARGEST
    assert sizes["12+adam"] > 4 * sizes["12"]  # optimizer state is three fp32 copies of bf16 weights


def test_peak_bounded_by_largest_tensor(peaks):
    rss, sizes = peaks
    bound = rss["tiny"] + 4 * LARGEST + 48 * MiB
    for name in ("12", "24", "12+adam"):
        assert rss[name] < bound, f"{name}: peak {rss[name] / MiB:.0f} MiB > bound {bound / MiB:.0f} MiB"
        assert rss[name] - rss["tiny"] < sizes["12"] / 3  # far from holding the model


def test_peak_flat_in_layers_and_optimizer_state(peaks):
    """Twelve more layers (300 MB) or Adam state (four times the weights) move the peak by less than one set of the
    conversion's own buffers (which of them a run has touched at its peak varies by a few 8 MiB chunks)."""
    rss, sizes = peaks
    buffers = (2 + reads.BUFFERS) * LARGEST + STAGING_BYTES
    assert buffers < (sizes["24"] - sizes["12"]) / 4
    assert abs(rss["24"] - rss["12"]) < buffers
    assert rss["12+adam"] - rss["12"] < buffers


def test_dry_run_predicts_working_memory(checkpoints):
    import streamconv

    c = checkpoints("mem_12", SyntheticModel(**WIDE, n_layer=12), optimizer=False)
    result = streamconv.convert(c.path, "unused", dry_run=True, vocab_size=WIDE["vocab_size"])
    # two output buffers of one MLP weight, the read buffers and the writer's staging buffer (a chunk each, here
    # as large as an MLP weight); plus the QKV biases, which are rearranged in memory of their own (3 x n_embd
    # bf16 each, 12 layers)
    assert CHUNK_BYTES == LARGEST
    assert result.working_memory == (2 + reads.BUFFERS) * LARGEST + STAGING_BYTES + 12 * 3 * WIDE["n_embd"] * 2
    assert result.plan.tensors[0].dtype == str(torch.bfloat16)


def test_a_lane_in_order_adds_its_read_and_staging_buffers(checkpoints, peaks, tmp_path):
    """A 64 MiB embedding (8 times the largest tensor) streams in a lane of its own beside the layers
    (`pipeline.lanes`): the prediction adds that lane's read buffers and staging buffer to the layers', and the peak
    stays within the bound above plus those."""
    import streamconv

    c = checkpoints("mem_lanes", SyntheticModel(**{**WIDE, "vocab_size": 32768}, n_layer=2), optimizer=False)
    result = streamconv.convert(c.path, "unused", dry_run=True, vocab_size=32768)
    lane = reads.BUFFERS * CHUNK_BYTES + STAGING_BYTES
    assert result.working_memory == (2 + reads.BUFFERS) * LARGEST + STAGING_BYTES + 2 * 3 * WIDE["n_embd"] * 2 + lane
    rss, _ = peaks
    peak = cli_peak_rss(c.path, tmp_path / "out", "--vocab-size", "32768")
    assert peak < rss["tiny"] + 4 * LARGEST + 48 * MiB + lane, f"peak {peak / MiB:.0f} MiB"


def test_output_buffers_reach_the_arranger_touched_and_whatever_happens():
    """The output buffers are touched page by page in a thread of their own, as far as the conversion will use
    each, and only then handed to the arranger, one by one; a buffer that cannot be touched is handed over all the
    same (the arranger would wait for it)."""
    import queue

    import numpy as np

    from streamconv.pipeline import _touched

    free: list[queue.Queue] = [queue.Queue(), queue.Queue()]
    buffers = [np.full(3 * reads.ALIGN + 5, 7, dtype=np.uint8) for _ in range(2)]
    _touched(buffers, [buffers[0], buffers[1][: reads.ALIGN + 1]], free)
    assert [free[k].get_nowait() is b for k, b in enumerate(buffers)] == [True, True]
    assert (buffers[0][:: reads.ALIGN] == 0).all() and (buffers[0][1 : reads.ALIGN] == 7).all()
    assert list(buffers[1][:: reads.ALIGN]) == [0, 0, 7, 7]
    frozen = np.zeros(reads.ALIGN, dtype=np.uint8)
    frozen.flags.writeable = False
    with pytest.raises(ValueError):
        _touched([frozen], [frozen], free[:1])
    assert free[0].get_nowait() is frozen


@pytest.mark.parametrize("late", [False, True])
def test_the_buffers_are_touched_as_far_as_the_arranger_uses_them(bf16_ckpt, tmp_path, monkeypatch, late):
    """The arranger takes the output buffers in turn: what each one is touched for beforehand (`used_extents`) is
    what the largest tensor it holds needs, so touching them first adds no resident page. So it is when the second
    buffer is handed over late (`late`), after the first has been written and given back: the arranger waits for
    the second rather than take the first again."""
    import time

    import numpy as np

    import streamconv
    from streamconv import pipeline

    real_touched = pipeline._touched

    def touched_late(buffers, extents, free):
        real_touched(buffers[:1], extents[:1], free[:1])
        time.sleep(0.5)
        real_touched(buffers[1:], extents[1:], free[1:])

    if late:
        monkeypatch.setattr(pipeline, "_touched", touched_late)

    predicted, taken, held = [], [], {}
    real_init, real_take, real_arrange = pipeline._Stream.__init__, pipeline._WriteBehind.take, pipeline.arrange_into

    def init(self, plan, checkpoint, *args, **kwargs):
        predicted.extend(pipeline.used_extents(plan, checkpoint))
        real_init(self, plan, checkpoint, *args, **kwargs)

    def take(self, free):
        taken.append(real_take(self, free))
        return taken[-1]

    def arrange(host, spec, *args, **kwargs):
        if taken and np.shares_memory(host, taken[-1]):  # (a small tensor has memory of its own)
            held[id(taken[-1])] = max(held.get(id(taken[-1]), 0), spec.nbytes)
        return real_arrange(host, spec, *args, **kwargs)

    monkeypatch.setattr(pipeline._Stream, "__init__", init)
    monkeypatch.setattr(pipeline._WriteBehind, "take", take)
    monkeypatch.setattr(pipeline, "arrange_into", arrange)
    streamconv.convert(bf16_ckpt.path, tmp_path / "hf", vocab_size=1000)
    order = list(dict.fromkeys(id(b) for b in taken))
    assert len(order) == pipeline.BUFFERS and len(taken) > len(order)  # each buffer used, and used again
    assert predicted == [held[b] + reads.ALIGN for b in order]
