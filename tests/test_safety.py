"""Untrusted, broken and interrupted input: no code runs, errors are one line, output is all or nothing."""

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import OrderedDict

import pytest
import torch

from streamconv.demo import SyntheticModel, make_checkpoint
from tests.conftest import run_cli
from tests.test_cli import assert_one_line_error

SMALL = SyntheticModel(n_embd=32, n_layer=2, n_head=2, vocab_size=256)


class Exploit:
    """Unpickling this runs `func(*args)`: the classic malicious checkpoint."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


class Custom:
    """A class a training run might pickle beside the weights (not importable by name at load time)."""

    def __init__(self):
        self.value = 3


def rewrite(path, **changes):
    ckpt = torch.load(path, weights_only=False)
    ckpt.update(changes)
    torch.save(ckpt, path)


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "in.ckpt"
    make_checkpoint(path, SMALL, optimizer=False)
    return path


def exploits(sentinel):
    return {
        "posix.system": Exploit(os.system, f"touch {sentinel}"),
        "builtins.eval": Exploit(eval, f"open({str(sentinel)!r}, 'w')"),
        "subprocess.Popen": Exploit(subprocess.Popen, ["touch", str(sentinel)]),
        "builtins.exec": Exploit(exec, f"open({str(sentinel)!r}, 'w')"),
    }


@pytest.mark.parametrize("where", ["state_dict", "hyper_parameters"])
@pytest.mark.parametrize("name", ["posix.system", "builtins.eval", "subprocess.Popen", "builtins.exec"])
def test_malicious_pickle_is_refused_by_name(small, tmp_path, where, name):
    sentinel = tmp_path / "pwned"
    ckpt = torch.load(small, weights_only=False)
    if where == "state_dict":
        ckpt["state_dict"]["model.language_model.evil"] = exploits(sentinel)[name]
    else:
        ckpt["hyper_parameters"] = {"cfg": ckpt["hyper_parameters"]["cfg"], "extra": exploits(sentinel)[name]}
    torch.save(ckpt, small)
    out = tmp_path / "out"
    assert_one_line_error(run_cli("--checkpoint-path", small, "--save-path", out, "--vocab-size", "256"),
                          f"in.ckpt contains a pickled reference to {name}", "refuses the whole file as tampered")
    assert not sentinel.exists() and not out.exists()


@pytest.mark.parametrize("name, value", [("posix.system", os.system), ("builtins.getattr", getattr),
                                         ("io.open", open), ("shutil.rmtree", shutil.rmtree)])
def test_a_dangerous_callable_never_used_still_refuses_the_file(small, tmp_path, name, value):
    """A plain value in an entry no conversion reads (a callback's state): never called, yet only an attack
    pickles it."""
    rewrite(small, callbacks={"Evil": {"handler": value}})
    out = tmp_path / "out"
    assert_one_line_error(run_cli("--checkpoint-path", small, "--save-path", out, "--vocab-size", "256"),
                          f"reference to {name}", "tampered")
    assert sorted(os.listdir(tmp_path)) == ["in.ckpt"]


def test_foreign_objects_beside_the_weights_are_neutralised(small, tmp_path):
    rewrite(small, loops={"custom": Custom(), "signal": signal.SIGTERM},
            optimizer_states=[{"wrapper": Custom(), "fn": Exploit(print, "hi")}])
    out = tmp_path / "out"
    proc = run_cli("--checkpoint-path", small, "--save-path", out, "--vocab-size", "256", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "hi" not in proc.stdout.splitlines()
    assert run_cli("--verify", "--checkpoint-path", small, "--save-path", out, "--vocab-size", "256").returncode == 0


def test_checkpoint_keys_never_become_file_names(small, tmp_path):
    ckpt = torch.load(small, weights_only=False)
    ckpt["state_dict"] = OrderedDict(ckpt["state_dict"])
    ckpt["state_dict"]["../../escape.safetensors"] = torch.zeros(3)
    ckpt["state_dict"]["/tmp/absolute.safetensors"] = torch.zeros(3)
    torch.save(ckpt, small)
    before = set(os.listdir(tmp_path))
    out = tmp_path / "out"
    done = run_cli("--checkpoint-path", small, "--save-path", out, "--vocab-size", "256", "--quiet",
                   "--shard-size", "10KB")
    # Tensors no output uses are refused (a conversion would drop them), by name, before anything is written
    assert done.returncode == 2 and "no place for, such as '../../escape.safetensors'" in done.stderr, done.stderr
    assert set(os.listdir(tmp_path)) == before
    assert not os.path.exists("/tmp/absolute.safetensors")


def test_legacy_format(tmp_path):
    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path, _use_new_zipfile_serialization=False)
    assert_one_line_error(run_cli("--checkpoint-path", path, "--save-path", tmp_path / "out"),
                          "legacy", "torch.save(torch.load(")


def test_truncated_checkpoint(small, tmp_path):
    data = small.read_bytes()
    small.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_cli("--checkpoint-path", small, "--save-path", tmp_path / "out"),
                          "truncated", "copy or download it again")
    assert sorted(os.listdir(tmp_path)) == ["in.ckpt"]


def test_corrupt_member(small, tmp_path):
    import zipfile

    with zipfile.ZipFile(small) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    data = bytearray(small.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + 64  # inside the pickle, past its start
    data[start : start + 200] = os.urandom(200)
    small.write_bytes(bytes(data))
    assert_one_line_error(run_cli("--checkpoint-path", small, "--save-path", tmp_path / "out",
                                  "--vocab-size", "256"), "damaged")
    assert sorted(os.listdir(tmp_path)) == ["in.ckpt"]


@pytest.mark.parametrize("change,fragments", [
    ("qkv_rows", ["layers.1.self_attention.query_key_value.weight", "(96, 32)", "(80, 32)"]),
    ("heads", ["not divisible by num_attention_heads 5"]),
    ("layers", ["num_layers 3", "layers 0..1"]),
])
def test_shapes_inconsistent_with_config(small, tmp_path, change, fragments):
    ckpt = torch.load(small, weights_only=False)
    if change == "qkv_rows":
        key = "model.language_model.encoder.layers.1.self_attention.query_key_value.weight"
        ckpt["state_dict"][key] = ckpt["state_dict"][key][:80].clone()
    elif change == "heads":
        ckpt["hyper_parameters"].cfg.num_attention_heads = 5
    else:
        ckpt["hyper_parameters"].cfg.num_layers = 3
    torch.save(ckpt, small)
    assert_one_line_error(run_cli("--checkpoint-path", small, "--save-path", tmp_path / "out",
                                  "--vocab-size", "256"), *fragments)


def test_no_cfg_converts_with_num_heads(small, tmp_path):
    rewrite(small, hyper_parameters={})
    out = tmp_path / "out"
    proc = run_cli("--checkpoint-path", small, "--save-path", out, "--vocab-size", "256", "--num-heads", "2",
                   "--quiet")
    assert proc.returncode == 0, proc.stderr
    import json

    config = json.loads((out / "config.json").read_text())
    assert (config["n_embd"], config["n_layer"], config["n_head"], config["n_inner"]) == (32, 2, 2, 128)


def test_verify_catches_a_flipped_byte_and_a_missing_tensor(small, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    assert run_cli("--checkpoint-path", small, "--save-path", out, "--vocab-size", "256", "--quiet").returncode == 0
    ok = run_cli("--verify", "--checkpoint-path", small, "--save-path", out, "--vocab-size", "256")
    assert ok.returncode == 0 and "verify: OK" in ok.stdout

    shard = out / "model.safetensors"
    original = shard.read_bytes()
    data = bytearray(original)
    data[-3] ^= 0x01  # inside the last tensor, transformer.ln_f.bias
    shard.write_bytes(bytes(data))
    bad = run_cli("--verify", "--checkpoint-path", small, "--save-path", out, "--vocab-size", "256")
    assert bad.returncode == 1
    assert "transformer.ln_f.bias: bytes differ" in bad.stdout

    shard.write_bytes(original)
    tensors = load_file(shard)
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    missing = run_cli("--verify", "--checkpoint-path", small, "--save-path", out, "--vocab-size", "256")
    assert missing.returncode == 1
    assert "transformer.h.1.mlp.c_fc.weight: missing from the output" in missing.stdout


WIDE = SyntheticModel(n_embd=1024, n_head=16, vocab_size=2048, n_positions=512, n_layer=24)


def start_conversion(ckpt, out, *args, quiet=True, **popen):
    return subprocess.Popen(
        [sys.executable, "-m", "streamconv", "--checkpoint-path", ckpt, "--save-path", out,
         "--vocab-size", "2048", *(["--quiet"] if quiet else []), *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen,
    )


def wait_for_partial_shard(parent, proc, min_bytes=2**20):
    """Block until the child has a partly written shard in its staging folder, then stop it (SIGSTOP) so that
    a busy machine cannot let it finish before the test acts; SIGCONT resumes it."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        for entry in os.listdir(parent):
            if ".streamconv-tmp-" in entry:
                shard = os.path.join(parent, entry, "model.safetensors")
                if os.path.exists(shard) and os.path.getsize(shard) >= min_bytes:
                    proc.send_signal(signal.SIGSTOP)
                    if os.path.exists(os.path.join(parent, entry)):
                        return os.path.join(parent, entry)
                    proc.send_signal(signal.SIGCONT)
        time.sleep(0.005)
    pytest.fail("the conversion finished (or failed) before it could be interrupted")


def test_sigkill_leaves_target_untouched_and_rerun_cleans_up(checkpoints, tmp_path):
    source = checkpoints("mem_24", WIDE, optimizer=False)
    out = tmp_path / "out"
    proc = start_conversion(source.path, out)
    staging = wait_for_partial_shard(tmp_path, proc)
    proc.kill()
    proc.wait()
    assert not out.exists() and os.path.isdir(staging)
    proc = start_conversion(source.path, out)
    assert proc.wait() == 0, proc.stderr.read()
    assert os.listdir(tmp_path) == ["out"]  # the stale staging folder is gone
    verified = run_cli("--verify", "--checkpoint-path", source.path, "--save-path", out, "--vocab-size", "2048")
    assert verified.returncode == 0, verified.stdout


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_and_cleans_up(checkpoints, tmp_path, sig, code):
    source = checkpoints("mem_24", WIDE, optimizer=False)
    out = tmp_path / "out"
    proc = start_conversion(source.path, out)
    wait_for_partial_shard(tmp_path, proc)
    proc.send_signal(sig)
    sent = time.monotonic()
    proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=30) == code
    assert time.monotonic() - sent < 5
    assert "nothing was written" in proc.stderr.read()
    assert os.listdir(tmp_path) == []


def test_file_size_limit_reports_needed_space(checkpoints, tmp_path):
    source = checkpoints("mem_24", WIDE, optimizer=False)
    out = tmp_path / "out"

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (50 * 2**20, 50 * 2**20))

    proc = start_conversion(source.path, out, preexec_fn=limit_file_size)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 2, stderr
    assert "File too large" in stderr and "the output needs 609.9 MB" in stderr and len(stderr.splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_free_space_is_checked_before_writing(small, tmp_path, monkeypatch):
    import streamconv
    from streamconv import converter
    from streamconv.errors import ConversionError

    monkeypatch.setattr(converter.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(ConversionError, match="not enough free space.*need 78.1 kB, have 1.0 kB"):
        streamconv.convert(small, tmp_path / "out", vocab_size=256)
    assert sorted(os.listdir(tmp_path)) == ["in.ckpt"]


def test_verify_in_the_python_api(small, tmp_path):
    import streamconv

    out = tmp_path / "out"
    streamconv.convert(small, out, vocab_size=256)
    assert streamconv.verify(small, out, vocab_size=256) == []
    (out / "config.json").write_text('{"n_embd": 32}')
    problems = streamconv.verify(small, out, vocab_size=256)
    assert "config.json: n_layer is None, expected 2" in problems


@pytest.mark.parametrize("target,attribute", [
    (b"ctorch._utils\n_rebuild_tensor_v2\n", b"_with_dtype"),  # would change the stand-in for torch's function
    (b"comegaconf.dictconfig\nDictConfig\n", b"__iter__"),  # would change OmegaConf's class
])
def test_a_pickle_cannot_change_the_allowed_globals(tmp_path, target, attribute):
    """BUILD on an allow-listed class or function (setting its attributes, process-wide) is refused."""
    from omegaconf import DictConfig

    from streamconv.errors import ConversionError
    from streamconv.sources import torch_zip
    from tests.test_torch_zip import _tensor_pickle, _torch_zip

    before = (torch_zip._TORCH_STAND_INS["torch._utils._rebuild_tensor_v2"]._with_dtype, DictConfig.__iter__)
    # the global, then BUILD with (None, {attribute: (7,)}): setattr(global, attribute, (7,)), then POP
    build = target + b"N}X" + len(attribute).to_bytes(4, "little") + attribute + b"K\x07\x85s\x86b0"
    pickled = _tensor_pickle()
    path = _torch_zip(tmp_path / "bad.ckpt", pickled[:2] + build + pickled[2:])
    with pytest.raises(ConversionError, match="damaged .*tries to change"):
        torch_zip.load(path)
    assert (torch_zip._TORCH_STAND_INS["torch._utils._rebuild_tensor_v2"]._with_dtype, DictConfig.__iter__) == before
    assert torch_zip.load(_torch_zip(tmp_path / "good.ckpt", pickled))["w"].shape == (2,)
