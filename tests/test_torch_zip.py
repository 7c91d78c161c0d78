"""The checkpoint read without torch: every tensor where torch.load finds it, no code run, hostile
pickles refused, and no torch imported by a conversion that does not cast."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from streamconv.cli import main
from streamconv.demo import SyntheticModel, make_checkpoint
from streamconv.errors import ConversionError
from streamconv.sources import open_checkpoint, torch_zip

MODEL = SyntheticModel(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=64)


@pytest.fixture(params=[torch.bfloat16, torch.float32])
def ckpt(request, tmp_path):
    return make_checkpoint(tmp_path / "in.ckpt", MODEL, dtype=request.param, optimizer=True).path


def test_every_tensor_is_viewed_where_torch_load_finds_it(ckpt, tmp_path):
    extra = tmp_path / "extra.ckpt"  # plus a strided view and a parameter, as torch.save may keep them
    payload = torch.load(ckpt, weights_only=False)
    payload["state_dict"]["model.strided"] = torch.arange(24, dtype=torch.float16).view(4, 6).t()[1:]
    payload["state_dict"]["model.parameter"] = torch.nn.Parameter(torch.ones(3, 5, dtype=torch.bfloat16))
    torch.save(payload, extra)
    expected = torch.load(extra, weights_only=False)["state_dict"]
    with open_checkpoint(extra) as checkpoint:
        assert checkpoint.tensors.keys() == expected.keys()
        for name, tensor in expected.items():
            source = checkpoint.tensors[name]
            assert (source.dtype, source.shape) == (str(tensor.dtype), tuple(tensor.shape)), name
            as_bits = tensor.contiguous().view(getattr(torch, source.bits.dtype.name)).numpy()
            assert np.array_equal(source.bits, as_bits), name
            assert not source.bits.flags.writeable, name
        assert not checkpoint.tensors["model.strided"].bits.flags.c_contiguous


def test_a_conversion_on_the_cpu_never_imports_torch(ckpt, tmp_path):
    code = ("import sys; from streamconv.cli import main; "
            f"main(['--checkpoint-path', {str(ckpt)!r}, '--save-path', sys.argv[1], '--vocab-size', '1000', "
            "'--quiet', *sys.argv[2:]]); print('torch' in sys.modules)")
    for name, extra, imported in (("plain", [], "False"), ("verified", ["--verify"], "False"),
                                  ("cast", ["--dtype", "fp16"], "False"), ("cast-verified", ["--verify"], "False")):
        out = tmp_path / {"verified": "plain", "cast-verified": "cast"}.get(name, name)
        proc = subprocess.run([sys.executable, "-c", code, str(out), *extra], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == imported, name
        assert "OK" in proc.stdout if name.endswith("verified") else (out / "model.safetensors").exists()


def test_load_runs_no_code_from_the_pickle(tmp_path):
    from tests.test_safety import Exploit

    path, sentinel = tmp_path / "in.ckpt", tmp_path / "pwned"
    make_checkpoint(path, MODEL, optimizer=False)
    payload = torch.load(path, weights_only=False)
    payload["state_dict"]["model.evil"] = Exploit(os.system, f"touch {sentinel}")
    payload["callbacks"] = {"Evil": Exploit(eval, f"open({str(sentinel)!r}, 'w')")}
    torch.save(payload, path)
    with pytest.raises(ConversionError, match="reference to posix.system, .* tampered"):
        torch_zip.load(str(path))
    payload["state_dict"]["model.evil"] = Exploit(print, "hi")  # harmless and unknown: an inert placeholder
    payload["callbacks"] = {}
    torch.save(payload, path)
    loaded = torch_zip.load(str(path))
    assert type(loaded["state_dict"]["model.evil"]).__name__ == "Refused"
    assert not sentinel.exists()
    assert main(["--checkpoint-path", str(path), "--save-path", str(tmp_path / "out"), "--quiet"]) == 2
    assert sorted(os.listdir(tmp_path)) == ["in.ckpt"] and not sentinel.exists()


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
    if build == "storage type":  # FloatStorage's stand-in told it holds bfloat16, for every later load
        data = data[:2] + b"ctorch\nFloatStorage\n]X\x08\x00\x00\x00bfloat16ab0" + data[2:]
    if build == "rebuild":  # the v2 stand-in told it is v3
        data = data[:2] + b"ctorch._utils\n_rebuild_tensor_v2\n(NK\x01tb0" + data[2:]
    return data


def test_a_large_stride_0_view_is_refused_as_what_it_is(tmp_path):
    """Copied whole when reached, a stride-0 view of terabytes over 16 bytes must not be (a small one is: see
    tests/test_containers.py)."""
    with pytest.raises(ConversionError, match="repeats the 16 bytes of its storage .* .contiguous()"):
        torch_zip.load(_torch_zip(tmp_path / "bad.ckpt", _tensor_pickle(size=(2**40,), stride=(0,))))


@pytest.mark.parametrize("case,kwargs", [
    ("negative offset", {"offset": -1}),
    ("past the storage", {"offset": 3}),
    ("strided past the storage", {"size": (2,), "stride": (4,)}),
    ("negative stride", {"size": (2,), "stride": (-1,)}),
    ("empty, past the storage", {"offset": 100, "size": (0,)}),
    ("too many dimensions", {"size": (1,) * 33, "stride": (1,) * 33}),
    ("state of a stand-in", {"build": "storage type"}),
    ("state of a rebuild stand-in", {"build": "rebuild"}),
])
def test_load_refuses_tensors_outside_their_storage_and_state_changes(tmp_path, case, kwargs):
    good = torch_zip.load(_torch_zip(tmp_path / "good.ckpt", _tensor_pickle()))["w"]
    assert good == torch_zip.StoredTensor("torch.float32", (2,), (1,), good.offset)
    with pytest.raises(ConversionError, match="damaged"):
        torch_zip.load(_torch_zip(tmp_path / "bad.ckpt", _tensor_pickle(**kwargs)))
    assert torch_zip.load(_torch_zip(tmp_path / "again.ckpt", _tensor_pickle()))["w"] == good  # nothing changed
