"""The device fingerprint: its fields, a stable file-name slug, identity versus soft differences."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from hwnas.errors import HwnasError, ProfileError
from hwnas.latency.device import (
    check_expectations,
    device_slug,
    fingerprint,
    fingerprint_differences,
)
from hwnas.latency.profiles import DeviceProfile, load_profile

SLUG = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")

H100 = {
    "kind": "cuda", "backend": "torch-cuda", "precision": "fp16", "cpu_model": "Intel(R) Xeon(R) Platinum 8480+",
    "threads": 1, "gpu_name": "NVIDIA H100 80GB HBM3", "sm_count": 132, "mig_mode": "disabled",
    "driver": "580.159.04", "cuda_driver_version": "13.0", "sm_clock_max_mhz": 1980, "sm_clock_mhz": 345,
    "power_limit_w": 700.0, "libraries": {"torch": "2.11.0", "onnxruntime": "1.30.0"},
}


def test_cpu_fingerprint_has_the_fields_and_is_json() -> None:
    profile = load_profile("cpu-onnxruntime")
    fp = fingerprint(profile)
    for key in ("platform", "python", "cpu_model", "cpu_count", "threads", "libraries", "backend", "precision"):
        assert key in fp, key
    assert fp["threads"] == profile.threads and fp["kind"] == "cpu" and fp["cpu_model"]
    assert fp["cpu_count"] >= 1
    assert fp["libraries"]["torch"] == torch.__version__
    assert {"onnxruntime", "onnx", "numpy"} <= set(fp["libraries"])
    assert "gpu_name" not in fp  # a CPU table says nothing about a GPU that may be in the box
    assert json.loads(json.dumps(fp)) == fp
    assert fingerprint_differences(fp, fingerprint(profile)) == ([], [])  # the same machine twice


def test_a_cpu_profile_never_touches_nvml() -> None:
    """Even with NVML's bindings unimportable, a CPU profile is fingerprinted."""
    code = ("import sys; sys.modules['pynvml'] = None\n"
            "from hwnas.latency.device import fingerprint\n"
            "from hwnas.latency.profiles import load_profile\n"
            "print(fingerprint(load_profile('cpu-torch'))['kind'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no CUDA GPU is present")
def test_a_cuda_profile_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(HwnasError, match=r"cuda-torch-fp16\.toml: backend torch-cuda needs a CUDA GPU"):
        fingerprint(load_profile("cuda-torch-fp16"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fingerprint_has_the_gpu_fields() -> None:
    profile = load_profile("cuda-torch-fp16")
    fp = fingerprint(profile)
    assert fp["kind"] == "cuda" and fp["gpu_name"] == torch.cuda.get_device_name(0)
    assert fp["torch_cuda"] == torch.version.cuda and fp["sm_count"] > 0
    if "nvml_error" not in fp:  # NVML present (it is wherever the NVIDIA driver is)
        for key in ("driver", "cuda_driver_version", "sm_clock_max_mhz", "mem_clock_max_mhz", "sm_clock_mhz",
                    "power_limit_w", "gpu_count"):
            assert key in fp, key
        assert fp["sm_clock_max_mhz"] > 0 and fp["power_limit_w"] > 0
        assert re.fullmatch(r"\d+\.\d+", fp["cuda_driver_version"])
    assert SLUG.match(device_slug(fp))
    assert json.loads(json.dumps(fp)) == fp


def test_device_slug_is_file_name_safe_and_stable() -> None:
    assert device_slug(H100) == "nvidia-h100-80gb-hbm3"
    # A driver update or other clocks leave the slug alone: it names the device, not its state.
    assert device_slug(dict(H100, driver="590.1", sm_clock_mhz=1980, libraries={})) == "nvidia-h100-80gb-hbm3"
    assert device_slug(dict(H100, mig_mode="enabled", sm_count=16)) == "nvidia-h100-80gb-hbm3-mig-16sm"
    xeon = {"kind": "cpu", "cpu_model": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "threads": 2}
    assert device_slug(xeon) == "cpu-intel-xeon-platinum-8481c-2t"
    epyc = {"kind": "cpu", "cpu_model": "AMD EPYC 7B13 64-Core Processor", "threads": 1}
    assert device_slug(epyc) == "cpu-amd-epyc-7b13-64-core-1t"
    odd = {"kind": "cpu", "cpu_model": "ARM/Neoverse V2 (r0p1) \\ weird:name*?", "threads": 4}
    assert SLUG.match(device_slug(odd)) and device_slug(odd).endswith("-4t")
    here = fingerprint(load_profile("cpu-onnxruntime"))
    assert SLUG.match(device_slug(here)) and device_slug(here) == device_slug(json.loads(json.dumps(here)))
    assert device_slug(here).endswith(f"-{here['threads']}t")


def test_a_gpu_name_change_is_identity_and_a_driver_change_is_soft() -> None:
    other = dict(H100, gpu_name="NVIDIA A100-SXM4-80GB", driver="590.10")
    identity, soft = fingerprint_differences(H100, other)
    assert identity == ["gpu_name: recorded NVIDIA H100 80GB HBM3, here NVIDIA A100-SXM4-80GB"]
    assert soft == ["driver: recorded 580.159.04, here 590.10"]


def test_which_differences_are_identity_and_which_soft() -> None:
    assert fingerprint_differences(H100, dict(H100)) == ([], [])
    # Current clocks are sampled, not a property of the device: recorded, never compared.
    assert fingerprint_differences(H100, dict(H100, sm_clock_mhz=1980)) == ([], [])
    identity, soft = fingerprint_differences(H100, dict(H100, mig_mode="enabled", sm_count=16, power_limit_w=350.0,
                                                        libraries={"torch": "2.12.0", "onnxruntime": "1.30.0"},
                                                        cpu_model="AMD EPYC 9654"))
    assert {line.split(":")[0] for line in identity} == {"mig_mode", "sm_count"}
    assert {line.split(":")[0] for line in soft} == {"power_limit_w", "libraries.torch", "cpu_model"}
    assert "libraries.torch: recorded 2.11.0, here 2.12.0" in soft

    cpu = {"kind": "cpu", "backend": "onnxruntime-cpu", "precision": "fp32", "cpu_model": "AMD EPYC",
           "threads": 1, "libraries": {"onnxruntime": "1.32.0"}}
    identity, soft = fingerprint_differences(cpu, dict(cpu, threads=2, libraries={}))
    assert identity == ["threads: recorded 1, here 2"]
    assert soft == ["libraries.onnxruntime: recorded 1.32.0, here (absent)"]
    identity, _ = fingerprint_differences(cpu, dict(cpu, cpu_model="Intel Xeon", backend="torch-cpu"))
    assert identity == ["backend: recorded onnxruntime-cpu, here torch-cpu",
                        "cpu_model: recorded AMD EPYC, here Intel Xeon"]


def test_expectations_are_checked_against_the_fingerprint() -> None:
    profile = DeviceProfile("h100", "torch-cuda", "fp16", 1, 1, 0, 5, expect={"gpu_name": "h100"})
    check_expectations(profile, H100)  # case-insensitive substring
    with pytest.raises(ProfileError, match=r"profile 'h100': field 'expect.gpu_name': expects 'h100', "
                                           r"this device has 'NVIDIA A100"):
        check_expectations(profile, dict(H100, gpu_name="NVIDIA A100-SXM4-80GB"))
    cpu = DeviceProfile("c", "torch-cpu", "fp32", 1, 1, 0, 5, expect={"cpu_model": "no such cpu"})
    with pytest.raises(ProfileError, match="expect.cpu_model"):
        check_expectations(cpu, fingerprint(cpu))
