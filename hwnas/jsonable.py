"""Values as a JSON round trip gives them back, so that what hwnas writes and what it compares agree.

Latency-table metadata is compared field by field with what is measured now (space spec, profile,
fingerprint), so it must hold what `json.loads` would return: lists for tuples, strings for paths,
plain numbers for numpy scalars. Search reports go to readers other than Python, which reject NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np


def jsonable(value: Any, *, nonfinite_as_null: bool = False) -> Any:
    """Tuples become lists, Paths strings, dataclasses dicts, numpy scalars Python ones; with
    `nonfinite_as_null`, NaN and infinities become null (strict JSON)."""
    if is_dataclass(value) and not isinstance(value, type):
        value = value.to_dict() if hasattr(value, "to_dict") else {f.name: getattr(value, f.name)
                                                                   for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, nonfinite_as_null=nonfinite_as_null) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, nonfinite_as_null=nonfinite_as_null) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        value = value.item()
    if nonfinite_as_null and isinstance(value, float) and not math.isfinite(value):
        return None
    return value
