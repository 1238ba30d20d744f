"""hwnas: hardware-aware neural architecture search.

Profile a device, search under a latency budget, export deployable engines.
"""

from hwnas import spaces
from hwnas.errors import HwnasError
from hwnas.space import Arch, BlockSpec, SearchSpace, StageSpec

__all__ = ["Arch", "BlockSpec", "HwnasError", "SearchSpace", "StageSpec", "spaces"]
__version__ = "0.1.0"
