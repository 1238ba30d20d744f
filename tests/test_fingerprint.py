"""A device identity that tells CPUs apart: one changed field of the silicon or the runtime refuses a table, by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_profiler import tiny_space

from hwnas.errors import LatencyTableError
from hwnas.latency.cpuinfo import cpu_identity
from hwnas.latency.device import FINGERPRINT_VERSION, device_slug, fingerprint, fingerprint_differences
from hwnas.latency.drift import DriftCheck
from hwnas.latency.profiles import load_profile
from hwnas.latency.table import LatencyTable

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
stepping\t: 1
microcode\t: 0x1000065
cache size\t: 512 KB
flags\t\t: fpu vme sse sse2 avx avx2 fma

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
"""


def fake_sysfs(root: Path) -> Path:
    for index, (level, kind, size) in enumerate([(1, "Data", "32K"), (1, "Instruction", "32K"), (2, "Unified", "512K"),
                                                 (3, "Unified", "32768K")]):
        d = root / "cpu0" / "cache" / f"index{index}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    (root / "cpu0" / "topology").mkdir(parents=True)
    (root / "cpu0" / "topology" / "thread_siblings_list").write_text("0-1\n")
    return root


def test_cpu_identity_reads_what_the_cpu_reports_of_itself(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text(CPUINFO)
    cpu = cpu_identity(tmp_path / "cpuinfo", fake_sysfs(tmp_path / "sys"))
    assert (cpu["vendor"], cpu["family"], cpu["model"], cpu["stepping"], cpu["microcode"]) == \
        ("AuthenticAMD", 25, 1, 1, "0x1000065")
    assert cpu["cache"] == {"L1d": "32K", "L1i": "32K", "L2": "512K", "L3": "32768K"}
    assert cpu["threads_per_core"] == 2 and cpu["flags_count"] == 7 and not cpu["avx512"]
    (tmp_path / "cpuinfo").write_text(CPUINFO.replace("fma", "fma avx512f"))
    assert cpu_identity(tmp_path / "cpuinfo", tmp_path / "sys")["flags_digest"] != cpu["flags_digest"]


def test_this_machines_fingerprint_records_silicon_runtime_and_placement() -> None:
    fp = fingerprint(load_profile("cpu-onnxruntime"))
    assert fp["fingerprint_version"] == FINGERPRINT_VERSION
    assert fp["runtime"]["library"] == "onnxruntime" and fp["runtime"]["version"] == fp["libraries"]["onnxruntime"]
    assert fp["runtime"]["intra_op_threads"] == 1 and fp["runtime"]["execution_mode"] == "sequential"
    for key in ("vendor", "family", "model", "stepping", "flags_digest", "cache", "affinity", "logical_cpus"):
        assert key in fp["cpu"], key
    assert fp["kernel"] and json.loads(json.dumps(fp)) == fp
    if fp["cpu"]["family"] is not None:  # x86 Linux: the generation is in the file name
        assert f"-f{fp['cpu']['family']}m{fp['cpu']['model']}-1t" in device_slug(fp)
    torch_fp = fingerprint(load_profile("cpu-torch"))
    assert torch_fp["runtime"]["library"] == "torch" and torch_fp["runtime"]["mode"] == "inference_mode"


def _changed(fp: dict, field: str, value: object) -> dict:
    other = json.loads(json.dumps(fp))
    node = other
    *parents, last = field.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return other


@pytest.mark.parametrize(("field", "value"), [("cpu.family", 26), ("cpu.model", 17), ("cpu.flags_digest", "0" * 16),
                                              ("cpu.cache.L2", "1024K"), ("runtime.version", "1.99.0"),
                                              ("runtime.intra_op_threads", 2), ("cpu.vendor", "GenuineIntel")])
def test_one_changed_field_of_silicon_or_runtime_refuses_the_table_naming_it(tmp_path: Path, field: str,
                                                                            value: object) -> None:
    profile = load_profile("cpu-onnxruntime")
    here = fingerprint(profile)
    space = tiny_space()
    table = LatencyTable.new(space, profile, _changed(here, field, value), "dev")
    path = table.save(tmp_path / "dev__cpu-onnxruntime.csv")
    table = LatencyTable.load(path)
    with pytest.raises(LatencyTableError) as info:
        table.check_target(space, profile, here)
    message = str(info.value)
    assert f"device {field}: recorded {value}" in message and "\n" not in message
    assert "hwnas profile --profile cpu-onnxruntime --space tiny-prof" in message and "--allow-mismatch" in message
    assert any(field in d for d in table.check_target(space, profile, here, allow_mismatch=True))


def test_microcode_kernel_and_placement_only_warn() -> None:
    here = fingerprint(load_profile("cpu-onnxruntime"))
    other = _changed(_changed(_changed(here, "cpu.microcode", "0xdead"), "kernel", "7.0.0"), "cpu.affinity", "0")
    identity, soft = fingerprint_differences(here, other)
    assert identity == [] and {line.split(":")[0] for line in soft} == {"cpu.microcode", "kernel", "cpu.affinity"}


def test_a_table_of_the_old_format_is_refused_with_advice(tmp_path: Path) -> None:
    profile = load_profile("cpu-onnxruntime")
    here = fingerprint(profile)
    old = {k: here[k] for k in ("kind", "backend", "precision", "platform", "machine", "python", "cpu_model",
                                "cpu_count", "cpus_available", "threads", "libraries")}  # what version 1 recorded
    space = tiny_space()
    path = LatencyTable.new(space, profile, old, "old").save(tmp_path / "old__cpu-onnxruntime.csv")
    with pytest.raises(LatencyTableError, match=r"fingerprint_version: recorded \(absent\), here 2 \(a fingerprint "
                                                r"before version 2 cannot tell CPUs of one name apart: profile this "
                                                r"device again\).*hwnas profile --profile cpu-onnxruntime"):
        LatencyTable.load(path).check_target(space, profile, here)


def test_a_drift_beyond_the_tolerance_says_to_profile_again() -> None:
    within = DriftCheck(factor=1.02, arch_ids=["a"], then_ms=[1.0], now_ms=[1.02], seconds=1.0, profile="p",
                        space="s")
    beyond = DriftCheck(factor=1.3, arch_ids=["a"], then_ms=[1.0], now_ms=[1.3], seconds=1.0, profile="p", space="s")
    assert within.advice == "" and "profile it again (hwnas profile --profile p --space s --no-resume)" in beyond.advice
