"""The committed megatron-core 0.19.2 checkpoints (tests/fixtures/mcore019/, written by
tests/fixtures/generate_mcore019.py under Python 3.12) are intact: every file the manifest lists is there with its
size and sha256, and nothing else is. Only the bytes are checked here; nothing is read or converted."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "mcore019"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
CASES = MANIFEST["cases"]


def test_manifest_lists_the_cases():
    assert MANIFEST["megatron_core"] == "0.19.2"
    assert sorted(CASES) == sorted(f"{family}-{layout}" for family in ("gpt_sw3", "llama_gqa")
                                   for layout in ("megatron_lm", "nemo1_train", "bare"))
    assert {p.name for p in FIXTURES.iterdir()} == {*CASES, "manifest.json"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_case_files_match_the_manifest(name):
    case = CASES[name]
    on_disk = {p.relative_to(FIXTURES).as_posix() for p in (FIXTURES / name).rglob("*") if p.is_file()}
    assert on_disk == set(case["files"])
    for rel, expected in case["files"].items():
        data = (FIXTURES / rel).read_bytes()
        assert len(data) == expected["bytes"], rel
        assert hashlib.sha256(data).hexdigest() == expected["sha256"], rel
    for key in ("checkpoint", "weights", "oracle"):
        assert (FIXTURES / case[key]).exists(), case[key]
