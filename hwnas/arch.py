"""`Arch`: one subnet of a search space, as a frozen, hashable value with a stable id and a JSON form.

Every stage of hwnas passes archs around (search results, best.json, the supernet, the latency
table, the exported model's metadata), so an arch is plain data: it knows its space by name and
its choices, and nothing of how they are built (`SearchSpace.blocks` does that).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwnas.errors import ArchError


def read_arch_json(path: str | Path) -> Any:
    """The JSON value of an arch file (an arch, or a run record holding one); one ArchError naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArchError(f"{path}: no such arch file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArchError(f"{path}: not a JSON arch file ({exc})") from None


FIELDS = ("space", "resolution", "depths", "kernels", "expands")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and value == value and abs(value) != float("inf")


# the types whose list repr is their JSON text (not bool, not numpy scalars, which print otherwise)
_PLAIN_NUMBERS = frozenset({int})


def _ints(values: Any) -> tuple[int, ...]:
    """`values` as a tuple of ints; a tuple of ints as it is (the searchers build millions of archs)."""
    if type(values) is tuple and all(type(v) is int for v in values):
        return values
    return tuple(int(v) for v in values)


@dataclass(frozen=True)
class Arch:
    """One subnet of a space.

    `kernels` and `expands` list the active blocks only (stage by stage, `sum(depths)` entries),
    so two archs that build the same network are equal and share an `arch_id`.
    """

    space: str
    resolution: int
    depths: tuple[int, ...]
    kernels: tuple[int, ...]
    expands: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", _ints(self.depths))
        object.__setattr__(self, "kernels", _ints(self.kernels))
        expands = self.expands
        if not (type(expands) is tuple and all(type(e) is int for e in expands)):  # the searchers' hot path: as is
            expands = tuple(float(e) if float(e) % 1 else int(e) for e in expands)
        object.__setattr__(self, "expands", expands)
        object.__setattr__(self, "resolution", int(self.resolution))

    @classmethod
    def of_choices(cls, space: str, resolution: int, depths: tuple[int, ...], kernels: tuple[int, ...],
                   expands: tuple[Any, ...]) -> Arch:
        """An arch from values that are already the space's choices (a gene codec's decode): no coercion, which
        is most of the cost of building the tens of thousands of archs a search proposes."""
        arch = object.__new__(cls)
        arch.__dict__.update(space=space, resolution=resolution, depths=depths, kernels=kernels, expands=expands)
        return arch

    def to_dict(self) -> dict[str, Any]:
        return {
            "space": self.space,
            "resolution": self.resolution,
            "depths": list(self.depths),
            "kernels": list(self.kernels),
            "expands": list(self.expands),
        }

    def to_json(self) -> str:
        """The canonical JSON text (sorted keys), kept once made: a search writes and hashes it for every candidate."""
        text = self.__dict__.get("_json")
        if text is None:
            if set(map(type, self.expands)) <= _PLAIN_NUMBERS:  # json.dumps's text, written directly (5x quicker)
                text = (f'{{"depths": {list(self.depths)}, "expands": {list(self.expands)}, "kernels": '
                        f'{list(self.kernels)}, "resolution": {self.resolution}, "space": {json.dumps(self.space)}}}')
            else:
                text = json.dumps(self.to_dict(), sort_keys=True)
            object.__setattr__(self, "_json", text)
        return text

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Arch:
        if not isinstance(data, Mapping):
            raise ArchError(f"an arch must be a JSON object, got {type(data).__name__}")
        missing = [f for f in FIELDS if f not in data]
        if missing:
            raise ArchError(f"arch is missing field(s): {', '.join(missing)}")
        unknown = sorted(set(data) - set(FIELDS))
        if unknown:
            raise ArchError(f"arch has unknown field(s): {', '.join(map(str, unknown))} (an arch has "
                            f"{', '.join(FIELDS)})")
        if not isinstance(data["space"], str):
            raise ArchError(f"arch field 'space' must be a string, got {data['space']!r}")
        # no coercion: 2.9 is not a depth, "28" is not a resolution and "3333" is not a list of kernels
        if not _is_int(data["resolution"]):
            raise ArchError(f"arch field 'resolution' must be a whole number, got {data['resolution']!r}")
        for name in ("depths", "kernels", "expands"):
            values = data[name]
            number = _is_number if name == "expands" else _is_int
            if not isinstance(values, (list, tuple)) or not all(number(v) for v in values):
                kind = "numbers" if name == "expands" else "whole numbers"
                raise ArchError(f"arch field '{name}' must be a list of {kind}, got {values!r}")
        return cls(space=data["space"], resolution=data["resolution"], depths=tuple(data["depths"]),
                   kernels=tuple(data["kernels"]), expands=tuple(data["expands"]))

    @classmethod
    def from_json(cls, text: str) -> Arch:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ArchError(f"arch is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str | Path) -> Arch:
        """Read an arch from a JSON file: a bare arch, or an object holding one under "arch" (best.json)."""
        path = Path(path)
        data = read_arch_json(path)
        if isinstance(data, Mapping) and "arch" in data and isinstance(data["arch"], Mapping):
            data = data["arch"]
        try:
            return cls.from_dict(data)
        except ArchError as exc:
            raise ArchError(f"{path}: {exc}") from None

    @classmethod
    def parse(cls, text_or_path: str) -> Arch:
        """An arch given on a command line: inline JSON, or the path of a JSON file."""
        if text_or_path.lstrip().startswith("{"):
            return cls.from_json(text_or_path)
        return cls.from_file(text_or_path)

    @property
    def arch_id(self) -> str:
        """A short stable id: the same arch gets the same id in every process and run."""
        found = self.__dict__.get("_id")
        if found is None:
            found = hashlib.sha1(self.to_json().encode()).hexdigest()[:12]
            object.__setattr__(self, "_id", found)
        return found

    def stage_slices(self) -> list[slice]:
        """Where each stage's blocks sit in `kernels` and `expands`."""
        slices, start = [], 0
        for depth in self.depths:
            slices.append(slice(start, start + depth))
            start += depth
        return slices
