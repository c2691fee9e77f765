"""The command line as an operator runs it: `config --show` and `test`, in a subprocess."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.fakes.ollama import FakeOllama
from tests.support import bound_socket, run_cli


async def test_config_show_masks_secrets(tmp_path: Path) -> None:
    code, out = await run_cli(
        tmp_path,
        "config",
        "--show",
        OLLAMA_API_KEY="sk-very-secret-key",
        LLM_MODEL="qwen2.5:0.5b",
        OLLAMA_BASE_URL="https://ops:hunter2@ollama.example.com:11434",
    )
    assert code == 0, out
    assert "sk-very-secret-key" not in out
    assert "hunter2" not in out
    assert "OLLAMA_API_KEY" in out and "********" in out
    assert "https://ops:********@ollama.example.com:11434" in out
    assert "qwen2.5:0.5b" in out
    assert "LLM_PORT" in out and "8000" in out


async def test_config_reads_dotenv(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("LLM_MODEL=from-dotenv:1b\nDEFAULT_TEMPERATURE=0.25\n")
    code, out = await run_cli(tmp_path, "config", "--show")
    assert code == 0, out
    assert "from-dotenv:1b" in out and "0.25" in out


async def test_bad_setting_is_refused_naming_the_variable(tmp_path: Path) -> None:
    code, out = await run_cli(
        tmp_path, "config", "--show", LLM_PORT="eighty", DEFAULT_TEMPERATURE="5"
    )
    assert code == 2
    assert "LLM_PORT" in out and "DEFAULT_TEMPERATURE" in out
    code, out = await run_cli(tmp_path, "websocket", OLLAMA_BASE_URL="ftp://nowhere")
    assert code == 2
    assert "OLLAMA_BASE_URL" in out


async def test_engine_check_passes_against_a_working_engine(
    tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    code, out = await run_cli(tmp_path, "test", OLLAMA_BASE_URL=fake_ollama.url)
    assert code == 0, out
    assert "verdict   OK" in out
    assert fake_ollama.version in out
    assert "tokens/s" in out
    assert len(fake_ollama.chats) == 1


async def test_engine_check_fails_clearly_when_unreachable(tmp_path: Path) -> None:
    sock = bound_socket()  # bound, never listening: connections are refused
    try:
        port = sock.getsockname()[1]
        code, out = await run_cli(
            tmp_path, "test", LLM_BACKEND="ollama", OLLAMA_BASE_URL=f"http://127.0.0.1:{port}"
        )
    finally:
        sock.close()
    assert code == 1
    assert "verdict   FAILED" in out
    assert "cannot be reached" in out
    assert "Traceback" not in out


async def test_engine_check_fails_when_model_is_missing(
    tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    code, out = await run_cli(
        tmp_path, "test", OLLAMA_BASE_URL=fake_ollama.url, LLM_MODEL="missing:3b"
    )
    assert code == 1
    assert "missing:3b" in out and "pull" in out


async def test_engine_check_runs_the_embedded_engine(tmp_path: Path) -> None:
    code, out = await run_cli(tmp_path, "test", LLM_BACKEND="llamacpp")
    assert code == 0, out
    assert "engine    llamacpp" in out
    assert "SmolLM2-135M-Instruct" in out
    assert "tokens/s" in out and "verdict   OK" in out


async def test_engine_check_reports_a_missing_model_file(tmp_path: Path) -> None:
    code, out = await run_cli(
        tmp_path, "test", LLM_BACKEND="llamacpp", LLAMACPP_MODEL_PATH=str(tmp_path / "nope.gguf")
    )
    assert code == 1
    assert "nope.gguf" in out and "LLAMACPP_MODEL_PATH" in out
    assert "Traceback" not in out


def host_has_nvidia_gpu() -> bool:
    """Whether this host shows an NVIDIA GPU, asked of the driver rather than of the service's
    own probe: its device node, else `nvidia-smi -L`."""
    if Path("/dev/nvidia0").exists():
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=False)
    return listed.returncode == 0 and "GPU " in listed.stdout


async def test_engine_check_runs_on_a_gpu_that_is_there_and_refuses_one_that_is_not(
    tmp_path: Path,
) -> None:
    code, out = await run_cli(tmp_path, "test", LLM_BACKEND="llamacpp", COMPUTE_DEVICE="cuda")
    assert "Traceback" not in out
    if host_has_nvidia_gpu():
        # (a llama-cpp-python built without CUDA runs on the CPU, and logs why)
        assert code == 0, out
        assert "device    cuda" in out and "tokens/s" in out and "verdict   OK" in out
    else:
        assert code == 1, out
        assert "verdict   FAILED: COMPUTE_DEVICE=cuda but no NVIDIA GPU is visible" in out
        assert "device    cuda" not in out and "generate" not in out


async def test_engine_check_pulls_a_missing_model_with_pull(
    tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    code, out = await run_cli(
        tmp_path,
        "test",
        "--pull",
        LLM_BACKEND="ollama",
        OLLAMA_BASE_URL=fake_ollama.url,
        LLM_MODEL="qwen2.5:0.5b",
    )
    assert code == 0, out
    assert fake_ollama.hits.get("/api/pull") == 1
    assert "100.0%" in out and "success" in out
    assert "qwen2.5:0.5b present" in out and "verdict   OK" in out
    assert "qwen2.5:0.5b" in fake_ollama.models


async def test_config_show_reports_the_device(tmp_path: Path) -> None:
    code, out = await run_cli(tmp_path, "config", "--show", COMPUTE_DEVICE="cpu")
    assert code == 0
    assert "# device on this host: cpu" in out
