"""Megatron-Bridge's own export of a Megatron checkpoint to Hugging Face safetensors: the `bridge` contender of
`python -m benchmarks`, run as its own process by the interpreter of a Megatron-Bridge environment
(`bash benchmarks/setup_bridge.sh DIR` builds one; Bridge needs Python >= 3.12):

    PY benchmarks/bridge_export.py CHECKPOINT OUT --hf-reference DIR
    PY benchmarks/bridge_export.py --check    # import Megatron-Bridge as the export does, print the versions (JSON)

It runs what Bridge documents, what `examples/conversion/convert_checkpoints.py export --hf-model DIR
--megatron-path CHECKPOINT --hf-path OUT --no-progress` runs: `AutoBridge.from_auto_config(CHECKPOINT, DIR)` (the
architecture from the checkpoint's run_config.yaml, conformed to DIR's config.json), then `export_ckpt(CHECKPOINT,
OUT, show_progress=False, strict=True)`: in a one-process gloo group it builds the whole Megatron model, loads the
checkpoint into it and writes Hugging Face shards, config.json and DIR's tokenizer into OUT. DIR needs a tokenizer
that transformers loads (without one the export fails: "Couldn't instantiate the backend tokenizer"). Exits 1 with
the error when the export fails or writes no safetensors.

CPU measures (no GPU, no Transformer Engine), each checked by leaving it out:
- `megatron.bridge.peft.lora_layers` is stubbed (tests/fixtures/generate_bridge.py's `_stub_transformer_engine_lora`):
  it imports transformer_engine at module level, which `from megatron.bridge import AutoBridge` reaches
  (`ModuleNotFoundError: No module named 'transformer_engine'`); the export uses no LoRA.
Nothing else: export_ckpt loads on the CPU by itself, and the torch.cuda stubs generate_bridge.py needs to save are
not needed to load. What the model is built from is the checkpoint's run_config.yaml, which must say what a CPU
builds: a layer spec without Transformer Engine (Bridge's `local_layer_spec`, as in the test fixtures and the
benchmark's workloads), no rope or permute fusions, and for experts the allgather dispatcher (a GPU run's
`alltoall` makes a CUDA stream: "CUDA driver version is insufficient"; `moe_permute_fusion: true` raises "fused
permutation is not available. Please install TE >= 2.1.0."). The workloads' run_config.yaml files are the CPU
fixtures' and say so, so no MoE measure is applied here: the export builds what the checkpoint says.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

MIN_PYTHON = (3, 12)  # Megatron-Bridge 0.6 and megatron-core >= 0.17
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
PACKAGES = ("megatron-bridge", "megatron-core", "torch", "transformers")


def import_bridge():
    """`megatron.bridge.AutoBridge`, imported with the CPU measure above; SystemExit (one line) on a Python that
    is too old."""
    if sys.version_info[:2] < MIN_PYTHON:
        raise SystemExit(f"Megatron-Bridge needs Python >= {'.'.join(map(str, MIN_PYTHON))}; {sys.executable} is "
                         f"{sys.version.split()[0]} (build an environment with `bash benchmarks/setup_bridge.sh DIR`)")
    sys.path.insert(0, str(FIXTURES))  # (the fixture generators' folder: one copy of the stub)
    from generate_bridge import _stub_transformer_engine_lora

    _stub_transformer_engine_lora()
    from megatron.bridge import AutoBridge

    return AutoBridge


def versions() -> dict[str, str]:
    """The versions the record keeps of the environment the export ran in."""
    from importlib.metadata import version

    return {"python": sys.version.split()[0], **{name: version(name) for name in PACKAGES}}


def export(checkpoint: Path, out: Path, reference: Path) -> list[Path]:
    """Bridge's documented export of `checkpoint` into `out`; the safetensors files it wrote."""
    auto_bridge = import_bridge()
    bridge = auto_bridge.from_auto_config(str(checkpoint), str(reference))
    bridge.export_ckpt(str(checkpoint), str(out), show_progress=False, strict=True)
    return sorted(out.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bridge_export.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, nargs="?", help="a Megatron-Bridge run folder (or its iteration folder)")
    p.add_argument("out", type=Path, nargs="?", help="the Hugging Face folder to write")
    p.add_argument("--hf-reference", type=Path, help="a Hugging Face folder of the same family: config.json and a "
                   "tokenizer transformers loads")
    p.add_argument("--check", action="store_true", help="import Megatron-Bridge as the export does, print the "
                   "versions as JSON and exit")
    args = p.parse_args(argv)
    if args.check:
        import_bridge()
        print(json.dumps(versions()))
        return 0
    if args.checkpoint is None or args.out is None or args.hf_reference is None:
        p.error("CHECKPOINT, OUT and --hf-reference DIR are needed (or --check)")
    try:
        written = export(args.checkpoint, args.out, args.hf_reference)
    except Exception:  # (one process: the error is the contender's result, printed whole for the record)
        traceback.print_exc()
        print(f"bridge_export.py: Megatron-Bridge's export of {args.checkpoint} failed", file=sys.stderr)
        return 1
    if not written:
        print(f"bridge_export.py: Megatron-Bridge's export wrote no safetensors into {args.out}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
