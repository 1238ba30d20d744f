"""Device profiles: every committed profile loads, and each bad field is refused naming file and field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hwnas.errors import HwnasError, ProfileError
from hwnas.latency.profiles import (
    BACKENDS,
    PROFILE_DIR,
    DeviceProfile,
    load_profile,
    profile_from_dict,
    profile_names,
)

GOOD = """\
name = "x"
backend = "onnxruntime-cpu"
precision = "fp32"
batch_size = 1
threads = 1
warmup = 2
repeats = 10
"""

COMMITTED = sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.toml"
    path.write_text(text)
    return path


def replace(field: str, value: str) -> str:
    """GOOD with one field's value replaced (or added, if GOOD lacks it)."""
    line = re.compile(rf"^{field} = .*$", re.MULTILINE)
    return line.sub(f"{field} = {value}", GOOD) if line.search(GOOD) else GOOD + f"{field} = {value}\n"


def test_the_promised_profiles_are_committed() -> None:
    wanted = {"cpu-onnxruntime", "cpu-torch", "cuda-torch-fp16", "cuda-torch-fp16-b64", "cuda-torch-graph",
              "cuda-torch-graph-b64", "cuda-tensorrt-fp16"}
    assert wanted <= set(COMMITTED)
    assert wanted <= set(profile_names())


@pytest.mark.parametrize("name", COMMITTED)
def test_every_committed_profile_validates_and_round_trips(name: str) -> None:
    profile = load_profile(name)
    assert profile.path is not None
    assert profile.name == name == profile.path.stem
    assert profile.backend in BACKENDS
    assert profile.device == ("cuda" if profile.backend in ("torch-cuda", "torch-cuda-graph", "tensorrt") else "cpu")
    # What a latency table stores must rebuild the same profile.
    assert DeviceProfile(**profile.to_dict()) == profile
    assert load_profile(profile.path) == profile


def test_batch_sizes_of_the_b64_profiles() -> None:
    assert load_profile("cuda-torch-fp16-b64").batch_size == 64
    assert load_profile("cuda-torch-graph-b64").batch_size == 64
    assert load_profile("cuda-torch-graph").backend == "torch-cuda-graph"
    assert load_profile("cuda-torch-fp16").precision == "fp16"


def test_name_defaults_to_the_file_stem_and_device_is_inferred(tmp_path: Path) -> None:
    path = tmp_path / "my-cpu.toml"
    path.write_text(GOOD.replace('name = "x"\n', ""))
    profile = load_profile(path)
    assert profile.name == "my-cpu" and profile.device == "cpu" and profile.statistic == "median"


def test_a_name_is_found_in_the_working_directory_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "cpu-torch.toml").write_text(replace("repeats", "7").replace('"x"', '"cpu-torch"'))
    monkeypatch.chdir(tmp_path)
    assert load_profile("cpu-torch").repeats == 7
    assert load_profile("cpu-onnxruntime").path == PROFILE_DIR / "cpu-onnxruntime.toml"


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ProfileError, match=r"no profile named 'nope'.*cpu-onnxruntime"):
        load_profile("nope")


BAD_FIELDS = [
    ("batch_size", "0", r"field 'batch_size': must be an integer >= 1, got 0"),
    ("batch_size", "1.5", r"field 'batch_size': must be an integer, got 1.5"),
    ("batch_size", "true", r"field 'batch_size': must be an integer, got True"),
    ("threads", "0", r"field 'threads': must be an integer >= 1, got 0"),
    ("repeats", "4", r"field 'repeats': must be an integer >= 5, got 4"),
    ("warmup", "-1", r"field 'warmup': must be an integer >= 0, got -1"),
    ("backend", '"tflite"', r"field 'backend': must be one of onnxruntime-cpu, .*got 'tflite'"),
    ("precision", '"bf16"', r"field 'precision': must be one of fp32, fp16, int8, got 'bf16'"),
    ("precision", '"fp16"', r"field 'precision': backend onnxruntime-cpu supports fp32, int8, got 'fp16'"),
    ("statistic", '"p99"', r"field 'statistic': must be one of median, mean, min, got 'p99'"),
    ("device", '"cuda"', r"field 'device': backend onnxruntime-cpu runs on 'cpu', got 'cuda'"),
    ("channels_last", "true", r"field 'channels_last': only the torch backends use it"),
    ("channels_last", '"yes"', r"field 'channels_last': must be true or false"),
    ("name", '"a b"', r"field 'name': must be letters, digits"),
    ("colour", '"blue"', r"field 'colour': unknown field; known fields: .*batch_size"),
    ("expect", '{ gpu_name = "H100" }', r"field 'expect.gpu_name': a cpu profile can expect cpu_model"),
    ("expect", "{ cpu_model = 3 }", r"field 'expect.cpu_model': must be a string, got 3"),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD_FIELDS, ids=[f"{f}={v}" for f, v, _ in BAD_FIELDS])
def test_a_bad_field_is_refused_naming_file_and_field(tmp_path: Path, field: str, value: str, message: str) -> None:
    path = write(tmp_path, replace(field, value))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and "\n" not in text
    assert re.search(message, text), text


@pytest.mark.parametrize("missing", ["backend", "precision", "batch_size", "threads", "warmup", "repeats"])
def test_a_missing_required_field_is_named(tmp_path: Path, missing: str) -> None:
    text = "".join(line + "\n" for line in GOOD.splitlines() if not line.startswith(f"{missing} ="))
    with pytest.raises(ProfileError, match=rf"x\.toml: field '{missing}': missing"):
        load_profile(write(tmp_path, text))


def test_a_cuda_backend_checks_its_device_and_precision(tmp_path: Path) -> None:
    cuda = GOOD.replace("onnxruntime-cpu", "torch-cuda")
    assert load_profile(write(tmp_path, cuda)).device == "cuda"
    assert load_profile(write(tmp_path, cuda + 'device = "cuda:1"\n')).device == "cuda:1"
    with pytest.raises(ProfileError, match=r"field 'device': backend torch-cuda runs on 'cuda' or 'cuda:N', got 'cpu'"):
        load_profile(write(tmp_path, cuda + 'device = "cpu"\n'))
    with pytest.raises(ProfileError, match=r"field 'precision': backend torch-cuda supports fp32, fp16, got 'int8'"):
        load_profile(write(tmp_path, cuda.replace('"fp32"', '"int8"')))
    trt = GOOD.replace("onnxruntime-cpu", "tensorrt").replace('"fp32"', '"int8"')
    assert load_profile(write(tmp_path, trt + '[expect]\ngpu_name = "H100"\n')).expect == {"gpu_name": "H100"}


def test_a_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "repeats == 3\n")
    with pytest.raises(ProfileError, match=rf"{re.escape(str(path))}: not valid TOML: .*line 8"):
        load_profile(path)


def test_a_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"nope\.toml: no such profile file"):
        load_profile(tmp_path / "nope.toml")


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ProfileError, match=r"profile 'p': field 'repeats': must be an integer >= 5, got 1"):
        DeviceProfile("p", "torch-cpu", "fp32", batch_size=1, threads=1, warmup=0, repeats=1)
    with pytest.raises(HwnasError, match=r"field 'name': missing"):
        profile_from_dict({"backend": "torch-cpu", "precision": "fp32", "batch_size": 1, "threads": 1,
                           "warmup": 0, "repeats": 5})


def test_profiles_are_hashable_and_compare_by_value() -> None:
    a = DeviceProfile("p", "torch-cuda", "fp16", 1, 1, 0, 5, expect={"gpu_name": "H100"})
    b = DeviceProfile("p", "torch-cuda", "fp16", 1, 1, 0, 5, expect={"gpu_name": "H100"})
    assert a == b and hash(a) == hash(b) and a.device == "cuda"
    assert a != DeviceProfile("p", "torch-cuda", "fp16", 1, 1, 0, 5)
