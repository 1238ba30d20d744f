"""Run by tests/test_train.py under `torchrun --nproc_per_node 2`: a few gloo steps, then each rank's weights.

    python -m torch.distributed.run --nproc_per_node 2 tests/_ddp_worker.py OUT
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from hwnas import spaces
from hwnas.data import load_dataset
from hwnas.train import Callback, StepInfo, TrainConfig, train_supernet


class DumpWeights(Callback):
    """Every rank writes its final state_dict and what it saw, so the test can compare them."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, info: StepInfo) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in info.model.state_dict().items()}
        torch.save({"model": state, "world_size": info.world_size, "steps": info.step},
                   self.out / f"rank{info.rank}.pt")


def main(out: Path) -> None:
    dataset = load_dataset("fashion-mnist", val_size=64)
    dataset = dataclasses.replace(dataset, train=dataset.train.subset(128, seed=0))
    config = TrainConfig(epochs=1, batch_size=16, steps_per_epoch=3, num_sampled=1, lr=0.1, warmup_epochs=0,
                         bn_batches=1, eval_batch_size=64, device="cpu", log_every=1)
    train_supernet(spaces.get("mbv3-32"), dataset, config, out, callbacks=[DumpWeights(out)], progress=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
