"""The head start: the pickle read without torch, the leading copies made while torch imports, adopted
only when they are exactly what the conversion would write, and never left behind."""

import errno
import os
import subprocess
import sys

import pytest
import torch

import streamconv
from streamconv import head_start
from streamconv.cli import main
from streamconv.errors import ConversionError
from streamconv.sources import open_checkpoint, torch_zip
from streamconv.testing import SyntheticModel, make_checkpoint, make_parallel

MODEL = SyntheticModel(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=64)


@pytest.fixture(params=[torch.bfloat16, torch.float32])
def ckpt(request, tmp_path):
    return make_checkpoint(tmp_path / "in.ckpt", MODEL, dtype=request.param, optimizer=True).path


def files_of(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_peek_describes_every_tensor_as_load_maps_it(ckpt, tmp_path):
    extra = tmp_path / "extra.ckpt"  # plus a strided view and a parameter, as torch.save may keep them
    payload = torch.load(ckpt, weights_only=False)
    payload["state_dict"]["model.strided"] = torch.arange(24, dtype=torch.float16).view(4, 6).t()[1:]
    payload["state_dict"]["model.parameter"] = torch.nn.Parameter(torch.ones(3, 5, dtype=torch.bfloat16))
    torch.save(payload, extra)
    peeked = torch_zip.peek(str(extra))["state_dict"]
    with open_checkpoint(extra) as checkpoint:
        assert peeked.keys() == checkpoint.tensors.keys()
        for name, tensor in checkpoint.tensors.items():
            stored = peeked[name]
            assert isinstance(stored, torch_zip.StoredTensor), name
            assert (stored.dtype, stored.shape, stored.contiguous) == \
                (str(tensor.dtype), tuple(tensor.shape), tensor.is_contiguous()), name
            assert stored.offset == checkpoint.file_offset(tensor)[1], name
            if stored.contiguous:
                assert stored.nbytes == tensor.nbytes, name
    assert peeked["model.strided"].contiguous is False


def test_peek_and_head_start_import_no_torch(ckpt):
    code = ("import sys; from streamconv import head_start; from streamconv.sources import torch_zip; "
            f"p = torch_zip.peek({str(ckpt)!r}); assert p['state_dict']; print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_peek_runs_no_code_from_the_pickle(tmp_path):
    from tests.test_safety import Exploit

    path, sentinel = tmp_path / "in.ckpt", tmp_path / "pwned"
    make_checkpoint(path, MODEL, optimizer=False)
    payload = torch.load(path, weights_only=False)
    payload["state_dict"]["model.evil"] = Exploit(os.system, f"touch {sentinel}")
    payload["callbacks"] = {"Evil": Exploit(eval, f"open({str(sentinel)!r}, 'w')")}
    torch.save(payload, path)
    peeked = torch_zip.peek(str(path))
    assert type(peeked["state_dict"]["model.evil"]).__name__ == "Refused"
    assert not sentinel.exists()
    # the head start copies nothing for a checkpoint the conversion refuses
    head = head_start.begin(path, tmp_path / "out")
    head.close()
    assert head.plan is None and head.writer is None
    assert main(["--checkpoint-path", str(path), "--save-path", str(tmp_path / "out"), "--quiet"]) == 2
    assert sorted(os.listdir(tmp_path)) == ["in.ckpt"] and not sentinel.exists()


def test_adopted_head_start_gives_the_same_files(ckpt, tmp_path):
    plain = tmp_path / "plain"
    streamconv.convert(ckpt, plain, vocab_size=1000, shard_size="100KB")
    head = head_start.begin(ckpt, tmp_path / "out", shard_size="100KB", vocab_size=1000)
    try:
        result = streamconv.convert(ckpt, tmp_path / "out", vocab_size=1000, shard_size="100KB", head_start=head)
    finally:
        head.close()
    assert head.adopted
    # wte (1024 padded rows cut to 1000), wpe, the first layer norm: everything before the first QKV
    assert [spec.name for spec, _ in head.leading] == [
        "transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
        "transformer.h.0.ln_1.bias"][: head.count]
    assert head.count >= 1 and head.writer.written == head.leading[-1][0].end
    assert result.shards > 1
    assert f"{head.writer.written / 1e3:.1f} kB copied while torch was imported" in result.summary()
    assert head.copy_started >= head.started and result.seconds >= result.stream_seconds > 0
    assert files_of(tmp_path / "out") == files_of(plain)
    assert sorted(os.listdir(tmp_path)) == ["in.ckpt", "out", "plain"]


def test_head_start_planned_otherwise_is_discarded(ckpt, tmp_path):
    """A head start made for other arguments (here another shard size) is thrown away, files and all."""
    plain = tmp_path / "plain"
    streamconv.convert(ckpt, plain, vocab_size=1000)
    head = head_start.begin(ckpt, tmp_path / "out", shard_size="100KB", vocab_size=1000)
    try:
        streamconv.convert(ckpt, tmp_path / "out", vocab_size=1000, head_start=head)
    finally:
        head.close()
    assert head.count >= 1 and not head.adopted
    assert files_of(tmp_path / "out") == files_of(plain)
    assert sorted(os.listdir(tmp_path)) == ["in.ckpt", "out", "plain"]


def test_head_start_write_error_is_reported_and_cleaned_up(ckpt, tmp_path, monkeypatch):
    real = head_start.ShardWriter.append_from_file

    def full_disk(self, *args):
        if self.shard.tensors[0].name == "transformer.wte.weight" and self.written > 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args)

    monkeypatch.setattr(head_start, "PIECE", 4096)
    monkeypatch.setattr(head_start.ShardWriter, "append_from_file", full_disk)
    head = head_start.begin(ckpt, tmp_path / "out", vocab_size=1000)
    try:
        with pytest.raises(ConversionError, match="could not write .*No space left on device"):
            streamconv.convert(ckpt, tmp_path / "out", vocab_size=1000, head_start=head)
    finally:
        head.close()
    assert head.adopted
    assert sorted(os.listdir(tmp_path)) == ["in.ckpt"]


def test_failing_conversion_removes_the_head_start(ckpt, tmp_path, capsys):
    """The head start is under way when the conversion refuses an argument torch must judge."""
    out = tmp_path / "out"
    assert main(["--checkpoint-path", str(ckpt), "--save-path", str(out), "--device", "tpu"]) == 2
    assert "device 'tpu'" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["in.ckpt"]


def test_head_start_only_for_a_single_checkpoint_file(tmp_path):
    nemo = make_parallel(tmp_path / "m.nemo", MODEL, tp=2, kind="nemo").path
    ckpt = make_checkpoint(tmp_path / "in.ckpt", MODEL, optimizer=False).path
    assert head_start.begin(nemo, tmp_path / "a") is None
    assert head_start.begin(tmp_path, tmp_path / "b") is None
    assert head_start.begin(ckpt, tmp_path / "c", tokenizer_path=str(tmp_path / "t.model")) is None
    assert sorted(os.listdir(tmp_path)) == ["in.ckpt", "m.nemo"]


def test_conversion_failing_mid_copy_stops_the_head_start_first(ckpt, tmp_path, monkeypatch):
    """The first shard's descriptor is closed only once the head start's thread has stopped writing to it."""
    import threading
    import time

    from streamconv import arrange

    real = head_start.ShardWriter.append_from_file
    calls = []

    def slow(self, *args):
        calls.append(self.written)
        time.sleep(0.002)
        return real(self, *args)

    def boom(*args, **kwargs):
        raise RuntimeError("arranging failed")

    monkeypatch.setattr(head_start, "PIECE", 512)
    monkeypatch.setattr(head_start.ShardWriter, "append_from_file", slow)
    monkeypatch.setattr(arrange.Arranger, "arrange", boom)
    head = head_start.begin(ckpt, tmp_path / "out", vocab_size=1000)
    try:
        with pytest.raises(RuntimeError, match="arranging failed"):
            streamconv.convert(ckpt, tmp_path / "out", vocab_size=1000, head_start=head)
        assert not [t for t in threading.enumerate() if t.name == "streamconv-head-start"]
        stopped_at = len(calls)
        assert stopped_at > 0 and head.writer.written < head.leading[-1][0].end  # stopped part way
    finally:
        head.close()
    assert len(calls) == stopped_at
    assert sorted(os.listdir(tmp_path)) == ["in.ckpt"]


def _torch_zip(path, pickled: bytes, storage: bytes = bytes(16)) -> str:
    """A torch zip file with this data.pkl and one storage, "0" (as torch.save lays them out)."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickled)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", storage)
    return str(path)


def _tensor_pickle(offset=0, size=(2,), stride=(1,), build=None) -> bytes:
    """{'w': a float32 tensor of storage "0" (4 elements)}, via torch's own rebuild global; `build` adds a
    BUILD (state) on the storage-type global or on the rebuild global, as a hostile pickle could."""
    import pickle
    from collections import OrderedDict

    class Storage:
        pass

    class Tensor:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (Storage(), offset, size, stride, False, OrderedDict()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 4) if isinstance(obj, Storage) else None

    import io

    out = io.BytesIO()
    Pickler(out, protocol=2).dump({"w": Tensor()})
    data = out.getvalue()
    if build == "storage type":  # FloatStorage's stand-in told it holds bfloat16, for every later peek
        data = data[:2] + b"ctorch\nFloatStorage\n]X\x08\x00\x00\x00bfloat16ab0" + data[2:]
    if build == "rebuild":  # the v2 stand-in told it is v3
        data = data[:2] + b"ctorch._utils\n_rebuild_tensor_v2\n(NK\x01tb0" + data[2:]
    return data


@pytest.mark.parametrize("case,kwargs", [
    ("negative offset", {"offset": -1}),
    ("past the storage", {"offset": 3}),
    ("strided past the storage", {"size": (2,), "stride": (4,)}),
    ("negative stride", {"size": (2,), "stride": (-1,)}),
    ("state of a stand-in", {"build": "storage type"}),
    ("state of a rebuild stand-in", {"build": "rebuild"}),
])
def test_peek_refuses_tensors_outside_their_storage_and_state_changes(tmp_path, case, kwargs):
    good = torch_zip.peek(_torch_zip(tmp_path / "good.ckpt", _tensor_pickle()))["w"]
    assert good == torch_zip.StoredTensor("torch.float32", (2,), good.offset, True)
    with pytest.raises(ConversionError, match="damaged"):
        torch_zip.peek(_torch_zip(tmp_path / "bad.ckpt", _tensor_pickle(**kwargs)))
    assert torch_zip.peek(_torch_zip(tmp_path / "again.ckpt", _tensor_pickle()))["w"] == good  # nothing changed
