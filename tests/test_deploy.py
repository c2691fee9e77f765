"""The deployment files: compose files, Dockerfiles, .dockerignore and the run scripts.

No Docker engine runs here, so the files are checked as data (YAML, Dockerfile instructions)
and, where the tools exist, with Docker Compose's own parser (`docker compose`, or the binary
named by COMPOSE_BIN, which .ci/deploy-checks installs), shellcheck and bash; the run scripts'
early checks are run for real against fake tools. hadolint runs in .ci/deploy-checks.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# compose file -> (its Dockerfile, the COMPUTE_DEVICE it pins)
COMPOSE_FILES = {
    "docker-compose.gpu.yml": ("Dockerfile.gpu", "cuda"),
    "docker-compose.cpu.yml": ("Dockerfile.cpu", "cpu"),
    "docker-compose.apple.yml": ("Dockerfile.cpu", "cpu"),
}
DOCKERFILES = ["Dockerfile.gpu", "Dockerfile.cpu"]
PINNED_ENV = {
    "LLM_BACKEND": "ollama",
    "OLLAMA_BASE_URL": "http://ollama:11434",
    "LLM_PORT": "8000",
    "LLM_MONITORING_PORT": "9092",
}
NETWORK = "fasttalk-network"
SH_SCRIPTS = {"run-gpu.sh": "cuda", "run-cpu.sh": "cpu", "run-apple.sh": "mps"}
BAT_SCRIPTS = {"run-gpu.bat": "cuda", "run-cpu.bat": "cpu"}
POSIX_ONLY = pytest.mark.skipif(sys.platform == "win32", reason="runs bash scripts")


# --- compose files, as YAML ---


def load_compose(name: str) -> dict[str, Any]:
    data = yaml.safe_load((REPO / name).read_text())
    assert isinstance(data, dict), f"{name} is not a YAML mapping"
    return data


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    return list(devices.get("devices", []))


@pytest.fixture(params=sorted(COMPOSE_FILES))
def compose_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_compose_has_ollama_and_the_service(compose_name: str) -> None:
    services = load_compose(compose_name)["services"]
    assert {"ollama", "llm-service"} <= set(services)


def test_ollama_has_a_pinned_image_a_data_volume_and_a_healthcheck(compose_name: str) -> None:
    compose = load_compose(compose_name)
    ollama = compose["services"]["ollama"]
    image, _, tag = ollama["image"].partition(":")
    assert image == "ollama/ollama" and tag and tag != "latest"
    volume, _, target = ollama["volumes"][0].partition(":")
    assert target == "/root/.ollama" and volume in compose["volumes"]
    test = ollama["healthcheck"]["test"]
    assert test[0] in {"CMD", "CMD-SHELL"} and len(test) > 1
    assert not ollama["healthcheck"].get("disable", False)


def test_service_waits_for_a_healthy_ollama(compose_name: str) -> None:
    services = load_compose(compose_name)["services"]
    deps = depends_on(services["llm-service"])
    assert deps["ollama"] == "service_healthy"
    if "ollama-pull" in services:
        assert deps["ollama-pull"] == "service_completed_successfully"
        assert depends_on(services["ollama-pull"]) == {"ollama": "service_healthy"}
        assert services["ollama-pull"]["image"] == services["ollama"]["image"]


def test_every_service_is_on_the_named_network(compose_name: str) -> None:
    compose = load_compose(compose_name)
    assert compose["networks"][NETWORK]["name"] == NETWORK
    for name, service in compose["services"].items():
        assert NETWORK in service["networks"], f"{name} is not on {NETWORK}"


def test_service_ports_environment_and_env_file(compose_name: str) -> None:
    dockerfile, device = COMPOSE_FILES[compose_name]
    service = load_compose(compose_name)["services"]["llm-service"]
    # Quoted strings: YAML 1.1 reads an unquoted 9092:9092 as a base-60 number.
    assert all(isinstance(port, str) for port in service["ports"])
    # loopback only: an open service (no key by default) is not published to the network
    assert {"127.0.0.1:8002:8000", "127.0.0.1:9092:9092"} <= set(service["ports"])
    env = environment(service)
    assert {key: env.get(key) for key in PINNED_ENV} == PINNED_ENV
    assert env["COMPUTE_DEVICE"] == device
    assert {"path": ".env", "required": False} in service["env_file"]
    assert service["build"] == {"context": ".", "dockerfile": dockerfile}


def test_service_has_room_for_its_file_descriptors(compose_name: str) -> None:
    # every socket is a descriptor: the default limit of 1024 is below what a full house of
    # connections, pending request heads and the engine pool may hold at once
    service = load_compose(compose_name)["services"]["llm-service"]
    nofile = service["ulimits"]["nofile"]
    assert nofile["soft"] == nofile["hard"] >= 65536


def test_gpu_reservations_only_in_the_gpu_file(compose_name: str) -> None:
    services = load_compose(compose_name)["services"]
    if compose_name != "docker-compose.gpu.yml":
        assert all(not gpu_devices(service) for service in services.values())
        return
    for name in ("ollama", "llm-service"):
        devices = gpu_devices(services[name])
        assert any(
            d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices
        ), f"{name} reserves no NVIDIA GPU"


def test_ollama_port_is_loopback_only_or_unpublished(compose_name: str) -> None:
    ports = load_compose(compose_name)["services"]["ollama"].get("ports", [])
    if compose_name == "docker-compose.apple.yml":
        # Ollama.app on the Mac may hold 11434 already.
        assert ports == []
    else:
        assert ports == ["127.0.0.1:11434:11434"]


# --- compose files, through Docker Compose's own parser ---


def compose_command() -> list[str] | None:
    if binary := os.environ.get("COMPOSE_BIN"):
        return shlex.split(binary)
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def run_compose(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = compose_command()
    if command is None:
        pytest.skip("no Docker Compose here (.ci/deploy-checks provides one via COMPOSE_BIN)")
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def compose_config(tmp_path: Path, name: str, dotenv: str | None) -> dict[str, Any]:
    shutil.copy(REPO / name, tmp_path / name)
    if dotenv is not None:
        (tmp_path / ".env").write_text(dotenv)
    done = run_compose(tmp_path, "-f", name, "config", "--format", "json")
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = json.loads(done.stdout)
    return config


@pytest.mark.parametrize(
    "dotenv",
    [None, "COMPUTE_DEVICE=mps\nLLM_PORT=8002\nOLLAMA_BASE_URL=http://localhost:11434\n"],
    ids=["no-dotenv", "conflicting-dotenv"],
)
def test_compose_config_resolves_as_intended(
    tmp_path: Path, compose_name: str, dotenv: str | None
) -> None:
    config = compose_config(tmp_path, compose_name, dotenv)
    service = config["services"]["llm-service"]
    published = {(p["target"], str(p["published"]), p.get("host_ip")) for p in service["ports"]}
    assert {(8000, "8002", "127.0.0.1"), (9092, "9092", "127.0.0.1")} <= published
    env = service["environment"]
    assert {key: env.get(key) for key in PINNED_ENV} == PINNED_ENV
    assert env["COMPUTE_DEVICE"] == COMPOSE_FILES[compose_name][1]
    assert service["depends_on"]["ollama"]["condition"] == "service_healthy"
    assert config["networks"][NETWORK]["name"] == NETWORK
    assert config["services"]["ollama"]["healthcheck"]["test"][0] == "CMD"
    devices = gpu_devices(service)
    if compose_name == "docker-compose.gpu.yml":
        assert (
            devices and devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        )
    else:
        assert devices == []


def test_vllm_compose_puts_the_service_in_front_of_vllm() -> None:
    compose = load_compose("docker-compose.vllm.yml")
    vllm, service = compose["services"]["vllm"], compose["services"]["llm-service"]
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", vllm["image"]), "a pinned release"
    assert "ports" not in vllm, "vLLM is reached on the compose network only"
    assert vllm["healthcheck"]["test"][0] == "CMD" and "/health" in " ".join(
        vllm["healthcheck"]["test"]
    )
    assert gpu_devices(vllm) and not gpu_devices(service)
    assert "--served-model-name=${LLM_MODEL:-qwen2.5-1.5b-instruct}" in vllm["command"]
    env = environment(service)
    assert (env["LLM_BACKEND"], env["OPENAI_BASE_URL"]) == ("openai", "http://vllm:8000/v1")
    assert env["LLM_MODEL"] == "${LLM_MODEL:-qwen2.5-1.5b-instruct}"
    assert {"127.0.0.1:8002:8000", "127.0.0.1:9092:9092"} <= set(service["ports"])
    assert depends_on(service) == {"vllm": "service_healthy"}
    assert all(NETWORK in s["networks"] for s in compose["services"].values())


def test_vllm_compose_resolves(tmp_path: Path) -> None:
    config = compose_config(tmp_path, "docker-compose.vllm.yml", "LLM_MODEL=my-model\n")
    vllm = config["services"]["vllm"]
    assert "--served-model-name=my-model" in vllm["command"]
    assert config["services"]["llm-service"]["environment"]["LLM_MODEL"] == "my-model"


def test_compose_parser_rejects_a_broken_file(tmp_path: Path) -> None:
    # Proves that the parser above validates against the schema.
    (tmp_path / "broken.yml").write_text("services:\n  a:\n    image: x\n    ports: 5\n")
    done = run_compose(tmp_path, "-f", "broken.yml", "config", "--quiet")
    assert done.returncode != 0 and "ports must be a" in done.stderr


# --- Dockerfiles ---


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comment lines dropped, as Docker does."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation"
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            result.append([])
        assert result, "an instruction before the first FROM"
        result[-1].append(instruction)
    return result


def dockerfile(name: str) -> list[Instruction]:
    return parse_dockerfile((REPO / name).read_text())


def env_pairs(instruction: Instruction) -> dict[str, str]:
    return dict(word.split("=", 1) for word in shlex.split(instruction.args))


@pytest.fixture(params=DOCKERFILES)
def dockerfile_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_every_base_image_has_a_pinned_tag(dockerfile_name: str) -> None:
    aliases: set[str] = set()
    for instruction in dockerfile(dockerfile_name):
        if instruction.keyword != "FROM":
            continue
        words = instruction.args.split()
        image = words[0]
        if len(words) == 3 and words[1].upper() == "AS":
            aliases.add(words[2])
        if image in aliases or "@sha256:" in image:
            continue
        _, colon, tag = image.rpartition(":")
        assert colon and "/" not in tag and tag != "latest", f"{image} is not pinned to a tag"


def test_final_stage_runs_unprivileged_unbuffered_on_malloc(dockerfile_name: str) -> None:
    final = stages(dockerfile(dockerfile_name))[-1]
    users = [i.args for i in final if i.keyword == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    env: dict[str, str] = {}
    for instruction in final:
        if instruction.keyword == "ENV":
            env |= env_pairs(instruction)
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("PYTHONMALLOC") == "malloc"  # expired sessions' memory is handed back
    assert (env.get("LLM_PORT"), env.get("LLM_MONITORING_PORT")) == ("8000", "9092")
    exposed = {i.args for i in final if i.keyword == "EXPOSE"}
    assert exposed == {"8000 9092"}


def test_healthcheck_probes_liveness_on_the_monitoring_port(dockerfile_name: str) -> None:
    final = stages(dockerfile(dockerfile_name))[-1]
    checks = [i.args for i in final if i.keyword == "HEALTHCHECK"]
    assert len(checks) == 1 and " CMD " in f" {checks[0]} "
    assert "/health" in checks[0] and "LLM_MONITORING_PORT" in checks[0] and "9092" in checks[0]


def test_cmd_starts_the_websocket_service(dockerfile_name: str) -> None:
    final = stages(dockerfile(dockerfile_name))[-1]
    commands = [i.args for i in final if i.keyword == "CMD"]
    assert [json.loads(c) for c in commands] == [["python", "main.py", "websocket"]]


def _copies_code(instruction: Instruction) -> bool:
    if instruction.keyword not in {"COPY", "ADD"} or "--from=" in instruction.args:
        return False
    sources = [w for w in instruction.args.split()[:-1] if not w.startswith("--")]
    return any(s in {".", "./"} or s.startswith(("main.py", "llm_service")) for s in sources)


def test_dependencies_are_installed_before_the_code_is_copied(dockerfile_name: str) -> None:
    instructions = dockerfile(dockerfile_name)
    positions = {
        "copy requirements": [
            n
            for n, i in enumerate(instructions)
            if i.keyword == "COPY" and "requirements.txt" in i.args
        ],
        "pip install -r": [
            n
            for n, i in enumerate(instructions)
            if i.keyword == "RUN" and re.search(r"pip install .*-r \S*requirements\.txt", i.args)
        ],
        "copy code": [n for n, i in enumerate(instructions) if _copies_code(i)],
    }
    assert all(positions.values()), positions
    assert (
        max(positions["copy requirements"])
        < min(positions["pip install -r"])
        <= max(positions["pip install -r"])
        < min(positions["copy code"])
    ), positions


def test_installs_leave_no_caches(dockerfile_name: str) -> None:
    for instruction in dockerfile(dockerfile_name):
        if instruction.keyword != "RUN":
            continue
        if "pip install" in instruction.args:
            assert "--no-cache-dir" in instruction.args, instruction.args
        if "apt-get install" in instruction.args:
            assert "--no-install-recommends" in instruction.args
            assert "rm -rf /var/lib/apt/lists/*" in instruction.args


def test_gpu_image_builds_llama_cpp_with_cuda_in_devel_and_runs_in_runtime() -> None:
    instructions = dockerfile("Dockerfile.gpu")
    builder, final = stages(instructions)[0][0], stages(instructions)[-1][0]
    assert re.match(r"nvidia/cuda:[\d.]+-devel-ubuntu[\d.]+ AS builder$", builder.args)
    assert re.match(r"nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+$", final.args)
    assert builder.args.split("-")[0] == final.args.split("-")[0], "CUDA versions differ"
    build = [i.args for i in instructions if i.keyword == "RUN" and "pip install" in i.args]
    assert any('CMAKE_ARGS="-DGGML_CUDA=on' in args for args in build)


def test_cpu_image_is_python_311() -> None:
    bases = {i.args.split()[0] for i in dockerfile("Dockerfile.cpu") if i.keyword == "FROM"}
    assert len(bases) == 1 and re.fullmatch(r"python:3\.11[\d.]*-slim-\w+", bases.pop())


def test_both_images_run_the_same_python() -> None:
    cpu_base = next(i.args for i in dockerfile("Dockerfile.cpu") if i.keyword == "FROM")
    version = re.match(r"python:(3\.11\.\d+)-", cpu_base)
    assert version, cpu_base
    gpu = dockerfile("Dockerfile.gpu")
    assert Instruction("ARG", f"PYTHON_VERSION={version[1]}") in gpu
    # The venv's python links into /opt/python, so the runtime stage needs both.
    copies = [i.args for i in stages(gpu)[-1] if i.keyword == "COPY" and "--from=" in i.args]
    assert copies[:2] == [
        "--from=builder /opt/python /opt/python",
        "--from=builder /opt/venv /opt/venv",
    ]


def test_dockerignore_lets_in_only_what_the_images_copy() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "not an allow-list: .env or .git could reach the build context"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert allowed == {"main.py", "llm_service", "requirements.txt"}
    for name in DOCKERFILES:
        for instruction in dockerfile(name):
            if instruction.keyword == "COPY" and "--from=" not in instruction.args:
                for source in instruction.args.split()[:-1]:
                    assert source.rstrip("/") in allowed, f"{name} copies {source}, ignored"


# --- run scripts ---


@pytest.mark.parametrize("name", sorted(SH_SCRIPTS))
def test_shell_script_shape(name: str) -> None:
    path = REPO / name
    text = path.read_text()
    assert os.access(path, os.X_OK), f"{name} is not executable"
    assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text
    assert f"\nexport COMPUTE_DEVICE={SH_SCRIPTS[name]}\n" in text
    assert text.rstrip().endswith('start_service "$@"')
    common = (REPO / "scripts" / "run-common.sh").read_text()
    for needed in (
        'exec python main.py websocket "$@"',
        "-m venv",
        "pip install -r requirements.txt",
    ):
        assert needed in common


@POSIX_ONLY
@pytest.mark.parametrize("name", [*sorted(SH_SCRIPTS), "scripts/run-common.sh"])
def test_shell_script_parses(name: str) -> None:
    done = subprocess.run(["bash", "-n", str(REPO / name)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck() -> None:
    scripts = [*sorted(SH_SCRIPTS), "scripts/run-common.sh", ".ci/deploy-checks"]
    done = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def fake_tool(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text("#!/bin/sh\n" + body)
    (bin_dir / name).chmod(0o755)


def run_script(
    script: Path, tmp_path: Path, *args: str, python: str = sys.executable, **tools: str
) -> subprocess.CompletedProcess[str]:
    """Run a script with only fake `tools` and the basics on PATH, its venv under tmp_path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for basic in ("dirname", "basename", "grep"):
        found = shutil.which(basic)
        assert found, basic
        (bin_dir / basic).symlink_to(found)
    for name, body in tools.items():
        fake_tool(bin_dir, name.replace("_", "-"), body)
    env = {
        "PATH": str(bin_dir),
        "HOME": str(tmp_path),
        "PYTHON": python,
        "VENV_DIR": str(tmp_path / "venv"),
    }
    return subprocess.run(
        ["/bin/bash", str(script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def assert_fails_early(done: subprocess.CompletedProcess[str], tmp_path: Path, why: str) -> None:
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(why, done.stderr), done.stderr
    assert not (tmp_path / "venv").exists(), "the script made a venv before its checks failed"


@POSIX_ONLY
@pytest.mark.parametrize("name", sorted(SH_SCRIPTS))
def test_scripts_refuse_a_missing_python(tmp_path: Path, name: str) -> None:
    uname = 'case "$1" in -s) echo Darwin;; -m) echo arm64;; esac\n'
    done = run_script(REPO / name, tmp_path, python="/nonexistent/python3", uname=uname)
    assert_fails_early(done, tmp_path, r"Python not found \(looked for '/nonexistent/python3'\)")


@POSIX_ONLY
def test_scripts_refuse_an_old_python(tmp_path: Path) -> None:
    old_python = 'case "$1" in -V) echo "Python 3.9.18";; *) exit 1;; esac\n'
    fake_tool(tmp_path / "old", "python3", old_python)
    done = run_script(REPO / "run-cpu.sh", tmp_path, python=str(tmp_path / "old" / "python3"))
    assert_fails_early(done, tmp_path, r"is Python 3\.9\.18; Python 3\.11 or newer is needed")


@POSIX_ONLY
def test_gpu_script_refuses_a_machine_without_nvidia_smi(tmp_path: Path) -> None:
    done = run_script(REPO / "run-gpu.sh", tmp_path)
    assert_fails_early(done, tmp_path, r"nvidia-smi not found: .*use \./run-cpu\.sh")


@POSIX_ONLY
def test_gpu_script_refuses_a_driver_that_cannot_reach_a_gpu(tmp_path: Path) -> None:
    smi = 'echo "NVIDIA-SMI has failed because it couldn\'t communicate" >&2; exit 9\n'
    done = run_script(REPO / "run-gpu.sh", tmp_path, nvidia_smi=smi)
    assert_fails_early(done, tmp_path, r"nvidia-smi failed: the NVIDIA driver cannot reach a GPU")


@POSIX_ONLY
def test_gpu_script_refuses_when_no_gpu_is_listed(tmp_path: Path) -> None:
    done = run_script(REPO / "run-gpu.sh", tmp_path, nvidia_smi="exit 0\n")
    assert_fails_early(done, tmp_path, r"nvidia-smi lists no GPU")


@POSIX_ONLY
@pytest.mark.parametrize(
    ("system", "machine", "translated", "why"),
    [
        ("Linux", "x86_64", "0", r"for Apple Silicon Macs, and this is Linux x86_64"),
        ("Linux", "aarch64", "0", r"for Apple Silicon Macs, and this is Linux aarch64"),
        ("Darwin", "x86_64", "0", r"this Mac is x86_64, not Apple Silicon"),
        ("Darwin", "x86_64", "1", r"runs under Rosetta"),
    ],
)
def test_apple_script_refuses_anything_but_apple_silicon(
    tmp_path: Path, system: str, machine: str, translated: str, why: str
) -> None:
    uname = f'case "$1" in -s) echo {system};; -m) echo {machine};; esac\n'
    done = run_script(REPO / "run-apple.sh", tmp_path, uname=uname, sysctl=f"echo {translated}\n")
    assert_fails_early(done, tmp_path, why)


@POSIX_ONLY
def test_apple_script_refuses_a_python_that_is_not_arm64(tmp_path: Path) -> None:
    fake_tool(tmp_path / "x86", "python3", 'case "$2" in *machine*) exit 1;; esac; exit 0\n')
    uname = 'case "$1" in -s) echo Darwin;; -m) echo arm64;; esac\n'
    python = str(tmp_path / "x86" / "python3")
    done = run_script(
        REPO / "run-apple.sh", tmp_path, python=python, uname=uname, sysctl="echo 0\n"
    )
    assert_fails_early(done, tmp_path, r"is an x86_64 build \(Rosetta\)")


@pytest.fixture
def script_copy(tmp_path: Path) -> Path:
    """The run scripts beside a requirements.txt that installs offline and a main.py that
    reports how it was started."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    for name in SH_SCRIPTS:
        shutil.copy2(REPO / name, root / name)
    shutil.copy2(REPO / "scripts" / "run-common.sh", root / "scripts")
    (root / "requirements.txt").write_text("pip\n")
    (root / "main.py").write_text(
        "import os, sys\n"
        "print('STARTED', sys.prefix, sys.argv[1:], os.environ['COMPUTE_DEVICE'],"
        " os.environ.get('CMAKE_ARGS'))\n"
    )
    return root


@POSIX_ONLY
def test_cpu_script_makes_a_venv_installs_and_starts_the_service(
    tmp_path: Path, script_copy: Path
) -> None:
    done = run_script(script_copy / "run-cpu.sh", tmp_path, "--port", "8010")
    assert done.returncode == 0, done.stderr
    started = done.stdout.splitlines()[-1]
    assert started == f"STARTED {tmp_path / 'venv'} ['websocket', '--port', '8010'] cpu None"


@POSIX_ONLY
def test_gpu_script_starts_on_cuda_with_a_cuda_build(tmp_path: Path, script_copy: Path) -> None:
    smi = 'echo "NVIDIA H100 80GB HBM3"\n'
    done = run_script(script_copy / "run-gpu.sh", tmp_path, nvidia_smi=smi)
    assert done.returncode == 0, done.stderr
    assert "NVIDIA GPU(s): NVIDIA H100 80GB HBM3" in done.stdout
    assert done.stdout.splitlines()[-1].endswith("['websocket'] cuda -DGGML_CUDA=on")


@POSIX_ONLY
def test_gpu_script_reports_a_llama_cpp_that_does_not_load(
    tmp_path: Path, script_copy: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    site = next(venv.glob("lib/python3*/site-packages"))
    (site / "llama_cpp").mkdir()
    (site / "llama_cpp" / "__init__.py").write_text("raise OSError('libcudart.so.12: missing')\n")
    done = run_script(script_copy / "run-gpu.sh", tmp_path, nvidia_smi="echo 'NVIDIA L4'\n")
    assert done.returncode == 1
    assert "libcudart.so.12: missing" in done.stderr
    assert "llama-cpp-python is installed but does not load" in done.stderr


# --- Windows scripts ---


@pytest.mark.parametrize("name", sorted(BAT_SCRIPTS))
def test_bat_script_names_the_right_commands(name: str) -> None:
    raw = (REPO / name).read_bytes()
    # cmd.exe misreads labels in LF-only files; .gitattributes keeps them CRLF.
    assert raw.count(b"\r\n") == raw.count(b"\n"), f"{name} must have CRLF line endings"
    text = raw.decode()
    for needed in (
        "python main.py websocket %*",
        "-m venv .venv",
        "pip install -r requirements.txt",
        f'set "COMPUTE_DEVICE={BAT_SCRIPTS[name]}"',
        'cd /d "%~dp0"',
    ):
        assert needed in text, f"{name} lacks {needed!r}"
    if name == "run-gpu.bat":
        assert "nvidia-smi -L" in text and "-DGGML_CUDA=on" in text and "where nvcc" in text
    labels = set(re.findall(r"^:(\w+)", text, re.MULTILINE))
    targets = set(re.findall(r"\bgoto (\w+)", text))
    assert targets and targets <= labels, f"{name}: goto without a label: {targets - labels}"


def test_gitattributes_keep_line_endings() -> None:
    lines = (REPO / ".gitattributes").read_text().splitlines()
    assert "*.bat text eol=crlf" in lines and "*.sh text eol=lf" in lines


# --- scale-out: nginx in front of replicas sharing sessions in Redis ---

SCALE_FILE = "docker-compose.scale.yml"
SCALE_NETWORK = "fasttalk-scale-network"
NGINX_CONF = REPO / "deploy" / "nginx.conf"


def scale_compose() -> dict[str, Any]:
    return load_compose(SCALE_FILE)


def assert_only_the_balancer_is_trusted(
    forwarded: str, nginx_ip: str, ipam: dict[str, Any]
) -> None:
    """FORWARDED_ALLOW_IPS (addresses or networks, comma-separated, as uvicorn reads it) must
    hold nginx's fixed address, and no address Docker may give another container."""
    import ipaddress

    assert "*" not in forwarded, "any client could forge X-Forwarded-For"
    trusted = [ipaddress.IPv4Network(item.strip()) for item in forwarded.split(",") if item.strip()]
    balancer = ipaddress.IPv4Address(nginx_ip)
    subnet, dynamic = ipaddress.IPv4Network(ipam["subnet"]), ipaddress.IPv4Network(ipam["ip_range"])
    assert balancer in subnet and balancer not in dynamic, "a replica could take nginx's address"
    assert trusted and any(balancer in network for network in trusted), trusted
    # replicas, and any stack that joins the network, get their addresses from ip_range
    assert all(n.subnet_of(subnet) and not n.overlaps(dynamic) for n in trusted), trusted


def test_scale_compose_has_the_balancer_replicas_store_and_engine() -> None:
    services = scale_compose()["services"]
    assert {"nginx", "llm-service", "redis", "ollama", "ollama-pull"} <= set(services)
    service = services["llm-service"]
    assert service["deploy"]["replicas"] == 3
    # a fixed container name, or a published port, would stop `--scale` at the second replica
    assert "container_name" not in service and "ports" not in service
    for name, spec in services.items():
        assert SCALE_NETWORK in spec["networks"], f"{name} is not on {SCALE_NETWORK}"


def test_scale_compose_images_are_pinned() -> None:
    services = scale_compose()["services"]
    for name, service in services.items():
        image, _, tag = service["image"].partition(":")
        assert image and tag and tag != "latest", f"{name}: {service['image']} is not pinned"
    assert re.fullmatch(r"nginx:\d+\.\d+(\.\d+)?(-alpine)?", services["nginx"]["image"])
    assert re.fullmatch(r"redis:\d+\.\d+(\.\d+)?(-alpine)?", services["redis"]["image"])
    # the same engine as the single-replica files, so a model volume means the same there
    engine = load_compose("docker-compose.cpu.yml")["services"]["ollama"]["image"]
    assert services["ollama"]["image"] == services["ollama-pull"]["image"] == engine


def test_scale_compose_publishes_only_the_balancer_on_loopback() -> None:
    # of the services `up` starts; the monitoring profile's are checked with the other files'
    services = scale_compose()["services"]
    published = {
        name: spec["ports"]
        for name, spec in services.items()
        if "ports" in spec and not spec.get("profiles")
    }
    assert published == {"nginx": ["127.0.0.1:8002:8000"]}


def test_scale_service_shares_sessions_and_trusts_only_the_balancer() -> None:
    compose = scale_compose()
    service = compose["services"]["llm-service"]
    env = environment(service)
    assert {key: env.get(key) for key in PINNED_ENV} == PINNED_ENV
    assert env["LLM_SESSION_STORE"] == "redis://redis:6379/0"
    # a reply must outlive the socket long enough for its client to come back elsewhere
    assert float(env["LLM_RESUME_GRACE_S"]) >= 10
    assert env["LLM_HOST"] == "0.0.0.0"
    nginx_ip = compose["services"]["nginx"]["networks"][SCALE_NETWORK]["ipv4_address"]
    ipam = compose["networks"][SCALE_NETWORK]["ipam"]["config"][0]
    assert_only_the_balancer_is_trusted(env["FORWARDED_ALLOW_IPS"], nginx_ip, ipam)
    assert {"path": ".env", "required": False} in service["env_file"]
    assert service["build"] == {"context": ".", "dockerfile": "Dockerfile.cpu"}
    nofile = service["ulimits"]["nofile"]
    assert nofile["soft"] == nofile["hard"] >= 65536
    check = " ".join(service["healthcheck"]["test"])
    assert service["healthcheck"]["test"][0] == "CMD" and "LLM_MONITORING_PORT" in check
    assert "9092" in check and "/health" in check
    assert depends_on(service) == {
        "redis": "service_healthy",
        "ollama": "service_healthy",
        "ollama-pull": "service_completed_successfully",
    }


def test_scale_redis_persists_and_reports_health() -> None:
    compose = scale_compose()
    redis = compose["services"]["redis"]
    command = redis["command"]
    words = command if isinstance(command, list) else shlex.split(command)
    assert "--appendonly" in words and words[words.index("--appendonly") + 1] == "yes"
    volume, _, target = redis["volumes"][0].partition(":")
    assert target == "/data" and volume in compose["volumes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    ollama = compose["services"]["ollama"]
    volume, _, target = ollama["volumes"][0].partition(":")
    assert target == "/root/.ollama" and volume in compose["volumes"]
    assert ollama["healthcheck"]["test"] == ["CMD", "ollama", "list"]
    assert depends_on(compose["services"]["ollama-pull"]) == {"ollama": "service_healthy"}


def test_scale_nginx_mounts_its_config_read_only() -> None:
    nginx = scale_compose()["services"]["nginx"]
    [mount] = nginx["volumes"]
    if isinstance(mount, str):
        source, target, mode = mount.split(":")
        mount = {"source": source, "target": target, "read_only": mode == "ro"}
    assert mount["target"] == "/etc/nginx/nginx.conf" and mount["read_only"] is True
    assert (REPO / mount["source"]).resolve() == NGINX_CONF and NGINX_CONF.is_file()
    assert depends_on(nginx) == {"llm-service": "service_healthy"}
    assert nginx["ulimits"]["nofile"]["soft"] >= 65536


def test_every_compose_file_goes_through_the_parser_in_ci() -> None:
    checks = (REPO / ".ci" / "deploy-checks").read_text()
    listed = re.search(r"^COMPOSE_FILES=\((.*)\)$", checks, re.MULTILINE)
    assert listed, "no COMPOSE_FILES in .ci/deploy-checks"
    assert {p.name for p in REPO.glob("docker-compose.*.yml")} <= set(listed[1].split())


# --- deploy/nginx.conf ---


@dataclass(frozen=True)
class Directive:
    name: str
    args: tuple[str, ...]
    block: tuple[Directive, ...] = ()


def parse_nginx(text: str) -> list[Directive]:
    """nginx's configuration as nested directives; comments dropped. Enough for this file: no
    quoted strings holding `;`, `{`, `}` or `#`."""
    tokens = re.findall(r"[{};]|[^\s{};]+", re.sub(r"#[^\n]*", "", text))
    position = 0

    def block() -> list[Directive]:
        nonlocal position
        directives: list[Directive] = []
        words: list[str] = []
        while position < len(tokens):
            token = tokens[position]
            position += 1
            if token == "}":
                assert not words, f"unterminated directive {words}"
                return directives
            if token == ";":
                directives.append(Directive(words[0], tuple(words[1:])))
                words = []
            elif token == "{":
                directives.append(Directive(words[0], tuple(words[1:]), tuple(block())))
                words = []
            else:
                words.append(token)
        assert not words, f"unterminated directive {words}"
        return directives

    return block()


def find(directives: tuple[Directive, ...] | list[Directive], name: str) -> list[Directive]:
    return [d for d in directives if d.name == name]


def walk(directives: tuple[Directive, ...] | list[Directive]) -> list[Directive]:
    """Every directive, those inside blocks included."""
    return [d for directive in directives for d in (directive, *walk(directive.block))]


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value)
    assert match, value
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2] or "s"]
    return int(match[1]) * scale


def nginx_server() -> Directive:
    [http] = find(parse_nginx(NGINX_CONF.read_text()), "http")
    [server] = find(http.block, "server")
    return server


def location(server: Directive, *args: str) -> Directive:
    found = [d for d in find(server.block, "location") if d.args == args]
    assert len(found) == 1, f"location {' '.join(args)}"
    return found[0]


def setting(server: Directive, where: Directive, name: str) -> tuple[str, ...]:
    """A directive's value in a location, or the one it inherits from the server."""
    for scope in (where, server):
        if values := find(scope.block, name):
            return values[-1].args
    raise AssertionError(f"{name} is not set for location {' '.join(where.args)}")


def test_nginx_conf_upgrades_websockets_and_forwards_the_client() -> None:
    [http] = find(parse_nginx(NGINX_CONF.read_text()), "http")
    [upgrade_map] = find(http.block, "map")
    assert upgrade_map.args == ("$http_upgrade", "$connection_upgrade")
    assert {d.name: d.args for d in upgrade_map.block} == {
        "default": ("upgrade",),
        "''": ("close",),
    }
    server = nginx_server()
    websocket = location(server, "/ws/")
    # proxy_set_header in a location would drop all of the server's: they must stay in one place
    assert not any(find(loc.block, "proxy_set_header") for loc in find(server.block, "location"))
    headers = {d.args[0]: d.args[1] for d in find(server.block, "proxy_set_header")}
    assert headers["Upgrade"] == "$http_upgrade"
    assert headers["Connection"] == "$connection_upgrade"
    assert headers["X-Forwarded-For"] in {"$remote_addr", "$proxy_add_x_forwarded_for"}
    assert headers["X-Real-IP"] == "$remote_addr"
    assert setting(server, websocket, "proxy_http_version") == ("1.1",)


def test_nginx_conf_streams_unbuffered_with_long_socket_timeouts() -> None:
    server = nginx_server()
    websocket = location(server, "/ws/")
    assert setting(server, websocket, "proxy_buffering") == ("off",)
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        [value] = setting(server, websocket, name)
        assert seconds(value) >= 3600, f"{name} {value}: quiet sockets would be cut"


def test_nginx_conf_balances_over_every_replica_without_stickiness() -> None:
    text = NGINX_CONF.read_text()
    [http] = find(parse_nginx(text), "http")
    server = nginx_server()
    # sessions are in Redis: any replica can resume any session, so no client is pinned
    names = {d.name for d in walk(parse_nginx(text))}
    assert not {"ip_hash", "hash", "sticky", "sticky_cookie_insert"} & names
    [resolver] = find(http.block, "resolver")
    assert resolver.args[0] == "127.0.0.11" and any(a.startswith("valid=") for a in resolver.args)
    [target] = find(server.block, "set")
    assert target.args == ("$llm_service", "llm-service:8000")
    for loc in (location(server, "/ws/"), location(server, "=", "/health"), location(server, "/")):
        # only the main port: /metrics on 9092 stays on the compose network
        assert [d.args for d in find(loc.block, "proxy_pass")] == [("http://$llm_service",)]
    assert "9092" not in re.sub(r"#[^\n]*", "", text)


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_nginx_conf_syntax(tmp_path: Path) -> None:
    # -e and pid under tmp_path: the check needs no root and no nginx log or run directories
    conf = tmp_path / "nginx.conf"
    shutil.copy(NGINX_CONF, conf)
    command = ["nginx", "-t", "-q", "-e", "stderr", "-g", f"pid {tmp_path / 'nginx.pid'};"]
    done = subprocess.run([*command, "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


# --- scale-out, through Docker Compose's own parser ---


@pytest.mark.parametrize(
    "dotenv",
    [
        None,
        "LLM_SESSION_STORE=memory\nLLM_RESUME_GRACE_S=0.0\nFORWARDED_ALLOW_IPS=*\n"
        "LLM_HOST=127.0.0.1\nOLLAMA_BASE_URL=http://localhost:11434\n",
    ],
    ids=["no-dotenv", "conflicting-dotenv"],
)
def test_scale_compose_resolves_as_intended(tmp_path: Path, dotenv: str | None) -> None:
    config = compose_config(tmp_path, SCALE_FILE, dotenv)
    services = config["services"]
    published = {
        name: {(p["target"], str(p["published"]), p.get("host_ip")) for p in spec["ports"]}
        for name, spec in services.items()
        if spec.get("ports")
    }
    assert published == {"nginx": {(8000, "8002", "127.0.0.1")}}
    [mount] = services["nginx"]["volumes"]
    assert (mount["type"], mount["target"], mount["read_only"]) == (
        "bind",
        "/etc/nginx/nginx.conf",
        True,
    )
    assert Path(mount["source"]) == tmp_path / "deploy" / "nginx.conf"
    service = services["llm-service"]
    assert service["deploy"]["replicas"] == 3
    env = service["environment"]
    assert {key: env.get(key) for key in PINNED_ENV} == PINNED_ENV
    assert (env["LLM_SESSION_STORE"], env["LLM_RESUME_GRACE_S"]) == ("redis://redis:6379/0", "30")
    assert env["LLM_HOST"] == "0.0.0.0"
    nginx_ip = services["nginx"]["networks"][SCALE_NETWORK]["ipv4_address"]
    network = config["networks"][SCALE_NETWORK]
    assert network["name"] == SCALE_NETWORK
    ipam = network["ipam"]["config"][0]
    assert_only_the_balancer_is_trusted(env["FORWARDED_ALLOW_IPS"], nginx_ip, ipam)
    for name in ("redis", "ollama"):
        assert service["depends_on"][name]["condition"] == "service_healthy"
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    assert services["redis"]["command"] == ["redis-server", "--appendonly", "yes"]
    assert {v["target"] for v in services["redis"]["volumes"]} == {"/data"}


# --- the monitoring profile: Prometheus and Grafana in every compose file ---

ALL_COMPOSE_FILES = sorted(p.name for p in REPO.glob("docker-compose.*.yml"))
MONITORING_SERVICES = {"prometheus", "grafana"}
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
GRAFANA_DIR = REPO / "deploy" / "grafana"


def bind_mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read-only) for a service's long-syntax bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict) and volume.get("type") == "bind":
            assert volume["bind"]["create_host_path"] is False, volume  # missing: fail at `up`
            mounts[volume["target"]] = (volume["source"], volume.get("read_only", False))
    return mounts


def named_volumes(service: dict[str, Any]) -> dict[str, str]:
    """target -> volume name for a service's short-syntax named volumes."""
    pairs = [v.split(":")[:2] for v in service.get("volumes", []) if isinstance(v, str)]
    return {target: name for name, target in pairs if not name.startswith((".", "/"))}


def flag(command: list[str], name: str) -> str:
    [value] = [word.split("=", 1)[1] for word in command if word.startswith(f"--{name}=")]
    return value


@pytest.fixture(params=ALL_COMPOSE_FILES)
def any_compose_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_every_compose_file_has_the_monitoring_profile(any_compose_name: str) -> None:
    compose = load_compose(any_compose_name)
    services = compose["services"]
    # `up` without the profile starts what it started before
    profiled = {name for name, spec in services.items() if spec.get("profiles")}
    assert profiled == MONITORING_SERVICES
    for name in MONITORING_SERVICES:
        spec = services[name]
        assert spec["profiles"] == ["monitoring"]
        # the compose network, where llm-service's port 9092 is reached by name
        assert spec["networks"] == services["llm-service"]["networks"], name
        assert spec["ports"] and all(
            isinstance(port, str) and port.startswith("127.0.0.1:") for port in spec["ports"]
        ), f"{name}: published beyond loopback"
        for target, volume in named_volumes(spec).items():
            assert volume in compose["volumes"], f"{name}: {volume} for {target} is not declared"
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", services["prometheus"]["image"])
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", services["grafana"]["image"])


def test_prometheus_mounts_its_config_and_scrapes_the_monitoring_port(
    any_compose_name: str,
) -> None:
    services = load_compose(any_compose_name)["services"]
    prometheus = services["prometheus"]
    mounts = bind_mounts(prometheus)
    assert mounts["/etc/prometheus"] == ("./deploy/prometheus", True)
    config_file = flag(prometheus["command"], "config.file")
    assert config_file.startswith("/etc/prometheus/")
    config_path = PROMETHEUS_DIR / config_file.removeprefix("/etc/prometheus/")
    config = yaml.safe_load(config_path.read_text())
    for rules in config["rule_files"]:
        assert (config_path.parent / rules).is_file(), rules
    assert named_volumes(prometheus).get(flag(prometheus["command"], "storage.tsdb.path"))
    [job] = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    [lookup] = job["dns_sd_configs"]
    # every container of the service, replicas included, on the port its /metrics is on, and
    # listening there on the compose network rather than its own loopback
    env = environment(services["llm-service"])
    assert lookup["names"] == ["llm-service"] and lookup["type"] == "A"
    assert str(lookup["port"]) == env["LLM_MONITORING_PORT"] == "9092"
    assert env["LLM_HOST"] == "0.0.0.0"


def test_grafana_is_provisioned_with_the_data_source_and_the_dashboard(
    any_compose_name: str,
) -> None:
    services = load_compose(any_compose_name)["services"]
    grafana = services["grafana"]
    mounts = bind_mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == ("./deploy/grafana/provisioning", True)
    assert mounts["/etc/grafana/dashboards"] == ("./deploy/grafana/dashboards", True)
    assert named_volumes(grafana).get("/var/lib/grafana")
    env = environment(grafana)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == "${GRAFANA_ADMIN_PASSWORD:-admin}"
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    dashboards = GRAFANA_DIR / "dashboards"
    assert (dashboards / Path(home).relative_to("/etc/grafana/dashboards")).is_file()
    provisioning = GRAFANA_DIR / "provisioning"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "fasttalk.yml").read_text())[
        "providers"
    ]
    assert provider["type"] == "file" and provider["options"]["path"] == "/etc/grafana/dashboards"
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    # Prometheus by its service name and container port
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert any(port.endswith(":9090") for port in services["prometheus"]["ports"])
    dashboard = json.loads((dashboards / "fasttalk.json").read_text())
    uids = {
        target["datasource"]["uid"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    }
    assert uids == {source["uid"]}


def test_monitoring_profile_resolves_through_the_parser(
    tmp_path: Path, any_compose_name: str
) -> None:
    shutil.copy(REPO / any_compose_name, tmp_path / any_compose_name)
    shutil.copytree(REPO / "deploy", tmp_path / "deploy")
    base = ["-f", any_compose_name]
    done = run_compose(tmp_path, *base, "--profile", "monitoring", "config", "--format", "json")
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    assert set(services) >= MONITORING_SERVICES
    for name in MONITORING_SERVICES:
        for port in services[name]["ports"]:
            assert port["host_ip"] == "127.0.0.1", (name, port)
        for mount in services[name]["volumes"]:
            if mount["type"] == "bind":
                source = Path(mount["source"])
                assert source.is_relative_to(tmp_path / "deploy") and source.is_dir(), mount
    plain = run_compose(tmp_path, *base, "config", "--services")
    assert plain.returncode == 0, plain.stderr
    assert not MONITORING_SERVICES & set(plain.stdout.split())
