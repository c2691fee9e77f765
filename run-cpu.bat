@echo off
rem Start the FastTalk LLM service on the CPU without Docker, on Windows: checks, a venv, the
rem dependencies, then "python main.py websocket" (arguments go to it: run-cpu.bat --port 8002).
rem Needs Python 3.11+ (python.org, with "Add python.exe to PATH") and, for the first install,
rem Visual Studio Build Tools with C++ and CMake: llama-cpp-python is compiled from source.
setlocal
cd /d "%~dp0"

set "PY="
python -c "import sys; sys.exit(sys.version_info < (3, 11))" >nul 2>nul && set "PY=python"
if not defined PY py -3 -c "import sys; sys.exit(sys.version_info < (3, 11))" >nul 2>nul && set "PY=py -3"
if not defined PY goto no_python
if not exist requirements.txt goto no_requirements

if not exist ".venv\Scripts\python.exe" echo run-cpu.bat: creating a virtual environment in .venv
if not exist ".venv\Scripts\python.exe" %PY% -m venv .venv
if not exist ".venv\Scripts\python.exe" goto no_venv
call ".venv\Scripts\activate.bat"

echo run-cpu.bat: installing dependencies (the first run compiles llama-cpp-python)
python -m pip install -r requirements.txt --disable-pip-version-check
if errorlevel 1 goto pip_failed

set "COMPUTE_DEVICE=cpu"
echo run-cpu.bat: starting: python main.py websocket %* (COMPUTE_DEVICE=cpu)
if "%LLM_API_KEY%%LLM_HOST%"=="" echo run-cpu.bat: listening on 127.0.0.1 only; set LLM_API_KEY (in .env) to serve other machines
python main.py websocket %*
exit /b %errorlevel%

:no_python
echo run-cpu.bat: error: Python 3.11 or newer not found. Install it from python.org, ticking "Add python.exe to PATH". 1>&2
exit /b 1
:no_requirements
echo run-cpu.bat: error: requirements.txt not found next to run-cpu.bat. 1>&2
exit /b 1
:no_venv
echo run-cpu.bat: error: could not create the virtual environment in .venv. 1>&2
exit /b 1
:pip_failed
echo run-cpu.bat: error: pip install -r requirements.txt failed (see above). llama-cpp-python needs the Visual Studio Build Tools with C++. 1>&2
exit /b 1
