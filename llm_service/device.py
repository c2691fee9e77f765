"""The compute device probe: which of cuda, mps or cpu the engine runs on.

`detect_device` honours an explicit `COMPUTE_DEVICE` and refuses one the host cannot satisfy
with an error that says what is missing; unset, it asks torch (when installed), then
`nvidia-smi`, then the platform (arm64 Darwin is Apple Silicon), and falls back to the CPU.
The facts come from a `HostProbe`, so tests pass a fake one; torch stays optional and is
imported only inside the probe. `ollama_options` and `llamacpp_gpu_layers` map the chosen
device onto each engine's options.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Literal, assert_never

from llm_service.errors import DeviceUnavailableError

DeviceKind = Literal["cuda", "mps", "cpu"]

_APPLE = "Apple Silicon (arm64 Darwin)"


@dataclass(frozen=True)
class Device:
    """The device chosen, how it was chosen, and the CUDA device index where it applies."""

    kind: DeviceKind
    name: str
    source: str
    gpu_index: int | None


def _import_torch() -> ModuleType | None:
    if importlib.util.find_spec("torch") is None:
        return None
    try:
        return importlib.import_module("torch")
    except (ImportError, OSError):
        # A torch that cannot load (missing CUDA libraries, broken wheel) tells us nothing.
        return None


def _torch_cuda() -> list[str] | None:
    torch = _import_torch()
    if torch is None:
        return None
    if not torch.cuda.is_available():
        return []
    return [str(torch.cuda.get_device_name(i)) for i in range(int(torch.cuda.device_count()))]


def _torch_mps() -> bool | None:
    torch = _import_torch()
    return None if torch is None else bool(torch.backends.mps.is_available())


def _nvidia_smi() -> list[str] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    command = [exe, "--query-gpu=name", "--format=csv,noheader"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        # nvidia-smi exits non-zero when the driver is missing or cannot reach the GPU.
        return None
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def _platform() -> tuple[str, str]:
    return platform.system(), platform.machine()


@dataclass(frozen=True)
class HostProbe:
    """The facts about the host that the probe needs; `system()` reads the real ones."""

    torch_cuda: Callable[[], list[str] | None]
    torch_mps: Callable[[], bool | None]
    nvidia_smi: Callable[[], list[str] | None]
    platform: Callable[[], tuple[str, str]]
    cpu_count: Callable[[], int]

    @classmethod
    def system(cls) -> HostProbe:
        return cls(_torch_cuda, _torch_mps, _nvidia_smi, _platform, lambda: os.cpu_count() or 1)


def _cpu(probe: HostProbe, source: str) -> Device:
    return Device("cpu", f"CPU ({probe.platform()[1]}, {probe.cpu_count()} cores)", source, None)


def _cuda(names: list[str], gpu_index: int, source: str) -> Device:
    if not 0 <= gpu_index < len(names):
        found = ", ".join(f"{i}: {name}" for i, name in enumerate(names))
        raise DeviceUnavailableError(
            f"GPU_DEVICE_ID={gpu_index} names no CUDA device (found {found}); set GPU_DEVICE_ID"
            " to one of those indices, or COMPUTE_DEVICE=cpu."
        )
    return Device("cuda", names[gpu_index], source, gpu_index)


def _requested(requested: DeviceKind, gpu_index: int, probe: HostProbe) -> Device:
    if requested == "cpu":
        return _cpu(probe, "COMPUTE_DEVICE")
    if requested == "cuda":
        torch_names = probe.torch_cuda()
        smi_names = None if torch_names else probe.nvidia_smi()
        names = torch_names or smi_names
        if not names:
            torch_said = "not installed" if torch_names is None else "sees no CUDA device"
            smi_said = "not found or failed" if smi_names is None else "lists no GPU"
            raise DeviceUnavailableError(
                f"COMPUTE_DEVICE=cuda but no NVIDIA GPU is visible (torch: {torch_said}; "
                f"nvidia-smi: {smi_said}). Install the NVIDIA driver (in Docker also the NVIDIA"
                " Container Toolkit and a GPU reservation), or set COMPUTE_DEVICE=cpu."
            )
        return _cuda(names, gpu_index, "COMPUTE_DEVICE")
    if requested == "mps":
        if (host := " ".join(probe.platform())) != "Darwin arm64":
            raise DeviceUnavailableError(
                f"COMPUTE_DEVICE=mps needs Apple Silicon (arm64 macOS), not {host}; containers"
                " on a Mac run Linux without Metal. Set COMPUTE_DEVICE=cpu or leave it unset."
            )
        if probe.torch_mps() is False:
            raise DeviceUnavailableError(
                "COMPUTE_DEVICE=mps but torch.backends.mps.is_available() is False (MPS needs"
                " macOS 12.3+). Update macOS and torch, or set COMPUTE_DEVICE=cpu."
            )
        return Device("mps", _APPLE, "COMPUTE_DEVICE", None)
    assert_never(requested)


def _auto(gpu_index: int, probe: HostProbe) -> Device:
    torch_names = probe.torch_cuda()
    if torch_names:
        return _cuda(torch_names, gpu_index, "torch")
    torch_mps = probe.torch_mps()
    if torch_mps:
        return Device("mps", _APPLE, "torch", None)
    # A CPU-only torch says nothing about the GPU that Ollama or llama.cpp would use.
    smi_names = probe.nvidia_smi()
    if smi_names:
        return _cuda(smi_names, gpu_index, "nvidia-smi")
    if probe.platform() == ("Darwin", "arm64") and torch_mps is None:
        return Device("mps", _APPLE, "platform", None)
    return _cpu(probe, "fallback")


def detect_device(
    requested: DeviceKind | None, gpu_index: int = 0, probe: HostProbe | None = None
) -> Device:
    """The device to run on: `requested` if the host has it, else the best one found.

    Raises DeviceUnavailableError rather than fall back when `requested` (or `gpu_index`) is
    not there. Blocking: it may run `nvidia-smi` and import torch.
    """
    host = probe if probe is not None else HostProbe.system()
    return _auto(gpu_index, host) if requested is None else _requested(requested, gpu_index, host)


def ollama_options(device: Device, num_threads: int | None) -> dict[str, int]:
    """Ollama request `options` that keep the model on the chosen device."""
    if device.kind == "cpu":
        return {"num_gpu": 0} | ({} if num_threads is None else {"num_thread": num_threads})
    if device.kind == "cuda":
        return {"main_gpu": device.gpu_index or 0}
    return {}


def llamacpp_gpu_layers(device: Device) -> int:
    """llama.cpp `n_gpu_layers`: none on the CPU, every layer on CUDA or Metal."""
    return 0 if device.kind == "cpu" else -1
