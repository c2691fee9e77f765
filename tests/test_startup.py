"""Starting the service as a newcomer does: each failure one clear line and exit 2, no surprise."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.process import free_port, main_command, service_env, service_process
from tests.support import bound_socket, run_cli

pytestmark = pytest.mark.slow


async def start(tmp_path: Path, **settings: str) -> tuple[int, str]:
    """Run `main.py websocket` with `settings` until it exits (it should, at once)."""
    env = service_env(tmp_path, free_port(), free_port(), **settings)
    env["PATH"] = str(tmp_path)  # no nvidia-smi, whatever this host has
    proc = await asyncio.create_subprocess_exec(
        *main_command("websocket"),
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def one_clear_error(out: str, names: str) -> None:
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out
    assert names in errors[0], out
    assert "Traceback" not in out and "service_ready" not in out, out


async def test_a_missing_model_file_is_one_line_naming_the_variable(tmp_path: Path) -> None:
    code, out = await start(
        tmp_path, LLM_BACKEND="llamacpp", LLAMACPP_MODEL_PATH=str(tmp_path / "nope.gguf")
    )
    assert code == 2
    one_clear_error(out, "LLAMACPP_MODEL_PATH")


async def test_a_gpu_that_is_not_there_is_one_line_naming_the_variable(tmp_path: Path) -> None:
    code, out = await start(tmp_path, LLM_BACKEND="llamacpp", COMPUTE_DEVICE="cuda")
    assert code == 2
    one_clear_error(out, "COMPUTE_DEVICE")


@pytest.mark.parametrize("variable", ["LLM_PORT", "LLM_MONITORING_PORT"])
async def test_a_taken_port_is_one_line_naming_it(tmp_path: Path, variable: str) -> None:
    taken = bound_socket()
    taken.listen()
    try:
        port = str(taken.getsockname()[1])
        code, out = await start(tmp_path, LLM_BACKEND="ollama", **{variable: port})
    finally:
        taken.close()
    assert code == 2
    one_clear_error(out, f"{variable}: cannot listen on 127.0.0.1:{port}")


async def test_a_forced_engine_that_does_not_answer_is_said_loudly(tmp_path: Path) -> None:
    closed = bound_socket()
    try:
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        async with service_process(tmp_path, LLM_BACKEND="ollama", OLLAMA_BASE_URL=url) as svc:
            async with httpx.AsyncClient(timeout=5) as http:
                health = await http.get(f"http://127.0.0.1:{svc.port}/health")
            assert health.status_code == 503  # it serves, and says it cannot answer yet
    finally:
        closed.close()
    log = "".join(svc.output)
    assert '"engine_unreachable"' in log and "OLLAMA_BASE_URL" in log
    assert log.index('"engine_unreachable"') < log.index('"service_ready"')


async def test_service_ready_comes_once_both_ports_listen(tmp_path: Path) -> None:
    async with service_process(tmp_path, LLM_BACKEND="llamacpp") as svc:
        pass
    ready = [line for line in svc.output if '"service_ready"' in line]
    assert len(ready) == 1
    assert (
        f'"port":{svc.port}' in ready[0] and f'"monitoring_port":{svc.monitoring_port}' in ready[0]
    )
    started = [line for line in svc.output if "Started server process" in line]
    assert len(started) <= 1, started


@pytest.mark.parametrize("option", [["--pull"], ["--model", "qwen2.5:0.5b"]])
async def test_ollama_options_on_the_embedded_engine_say_what_applies(
    tmp_path: Path, option: list[str]
) -> None:
    code, out = await run_cli(tmp_path, "test", *option, LLM_BACKEND="llamacpp")
    assert code == 1
    assert "verdict   FAILED" in out and "applies to Ollama" in out
    assert "LLAMACPP_MODEL_PATH" in out
