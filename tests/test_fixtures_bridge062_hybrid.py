"""The committed Megatron-Bridge 0.6.2 run folders of the hybrid Mamba families (Nemotron-H) and their Hugging Face
sources and logits (tests/fixtures/bridge062-hybrid/, written by tests/fixtures/generate_bridge_hybrid.py under
Python 3.12) are intact: every file the manifest lists is there with its size and sha256, and nothing else is; the
TP 2 runs were saved by two ranks. Only the bytes are checked here."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "bridge062-hybrid"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
FILES = MANIFEST["files"]


def test_manifest_lists_every_file_and_run():
    assert MANIFEST["megatron_bridge"] == "0.6.2" and MANIFEST["megatron_core"] == "0.19.2"
    on_disk = {p.relative_to(FIXTURES).as_posix() for p in FIXTURES.rglob("*") if p.is_file()}
    assert on_disk == {*FILES, "manifest.json"}
    assert set(MANIFEST["families"]) == {"nemotron_h", "nemotron3_nano"}
    for name, case in MANIFEST["families"].items():
        assert (FIXTURES / case["hf"]).is_dir() and case["logits"] in FILES, name
        assert set(case["runs"]) == {"tp1", "tp2"}, name
        for run, entry in case["runs"].items():
            assert entry["checkpoint"] == f"{name}/{run}" and (FIXTURES / entry["checkpoint"]).is_dir()
            ranks = {f for f in entry["observed"]["files"] if f.endswith(".distcp")}
            assert len(ranks) == entry["tp"] * entry["ep"], (name, run, ranks)


@pytest.mark.parametrize("family", ["nemotron_h", "nemotron3_nano"])
def test_each_family_stays_small(family):
    assert sum(f["bytes"] for rel, f in FILES.items() if rel.startswith(f"{family}/")) < 1_500_000


@pytest.mark.parametrize("rel", sorted(FILES))
def test_file_matches_the_manifest(rel):
    data = (FIXTURES / rel).read_bytes()
    assert len(data) == FILES[rel]["bytes"], rel
    assert hashlib.sha256(data).hexdigest() == FILES[rel]["sha256"], rel
