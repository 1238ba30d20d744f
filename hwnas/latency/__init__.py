"""Latency: device profiles, backends, fingerprints, profiler, lookup tables (their files, calibration and
target matching), validation.

Names are imported on first use, so that loading a table for a search does not import torch.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hwnas.latency.profiler import profile_space
    from hwnas.latency.table import LatencyTable
    from hwnas.latency.validate import ValidationReport, validate_table

__all__ = ["LatencyTable", "ValidationReport", "profile_space", "validate_table"]

_LAZY = {
    "LatencyTable": "hwnas.latency.table",
    "profile_space": "hwnas.latency.profiler",
    "validate_table": "hwnas.latency.validate",
    "ValidationReport": "hwnas.latency.validate",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hwnas.latency' has no attribute {name!r}")
