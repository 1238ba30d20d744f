"""Faults around training: a save killed midway, a full disk, weights gone non-finite, a collapse on a small set.

Kills and write failures are real: a subprocess killed with SIGKILL in the middle of `torch.save`, and a write
refused by the kernel (a file-size limit, RLIMIT_FSIZE: the write(2) fails with EFBIG the way it fails with ENOSPC
on a full disk, on the same code path in torch's writer; a real full filesystem cannot be made without root).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_own_data import TINY, spec, write_folder

from hwnas import spaces
from hwnas.callbacks import Callback, StepInfo
from hwnas.checkpoint import load_checkpoint, load_supernet, remove_orphan_temps
from hwnas.cli import build_parser
from hwnas.commands.train import config_from_args
from hwnas.data import load_dataset
from hwnas.errors import CheckpointError
from hwnas.recipe import TrainingError, collapse_reason, noise_points
from hwnas.train import train_supernet
from hwnas.train_resume import check_resume

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "hwnas" / "checkpoints" / "mbv3-32_fashion-mnist.pt"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

SAVE_AND_STALL = """
import sys, torch
from hwnas.checkpoint import save_checkpoint

class Stall:
    '''Pickled inside torch.save, once the temporary file exists: says so, then blocks until the process is killed.'''
    def __reduce__(self):
        print("saving", flush=True)
        sys.stdin.read()
        return (int, (0,))

save_checkpoint(sys.argv[1], {"model": {"w": torch.zeros(1 << 20)}, "stall": Stall()})
"""

# a write past the limit fails with EFBIG (SIGXFSZ ignored) instead of killing the process
LIMIT_WRITES = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
"""

SAVE_ON_A_FULL_DISK = """
import sys, torch
from hwnas.checkpoint import save_checkpoint
from hwnas.errors import HwnasError
path = sys.argv[1]
save_checkpoint(path, {"format": "the old one", "model": {"w": torch.zeros(16)}})
""" + LIMIT_WRITES + """
try:
    save_checkpoint(path, {"model": {"w": torch.zeros(1 << 20)}})  # 4 MiB: over the 1 MiB limit
except HwnasError as exc:
    print(f"{type(exc).__name__}: {exc}")
    sys.exit(3)
"""

CLI_ON_A_FULL_DISK = LIMIT_WRITES + """
import sys
from hwnas.cli import main
sys.exit(main(sys.argv[1:]))
"""


def orphans(directory: Path) -> list[Path]:
    return sorted(directory.glob(".supernet.pt.*.tmp"))


def kill_mid_save(path: Path) -> None:
    """A real process killed with SIGKILL while `save_checkpoint(path)` is inside torch.save; checks that, while it
    was alive, its temporary file was not taken for an orphan."""
    proc = subprocess.Popen([sys.executable, "-c", SAVE_AND_STALL, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "saving\n"
        assert len(orphans(path.parent)) == 1
        assert remove_orphan_temps(path) == [] and len(orphans(path.parent)) == 1  # its writer is alive
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -9 and len(orphans(path.parent)) == 1  # killed: the temporary file stays behind


def test_a_save_killed_midway_leaves_no_orphan_after_the_next_run(tmp_path: Path, hwnas_cli) -> None:
    data = write_folder(tmp_path / "parts", {"train": 4, "val": 1})
    out = tmp_path / "run"
    command = ("train", "--space", "mbv3-32", "--data", spec(data), "--out", str(out), "--batch-size", "8", *TINY)
    kill_mid_save(out / "supernet.pt")  # the first save of a run, killed
    result = hwnas_cli(*command)
    assert result.returncode == 0, result.stderr
    assert orphans(out) == [] and load_checkpoint(out / "supernet.pt")["complete"]
    before = (out / "supernet.pt").read_bytes()
    kill_mid_save(out / "supernet.pt")  # a save over a good checkpoint, killed: the good one stays
    assert (out / "supernet.pt").read_bytes() == before
    resumed = hwnas_cli(*command, "--resume")  # removes the orphan as it starts (the run is complete: no save)
    assert resumed.returncode == 0, resumed.stderr
    assert orphans(out) == [] and (out / "supernet.pt").read_bytes() == before


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "supernet.pt"
    done = subprocess.run([sys.executable, "-c", SAVE_ON_A_FULL_DISK, str(path)], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=300)
    assert done.returncode == 3, done.stderr
    assert done.stdout.strip() == (f"OutputError: {path}: cannot write the checkpoint (File too large); supernet.pt "
                                   "there is the previous one, unchanged")
    assert torch.load(path, weights_only=True)["format"] == "the old one" and orphans(tmp_path) == []


def test_train_on_a_full_disk_ends_in_one_line_not_a_torch_traceback(tmp_path: Path) -> None:
    data = write_folder(tmp_path / "parts", {"train": 4, "val": 1})
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", CLI_ON_A_FULL_DISK, "train", "--space", "mbv3-32", "--data",
                           spec(data), "--out", str(out), "--batch-size", "8", *TINY],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "inline_container" not in done.stderr
    assert done.stderr.splitlines()[-1] == (f"hwnas train: error: {out / 'supernet.pt'}: cannot write the checkpoint "
                                            "(File too large); nothing was written")
    assert not (out / "supernet.pt").exists() and orphans(out) == []


def test_a_checkpoint_with_non_finite_weights_is_refused_naming_the_file_and_the_tensor(tmp_path: Path) -> None:
    state = torch.load(SHIPPED, weights_only=True)
    floats = [k for k, v in state["model"].items() if v.is_floating_point()]
    nan = tmp_path / "nan.pt"
    torch.save({**state, "model": {k: v.clone().fill_(float("nan")) if k in floats else v
                                   for k, v in state["model"].items()}}, nan)
    with pytest.raises(CheckpointError, match=rf"^{nan}: checkpoint field 'model' is not finite: '{floats[0]}' holds "
                                              rf"\d+ NaN value\(s\) of \d+ \(and {len(floats) - 1} more tensor\(s\)\); "
                                              r"the run that wrote it diverged"):
        load_supernet(nan)
    variance = next(k for k in floats if k.endswith("running_var"))
    inf = tmp_path / "inf.pt"
    model = dict(state["model"])
    model[variance] = model[variance].clone()
    model[variance][0] = float("inf")
    torch.save({**state, "model": model}, inf)
    with pytest.raises(CheckpointError, match=rf"'{variance}' holds 1 infinite value\(s\) of \d+;"):
        load_supernet(inf)
    net, _ = load_supernet(SHIPPED)  # the shipped one is finite
    assert all(bool(torch.isfinite(t).all()) for t in net.state_dict().values() if t.is_floating_point())


def test_the_collapse_threshold_scales_with_the_validation_set() -> None:
    assert noise_points(50.0, 50.0, 40) == pytest.approx(300 * (0.5 / 40) ** 0.5)  # 33.5 points
    history = [{"val_acc_largest": 60.0}]
    assert collapse_reason(history, 40.0, 4, 15.0, 40) == ""  # 8 images of 40: noise
    assert collapse_reason(history, 40.0, 4, 15.0, 5000) == ("fell 20.0 points below its best (40.00 % vs 60.00 %; "
                                                             "limit 15)")
    assert collapse_reason([{"val_acc_largest": 95.0}], 40.0, 4, 15.0, 40) == (
        "fell 55.0 points below its best (40.00 % vs 95.00 %; limit 31.4 points on 40 validation images)")
    assert collapse_reason([{"val_acc_largest": 40.0}], 27.5, 4, 15.0, 40) == ""  # "to chance" is noise here too
    assert collapse_reason([{"val_acc_largest": 40.0}], 27.5, 4, 15.0, 5000).startswith("fell to chance")
    assert collapse_reason(history, 0.0, 4, None, 5000) == ""  # --no-collapse-check


class FlipClassifier(Callback):
    """After step `step`, the classifier's outputs negated: the most likely class becomes the least likely."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, info: StepInfo) -> None:
        if info.step == self.step:
            classifier = info.model.head.classifier
            assert isinstance(classifier, torch.nn.Linear)
            with torch.no_grad():
                classifier.weight.neg_()
                classifier.bias.neg_()


def test_a_collapse_advises_flags_that_resume_from_the_last_good_checkpoint(tmp_path: Path, hwnas_cli) -> None:
    data = write_folder(tmp_path / "parts", {"train": 20, "val": 1})
    out = tmp_path / "run"
    argv = ["train", "--space", "mbv3-32", "--data", spec(data), "--out", str(out), "--epochs", "2", "--batch-size",
            "8", "--steps-per-epoch", "4", "--num-sampled", "0", "--warmup-epochs", "0", "--bn-batches", "1",
            "--val-size", "40", "--device", "cpu", "--quiet"]
    config = config_from_args(build_parser().parse_args(argv))  # the CLI's recipe, with a fault injected
    with pytest.warns(UserWarning):
        dataset = load_dataset(spec(data), val_size=40)
    space = spaces.get("mbv3-32", in_channels=3, num_classes=4)
    with pytest.raises(TrainingError, match=rf"accuracy collapse in epoch 2: .*the last good checkpoint "
                                            rf"{out / 'supernet.pt'} \(epoch 1\) is kept") as stopped:
        train_supernet(space, dataset, config, out, callbacks=[FlipClassifier(step=7)], progress=False)
    message = str(stopped.value)
    flags = re.search(r"rerun the same command with '([^']+)' appended", message)
    noise = re.search(r"or with '([^']+)' if the fall is noise", message)
    assert flags is not None and noise is not None, message
    assert flags.group(1) == "--resume --lr 0.125" and noise.group(1) == "--resume --no-collapse-check"
    kept = load_checkpoint(out / "supernet.pt")
    for alternative, change in ((noise.group(1), "collapse_drop 15.0 -> None"),
                                ("--resume --grad-clip 1", "grad_clip None -> 1.0")):  # the non-finite loss's advice
        other = config_from_args(build_parser().parse_args([*argv, *alternative.split()]))
        with pytest.warns(UserWarning, match=re.escape(change)):  # accepted, and said
            check_resume(out / "supernet.pt", kept, space, dataset, other)

    resumed = hwnas_cli(*argv, *flags.group(1).split())  # the advised command, as it says, run to the end
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out / 'supernet.pt'} with lr 0.25 -> 0.125: from epoch 2 on" in resumed.stderr
    state = load_checkpoint(out / "supernet.pt")
    assert state["complete"] and state["epoch"] == 2 and state["train_config"]["lr"] == 0.125
    assert state["history"][0] == kept["history"][0]  # continued from the kept epoch, not restarted
    refused = hwnas_cli(*argv, "--resume", "--momentum", "0.5")  # what moves the trajectory otherwise still may not
    assert refused.returncode == 2 and "train_config.momentum is 0.9 in the checkpoint, 0.5 now" in refused.stderr
