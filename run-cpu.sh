#!/usr/bin/env bash
# Start the FastTalk LLM service on the CPU without Docker: checks, a venv, the dependencies,
# then `python main.py websocket` (arguments go to it: ./run-cpu.sh --port 8002).
# Needs Python 3.11+ and, for the first install, a C++ compiler and cmake (llama-cpp-python is
# compiled from source; Debian/Ubuntu: apt install build-essential cmake python3-venv).
# The engine comes from .env (LLM_BACKEND): a local Ollama, or the embedded llama.cpp.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=scripts/run-common.sh
. scripts/run-common.sh

require_python
ensure_venv
if llama_cpp_needs_build; then
    require_compiler "Debian/Ubuntu: apt install build-essential cmake; macOS: xcode-select --install."
fi
install_requirements

export COMPUTE_DEVICE=cpu
start_service "$@"
