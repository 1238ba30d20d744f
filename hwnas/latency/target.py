"""Target matching: whether a latency table was measured for the space, profile and device at hand.

A table's numbers mean something only for its own space, runtime settings and device. Differences
come in two sorts: identity ones (another space, backend, precision, batch, threads, CPU or GPU
model) make the numbers mean something else and refuse the table unless the caller allows it; soft
ones (library versions, driver, repeat counts) only say how comparable the conditions were.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hwnas.errors import LatencyTableError
from hwnas.jsonable import jsonable
from hwnas.space import SearchSpace

# Profile fields that decide what a number means; the rest (name, warm-up, repeats, notes) only how
# carefully it was measured.
PROFILE_IDENTITY_FIELDS = ("backend", "precision", "batch_size", "threads", "statistic", "device", "channels_last")
PROFILE_SOFT_FIELDS = ("name", "warmup", "repeats", "round_ms")

MISMATCH_HINT = "pass allow_mismatch=True (CLI: --allow-mismatch) to use it anyway"
# The fields of a space that fit it to a dataset: they change the stem's and the head's blocks, so a table of
# another shape lacks this space's keys and cannot be used even with allow_mismatch.
SHAPE_FIELDS = ("in_channels", "num_classes")


def profile_dict(profile: Any, table_dir: str | Path | None = None) -> dict[str, Any] | None:
    """A profile as a table's metadata records it (plain JSON values); None stays None.

    `table_dir`, the table's folder, lets a `DeviceProfile` record its file relative to the table.
    """
    if profile is None:
        return None
    record = getattr(profile, "to_record", None)
    if callable(record):
        data: dict[str, Any] = jsonable(record(table_dir) if table_dir is not None else record())
    else:
        data = jsonable(profile)
    return data


def shape_differs(meta: Mapping[str, Any], space: SearchSpace) -> bool:
    """Whether the table (metadata `meta`) was measured for `space` fitted to another dataset: another input-channel
    or class count, and nothing else of the space different (another space needs another advice)."""
    diffs = space_differences(meta.get("space") or {}, space.to_dict())
    shape = [f"space {name} " for name in SHAPE_FIELDS]
    return bool(diffs) and all(any(d.startswith(prefix) for prefix in shape) for d in diffs)


def profile_command(meta: Mapping[str, Any], space: SearchSpace) -> str:
    """The `hwnas profile` line that builds a table of `space`'s shape with the profile `meta`'s table used."""
    name = (meta.get("profile") or {}).get("name") or "PROFILE"
    return (f"hwnas profile --profile {name} --space {space.name} --in-channels {space.in_channels} "
            f"--num-classes {space.num_classes}")


def shape_advice(meta: Mapping[str, Any], space: SearchSpace) -> str:
    """What to do about a table of another shape: it holds no block of this space's stem or head, so using it
    anyway (allow_mismatch) cannot work; a table of this shape can be built."""
    return (f"its stem and head are for another input or class count: build a table of this space's shape with "
            f"`{profile_command(meta, space)}` (or --like SUPERNET.pt)")


def space_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Which fields of two space specs differ (name first): a table is only valid for its own space."""
    recorded, current = jsonable(recorded), jsonable(current)
    diffs = _diff_fields("space", recorded, current, ["name"])
    others = sorted((set(recorded) | set(current)) - {"name", "description"})
    diffs += _diff_fields("space", recorded, current, others)
    return diffs


def profile_differences(recorded: Mapping[str, Any] | None,
                        current: Mapping[str, Any] | None) -> tuple[list[str], list[str]]:
    """(identity, soft) differences between two profiles; identity ones change what a number means."""
    if recorded is None or current is None:
        return [], []
    recorded, current = jsonable(recorded), jsonable(current)
    return (_diff_fields("profile", recorded, current, PROFILE_IDENTITY_FIELDS),
            _diff_fields("profile", recorded, current, PROFILE_SOFT_FIELDS))


def target_differences(meta: Mapping[str, Any], space: SearchSpace | None = None, profile: Any = None,
                       fingerprint: Mapping[str, Any] | None = None) -> tuple[list[str], list[str]]:
    """(identity, soft) differences between what a table's metadata `meta` records and the given target."""
    identity: list[str] = []
    soft: list[str] = []
    if space is not None:
        identity += space_differences(meta["space"], space.to_dict())
    if profile is not None:
        ident, sft = profile_differences(meta.get("profile"), profile_dict(profile))
        identity += ident
        soft += sft
    if fingerprint is not None:
        from hwnas.latency.device import fingerprint_differences

        ident, sft = fingerprint_differences(dict(meta.get("fingerprint") or {}), dict(fingerprint))
        identity += [f"device {d}" for d in ident]
        soft += [f"device {d}" for d in sft]
    return identity, soft


def check_target(meta: Mapping[str, Any], space: SearchSpace | None = None, profile: Any = None,
                 fingerprint: Mapping[str, Any] | None = None, *, allow_mismatch: bool = False,
                 path: Path | None = None) -> list[str]:
    """Refuse a table (metadata `meta`, read from `path`) measured for another target; return the soft differences.

    Identity differences raise unless `allow_mismatch` (then they are returned too, first); soft
    ones come back as warnings.
    """
    identity, soft = target_differences(meta, space, profile, fingerprint)
    if identity and not allow_mismatch:
        where = f"{path}: " if path else ""
        if space is not None and shape_differs(meta, space):  # allow_mismatch cannot help: the keys differ
            raise LatencyTableError(f"{where}table was measured for another target ({'; '.join(identity)}); "
                                    f"{shape_advice(meta, space)}")
        redo = ""
        if fingerprint is not None and any(d.startswith("device ") for d in identity):
            name = (meta.get("profile") or {}).get("name") or "PROFILE"
            redo = (f"profile this device for it (hwnas profile --profile {name} --space "
                    f"{(meta.get('space') or {}).get('name', 'SPACE')}) or ")
        raise LatencyTableError(f"{where}table was measured for another target ({'; '.join(identity)}); "
                                f"{redo}{MISMATCH_HINT}")
    return identity + soft


def _diff_fields(label: str, recorded: Mapping[str, Any], current: Mapping[str, Any],
                 names: Iterable[str]) -> list[str]:
    diffs = []
    for name in names:
        a, b = recorded.get(name), current.get(name)
        if a != b:
            diffs.append(f"{label} {name} {a!r} != {b!r}")
    return diffs
