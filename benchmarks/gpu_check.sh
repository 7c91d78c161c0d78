#!/usr/bin/env bash
# On a machine with a CUDA GPU: the CUDA equality tests, then the `large` benchmark (cpu and cuda beside
# copy; naive only if it fits in RAM). Run from the repository root with the project's venv active or
# PYTHON set. Prints the benchmark table; the JSON record and plots land in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name(0))"
"$PYTHON" -m pytest -q tests/test_cuda.py tests/test_convert.py
"$PYTHON" -m pytest -q tests/test_llama.py -k "cuda or device_flow"  # (skipped without megatron-core)
"$PYTHON" -m benchmarks --profile large --rounds "${ROUNDS:-3}" --contenders "${CONTENDERS:-copy,dd,streamconv}"
