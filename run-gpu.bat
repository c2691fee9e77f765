@echo off
rem Start the FastTalk LLM service on an NVIDIA GPU without Docker, on Windows: checks, a venv,
rem the dependencies with llama.cpp built for CUDA, then "python main.py websocket" (arguments
rem go to it: run-gpu.bat --port 8002). Needs Python 3.11+, the NVIDIA driver and, for the
rem first install, the CUDA toolkit (nvcc) and Visual Studio Build Tools with C++ and CMake.
setlocal
cd /d "%~dp0"

set "PY="
python -c "import sys; sys.exit(sys.version_info < (3, 11))" >nul 2>nul && set "PY=python"
if not defined PY py -3 -c "import sys; sys.exit(sys.version_info < (3, 11))" >nul 2>nul && set "PY=py -3"
if not defined PY goto no_python
if not exist requirements.txt goto no_requirements
where nvidia-smi >nul 2>nul || goto no_driver
nvidia-smi -L >nul 2>nul || goto no_gpu
nvidia-smi -L

if not defined CMAKE_ARGS set "CMAKE_ARGS=-DGGML_CUDA=on"

if not exist ".venv\Scripts\python.exe" echo run-gpu.bat: creating a virtual environment in .venv
if not exist ".venv\Scripts\python.exe" %PY% -m venv .venv
if not exist ".venv\Scripts\python.exe" goto no_venv
call ".venv\Scripts\activate.bat"

rem pip compiles llama-cpp-python when requirements.txt lists it and it is not installed.
set "NEEDS_BUILD="
findstr /i /b /c:"llama-cpp-python" /c:"llama_cpp_python" requirements.txt >nul 2>nul && set "NEEDS_BUILD=1"
if defined NEEDS_BUILD python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llama_cpp') is None)" >nul 2>nul && set "NEEDS_BUILD="
if not defined NEEDS_BUILD goto install
where nvcc >nul 2>nul || goto no_nvcc

:install
echo run-gpu.bat: installing dependencies (the first run compiles llama-cpp-python with CUDA)
python -m pip install -r requirements.txt --disable-pip-version-check
if errorlevel 1 goto pip_failed

rem pip keeps a llama-cpp-python built earlier without CUDA: check the build, rebuild if needed.
rem Exit status 0: offloads to the GPU; 1: CPU-only build; 2: not installed or too old to tell.
set "CHECK=import importlib.util as u, sys; sys.exit(2) if u.find_spec('llama_cpp') is None else None; import llama_cpp; f = getattr(llama_cpp, 'llama_supports_gpu_offload', None); sys.exit(2 if f is None else 0 if f() else 1)"
python -c "%CHECK%"
if errorlevel 2 goto start
if not errorlevel 1 goto start
echo run-gpu.bat: llama-cpp-python was built without CUDA: rebuilding it with CMAKE_ARGS=%CMAKE_ARGS%
where nvcc >nul 2>nul || goto no_nvcc
for /f "usebackq delims=" %%v in (`python -c "from importlib.metadata import version; print(version('llama-cpp-python'))"`) do set "LLAMA_VERSION=%%v"
python -m pip install --force-reinstall --no-deps --no-cache-dir "llama-cpp-python==%LLAMA_VERSION%"
if errorlevel 1 goto pip_failed
python -c "%CHECK%"
if errorlevel 1 goto no_cuda_build

:start
set "COMPUTE_DEVICE=cuda"
echo run-gpu.bat: starting: python main.py websocket %* (COMPUTE_DEVICE=cuda)
if "%LLM_API_KEY%%LLM_HOST%"=="" echo run-gpu.bat: listening on 127.0.0.1 only; set LLM_API_KEY (in .env) to serve other machines
python main.py websocket %*
exit /b %errorlevel%

:no_python
echo run-gpu.bat: error: Python 3.11 or newer not found. Install it from python.org, ticking "Add python.exe to PATH". 1>&2
exit /b 1
:no_requirements
echo run-gpu.bat: error: requirements.txt not found next to run-gpu.bat. 1>&2
exit /b 1
:no_driver
echo run-gpu.bat: error: nvidia-smi not found: no NVIDIA driver on this machine. Install it, or use run-cpu.bat. 1>&2
exit /b 1
:no_gpu
echo run-gpu.bat: error: nvidia-smi found no usable GPU (run nvidia-smi to see why). Use run-cpu.bat without one. 1>&2
exit /b 1
:no_venv
echo run-gpu.bat: error: could not create the virtual environment in .venv. 1>&2
exit /b 1
:no_nvcc
echo run-gpu.bat: error: nvcc not found: building llama-cpp-python for CUDA needs the CUDA toolkit on PATH. 1>&2
exit /b 1
:pip_failed
echo run-gpu.bat: error: pip install failed (see above). llama-cpp-python needs the CUDA toolkit and Visual Studio Build Tools with C++. 1>&2
exit /b 1
:no_cuda_build
echo run-gpu.bat: error: llama-cpp-python still lacks CUDA after a rebuild with CMAKE_ARGS=%CMAKE_ARGS%. 1>&2
exit /b 1
