"""The committed megatron-core 0.19.2 HybridModel run folder (tests/fixtures/mcore019-hybrid/, pattern "*-*-": no
Mamba layer; written by tests/fixtures/generate_mcore019_hybrid.py under Python 3.12) is intact: every file the
manifest lists is there with its size and sha256, and nothing else is. Only the bytes are checked here; nothing is
read or converted."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "mcore019-hybrid"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())


def test_manifest_describes_the_run():
    assert MANIFEST["megatron_core"] == "0.19.2"
    assert MANIFEST["hybrid_layer_pattern"] == "*-*-"
    assert MANIFEST["args"]["hybrid_layer_pattern"] == "*-*-" and MANIFEST["args"]["num_layers"] == 4
    layers = {k.split(".")[2] + "." + k.split(".")[3] for k in MANIFEST["tensors"] if k.startswith("decoder.layers.")}
    assert layers == {"0.self_attention", "1.mlp", "2.self_attention", "3.mlp"}


def test_files_match_the_manifest():
    on_disk = {p.relative_to(FIXTURES).as_posix() for p in FIXTURES.rglob("*") if p.is_file()}
    assert on_disk == {*MANIFEST["files"], "manifest.json"}
    for rel, expected in MANIFEST["files"].items():
        data = (FIXTURES / rel).read_bytes()
        assert len(data) == expected["bytes"], rel
        assert hashlib.sha256(data).hexdigest() == expected["sha256"], rel
    for key in ("checkpoint", "weights", "oracle"):
        assert (FIXTURES / MANIFEST[key]).exists(), MANIFEST[key]
