"""Re-estimate BatchNorm statistics of a subnet.

A subnet cut from a supernet inherits running statistics averaged over the mixture of subnets
that training sampled, not its own: its accuracy is wrong until the statistics are re-estimated on
a few training batches with the subnet's own activations (Once-for-All, BigNAS).
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hwnas.errors import DataError


def _inputs(batch: Any) -> torch.Tensor:
    if isinstance(batch, tuple | list):
        return batch[0]
    return batch


@torch.no_grad()
def recalibrate_bn(model: nn.Module,
                   batches: Iterable[torch.Tensor] | Iterable[tuple[torch.Tensor, torch.Tensor]],
                   max_batches: int | None = None) -> nn.Module:
    """Reset every BN layer's running statistics and re-estimate them as an exact average over `batches`.

    `batches` yields inputs or (input, target) pairs, e.g. a DataLoader; inputs are moved to the
    model's device. Momentum is None during the pass (a cumulative average, so every batch counts
    the same), then restored, as is the model's training mode. On a `Supernet` this runs the active
    arch and resets the statistics of every BN layer, the inactive channels and blocks included:
    extract the subnet first when the supernet must keep its statistics. Returns `model`.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    was_training = model.training
    reference = next(model.parameters(), None)
    device = reference.device if reference is not None else None
    seen = 0
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        iterator = iter(batches) if max_batches is None else islice(batches, max_batches)
        for batch in iterator:
            x = _inputs(batch)
            model(x.to(device) if device is not None else x)
            seen += 1
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    if seen == 0:
        raise DataError("BN recalibration got no batches: the data loader is empty")
    return model
