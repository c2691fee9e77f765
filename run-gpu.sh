#!/usr/bin/env bash
# Start the FastTalk LLM service on an NVIDIA GPU without Docker: checks, a venv, the
# dependencies with llama.cpp built for CUDA, then `python main.py websocket` (arguments go to
# it: ./run-gpu.sh --port 8002). Needs Python 3.11+, the NVIDIA driver and, for the first
# install, the CUDA toolkit (nvcc), a C++ compiler and cmake. GPU_DEVICE_ID picks the GPU.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=scripts/run-common.sh
. scripts/run-common.sh

require_python
command -v nvidia-smi >/dev/null 2>&1 ||
    die "nvidia-smi not found: this machine has no NVIDIA driver. Install it, or use ./run-cpu.sh."
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null) ||
    die "nvidia-smi failed: the NVIDIA driver cannot reach a GPU (run nvidia-smi to see why), or use ./run-cpu.sh."
[ -n "$gpus" ] || die "nvidia-smi lists no GPU; use ./run-cpu.sh."
info "NVIDIA GPU(s): ${gpus//$'\n'/, }"

if [ -d /usr/local/cuda/bin ]; then
    PATH="/usr/local/cuda/bin:$PATH"
fi
require_cuda_toolchain() {
    command -v nvcc >/dev/null 2>&1 ||
        die "nvcc not found: building llama-cpp-python for CUDA needs the CUDA toolkit (https://developer.nvidia.com/cuda-downloads)."
    require_compiler "Debian/Ubuntu: apt install build-essential cmake."
}
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_CUDA=on}"

ensure_venv
if llama_cpp_needs_build; then
    require_cuda_toolchain
fi
install_requirements
ensure_gpu_build CUDA require_cuda_toolchain

export COMPUTE_DEVICE=cuda
start_service "$@"
