"""The committed Megatron-Bridge 0.6.2 run folders of the Qwen2, Qwen3, Mistral and Gemma 3 families (TP 1, and TP 2
for Qwen2 and Gemma 3) and their Hugging Face sources and logits (tests/fixtures/bridge062-families/, written by
tests/fixtures/generate_bridge_families.py under Python 3.12) are intact: every file the manifest lists is there with
its size and sha256, and nothing else is. Only the bytes are checked here; nothing is read or converted."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "bridge062-families"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
FILES = MANIFEST["files"]


def test_manifest_lists_every_file():
    assert MANIFEST["megatron_bridge"] == "0.6.2" and MANIFEST["megatron_core"] == "0.19.2"
    assert sorted(MANIFEST["families"]) == ["gemma3", "mistral", "qwen2", "qwen3"]
    on_disk = {p.relative_to(FIXTURES).as_posix() for p in FIXTURES.rglob("*") if p.is_file()}
    assert on_disk == {*FILES, "manifest.json"}
    for family in MANIFEST["families"].values():
        for key in ("checkpoint", "hf"):
            assert (FIXTURES / family[key]).is_dir(), family[key]
        assert family["logits"] in FILES, family["logits"]
    tp2 = {name: family["tp2"] for name, family in MANIFEST["families"].items() if "tp2" in family}
    assert sorted(tp2) == ["gemma3", "qwen2"]
    for name, run in tp2.items():
        assert run["checkpoint"] == f"{name}/tp2" and run["tp"] == 2 and (FIXTURES / run["checkpoint"]).is_dir()
        assert {f"iter_0000000/__{rank}_0.distcp" for rank in (0, 1)} <= set(run["observed"]["files"]), name


def test_folder_stays_small():
    assert sum(f["bytes"] for f in FILES.values()) < 5_000_000


@pytest.mark.parametrize("rel", sorted(FILES))
def test_file_matches_the_manifest(rel):
    data = (FIXTURES / rel).read_bytes()
    assert len(data) == FILES[rel]["bytes"], rel
    assert hashlib.sha256(data).hexdigest() == FILES[rel]["sha256"], rel
