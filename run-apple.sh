#!/usr/bin/env bash
# Start the FastTalk LLM service on an Apple Silicon Mac without Docker, with Metal: checks, a
# venv, the dependencies with llama.cpp built for Metal, then `python main.py websocket`
# (arguments go to it: ./run-apple.sh --port 8002). Needs an arm64 Python 3.11+ (Homebrew's in
# /opt/homebrew) and the Xcode command line tools. With LLM_BACKEND=ollama, run Ollama.app or
# `ollama serve` natively: it uses Metal, which Ollama in Docker on a Mac cannot.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=scripts/run-common.sh
. scripts/run-common.sh

[ "$(uname -s)" = Darwin ] ||
    die "this script is for Apple Silicon Macs, and this is $(uname -s) $(uname -m). Use ./run-cpu.sh (or ./run-gpu.sh with an NVIDIA GPU)."
if [ "$(sysctl -n sysctl.proc_translated 2>/dev/null || echo 0)" = 1 ]; then
    die "this shell runs under Rosetta (x86_64), where Metal is out of reach: open an arm64 terminal."
fi
[ "$(uname -m)" = arm64 ] ||
    die "this Mac is $(uname -m), not Apple Silicon (arm64): MPS needs an M-series chip. Use ./run-cpu.sh."
require_python
"$PYTHON" -c 'import platform, sys; sys.exit(platform.machine() != "arm64")' ||
    die "'$PYTHON' is an x86_64 build (Rosetta), which cannot use Metal: install an arm64 Python 3.11+ (brew install python@3.11) or set PYTHON."

require_metal_toolchain() {
    xcode-select -p >/dev/null 2>&1 ||
        die "the Xcode command line tools are missing (llama-cpp-python is compiled on install): run xcode-select --install."
    require_compiler "Run xcode-select --install."
}
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_METAL=on}"

ensure_venv
if llama_cpp_needs_build; then
    require_metal_toolchain
fi
install_requirements
ensure_gpu_build Metal require_metal_toolchain

export COMPUTE_DEVICE=mps
# torch, where installed, runs operations that MPS lacks on the CPU instead of failing.
export PYTORCH_ENABLE_MPS_FALLBACK=1
start_service "$@"
