"""Device profiles: how to measure latency on a device (backend, precision, batch, threads, repeats).

A profile is a small TOML file in `profiles/`; the fingerprint (`hwnas.latency.device`) records what
was actually measured. Every `DeviceProfile` is validated when it is made, so a bad value is
refused with the file and the field named before any minute of profiling is spent on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hwnas.errors import ProfileError
from hwnas.fileio import display_path

BACKENDS = ("onnxruntime-cpu", "torch-cpu", "torch-cuda", "torch-cuda-graph", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
STATISTICS = ("median", "mean", "min")

# What each runtime can actually run: an fp16 number from a backend that silently computes in fp32
# would be a lie in the table. ONNX Runtime's int8 is static QDQ quantization (exporters.onnx_int8),
# the same the exporter ships.
SUPPORTED_PRECISIONS: dict[str, tuple[str, ...]] = {
    "onnxruntime-cpu": ("fp32", "int8"),
    "torch-cpu": ("fp32",),
    "torch-cuda": ("fp32", "fp16"),
    "torch-cuda-graph": ("fp32", "fp16"),
    "tensorrt": ("fp32", "fp16", "int8"),
}
CUDA_BACKENDS = ("torch-cuda", "torch-cuda-graph", "tensorrt")
TORCH_BACKENDS = ("torch-cpu", "torch-cuda", "torch-cuda-graph")

# Fingerprint fields a profile may pin with `expect` (substring match, case-insensitive).
EXPECTABLE_CPU = ("cpu_model", "platform", "machine")
EXPECTABLE_CUDA = ("gpu_name", "driver", "cuda_driver_version", "torch_cuda", "mig_mode")

REQUIRED = ("backend", "precision", "batch_size", "threads", "warmup", "repeats")
MIN_REPEATS = 5  # fewer samples give no meaningful p10/p90

PROFILE_DIR = Path(__file__).resolve().parents[2] / "profiles"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class DeviceProfile:
    """How to measure: the runtime, number format, batch and thread count, and how many repeats.

    `threads` is the compute thread count on the CPU backends and the host thread count (recorded,
    barely relevant) on the CUDA ones. `device` is inferred from the backend when left empty.
    """

    name: str
    backend: str
    precision: str
    batch_size: int
    threads: int
    warmup: int
    repeats: int
    statistic: str = "median"
    device: str = ""
    channels_last: bool = False
    expect: dict[str, str] = field(default_factory=dict, hash=False)
    description: str = ""
    round_ms: int = 0  # > 0: a round times at most this many ms of calls (at least 10): big models cost what small do
    path: Path | None = field(default=None, compare=False)
    toml_sha256: str = field(default="", compare=False)  # of the file's bytes as read; "" when not read from one

    def __post_init__(self) -> None:
        if not self.device and isinstance(self.backend, str):
            object.__setattr__(self, "device", "cuda" if self.backend in CUDA_BACKENDS else "cpu")
        if self.path is not None and not isinstance(self.path, Path):
            object.__setattr__(self, "path", Path(self.path))
        _validate(self)

    @property
    def is_cuda(self) -> bool:
        return self.backend in CUDA_BACKENDS

    @property
    def where(self) -> str:
        """How error messages name this profile: its file if it has one."""
        return _display(self.path) if self.path is not None else f"profile '{self.name}'"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values of every field."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["expect"] = dict(self.expect)
        data["path"] = str(self.path) if self.path is not None else None
        return data

    @property
    def digest(self) -> str:
        """A hash of the settings (not of the file: comments and layout do not count), short and stable."""
        settings = {k: v for k, v in self.to_dict().items() if k not in ("path", "toml_sha256")}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def to_record(self, table_dir: str | Path | None = None) -> dict[str, Any]:
        """What a table's metadata records: the settings by value, named and hashed, never this machine's path.

        A table travels to other machines and into the repository, so the profile is identified by its
        name, the digest of its settings (`digest`) and the sha256 of the TOML file's bytes
        (`toml_sha256`: which file exactly, comments included), plus where the file lies relative to
        the repository or to the table (`recorded_file`); an absolute path would name only the
        machine that wrote it.
        """
        data = {k: v for k, v in self.to_dict().items() if k not in ("path", "toml_sha256")}
        data["digest"] = self.digest
        if self.toml_sha256:
            data["toml_sha256"] = self.toml_sha256
        if self.path is not None:
            data["file"], data["file_relative_to"] = recorded_file(self.path, table_dir)
        return data


def recorded_file(path: Path, table_dir: str | Path | None = None) -> tuple[str, str]:
    """(path, what it is relative to) of a profile file as a table records it. Never absolute.

    Relative to the repository when the file lies in it; else relative to the table's folder
    `table_dir` (`<root>/<space>`) when the file lies in the folder that holds the tables' root (a
    project's `profiles/` beside its `latency_tables/`: `../../profiles/p.toml`); else only the
    file's name, since a path climbing out of the project would name this machine's layout.
    """
    here = path.resolve()
    repository = PROFILE_DIR.parent.resolve()
    if here.is_relative_to(repository):
        return here.relative_to(repository).as_posix(), "repository"
    if table_dir is not None:
        folder = Path(table_dir).resolve()
        if here.is_relative_to(folder.parent.parent):
            return Path(os.path.relpath(here, folder)).as_posix(), "table"
    return path.name, "name only"


def _display(path: Path) -> str:
    """A path relative to the working directory where it lies below it: short, and what the user typed."""
    return display_path(path)


def _fail(where: str, name: str, message: str) -> ProfileError:
    return ProfileError(f"{where}: field '{name}': {message}")


def _check_type(where: str, name: str, value: Any, kind: type) -> None:
    # TOML booleans are Python bools, and bool is an int: `batch_size = true` must not pass as 1.
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        label = {int: "an integer", str: "a string", bool: "true or false"}[kind]
        raise _fail(where, name, f"must be {label}, got {value!r}")


def _validate(p: DeviceProfile) -> None:
    where = p.where
    for name in ("name", "backend", "precision", "statistic", "device", "description"):
        _check_type(where, name, getattr(p, name), str)
    for name in ("batch_size", "threads", "warmup", "repeats", "round_ms"):
        _check_type(where, name, getattr(p, name), int)
    if p.round_ms < 0:
        raise _fail(where, "round_ms", f"must be >= 0 (0: every round times `repeats` calls), got {p.round_ms}")
    _check_type(where, "channels_last", p.channels_last, bool)

    if not _NAME.match(p.name):
        raise _fail(where, "name", f"must be letters, digits, '.', '_' or '-' (it names files), got {p.name!r}")
    if p.backend not in BACKENDS:
        raise _fail(where, "backend", f"must be one of {', '.join(BACKENDS)}, got {p.backend!r}")
    if p.precision not in PRECISIONS:
        raise _fail(where, "precision", f"must be one of {', '.join(PRECISIONS)}, got {p.precision!r}")
    supported = SUPPORTED_PRECISIONS[p.backend]
    if p.precision not in supported:
        raise _fail(where, "precision", f"backend {p.backend} supports {', '.join(supported)}, got {p.precision!r}")
    if p.batch_size < 1:
        raise _fail(where, "batch_size", f"must be an integer >= 1, got {p.batch_size}")
    if p.threads < 1:
        raise _fail(where, "threads", f"must be an integer >= 1, got {p.threads}")
    if p.warmup < 0:
        raise _fail(where, "warmup", f"must be an integer >= 0, got {p.warmup}")
    if p.repeats < MIN_REPEATS:
        raise _fail(where, "repeats", f"must be an integer >= {MIN_REPEATS}, got {p.repeats}")
    if p.statistic not in STATISTICS:
        raise _fail(where, "statistic", f"must be one of {', '.join(STATISTICS)}, got {p.statistic!r}")

    wanted = "cuda" if p.is_cuda else "cpu"
    if not (p.device == wanted or (wanted == "cuda" and re.fullmatch(r"cuda:\d+", p.device))):
        allowed = "'cuda' or 'cuda:N'" if wanted == "cuda" else "'cpu'"
        raise _fail(where, "device", f"backend {p.backend} runs on {allowed}, got {p.device!r}")
    if p.channels_last and p.backend not in TORCH_BACKENDS:
        raise _fail(where, "channels_last", f"only the torch backends use it, not {p.backend}")

    if not isinstance(p.expect, Mapping):
        raise _fail(where, "expect", f"must be a table of strings, got {p.expect!r}")
    expectable = EXPECTABLE_CUDA if p.is_cuda else EXPECTABLE_CPU
    for key, value in p.expect.items():
        if key not in expectable:
            raise _fail(where, f"expect.{key}", f"a {wanted} profile can expect {', '.join(expectable)}")
        _check_type(where, f"expect.{key}", value, str)


def search_dirs() -> list[Path]:
    """Where profile names are looked up: `./profiles` first (a user's own), then the repository's."""
    dirs = [Path.cwd() / "profiles", PROFILE_DIR]
    unique: list[Path] = []
    for d in dirs:
        if d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def profile_names() -> list[str]:
    """Names that `load_profile` resolves, from every search directory."""
    names = {p.stem for d in search_dirs() if d.is_dir() for p in d.glob("*.toml")}
    return sorted(names)


def _resolve(path_or_name: str | Path) -> Path:
    text = str(path_or_name)
    if isinstance(path_or_name, Path) or text.endswith(".toml") or os.sep in text or "/" in text:
        return Path(path_or_name)
    for d in search_dirs():
        candidate = d / f"{text}.toml"
        if candidate.is_file():
            return candidate
    known = ", ".join(profile_names()) or "none"
    raise ProfileError(f"no profile named '{text}' in {', '.join(_display(d) for d in search_dirs())} "
                       f"(known: {known}); pass a path to a .toml file")


def load_profile(path_or_name: str | Path) -> DeviceProfile:
    """Read and validate a profile from a TOML path, or a name looked up in `search_dirs()`."""
    if isinstance(path_or_name, DeviceProfile):
        return path_or_name
    path = _resolve(path_or_name)
    where = _display(path)
    try:
        raw = path.read_bytes()
        data = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ProfileError(f"{where}: no such profile file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{where}: cannot read the profile ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{where}: not valid TOML: {exc}") from None
    # the digest of the bytes parsed (not of the file read again later): what a table records as its profile's file
    return profile_from_dict(data, path, toml_sha256=hashlib.sha256(raw).hexdigest())


def profile_from_dict(data: Mapping[str, Any], path: Path | None = None, *, toml_sha256: str = "") -> DeviceProfile:
    """A validated profile from parsed TOML (or JSON) values; `name` defaults to the file's stem."""
    where = _display(path) if path is not None else "profile"
    known = {f.name for f in fields(DeviceProfile)} - {"path", "toml_sha256"}
    for key in data:
        if key not in known:
            raise _fail(where, key, f"unknown field; known fields: {', '.join(sorted(known))}")
    for key in REQUIRED:
        if key not in data:
            raise _fail(where, key, "missing (required: " + ", ".join(REQUIRED) + ")")
    kwargs = dict(data)
    if "name" not in kwargs:
        if path is None:
            raise _fail(where, "name", "missing")
        kwargs["name"] = path.stem
    if "expect" in kwargs and isinstance(kwargs["expect"], Mapping):
        kwargs["expect"] = dict(kwargs["expect"])
    return DeviceProfile(**kwargs, path=path, toml_sha256=toml_sha256)
