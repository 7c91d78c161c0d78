#!/usr/bin/env bash
# Builds the Python 3.12 environment the benchmark's `bridge` contender (Megatron-Bridge's own export,
# benchmarks/bridge_export.py) runs in, with the versions tests/fixtures/README.md documents:
#
#     bash benchmarks/setup_bridge.sh DIR
#     .venv/bin/python -m benchmarks --profile bridge8b --contenders streamconv,bridge --bridge-python DIR/bin/python
#
# Megatron-Bridge 0.6.2 needs Python >= 3.12 (megatron-core >= 0.17 does too), so it cannot share streamconv's
# environment. The Python 3.12 is $PYTHON312, else `python3.12` on PATH, else pyenv's ~/.pyenv/versions/3.12*.
# PyPI's torch 2.13.0 for cp312 is the CUDA build (with its nvidia wheels about 5 GB in DIR); it runs on the CPU.
# Bridge is installed without its dependencies (they name CUDA-only packages), then the pure-Python ones it
# imports by hand; transformers 5.12.1 (Bridge 0.6.2 allows <= 5.12.1) needs kernels < 0.13;
# nvidia-resiliency-ext 0.4.1 lacks the `__version__` megatron-core reads, so it is removed if anything brought it.
# Ends with the import bridge_export.py does (`bridge_export.py --check`), which prints the versions.
set -euo pipefail

if [ "$#" -ne 1 ] || [ -z "$1" ]; then
    echo "usage: bash benchmarks/setup_bridge.sh DIR   (builds a Megatron-Bridge 0.6.2 environment in DIR," \
         "then pass --bridge-python DIR/bin/python to python -m benchmarks)" >&2
    exit 2
fi
dir=$1
case "${BASH_SOURCE[0]}" in
    */*) here=${BASH_SOURCE[0]%/*} ;;
    *) here=. ;;
esac
here=$(cd "$here" && pwd)

is_python312() {  # a Python that runs and is 3.12 (a pyenv shim of a version not selected fails here)
    [ -n "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1
}

python=
for candidate in "${PYTHON312:-}" "$(command -v python3.12 || true)" "$HOME"/.pyenv/versions/3.12*/bin/python; do
    if is_python312 "$candidate"; then
        python=$candidate
        break
    fi
done
if [ -z "$python" ]; then
    echo "setup_bridge.sh: no Python 3.12 found (tried \$PYTHON312, python3.12 on PATH and" \
         "~/.pyenv/versions/3.12*/bin/python); install one (e.g. \`pyenv install 3.12\`, or your distribution's" \
         "python3.12 with its venv module) and rerun, or set PYTHON312=/path/to/python3.12" >&2
    exit 1
fi

SECONDS=0
echo "setup_bridge.sh: building $dir from $python ($("$python" -c 'import sys; print(sys.version.split()[0])'))"
"$python" -m venv "$dir"
pip=("$dir/bin/python" -m pip install --disable-pip-version-check)
"${pip[@]}" --no-deps megatron-bridge==0.6.2
"${pip[@]}" torch==2.13.0 megatron-core==0.19.2 transformers==5.12.1 "kernels>=0.12,<0.13" \
    numpy packaging safetensors pyyaml psutil \
    accelerate datasets einops hydra-core omegaconf peft tiktoken sentencepiece mistral-common ml_dtypes pydantic \
    rich typer nvidia-modelopt==0.47.0 "megatron-energon~=7.0" multi-storage-client tensorboard tensorstore \
    nvidia-ml-py
echo "setup_bridge.sh: pip's lines 'megatron-bridge 0.6.2 requires X, which is not installed' are expected: Bridge" \
     "is installed without its dependencies, and those (CUDA-only kernels, loggers, vision models) are not imported"
if "$dir/bin/python" -m pip show nvidia-resiliency-ext >/dev/null 2>&1; then
    "$dir/bin/python" -m pip uninstall --yes nvidia-resiliency-ext
fi

echo "setup_bridge.sh: checking that $dir imports Megatron-Bridge as bridge_export.py does"
if ! versions=$(PYTHONWARNINGS=ignore "$dir/bin/python" "$here/bridge_export.py" --check 2>/dev/null | tail -n 1); then
    echo "setup_bridge.sh: $dir/bin/python does not import Megatron-Bridge; see" \
         "\`$dir/bin/python $here/bridge_export.py --check\`" >&2
    exit 1
fi
echo "setup_bridge.sh: done in ${SECONDS} s, $(du -sh "$dir" | cut -f1) in $dir: $versions"
echo "setup_bridge.sh: pass --bridge-python $dir/bin/python (or set STREAMCONV_BRIDGE_PYTHON=$dir/bin/python)"
