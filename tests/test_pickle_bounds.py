"""A small hostile pickle cannot hang the unpickler or fill memory: opcodes, calls, insertions, tuples bounded."""

import io
import pickle
import zipfile

import pytest
import torch

from streamconv.demo import make_checkpoint
from tests.test_cli import assert_one_line_error
from tests.test_hparams import SMALL, Applies, run_bounded, shared_lists


def with_loops(tmp_path, loops) -> str:
    """A small real .ckpt whose `loops` entry (never used by a conversion) is `loops`."""
    path = tmp_path / "in.ckpt"
    make_checkpoint(path, SMALL, optimizer=False)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["loops"] = loops
    torch.save(checkpoint, path)
    return str(path)


class DictItems:
    """Pickles as a dict filled by SETITEMS, so that its keys are hashed only by the unpickler."""

    def __init__(self, items):
        self.items = items

    def __reduce__(self):
        return (dict, (), None, None, iter(self.items))


def shared_tuples(depth: int) -> tuple:
    level: tuple = ("x",)
    for _ in range(depth):
        level = (level, level)
    return level


def chained_tuples(depth: int) -> tuple:
    level: tuple = ()
    for _ in range(depth):
        level = (level,)
    return level


def many_copies() -> list:
    big = list(range(100_000))
    return [Applies(list, big) for _ in range(20_000)]  # 2e9 elements copied, 16 GB: one list pickled once


@pytest.mark.parametrize("make, fragment", [
    (lambda: Applies(str, shared_lists(40)), "applies str to a container"),  # str() would walk 2**40 elements
    (lambda: DictItems([(shared_tuples(40), 1)]), "builds a tuple of more than"),  # one hash: 2**40 steps
    (lambda: Applies(frozenset, [shared_tuples(40)]), "builds a tuple of more than"),
    (lambda: DictItems([(chained_tuples(200), 1)]), "levels"),  # hashing recurses in C
    (many_copies, "steps of work"),
    (lambda: [Applies(list, "x" * 1_000_000) for _ in range(200)], "steps of work"),  # 8 MB of list per call
    (lambda: [None] * 9_000_000, "opcodes"),  # one opcode a byte: 9 MB of pickle for 9 million objects
], ids=["str", "dict-key", "frozenset", "deep-tuple", "copies", "string-copies", "opcodes"])
def test_a_hostile_pickle_beside_the_weights_is_refused_quickly(tmp_path, make, fragment):
    proc = run_bounded("--checkpoint-path", with_loops(tmp_path, make()), "--save-path", tmp_path / "out")
    assert_one_line_error(proc, fragment, "do not trust this file")
    assert not (tmp_path / "out").exists()


def test_real_checkpoints_stay_far_inside_the_bounds(tmp_path):
    from streamconv.sources import safe_pickle, torch_zip

    path = tmp_path / "big.ckpt"  # 24 layers with fp32 Adam state: the pickle of a large real run
    make_checkpoint(path, SMALL.__class__(n_embd=16, n_layer=24, n_head=2, vocab_size=64), optimizer=True)
    seen = {}
    original = safe_pickle.Unpickler.load

    def load(self):
        try:
            return original(self)
        finally:
            seen.update(opcodes=self.opcodes, work=self.work)

    safe_pickle.Unpickler.load = load
    try:
        torch_zip.load(str(path))
    finally:
        safe_pickle.Unpickler.load = original
    assert 0 < seen["opcodes"] < safe_pickle.MAX_OPCODES / 50 and seen["work"] < safe_pickle.MAX_WORK / 50, seen


def torch_zip_of(path, data: bytes) -> str:
    """A torch zip archive holding `data` as its pickle (and no storages)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    return str(path)


def test_a_persistent_id_that_is_a_shared_structure_is_described_briefly(tmp_path):
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return shared_lists(40) if obj == "storage" else None

    out = io.BytesIO()
    Pickler(out, protocol=2).dump({"state_dict": {"w": "storage"}})
    proc = run_bounded("--checkpoint-path", torch_zip_of(tmp_path / "in.ckpt", out.getvalue()), "--save-path",
                       tmp_path / "out")
    assert_one_line_error(proc, "unexpected persistent id [[[[...]")
    assert len(proc.stderr) < 600


def test_an_unknown_opcode_is_named(tmp_path):
    proc = run_bounded("--checkpoint-path", torch_zip_of(tmp_path / "in.ckpt", b"\x80\x02}\x7f."), "--save-path",
                       tmp_path / "out")
    assert_one_line_error(proc, "unknown pickle opcode 0x7f")
