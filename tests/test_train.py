"""Supernet training: resumable bit for bit, DDP keeps ranks identical, guard rails keep the last good checkpoint.

Runs are tiny (a few steps of batch 8 on a few hundred Fashion-MNIST images) so the whole file
takes seconds per test on a CPU; what they check does not depend on the size.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hwnas import spaces
from hwnas.checkpoint import load_checkpoint, load_supernet
from hwnas.cli import build_parser, main
from hwnas.commands.train import DEFAULTS, config_from_args
from hwnas.data import Dataset, load_dataset
from hwnas.errors import CheckpointError
from hwnas.supernet import Supernet
from hwnas.train import (
    LOG_COLUMNS,
    Callback,
    CosineSchedule,
    StepInfo,
    TrainConfig,
    TrainingError,
    TrainingInterrupted,
    make_optimizer,
    train_supernet,
)

SPACE = spaces.get("mbv3-32")
ROOT = Path(__file__).resolve().parent.parent
TIMING = ("images_per_s", "seconds")


@pytest.fixture(scope="module")
def tiny() -> Dataset:
    dataset = load_dataset("fashion-mnist", val_size=64)
    return dataclasses.replace(dataset, train=dataset.train.subset(160, seed=0))


def tiny_config(**overrides: object) -> TrainConfig:
    base = dict(epochs=2, batch_size=8, steps_per_epoch=3, num_sampled=1, lr=0.05, warmup_epochs=0.5,
                bn_batches=1, eval_batch_size=64, device="cpu", log_every=2, collapse_drop=None)
    base.update(overrides)
    return TrainConfig(**base)  # type: ignore[arg-type]


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors that differ in any bit."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


class SigtermAt(Callback):
    """Sends this process a real SIGTERM after optimizer step `step` (0-based)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, info: StepInfo) -> None:
        if info.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class Killed(Exception):
    pass


class DieAfterEpoch(Callback):
    """Stands for a SIGKILL after the epoch's checkpoint is on disk: nothing after it runs."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, info: StepInfo, row: dict[str, float]) -> None:
        if row["epoch"] == self.epoch:
            raise Killed


class NanAt(Callback):
    def __init__(self, step: int, role: str) -> None:
        self.step, self.role = step, role

    def on_loss(self, info: StepInfo, role: str, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if (info.step, role) == (self.step, self.role) else loss


@pytest.mark.parametrize(("sampler", "interrupt"), [
    ("uniform", SigtermAt(step=3)),  # epoch 2, after its first step: a mid-epoch checkpoint
    ("attentive-best", DieAfterEpoch(epoch=1)),  # the attentive sampler's RNG and score path too
])
def test_interrupted_and_resumed_run_is_bit_identical_to_an_uninterrupted_one(
        tmp_path: Path, tiny: Dataset, sampler: str, interrupt: Callback) -> None:
    """CPU kernels are deterministic at a fixed thread count, and every source of randomness
    (weights, data order and augmentation, sampled subnets, dropout) is restored, so equal means equal."""
    config = tiny_config(sampler=sampler)
    reference = load_checkpoint(train_supernet(SPACE, tiny, config, tmp_path / "a", progress=False))

    with pytest.raises((TrainingInterrupted, Killed)) as stopped:
        train_supernet(SPACE, tiny, config, tmp_path / "b", callbacks=[interrupt], progress=False)
    partial = load_checkpoint(tmp_path / "b" / "supernet.pt")
    if isinstance(stopped.value, TrainingInterrupted):
        assert (partial["epoch"], partial["step_in_epoch"]) == (1, 1) == (stopped.value.epoch,
                                                                          stopped.value.step_in_epoch)
        assert "continue with --resume" in str(stopped.value)
    else:
        assert (partial["epoch"], partial["step_in_epoch"]) == (1, 0)
    assert not partial["complete"] and partial["optimizer"] is not None

    resumed = load_checkpoint(train_supernet(SPACE, tiny, config, tmp_path / "b", resume=True, progress=False))
    assert resumed["epoch"] == 2 and resumed["complete"]
    assert same_weights(reference["model"], resumed["model"]) == []
    assert without_timing(resumed["history"]) == without_timing(reference["history"])
    assert not same_weights(reference["model"], partial["model"]) == []  # training did move the weights


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path: Path, tiny: Dataset) -> None:
    saved: dict[int, bytes] = {}

    class Snapshot(Callback):
        def on_epoch_end(self, info: StepInfo, row: dict[str, float]) -> None:
            saved[info.epoch] = (tmp_path / "supernet.pt").read_bytes()

    config = tiny_config(epochs=3, log_every=1)
    kept = rf"the last good checkpoint {tmp_path / 'supernet.pt'} \(epoch 1\) is kept"
    expected = rf"non-finite loss of the smallest subnet\(s\) in epoch 2 by step 2; {kept}"
    with pytest.raises(TrainingError, match=expected):
        train_supernet(SPACE, tiny, config, tmp_path, callbacks=[Snapshot(), NanAt(step=4, role="smallest")],
                       progress=False)
    assert list(saved) == [1]
    assert (tmp_path / "supernet.pt").read_bytes() == saved[1]  # not overwritten by the bad state
    net, state = load_supernet(tmp_path / "supernet.pt", space_name="mbv3-32")
    assert state["epoch"] == 1 and all(torch.isfinite(p).all() for p in net.parameters())


def test_accuracy_collapse_stops_training_and_keeps_the_last_good_checkpoint(tmp_path: Path,
                                                                             tiny: Dataset) -> None:
    """A classifier scribbled to answer a class absent from validation drives accuracy to 0."""
    absent = 9
    val = tiny.val.select(torch.nonzero(tiny.val.labels != absent).flatten())
    dataset = dataclasses.replace(tiny, val=val)

    class Scribble(Callback):
        def on_step_end(self, info: StepInfo) -> None:
            if info.epoch == 1:
                classifier = info.model.head.classifier
                assert isinstance(classifier, torch.nn.Linear)
                with torch.no_grad():
                    classifier.weight.zero_()
                    classifier.bias.copy_(torch.nn.functional.one_hot(torch.tensor(absent), 10).float())

    with pytest.raises(TrainingError, match=r"accuracy collapse in epoch 2: .*fell .* \(0.00 %"):
        train_supernet(SPACE, dataset, tiny_config(collapse_drop=1.0), tmp_path, callbacks=[Scribble()],
                       progress=False)
    state = load_checkpoint(tmp_path / "supernet.pt")
    assert state["epoch"] == 1 and state["history"][0]["val_acc_largest"] > 1.0


@pytest.fixture(scope="module")
def half_trained(tiny: Dataset, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The checkpoint of a run killed after its first of two epochs."""
    out = tmp_path_factory.mktemp("half")
    with pytest.raises(Killed):
        train_supernet(SPACE, tiny, tiny_config(), out, callbacks=[DieAfterEpoch(epoch=1)], progress=False)
    return torch.load(out / "supernet.pt", weights_only=False)


@pytest.mark.parametrize("field, damage", [
    ("sampler_rng", None), ("optimizer", {"state": {}, "param_groups": []}), ("history", 5),
    ("model", {"stem.0.weight": torch.zeros(1)}), ("epoch_progress", {"sums": torch.zeros(5)}),
])
def test_resuming_a_damaged_checkpoint_names_the_file_and_the_field(tmp_path: Path, tiny: Dataset, half_trained: dict,
                                                                    field: str, damage: object) -> None:
    path = tmp_path / "supernet.pt"
    torch.save({**half_trained, field: damage}, path)
    with pytest.raises(CheckpointError, match=rf"{path}: cannot resume from this checkpoint: field '{field}' \("):
        train_supernet(SPACE, tiny, tiny_config(), tmp_path, resume=True, progress=False)


def test_resume_refuses_other_settings_and_fresh_runs_refuse_to_overwrite(tmp_path: Path, tiny: Dataset) -> None:
    config = tiny_config(epochs=1, steps_per_epoch=1, num_sampled=0)
    path = train_supernet(SPACE, tiny, config, tmp_path, progress=False)
    with pytest.raises(TrainingError, match="supernet.pt exists: pass --resume"):
        train_supernet(SPACE, tiny, config, tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"train_config.momentum is 0.9 in the checkpoint, 0.5 now"):
        train_supernet(SPACE, tiny, dataclasses.replace(config, momentum=0.5), tmp_path, resume=True, progress=False)
    # --lr, --grad-clip and --no-collapse-check may change: they continue a collapsed run (tests/test_train_faults.py)
    other = spaces.get("mbv3-224", in_channels=1, num_classes=10)
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} was trained on space 'mbv3-32', not 'mbv3-224'"):
        train_supernet(other, tiny, config, tmp_path, resume=True, progress=False)
    before = path.read_bytes()
    assert train_supernet(SPACE, tiny, config, tmp_path, resume=True, progress=False) == path  # complete: no-op
    assert path.read_bytes() == before


def test_two_gloo_ranks_under_torchrun_end_with_identical_weights(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "tests" / "_ddp_worker.py"), str(tmp_path)]
    # its own session, so that a hang can be ended with the workers, not only torchrun
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in 180 s:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2 and rank0["steps"] == 3
    assert same_weights(rank0["model"], rank1["model"]) == []
    saved = load_checkpoint(tmp_path / "supernet.pt")  # written by rank 0 alone, and the same weights
    assert saved["world_size"] == 2 and same_weights(saved["model"], rank0["model"]) == []
    torch.manual_seed(0)
    fresh = Supernet(SPACE).state_dict()
    assert same_weights(fresh, rank0["model"])  # the weights did train


def test_cli_trains_writes_checkpoint_and_log_and_says_where(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    code = main(["train", "--space", "mbv3-32", "--epochs", "1", "--batch-size", "8", "--steps-per-epoch", "2",
                 "--num-sampled", "0", "--train-subset", "64", "--val-size", "64", "--bn-batches", "1",
                 "--device", "cpu", "--out", str(out), "--quiet"])
    printed, err = capsys.readouterr()
    assert code == 0 and "--warmup-epochs 2 covers all 1 epoch(s)" in err  # the default warm-up, one epoch
    assert f"wrote {out / 'supernet.pt'}" in printed and f"log:    {out / 'train_log.csv'}" in printed
    lines = (out / "train_log.csv").read_text().splitlines()
    assert lines[0].split(",") == list(LOG_COLUMNS) and len(lines) == 2
    net, state = load_supernet(out / "supernet.pt")
    assert state["optimizer"] is None and state["dataset"].startswith("fashion-mnist (train subset 64")
    assert main(["train", "--space", "mbv3-32", "--out", str(out), "--epochs", "0"]) == 2  # HwnasError: one line
    assert "epochs must be >= 1" in capsys.readouterr().err


def test_cli_defaults_are_the_train_config_defaults_and_help_has_an_example(capsys: pytest.CaptureFixture) -> None:
    args = build_parser().parse_args(["train", "--space", "mbv3-32", "--out", "x"])
    assert config_from_args(args) == TrainConfig()
    assert set(DEFAULTS) <= {f.name for f in dataclasses.fields(TrainConfig)}
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "hwnas train --space mbv3-32 --data fashion-mnist --epochs 40" in capsys.readouterr().out


def test_time_budget_caps_epochs_and_a_resume_keeps_the_planned_epochs(tmp_path: Path, tiny: Dataset,
                                                                       capsys: pytest.CaptureFixture) -> None:
    config = tiny_config(epochs=5, steps_per_epoch=2, num_sampled=0)
    path = train_supernet(SPACE, tiny, config, tmp_path, progress=False, time_budget=1.0)  # fits no epoch: 1
    assert "s time budget; training one anyway" in capsys.readouterr().err
    state = load_checkpoint(path)
    assert state["train_config"]["epochs"] == 1 and len(state["history"]) == 1 and state["complete"]
    before = path.read_bytes()
    assert train_supernet(SPACE, tiny, config, tmp_path, resume=True, progress=False, time_budget=1e6) == path
    assert path.read_bytes() == before  # planned 1 epoch, complete: a resume with a larger budget adds none
    roomy = train_supernet(SPACE, tiny, tiny_config(epochs=2, steps_per_epoch=1, num_sampled=0), tmp_path / "b",
                           progress=False, time_budget=1e6)
    assert load_checkpoint(roomy)["train_config"]["epochs"] == 2  # --epochs stays the cap


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_the_floor() -> None:
    schedule = CosineSchedule(0.4, total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert schedule.lr(0) == pytest.approx(0.04) and schedule.lr(9) == pytest.approx(0.4)
    assert schedule.lr(60) == pytest.approx(0.4 * (0.1 + 0.9 * 0.5))
    assert schedule.lr(109) == pytest.approx(0.04, rel=5e-3) and schedule.lr(500) == pytest.approx(0.04)
    lrs = [schedule.lr(s) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_weight_decay_skips_batchnorm_biases_and_kernel_transforms() -> None:
    net = Supernet(SPACE, kernel_transform=True)
    decay, no_decay = make_optimizer(net, TrainConfig()).param_groups
    assert decay["weight_decay"] == TrainConfig().weight_decay and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    for name, p in net.named_parameters():
        expected = p.ndim > 1 and "transforms" not in name
        assert (id(p) in decayed) == expected, name
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp_dtype", ["bf16", "fp16"])
def test_cuda_training_with_autocast_and_channels_last_trains_and_resumes(tmp_path: Path, tiny: Dataset,
                                                                          amp_dtype: str) -> None:
    """The CUDA path: data on the GPU, autocast (fp16 adds the gradient scaler), NHWC, SIGTERM and resume.

    GPU kernels (atomics in depthwise and index backward passes) are not bit-deterministic, so the
    resumed run is compared with the uninterrupted one to a tolerance, not bit for bit.
    """
    config = tiny_config(device="cuda", amp_dtype=amp_dtype, log_every=1)
    reference = load_checkpoint(train_supernet(SPACE, tiny, config, tmp_path / "a", progress=False))
    with pytest.raises(TrainingInterrupted):
        train_supernet(SPACE, tiny, config, tmp_path / "b", callbacks=[SigtermAt(step=3)], progress=False)
    resumed = load_checkpoint(train_supernet(SPACE, tiny, config, tmp_path / "b", resume=True, progress=False))
    assert resumed["complete"] and len(resumed["history"]) == 2
    for name, tensor in reference["model"].items():
        assert torch.isfinite(tensor.float()).all(), name
        assert torch.allclose(tensor.float(), resumed["model"][name].float(), rtol=1e-2, atol=1e-3), name
    net, _ = load_supernet(tmp_path / "b" / "supernet.pt", map_location="cuda")
    x = torch.randn(2, *SPACE.input_shape(SPACE.largest()), device="cuda")
    assert net.set_active(SPACE.largest())(x).shape == (2, 10)
