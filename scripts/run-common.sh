# shellcheck shell=bash
# The steps that run-gpu.sh, run-cpu.sh and run-apple.sh share; sourced by them, never run.
# Written for bash 3.2 too (macOS's /bin/bash): no associative arrays, no ${var,,}.
#
# Settings, from the environment: PYTHON (the interpreter that makes the venv, default
# python3), VENV_DIR (default .venv), CMAKE_ARGS (llama-cpp-python's build flags).

SCRIPT_NAME=$(basename "$0")
PYTHON=${PYTHON:-python3}
VENV_DIR=${VENV_DIR:-.venv}

info() { printf '%s: %s\n' "$SCRIPT_NAME" "$*"; }
die() {
    printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
    exit 1
}

# Python 3.11+ and a requirements.txt, before anything is created.
require_python() {
    command -v "$PYTHON" >/dev/null 2>&1 ||
        die "Python not found (looked for '$PYTHON'). Install Python 3.11 or newer, or set PYTHON=/path/to/python3.11."
    local found
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
        found=$("$PYTHON" -V 2>&1) || found="not a working Python"
        die "'$PYTHON' is $found; Python 3.11 or newer is needed. Set PYTHON=/path/to/python3.11."
    fi
    [ -f requirements.txt ] || die "requirements.txt not found in $(pwd)."
}

# Create the venv (once) and activate it.
ensure_venv() {
    if [ ! -x "$VENV_DIR/bin/python" ]; then
        info "creating a virtual environment in $VENV_DIR"
        "$PYTHON" -m venv "$VENV_DIR" ||
            die "could not create a virtual environment in $VENV_DIR (Debian/Ubuntu: apt install python3-venv)."
    fi
    # shellcheck disable=SC1091  # made above, not there for shellcheck to follow
    . "$VENV_DIR/bin/activate"
    python -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$VENV_DIR was made with $(python -V 2>&1); remove it so that it is made again with Python 3.11+."
}

# True when pip is about to compile llama-cpp-python: listed in requirements.txt, not installed.
llama_cpp_needs_build() {
    grep -Eiq '^[[:space:]]*llama[-_.]cpp[-_.]python' requirements.txt &&
        ! python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llama_cpp") is None)'
}

# llama-cpp-python is compiled from source when pip installs it: check for a compiler first.
require_compiler() {
    command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || command -v clang++ >/dev/null 2>&1 ||
        die "no C++ compiler found, and llama-cpp-python is compiled on install. $1"
}

install_requirements() {
    info "installing dependencies (the first run compiles llama-cpp-python: several minutes)"
    python -m pip install -r requirements.txt --disable-pip-version-check ||
        die "pip install -r requirements.txt failed (see above)."
}

# Exit status 0: llama.cpp can offload to the GPU; 1: a CPU-only build; 2: llama-cpp-python is
# not installed or too old to tell; 3: it does not load.
gpu_offload_status() {
    python - <<'PY'
import importlib.util
import sys

if importlib.util.find_spec("llama_cpp") is None:
    sys.exit(2)
try:
    import llama_cpp
except (ImportError, OSError) as exc:
    print(f"llama-cpp-python does not load: {exc}", file=sys.stderr)
    sys.exit(3)
supports = getattr(llama_cpp, "llama_supports_gpu_offload", None)
sys.exit(2 if supports is None else 0 if supports() else 1)
PY
}

# pip reuses a llama-cpp-python already installed (or a wheel it cached) whatever CMAKE_ARGS
# say, e.g. one that run-cpu.sh built: check the build and recompile it when it lacks the GPU.
# $1 names the GPU API (CUDA, Metal); $2 is the hint when the tool chain is missing.
ensure_gpu_build() {
    local status=0 version
    gpu_offload_status || status=$?
    case $status in
    0) info "llama-cpp-python offloads to $1" ;;
    2) info "llama-cpp-python is absent or too old to report GPU support: skipping the $1 check" ;;
    3) die "llama-cpp-python is installed but does not load (see above)." ;;
    *)
        info "llama-cpp-python was built without $1: rebuilding it with CMAKE_ARGS='$CMAKE_ARGS'"
        "$2"
        version=$(python -c 'from importlib.metadata import version; print(version("llama-cpp-python"))') ||
            die "cannot read the installed llama-cpp-python's version (see above)."
        python -m pip install --force-reinstall --no-deps --no-cache-dir "llama-cpp-python==$version" ||
            die "rebuilding llama-cpp-python with $1 failed (see above)."
        status=0
        gpu_offload_status || status=$?
        [ "$status" -eq 0 ] || die "llama-cpp-python still lacks $1 after a rebuild with CMAKE_ARGS='$CMAKE_ARGS'."
        ;;
    esac
}

# Replace this shell with the service, so that signals reach it directly.
# Without LLM_API_KEY (and LLM_HOST) the service listens on 127.0.0.1 only: an open LLM
# endpoint is not offered to the network by default.
start_service() {
    info "starting: python main.py websocket $* (COMPUTE_DEVICE=$COMPUTE_DEVICE)"
    if [ -z "${LLM_API_KEY:-}${LLM_HOST:-}" ] && ! grep -Eqs '^(LLM_API_KEY|LLM_HOST)=.' .env; then
        info "listening on 127.0.0.1 only; set LLM_API_KEY (in .env) to serve other machines"
    fi
    exec python main.py websocket "$@"
}
