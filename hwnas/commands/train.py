"""`hwnas train`: train a weight-sharing supernet with the sandwich rule (also under torchrun)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hwnas.recipe import TrainConfig

EXAMPLE = """examples:
  hwnas train --space mbv3-32 --data fashion-mnist --epochs 40 --out runs/fmnist
  hwnas train --space mbv3-32 --data 'imagefolder:data/parts?size=32' --out runs/parts   # your own 32 px images
  hwnas train --space mbv3-32 --epochs 40 --out runs/fmnist --resume          # after a kill or SIGTERM
  hwnas train --space mbv3-32 --epochs 40 --out runs/fmnist --resume --lr 0.125   # after a collapse
  hwnas train --space mbv3-32 --epochs 2 --train-subset 2048 --out runs/smoke --device cpu
  torchrun --nproc_per_node 2 -m hwnas.cli train --space mbv3-32 --epochs 40 --out runs/ddp

Your own images: imagefolder:DIR reads DIR/train/<class>/*.png|jpg (at least two classes) and
  - DIR/val and DIR/test: validation and test as given (--val-size is ignored);
  - DIR/val only: DIR/val is the TEST split; validation is --val-size images held out of DIR/train;
  - neither: test and validation are both --val-size images held out of DIR/train (seeded, disjoint).
  Images are decoded at 224 px unless ?size=N says otherwise (quote the spec in a shell): for mbv3-32,
  'imagefolder:DIR?size=32'. ?crop=0.875 resizes to size / 0.875 and keeps the centre (ImageNet's).
A batch larger than the training split is cut to the split's size (said in one line).

Writes OUT/supernet.pt (atomically, every epoch and on SIGTERM), OUT/train_log.csv (per epoch:
loss, validation accuracy of the largest and smallest subnet after BN re-estimation, lr, images/s)
and OUT/train_config.json. --resume continues the same trajectory; it needs the same settings,
except --lr, --grad-clip and --no-collapse-check, which may change to continue a run stopped by a
collapse or a non-finite loss from its last good checkpoint (the error says with what).
"""

# Defaults mirror hwnas.recipe.TrainConfig (tests/test_train.py checks that they agree); they are
# spelled out here so that 'hwnas --help' does not import torch.
DEFAULTS = {
    "epochs": 40, "batch_size": 512, "lr": 0.25, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 2e-4,
    "warmup_epochs": 2.0, "label_smoothing": 0.1, "num_sampled": 2, "sampler": "uniform", "attentive_k": 3,
    "kd_temperature": 1.0, "kd_weight": 1.0, "seed": 0, "log_every": 20, "bn_batches": 8,
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train a weight-sharing supernet (sandwich rule, in-place distillation, resumable, DDP under torchrun)",
        description="Train a supernet of SPACE on DATA: each step the largest subnet learns the labels, the "
        "smallest and N sampled subnets learn the largest's outputs; cosine LR with warm-up; bf16 autocast on "
        "CUDA; distributed data parallel when started by torchrun (NCCL on GPUs, gloo on CPUs).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--space", required=True, help="search space name (hwnas.spaces.names())")
    add("--data", default="fashion-mnist",
        help="dataset: fashion-mnist, fashion-mnist:DIR, cifar10:DIR, imagefolder:DIR[?size=N&crop=F] "
             "(DIR/train/<class>/*.png|jpg, DIR/val, DIR/test: see below; images decoded at N px, default 224) "
             "(default: %(default)s)")
    add("--out", type=Path, required=True, help="run directory, e.g. runs/NAME")
    add("--resume", action="store_true", help="continue OUT/supernet.pt (starts fresh if there is none)")
    add("--epochs", type=int, default=DEFAULTS["epochs"], help="(default: %(default)s)")
    add("--batch-size", type=int, default=DEFAULTS["batch_size"],
        help="global batch, split over torchrun's ranks (default: %(default)s)")
    add("--lr", type=float, default=DEFAULTS["lr"], help="peak learning rate (default: %(default)s)")
    add("--optimizer", choices=("sgd", "adamw"), default=DEFAULTS["optimizer"], help="(default: %(default)s)")
    add("--momentum", type=float, default=DEFAULTS["momentum"],
        help="SGD momentum (Nesterov), AdamW beta1 (default: %(default)s)")
    add("--no-nesterov", dest="nesterov", action="store_false", help="plain momentum SGD")
    add("--weight-decay", type=float, default=DEFAULTS["weight_decay"],
        help="on conv and linear weights only (default: %(default)s)")
    add("--warmup-epochs", type=float, default=DEFAULTS["warmup_epochs"], help="(default: %(default)s)")
    add("--label-smoothing", type=float, default=DEFAULTS["label_smoothing"], help="(default: %(default)s)")
    add("--num-sampled", type=int, default=DEFAULTS["num_sampled"],
        help="subnets per step besides the largest and the smallest (default: %(default)s)")
    add("--sampler", choices=("uniform", "attentive-best", "attentive-worst"), default=DEFAULTS["sampler"],
        help="how the N subnets are drawn (default: %(default)s)")
    add("--attentive-k", type=int, default=DEFAULTS["attentive_k"],
        help="candidates per attentive choice (default: %(default)s)")
    add("--kd-temperature", type=float, default=DEFAULTS["kd_temperature"], help="(default: %(default)s)")
    add("--kd-weight", type=float, default=DEFAULTS["kd_weight"],
        help="students: weight of distillation vs labels (default: %(default)s)")
    add("--no-augment", dest="augment", action="store_false", help="no random crop and flip")
    add("--grad-clip", type=float, default=None, help="max gradient norm (default: no clipping)")
    add("--no-amp", dest="amp", action="store_false", help="no autocast on CUDA")
    add("--amp-dtype", choices=("bf16", "fp16"), default="bf16", help="autocast dtype on CUDA (default: %(default)s)")
    add("--no-channels-last", dest="channels_last", action="store_false", help="NCHW instead of NHWC")
    add("--kernel-transform", action="store_true", help="OFA's learned kernel transforms")
    add("--seed", type=int, default=DEFAULTS["seed"], help="(default: %(default)s)")
    add("--steps-per-epoch", type=int, default=None, help="cap steps per epoch, for quick runs")
    add("--val-size", type=val_size_arg, default=None, metavar="N|F",
        help="training images held out as the validation split: a count N >= 1 or a fraction 0 < F < 1 "
             "(default: 5000 or 10 %% of the training images, whichever is smaller)")
    add("--val-batches", type=int, default=None, help="cap validation batches per epoch")
    add("--bn-batches", type=int, default=DEFAULTS["bn_batches"],
        help="training batches that re-estimate BN before each evaluation (default: %(default)s)")
    add("--train-subset", type=int, default=None, metavar="N", help="train on N random training images only")
    add("--no-collapse-check", dest="no_collapse_check", action="store_true",
        help="do not stop when validation accuracy collapses")
    add("--time-budget", type=float, default=None, metavar="SECONDS",
        help="train as many epochs (at most --epochs) as fit in SECONDS, timed on a few probe steps first, "
             "so the schedule completes; a resumed run keeps its planned epochs")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    add("--log-every", type=int, default=DEFAULTS["log_every"], help="steps between progress updates")
    add("--quiet", action="store_true", help="no progress bar (epoch lines still print)")
    parser.set_defaults(run=run)


def val_size_arg(text: str) -> int | float:
    """`--val-size`: a whole number is a count of images, anything else a fraction of the training set."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value >= 1 and value.is_integer():
        return int(value)
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"expected a count of images (such as 500) or a fraction in (0, 1) (such as "
                                     f"0.1), got '{text}'")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig that the arguments describe."""
    from hwnas.recipe import TrainConfig

    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer, momentum=args.momentum,
        nesterov=args.nesterov, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing, num_sampled=args.num_sampled, sampler=args.sampler,
        attentive_k=args.attentive_k, kd_temperature=args.kd_temperature, kd_weight=args.kd_weight,
        augment=args.augment, grad_clip=args.grad_clip, amp=args.amp, amp_dtype=args.amp_dtype,
        channels_last=args.channels_last, kernel_transform=args.kernel_transform, seed=args.seed,
        steps_per_epoch=args.steps_per_epoch, log_every=args.log_every, val_batches=args.val_batches,
        bn_batches=args.bn_batches, collapse_drop=None if args.no_collapse_check else 15.0, device=args.device)


def run(args: argparse.Namespace) -> int:
    from hwnas.train import TrainingInterrupted
    from hwnas.train_pipeline import TrainRequest, run_training

    request = TrainRequest(space=args.space, out=args.out, config=config_from_args(args), data=args.data,
                           val_size=args.val_size, train_subset=args.train_subset, resume=args.resume,
                           time_budget=args.time_budget, progress=not args.quiet)
    try:
        outcome = run_training(request, warn=lambda message: print(f"hwnas train: warning: {message}",
                                                                   file=sys.stderr),
                               log=lambda message: print(message, flush=True))
    except TrainingInterrupted as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"hwnas train: {exc}", file=sys.stderr)
        return 143
    if outcome.main:
        metrics = outcome.metrics
        accuracy = ""
        if metrics:
            accuracy = (f"; validation accuracy: largest {metrics['val_acc_largest']:.2f} %, "
                        f"smallest {metrics['val_acc_smallest']:.2f} %")
        print(f"wrote {outcome.checkpoint} (space {outcome.space}, epoch {outcome.epoch}/{outcome.epochs}{accuracy})")
        print(f"  log:    {outcome.log}")
    return 0
