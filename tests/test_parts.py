"""A conversion split over parts (`--part I/N`): each part a separate process, the published folder byte for byte
a single run's, whatever the order, concurrency or kills; mismatched parts refused."""

import contextlib
import filecmp
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import streamconv
from benchmarks.parallel import make_parallel
from streamconv import parts
from streamconv.demo import SyntheticModel
from streamconv.families import FAMILIES
from streamconv.families.base import Dims
from streamconv.plan import make_plan
from tests.conftest import run_cli
from tests.test_cli import assert_one_line_error
from tests.test_output_safety import _strace_works

MODEL = SyntheticModel(n_embd=64, n_layer=3, n_head=8, vocab_size=1000, n_positions=64)
FLAGS = ("--vocab-size", "1000", "--shard-size", "100kB", "--quiet")  # 5 shards: parts cut some of them
FINGERPRINT = "d8cc4e348666489a5cf8c96627a80264eeb49f16ce0fe4aeadb4c0b35ccb08b6"  # computed on commit e1798ea


@pytest.fixture(scope="module")
def ckpt(checkpoints):
    return checkpoints("parts", MODEL, dtype=torch.bfloat16).path


def convert(source, out, *args):
    return run_cli("--checkpoint-path", source, "--save-path", out, *FLAGS, *args)


def start(source, out, *args, env=None):
    return subprocess.Popen([sys.executable, "-m", "streamconv", "--checkpoint-path", source, "--save-path", out,
                             *FLAGS, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def assert_same_folder(made, reference):
    """Every file of `made` byte-equal to the single run's, and no other file."""
    assert sorted(os.listdir(made)) == sorted(os.listdir(reference))
    match, mismatch, errors = filecmp.cmpfiles(made, reference, os.listdir(reference), shallow=False)
    assert not mismatch and not errors


@pytest.fixture(scope="module")
def single(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    assert convert(ckpt, out).returncode == 0
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) == 5
    return out


def staged_folders(parent):
    return [e for e in os.listdir(parent) if ".streamconv-parts-" in e]


# --- the assignment: a pure function of the plan and N ----------------------------------------------------------

def plan_40b(layers=64):
    """GPT-SW3 40B-shaped (hidden 8192, 64 heads, FFN 32768), from metadata only: no file."""
    dims = Dims(8192, layers, 64, 64, 128, 32768, 2048, 64000, embedding_rows=64000)
    recipes = FAMILIES["gpt-sw3"].tensor_recipes(dims)
    return make_plan(recipes, ["torch.bfloat16"] * len(recipes), 5 * 10**9)


def test_the_parts_of_a_40b_plan_are_balanced_and_cover_every_tensor_once():
    plan = plan_40b()
    shares = [parts.share(plan, i, 8) for i in range(8)]
    sizes = [s.total_size for s in shares]
    assert max(sizes) / min(sizes) <= 1.2, sizes
    names = [t.name for s in shares for t in s.tensors]
    assert names == [t.name for t in plan.tensors]  # each once, in plan order
    assert sum(sizes) == plan.total_size
    assert len(plan.shards) < 8 * 3  # so shards alone (about 5 GB each) could not balance 8 parts
    whole = {s.filename: s for s in plan.shards}
    for share in shares:
        for shard in share.shards:  # a run of its shard's tensors, at the shard's offsets, under its header
            full = whole[shard.filename]
            start = full.tensors.index(shard.tensors[0])
            assert full.tensors[start : start + len(shard.tensors)] == shard.tensors
            assert shard.header == full.header


def fixed_identity(tmp_path):
    """`parts.identity` of a fixed plan, config, tokenizer and flags, over a source file and a source folder with
    fixed sizes and times; the two real paths replaced by a placeholder (they change with `tmp_path`)."""
    plan = plan_40b(layers=2)
    config = {"model_type": "gpt2", "n_embd": 8192, "n_layer": 2, "vocab_size": 64000}
    tokenizer_bytes = [b"spiece model bytes", b"tokenizer.json" + b"{}"]
    fields = {"parts": 4, "--dtype": "bf16", "--shard-size": 5 * 10**9, "--vocab-size": 64000, "--num-heads": None,
              "--family": None, "--overwrite": False}
    checkpoint, folder = tmp_path / "model.ckpt", tmp_path / "tokenizer"
    folder.mkdir()
    for path, data in ((checkpoint, b"x" * 100), (folder / "a.model", b"ab"), (folder / "sub.json", b"{}")):
        path.write_bytes(data)
        os.utime(path, ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    found = parts.identity(fields, plan, config, tokenizer_bytes, [str(checkpoint), str(folder)])
    assert found["checkpoint"] == os.path.realpath(checkpoint) and found["tokenizer file"] == os.path.realpath(folder)
    return {**found, "checkpoint": "<path>", "tokenizer file": "<path>"}


def test_the_split_run_fingerprint_is_pinned(tmp_path):
    """Parts of one conversion agree on the staging folder by this digest: a change to what it hashes, or to how,
    makes parts run by two streamconv builds miss each other (a version change does so on purpose)."""
    found = fixed_identity(tmp_path)
    assert hashlib.sha256(json.dumps(found, sort_keys=True).encode()).hexdigest() == FINGERPRINT


def test_a_part_needs_the_space_of_its_share_not_of_its_shards():
    plan = plan_40b(layers=4)
    shares = [parts.share(plan, i, 8) for i in range(8)]
    for share in shares:
        assert share.total_size < parts.written_bytes(share) < share.total_size + 2**20 * len(share.shards)
    assert parts.written_bytes(shares[-1]) < plan.shards[-1].file_size + plan.total_size / 4
    assert sum(parts.written_bytes(s) for s in shares) >= plan.file_bytes


def test_more_parts_than_tensors_leave_parts_idle():
    sizes = [5, 1, 1]  # ideal cuts at 1.4, 2.8, 4.2 and 5.6 bytes: nearest are 0, 5, 5, 6
    assert parts.boundaries(sizes, 5) == [0, 0, 1, 1, 2, 3]
    assert parts.boundaries([], 3) == [0, 0, 0, 0]
    assert parts.boundaries([3, 3, 3, 3], 2) == [0, 2, 4]
    assert parts.boundaries([1] * 10, 1) == [0, 10]


def test_the_cuts_are_the_nearest_to_equal_bytes():
    sizes = [7, 1, 1, 1, 7, 1, 1, 1]  # 20 bytes: the cut nearest 10 is after the 4th item (10)
    assert parts.boundaries(sizes, 2) == [0, 4, 8]


# --- arguments ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,fragment", [("3/3", "I must be 0 to 2"), ("0/0", "N must be at least 1"),
                                            ("-1/2", "I must be 0 to 1"), ("x", "cannot read --part 'x'"),
                                            ("1/", "cannot read --part"), ("slurm", "SLURM_ARRAY_TASK_ID"),
                                            ("0/10000000000", "N must be at most 65536")])
def test_bad_part_values_are_one_line_errors(ckpt, tmp_path, value, fragment):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run([sys.executable, "-m", "streamconv", "--checkpoint-path", ckpt, "--save-path",
                           tmp_path / "out", *FLAGS, f"--part={value}"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert_one_line_error(proc, fragment)
    assert os.listdir(tmp_path) == []


def test_the_python_api_names_the_keyword(ckpt, tmp_path):
    with pytest.raises(streamconv.ConversionError, match=r"part=3/3"):
        streamconv.convert(ckpt, tmp_path / "out", part="3/3")


def test_slurm_task_variables_give_the_part(ckpt, tmp_path, single):
    out = tmp_path / "out"
    for task in (7, 5, 6):  # an array 5-7: parts 2, 0, 1 of 3
        env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "3"}
        proc = start(ckpt, out, "--part", "slurm", env=env)
        assert proc.wait() == 0, proc.stderr.read()
        assert f"part {task - 5}/3: " in proc.stdout.read()
    assert_same_folder(out, single)


# --- processes ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_three_parts_in_any_order_make_the_single_runs_folder(ckpt, tmp_path, single, order):
    out = tmp_path / "out"
    for k, index in enumerate(order):
        proc = convert(ckpt, out, "--part", f"{index}/3")
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""
        last = k == len(order) - 1
        assert out.exists() == last  # nothing at the save path until the last part ends
        assert ("(all 3 parts done)" in proc.stdout) == last, proc.stdout
    assert_same_folder(out, single)
    assert streamconv.verify(ckpt, out, vocab_size=1000) == []
    (staged,) = staged_folders(tmp_path)  # what makes a rerun a no-op: no tensor bytes left there
    assert sorted(os.listdir(tmp_path / staged)) == ["done-0", "done-1", "done-2", "parts.json", "published",
                                                     "swapping"]


def test_three_concurrent_parts_publish_once(ckpt, tmp_path, single):
    out = tmp_path / "out"
    procs = [start(ckpt, out, "--part", f"{i}/3") for i in range(3)]
    outputs = [(p.wait(), p.stdout.read(), p.stderr.read()) for p in procs]
    assert all(code == 0 and not err for code, _, err in outputs), outputs
    published = [text for _, text, _ in outputs if f"-> {out} (all 3 parts done)" in text]
    assert len(published) == 1, outputs
    assert_same_folder(out, single)


def test_a_finished_part_run_again_is_a_no_op(ckpt, tmp_path, single):
    out = tmp_path / "out"
    for i in range(3):
        assert convert(ckpt, out, "--part", f"{i}/3").returncode == 0
    before = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)}
    started = time.monotonic()
    again = convert(ckpt, out, "--part", "1/3")
    assert again.returncode == 0 and "part 1/3: done before -> " in again.stdout, again
    assert time.monotonic() - started < 30
    assert {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)} == before
    assert_same_folder(out, single)


@pytest.mark.parametrize("made_again", [False, True])
def test_a_published_folder_removed_or_replaced_is_said_to_be(ckpt, tmp_path, made_again):
    """`rm -rf out` (and `mkdir out`) after publishing: a part run again says so, rather than that it is done."""
    out = tmp_path / "out"
    for i in range(2):
        assert convert(ckpt, out, "--part", f"{i}/2").returncode == 0
    shutil.rmtree(out)
    if made_again:
        out.mkdir()
    assert_one_line_error(convert(ckpt, out, "--part", "0/2"), f"was published to {out}, which was removed or "
                          "replaced since", "to convert again")
    assert os.listdir(out) == [] if made_again else not out.exists()


def test_a_part_refused_for_a_full_save_path_stages_nothing(ckpt, tmp_path, single):
    """Parts over a folder that holds a model: refused as a single run is, leaving no staging folder behind
    (which would refuse the --overwrite run the message asks for); with --overwrite they replace it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert_one_line_error(convert(ckpt, out, "--part", "1/2"), "is not empty", "--overwrite")
    assert staged_folders(tmp_path) == [] and os.listdir(out) == ["config.json"]
    for i in (1, 0):
        done = convert(ckpt, out, "--part", f"{i}/2", "--overwrite")
        assert done.returncode == 0, done.stderr
    assert_same_folder(out, single)


def snapshot(folder):
    """Every entry under `folder` with its size, mtime and content digest."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = (os.stat(path).st_mtime_ns,
                                                        hashlib.sha256(f.read()).hexdigest())
    return found


@pytest.mark.parametrize("args,fragment", [
    (("--part", "1/3", "--dtype", "fp16"), "they were run with --dtype auto, this part with --dtype fp16"),
    (("--part", "1/4"), "they are parts of 3, this one of 4"),
    (("--part", "1/3", "--shard-size", "200kB"), "--shard-size 100000, this part with --shard-size 200000"),
    (("--part", "1/3", "--overwrite"), "--overwrite False, this part with --overwrite True"),
])
def test_a_part_unlike_the_staged_ones_is_refused_and_touches_nothing(ckpt, tmp_path, args, fragment):
    out = tmp_path / "out"
    assert convert(ckpt, out, "--part", "0/3").returncode == 0
    (staged,) = staged_folders(tmp_path)
    before = snapshot(tmp_path / staged)
    assert_one_line_error(convert(ckpt, out, *args), "does not match the parts staged", fragment,
                          f"remove {tmp_path / staged}")
    assert staged_folders(tmp_path) == [staged] and snapshot(tmp_path / staged) == before
    assert not out.exists()


def test_a_part_of_a_changed_checkpoint_is_refused(tmp_path):
    source = tmp_path / "in.ckpt"
    from streamconv.demo import make_checkpoint

    make_checkpoint(source, MODEL, optimizer=False)
    out = tmp_path / "out"
    assert convert(source, out, "--part", "0/2").returncode == 0
    make_checkpoint(source, MODEL, optimizer=False, seed=5)  # same shapes, other weights
    os.utime(source, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert_one_line_error(convert(source, out, "--part", "1/2"), "checkpoint's files changed")


def test_parts_of_a_tensor_parallel_nemo(tmp_path):
    source = make_parallel(tmp_path / "tp2.nemo", MODEL, tp=2, kind="nemo").path
    reference = tmp_path / "single"
    assert convert(source, reference).returncode == 0
    out = tmp_path / "out"
    for i in (1, 0):
        assert convert(source, out, "--part", f"{i}/2").returncode == 0
    assert_same_folder(out, reference)
    concurrent = tmp_path / "concurrent"
    procs = [start(source, concurrent, "--part", f"{i}/3") for i in range(3)]
    assert [p.wait() for p in procs] == [0, 0, 0], [p.stderr.read() for p in procs]
    assert_same_folder(concurrent, reference)


def test_parts_of_a_distributed_checkpoint(tmp_path, mcore_cases):
    case = mcore_cases({"llama": dict(groups=2, tp=2, layout="nemo2", layers=2)})["llama"]
    reference = tmp_path / "single"
    args = ("--vocab-size", "256", "--shard-size", "50kB", "--quiet")
    single = run_cli("--checkpoint-path", case.checkpoint, "--save-path", reference, *args)
    assert single.returncode == 0, single.stderr
    assert len([f for f in os.listdir(reference) if f.endswith(".safetensors")]) >= 3
    out = tmp_path / "out"
    for i in (2, 0, 1):
        proc = run_cli("--checkpoint-path", case.checkpoint, "--save-path", out, *args, "--part", f"{i}/3")
        assert proc.returncode == 0, proc.stderr
    assert "tokenizer files copied and checked" in proc.stdout, proc.stdout  # (by the publisher, in its folder)
    assert_same_folder(out, reference)
    assert streamconv.verify(case.checkpoint, out, vocab_size=256) == []
    concurrent = tmp_path / "concurrent"
    procs = [subprocess.Popen([sys.executable, "-m", "streamconv", "--checkpoint-path", case.checkpoint,
                               "--save-path", concurrent, *args, "--part", f"{i}/3"], stderr=subprocess.PIPE)
             for i in range(3)]
    assert [p.wait() for p in procs] == [0, 0, 0], [p.stderr.read() for p in procs]
    assert_same_folder(concurrent, reference)


# --- a planted or tampered staging folder (it may be on a filesystem others write) -----------------------------

def convert_within(source, out, *args, seconds=120):
    """A part that must end promptly: a pipe planted in the staging folder must not hang it."""
    return subprocess.run([sys.executable, "-m", "streamconv", "--checkpoint-path", source, "--save-path", out,
                           *FLAGS, *map(str, args)], capture_output=True, text=True, timeout=seconds)


def first_part_staged(ckpt, out):
    """Part 0 of 2 run: (the staging folder, its model/)."""
    assert convert(ckpt, out, "--part", "0/2").returncode == 0
    (staged,) = staged_folders(out.parent)
    return out.parent / staged, out.parent / staged / "model"


LAST_SHARD = "model-00005-of-00005.safetensors"  # written by part 1 of 2 alone


@pytest.mark.parametrize("plant", ["symbolic link", "pipe", "hard link"])
def test_a_shard_planted_in_the_staging_folder_is_refused_and_nothing_is_written_through_it(ckpt, tmp_path, plant):
    out = tmp_path / "out"
    folder, model = first_part_staged(ckpt, out)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(model / LAST_SHARD)
    {"symbolic link": os.symlink, "pipe": lambda _, path: os.mkfifo(path), "hard link": os.link}[plant](
        victim, model / LAST_SHARD)
    proc = convert_within(ckpt, out, "--part", "1/2")
    assert_one_line_error(proc, f"{model / LAST_SHARD} is not a file streamconv wrote", "remove it")
    assert victim.read_bytes() == b"precious"
    assert not (folder / "done-1").exists() and not out.exists()


@pytest.mark.parametrize("planted,how", [("", "a symbolic link"), ("", "writable by others"),
                                         ("model", "a symbolic link")])
def test_a_staging_folder_others_could_have_planted_is_refused(ckpt, tmp_path, planted, how):
    """A link sends shards and markers elsewhere; a folder others can write holds what they planted."""
    out = tmp_path / "out"
    folder, _ = first_part_staged(ckpt, out)
    path, elsewhere = folder / planted, tmp_path / "elsewhere"
    if how == "a symbolic link":
        os.rename(path, elsewhere)
        os.symlink(elsewhere, path)
    else:
        os.chmod(path, 0o777)
    watched = elsewhere if how == "a symbolic link" else folder
    before = snapshot(watched)
    assert_one_line_error(convert_within(ckpt, out, "--part", "1/2"), f"the staging folder {os.path.normpath(path)} "
                          f"is not a folder only this user can write ({how})", "remove it")
    assert snapshot(watched) == before and not out.exists()


@pytest.mark.parametrize("plant", ["pipe", "symbolic link"])
@pytest.mark.parametrize("name", ["parts.json", "done-1", "publishing", "swapping", "published"])
def test_a_marker_that_is_not_a_plain_file_is_refused_promptly(ckpt, tmp_path, name, plant):
    """Never waited on (a pipe) or followed (a link): refused in one line, in a few seconds, and nothing published."""
    out = tmp_path / "out"
    folder, _ = first_part_staged(ckpt, out)
    (tmp_path / "victim").write_text("precious")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folder / name)
    os.mkfifo(folder / name) if plant == "pipe" else os.symlink(tmp_path / "victim", folder / name)
    kind = "a pipe, socket or device" if plant == "pipe" else "a symbolic link"
    assert_one_line_error(convert_within(ckpt, out, "--part", "1/2", seconds=60),
                          f"{folder / name} is not a file this user wrote ({kind})", f"remove {folder}")
    assert not out.exists() and (tmp_path / "victim").read_text() == "precious"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to plant files of another user")
@pytest.mark.parametrize("planted,fragment", [("done-1", "is not a file this user wrote (owned by uid 65534)"),
                                              (f"model/{LAST_SHARD}", "is not a file streamconv wrote")])
def test_markers_and_shards_of_another_user_are_refused(ckpt, tmp_path, planted, fragment):
    out = tmp_path / "out"
    folder, _ = first_part_staged(ckpt, out)
    (folder / planted).write_text("{}\n")
    os.chown(folder / planted, 65534, 65534)
    for index in (1, 0):  # part 1 meets the shard or its forged marker; part 0, done, meets the forged marker
        proc = convert_within(ckpt, out, "--part", f"{index}/2")
        if planted == "done-1" or index == 1:
            assert_one_line_error(proc, f"{folder / planted} {fragment}")
    assert not out.exists()


def test_a_forged_swapping_marker_with_overwrite_keeps_the_staged_model_and_publishes_nothing(ckpt, tmp_path):
    """A marker naming the save path's own folder as the staged one: neither the staged model is deleted nor
    the old model left in place with exit 0."""
    out = tmp_path / "out"
    assert convert(ckpt, out, "--vocab-size", "1024").returncode == 0  # an older model, to be replaced
    old = snapshot(out)
    assert convert(ckpt, out, "--part", "0/2", "--overwrite").returncode == 0
    (staged,) = staged_folders(tmp_path)
    folder = tmp_path / staged
    inode = os.stat(out).st_ino
    for forged in (f"{inode}\n", f"{inode} {inode}\n"):
        (folder / "swapping").write_text(forged)
        proc = convert_within(ckpt, out, "--part", "1/2", "--overwrite")
        assert_one_line_error(proc, f"cannot tell whether the model staged in {folder} was published to {out}")
        assert snapshot(out) == old
        assert LAST_SHARD in os.listdir(folder / "model") and not (folder / "published").exists()


@pytest.mark.parametrize("save_path_made", [False, True])
def test_a_forged_published_marker_is_not_taken_for_a_publish(ckpt, tmp_path, save_path_made):
    out = tmp_path / "out"
    folder, _ = first_part_staged(ckpt, out)
    if save_path_made:
        out.mkdir()
    (folder / "published").write_text(f"{os.stat(tmp_path).st_ino} 0\n")
    assert_one_line_error(convert_within(ckpt, out, "--part", "1/2"), f"was published to {out}, which was removed "
                          "or replaced since")
    assert os.listdir(out) == [] if save_path_made else not out.exists()


def test_a_staging_folder_tampered_with_this_users_rights_is_published_and_verify_tells(ckpt, tmp_path, single):
    """A staging folder is trusted only as far as the filesystem's writers are: done markers forged and a shard
    changed with this user's own rights are published as staged, and --verify names what differs."""
    out = tmp_path / "out"
    folder, model = first_part_staged(ckpt, out)
    for name in os.listdir(single):
        if name.endswith(".safetensors"):
            shutil.copyfile(single / name, model / name)
    with open(model / LAST_SHARD, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff\xff\xff\xff")
    (folder / "done-1").write_text("{}\n")
    assert convert(ckpt, out, "--part", "0/2").returncode == 0
    check = run_cli("--verify", "--checkpoint-path", ckpt, "--save-path", out, "--vocab-size", "1000")
    assert check.returncode == 1 and f"{out} is not the conversion of" in check.stdout, check.stdout


def test_n_is_bounded_and_a_part_computes_only_its_own_share():
    plan = plan_40b(layers=4)
    started = time.monotonic()
    shares = [parts.share(plan, i, 10**10) for i in (0, 5 * 10**9, 10**10 - 1)]
    assert time.monotonic() - started < 10  # two cuts each, not 10**10
    assert sum(s.total_size for s in shares) < plan.total_size
    with pytest.raises(streamconv.ConversionError, match=r"ray=10000000000: give the number of parts, 1 to 65536"):
        streamconv.convert("unused.ckpt", "out", ray=10**10)


def test_the_most_parts_allowed_are_far_more_than_tensors(ckpt, tmp_path):
    out = tmp_path / "out"
    started = time.monotonic()
    proc = convert_within(ckpt, out, "--part", "65535/65536", seconds=120)
    assert proc.returncode == 0, proc.stderr
    assert "(waiting for part(s) 0, 1, 2, 3, 4, 5, 6, 7 and 65527 more of 65536)" in proc.stdout
    assert time.monotonic() - started < 60 and not out.exists()


# --- the README's Slurm scripts -------------------------------------------------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_script(tmp_path, name):
    """The script between the README's `<!-- name -->` markers, written to a file."""
    text = README.read_text()
    block = re.search(rf"<!-- {name} -->\n```bash\n(.*?)```\n<!-- /{name} -->", text, re.S)
    assert block, f"README.md has no {name} script"
    path = tmp_path / f"{name}.sbatch"
    path.write_text(block.group(1))
    return path


def slurm_task(script, task, count, *args, first=0):
    """`script` as Slurm runs an array task: bash, the job's arguments, the array variables, streamconv on PATH."""
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(first + task), "SLURM_ARRAY_TASK_MIN": str(first),
           "SLURM_ARRAY_TASK_COUNT": str(count),
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    return subprocess.Popen(["bash", script, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_the_readme_sbatch_script_splits_one_conversion_over_16_tasks(ckpt, tmp_path, single):
    script = readme_script(tmp_path, "sbatch-parts")
    assert "#SBATCH --array=0-15" in script.read_text()
    out = tmp_path / "out"
    order = (7, 0, 15, *(task for task in range(1, 15) if task != 7))  # tasks of array 3-18, started at once
    tasks = [slurm_task(script, task, 16, ckpt, out, *FLAGS[:4], first=3) for task in order]
    assert [t.wait() for t in tasks] == [0] * 16, [t.stderr.read() for t in tasks]
    assert_same_folder(out, single)


def test_the_readme_kubernetes_job_runs_its_parts(ckpt, tmp_path, single):
    """The README's Indexed Job: its pods' command, with this test's paths and flags, one pod per index."""
    import yaml

    manifest = yaml.safe_load(re.search(r"```yaml\n(.*?)```", README.read_text(), re.S).group(1))
    spec = manifest["spec"]
    assert (manifest["kind"], spec["completionMode"]) == ("Job", "Indexed")
    shell, flag, command = spec["template"]["spec"]["containers"][0]["command"]
    assert (shell, flag) == ("sh", "-c") and f'--part "$JOB_COMPLETION_INDEX/{spec["completions"]}"' in command
    out = tmp_path / "out"
    command = (command.replace("/data/ckpt/gpt-sw3-40b.nemo", str(ckpt)).replace("/data/hf/gpt-sw3-40b", str(out))
               .replace("--shard-size 5GB", " ".join(FLAGS[:4])))
    env = {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    pods = [subprocess.Popen(["sh", "-c", command], env={**env, "JOB_COMPLETION_INDEX": str(i)},
                             stderr=subprocess.PIPE, text=True) for i in range(spec["completions"])]
    assert [p.wait() for p in pods] == [0] * spec["completions"], [p.stderr.read() for p in pods]
    assert_same_folder(out, single)


def test_the_readme_sbatch_script_converts_every_iteration_of_a_megatron_lm_run(tmp_path, mcore_cases):
    case = mcore_cases({"mlm": dict(groups=2, layout="megatron_lm", tp=2)})["mlm"]
    iterations = sorted(case.checkpoint.glob("iter_*"))
    assert [p.name for p in iterations] == ["iter_0000005", "iter_0000010"]
    manifest = tmp_path / "manifest.txt"
    manifest.write_text("".join(f"{p}\n" for p in iterations))  # as `ls -d .../iter_* > manifest.txt`
    script, out = readme_script(tmp_path, "sbatch-iterations"), tmp_path / "hf"
    out.mkdir()
    tasks = [slurm_task(script, task, 2, manifest, out, "--vocab-size", "256") for task in (1, 0)]
    assert [t.wait() for t in tasks] == [0, 0], [t.stderr.read() for t in tasks]
    for iteration in iterations:
        reference = tmp_path / f"single-{iteration.name}"
        assert run_cli("--checkpoint-path", iteration, "--save-path", reference, "--vocab-size", "256",
                       "--quiet").returncode == 0
        assert_same_folder(out / iteration.name, reference)
    assert not filecmp.cmp(out / "iter_0000005" / "model.safetensors", out / "iter_0000010" / "model.safetensors",
                           shallow=False)
    beyond = slurm_task(script, 2, 3, manifest, out)  # an index past the manifest's end
    assert beyond.wait() == 2 and "no line 3 in" in beyond.stderr.read()
    again = slurm_task(script, 0, 2, manifest, out, "--vocab-size", "256")  # a requeued task, already done
    assert again.wait() == 2 and "not empty" in again.stderr.read()


# --- kills -------------------------------------------------------------------------------------------------------

WIDE_ARGS = ("--vocab-size", "2048", "--shard-size", "20MB")


def wide_checkpoint(checkpoints):
    """200 MB of bf16 weights without optimizer state: long enough to catch a part mid-stream."""
    wide = SyntheticModel(n_embd=1024, n_head=16, vocab_size=2048, n_positions=512, n_layer=8)
    return checkpoints("parts_wide", wide, optimizer=False).path


def second_part_streaming(checkpoints, tmp_path):
    """A 200 MB conversion in two parts: the single run's folder, part 0 done, and part 1 running, caught 30 MB
    into its 100 MB share. Returns (source, reference folder, save path, part 1's process, staged folder name)."""
    source = wide_checkpoint(checkpoints)
    reference = tmp_path / "single"
    assert run_cli("--checkpoint-path", source, "--save-path", reference, *WIDE_ARGS, "--quiet").returncode == 0
    out = tmp_path / "out"
    assert run_cli("--checkpoint-path", source, "--save-path", out, *WIDE_ARGS, "--part", "0/2").returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "streamconv", "--checkpoint-path", source, "--save-path", out,
                             *WIDE_ARGS, "--part", "1/2", "--quiet"], stderr=subprocess.PIPE, text=True)
    (staged,) = staged_folders(tmp_path)
    deadline = time.monotonic() + 60
    while written_by(proc.pid) < 30 * 2**20:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.002)
    return source, reference, out, proc, staged


def test_a_part_killed_mid_stream_is_completed_by_its_rerun(checkpoints, tmp_path):
    source, reference, out, proc, staged = second_part_streaming(checkpoints, tmp_path)
    proc.kill()
    proc.wait()
    assert not out.exists() and not (tmp_path / staged / "done-1").exists()
    rerun = run_cli("--checkpoint-path", source, "--save-path", out, *WIDE_ARGS, "--part", "1/2")
    assert rerun.returncode == 0, rerun.stderr
    assert_same_folder(out, reference)


def test_a_part_whose_staging_folder_is_replaced_while_it_runs_does_not_mark_itself_done(checkpoints, tmp_path):
    """The staging folder moved away and a copy put in its place while a part streams (its bytes now go to the
    old one): the part is refused when it would record itself done in the copy, and its rerun completes it."""
    source, reference, out, proc, staged = second_part_streaming(checkpoints, tmp_path)
    os.rename(tmp_path / staged, tmp_path / "moved")
    shutil.copytree(tmp_path / "moved", tmp_path / staged)
    assert proc.wait() == 2
    assert "was removed or replaced while part 1/2 ran; run this part again" in proc.stderr.read()
    assert not (tmp_path / staged / "done-1").exists() and not out.exists()
    shutil.rmtree(tmp_path / "moved")
    rerun = run_cli("--checkpoint-path", source, "--save-path", out, *WIDE_ARGS, "--part", "1/2")
    assert rerun.returncode == 0, rerun.stderr
    assert_same_folder(out, reference)


def test_a_staging_folder_swapped_for_a_link_while_a_part_runs_sends_nothing_through_it(checkpoints, tmp_path):
    """Renamed away and a link to another folder put in its place mid-stream: the part goes on writing into the
    folder it joined (it holds it open), writes nothing through the link, and is refused at its marker."""
    source, reference, out, proc, staged = second_part_streaming(checkpoints, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "model").mkdir(parents=True)
    os.rename(tmp_path / staged, tmp_path / "moved")
    os.symlink(elsewhere, tmp_path / staged)
    assert proc.wait() == 2
    assert "was removed or replaced while part 1/2 ran; run this part again" in proc.stderr.read()
    assert os.listdir(elsewhere) == ["model"] and os.listdir(elsewhere / "model") == [] and not out.exists()


def test_without_file_locks_parts_publish_and_a_single_run_says_why_not(ckpt, tmp_path, single, monkeypatch):
    """A filesystem without flock (Lustre mounted without it, NFS without a lock manager): the O_EXCL claim
    still publishes parts; a single run, which needs the lock, is refused in one line."""
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(streamconv.ConversionError, match="has no file locks .*Lustre: -o flock.*or convert with part"):
        streamconv.convert(ckpt, tmp_path / "one", vocab_size=1000, shard_size="100kB")
    out = tmp_path / "out"
    for i in (1, 0):
        streamconv.convert(ckpt, out, vocab_size=1000, shard_size="100kB", part=(i, 2))
    assert_same_folder(out, single)


def test_ray_needs_a_save_path(ckpt):
    with pytest.raises(streamconv.ConversionError, match="give save_path"):
        streamconv.convert(ckpt, None, ray=2)


def written_by(pid):
    with open(f"/proc/{pid}/io") as f:
        return int(re.search(r"^wchar: (\d+)", f.read(), re.M).group(1))


def renames_of(log):
    return re.findall(r"^(\d+)\s+(rename|renameat|renameat2)\(", log.read_text() if log.exists() else "", re.M)


@pytest.mark.skipif(not _strace_works(), reason="needs strace, and ptrace permitted")
@pytest.mark.parametrize("overwrite", [False, True])
def test_the_last_part_killed_at_any_rename_is_completed_by_a_rerun(ckpt, tmp_path, single, overwrite):
    """The last part renames its done marker, the swapping marker, the folder into place and the published
    marker (and, with --overwrite, exchanges the old model out). Each rename is held by strace and the part
    SIGKILLed there; rerunning it gives the single run's folder, and nothing else is left at the save path."""
    extra = ("--overwrite",) if overwrite else ()
    count = None
    held = 1
    while count is None or held <= count:
        case = tmp_path / (f"held-{held}" if count is not None else "counting")
        case.mkdir()
        out = case / "out"
        if overwrite:  # an older model to replace
            assert convert(ckpt, out, "--vocab-size", "1024").returncode == 0
        for i in (0, 1):
            assert convert(ckpt, out, "--part", f"{i}/3", *extra).returncode == 0
        log = case / "strace.log"
        proc = subprocess.Popen(["strace", "-f", "-qq", "-o", log, "-e", "trace=rename,renameat,renameat2",
                                 "-e", "inject=rename,renameat,renameat2:delay_enter=1s", sys.executable, "-m",
                                 "streamconv", "--checkpoint-path", ckpt, "--save-path", out, *FLAGS, "--part", "2/3",
                                 *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if count is None:  # a first run, held at every rename, counts them
            assert proc.wait() == 0, proc.stderr.read()
            count = len(renames_of(log))
            assert count >= 4
            assert_same_folder(out, single)
            continue
        deadline = time.monotonic() + 60
        while len(found := renames_of(log)) < held:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.01)
        os.kill(int(found[held - 1][0]), signal.SIGKILL)
        proc.wait()
        rerun = convert(ckpt, out, "--part", "2/3", *extra)
        assert rerun.returncode == 0, (held, rerun.stderr)
        assert_same_folder(out, single)
        assert sorted(e for e in os.listdir(case) if not e.startswith(".out.streamconv-parts-")) == ["out",
                                                                                                     "strace.log"]
        held += 1


# --- Ray ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason='Ray is an optional extra: pip install -e ".[ray]"')
    ray.init(num_cpus=2, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_ray_runs_the_parts_as_tasks(local_ray, ckpt, tmp_path, single):
    out = tmp_path / "out"
    result = streamconv.convert(ckpt, out, ray=3, vocab_size=1000, shard_size="100kB")
    assert_same_folder(out, single)
    assert "(3 Ray tasks" in result.summary()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert result.bytes == index["metadata"]["total_size"]
    (staged,) = staged_folders(tmp_path)
    assert "published" in os.listdir(tmp_path / staged)


def test_a_ray_task_whose_worker_is_killed_is_retried(local_ray, checkpoints, tmp_path):
    """SIGKILL the worker of a running part mid-stream (as a lost node would): Ray runs the task again, and the
    folder is still the single run's."""
    import concurrent.futures

    import psutil

    source = wide_checkpoint(checkpoints)
    options = dict(vocab_size=2048, shard_size="20MB")
    reference, out = tmp_path / "single", tmp_path / "out"
    streamconv.convert(source, reference, **options)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(streamconv.convert, source, out, ray=2, **options)
        deadline, killed = time.monotonic() + 120, None
        while killed is None:
            assert not running.done() and time.monotonic() < deadline, running.exception()
            for proc in psutil.process_iter(["cmdline"]):
                with contextlib.suppress(psutil.Error, OSError):
                    if "ray::_run_part" in " ".join(proc.info["cmdline"] or []) and \
                            written_by(proc.pid) > 30 * 2**20:
                        proc.kill()
                        killed = proc.pid
            time.sleep(0.002)
        result = running.result(timeout=300)
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE
    assert "(2 Ray tasks" in result.summary()
    assert_same_folder(out, reference)


def test_a_ray_task_refused_is_the_drivers_one_line_error(local_ray, ckpt, tmp_path):
    out = tmp_path / "out"
    assert convert(ckpt, out, "--part", "0/3", "--dtype", "fp16").returncode == 0
    with pytest.raises(streamconv.ConversionError, match=r"^part \d/3 does not match the parts staged in .*"
                                                         r"dtype fp16, this part with dtype auto"):
        streamconv.convert(ckpt, out, ray=3, vocab_size=1000, shard_size="100kB")
    assert not out.exists()


def test_without_ray_installed_ray_says_how_to_get_it(ckpt, tmp_path):
    code = ("import sys; sys.modules['ray'] = None; from streamconv.cli import main; "
            f"sys.exit(main({['--checkpoint-path', str(ckpt), '--save-path', str(tmp_path / 'out'), *FLAGS]!r} "
            "+ ['--ray', '3']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert_one_line_error(proc, "--ray needs Ray", 'pip install "streamconv[ray]"')
    assert os.listdir(tmp_path) == []
