"""torch.distributed for supernet training: joining the group, and the few collectives a sandwich step needs.

Supernet training does not wrap the model in DistributedDataParallel. A sandwich step runs
several backward passes and elastic depth leaves different blocks unused from step to step, so
DDP would need `no_sync()` around all but the last backward and `find_unused_parameters=True` (a
graph traversal per step), and would then reduce gradients accumulated over subnets that its
unused-parameter bookkeeping only sees the last of. Instead every rank accumulates the step's
gradients locally and one flat all-reduce averages them before the optimizer step: the same
subnets run on every rank, so the set of parameters with a gradient is the same everywhere and
the weights stay identical (tests/test_train.py checks this under torchrun). BN statistics, which
each rank estimates on its own shard, are averaged at the end of each epoch.
RNG states are gathered into checkpoints so that a resumed run continues every rank's stream.
Each helper is a no-op in a single process, so the trainer calls them unconditionally.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as tdist
from torch import nn

from hwnas.evaluation import resolve_device
from hwnas.recipe import epoch_seed

if TYPE_CHECKING:
    from hwnas.data import Split


@dataclass
class Dist:
    """This process's place in the run: its rank, the world size, and whether it started the group
    (and so destroys it at the end) or joined one its caller had already set up."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """More than one rank: the collectives below do something."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0, the one that writes files and prints."""
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group when started by torchrun (RANK / WORLD_SIZE set): NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world <= 1:
        return Dist(), device
    if tdist.is_initialized():
        return Dist(tdist.get_rank(), tdist.get_world_size(), owns_group=False), device
    tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(tdist.get_rank(), tdist.get_world_size(), owns_group=True), device


def all_reduce(tensor: torch.Tensor, d: Dist, op: Any = None) -> torch.Tensor:
    """`tensor` reduced in place over the ranks (a sum unless `op` says otherwise), and returned."""
    if d.enabled:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM if op is None else op)
    return tensor


def average_gradients(params: Sequence[nn.Parameter], d: Dist) -> None:
    """One flat all-reduce of every existing gradient (identical sets on all ranks), then / world."""
    grads = [p.grad for p in params if p.grad is not None]
    if not d.enabled or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    tdist.all_reduce(flat)
    flat.div_(d.world)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view(g.shape))
        offset += n


def broadcast_module(model: nn.Module, d: Dist) -> None:
    """Start every rank from rank 0's parameters and buffers."""
    if d.enabled:
        with torch.no_grad():
            for tensor in (*model.parameters(), *model.buffers()):
                tdist.broadcast(tensor.data, 0)


def average_buffers(model: nn.Module, d: Dist) -> None:
    """Average BN running statistics, which each rank estimated on its own shard.

    Parameters need nothing: averaged gradients keep them identical on every rank.
    """
    if d.enabled:
        with torch.no_grad():
            for b in model.buffers():
                if b.is_floating_point():
                    tdist.all_reduce(b)
                    b.div_(d.world)


def gather_rng(device: torch.device, d: Dist) -> list[dict[str, Any]]:
    """Every rank's torch RNG states (CPU, and CUDA on a GPU), in rank order: a collective.

    Dropout draws from the global stream (augmentation has its own seeded generator), so a resumed run
    needs each rank's own stream back.
    """
    state = {"cpu": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state(device).cpu() if device.type == "cuda" else None}
    if not d.enabled:
        return [state]
    gathered: list[Any] = [None] * d.world
    tdist.all_gather_object(gathered, state)
    return gathered


def restore_rng(states: list[dict[str, Any]], device: torch.device, d: Dist) -> None:
    """Put back this rank's RNG states from `gather_rng`'s list."""
    if len(states) != d.world:  # resumed at another scale: a fresh, rank-dependent stream
        torch.manual_seed(hash((len(states), d.rank)) % (2**31))
        return
    state = states[d.rank]
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def epoch_shard(train: Split, epoch: int, seed: int, d: Dist) -> Split:
    """This rank's rows of the epoch: one global seeded permutation, dealt out rank by rank."""
    n = len(train) - len(train) % d.world
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch_seed(seed, epoch, 0)))
    return train.select(order[:n][d.rank::d.world])


__all__ = ["Dist", "all_reduce", "average_buffers", "average_gradients", "broadcast_module", "gather_rng",
           "init_distributed", "restore_rng", "epoch_shard"]
