"""The weight-sharing supernet: dynamic ops, the model, BN recalibration."""

from hwnas.supernet.bn import recalibrate_bn
from hwnas.supernet.model import Supernet

__all__ = ["Supernet", "recalibrate_bn"]
