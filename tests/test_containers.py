"""Damaged zip and tar containers: every field a hostile or broken file can set is one line, in bounded memory."""

import io
import struct
import subprocess
import sys
import tarfile
import zipfile

import pytest
import torch

from streamconv.demo import SyntheticModel, make_checkpoint
from tests.conftest import run_cli
from tests.test_cli import assert_one_line_error
from tests.writers import make_nemo

SMALL = SyntheticModel(n_embd=32, n_layer=2, n_head=2, vocab_size=256)
_CENTRAL = struct.Struct("<4s6H3I5H2I")  # zip central directory header, up to the name


@pytest.fixture(scope="module")
def ckpt_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("zip") / "in.ckpt"
    make_checkpoint(path, SMALL, optimizer=False)
    return path.read_bytes()


def patch_central(data: bytes, member: str | None, **fields: int) -> bytes:
    """`data` with fields of the central directory entries of `member` (every entry when None) replaced."""
    names = ("signature", "made_by", "needed", "flags", "method", "time", "date", "crc", "compressed", "size",
             "name_length", "extra_length", "comment_length", "disk", "internal", "external", "offset")
    out, start = bytearray(data), 0
    while (start := data.find(b"PK\x01\x02", start)) >= 0:
        values = dict(zip(names, _CENTRAL.unpack_from(data, start), strict=True))
        name = data[start + _CENTRAL.size: start + _CENTRAL.size + values["name_length"]].decode()
        if member is None or name.endswith("/" + member):
            values.update(fields)
            _CENTRAL.pack_into(out, start, *values.values())
        start += _CENTRAL.size
    return bytes(out)


def convert(tmp_path, data: bytes, suffix: str = ".ckpt"):
    path = tmp_path / f"damaged{suffix}"
    path.write_bytes(data)
    return run_cli("--checkpoint-path", path, "--save-path", tmp_path / "out", "--quiet", "--vocab-size", "256")


@pytest.mark.parametrize("member, fields, fragment", [
    (None, {"needed": 64}, "zip features torch never writes"),  # version 6.4, above what zipfile reads
    ("version", {"needed": 99}, "zip features torch never writes"),  # on a member never read
    ("data.pkl", {"flags": 0x1}, "compressed or encrypted"),
    ("data.pkl", {"flags": 0x40}, "compressed or encrypted"),
    ("data.pkl", {"flags": 0x20}, "zip features torch never writes"),
    ("data.pkl", {"method": 8}, "compressed or encrypted"),
    ("data.pkl", {"method": 99}, "compressed or encrypted"),
    ("byteorder", {"method": 8}, "compressed or encrypted"),
    ("byteorder", {"flags": 0x1}, "compressed or encrypted"),
    ("data/0", {"method": 99}, "compressed"),
    ("data.pkl", {"compressed": 2**28}, "compressed or encrypted"),  # zipfile would read 256 MB whole
])
def test_zip_fields_torch_never_writes_are_one_line(ckpt_bytes, tmp_path, member, fields, fragment):
    proc = convert(tmp_path, patch_central(ckpt_bytes, member, **fields))
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "out").exists()


def test_a_compressed_pickle_that_inflates_is_refused_before_it_is_read(ckpt_bytes, tmp_path):
    """torch writes data.pkl stored; DEFLATE would let 3 MB inflate to gigabytes (the issue's reproducer: 1.5 GB
    of zeros after STOP, read whole at 3.0 GB peak)."""
    source = zipfile.ZipFile(io.BytesIO(ckpt_bytes))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as rebuilt:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("/data.pkl"):
                info.compress_type = zipfile.ZIP_DEFLATED
                data += bytes(200 * 2**20)  # inflates to 200 MB from 0.2 MB
            rebuilt.writestr(info, data)
    assert len(out.getvalue()) < 2**20
    proc = convert(tmp_path, out.getvalue())
    assert_one_line_error(proc, "'in/data.pkl' is compressed or encrypted", "torch writes it stored")


def test_an_oversized_pickle_is_refused_before_it_is_read(ckpt_bytes, tmp_path):
    proc = convert(tmp_path, patch_central(ckpt_bytes, "data.pkl", size=2**31, compressed=2**31))
    assert_one_line_error(proc, "more than the")


@pytest.fixture(scope="module")
def nemo_members(tmp_path_factory):
    path = tmp_path_factory.mktemp("tar") / "in.nemo"
    make_nemo(path, SMALL)
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read() if m.isreg() else None) for m in tar.getmembers()]


def rebuilt_nemo(members, pax: dict[str, str], gzip: bool = False) -> bytes:
    """The .nemo again as a PAX tar, with `pax` records on the yaml's header."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gzip else "w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in members:
            if member.name.endswith("model_config.yaml"):
                member.pax_headers = pax
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


@pytest.mark.parametrize("gzip", [False, True])
@pytest.mark.parametrize("pax", [{"size": "9" * 30}, {"GNU.sparse.size": "x"}])
def test_tar_headers_that_do_not_parse_are_one_line(nemo_members, tmp_path, pax, gzip):
    proc = convert(tmp_path, rebuilt_nemo(nemo_members, pax, gzip), ".nemo")
    assert_one_line_error(proc, "truncated or damaged")
    assert not (tmp_path / "out").exists()


def test_a_pax_header_that_says_gigabytes_is_not_read_into_memory(nemo_members, tmp_path):
    data = bytearray(rebuilt_nemo(nemo_members, {"comment": "x"}))
    start = next(i for i in range(0, len(data), 512) if data[i + 156: i + 157] == b"x")  # the PAX header's block
    data[start + 124: start + 136] = b"%011o\0" % (8 * 2**30 - 512)  # its size field: 8 GiB (11 octal digits)
    data[start + 148: start + 156] = b"%06o\0 " % (sum(data[start: start + 148]) + 256 + sum(data[start + 156:
                                                                                             start + 512]))
    proc = convert(tmp_path, bytes(data), ".nemo")
    assert_one_line_error(proc, "8589934080 bytes", "truncated or damaged")



def test_a_small_stride_0_tensor_converts_as_torch_reads_it(tmp_path):
    """torch.save keeps `torch.ones(1).expand(h)` as one element with stride 0; torch.load reads it."""
    from safetensors.torch import load_file

    path = tmp_path / "in.ckpt"
    make_checkpoint(path, SMALL, optimizer=False)
    checkpoint = torch.load(path, weights_only=False)
    key = next(k for k in checkpoint["state_dict"] if k.endswith("layers.0.input_layernorm.weight"))
    checkpoint["state_dict"][key] = torch.full((1,), 1.5, dtype=torch.bfloat16).expand(SMALL.n_embd)
    torch.save(checkpoint, path)
    assert torch.load(path, weights_only=False)["state_dict"][key].stride() == (0,)
    proc = run_cli("--checkpoint-path", path, "--save-path", tmp_path / "out", "--quiet", "--vocab-size", "256")
    assert proc.returncode == 0, proc.stderr
    written = load_file(tmp_path / "out" / "model.safetensors")["transformer.h.0.ln_1.weight"]
    assert torch.equal(written, torch.full((SMALL.n_embd,), 1.5, dtype=torch.bfloat16))
    assert run_cli("--verify", "--checkpoint-path", path, "--save-path", tmp_path / "out").returncode == 0


@pytest.mark.parametrize("layout", ["plain", "gzip", "extracted"])
def test_legacy_weights_inside_a_nemo_are_named_legacy(tmp_path, layout):
    folder = tmp_path / "nemo"
    make_nemo(folder, SMALL, extracted=True)
    weights = torch.load(folder / "model_weights.ckpt", weights_only=False)
    torch.save(weights, folder / "model_weights.ckpt", _use_new_zipfile_serialization=False)
    path = folder
    if layout != "extracted":
        path = tmp_path / "in.nemo"
        with tarfile.open(path, "w:gz" if layout == "gzip" else "w") as tar:
            tar.add(folder, arcname=".")
    proc = convert(tmp_path, path.read_bytes(), ".nemo") if layout != "extracted" else run_cli(
        "--checkpoint-path", path, "--save-path", tmp_path / "out", "--quiet")
    assert_one_line_error(proc, "model_weights.ckpt", "legacy (pre-1.6) format", "torch.save(torch.load(")


@pytest.mark.parametrize("gzip", [False, True])
@pytest.mark.parametrize("size", ["-1", "9" * 30])
def test_a_member_size_the_archive_cannot_hold_is_one_line(nemo_members, tmp_path, gzip, size):
    """A gzip stream skips a member by reading it: a size of -1 or 10**30 read forever."""
    path = tmp_path / "damaged.nemo"
    path.write_bytes(rebuilt_nemo(nemo_members, {"size": size}, gzip))
    proc = subprocess.run([sys.executable, "-m", "streamconv", "--checkpoint-path", str(path), "--save-path",
                           str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, timeout=60)
    assert_one_line_error(proc, "truncated or damaged")


def test_an_encrypted_tensor_member_is_refused(ckpt_bytes, tmp_path):
    """Its bytes would be ciphertext: viewed in place they would convert into wrong weights."""
    assert_one_line_error(convert(tmp_path, patch_central(ckpt_bytes, "data/0", flags=0x1)), "data/0")
