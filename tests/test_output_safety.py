"""The save path: --overwrite replaces only a model folder, the swap is atomic, one run per path, one-line errors."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import streamconv
from streamconv.demo import SyntheticModel, make_checkpoint
from tests.conftest import run_cli
from tests.test_cli import assert_one_line_error
from tests.test_safety import WIDE, start_conversion, wait_for_partial_shard

SMALL = SyntheticModel(n_embd=32, n_layer=2, n_head=2, vocab_size=256)


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "in" / "new.ckpt"
    path.parent.mkdir()
    make_checkpoint(path, SMALL, optimizer=False)
    return path


def convert(ckpt, out, *args, cwd=None):
    return run_cli("--checkpoint-path", ckpt, "--save-path", out, "--vocab-size", "256", "--quiet", *args, cwd=cwd)


def snapshot(folder):
    """Every file under `folder` with its bytes, and every subfolder: what must survive a refusal."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            found[os.path.relpath(os.path.join(root, name), folder)] = None
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


def test_overwrite_never_deletes_the_checkpoint_it_reads(tmp_path):
    """The issue's reproducer: a folder with model.ckpt and notes.txt, converted into itself, lost both."""
    folder = tmp_path / "folder"
    folder.mkdir()
    make_checkpoint(folder / "model.ckpt", SMALL, optimizer=False)
    (folder / "notes.txt").write_text("my notes")
    before = snapshot(tmp_path)
    assert_one_line_error(convert(folder / "model.ckpt", folder, "--overwrite"), "holds the input",
                          "model.ckpt")
    assert snapshot(tmp_path) == before


def test_overwrite_refuses_what_is_not_a_model_folders_naming_three(small, tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "notes.txt", "a.txt", "b.txt"):
        (out / name).write_text(name)
    before = snapshot(tmp_path)
    assert_one_line_error(convert(small, out, "--overwrite"), "(a.txt, b.txt, notes.txt and 1 more)",
                          "--overwrite replaces only a model folder")
    assert snapshot(tmp_path) == before
    for name in ("a.txt", "b.txt", "notes.txt"):
        (out / name).unlink()
    assert_one_line_error(convert(small, out, "--overwrite"), "(sub)")  # a subfolder counts
    assert snapshot(out) == {"sub": None, "config.json": b"config.json", "model.safetensors": b"model.safetensors"}


@pytest.mark.parametrize("save_path", [".", "..", "../.."])
def test_the_current_folder_and_its_parents_are_refused(small, tmp_path, save_path):
    """`--save-path . --overwrite` crashed with EBUSY after converting; a parent would be replaced whole."""
    here = tmp_path / "a" / "b"
    here.mkdir(parents=True)
    (here / "config.json").write_text("{}")  # a model folder's file only: the location alone is refused
    before = snapshot(tmp_path)
    assert_one_line_error(convert(small, save_path, "--overwrite", cwd=here), "is the current folder or one of "
                          "its parents")
    assert snapshot(tmp_path) == before


def test_a_home_folder_is_refused_naming_its_files(small, tmp_path):
    home = tmp_path / "home"
    (home / "Documents").mkdir(parents=True)
    (home / "Documents" / "thesis.tex").write_text("years of work")
    (home / ".bashrc").write_text("export X=1")
    (home / ".cache").mkdir()
    (home / "README.md").write_text("a model card name, but beside the others")
    before = snapshot(tmp_path)
    assert_one_line_error(convert(small, home, "--overwrite"), "(.bashrc, .cache, Documents)")
    assert_one_line_error(convert(small, home, "--overwrite", cwd=home / "Documents"), "current folder")
    assert snapshot(tmp_path) == before


def test_a_save_path_inside_or_around_an_input_is_refused_through_symlinks_and_dotdot(tmp_path):
    nemo = tmp_path / "extracted_nemo"  # a folder checkpoint: not read at all before the refusal
    nemo.mkdir()
    (nemo / "model_weights.ckpt").write_bytes(b"not even read")
    (tmp_path / "link").symlink_to(nemo)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "spiece.model").write_bytes(b"not read either")
    before = snapshot(tmp_path)
    for out in (nemo / "hf", tmp_path / "link" / "hf", nemo / "x" / ".." / "hf"):
        assert_one_line_error(convert(nemo, out), "lies inside the input")
    assert_one_line_error(convert(tmp_path / "link", nemo, "--overwrite"), "is the input")
    assert_one_line_error(convert(nemo, tok, "--overwrite", "--tokenizer", tok / "spiece.model"),
                          "holds the input", "spiece.model")
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_a_model_folder(small, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    names = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json",
             "generation_config.json", "README.md", "pytorch_model.bin"]
    for name in names:
        (out / name).write_text("old")
    (out / ".hf.streamconv-tmp-12").mkdir()  # a leftover of an earlier run into out/hf
    assert_one_line_error(convert(small, out), "not empty", "--overwrite")
    proc = convert(small, out, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]
    assert streamconv.verify(small, out, vocab_size=256) == []


def test_overwrite_through_a_symlink_replaces_the_folder_it_names(small, tmp_path):
    real = tmp_path / "disk" / "model"
    real.mkdir(parents=True)
    (real / "config.json").write_text("old")
    (tmp_path / "link").symlink_to(real)
    assert convert(small, tmp_path / "link", "--overwrite").returncode == 0
    assert (tmp_path / "link").is_symlink() and os.readlink(tmp_path / "link") == str(real)
    assert sorted(os.listdir(real)) == ["config.json", "model.safetensors"]
    assert streamconv.verify(small, real, vocab_size=256) == []


def _strace_works():
    strace = shutil.which("strace")
    return strace is not None and subprocess.run([strace, "-o", "/dev/null", "true"],
                                                 capture_output=True).returncode == 0


@pytest.mark.skipif(not _strace_works(), reason="needs strace, and ptrace permitted")
@pytest.mark.parametrize("exchange,held", [(True, 1), (False, 1), (False, 2)])
def test_a_kill_during_any_rename_leaves_a_complete_model(small, tmp_path, exchange, held):
    """Each rename of the swap is held 2 s by strace and the process SIGKILLed there.

    With RENAME_EXCHANGE the swap is one rename; the fallback (renameat2 made to fail with EINVAL, as on a
    filesystem without it) renames the old folder aside, then the new one in. The old folder is a complete
    model at every moment, at the target or aside, and the next run leaves exactly one: the new one.
    """
    old_ckpt = tmp_path / "in" / "old.ckpt"
    make_checkpoint(old_ckpt, SMALL, optimizer=False, seed=1)
    out = tmp_path / "out"
    assert convert(old_ckpt, out).returncode == 0
    log = tmp_path / "in" / "strace.log"
    delayed = "rename,renameat,renameat2" if exchange else "rename,renameat"
    inject = ["-e", f"inject={delayed}:delay_enter=2s"] + ([] if exchange else ["-e", "inject=renameat2:error=EINVAL"])
    command = ["strace", "-f", "-qq", "-o", log, "-e", "trace=rename,renameat,renameat2", *inject,
               sys.executable, "-m", "streamconv", "--checkpoint-path", small, "--save-path", out,
               "--vocab-size", "256", "--quiet", "--overwrite"]
    proc = subprocess.Popen(command, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    entered = re.compile(rf"^(\d+)\s+({delayed.replace(',', '|')})\(", re.M)
    deadline = time.monotonic() + 60
    while len(found := entered.findall(log.read_text() if log.exists() else "")) < held:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.01)
    os.kill(int(found[held - 1][0]), signal.SIGKILL)
    proc.wait()
    assert "RENAME_EXCHANGE" in log.read_text()  # tried in both modes
    assert (found[held - 1][1] == "renameat2") == exchange  # and killed in the exchange itself, or after it failed
    aside = [tmp_path / e for e in os.listdir(tmp_path) if e.startswith(".out.streamconv-old-")]
    complete = out if held == 1 else aside[0]
    assert not out.exists() if held == 2 else not aside
    assert streamconv.verify(old_ckpt, complete, vocab_size=256) == []

    assert convert(small, out, "--overwrite").returncode == 0
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]
    assert streamconv.verify(small, out, vocab_size=256) == []


@pytest.mark.skipif(not _strace_works(), reason="needs strace, and ptrace permitted")
def test_a_kill_after_the_fallback_moved_the_old_folder_aside_is_recovered_without_overwrite(small, tmp_path):
    """The next run puts the old model back first, so without --overwrite it is refused, not replaced."""
    out = tmp_path / "out"
    assert convert(small, out).returncode == 0
    aside = tmp_path / ".out.streamconv-old-99999"
    out.rename(aside)  # the state a kill between the fallback's two renames leaves
    (tmp_path / ".out.streamconv-tmp-99999").mkdir()
    assert_one_line_error(convert(small, out), "not empty", "--overwrite")
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]
    assert streamconv.verify(small, out, vocab_size=256) == []


def test_only_the_exact_leftover_names_are_cleaned_up_or_put_back(small, tmp_path):
    """What a killed run leaves is `-tmp-<pid>` and `-old-<pid>`: a user's `.out.streamconv-tmp-mine/` is kept,
    and neither a planted `-old-x` folder nor a link named like a leftover is moved into the absent save path."""
    mine = tmp_path / ".out.streamconv-tmp-mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    planted = tmp_path / ".out.streamconv-old-x"
    planted.mkdir()
    (planted / "config.json").write_text("{}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, tmp_path / ".out.streamconv-old-12345")
    os.symlink(elsewhere, tmp_path / ".out.streamconv-tmp-12345")
    (tmp_path / ".out.streamconv-tmp-99999").mkdir()  # a killed run's: removed
    out = tmp_path / "out"
    done = convert(small, out)
    assert done.returncode == 0, done.stderr
    assert not os.path.islink(out) and streamconv.verify(small, out, vocab_size=256) == []
    assert sorted(os.listdir(tmp_path)) == [".out.streamconv-old-12345", ".out.streamconv-old-x",
                                            ".out.streamconv-tmp-12345", ".out.streamconv-tmp-mine", "elsewhere",
                                            "in", "out"]
    assert (mine / "notes.txt").read_text() == "mine" and os.listdir(planted) == ["config.json"]


def test_a_second_run_on_the_same_path_is_refused_while_the_first_runs(checkpoints, tmp_path):
    source = checkpoints("mem_24", WIDE, optimizer=False)
    out = tmp_path / "out"
    first = start_conversion(source.path, out)
    wait_for_partial_shard(tmp_path, first)
    try:
        for extra in ([], ["--overwrite"]):
            second = run_cli("--checkpoint-path", source.path, "--save-path", out, "--vocab-size", "2048", *extra)
            assert_one_line_error(second, "another streamconv is writing", str(out))
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait() == 0, first.stderr.read()
    assert os.listdir(tmp_path) == ["out"]
    assert streamconv.verify(source.path, out, vocab_size=2048) == []


@pytest.mark.parametrize("overwrite,fragment", [(False, "written by another program"), (True, "(mine.txt)")])
def test_a_folder_that_appears_meanwhile_is_not_replaced(checkpoints, tmp_path, overwrite, fragment):
    source = checkpoints("mem_24", WIDE, optimizer=False)
    out = tmp_path / "out"
    proc = start_conversion(source.path, out, *(["--overwrite"] if overwrite else []))
    wait_for_partial_shard(tmp_path, proc)
    out.mkdir()
    (out / "mine.txt").write_text("written while streamconv ran")
    proc.send_signal(signal.SIGCONT)
    proc.wait()
    assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, "", proc.stderr.read()), fragment)
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["mine.txt"]


@pytest.mark.parametrize("deleted", ["staging", "parent"])
def test_the_staging_folder_deleted_mid_run_is_one_line(checkpoints, tmp_path, deleted):
    source = checkpoints("mem_24", WIDE, optimizer=False)
    parent = tmp_path / "parent"
    parent.mkdir()
    proc = start_conversion(source.path, parent / "out")
    staging = wait_for_partial_shard(parent, proc)
    shutil.rmtree(staging if deleted == "staging" else parent)
    proc.send_signal(signal.SIGCONT)
    proc.wait()
    assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, "", proc.stderr.read()),
                          "was deleted during the conversion", "run again")
    assert snapshot(tmp_path) == ({"parent": None} if deleted == "staging" else {})


def test_ctrl_c_closes_the_progress_bar_before_its_line(checkpoints, tmp_path):
    source = checkpoints("mem_24", WIDE, optimizer=False)
    proc = start_conversion(source.path, tmp_path / "out", quiet=False)
    wait_for_partial_shard(tmp_path, proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=30) == 130
    stderr = proc.stderr.read()
    assert "converting" in stderr  # the bar was drawn
    assert stderr.endswith("\nstreamconv: interrupted; nothing was written\n"), repr(stderr[-300:])


def test_the_parent_folder_deleted_after_planning_is_one_error(bf16_ckpt, tmp_path):
    parent = tmp_path / "parent"
    parent.mkdir()
    with pytest.raises(streamconv.ConversionError, match="was deleted during the conversion"):
        streamconv.convert(bf16_ckpt.path, parent / "out", vocab_size=1000,
                           before_write=lambda plan: shutil.rmtree(parent))
    assert not parent.exists()


def test_a_hidden_folder_that_only_looks_like_streamconvs_is_not_replaced(bf16_ckpt, tmp_path):
    out = tmp_path / "out"
    (out / ".notes.streamconv-mine").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    proc = run_cli("--checkpoint-path", bf16_ckpt.path, "--save-path", out, "--vocab-size", "1000", "--overwrite")
    assert_one_line_error(proc, ".notes.streamconv-mine")
    assert (out / ".notes.streamconv-mine").is_dir()


def test_a_mount_point_is_refused_before_anything_is_read(bf16_ckpt, tmp_path):
    mount = next((m for m in ("/proc", "/sys", "/dev/shm") if os.path.ismount(m)), None)
    if mount is None:
        pytest.skip("no mount point to try")
    proc = run_cli("--checkpoint-path", bf16_ckpt.path, "--save-path", mount, "--vocab-size", "1000")
    assert_one_line_error(proc, "is a mount point", os.path.join(mount, "model"))
