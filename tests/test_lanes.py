"""Lanes (`pipeline.lanes`): runs of tensors that go through in order, streamed beside the tensors arranged in
memory, write the very files one lane writes, fail as one conversion, and show in --debug."""

import logging
import os
import shutil
import threading

import pytest

import streamconv
from streamconv import pipeline
from streamconv.arrange import Arranger
from streamconv.formats import safetensors_writer
from streamconv.formats.safetensors_writer import ShardWriter
from tests.test_convert import _direct_io
from tests.test_parts import assert_same_folder

ONE_LANE = 2**62


def _lanes_made(monkeypatch, lane_bytes: int) -> list:
    """Set LANE_BYTES; record every `lanes` call's plan, lanes, the names of the plan's tensors that go through
    in order (none of their pieces arranged in memory) and the lanes the plan would have on a GPU."""
    seen, real = [], pipeline.lanes

    def recording(plan, checkpoint, device):
        made = real(plan, checkpoint, device)
        through = {t.name for t in plan.tensors if not any(
            pipeline.buffered(p, pipeline.source_of(p, checkpoint), device) for p in t.pieces())}
        seen.append((plan, made, through, real(plan, checkpoint, "cuda")))
        return made

    monkeypatch.setattr(pipeline, "LANE_BYTES", lane_bytes)
    monkeypatch.setattr(pipeline, "lanes", recording)
    return seen


def _runs(shard) -> list[list]:
    """A lane's tensors in one shard, as runs of neighbours in the file."""
    runs: list[list] = []
    for spec in shard.tensors:
        if runs and runs[-1][-1].end == spec.begin:
            runs[-1].append(spec)
        else:
            runs.append([spec])
    return runs


@pytest.mark.parametrize("shard_size", ["5GB", "100KB"])
def test_runs_in_order_of_at_least_lane_bytes_get_their_own_lane(bf16_ckpt, tmp_path, monkeypatch, shard_size):
    seen = _lanes_made(monkeypatch, 64 * 1024)
    streamconv.convert(bf16_ckpt.path, tmp_path / "hf", vocab_size=1000, shard_size=shard_size)
    plan, (arranging, in_order), through, on_gpu = seen[-1]
    assert sorted(t.name for t in arranging.tensors + in_order.tensors) == sorted(t.name for t in plan.tensors)
    # the run before the first tensor arranged (the first layer's QKV): the embeddings and the first layer norm, or
    # (in shards of 100 kB) the word embeddings (128 kB) alone in theirs, the rest of the run in the next shard
    assert {t.name for t in in_order.tensors} == {"transformer.wte.weight"} | (
        {"transformer.wpe.weight", "transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias"}
        if shard_size == "5GB" else set())
    for shard in arranging.shards + in_order.shards:
        original = next(s for s in plan.shards if s.filename == shard.filename)
        assert shard.header == original.header
        assert [t.begin for t in shard.tensors] == sorted(t.begin for t in shard.tensors)
    for shard in in_order.shards:
        assert all(sum(t.nbytes for t in run) >= 64 * 1024 and {t.name for t in run} <= through
                   for run in _runs(shard))
    assert not any(t.name in through for t in arranging.tensors if t.nbytes >= 64 * 1024)
    assert on_gpu == [plan]  # (arranged there: the CPU is free to stream)

    monkeypatch.setattr(pipeline, "LANE_BYTES", ONE_LANE)
    streamconv.convert(bf16_ckpt.path, tmp_path / "one", vocab_size=1000, shard_size=shard_size)
    assert seen[-1][1] == [seen[-1][0]]


def _direct_writes(monkeypatch) -> list[tuple[str, int, int]]:
    """Record (file name, offset, bytes) of every write through an O_DIRECT descriptor."""
    seen, direct, real_open, real_pwritev = [], {}, os.open, os.pwritev

    def opening(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_DIRECT:
            direct[fd] = os.path.basename(path)
        return fd

    def writing(fd, buffers, offset, *args):
        n = real_pwritev(fd, buffers, offset, *args)
        if fd in direct:
            seen.append((direct[fd], offset, n))
        return n

    monkeypatch.setattr(os, "open", opening)
    monkeypatch.setattr(os, "pwritev", writing)
    return seen


def _lane_bytes(lane) -> dict[str, list[tuple[int, int]]]:
    """The file bytes each of a lane's runs covers, by file name (the header with the run at the shard's start)."""
    spans: dict[str, list[tuple[int, int]]] = {}
    for shard in lane.shards:
        for run in _runs(shard):
            first = 0 if run[0].begin == 0 else len(shard.header) + run[0].begin
            spans.setdefault(shard.filename, []).append((first, len(shard.header) + run[-1].end))
    return spans


@pytest.mark.parametrize("lane_bytes,dtype,shard_size,io", [
    (64 * 1024, None, "5GB", "direct"),
    (1, "fp16", "100KB", "direct"),  # every run in order in a lane of its own: lanes skip each other all along
    (1, None, "100KB", "refused at open"),  # a filesystem without O_DIRECT
    (1, None, "100KB", "refused midway"),
])
def test_two_lanes_write_the_files_one_lane_writes(bf16_ckpt, tmp_path, monkeypatch, lane_bytes, dtype,
                                                    shard_size, io):
    """Two lanes write the very files one lane writes; every direct write lies within one run of one lane (the
    blocks where the lanes' runs meet go through the page cache, from both sides)."""
    monkeypatch.setattr(safetensors_writer, "STAGING_BYTES", 64 * 1024)
    monkeypatch.setattr(safetensors_writer, "UNSTAGED_BYTES", 8 * 1024)
    if io != "direct":
        _direct_io(monkeypatch, refuse_open=io == "refused at open", refuse_io=io == "refused midway")
    writes = _direct_writes(monkeypatch)
    seen = _lanes_made(monkeypatch, ONE_LANE)
    streamconv.convert(bf16_ckpt.path, tmp_path / "one", vocab_size=1000, dtype=dtype, shard_size=shard_size)
    monkeypatch.setattr(pipeline, "LANE_BYTES", lane_bytes)
    del writes[:]
    streamconv.convert(bf16_ckpt.path, tmp_path / "two", vocab_size=1000, dtype=dtype, shard_size=shard_size)
    assert len(seen[-1][1]) == 2
    skipping = [shard for lane in seen[-1][1] for shard in lane.shards if len(_runs(shard)) > 1]
    assert bool(skipping) == (lane_bytes == 1)
    assert_same_folder(tmp_path / "two", tmp_path / "one")
    files = {shard.filename for shard in seen[-1][0].shards}
    assert {name for name, _, _ in writes} == (files if io == "direct" else set())
    runs = [_lane_bytes(lane) for lane in seen[-1][1]]
    for name, offset, n in writes:
        assert any(a <= offset and offset + n <= b for lane in runs for a, b in lane.get(name, [])), (name, offset)


def test_parts_with_lanes_make_the_single_runs_folder(bf16_ckpt, tmp_path, monkeypatch):
    seen = _lanes_made(monkeypatch, ONE_LANE)
    streamconv.convert(bf16_ckpt.path, tmp_path / "one", vocab_size=1000, shard_size="100KB")
    monkeypatch.setattr(pipeline, "LANE_BYTES", 1)
    for index in range(2):
        streamconv.convert(bf16_ckpt.path, tmp_path / "parts", vocab_size=1000, shard_size="100KB",
                           part=(index, 2))
        assert len(seen[-1][1]) == 2
    assert_same_folder(tmp_path / "parts", tmp_path / "one")


@pytest.mark.parametrize("lane,error", [
    ("in order", OSError(5, "Input/output error")),
    ("arranging", RuntimeError("arranging failed")),
    ("arranging", KeyboardInterrupt()),
])
def test_a_failure_in_one_lane_stops_the_other(bf16_ckpt, tmp_path, monkeypatch, lane, error):
    """The lane that did not fail waits (in its first step, if it gets that far) until the failure has stopped the
    lanes, then takes no other step, where a whole conversion takes more than ten: the conversion raises the
    failure itself, leaves nothing behind, and no thread of its runs on."""
    monkeypatch.setattr(pipeline, "CHUNK_BYTES", 4096)  # the embedding in 32 chunks
    monkeypatch.setattr(pipeline, "WRITE_QUEUE", 2)
    _lanes_made(monkeypatch, 64 * 1024)
    calls, stops = {"in order": 0, "arranging": 0}, []
    real_append, real_arrange, real_init = ShardWriter.append, Arranger.arrange, pipeline._Stream.__init__

    def step(name):
        calls[name] += 1
        if name == failing:
            raise error
        if failing is not None:  # until the failure has reached the lanes' shared stop
            assert stops[-1].wait(30)

    def init(self, plan, checkpoint, device, on_bytes, clock=None, stop=None):
        stops.append(stop)  # (the stop the lanes share)
        real_init(self, plan, checkpoint, device, on_bytes, clock, stop)

    def append(self, data):
        if self.shard.tensors[0].name == "transformer.wte.weight":  # the lane in order's writer
            step("in order")
        real_append(self, data)

    def arrange(self, *args, **kwargs):
        step("arranging")
        real_arrange(self, *args, **kwargs)

    monkeypatch.setattr(ShardWriter, "append", append)
    monkeypatch.setattr(Arranger, "arrange", arrange)
    monkeypatch.setattr(pipeline._Stream, "__init__", init)
    failing = None
    streamconv.convert(bf16_ckpt.path, tmp_path / "whole", vocab_size=1000)
    whole = dict(calls)
    shutil.rmtree(tmp_path / "whole")
    calls.update({"in order": 0, "arranging": 0})
    failing = lane
    with pytest.raises(type(error)) as raised:
        streamconv.convert(bf16_ckpt.path, tmp_path / "hf", vocab_size=1000)
    assert raised.value is error
    other = "arranging" if lane == "in order" else "in order"
    assert calls[lane] == 1 and calls[other] <= 1 and whole[other] > 10, (calls, whole)
    assert os.listdir(tmp_path) == []
    assert not [t for t in threading.enumerate() if t.name.startswith("streamconv")]


def test_debug_says_where_each_lanes_threads_spent_their_time(bf16_ckpt, tmp_path, monkeypatch, caplog):
    _lanes_made(monkeypatch, 64 * 1024)
    with caplog.at_level(logging.DEBUG, logger="streamconv.pipeline"):
        streamconv.convert(bf16_ckpt.path, tmp_path / "hf", vocab_size=1000)
    lines = sorted(r.getMessage() for r in caplog.records if r.name == "streamconv.pipeline")
    assert [line.split(": ", 1)[0] for line in lines] == ["lane arranging", "lane in order"]
    assert all("; arranger: " in line and "; reader: " in line and "; writer: " in line for line in lines)


def test_no_second_lane_where_arranging_moves_whole_rows(mcore_cases, tmp_path, monkeypatch):
    """A Llama model at TP 2 is arranged by whole rows (slices joined, QKV regrouped), at memory speed: one lane,
    however small LANE_BYTES. Cast to fp16, it is arranged element by element, and the tensors in order stream
    beside it, writing the files one lane writes."""
    from tests.test_mcore_writer import _have_megatron_core

    if not _have_megatron_core():
        pytest.skip("megatron-core is not installed")
    (case,) = mcore_cases({"gqa_nemo1_tp2": dict(groups=2, layout="nemo1", tp=2)}).values()
    seen = _lanes_made(monkeypatch, 1)
    streamconv.convert(case.checkpoint, tmp_path / "plain", vocab_size=256)
    plan, made, through, _ = seen[-1]
    assert made == [plan] and len(through) < len(plan.tensors)  # (some tensors are arranged)
    streamconv.convert(case.checkpoint, tmp_path / "two", vocab_size=256, dtype="fp16")
    assert len(seen[-1][1]) == 2
    monkeypatch.setattr(pipeline, "LANE_BYTES", ONE_LANE)
    streamconv.convert(case.checkpoint, tmp_path / "one", vocab_size=256, dtype="fp16")
    assert_same_folder(tmp_path / "two", tmp_path / "one")


def _covers(spans, lo: int, hi: int) -> bool:
    """Whether the union of the (start, end) `spans` covers [lo, hi)."""
    reached = lo
    for a, b in sorted(spans):
        if a <= reached < b:
            reached = b
    return reached >= hi


def test_without_direct_io_each_lane_drops_from_the_cache_only_what_it_wrote(bf16_ckpt, tmp_path, monkeypatch):
    """On a filesystem without O_DIRECT a writer waits for and drops from the page cache, window by window and at
    the end of each run, only bytes it wrote itself, never the other lane's, and every run it leaves for the
    other lane's has gone from the cache."""
    monkeypatch.setattr(safetensors_writer, "WINDOW", 8 * 1024)
    _direct_io(monkeypatch, refuse_open=True)
    seen = _lanes_made(monkeypatch, 1)
    current, names, written, dropped = {}, {}, {}, {}  # (an output descriptor's number is reused: one key an open)
    real_open, real_pwrite, real_fadvise = os.open, os.pwrite, os.posix_fadvise

    def opening(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        current.pop(fd, None)
        if flags & os.O_WRONLY:
            current[fd] = len(names)
            names[current[fd]] = os.path.basename(path)
        return fd

    def writing(fd, data, offset):
        n = real_pwrite(fd, data, offset)
        if fd in current:
            written.setdefault(current[fd], []).append((offset, offset + n))
        return n

    def advising(fd, offset, length, advice):
        if fd in current and advice == os.POSIX_FADV_DONTNEED:
            dropped.setdefault(current[fd], []).append((offset, offset + length))
        return real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(os, "open", opening)
    monkeypatch.setattr(os, "pwrite", writing)
    monkeypatch.setattr(os, "posix_fadvise", advising)
    streamconv.convert(bf16_ckpt.path, tmp_path / "hf", vocab_size=1000, shard_size="100KB")
    assert len(seen[-1][1]) == 2
    for key, spans in dropped.items():
        assert all(_covers(written[key], lo, hi) for lo, hi in spans), names[key]
    left = [(name, span) for lane in seen[-1][1] for name, spans in _lane_bytes(lane).items() for span in spans[:-1]]
    assert left, "no lane left a run for the other's"
    for name, (a, b) in left:
        assert _covers([span for key, spans in dropped.items() if names[key] == name for span in spans], a, b)


def test_an_empty_tensor_joins_the_run_it_lies_in(monkeypatch):
    """An empty tensor arranged in memory (a transpose of nothing) at a shard's start goes with the run in order
    after it, so only one lane has tensors at the start: the one that writes the header."""
    import numpy as np

    from streamconv.plan import make_plan
    from streamconv.recipe import Arrangement, TensorRecipe
    from streamconv.sources.records import Checkpoint, SourceTensor

    monkeypatch.setattr(pipeline, "LANE_BYTES", 64)
    shapes = {"empty": (0, 4), "embedding": (64, 4), "matrix": (4, 4)}
    checkpoint = Checkpoint("unused", {name: SourceTensor(np.zeros(shape, np.int16), "torch.bfloat16")
                                       for name, shape in shapes.items()}, None)
    recipes = [TensorRecipe(name, name, shape, shape[::-1] if name != "embedding" else shape,
                            Arrangement("transpose" if name != "embedding" else "copy", shape,
                                        (1, 0) if name != "embedding" else (0, 1)))
               for name, shape in shapes.items()]
    plan = make_plan(recipes, ["torch.bfloat16"] * 3, 10**9)
    arranging, in_order = pipeline.lanes(plan, checkpoint, "cpu")
    assert [t.name for t in in_order.tensors] == ["empty", "embedding"]
    assert [t.name for t in arranging.tensors] == ["matrix"]
    assert in_order.tensors[0].begin == 0 < arranging.tensors[0].begin
