"""The device fingerprint: what a latency table was measured on, and whether another device is the same.

A profile says how to measure; the fingerprint records what was measured on: the CPU as it reports
itself (vendor, family, model, stepping, an ISA-flags digest, caches: `hwnas.latency.cpuinfo`; a
hypervisor's "AMD EPYC" names several generations), or the GPU, its driver, clocks and power limit;
the runtime with its version and thread settings; the kernel and libraries. A table is refused on a
device whose identity differs (another CPU or GPU model, another runtime version or thread count),
naming every field that differs; a softer difference (microcode, kernel, driver, other libraries,
clocks) only warns. Fingerprints of the format before version 2 could not tell CPUs of one name
apart, so a table that carries one is refused too, with the advice to profile again.
"""

from __future__ import annotations

import importlib
import os
import platform
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hwnas.errors import HwnasError, ProfileError
from hwnas.latency.profiles import DeviceProfile

LIBRARIES = ("torch", "onnxruntime", "onnx", "tensorrt", "numpy")
FINGERPRINT_VERSION = 2

# Fields whose change makes numbers mean something else (a key, or every key under a "prefix."). The
# CPU and thread count are the device on a CPU profile; on a CUDA profile the GPU is, and the host CPU
# only warns. The runtime (library, version, thread and execution settings) is the device's software.
IDENTITY_COMMON = ("fingerprint_version", "kind", "backend", "precision", "runtime.")
IDENTITY_CPU = ("cpu_model", "threads", "cpu.vendor", "cpu.family", "cpu.model", "cpu.stepping", "cpu.flags_digest",
                "cpu.cache.")
IDENTITY_CUDA = ("gpu_name", "sm_count", "mig_mode")  # a MIG slice has fewer SMs than its GPU
# Sampled at the moment of fingerprinting (an idle GPU clocks down): recorded, never compared.
VOLATILE = ("sm_clock_mhz", "mem_clock_mhz", "gpu_temperature_c", "nvml_error")


def cpu_model() -> str:
    """The CPU's marketing name: /proc/cpuinfo 'model name' on Linux, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def library_versions() -> dict[str, str]:
    """Versions of the runtimes that shape a measurement; a library that is absent is left out."""
    versions: dict[str, str] = {}
    for name in LIBRARIES:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a broken optional install must not stop a CPU profile
            continue
        version = getattr(module, "__version__", None)
        if isinstance(version, str):  # the tensorrt type stubs import as an empty namespace
            versions[name] = version
    return versions


def _cpus_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def runtime_settings(profile: DeviceProfile, libraries: Mapping[str, str]) -> dict[str, Any]:
    """The runtime a profile times with, its version and the settings that change its speed.

    What `exporters.onnx.ort_session` and the torch backends set up (`hwnas.latency.backends`): a
    change here changes every number of a table, so all of it is identity.
    """
    if profile.backend == "onnxruntime-cpu":
        ort_settings: dict[str, Any] = {
            "library": "onnxruntime", "version": libraries.get("onnxruntime"), "intra_op_threads": profile.threads,
            "inter_op_threads": 1, "execution_mode": "sequential", "graph_optimization": "all",
            "provider": "CPUExecutionProvider"}
        if profile.precision == "int8":  # what decides the quantized kernels (fp32 tables keep their settings)
            from exporters.onnx_int8 import DEFAULT_SETTINGS

            ort_settings["quantization"] = DEFAULT_SETTINGS.graph_settings()
        return ort_settings
    if profile.backend == "tensorrt":
        return {"library": "tensorrt", "version": libraries.get("tensorrt"), "precision": profile.precision}
    settings: dict[str, Any] = {"library": "torch", "version": libraries.get("torch"),
                                "channels_last": profile.channels_last}
    if profile.is_cuda:
        settings.update(cuda_graph=profile.backend == "torch-cuda-graph", cudnn_benchmark=False)
    else:
        settings.update(intra_op_threads=profile.threads, mode="inference_mode")
    return settings


def fingerprint(profile: DeviceProfile) -> dict[str, Any]:
    """Describe this machine as `profile` would measure it: JSON-ready (see the module doc).

    A CUDA profile on a machine where torch sees no GPU is an error; NVML trouble on a machine that
    has one leaves the NVML fields out (with `nvml_error` saying why) rather than failing.
    """
    from hwnas.latency.cpuinfo import cpu_identity

    libraries = library_versions()
    fp: dict[str, Any] = {
        "fingerprint_version": FINGERPRINT_VERSION,
        "kind": "cuda" if profile.is_cuda else "cpu",
        "backend": profile.backend,
        "precision": profile.precision,
        "threads": profile.threads,
        "runtime": runtime_settings(profile, libraries),
        "cpu_model": cpu_model(),
        "cpu": cpu_identity(),
        "cpu_count": os.cpu_count() or 1,
        "cpus_available": _cpus_available(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "libraries": libraries,
    }
    if profile.is_cuda:
        fp.update(_cuda_fingerprint(profile))
    return fp


def require_cuda(profile: DeviceProfile) -> int:
    """The torch index of the profile's GPU, or a one-line error saying why there is none."""
    import torch

    if not torch.cuda.is_available():
        built = f"torch {torch.__version__}" + (f" built for CUDA {torch.version.cuda}" if torch.version.cuda
                                                 else " built without CUDA")
        raise HwnasError(f"{profile.where}: backend {profile.backend} needs a CUDA GPU, but torch sees none "
                         f"({built}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    index = int(profile.device.split(":")[1]) if ":" in profile.device else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ProfileError(f"{profile.where}: field 'device': {profile.device} does not exist here "
                           f"({torch.cuda.device_count()} GPU(s) visible)")
    return index


def _cuda_fingerprint(profile: DeviceProfile) -> dict[str, Any]:
    import torch

    index = require_cuda(profile)
    props = torch.cuda.get_device_properties(index)
    info: dict[str, Any] = {
        "gpu_name": props.name,
        "gpu_memory_mib": int(props.total_memory) // (1 << 20),
        "compute_capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "gpus_visible": torch.cuda.device_count(),
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    info.update(_nvml_info(props, index))
    return info


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_info(props: Any, index: int) -> dict[str, Any]:
    """Driver, clocks, power limit and MIG mode of the GPU torch calls `props`, through NVML."""
    try:
        import pynvml
    except Exception as exc:  # noqa: BLE001 - no NVML bindings: record why and go on
        return {"nvml_error": f"pynvml not importable ({exc})"}
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001
        return {"nvml_error": f"NVML init failed ({exc})"}
    try:
        handle = _nvml_handle(pynvml, props, index)
        info: dict[str, Any] = {
            "gpu_count": pynvml.nvmlDeviceGetCount(),
            "driver": _text(pynvml.nvmlSystemGetDriverVersion()),
        }
        probes: dict[str, Any] = {
            "cuda_driver_version": lambda: _cuda_version(pynvml.nvmlSystemGetCudaDriverVersion()),
            "sm_clock_max_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "mem_clock_max_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "sm_clock_app_mhz": lambda: pynvml.nvmlDeviceGetApplicationsClock(handle, pynvml.NVML_CLOCK_SM),
            "power_limit_w": lambda: round(pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0, 1),
            "mig_mode": lambda: "enabled" if pynvml.nvmlDeviceGetMigMode(handle)[0] else "disabled",
            "persistence_mode": lambda: "enabled" if pynvml.nvmlDeviceGetPersistenceMode(handle) else "disabled",
            "gpu_temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
        }
        for key, probe in probes.items():
            try:
                info[key] = probe()
            except Exception:  # noqa: BLE001 - unsupported on this GPU (e.g. MIG mode on a GeForce)
                continue
        return info
    except Exception as exc:  # noqa: BLE001
        return {"nvml_error": f"NVML query failed ({exc})"}
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def _nvml_handle(pynvml: Any, props: Any, index: int) -> Any:
    """NVML's handle of the same physical GPU: by PCI address, which survives CUDA_VISIBLE_DEVICES."""
    attempts = []
    if all(hasattr(props, a) for a in ("pci_domain_id", "pci_bus_id", "pci_device_id")):
        bus_id = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
        attempts.append(lambda: pynvml.nvmlDeviceGetHandleByPciBusId(bus_id))
    if getattr(props, "uuid", None) is not None:
        attempts.append(lambda: pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{props.uuid}"))
    for attempt in attempts:
        try:
            return attempt()
        except Exception:  # noqa: BLE001
            continue
    if "CUDA_VISIBLE_DEVICES" not in os.environ:
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    if pynvml.nvmlDeviceGetCount() == 1:
        return pynvml.nvmlDeviceGetHandleByIndex(0)
    raise RuntimeError("cannot tell which NVML device torch is using")


def _cuda_version(code: int) -> str:
    """NVML gives 12040 for CUDA 12.4."""
    return f"{code // 1000}.{(code % 1000) // 10}"


def check_expectations(profile: DeviceProfile, fp: Mapping[str, Any]) -> None:
    """Refuse to measure a profile on a device it does not expect (substring, case-insensitive)."""
    for key, wanted in profile.expect.items():
        have = fp.get(key)
        if have is None or wanted.lower() not in str(have).lower():
            raise ProfileError(f"{profile.where}: field 'expect.{key}': expects '{wanted}', "
                               f"this device has {str(have)!r}")


_NOISE = re.compile(r"\((r|tm|c)\)|\bcpu\b|\bprocessor\b|@.*$|\bwith\b.*$", re.IGNORECASE)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(fp: Mapping[str, Any]) -> str:
    """A stable, file-name-safe name of the device: the GPU on CUDA, else the CPU and its threads.

    Only identity fields go in, so the same device gives the same slug after a driver update.
    """
    if fp.get("kind") == "cuda" or fp.get("gpu_name"):
        slug = _slug(str(fp.get("gpu_name") or "unknown-gpu"))
        if fp.get("mig_mode") == "enabled":
            slug += f"-mig-{int(fp.get('sm_count') or 0)}sm"
    else:
        model = _slug(_NOISE.sub(" ", str(fp.get("cpu_model") or "unknown"))) or "unknown"
        cpu: Mapping[str, Any] = fp["cpu"] if isinstance(fp.get("cpu"), Mapping) else {}
        if cpu.get("family") is not None and cpu.get("model") is not None:  # one name, several generations
            model += f"-f{int(cpu['family'])}m{int(cpu['model'])}"
        slug = f"cpu-{model}-{int(fp.get('threads') or 0)}t"
    return slug[:80].strip("-") or "unknown-device"


def _identity_fields(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[str, ...]:
    cuda = recorded.get("kind") == "cuda" or current.get("kind") == "cuda"
    return IDENTITY_COMMON + (IDENTITY_CUDA if cuda else IDENTITY_CPU)


def _is_identity(key: str, fields: tuple[str, ...]) -> bool:
    return any(key == f or (f.endswith(".") and key.startswith(f)) for f in fields)


def _flatten(fp: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in fp.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _show(value: Any) -> str:
    return "(absent)" if value is None else str(value)


def fingerprint_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(identity, soft) differences, each a line "field: recorded X, here Y".

    Identity differences mean another device or way of measuring (a table must be refused); soft
    ones (driver, library versions, clocks, power limit, host details) deserve a warning only.
    """
    fields = _identity_fields(recorded, current)
    rec, cur = _flatten(recorded), _flatten(current)
    identity: list[str] = []
    soft: list[str] = []
    if rec.get("fingerprint_version") != cur.get("fingerprint_version"):
        identity.append(f"fingerprint_version: recorded {_show(rec.get('fingerprint_version'))}, here "
                        f"{_show(cur.get('fingerprint_version'))} (a fingerprint before version {FINGERPRINT_VERSION} "
                        "cannot tell CPUs of one name apart: profile this device again)")
    for key in sorted(set(rec) | set(cur)):
        if key in VOLATILE or key == "fingerprint_version" or rec.get(key) == cur.get(key):
            continue
        line = f"{key}: recorded {_show(rec.get(key))}, here {_show(cur.get(key))}"
        (identity if _is_identity(key, fields) else soft).append(line)
    return identity, soft


def describe(fp: Mapping[str, Any]) -> str:
    """One line for logs and reports."""
    libs = ", ".join(f"{k} {v}" for k, v in sorted(dict(fp.get("libraries") or {}).items()))
    if fp.get("kind") == "cuda":
        head = (f"{fp.get('gpu_name')} (driver {fp.get('driver', '?')}, CUDA {fp.get('torch_cuda', '?')}, "
                f"power limit {fp.get('power_limit_w', '?')} W)")
    else:
        cpu = fp["cpu"] if isinstance(fp.get("cpu"), Mapping) else {}
        generation = f", family {cpu.get('family')} model {cpu.get('model')}" if cpu else ""
        head = f"{fp.get('cpu_model')}{generation} ({fp.get('threads')} thread(s) of {fp.get('cpus_available')})"
    return f"{head}; python {fp.get('python')}; {libs}"


if __name__ == "__main__":  # pragma: no cover - `python -m hwnas.latency.device PROFILE` for a quick look
    import json

    from hwnas.latency.profiles import load_profile

    print(json.dumps(fingerprint(load_profile(sys.argv[1] if len(sys.argv) > 1 else "cpu-onnxruntime")), indent=2))
