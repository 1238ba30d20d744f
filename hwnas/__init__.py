"""hwnas: hardware-aware neural architecture search.

Profile a device, search under a latency budget, export deployable engines. The heavy parts
(`Supernet`, `LatencyTable`) are imported on first use so that `import hwnas` stays cheap.
"""

from typing import TYPE_CHECKING, Any

from hwnas import spaces
from hwnas.errors import HwnasError
from hwnas.space import Arch, BlockSpec, SearchSpace, StageSpec

if TYPE_CHECKING:
    from hwnas.latency.table import LatencyTable
    from hwnas.supernet.model import Supernet

__all__ = ["Arch", "BlockSpec", "HwnasError", "LatencyTable", "SearchSpace", "StageSpec", "Supernet", "spaces"]
__version__ = "0.1.0"

_LAZY = {"Supernet": "hwnas.supernet.model", "LatencyTable": "hwnas.latency.table"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hwnas' has no attribute {name!r}")
