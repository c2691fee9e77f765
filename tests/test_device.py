"""The device probe: every detection path against a fake host, the real host probe against a
fake torch and a fake nvidia-smi, and the mapping onto Ollama and llama.cpp options."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llm_service.device import (
    Device,
    DeviceKind,
    HostProbe,
    detect_device,
    llamacpp_gpu_layers,
    ollama_options,
)
from llm_service.errors import DeviceUnavailableError

REPO = Path(__file__).resolve().parents[1]
LINUX_X86 = ("Linux", "x86_64")
MAC_ARM = ("Darwin", "arm64")
H100 = "NVIDIA H100 80GB HBM3"
CPU = Device("cpu", "CPU (x86_64, 16 cores)", "fallback", None)
CUDA_1 = Device("cuda", H100, "nvidia-smi", 1)
MPS = Device("mps", "Apple Silicon (arm64 Darwin)", "platform", None)


def host(
    *,
    torch_cuda: list[str] | None = None,
    torch_mps: bool | None = None,
    nvidia_smi: list[str] | None = None,
    system: tuple[str, str] = LINUX_X86,
    cpus: int = 16,
) -> HostProbe:
    """A fake host; the defaults are a bare x86 Linux box: no torch, no NVIDIA driver."""
    return HostProbe(
        torch_cuda=lambda: torch_cuda,
        torch_mps=lambda: torch_mps,
        nvidia_smi=lambda: nvidia_smi,
        platform=lambda: system,
        cpu_count=lambda: cpus,
    )


# --- auto-detection (COMPUTE_DEVICE unset) ---


def test_torch_with_cuda_picks_the_gpu_torch_names() -> None:
    probe = host(torch_cuda=["NVIDIA A100", H100], nvidia_smi=["ignored"])
    assert detect_device(None, 1, probe) == Device("cuda", H100, "torch", 1)


def test_cpu_only_torch_does_not_hide_a_gpu_that_nvidia_smi_sees() -> None:
    # The seed's manual set-up installs CPU torch; Ollama still has the GPU.
    probe = host(torch_cuda=[], torch_mps=False, nvidia_smi=[H100])
    assert detect_device(None, 0, probe) == Device("cuda", H100, "nvidia-smi", 0)


def test_cpu_only_torch_and_no_driver_is_cpu() -> None:
    probe = host(torch_cuda=[], torch_mps=False, nvidia_smi=None)
    assert detect_device(None, 0, probe) == CPU


def test_no_torch_and_nvidia_smi_finds_a_gpu() -> None:
    assert detect_device(None, 0, host(nvidia_smi=[H100])) == Device("cuda", H100, "nvidia-smi", 0)


def test_no_torch_and_no_nvidia_smi_on_x86_linux_falls_back_to_cpu() -> None:
    device = detect_device(None, 0, host(cpus=2))
    assert device == Device("cpu", "CPU (x86_64, 2 cores)", "fallback", None)


def test_nvidia_smi_listing_no_gpu_falls_back_to_cpu() -> None:
    assert detect_device(None, 0, host(nvidia_smi=[])).kind == "cpu"


def test_arm64_darwin_without_torch_is_mps_by_platform() -> None:
    device = detect_device(None, 0, host(system=MAC_ARM))
    assert device == Device("mps", "Apple Silicon (arm64 Darwin)", "platform", None)


def test_arm64_darwin_with_torch_mps_is_mps_by_torch() -> None:
    device = detect_device(None, 0, host(torch_cuda=[], torch_mps=True, system=MAC_ARM))
    assert (device.kind, device.source) == ("mps", "torch")


def test_arm64_darwin_where_torch_says_no_mps_is_cpu() -> None:
    device = detect_device(None, 0, host(torch_cuda=[], torch_mps=False, system=MAC_ARM))
    assert device == Device("cpu", "CPU (arm64, 16 cores)", "fallback", None)


def test_intel_mac_is_cpu() -> None:
    assert detect_device(None, 0, host(system=("Darwin", "x86_64"))).kind == "cpu"


def test_arm64_linux_is_not_apple_silicon() -> None:
    # Docker on a Mac: an arm64 Linux VM without Metal.
    assert detect_device(None, 0, host(system=("Linux", "aarch64"))).kind == "cpu"


@pytest.mark.parametrize(
    "probe",
    [host(torch_cuda=[H100]), host(nvidia_smi=[H100])],
    ids=["torch", "nvidia-smi"],
)
def test_auto_with_gpu_index_out_of_range_is_refused(probe: HostProbe) -> None:
    with pytest.raises(DeviceUnavailableError, match=r"GPU_DEVICE_ID=1 .*found 0: NVIDIA H100"):
        detect_device(None, 1, probe)


# --- explicit COMPUTE_DEVICE ---


@pytest.mark.parametrize("probe", [host(), host(nvidia_smi=[H100]), host(system=MAC_ARM)])
def test_cpu_request_is_always_satisfied(probe: HostProbe) -> None:
    device = detect_device("cpu", 0, probe)
    assert (device.kind, device.source, device.gpu_index) == ("cpu", "COMPUTE_DEVICE", None)


@pytest.mark.parametrize(
    ("probe", "index", "name"),
    [
        (host(torch_cuda=["NVIDIA L4", H100]), 1, H100),
        (host(nvidia_smi=["NVIDIA L4", H100]), 0, "NVIDIA L4"),
        (host(torch_cuda=[], nvidia_smi=[H100]), 0, H100),
    ],
    ids=["torch", "nvidia-smi", "cpu-torch+nvidia-smi"],
)
def test_cuda_request_satisfied(probe: HostProbe, index: int, name: str) -> None:
    assert detect_device("cuda", index, probe) == Device("cuda", name, "COMPUTE_DEVICE", index)


@pytest.mark.parametrize(
    ("probe", "said"),
    [
        (host(), r"torch: not installed; nvidia-smi: not found or failed"),
        (host(torch_cuda=[], nvidia_smi=[]), r"torch: sees no CUDA device; nvidia-smi: lists no"),
        (host(system=MAC_ARM, torch_mps=True), r"torch: not installed"),
    ],
    ids=["bare", "no-devices", "mac"],
)
def test_cuda_request_without_a_gpu_is_refused(probe: HostProbe, said: str) -> None:
    with pytest.raises(DeviceUnavailableError, match=rf"COMPUTE_DEVICE=cuda .*\({said}"):
        detect_device("cuda", 0, probe)


@pytest.mark.parametrize("index", [2, -1])
def test_cuda_request_with_gpu_index_out_of_range_is_refused(index: int) -> None:
    probe = host(nvidia_smi=["NVIDIA L4", H100])
    with pytest.raises(DeviceUnavailableError, match=rf"GPU_DEVICE_ID={index} .*1: {H100}"):
        detect_device("cuda", index, probe)


@pytest.mark.parametrize("torch_mps", [None, True])
def test_mps_request_on_apple_silicon(torch_mps: bool | None) -> None:
    device = detect_device("mps", 0, host(system=MAC_ARM, torch_mps=torch_mps))
    assert device == Device("mps", "Apple Silicon (arm64 Darwin)", "COMPUTE_DEVICE", None)


@pytest.mark.parametrize(
    "system", [LINUX_X86, ("Linux", "aarch64"), ("Darwin", "x86_64"), ("Windows", "AMD64")]
)
def test_mps_request_off_apple_silicon_is_refused(system: tuple[str, str]) -> None:
    pattern = rf"COMPUTE_DEVICE=mps needs Apple Silicon .*not {' '.join(system)}"
    with pytest.raises(DeviceUnavailableError, match=pattern):
        detect_device("mps", 0, host(system=system, torch_mps=True))


def test_mps_request_refused_when_torch_says_mps_is_unavailable() -> None:
    with pytest.raises(DeviceUnavailableError, match=r"COMPUTE_DEVICE=mps but torch"):
        detect_device("mps", 0, host(system=MAC_ARM, torch_mps=False))


def test_an_explicit_request_never_consults_more_than_it_needs() -> None:
    def boom() -> list[str] | None:
        raise AssertionError("a cpu request must not probe for GPUs")

    probe = HostProbe(boom, lambda: None, boom, lambda: LINUX_X86, lambda: 4)
    assert detect_device("cpu", 0, probe).kind == "cpu"
    # torch already sees the GPU: no need to run nvidia-smi.
    probe = HostProbe(lambda: [H100], lambda: None, boom, lambda: LINUX_X86, lambda: 4)
    assert detect_device("cuda", 0, probe).source == "COMPUTE_DEVICE"


# --- mapping onto the engines ---


@pytest.mark.parametrize(
    ("device", "threads", "options"),
    [
        (CPU, 12, {"num_gpu": 0, "num_thread": 12}),
        (CPU, None, {"num_gpu": 0}),
        (CUDA_1, 12, {"main_gpu": 1}),
        (Device("cuda", H100, "torch", 0), None, {"main_gpu": 0}),
        (MPS, 8, {}),
    ],
)
def test_ollama_options(device: Device, threads: int | None, options: dict[str, int]) -> None:
    assert ollama_options(device, threads) == options


@pytest.mark.parametrize(("device", "layers"), [(CPU, 0), (CUDA_1, -1), (MPS, -1)])
def test_llamacpp_gpu_layers(device: Device, layers: int) -> None:
    assert llamacpp_gpu_layers(device) == layers


# --- the real host probe, against fake tools ---


def test_system_probe_reads_this_host() -> None:
    probe = HostProbe.system()
    assert probe.platform() == (platform.system(), platform.machine())
    assert probe.cpu_count() == (os.cpu_count() or 1)


def _fake_nvidia_smi(bin_dir: Path, body: str) -> None:
    exe = bin_dir / "nvidia-smi"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(0o755)


@pytest.mark.skipif(sys.platform == "win32", reason="fake nvidia-smi is a shell script")
def test_system_probe_parses_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_nvidia_smi(tmp_path, f'echo "{H100}"\necho\necho " NVIDIA L4 "\n')
    monkeypatch.setenv("PATH", str(tmp_path))
    assert HostProbe.system().nvidia_smi() == [H100, "NVIDIA L4"]


@pytest.mark.skipif(sys.platform == "win32", reason="fake nvidia-smi is a shell script")
def test_system_probe_treats_a_failing_nvidia_smi_as_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_nvidia_smi(tmp_path, 'echo "NVIDIA-SMI has failed" >&2\nexit 9\n')
    monkeypatch.setenv("PATH", str(tmp_path))
    assert HostProbe.system().nvidia_smi() is None


def test_system_probe_without_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert HostProbe.system().nvidia_smi() is None


FAKE_TORCH = """
    import os

    class _Cuda:
        @staticmethod
        def is_available():
            return bool(os.environ["FAKE_CUDA"])

        @staticmethod
        def device_count():
            return len(os.environ["FAKE_CUDA"].split(","))

        @staticmethod
        def get_device_name(i):
            return os.environ["FAKE_CUDA"].split(",")[i]

    class _Mps:
        @staticmethod
        def is_available():
            return os.environ["FAKE_MPS"] == "1"

    class backends:
        mps = _Mps

    cuda = _Cuda
"""

PROBE_IN_CHILD = """
import sys
from llm_service.device import HostProbe, detect_device
probe = HostProbe.system()
assert "torch" not in sys.modules, "llm_service.device imported torch before it was asked"
print(probe.torch_cuda(), probe.torch_mps(), detect_device(None, 0).source, sep="|")
"""


def _probe_in_child(torch_dir: Path | None, cuda: str, mps: str) -> list[str]:
    # A child process, so that the fake torch never enters this interpreter's sys.modules.
    path = [str(REPO)] + ([str(torch_dir)] if torch_dir else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), FAKE_CUDA=cuda, FAKE_MPS=mps)
    done = subprocess.run(
        [sys.executable, "-c", PROBE_IN_CHILD],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    return done.stdout.strip().split("|")


@pytest.fixture
def fake_torch(tmp_path: Path) -> Path:
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(textwrap.dedent(FAKE_TORCH))
    return tmp_path


def test_system_probe_asks_torch_lazily_for_cuda(fake_torch: Path) -> None:
    assert _probe_in_child(fake_torch, f"NVIDIA L4,{H100}", "0") == [
        f"['NVIDIA L4', '{H100}']",
        "False",
        "torch",
    ]


def test_system_probe_asks_torch_for_mps(fake_torch: Path) -> None:
    assert _probe_in_child(fake_torch, "", "1") == ["[]", "True", "torch"]


def test_system_probe_treats_a_torch_that_fails_to_load_as_absent(tmp_path: Path) -> None:
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise OSError('libcudart.so.12: missing')\n")
    torch_cuda, torch_mps, _ = _probe_in_child(tmp_path, "", "0")
    assert (torch_cuda, torch_mps) == ("None", "None")


@pytest.mark.parametrize("requested", ["cuda", "mps", "cpu"])
def test_every_device_kind_is_handled(requested: DeviceKind) -> None:
    # Each kind either yields itself or is refused: never another kind in its place.
    probe = host(torch_cuda=[H100], torch_mps=True, system=MAC_ARM)
    assert detect_device(requested, 0, probe).kind == requested
