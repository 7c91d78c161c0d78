"""The command line: spellings, dry run, structure, summary, and one-line errors with exit code 2."""

import os
import signal
import time
from collections import OrderedDict

import pytest
import torch

from streamconv import cli
from streamconv.demo import SyntheticModel, make_checkpoint, nemo_config
from tests.conftest import run_cli


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("streamconv: error: ")
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_convert_prints_summary_and_writes_folder(bf16_ckpt, tmp_path):
    out = tmp_path / "hf"
    proc = run_cli("--checkpoint-path", bf16_ckpt.path, "--save-path", out, "--vocab-size", "1000",
                   "--shard-size", "100KB")
    assert proc.returncode == 0, proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("converted 40 tensors into ") and "GB/s" in summary and "peak RSS" in summary
    assert "converting" in proc.stderr  # the tqdm bar
    files = sorted(os.listdir(out))
    assert "config.json" in files and "model.safetensors.index.json" in files
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no staging folder left


def test_reference_spellings_and_quiet(bf16_ckpt, tmp_path):
    out = tmp_path / "hf"
    proc = run_cli("--checkpoint_path", bf16_ckpt.path, "--save_path", out, "--vocab-size", "1000", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]


def test_debug_says_where_the_threads_spent_their_time(bf16_ckpt, tmp_path):
    """--debug adds one stderr line per conversion: each thread's stages and their seconds, which add up to the
    streaming time for the arranger (its stages are the call's time split) and stay below it for the others."""
    import re

    proc = run_cli("--checkpoint-path", bf16_ckpt.path, "--save-path", tmp_path / "hf", "--vocab-size", "1000",
                   "--quiet", "--debug")
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    total = float(re.match(r"streamconv: pipeline: ([0-9.]+) s; ", line).group(1))
    threads = dict(part.split(": ", 1) for part in line.split("; ")[1:])
    assert sorted(threads) == ["arranger", "reader", "writer"]
    seconds = {t: [float(x) for x in re.findall(r" ([0-9.]+) s", stages)] for t, stages in threads.items()}
    assert "arranging" in threads["arranger"] and "reading" in threads["reader"] and "writing" in threads["writer"]
    assert abs(sum(seconds["arranger"]) - total) <= 0.02  # (rounding of each figure)
    assert all(sum(seconds[t]) <= total + 0.02 for t in ("reader", "writer"))
    assert "pipeline" not in run_cli("--checkpoint-path", bf16_ckpt.path, "--save-path", tmp_path / "hf2",
                                     "--vocab-size", "1000", "--quiet").stderr


def test_dry_run_writes_nothing(bf16_ckpt, tmp_path):
    out = tmp_path / "hf"
    proc = run_cli("--checkpoint-path", bf16_ckpt.path, "--save-path", out, "--vocab-size", "1000",
                   "--dry-run", "--shard-size", "100KB")
    assert proc.returncode == 0, proc.stderr
    assert "model-00001-of-" in proc.stdout and "predicted working memory" in proc.stdout
    assert not out.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("save", [True, False])
def test_print_checkpoint_structure(bf16_ckpt, tmp_path, save):
    """With a save path it prints, then converts (as the reference script); without one it only prints."""
    ckpt_folder = sorted(os.listdir(os.path.dirname(bf16_ckpt.path)))
    proc = run_cli("--checkpoint-path", bf16_ckpt.path, *(["--save-path", tmp_path / "hf"] if save else []),
                   "--vocab-size", "1000", "--print-checkpoint-structure", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    qkv = next(line for line in lines if line.startswith("transformer.h.0.attn.c_attn.weight"))
    assert "64x192" in qkv and "bfloat16" in qkv and "query_key_value.weight" in qkv
    assert sum(line.startswith("transformer.") for line in lines) == 40
    assert lines[-1].startswith("converted 40 tensors") == save and len(lines) == 40 + save
    assert os.listdir(tmp_path) == (["hf"] if save else [])
    assert sorted(os.listdir(os.path.dirname(bf16_ckpt.path))) == ckpt_folder


def test_overwrite(bf16_ckpt, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_text("old")
    assert_one_line_error(run_cli("--checkpoint-path", bf16_ckpt.path, "--save-path", out), "not empty",
                          "--overwrite")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    (out / "old.txt").write_text("old")  # not a model folder's: --overwrite refuses too (tests/test_output_safety.py)
    assert_one_line_error(run_cli("--checkpoint-path", bf16_ckpt.path, "--save-path", out, "--overwrite"),
                          "(old.txt)")
    (out / "old.txt").unlink()
    proc = run_cli("--checkpoint-path", bf16_ckpt.path, "--save-path", out, "--vocab-size", "1000",
                   "--overwrite", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert (out / "model.safetensors").read_bytes() != b"old"


def save_broken(path, drop=None, **changes):
    """A small NeMo checkpoint with some top-level entry or tensor removed."""
    model = SyntheticModel(n_embd=32, n_layer=2, n_head=2, vocab_size=256)
    source = make_checkpoint(path, model, optimizer=False)
    ckpt = torch.load(path, weights_only=False)
    if drop in ckpt:
        del ckpt[drop]
    elif drop is not None:
        del ckpt["state_dict"][drop]
    ckpt.update(changes)
    torch.save(ckpt, path)
    return source


@pytest.mark.parametrize("case,fragments", [
    ("missing", ["checkpoint not found"]),
    ("directory", ["is a directory"]),
    ("not_zip", ["is not a torch checkpoint"]),
    ("no_state_dict", ["no 'state_dict'"]),
    ("no_cfg", ["no 'hyper_parameters.cfg'", "--num-heads"]),
    ("missing_key", ["model.language_model.encoder.layers.1.mlp.dense_4h_to_h.weight", "missing"]),
    ("missing_hparam", ["'num_attention_heads'", "--num-heads"]),
    ("vocab_too_large", ["vocabulary size 300 ", "256 embedding rows", "--vocab-size 256"]),
    ("bad_shard_size", ["cannot parse shard size"]),
    ("no_cuda", ["CUDA"]),
    ("malicious", ["reference to posix.system", "refuses", "tampered"]),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, case, fragments):
    ckpt = tmp_path / "in.ckpt"
    extra = ["--vocab-size", "256"]
    if case == "directory":
        ckpt.mkdir()
    elif case == "not_zip":
        ckpt.write_bytes(os.urandom(4096))
    elif case == "no_state_dict":
        save_broken(ckpt, drop="state_dict")
    elif case == "no_cfg":
        save_broken(ckpt, drop="hyper_parameters")
    elif case == "missing_key":
        save_broken(ckpt, drop="model.language_model.encoder.layers.1.mlp.dense_4h_to_h.weight")
    elif case == "missing_hparam":
        cfg = nemo_config(SyntheticModel(n_embd=32, n_layer=2, n_head=2, vocab_size=256), "bf16")
        del cfg.cfg["num_attention_heads"]
        save_broken(ckpt, hyper_parameters=cfg)
    elif case in ("vocab_too_large", "bad_shard_size", "no_cuda"):
        save_broken(ckpt)
        extra += {"vocab_too_large": ["--vocab-size", "300"], "bad_shard_size": ["--shard-size", "5XB"],
                  "no_cuda": ["--device", "cuda"]}[case]
        if case == "no_cuda" and torch.cuda.is_available():
            pytest.skip("a GPU is present")
    elif case == "malicious":
        sentinel = tmp_path / "pwned"
        save_broken(ckpt, state_dict=OrderedDict(evil=Exploit(sentinel)))
    out = tmp_path / "out"
    proc = run_cli("--checkpoint-path", ckpt, "--save-path", out, *extra)
    assert_one_line_error(proc, *fragments)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) in (["in.ckpt"], [])
    if case == "malicious":
        assert not sentinel.exists()


class Exploit:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_newline_or_escape_in_a_path_is_printed_escaped_on_one_line(bf16_ckpt, tmp_path):
    missing = tmp_path / "new\nline.ckpt"
    assert_one_line_error(run_cli("--checkpoint-path", missing, "--save-path", tmp_path / "out"),
                          f"checkpoint not found: {tmp_path}/new\\nline.ckpt;")
    save = tmp_path / "hf\nout\x1b[2J"
    convert = ("--checkpoint-path", bf16_ckpt.path, "--save-path", save, "--vocab-size", "1000", "--quiet")
    done = run_cli(*convert)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.count("\n") == 1 and f"-> {tmp_path}/hf\\nout\\x1b[2J" in done.stdout, done.stdout
    assert (save / "config.json").exists()
    assert_one_line_error(run_cli(*convert), f"save path {tmp_path}/hf\\nout\\x1b[2J is not empty")
    verified = run_cli("--verify", *convert)
    assert verified.returncode == 0 and verified.stdout.count("\n") == 1 and "\\nout" in verified.stdout


@pytest.mark.parametrize("flag", ["--checkpoint-path", "--tokenizer"])
@pytest.mark.parametrize("kind", ["fifo", "/dev/stdin"])
def test_a_pipe_or_a_device_is_refused_without_waiting(bf16_ckpt, tmp_path, flag, kind):
    """Opening a FIFO waits for a writer, reading /dev/stdin (a pipe held open here) for its end: both are refused
    before they are opened. A regression fails at the timeout instead of hanging the suite."""
    os.mkfifo(tmp_path / "fifo")
    given = str(tmp_path / "fifo") if kind == "fifo" else kind
    inputs = {"--checkpoint-path": bf16_ckpt.path, "--tokenizer": None, flag: given}
    read_end, write_end = os.pipe()
    try:
        proc = run_cli(*(a for k, v in inputs.items() if v for a in (k, v)), "--save-path", tmp_path / "out",
                       "--vocab-size", "1000", stdin=read_end, timeout=120)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert_one_line_error(proc, f"{given} is not a regular file", f"give {flag} the ")
    assert os.listdir(tmp_path) == ["fifo"]


def test_demo(tmp_path):
    proc = run_cli("--demo", "--quiet", "--save-path", tmp_path / "demo")
    assert proc.returncode == 0, proc.stderr
    assert "max abs diff 0.0 -> OK" in proc.stdout
    assert sorted(os.listdir(tmp_path / "demo")) == ["config.json", "model.safetensors"]


def test_demo_refuses_a_non_empty_save_path_before_building(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = run_cli("--demo", "--quiet", "--save-path", tmp_path)
    assert_one_line_error(proc, "not empty", "(notes.txt)")
    assert proc.stdout == ""  # no checkpoint built, nothing converted
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_demo_refuses_a_checkpoint_path(tmp_path):
    proc = run_cli("--demo", "--checkpoint-path", tmp_path / "x.ckpt", "--save-path", tmp_path / "out")
    assert_one_line_error(proc, "--demo builds its own checkpoint", "--checkpoint-path")
    assert proc.stdout == "" and os.listdir(tmp_path) == []


def test_version():
    import tomllib

    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["project"]["version"]
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout == f"streamconv {declared}\n"
    import streamconv

    assert streamconv.__version__ == declared


@pytest.mark.parametrize("sig,raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, cli.Terminated)])
def test_signal_during_the_torch_import_is_held_then_raised(sig, raised):
    """A signal that lands while torch imports numpy would raise inside torch, which discards the error."""
    from streamconv.process import signals_held

    before = signal.signal(signal.SIGTERM, cli._on_sigterm) if sig == signal.SIGTERM else signal.getsignal(sig)
    handler = signal.getsignal(sig)
    reached = False
    try:
        with pytest.raises(raised), signals_held():
            os.kill(os.getpid(), sig)
            time.sleep(0.05)  # the handler has run by now, and raised nothing here
            reached = True
        assert reached
        assert signal.getsignal(sig) is handler
    finally:
        signal.signal(sig, before)


def test_a_signal_held_through_a_failure_is_still_delivered():
    """If the import fails meanwhile, the held Ctrl-C still stops the run (the failure is its context)."""
    from streamconv.process import signals_held

    with pytest.raises(KeyboardInterrupt) as info, signals_held():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        raise ImportError("torch is broken")
    assert isinstance(info.value.__context__, ImportError)
