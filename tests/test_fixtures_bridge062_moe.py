"""The committed Megatron-Bridge 0.6.2 run folders of the mixture-of-experts families and their Hugging Face sources
and logits (tests/fixtures/bridge062-moe/, written by tests/fixtures/generate_bridge_moe.py under Python 3.12) are
intact: every file the manifest lists is there with its size and sha256, and nothing else is; the expert-parallel
run was saved by two ranks. Only the bytes are checked here; tests/test_moe.py converts them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "bridge062-moe"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
FILES = MANIFEST["files"]
RUNS = [(family, run) for family, case in sorted(MANIFEST["families"].items()) for run in case["runs"]]


def test_manifest_lists_every_file_and_run():
    assert MANIFEST["megatron_bridge"] == "0.6.2" and MANIFEST["megatron_core"] == "0.19.2"
    on_disk = {p.relative_to(FIXTURES).as_posix() for p in FIXTURES.rglob("*") if p.is_file()}
    assert on_disk == {*FILES, "manifest.json"}
    for name, case in MANIFEST["families"].items():
        assert (FIXTURES / case["hf"]).is_dir() and case["logits"] in FILES, name
        for run, entry in case["runs"].items():
            assert entry["checkpoint"] == f"{name}/{run}" and (FIXTURES / entry["checkpoint"]).is_dir()
            ranks = {f for f in entry["observed"]["files"] if f.endswith(".distcp")}
            assert len(ranks) == entry["tp"] * entry["ep"], (name, run, ranks)
    assert MANIFEST["families"]["qwen3_moe"]["runs"]["ep2"]["ep"] == 2


def test_folder_stays_small():
    assert sum(f["bytes"] for f in FILES.values()) < 8_000_000


@pytest.mark.parametrize("rel", sorted(FILES))
def test_file_matches_the_manifest(rel):
    data = (FIXTURES / rel).read_bytes()
    assert len(data) == FILES[rel]["bytes"], rel
    assert hashlib.sha256(data).hexdigest() == FILES[rel]["sha256"], rel
