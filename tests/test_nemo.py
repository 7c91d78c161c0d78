"""`.nemo` inputs: plain tar read in place, gzip tar extracted to a temporary file, extracted folder."""

import io
import os
import subprocess
import sys
import tarfile

import pytest
import torch
import yaml
from omegaconf import OmegaConf

import streamconv
from benchmarks.launcher import peak_rss_of
from benchmarks.naive import convert_megatron_checkpoint
from streamconv.demo import SyntheticModel
from tests.conftest import run_cli
from tests.oracle import NOT_WRITTEN
from tests.test_cli import assert_one_line_error
from tests.test_convert import logits_pair, read_output
from tests.test_memory import LARGEST, WIDE, MiB
from tests.test_safety import Exploit
from tests.writers import make_nemo

MODEL = SyntheticModel(n_embd=64, n_layer=3, n_head=8, vocab_size=1000, n_positions=64)
SMALL = SyntheticModel(n_embd=32, n_layer=2, n_head=2, vocab_size=256)
KINDS = {"plain": {}, "gzip": {"gzip": True}, "extracted": {"extracted": True}}


@pytest.fixture(scope="module")
def nemos(tmp_path_factory):
    root = tmp_path_factory.mktemp("nemo")
    return {kind: make_nemo(root / f"{kind}.nemo", MODEL, dtype=torch.bfloat16, **kw) for kind, kw in KINDS.items()}


def nemo_members(path) -> dict[str, bytes]:
    """Every regular member of a .nemo (archive or folder) by its bare name, read trustingly (tests only)."""
    if os.path.isdir(path):
        return {name: open(os.path.join(path, name), "rb").read() for name in os.listdir(path)}
    with tarfile.open(path) as tar:
        return {m.name.removeprefix("./"): tar.extractfile(m).read() for m in tar.getmembers() if m.isreg()}


def reference_convert_nemo(path, vocab_size):
    """tests/oracle.py's reference mapping applied to the weights and config inside the .nemo."""
    members = nemo_members(path)
    state_dict = torch.load(io.BytesIO(members["model_weights.ckpt"]), weights_only=False)
    cfg = OmegaConf.create(yaml.safe_load(members["model_config.yaml"]))
    out = convert_megatron_checkpoint(state_dict, cfg, vocab_size)
    return {k: v.contiguous() for k, v in out.items() if not k.endswith(NOT_WRITTEN)}


def write_tar(path, members: dict[str, bytes], gzip=False):
    with tarfile.open(path, "w:gz" if gzip else "w:") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_logits_and_bits(nemos, tmp_path, kind):
    source = nemos[kind]
    out = tmp_path / "hf"
    result = streamconv.convert(source.path, out, shard_size="100KB", vocab_size=MODEL.vocab_size)
    assert result.shards > 1
    assert ("extracted from the gzip archive" in result.summary()) == (kind == "gzip")
    expected, actual = logits_pair(source, out)
    assert torch.equal(expected, actual), (expected - actual).abs().max()
    reference = reference_convert_nemo(source.path, MODEL.vocab_size)
    written = read_output(out)
    assert sorted(written) == sorted(reference)
    for name, tensor in reference.items():
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary extract left behind


def test_gzip_extract_of_a_killed_run_is_removed(nemos, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # its pid is gone
    stale = tmp_path / f".streamconv-nemo-{proc.pid}-x1y2.ckpt"
    stale.write_bytes(b"left by a SIGKILL")
    streamconv.convert(nemos["gzip"].path, tmp_path / "hf", vocab_size=1000)
    assert sorted(os.listdir(tmp_path)) == ["hf"]


@pytest.mark.parametrize("kind", KINDS)
def test_cli_convert_and_verify(nemos, tmp_path, kind):
    out = tmp_path / "hf"
    proc = run_cli("--checkpoint-path", nemos[kind].path, "--save-path", out, "--vocab-size", "1000")
    assert proc.returncode == 0, proc.stderr
    assert ("extracting model_weights.ckpt (gzip): 100%" in proc.stderr) == (kind == "gzip"), proc.stderr
    proc = run_cli("--verify", "--checkpoint-path", nemos[kind].path, "--save-path", out, "--vocab-size", "1000")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_plain_nemo_is_read_in_place(nemos):
    expected = torch.load(io.BytesIO(nemo_members(nemos["plain"].path)["model_weights.ckpt"]), weights_only=False)
    checkpoint = streamconv.sources.open_checkpoint(nemos["plain"].path)
    try:
        assert [m.file for m in checkpoint.files] == [nemos["plain"].path]
        assert checkpoint.tensors.keys() == expected.keys()
        for name, source in checkpoint.tensors.items():  # offsets point into the tar: direct reads read from it
            fd, offset = checkpoint.file_offset(source.bits)
            raw = os.pread(fd, source.nbytes, offset)
            assert raw == expected[name].contiguous().view(torch.uint8).numpy().tobytes(), name
    finally:
        checkpoint.close()


def test_lightning_dict_inside_a_nemo(nemos, tmp_path):
    members = nemo_members(nemos["extracted"].path)
    state_dict = torch.load(io.BytesIO(members["model_weights.ckpt"]), weights_only=False)
    buffer = io.BytesIO()
    torch.save({"state_dict": state_dict, "epoch": 3, "global_step": 10}, buffer)
    write_tar(tmp_path / "in.nemo", {**members, "model_weights.ckpt": buffer.getvalue()})
    streamconv.convert(tmp_path / "in.nemo", tmp_path / "hf", vocab_size=1000)
    expected, actual = logits_pair(nemos["plain"], tmp_path / "hf")
    assert torch.equal(expected, actual)


@pytest.fixture
def small_members(tmp_path):
    make_nemo(tmp_path / "small", SMALL, dtype=torch.bfloat16, extracted=True)
    return nemo_members(tmp_path / "small")


def cli(tmp_path, path, *extra):
    return run_cli("--checkpoint-path", path, "--save-path", tmp_path / "out", "--vocab-size", "256", *extra)


def test_missing_weights(small_members, tmp_path):
    del small_members["model_weights.ckpt"]
    write_tar(tmp_path / "in.nemo", small_members)
    assert_one_line_error(cli(tmp_path, tmp_path / "in.nemo"), "has no model_weights.ckpt")
    assert not (tmp_path / "out").exists()


def test_missing_config_needs_num_heads(small_members, tmp_path):
    del small_members["model_config.yaml"]
    write_tar(tmp_path / "in.nemo", small_members)
    assert_one_line_error(cli(tmp_path, tmp_path / "in.nemo"), "model_config.yaml", "--num-heads")
    assert not (tmp_path / "out").exists()
    proc = cli(tmp_path, tmp_path / "in.nemo", "--num-heads", "2")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("gzip", [False, True])
def test_truncated_archive(small_members, tmp_path, gzip):
    write_tar(tmp_path / "in.nemo", small_members, gzip=gzip)
    size = os.path.getsize(tmp_path / "in.nemo")
    os.truncate(tmp_path / "in.nemo", size // 2)
    # --quiet: a gzip archive's extraction is announced on stderr before the error
    assert_one_line_error(cli(tmp_path, tmp_path / "in.nemo", "--quiet"), "truncated")
    assert sorted(os.listdir(tmp_path)) == ["in.nemo", "small"]  # no output, no temporary extract


@pytest.mark.parametrize("layout, message", [
    ("config", "says tensor_model_parallel_size 2 but the files hold 1"),
    ("tp_pp_rank", "lacks rank tp_rank_00_pp_rank_000"),
    ("folder", "lacks rank tp_rank_00_pp_rank_000"),
])
def test_ranks_that_do_not_add_up_are_refused(small_members, tmp_path, layout, message):
    if layout == "config":
        cfg = yaml.safe_load(small_members["model_config.yaml"])
        small_members["model_config.yaml"] = yaml.safe_dump({**cfg, "tensor_model_parallel_size": 2}).encode()
    else:
        small_members["tp_rank_00_pp_rank_001/model_weights.ckpt"] = small_members.pop("model_weights.ckpt")
    if layout == "folder":
        os.makedirs(tmp_path / "in" / "tp_rank_00_pp_rank_001")
        for name, data in small_members.items():
            (tmp_path / "in" / name).write_bytes(data)
        path = tmp_path / "in"
    else:
        write_tar(tmp_path / "in.nemo", small_members)
        path = tmp_path / "in.nemo"
    assert_one_line_error(cli(tmp_path, path), message)
    assert not (tmp_path / "out").exists()


def test_a_single_mp_rank_is_a_whole_model(small_members, tmp_path):
    small_members["mp_rank_00/model_weights.ckpt"] = small_members.pop("model_weights.ckpt")
    write_tar(tmp_path / "in.nemo", small_members)
    proc = cli(tmp_path, tmp_path / "in.nemo")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_plain_directory_keeps_its_error(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "weights.ckpt").write_bytes(b"x")
    assert_one_line_error(cli(tmp_path, tmp_path / "folder"), "is a directory")


@pytest.mark.parametrize("where", ["state_dict", "whole file"])
def test_malicious_pickle_in_the_weights_is_refused(small_members, tmp_path, where):
    sentinel = tmp_path / "pwned"
    exploit = Exploit(os.system, f"touch {sentinel}")
    state_dict = torch.load(io.BytesIO(small_members["model_weights.ckpt"]), weights_only=False)
    if where == "state_dict":
        state_dict["model.language_model.evil"] = exploit
    buffer = io.BytesIO()
    torch.save(state_dict if where == "state_dict" else exploit, buffer)
    small_members["model_weights.ckpt"] = buffer.getvalue()
    write_tar(tmp_path / "in.nemo", small_members)
    assert_one_line_error(cli(tmp_path, tmp_path / "in.nemo"), "posix.system", "refuses")
    assert not sentinel.exists() and not (tmp_path / "out").exists()


def test_member_names_never_become_paths(small_members, tmp_path):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    for gzip in (False, True):
        write_tar(work / "in.nemo", {"../../evil": b"pwned", "/tmp/evil-abs-streamconv": b"x", **small_members},
                  gzip=gzip)
        proc = subprocess.run([sys.executable, "-m", "streamconv", "--checkpoint-path", "in.nemo", "--save-path",
                               f"out{gzip}", "--vocab-size", "256", "--quiet"], cwd=work, capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stderr
    found = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files if "evil" in f]
    assert found == [] and not os.path.exists("/tmp/evil-abs-streamconv")


def test_plain_nemo_peak_rss_bounded_by_largest_tensor(tmp_path):
    tiny = make_nemo(tmp_path / "tiny.nemo", SyntheticModel(**{**WIDE, "n_embd": 64, "n_head": 4}, n_layer=1))
    big = make_nemo(tmp_path / "big.nemo", SyntheticModel(**WIDE, n_layer=12))
    size = os.path.getsize(big.path)
    assert size > 30 * LARGEST

    def peak(source, out):
        return peak_rss_of([sys.executable, "-m", "streamconv", "--checkpoint-path", source.path, "--save-path",
                            tmp_path / out, "--vocab-size", WIDE["vocab_size"], "--quiet"])

    baseline, rss = peak(tiny, "tiny"), peak(big, "big")
    print(f"plain .nemo: peak {rss / MiB:.0f} MiB, baseline {baseline / MiB:.0f} MiB, file {size / MiB:.0f} MiB")
    bound = baseline + 4 * LARGEST + 48 * MiB
    assert rss < bound, f"peak {rss / MiB:.0f} MiB > bound {bound / MiB:.0f} MiB"
    assert rss - baseline < size / 3
